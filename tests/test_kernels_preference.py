"""option_probs, sum_option_logprobs, bt_loss and dpo_loss against float64 references."""


import pytest
import torch
import torch.nn.functional as F

from kernels.preference import (bt_loss_reference, bt_loss_torch, bt_loss_triton,
                                dpo_loss_reference, dpo_loss_torch, dpo_loss_triton,
                                option_probs_reference, option_probs_torch, option_probs_triton,
                                sum_option_logprobs)

ATOL, RTOL = 1e-5, 1e-4
OPTION = {"triton": option_probs_triton, "torch": option_probs_torch}
BT = {"triton": bt_loss_triton, "torch": bt_loss_torch}
DPO = {"triton": dpo_loss_triton, "torch": dpo_loss_torch}


def _close(a, b):
    torch.testing.assert_close(a.double(), b.double().detach(), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("B,K,temperature,clamp", [
    (1, 2, 1.0, None), (7, 2, 1.0, (0.4, 0.6)), (5, 5, 2.0, None), (3, 3, 0.5, (0.2, 0.5))])
def test_option_probs(impl, B, K, temperature, clamp):
    x = 3 * torch.randn(B, K, generator=torch.Generator().manual_seed(B * K))
    out = OPTION[impl](x, temperature=temperature, clamp=clamp)
    _close(out, option_probs_reference(x.double(), temperature=temperature, clamp=clamp))
    _close(out.sum(-1), torch.ones(B))
    if clamp is not None and K == 2:
        assert ((out >= clamp[0] - 1e-6) & (out <= clamp[1] + 1e-6)).all()


def test_option_probs_clamp_matches_the_paper():
    """Two options, chain-of-thought labels clamped to 40-60%: (0.9, 0.1) -> (0.6, 0.4)."""
    x = torch.tensor([[0.9, 0.1], [0.55, 0.45]]).log()
    for fn in OPTION.values():
        _close(fn(x, clamp=(0.4, 0.6)), torch.tensor([[0.6, 0.4], [0.55, 0.45]]))


def test_sum_option_logprobs():
    token_lp = torch.tensor([-1.0, -2.0, -0.5, -0.25, -3.0], requires_grad=True)
    index = torch.tensor([0, 0, 1, 3, 3])
    out = sum_option_logprobs(token_lp, index, 4)
    _close(out, torch.tensor([-3.0, -0.5, 0.0, -3.25]))
    out.sum().backward()
    _close(token_lp.grad, torch.ones(5))


def _pairs(B, seed, n=4):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, generator=gen) * 2 for _ in range(n)], torch.rand(B, generator=gen)


def _check(fn, ref_fn, inputs, n_grad, **kw):
    xs = [x.clone().requires_grad_(i < n_grad) for i, x in enumerate(inputs)]
    xds = [x.double().requires_grad_(i < n_grad) for i, x in enumerate(inputs)]
    kw_d = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    out, ref = fn(*xs, **kw), ref_fn(*xds, **kw_d)
    for o, r in zip(out, ref):
        if r is not None:
            _close(o, r)
    out.loss.backward()
    ref.loss.backward()
    for x, xd in zip(xs[:n_grad], xds[:n_grad]):
        _close(x.grad, xd.grad)
    return out


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("B", [1, 37, 4096])
@pytest.mark.parametrize("soft", [False, True])
def test_bt_loss(impl, B, soft):
    (rc, rr, _, _), p = _pairs(B, seed=B)
    p_chosen = p if soft else None
    out = _check(lambda a, b: BT[impl](a, b, p_chosen),
                 lambda a, b: bt_loss_reference(a, b, None if p_chosen is None
                                                else p_chosen.double()), [rc, rr], 2)
    # the formula of the issue, written out
    m = (rc - rr).double()
    pd = torch.ones(B, dtype=torch.float64) if p_chosen is None else p_chosen.double()
    expected = -(pd * F.logsigmoid(m) + (1 - pd) * F.logsigmoid(-m)).mean()
    _close(out.loss, expected)
    _close(out.margin, m)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("B", [1, 37, 4096])
@pytest.mark.parametrize("labels", ["hard", "smoothed", "soft"])
def test_dpo_loss(impl, B, labels):
    inputs, p = _pairs(B, seed=B + 1)
    kw = dict(beta=0.3)
    if labels == "smoothed":
        kw["label_smoothing"] = 0.1
    if labels == "soft":
        kw["p_chosen"] = p
    out = _check(DPO[impl], dpo_loss_reference, inputs, 4, **kw)  # grads to all four
    pc, pr, rc, rr = (x.double() for x in inputs)
    _close(out.chosen_reward, 0.3 * (pc - rc))
    _close(out.margin, 0.3 * ((pc - rc) - (pr - rr)))


def test_accuracy_follows_the_label_side():
    rc, rr = torch.tensor([1.0, 0.0, 2.0, -1.0]), torch.tensor([0.0, 1.0, 0.0, 0.0])
    p = torch.tensor([0.9, 0.8, 0.2, 0.3])  # correct, wrong, wrong, correct
    for fn in BT.values():
        assert fn(rc, rr, p).accuracy.item() == pytest.approx(0.5)
        assert fn(rc, rr).accuracy.item() == pytest.approx(0.5)


def test_dpo_with_frozen_reference_sends_no_gradient_there():
    (pc, pr, rc, rr), _ = _pairs(9, seed=2)
    pc.requires_grad_()
    out = dpo_loss_torch(pc, pr, rc, rr)
    out.loss.backward()
    assert pc.grad is not None and rc.grad is None


def test_option_probs_bfloat16_input_computes_in_float32():
    """bfloat16 option log-probs: the softmax runs in float32 and is rounded once."""
    import kernels.preference as pref

    x = torch.tensor([[-0.30, -1.71, -2.9], [-5.0, -0.2, -0.21]], dtype=torch.bfloat16)
    ref = torch.softmax(x.double() / 0.7, -1)
    for fn in (pref.option_probs_torch, pref.option_probs_triton):
        out = fn(x, temperature=0.7)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), ref.to(torch.bfloat16).double(), atol=0, rtol=0)
