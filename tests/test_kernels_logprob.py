"""logprob and linear_logprob: every implementation against a float64 reference."""
import importlib


import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kernels.logprob import (linear_logprob_reference, linear_logprob_torch,
                             linear_logprob_triton, logprob_reference, logprob_torch,
                             logprob_triton)

lp_mod = importlib.import_module("kernels.logprob")  # `kernels.logprob` is the function
ATOL, RTOL = 1e-5, 1e-4
LOGPROB = {"triton": logprob_triton, "torch": logprob_torch}
LINEAR = {"triton": linear_logprob_triton, "torch": linear_logprob_torch}


def _labels(N, V, gen, ignore_every=0):
    labels = torch.randint(0, V, (N,), generator=gen)
    if ignore_every:
        labels[::ignore_every] = -100
    return labels


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


def _check_against_reference(fn, ref_fn, inputs, kwargs, gen, atol=ATOL, rtol=RTOL):
    """Forward values and gradients (for random upstream gradients) vs float64."""
    ins = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    refs = [x.detach().double().requires_grad_(x.requires_grad) if x.is_floating_point() else x
            for x in inputs]
    out, ref = _outputs(fn(*ins, **kwargs)), _outputs(ref_fn(*refs, **kwargs))
    grads = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in out]
    for o, r in zip(out, ref):
        assert o.dtype == torch.float32
        torch.testing.assert_close(o.double(), r.detach(), atol=atol, rtol=rtol)
    sum((o * g.float()).sum() for o, g in zip(out, grads)).backward()
    sum((r * g).sum() for r, g in zip(ref, grads)).backward()
    for x, r in zip(ins, refs):
        if x.is_floating_point() and r.requires_grad:
            torch.testing.assert_close(x.grad.double(), r.grad, atol=atol, rtol=rtol)
        elif x.is_floating_point():
            assert x.grad is None
    return out


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("N,V", [(1, 257), (7, 1000), (12, 257)])
@pytest.mark.parametrize("temperature,entropy", [(1.0, False), (0.7, True), (1.3, False)])
def test_logprob_small(impl, N, V, temperature, entropy):
    gen = torch.Generator().manual_seed(N * V)
    logits = (3 * torch.randn(N, V, generator=gen)).requires_grad_()
    labels = _labels(N, V, gen, ignore_every=3 if N > 1 else 0)
    _check_against_reference(LOGPROB[impl], logprob_reference, [logits, labels],
                             dict(temperature=temperature, return_entropy=entropy), gen)


@pytest.mark.parametrize("entropy", [False, True])
def test_logprob_torch_many_chunks(monkeypatch, entropy):
    monkeypatch.setattr(lp_mod, "_CHUNK_ELEMS", 3 * 5003)  # 3 rows per chunk, ragged end
    gen = torch.Generator().manual_seed(1)
    logits = (4 * torch.randn(301, 5003, generator=gen)).requires_grad_()
    labels = _labels(301, 5003, gen, ignore_every=7)
    _check_against_reference(logprob_torch, logprob_reference, [logits, labels],
                             dict(temperature=0.8, return_entropy=entropy), gen)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_logprob_ignored_rows_give_zero_and_no_gradient(impl):
    logits = torch.randn(5, 300, requires_grad=True)
    labels = torch.tensor([-100, 3, -100, 299, 0])
    lp, ent = LOGPROB[impl](logits, labels, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    assert lp[0] == 0 and lp[2] == 0 and ent[0] == 0 and ent[2] == 0
    assert logits.grad[0].abs().sum() == 0 and logits.grad[2].abs().sum() == 0
    assert logits.grad[1].abs().sum() > 0
    # a custom ignore_index
    lp = LOGPROB[impl](logits, labels.clamp(min=0), ignore_index=3)
    assert lp[1] == 0 and lp[3] != 0


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_entropy_of_uniform_and_peaked_rows(impl):
    logits = torch.zeros(2, 1000)
    logits[1, 7] = 1e4
    lp, ent = LOGPROB[impl](logits, torch.tensor([5, 7]), return_entropy=True)
    log_v = torch.log(torch.tensor(1000.0))
    torch.testing.assert_close(ent, torch.stack([log_v, torch.tensor(0.0)]), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lp, torch.stack([-log_v, torch.tensor(0.0)]), atol=ATOL, rtol=RTOL)


def test_logprob_entropy_only_used():
    """The entropy alone in the loss: dlp arrives as zeros."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(9, 777, generator=gen, requires_grad=True)
    labels = _labels(9, 777, gen)
    _, ent = logprob_torch(logits, labels, return_entropy=True)
    ent.sum().backward()
    x = logits.detach().double().requires_grad_()
    logprob_reference(x, labels, return_entropy=True)[1].sum().backward()
    torch.testing.assert_close(logits.grad.double(), x.grad, atol=ATOL, rtol=RTOL)


class _MaxAlloc(TorchDispatchMode):
    """Records the largest new tensor (not a view of, or a write into, an input) any op
    returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.largest = max(self.largest, t.numel())
        return out


def test_logprob_forward_has_no_full_size_temporary(monkeypatch):
    N, V = 1024, 4096
    monkeypatch.setattr(lp_mod, "_CHUNK_ELEMS", 64 * V)
    logits, labels = torch.randn(N, V), torch.randint(0, V, (N,))
    with _MaxAlloc() as rec:
        logprob_torch(logits, labels, temperature=0.9, return_entropy=True)
    assert 0 < rec.largest <= 64 * V


def test_linear_logprob_never_holds_full_logits():
    N, H, V = 512, 32, 4096
    hidden = torch.randn(N, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    labels = torch.randint(0, V, (N,))
    with _MaxAlloc() as rec:
        lp, ent = linear_logprob_torch(hidden, weight, labels, return_entropy=True,
                                       chunk_size=64)
        (lp.sum() + ent.sum()).backward()
    assert 0 < rec.largest <= 64 * V


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("N,H,V,chunk", [(1, 16, 257, None), (9, 24, 1000, 4), (13, 8, 257, 13)])
@pytest.mark.parametrize("temperature,entropy", [(1.0, False), (0.7, True)])
def test_linear_logprob_small(impl, N, H, V, chunk, temperature, entropy):
    gen = torch.Generator().manual_seed(N + V)
    hidden = torch.randn(N, H, generator=gen).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / H**0.5).requires_grad_()
    labels = _labels(N, V, gen, ignore_every=4 if N > 1 else 0)
    _check_against_reference(LINEAR[impl], linear_logprob_reference, [hidden, weight, labels],
                             dict(temperature=temperature, return_entropy=entropy,
                                  chunk_size=chunk), gen)


@pytest.mark.parametrize("entropy", [False, True])
def test_linear_logprob_torch_larger(entropy):
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(333, 64, generator=gen).requires_grad_()
    weight = (2 * torch.randn(4099, 64, generator=gen) / 8).requires_grad_()
    labels = _labels(333, 4099, gen, ignore_every=5)
    _check_against_reference(linear_logprob_torch, linear_logprob_reference,
                             [hidden, weight, labels],
                             dict(temperature=1.1, return_entropy=entropy, chunk_size=100), gen)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("frozen", ["weight", "hidden"])
@pytest.mark.parametrize("entropy", [False, True])
def test_linear_logprob_frozen_input(impl, frozen, entropy):
    """A weight that does not require grad (e.g. a frozen tied embedding) gets none, and
    the hidden-state gradient is formed in the forward; or the hidden states are frozen."""
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(6, 16, generator=gen).requires_grad_(frozen == "weight")
    weight = (torch.randn(300, 16, generator=gen) / 4).requires_grad_(frozen == "hidden")
    labels = _labels(6, 300, gen, ignore_every=4)
    _check_against_reference(LINEAR[impl], linear_logprob_reference, [hidden, weight, labels],
                             dict(chunk_size=4, temperature=0.9, return_entropy=entropy), gen)


def test_linear_logprob_matches_logprob_from_logits():
    gen = torch.Generator().manual_seed(7)
    hidden, weight = torch.randn(40, 32, generator=gen), torch.randn(1500, 32, generator=gen)
    labels = _labels(40, 1500, gen, ignore_every=6)
    a = linear_logprob_torch(hidden, weight, labels, return_entropy=True, chunk_size=7)
    b = logprob_torch(hidden @ weight.t(), labels, return_entropy=True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=ATOL, rtol=RTOL)


def test_empty_input():
    lp = logprob_torch(torch.randn(0, 50), torch.zeros(0, dtype=torch.int64))
    assert lp.shape == (0,)
    lp = linear_logprob_torch(torch.randn(0, 8), torch.randn(50, 8),
                              torch.zeros(0, dtype=torch.int64))
    assert lp.shape == (0,)


# ------------------------------------------------------------------------------------------
# Masked (-inf) logits, out-of-vocabulary labels, bfloat16 on the fused linear path
# ------------------------------------------------------------------------------------------
def _masked_logits(N, V, gen, first_tile_masked=4096):
    """Random logits with scattered -inf entries; row 0's first `first_tile_masked` logits
    (a whole Triton tile) are all -inf, and no label falls on a masked logit of row 1."""
    logits = 3 * torch.randn(N, V, generator=gen, dtype=torch.float64)
    logits[torch.rand(N, V, generator=gen, dtype=torch.float64) < 0.3] = float("-inf")
    logits[0, :first_tile_masked] = float("-inf")
    return logits


@pytest.mark.parametrize("impl", ["triton", "torch", "reference"])
@pytest.mark.parametrize("entropy", [False, True])
def test_logprob_masked_logits(impl, entropy):
    """-inf logits are legal: finite log-probs, entropies and gradients (no NaN), equal to
    the float64 reference computed on the finite logits only."""
    gen = torch.Generator().manual_seed(11)
    N, V = 4, 5000
    logits64 = _masked_logits(N, V, gen)
    labels = torch.tensor([4500, 3, -100, 7])
    finite = torch.isfinite(logits64)
    for i, y in enumerate(labels.tolist()):  # labels on finite logits
        if y >= 0 and not finite[i, y]:
            logits64[i, y] = 0.5
    fn = {**LOGPROB, "reference": logprob_reference}[impl]
    logits = logits64.float().requires_grad_()
    out = _outputs(fn(logits, labels, temperature=0.9, return_entropy=entropy))
    sum(o.sum() for o in out).backward()
    for o in out:
        assert torch.isfinite(o).all(), o
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[~finite] == 0).all()
    # the reference on each row's finite logits alone
    for i, y in enumerate(labels.tolist()):
        if y < 0:
            assert all(o[i] == 0 for o in out) and (logits.grad[i] == 0).all()
            continue
        keep = torch.isfinite(logits64[i])
        x = logits64[i, keep].clone().requires_grad_()
        ref = _outputs(logprob_reference(x[None], keep[:y].sum()[None], temperature=0.9,
                                         return_entropy=entropy))
        sum(r.sum() for r in ref).backward()
        for o, r in zip(out, ref):
            torch.testing.assert_close(o[i].double(), r[0].detach(), atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(logits.grad[i, keep].double(), x.grad, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_logprob_label_on_masked_logit(impl):
    """A label whose logit is -inf has log-prob -inf (probability 0), and the rest stays
    finite: the entropy and every gradient."""
    logits = torch.randn(2, 300)
    logits[0, 5] = float("-inf")
    logits.requires_grad_()
    lp, ent = LOGPROB[impl](logits, torch.tensor([5, 6]), return_entropy=True)
    assert lp[0] == float("-inf") and torch.isfinite(lp[1])
    assert torch.isfinite(ent).all()
    ent.sum().backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("fn", [logprob_torch, logprob_reference], ids=["torch", "reference"])
def test_logprob_out_of_vocabulary_label_raises_on_cpu(fn):
    logits = torch.randn(3, 50)
    with pytest.raises((ValueError, RuntimeError), match="outside the vocabulary|out of bounds"):
        fn(logits, torch.tensor([1, 50, 2]))
    with pytest.raises(ValueError, match=r"labels\[0\] = -7"):
        logprob_torch(logits, torch.tensor([-7, 1, 2]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        linear_logprob_torch(torch.randn(3, 4), torch.randn(50, 4), torch.tensor([0, 1, 99]))


def test_logprob_triton_never_reads_an_out_of_vocabulary_label():
    """On CUDA the check would sync, so the kernel masks the load: NaN log-prob for that
    row, the other rows and every gradient as without it."""
    gen = torch.Generator().manual_seed(13)
    logits = torch.randn(3, 70, generator=gen, requires_grad=True)
    lp = logprob_triton(logits, torch.tensor([1, 1 << 40, -3]))
    ref = logprob_reference(logits.detach().double(), torch.tensor([1, 0, 0]))
    assert torch.isnan(lp[1]) and torch.isnan(lp[2])
    torch.testing.assert_close(lp[0].double(), ref[0], atol=ATOL, rtol=RTOL)
    lp[0].backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[1:] == 0).all()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_linear_logprob_bfloat16_accumulates_in_float32(impl):
    """bfloat16 hidden/weight, one row per chunk, 512 equal rows: the weight's gradient sums
    512 equal chunk contributions. In float32 that sum is exact to ~1e-6 and is rounded to
    bfloat16 once (2^-9 relative); a bfloat16 running sum stops growing once the sum is 256
    contributions (its half-ulp), so it ends ~50% low. Tolerances: dweight 1% relative,
    lp 2e-4 (float32 logits; a bfloat16 logit alone is off by ~3e-2 at |z| ~ 8), dhidden 2%
    (stored in bfloat16)."""
    gen = torch.Generator().manual_seed(14)
    N, H, V = 512, 16, 40
    hidden = (torch.rand(1, H, generator=gen) + 0.5).expand(N, H).bfloat16().requires_grad_()
    weight = (2 * torch.randn(V, H, generator=gen)).bfloat16().requires_grad_()
    labels = torch.full((N,), 3)
    lp = LINEAR[impl](hidden, weight, labels, chunk_size=1)
    assert lp.dtype == torch.float32
    lp.sum().backward()
    h64, w64 = (x.detach().double().requires_grad_() for x in (hidden, weight))
    ref = linear_logprob_reference(h64, w64, labels)
    ref.sum().backward()
    assert weight.grad.dtype == torch.bfloat16 and hidden.grad.dtype == torch.bfloat16
    torch.testing.assert_close(weight.grad.double(), w64.grad, atol=1e-6, rtol=1e-2)
    torch.testing.assert_close(lp.double(), ref.detach(), atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, atol=2e-2, rtol=2e-2)


def test_logprob_bfloat16_logits_statistics_in_float32():
    """bfloat16 logits: the torch path's log-softmax and gradient run in float32 (the
    logits are exact bfloat16 numbers, so only float32 rounding remains)."""
    gen = torch.Generator().manual_seed(15)
    logits = (4 * torch.randn(6, 333, generator=gen)).bfloat16().requires_grad_()
    labels = torch.randint(0, 333, (6,), generator=gen)
    for fn in (logprob_torch, logprob_triton):
        logits.grad = None
        lp, ent = fn(logits, labels, return_entropy=True)
        (lp.sum() + ent.sum()).backward()
        x = logits.detach().double().requires_grad_()
        ref = logprob_reference(x, labels, return_entropy=True)
        sum(r.sum() for r in ref).backward()
        torch.testing.assert_close(lp.double(), ref[0].detach(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ent.double(), ref[1].detach(), atol=1e-4, rtol=1e-4)
        # the gradient is stored in bfloat16: one rounding, 2^-9 relative
        torch.testing.assert_close(logits.grad.double(), x.grad, atol=4e-3, rtol=4e-3)
