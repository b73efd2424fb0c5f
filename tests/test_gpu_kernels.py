"""Every compiled Triton kernel on CUDA against its float64 reference, forward and backward.

One table of cases (`CASES`) over the odd shapes of the CPU kernel tests
(test_kernels_logprob, _attention, _ppo, _preference), plus a few larger ones only a GPU
runs quickly (head dims 64 and 128, long sequences, a decode cache long enough to split).
Each case runs the public op (`kernels.<op>`, or `decode_attention_triton` to force a split
count) on the device and `<op>_reference` on the CPU in float64 over the same values
(inputs rounded to the case's dtype first), with the same random upstream gradients.

Tolerances (|out - ref| <= atol + rtol * |ref|, per element, outputs and gradients):
  float32: atol 1e-5, rtol 1e-4 (attention 2e-5 / 2e-4): the kernels accumulate in float32
           and multiply float32 without TF32 ("ieee" dots), so only float32 rounding is left.
  bfloat16: atol 1e-2, rtol 1e-2 for the log-prob, PPO and preference ops: statistics stay
           in float32, results and gradients are rounded to bfloat16 once (2^-9 relative);
           attention 2e-2 / 2e-2: the probabilities and dS are rounded to bfloat16 before
           their dots (in float16 under the interpreter the largest error is ~6e-4 of the
           largest value; bfloat16 rounds 4x coarser).

Self-check without a GPU: `CAI_GPU_TEST_DEVICE=cpu TRITON_INTERPRET=1 CAI_KERNELS=triton`
runs the same file on CPU tensors under the Triton interpreter, with the small cases only.
The interpreter's `tl.dot` multiplies bfloat16 operands as their raw bits (Triton 3.x), so
there the attention kernels' half-precision cases run in float16 (bfloat16's tolerances).
"""
import os
from typing import Callable, NamedTuple

import pytest
import torch

DEVICE = os.environ.get("CAI_GPU_TEST_DEVICE", "cuda")
SMALL = DEVICE == "cpu"  # the interpreter runs every program in numpy: small cases only

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                 reason="needs a CUDA device")]

import kernels  # noqa: E402
from kernels.attention import packed_attention_reference  # noqa: E402
from kernels.decode_attention import decode_attention_reference, decode_attention_triton  # noqa: E402
from kernels.logprob import linear_logprob_reference, logprob_reference  # noqa: E402
from kernels.ppo import (kl_penalty_reference, ppo_policy_loss_reference,  # noqa: E402
                         ppo_value_loss_reference)
from kernels.preference import (bt_loss_reference, dpo_loss_reference,  # noqa: E402
                                option_probs_reference)
from test_kernels_ppo import CASES as PPO_LENGTHS  # noqa: E402

TOLS = {  # (dtype, attention?) -> (atol, rtol); see the module docstring
    (torch.float32, False): (1e-5, 1e-4), (torch.float32, True): (2e-5, 2e-4),
    (torch.bfloat16, False): (1e-2, 1e-2), (torch.bfloat16, True): (2e-2, 2e-2),
    (torch.float16, True): (2e-2, 2e-2),  # the interpreter's stand-in for bfloat16
}
REFERENCES = {
    "logprob": logprob_reference, "linear_logprob": linear_logprob_reference,
    "kl_penalty": kl_penalty_reference, "ppo_policy_loss": ppo_policy_loss_reference,
    "ppo_value_loss": ppo_value_loss_reference, "option_probs": option_probs_reference,
    "bt_loss": bt_loss_reference, "dpo_loss": dpo_loss_reference,
    "packed_attention": packed_attention_reference,
    "decode_attention": decode_attention_reference,
}


@pytest.fixture(autouse=True)
def _compiled_launch_configs(monkeypatch):
    """The launchers pick interpreter tiles while TRITON_INTERPRET is set: on CUDA, make
    sure the GPU tiles are what is tested."""
    if DEVICE == "cuda":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)


class Case(NamedTuple):
    """One call: `build(gen)` -> (args, kwargs) as CPU float32 / integer tensors; `grads`
    the positions of args that get gradients; `device_kwargs` go to the device call only;
    `fn` replaces `kernels.<op>` (to force a split count); `big`: GPU only."""

    op: str
    name: str
    build: Callable
    grads: tuple = (0,)
    device_kwargs: dict = {}
    fn: Callable = None
    big: bool = False


# ------------------------------------------------------------------------------------------
# Input builders (the CPU tests' distributions)
# ------------------------------------------------------------------------------------------
def _logits(N, V, temperature=1.0, entropy=False, ignore_every=3, ignore_index=-100,
            masked=False):
    def build(gen):
        logits = 3 * torch.randn(N, V, generator=gen)
        labels = torch.randint(0, V, (N,), generator=gen)
        if ignore_every and N > 1:  # row 0 (the all -inf tile when masked) keeps its label
            labels[1::ignore_every] = ignore_index
        if masked:  # scattered -inf, row 0's first Triton tile all -inf, labels on finite
            logits[torch.rand(N, V, generator=gen) < 0.3] = float("-inf")
            logits[0, :min(4096, V - 10)] = float("-inf")
            rows = torch.arange(N)[labels >= 0]
            logits[rows, labels[labels >= 0]] = 0.5
        return [logits, labels], dict(temperature=temperature, return_entropy=entropy,
                                      ignore_index=ignore_index)
    return build


def _linear(N, H, V, temperature=1.0, entropy=False):
    def build(gen):
        hidden = torch.randn(N, H, generator=gen)
        weight = torch.randn(V, H, generator=gen) / H**0.5
        labels = torch.randint(0, V, (N,), generator=gen)
        if N > 1:
            labels[::4] = -100
        return [hidden, weight, labels], dict(temperature=temperature, return_entropy=entropy)
    return build


def _tokens(lens, n_float=3, **kw):
    """Packed [N] token data: new / old log-probs (ratios inside and outside the clip),
    a third float, the loss mask (one sequence fully masked out), cu_seqlens."""
    def build(gen):
        N = sum(lens)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        new = torch.randn(N, generator=gen)
        floats = [new, new + 0.3 * torch.randn(N, generator=gen), torch.randn(N, generator=gen)]
        mask = torch.rand(N, generator=gen) > 0.3
        mask[0] = True
        if len(lens) > 2:
            mask[cu[2]:cu[3]] = False
        if n_float == 2:
            return floats[:2], kw
        return [*floats, mask], dict(cu_seqlens=cu, **kw)
    return build


def _options(B, K, temperature, clamp):
    def build(gen):
        return [3 * torch.randn(B, K, generator=gen)], dict(temperature=temperature, clamp=clamp)
    return build


def _pairs(B, n, soft=False, **kw):
    def build(gen):
        xs = [2 * torch.randn(B, generator=gen) for _ in range(n)]
        p = torch.rand(B, generator=gen)
        if n == 2:
            return [*xs, p if soft else None], kw
        return xs, dict(kw, p_chosen=p) if soft else kw
    return build


def _packed(lens, Hq, Hkv, D, scale=None):
    def build(gen):
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        q, k, v = (torch.randn(sum(lens), h, D, generator=gen) for h in (Hq, Hkv, Hkv))
        return [q, k, v, cu, max(lens), scale], {}
    return build


def _decode(lengths, Hq, Hkv, D, S):
    def build(gen):
        B = len(lengths)
        q = torch.randn(B, Hq, D, generator=gen)
        k_cache, v_cache = (torch.randn(B, Hkv, S, D, generator=gen) for _ in range(2))
        return [q, k_cache, v_cache, torch.tensor(lengths, dtype=torch.int32),
                max(lengths)], {}
    return build


# ------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------
def _cases():
    c = []
    for N, V in [(1, 257), (7, 1000), (12, 257)]:
        for t, ent in [(1.0, False), (0.7, True), (1.3, False)]:
            c.append(Case("logprob", f"N{N}-V{V}-T{t}-ent{ent}", _logits(N, V, t, ent)))
    c += [Case("logprob", "ignore_index3", _logits(9, 300, 0.9, True, 2, ignore_index=3)),
          Case("logprob", "masked", _logits(4, 5000, 0.9, False, 3, masked=True)),
          Case("logprob", "masked-ent", _logits(4, 5000, 0.9, True, 3, masked=True)),
          Case("logprob", "N301-V5003", _logits(301, 5003, 0.8, True, 7), big=True),
          Case("logprob", "N64-V32001-masked", _logits(64, 32001, 1.0, True, 5, masked=True),
               big=True)]
    for N, H, V, chunk in [(1, 16, 257, None), (9, 24, 1000, 4), (13, 8, 257, 13)]:
        for t, ent in [(1.0, False), (0.7, True)]:
            c.append(Case("linear_logprob", f"N{N}-H{H}-V{V}-chunk{chunk}-T{t}-ent{ent}",
                          _linear(N, H, V, t, ent), grads=(0, 1),
                          device_kwargs=dict(chunk_size=chunk)))
    c.append(Case("linear_logprob", "N333-H64-V4099", _linear(333, 64, 4099, 1.1, True),
                  grads=(0, 1), device_kwargs=dict(chunk_size=100), big=True))
    for N in [1, 1031]:
        for kind in ["k1", "k2", "k3"]:
            c.append(Case("kl_penalty", f"{kind}-N{N}", _tokens([N], 2, kind=kind)))
    for case, lens in PPO_LENGTHS.items():
        for red in ["token", "sequence"]:
            c += [Case("ppo_policy_loss", f"{case}-{red}", _tokens(lens, reduction=red),
                       big=case == "large"),
                  Case("ppo_value_loss", f"{case}-{red}",
                       _tokens(lens, reduction=red, clip_eps=0.1), big=case == "large")]
    for B, K, t, clamp in [(1, 2, 1.0, None), (7, 2, 1.0, (0.4, 0.6)), (5, 5, 2.0, None),
                           (3, 3, 0.5, (0.2, 0.5))]:
        c.append(Case("option_probs", f"B{B}-K{K}-T{t}-clamp{clamp}",
                      _options(B, K, t, clamp), grads=()))
    for B in [1, 37, 4096]:
        for soft in [False, True]:
            c.append(Case("bt_loss", f"B{B}-soft{soft}", _pairs(B, 2, soft), grads=(0, 1)))
        for labels, kw in [("hard", {}), ("smoothed", dict(label_smoothing=0.1)),
                           ("soft", {})]:
            c.append(Case("dpo_loss", f"B{B}-{labels}",
                          _pairs(B, 4, labels == "soft", beta=0.3, **kw), grads=(0, 1, 2, 3)))
    for lens, Hq, Hkv, D, big in [
            ([1], 2, 2, 16, False),                     # one token
            ([1, 5, 40, 3], 3, 3, 16, False),           # GQA 1, lengths 1 and across blocks
            ([2, 1, 1, 70, 3, 1], 6, 2, 24, False),     # one long among short, GQA 3
            ([17, 33], 3, 1, 32, False),                # multi-query
            ([1, 9, 20], 6, 2, 64, False),              # head dims of real models
            ([3, 1, 18], 4, 4, 128, False),
            ([1, 150, 7, 300, 64], 9, 3, 64, True),     # the CPU test's larger case
            ([2, 1, 1, 700, 3, 1], 6, 2, 128, True),    # one long among short at D 128
            ([1000, 1, 129, 513], 12, 4, 128, True)]:
        c.append(Case("packed_attention", f"{lens}-Hq{Hq}-Hkv{Hkv}-D{D}",
                      _packed(lens, Hq, Hkv, D), grads=(0, 1, 2), big=big))
    c.append(Case("packed_attention", "scale0.3", _packed([9, 20], 3, 1, 16, 0.3),
                  grads=(0, 1, 2)))
    for lengths, Hq, Hkv, D, S, big in [
            ([1], 3, 3, 16, 8, False), ([37], 9, 3, 64, 50, False),
            ([1, 37, 20, 50], 9, 3, 64, 50, False), ([3, 2], 4, 4, 24, 5, False),
            ([1, 200, 77], 9, 3, 24, 203, False), ([130, 0, 5], 4, 1, 16, 140, False),
            ([7, 100], 8, 2, 128, 110, False),
            ([4000], 8, 2, 128, 4096, True),            # batch 1: the default splits
            ([1, 3000, 777, 2048], 32, 8, 64, 3001, True)]:
        name = f"{lengths}-Hq{Hq}-Hkv{Hkv}-D{D}-S{S}"
        c.append(Case("decode_attention", name, _decode(lengths, Hq, Hkv, D, S), grads=(),
                      big=big))
        for splits in [1, 3]:
            c.append(Case("decode_attention", f"{name}-splits{splits}",
                          _decode(lengths, Hq, Hkv, D, S), grads=(), big=big,
                          fn=decode_attention_triton, device_kwargs=dict(num_splits=splits)))
    return [case for case in c if not (SMALL and case.big)]


CASES = _cases()


def _half(op):
    return torch.float16 if SMALL and op.endswith("attention") else torch.bfloat16


PARAMS = [pytest.param(case, dtype, id=f"{case.op}-{case.name}-{str(dtype)[6:]}")
          for case in CASES for dtype in (torch.float32, _half(case.op))]


# ------------------------------------------------------------------------------------------
# The checks
# ------------------------------------------------------------------------------------------
def _place(x, dtype, device, grad):
    """Floating tensors rounded to `dtype` (the reference sees the rounded values)."""
    if not isinstance(x, torch.Tensor):
        return x
    if x.is_floating_point():
        x = x.to(dtype).to(torch.float64 if device == "ref" else dtype)
    return x.to("cpu" if device == "ref" else device).clone().requires_grad_(grad)


def _tensors(out):
    """The tensors of an op's result, None where a field is absent."""
    return list(out) if isinstance(out, tuple) else [out]


def _assert_close(actual, expected, dtype, attention, what):
    atol, rtol = TOLS[dtype, attention]
    torch.testing.assert_close(actual.detach().cpu().double(), expected.detach(), atol=atol,
                               rtol=rtol, msg=lambda m: f"{what}: {m}")


def _check_forward(case, out, expected, dtype):
    assert len(out) == len(expected)
    for i, (o, e) in enumerate(zip(out, expected)):
        assert (o is None) == (e is None), f"output {i}"
        if o is None:
            continue
        assert o.device.type == torch.device(DEVICE).type
        if case.op == "decode_attention":  # a slot of length 0 gives 0 (reference: NaN)
            e = torch.nan_to_num(e, nan=0.0)
        _assert_close(o, e, dtype, case.op.endswith("attention"), f"output {i}")


def _check_backward(case, out, expected, dev, ref, dtype):
    """The same random upstream gradient (rounded to each output's dtype) into both."""
    pairs = [(o, e) for o, e in zip(out, expected) if o is not None and o.requires_grad]
    assert pairs and all(e.requires_grad for _, e in pairs)
    gen = torch.Generator().manual_seed(1)
    ups = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype) for o, _ in pairs]
    sum((o * g.to(o.device)).sum() for (o, _), g in zip(pairs, ups)).backward()
    sum((e * g.double()).sum() for (_, e), g in zip(pairs, ups)).backward()
    for i in case.grads:
        assert dev[i].grad is not None and dev[i].grad.dtype == dtype, f"grad of arg {i}"
        _assert_close(dev[i].grad, ref[i].grad, dtype, case.op.endswith("attention"),
                      f"grad of arg {i}")


@pytest.mark.parametrize("case,dtype", PARAMS)
def test_kernel_matches_float64_reference(case, dtype):
    args, kwargs = case.build(torch.Generator().manual_seed(len(case.op) + len(case.name)))
    dev = [_place(a, dtype, DEVICE, i in case.grads) for i, a in enumerate(args)]
    ref = [_place(a, dtype, "ref", i in case.grads) for i, a in enumerate(args)]
    dev_kw = {k: _place(v, dtype, DEVICE, False) for k, v in kwargs.items()}
    ref_kw = {k: _place(v, dtype, "ref", False) for k, v in kwargs.items()}
    fn = case.fn or getattr(kernels, case.op)
    out = _tensors(fn(*dev, **dev_kw, **case.device_kwargs))
    expected = _tensors(REFERENCES[case.op](*ref, **ref_kw))
    _check_forward(case, out, expected, dtype)
    if case.grads:
        _check_backward(case, out, expected, dev, ref, dtype)


@pytest.mark.parametrize("op", kernels.OPS)
def test_op_dispatches_to_triton(op):
    assert kernels.backend(op, DEVICE) == "triton"


def test_every_op_has_a_case():
    assert {case.op for case in CASES} == set(kernels.OPS)
