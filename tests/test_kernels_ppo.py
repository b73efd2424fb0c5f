"""kl_penalty, ppo_policy_loss, ppo_value_loss against float64 references."""


import pytest
import torch

from kernels.ppo import (kl_penalty_reference, kl_penalty_torch, kl_penalty_triton,
                         ppo_policy_loss_reference, ppo_policy_loss_torch,
                         ppo_policy_loss_triton, ppo_value_loss_reference, ppo_value_loss_torch,
                         ppo_value_loss_triton, truncated_is_weights)

ATOL, RTOL = 1e-5, 1e-4
KL = {"triton": kl_penalty_triton, "torch": kl_penalty_torch}
POLICY = {"triton": ppo_policy_loss_triton, "torch": ppo_policy_loss_torch}
VALUE = {"triton": ppo_value_loss_triton, "torch": ppo_value_loss_torch}
# (lengths of the packed sequences); one with no masked tokens, length-1 sequences
CASES = {"one": [1], "odd": [3, 1, 250, 1, 40], "large": [1000, 1, 2000, 97, 3000]}


def _batch(lens, seed):
    gen = torch.Generator().manual_seed(seed)
    N = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    new = torch.randn(N, generator=gen)
    old = new + 0.3 * torch.randn(N, generator=gen)  # ratios well inside and outside the clip
    third = torch.randn(N, generator=gen)
    mask = torch.rand(N, generator=gen) > 0.3
    mask[0] = True
    if len(lens) > 2:
        mask[cu[2]:cu[3]] = False  # a sequence with no tokens in the loss
    return new, old, third, mask, cu


def _check_loss(fn, ref_fn, lens, reduction, seed, **kw):
    x, old, third, mask, cu = _batch(lens, seed)
    x = x.requires_grad_()
    xd = x.detach().double().requires_grad_()
    out = fn(x, old, third, mask, reduction=reduction, cu_seqlens=cu, **kw)
    ref = ref_fn(xd, old.double(), third.double(), mask, reduction=reduction, cu_seqlens=cu, **kw)
    for o, r in zip(out, ref):
        assert o.dim() == 0
        torch.testing.assert_close(o.double(), r.detach(), atol=ATOL, rtol=RTOL)
    out.loss.backward()
    ref.loss.backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, atol=ATOL, rtol=RTOL)
    return out


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("case", ["one", "odd", "large"])
@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_policy_loss(impl, case, reduction):
    _check_loss(POLICY[impl], ppo_policy_loss_reference, CASES[case], reduction, seed=len(case))


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("case", ["one", "odd", "large"])
@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_value_loss(impl, case, reduction):
    _check_loss(VALUE[impl], ppo_value_loss_reference, CASES[case], reduction, seed=len(case),
                clip_eps=0.1)


def test_policy_clip_eps_changes_clip_fraction():
    small = _check_loss(ppo_policy_loss_torch, ppo_policy_loss_reference, CASES["odd"], "token",
                        seed=3, clip_eps=0.05)
    large = _check_loss(ppo_policy_loss_torch, ppo_policy_loss_reference, CASES["odd"], "token",
                        seed=3, clip_eps=0.3)
    assert 0 < large.clip_frac < small.clip_frac < 1


def test_sequence_reduction_by_hand():
    """'sequence' = mean over sequences (with any masked token) of the masked token mean."""
    lp, old, adv, mask, cu = _batch(CASES["odd"], seed=4)
    ratio = torch.exp(lp.double() - old.double())
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    means = [per_token[s:e][mask[s:e]].mean() for s, e in zip(cu[:-1], cu[1:]) if mask[s:e].any()]
    expected = torch.stack(means).mean()
    for fn in POLICY.values():
        out = fn(lp, old, adv, mask, reduction="sequence", cu_seqlens=cu)
        torch.testing.assert_close(out.loss.double(), expected, atol=ATOL, rtol=RTOL)
        token = fn(lp, old, adv, mask, reduction="token")
        torch.testing.assert_close(token.loss.double(), per_token[mask].mean(), atol=ATOL,
                                   rtol=RTOL)


def test_unchanged_policy_has_no_clipping_and_zero_kl():
    lp, _, adv, mask, _ = _batch(CASES["odd"], seed=5)
    for fn in POLICY.values():
        out = fn(lp, lp, adv, mask)
        assert out.clip_frac == 0 and abs(out.approx_kl) < 1e-7
        torch.testing.assert_close(out.loss, -(adv * mask).sum() / mask.sum())


def test_sequence_reduction_needs_cu_seqlens():
    lp, old, adv, mask, _ = _batch([5], seed=6)
    with pytest.raises(AssertionError):
        ppo_policy_loss_torch(lp, old, adv, mask, reduction="sequence")
    with pytest.raises(ValueError):
        ppo_policy_loss_torch(lp, old, adv, mask, reduction="mean")


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
@pytest.mark.parametrize("N", [1, 1031])
def test_kl_penalty(impl, kind, N):
    lp, ref_lp, _, _, _ = _batch([N], seed=N)
    lp = lp.requires_grad_()
    lpd = lp.detach().double().requires_grad_()
    out = KL[impl](lp, ref_lp, kind)
    ref = kl_penalty_reference(lpd, ref_lp.double(), kind)
    torch.testing.assert_close(out.double(), ref.detach(), atol=ATOL, rtol=RTOL)
    grad = torch.randn(N, generator=torch.Generator().manual_seed(1))
    (out * grad).sum().backward()
    (ref * grad.double()).sum().backward()
    torch.testing.assert_close(lp.grad.double(), lpd.grad, atol=ATOL, rtol=RTOL)


def test_kl_estimators_agree_on_their_expectation():
    """k1 and k3 are unbiased for KL(pi || ref); sampled from a small categorical."""
    gen = torch.Generator().manual_seed(7)
    pi, ref = torch.softmax(torch.randn(6, generator=gen), 0), torch.softmax(
        torch.randn(6, generator=gen), 0)
    true_kl = (pi * (pi.log() - ref.log())).sum()
    samples = torch.multinomial(pi, 200_000, replacement=True, generator=gen)
    lp, ref_lp = pi.log()[samples], ref.log()[samples]
    for kind in ("k1", "k3"):
        torch.testing.assert_close(kl_penalty_torch(lp, ref_lp, kind).mean(), true_kl,
                                   atol=0.01, rtol=0.0)
    assert (kl_penalty_torch(lp, ref_lp, "k3") >= 0).all()


def test_truncated_is_weights_by_hand():
    """w = min(exp(old - sampler), cap): ratios 1, e^0.5, e^-1 and e^1 (cut to the cap 2)."""
    old = torch.tensor([-1.0, -0.5, -2.0, -0.2])
    sampler = torch.tensor([-1.0, -1.0, -1.0, -1.2])
    w, cut = truncated_is_weights(old, sampler, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([1.0, 1.6487213, 0.3678794, 2.0]))
    assert cut.tolist() == [False, False, False, True]
    with pytest.raises(ValueError):
        truncated_is_weights(old, sampler, cap=0.0)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_policy_loss_is_weight_by_hand(impl):
    """Two tokens, token mean: loss = (iw_0 l_0 + iw_1 l_1) / 2, with l the clipped surrogate;
    the metrics are not weighted."""
    lp = torch.tensor([0.0, 0.5], requires_grad=True)
    old = torch.tensor([0.0, 0.0])
    adv = torch.tensor([1.0, -1.0])
    iw = torch.tensor([0.5, 2.0])
    out = POLICY[impl](lp, old, adv, torch.ones(2), clip_eps=0.2, is_weight=iw)
    # token 0: ratio 1, l = -1. token 1: ratio e^0.5 = 1.6487, A < 0: max(1.6487, 1.2) = 1.6487
    r1 = torch.tensor(0.5).exp().item()
    torch.testing.assert_close(out.loss, torch.tensor((0.5 * -1.0 + 2.0 * r1) / 2))
    assert float(out.clip_frac) == 0.0  # neither token took the clipped branch
    torch.testing.assert_close(out.approx_kl, torch.tensor(((r1 - 1) - 0.5) / 2))
    out.loss.backward()
    # d/dlp of -A rho is -A rho: token 0 -> -1 * 0.5 / 2, token 1 -> r1 * 2 / 2
    torch.testing.assert_close(lp.grad, torch.tensor([-0.25, r1]))


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_policy_loss_is_weight_one_is_the_plain_loss(impl, reduction):
    lp, old, adv, mask, cu = _batch(CASES["odd"], seed=8)
    plain = POLICY[impl](lp, old, adv, mask, reduction=reduction, cu_seqlens=cu)
    ones = POLICY[impl](lp, old, adv, mask, reduction=reduction, cu_seqlens=cu, is_weight=torch.ones_like(lp))
    for a, b in zip(plain, ones):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("case", ["odd", "large"])
def test_policy_loss_is_weight_against_reference(impl, case):
    """Loss and gradient with random TIS weights against the float64 reference."""
    lp, old, adv, mask, cu = _batch(CASES[case], seed=9)
    iw, _ = truncated_is_weights(old, old + 0.3 * torch.randn(len(old), generator=torch.Generator().manual_seed(2)))
    x = lp.clone().requires_grad_()
    xd = lp.double().requires_grad_()
    out = POLICY[impl](x, old, adv, mask, reduction="sequence", cu_seqlens=cu, is_weight=iw)
    ref = ppo_policy_loss_reference(xd, old.double(), adv.double(), mask, reduction="sequence",
                                    cu_seqlens=cu, is_weight=iw.double())
    for o, r in zip(out, ref):
        torch.testing.assert_close(o.double(), r.detach(), atol=ATOL, rtol=RTOL)
    out.loss.backward()
    ref.loss.backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, atol=ATOL, rtol=RTOL)
