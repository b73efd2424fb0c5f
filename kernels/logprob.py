"""Per-token log-probabilities (and entropy) of labels under a softmax over the vocabulary.

    lp[i]  = z[i, y_i] - logsumexp_j z[i, j],      z = logits / temperature
    ent[i] = -sum_j p[i, j] log p[i, j],           p = softmax(z[i])

Two entry points: `logprob` from logits `[N, V]`, and `linear_logprob` from hidden states
`[N, H]` and the lm_head weight `[V, H]`, which never holds more than a chunk of rows of the
`[N, V]` logits (its backward recomputes each chunk). Rows whose label is `ignore_index`
give 0 (log-prob and entropy) and receive no gradient. Masked logits (-inf) are legal
everywhere (forward, entropy, backward): p = 0, 0 log 0 = 0, zero gradient. Labels outside
`[0, V)` other than `ignore_index` raise on CPU tensors; on CUDA (where the check would
sync the device) the kernel never loads them and returns NaN for the row.
Precision: all statistics (max, sum-exp, lse, log-probs, entropies) and the gradient math
are float32 for any logits dtype (float64 for float64); the fused linear path keeps each
chunk's logits in float32 and sums the weight gradient over chunks in float32.

Gradients, per row, with g = dL/dlp and h = dL/dent:
    dL/dz_j = g (1[j = y] - p_j) - h p_j (log p_j + ent),     dL/dlogits = dL/dz / temperature

Minimum traffic (Triton, logits path): forward reads the logits once (N*V*b bytes) and
writes O(N); backward reads them once more and writes the gradient (2*N*V*b bytes);
FLOPs ~ 4*N*V forward (scale, max, exp, sum), ~6*N*V backward: memory-bound on any GPU.
Fused linear: 2*N*V*H FLOPs forward, 6*N*V*H backward (recompute, dhidden, dweight),
bytes ~ (N*H + V*H) * b per pass plus O(N); the chunk of logits stays in fast memory.

Peers: TRL's `selective_log_softmax` gathers then loops logsumexp row by row; its backward
goes through autograd and allocates `[N, V]` several times. Liger's fused linear cross
entropy computes all gradients inside the forward, which only works for a scalar loss; here
the output is per token (PPO weights each token), so only the hidden-state gradient, which
per-token scaling commutes with, is formed in the forward; the weight's gradient recomputes
the logits in the backward (see `_LinearLogProb`).
"""
import torch

from ._dispatch import backend
from ._triton import launch_device, tl, triton

_CHUNK_ELEMS = 1 << 20  # ~4 MB of float32 per chunk of rows for the logits path
_LINEAR_CHUNK_ELEMS = 1 << 24  # ~64 MB of float32 logits per chunk for the fused linear path


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _check(logits_or_hidden: torch.Tensor, labels: torch.Tensor) -> None:
    assert logits_or_hidden.dim() == 2, f"expected [N, *], got {tuple(logits_or_hidden.shape)}"
    assert labels.shape == logits_or_hidden.shape[:1], "labels must be [N]"
    assert labels.dtype == torch.int64, "labels must be int64"


# ------------------------------------------------------------------------------------------
# Triton kernels: one program per row, a loop over the vocabulary in BLOCK_V tiles with an
# online max / sum-exp, so a row never has to fit in registers.
# ------------------------------------------------------------------------------------------
@triton.jit
def _logprob_fwd_kernel(
    z_ptr,  # [N, V] logits, unit column stride
    labels_ptr,  # [N] int64
    lp_ptr,  # [N] float32 out
    lse_ptr,  # [N] float32 out: logsumexp(logits / T), kept for the backward
    ent_ptr,  # [N] float32 out, written when RETURN_ENTROPY
    stride_zn,
    V,
    inv_temp,
    ignore_index,
    RETURN_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    in_vocab = (label >= 0) & (label < V)  # anything else is never loaded: lp is NaN
    row_ptr = z_ptr + row * stride_zn
    m = tl.full((), -float("inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)  # sum_j exp(z_j - m) * z_j, for the entropy
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        inb = offs < V
        z = tl.load(row_ptr + offs, mask=inb, other=-float("inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, 0))
        # While every logit seen is -inf (masked), shift by 0 instead: exp(-inf - -inf) is NaN.
        shift = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp(m - shift)
        e = tl.exp(z - shift)
        s = s * alpha + tl.sum(e, 0)
        if RETURN_ENTROPY:
            t = t * alpha + tl.sum(e * tl.where(e > 0, z, 0.0), 0)  # not 0 * -inf = NaN
        m = m_new
    lse = m + tl.log(s)
    z_label = tl.load(row_ptr + tl.where(valid & in_vocab, label, 0)).to(tl.float32) * inv_temp
    z_label = tl.where(in_vocab, z_label, float("nan"))
    tl.store(lp_ptr + row, tl.where(valid, z_label - lse, 0.0))
    tl.store(lse_ptr + row, lse)
    if RETURN_ENTROPY:
        tl.store(ent_ptr + row, tl.where(valid, lse - t / s, 0.0))


@triton.jit
def _logprob_bwd_kernel(
    z_ptr,  # [N, V] logits, unit column stride
    dz_ptr,  # [N, V] out: gradient w.r.t. the logits (may alias z_ptr)
    labels_ptr,  # [N] int64
    lse_ptr,  # [N] float32 from the forward
    ent_ptr,  # [N] float32 from the forward (read when HAS_ENTROPY_GRAD)
    dlp_ptr,  # [N] float32 upstream gradient of lp
    dent_ptr,  # [N] float32 upstream gradient of ent (read when HAS_ENTROPY_GRAD)
    stride_zn,
    stride_dzn,
    V,
    inv_temp,
    ignore_index,
    HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    lse = tl.load(lse_ptr + row)
    g = tl.where(valid, tl.load(dlp_ptr + row), 0.0) * inv_temp
    if HAS_ENTROPY_GRAD:
        h = tl.where(valid, tl.load(dent_ptr + row), 0.0) * inv_temp
        ent = tl.load(ent_ptr + row)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        inb = offs < V
        z = tl.load(z_ptr + row * stride_zn + offs, mask=inb, other=0.0).to(tl.float32) * inv_temp
        logp = z - lse
        p = tl.exp(logp)
        dz = -g * p
        if HAS_ENTROPY_GRAD:
            dz -= h * p * tl.where(p > 0, logp + ent, 0.0)  # masked logits: not 0 * -inf
        dz += tl.where(offs == label, g, 0.0)
        dz = tl.where(valid, dz, 0.0)  # an ignored row may be all -inf (its lse is -inf)
        tl.store(dz_ptr + row * stride_dzn + offs, dz, mask=inb)


def launch_config(V: int, dtype: torch.dtype) -> dict:
    """Tile and launch resources of both row kernels, as the GPU path launches them (the
    AOT compile test reads the same function). One row per program: a tile of BLOCK_V
    float32 values spread over num_warps * 32 threads, 16 per thread at 4096 / 8 warps."""
    block_v = min(4096, triton.next_power_of_2(max(V, 1)))
    return dict(BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4, num_stages=2)


def _rows_fwd_triton(z, labels, inv_temp, ignore_index, want_entropy):
    """Launch the forward kernel on `z` [C, V]; returns (lp, lse, ent or None)."""
    assert z.stride(1) == 1, "logits need a unit column stride"
    C, V = z.shape
    lp = torch.empty(C, device=z.device, dtype=torch.float32)
    lse = torch.empty_like(lp)
    ent = torch.empty_like(lp) if want_entropy else lp
    with launch_device(z, labels):
        _logprob_fwd_kernel[(C,)](
            z, labels, lp, lse, ent, z.stride(0), V, inv_temp, ignore_index,
            RETURN_ENTROPY=want_entropy, **launch_config(V, z.dtype))
    return lp, lse, (ent if want_entropy else None)


def _rows_bwd_triton(z, dz, labels, lse, ent, dlp, dent, inv_temp, ignore_index):
    """Write dL/dlogits for the rows of `z` into `dz` (which may be `z` itself)."""
    C, V = z.shape
    assert z.stride(1) == 1 and dz.stride(1) == 1
    has_h = dent is not None
    with launch_device(z, dz, labels, lse, dlp):
        _logprob_bwd_kernel[(C,)](
            z, dz, labels, lse, ent if has_h else lse, dlp, dent if has_h else dlp,
            z.stride(0), dz.stride(0), V, inv_temp, ignore_index,
            HAS_ENTROPY_GRAD=has_h, **launch_config(V, z.dtype))


# ------------------------------------------------------------------------------------------
# Torch rows: the same math on a chunk of rows, using `scratch` [C, V] as working memory.
# ------------------------------------------------------------------------------------------
_LOGP_FLOOR = -1e4  # exp(-1e4) is 0 in every float dtype: clamping log p there only turns
# masked (-inf) logits into finite numbers, so that 0 * log p is 0 and not NaN.


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_fwd_torch(z, labels, inv_temp, ignore_index, want_entropy, scratch, inplace=False):
    """(lp, lse, ent or None) for the rows of `z` [C, V]. `scratch` (float32, or float64
    for float64 logits) receives log p; with `inplace` it may be `z` itself (the fused
    linear path owns its float32 logits buffer). A bfloat16/float16 chunk is upcast first
    (the CPU has no half-to-float log_softmax), so the statistics are float32."""
    valid = labels != ignore_index
    safe = labels.masked_fill(~valid, 0).unsqueeze(1)
    if z.dtype != scratch.dtype:
        z, inplace = z.to(scratch.dtype), True
    if inv_temp != 1.0:
        z = z.mul_(inv_temp) if inplace else z * inv_temp
    z_max = z.amax(1)  # lse = max z - max log p, finite even where the label's logit is -inf
    # One fused pass per row on the CPU; its per-row max / sum / write passes make writing
    # over the input safe, which the fused linear path relies on (tests cover it).
    torch._log_softmax(z, 1, False, out=scratch)
    lp = scratch.gather(1, safe).squeeze(1).masked_fill_(~valid, 0.0)
    lse = z_max - scratch.amax(1)
    ent = None
    if want_entropy:
        p = scratch.exp()
        logp = scratch.clamp_(min=_LOGP_FLOOR)  # exp of it is unchanged, so still log p
        ent = -torch.bmm(p.unsqueeze(1), logp.unsqueeze(2)).view(-1)
        ent.masked_fill_(~valid, 0.0)
    return lp, lse, ent


def _rows_bwd_torch(z, dz, labels, lse, ent, dlp, dent, inv_temp, ignore_index):
    """Write dL/dlogits for the rows of `z` into `dz` (which may be `z` itself). The math
    runs in float32 (float64 for float64 logits); a half-precision `dz` gets the result."""
    valid = labels != ignore_index
    work = dz if dz.dtype == _stat_dtype(dz.dtype) else torch.empty(
        z.shape, device=z.device, dtype=torch.float32)
    g = (dlp * inv_temp).masked_fill_(~valid, 0.0).unsqueeze(1)
    if inv_temp != 1.0:
        torch.mul(z, inv_temp, out=work)
        work.sub_(lse.unsqueeze(1))
    else:
        torch.sub(z, lse.unsqueeze(1), out=work)  # log p
    if dent is None:
        work.exp_().mul_(g.neg())
    else:
        h = (dent * inv_temp).masked_fill_(~valid, 0.0).unsqueeze(1)
        work.clamp_(min=_LOGP_FLOOR)  # masked logits: p = 0 and (log p + ent) finite
        p = work.exp()
        work.add_(ent.unsqueeze(1)).mul_(h).add_(g).mul_(p).neg_()  # -p (g + h (log p + ent))
    work.scatter_add_(1, labels.masked_fill(~valid, 0).unsqueeze(1), g.to(work.dtype))
    if work is not dz:
        dz.copy_(work)


def _check_labels_cpu(labels, V, ignore_index):
    """Labels outside [0, V) (other than ignore_index) are an error. Checked only where it
    is free (CPU tensors); on CUDA the Triton kernel never loads them and gives NaN."""
    if labels.device.type != "cpu" or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels[{i}] = {int(labels[i])} is outside the vocabulary [0, {V}) "
                         f"and is not ignore_index ({ignore_index})")


# ------------------------------------------------------------------------------------------
# logprob from logits
# ------------------------------------------------------------------------------------------
class _LogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, temperature, ignore_index, return_entropy, impl):
        N, V = logits.shape
        inv_temp = 1.0 / temperature
        if impl == "triton":
            lp, lse, ent = _rows_fwd_triton(logits, labels, inv_temp, ignore_index, return_entropy)
        else:
            lp = torch.empty(N, device=logits.device, dtype=torch.float32)
            lse = torch.empty_like(lp)
            ent = torch.empty_like(lp) if return_entropy else None
            rows = max(1, min(N, _CHUNK_ELEMS // max(V, 1)))
            scratch = logits.new_empty(rows, V, dtype=_stat_dtype(logits.dtype))  # log p
            for s in range(0, N, rows):
                e = min(N, s + rows)
                out = _rows_fwd_torch(logits[s:e], labels[s:e], inv_temp, ignore_index,
                                      return_entropy, scratch[: e - s])
                lp[s:e], lse[s:e] = out[0], out[1]
                if return_entropy:
                    ent[s:e] = out[2]
        ctx.save_for_backward(logits, labels, lse, ent)
        ctx.inv_temp, ctx.ignore_index, ctx.impl = inv_temp, ignore_index, impl
        out_dtype = _out_dtype(logits.dtype)
        return (lp.to(out_dtype), ent.to(out_dtype)) if return_entropy else lp.to(out_dtype)

    @staticmethod
    def backward(ctx, dlp, dent=None):
        logits, labels, lse, ent = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 6
        dlp = torch.zeros_like(lse) if dlp is None else dlp.float().contiguous()
        dent = None if (dent is None or ent is None) else dent.float().contiguous()
        dlogits = torch.empty_like(logits)
        args = (ctx.inv_temp, ctx.ignore_index)
        if ctx.impl == "triton":
            _rows_bwd_triton(logits, dlogits, labels, lse, ent, dlp, dent, *args)
        else:
            N, V = logits.shape
            rows = max(1, min(N, _CHUNK_ELEMS // max(V, 1)))
            for s in range(0, N, rows):
                e = min(N, s + rows)
                _rows_bwd_torch(logits[s:e], dlogits[s:e], labels[s:e], lse[s:e],
                                None if ent is None else ent[s:e], dlp[s:e],
                                None if dent is None else dent[s:e], *args)
        return dlogits, None, None, None, None, None


def logprob_reference(logits, labels, *, temperature=1.0, ignore_index=-100,
                      return_entropy=False):
    """Plain PyTorch: full log_softmax, gather. Allocates [N, V] several times; tests and
    benchmarks. Statistics in the logits' dtype (float64 in the tests)."""
    logp = torch.log_softmax(logits / temperature, dim=-1)
    valid = labels != ignore_index
    lp = logp.gather(1, labels.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
    lp = torch.where(valid, lp, 0.0)
    if not return_entropy:
        return lp
    p = logp.exp()
    ent = -(p * torch.where(p > 0, logp, 0.0)).sum(-1)  # 0 log 0 = 0 for masked logits
    return lp, torch.where(valid, ent, 0.0)


def _logprob_impl(impl):
    def run(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False):
        _check(logits, labels)
        if impl == "torch":
            _check_labels_cpu(labels, logits.shape[1], ignore_index)
        logits = logits if logits.stride(1) == 1 else logits.contiguous()
        out = _LogProb.apply(logits, labels.contiguous(), float(temperature), int(ignore_index),
                             bool(return_entropy), impl)
        return out
    run.__name__ = f"logprob_{impl}"
    return run


logprob_torch = _logprob_impl("torch")
logprob_triton = _logprob_impl("triton")
_LOGPROB = {"torch": logprob_torch, "triton": logprob_triton, "reference": logprob_reference}


def logprob(logits, labels, *, temperature=1.0, ignore_index=-100, return_entropy=False):
    """Log-prob of `labels` [N] (int64) under softmax(`logits` [N, V] / temperature).

    Returns lp [N], or (lp [N], entropy [N]) with `return_entropy`; float32 (float64 for
    float64 logits). Differentiable w.r.t. logits; no [N, V] temporary in the forward.
    Accumulates in float32 whatever the logits' dtype (float64 for float64 logits): the
    running max, sum-exp and entropy sums, lse, and the gradient before it is written in
    the logits' dtype. Masked logits (-inf) are legal: they get p = 0, no NaN, and a zero
    gradient; a row needs one finite logit unless its label is ignore_index. A label
    outside [0, V) other than ignore_index raises on CPU tensors; on CUDA (where checking
    would sync) its log-prob is NaN and its logits are never read."""
    return _LOGPROB[backend("logprob", logits.device)](logits, labels, temperature=temperature,
                                        ignore_index=ignore_index, return_entropy=return_entropy)


# ------------------------------------------------------------------------------------------
# Fused linear: hidden @ weight.T chunk by chunk; the backward recomputes each chunk.
# ------------------------------------------------------------------------------------------
def _chunks(N: int, rows: int):
    for s in range(0, N, rows):
        yield s, min(N, s + rows)


def _unit_grad_torch_(logp, labels, inv_temp, ignore_index):
    """In place: log p (as `_rows_fwd_torch` leaves it) -> dlp/dlogits = (onehot - p) / T,
    zero on ignored rows."""
    valid = (labels != ignore_index).to(logp.dtype).unsqueeze(1)
    logp.exp_().mul_(valid * -inv_temp)
    logp.scatter_add_(1, labels.masked_fill(labels == ignore_index, 0).unsqueeze(1),
                      valid * inv_temp)


def _mm32(a, b, out=None, acc=None):
    """a @ b into `out`, or added into `acc` in place, with a float32 result for half
    inputs (float32 / float64 stay as they are), the GEMM accumulating in float32. On CUDA
    half inputs keep the tensor cores (`out_dtype`); on the CPU, which has no such GEMM,
    they are upcast first (half GEMMs there are a test path)."""
    wide = (torch.float32, torch.float64)
    if a.dtype not in wide or b.dtype not in wide:
        if a.is_cuda:
            low = a.dtype if a.dtype not in wide else b.dtype
            a, b = a.to(low), b.to(low)
            if acc is not None:  # addmm's out_dtype form wants a half `self` in some torch
                return acc.add_(torch.mm(a, b, out_dtype=torch.float32))  # releases
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        a, b = a.float(), b.float()
    return torch.mm(a, b, out=out) if acc is None else acc.addmm_(a, b)


class _LinearLogProb(torch.autograd.Function):
    """Forward: per chunk, logits = hidden @ weight.T (float32, whatever the inputs' dtype)
    and the row statistics. When hidden needs a gradient (and there is no entropy output),
    the forward also forms dh1 = (dlp/dlogits) @ weight per row while the chunk is at hand,
    so the backward gets dhidden = dlp[:, None] * dh1 without recomputing anything (row
    scaling commutes). The weight's gradient sum_i dlp_i (dlp_i/dlogits_i)^T hidden_i cannot
    be formed before dlp is known, so it recomputes the chunk's logits in the backward and
    sums the chunks in a float32 buffer (a bfloat16 one would round the running sum at
    every chunk). GEMMs, forward + backward: frozen weight 2 (as many as materialised
    logits need), trainable weight 4 (one more)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, ignore_index, return_entropy, rows,
                impl):
        N, V = hidden.shape[0], weight.shape[0]
        inv_temp = 1.0 / temperature
        stat = _stat_dtype(hidden.dtype)
        lp = torch.empty(N, device=hidden.device, dtype=torch.float32)
        lse, ent = torch.empty_like(lp), torch.empty_like(lp)
        early_h = ctx.needs_input_grad[0] and not return_entropy
        dh1 = torch.empty(hidden.shape, device=hidden.device, dtype=stat) if early_h else None
        buf = hidden.new_empty(min(rows, N), V, dtype=stat)  # the only [*, V] memory, reused
        for s, e in _chunks(N, rows):
            z = _mm32(hidden[s:e], weight.t(), out=buf[: e - s])  # float32 logits
            if impl == "triton":
                out = _rows_fwd_triton(z, labels[s:e], inv_temp, ignore_index, return_entropy)
            else:
                out = _rows_fwd_torch(z, labels[s:e], inv_temp, ignore_index, return_entropy,
                                      scratch=z, inplace=True)  # z now holds log p
            lp[s:e], lse[s:e] = out[0], out[1]
            if return_entropy:
                ent[s:e] = out[2]
            if early_h:
                if impl == "triton":
                    ones = torch.ones(e - s, device=z.device, dtype=torch.float32)
                    _rows_bwd_triton(z, z, labels[s:e], lse[s:e], None, ones, None, inv_temp,
                                     ignore_index)
                else:
                    _unit_grad_torch_(z, labels[s:e], inv_temp, ignore_index)
                _mm32(z, weight, out=dh1[s:e])
        ctx.save_for_backward(hidden, weight, labels, lse, ent if return_entropy else None, dh1)
        ctx.args = (inv_temp, ignore_index)
        ctx.rows, ctx.impl = rows, impl
        out_dtype = _out_dtype(hidden.dtype)
        return (lp.to(out_dtype), ent.to(out_dtype)) if return_entropy else lp.to(out_dtype)

    @staticmethod
    def backward(ctx, dlp, dent=None):
        hidden, weight, labels, lse, ent, dh1 = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        if not (need_h or need_w):
            return (None,) * 8
        N = hidden.shape[0]
        dlp = torch.zeros_like(lse) if dlp is None else dlp.float().contiguous()
        dent = None if (dent is None or ent is None) else dent.float().contiguous()
        dhidden = None
        if need_h and dh1 is not None:
            dhidden = (dh1 * dlp.unsqueeze(1).to(dh1.dtype)).to(hidden.dtype)
        elif need_h:
            dhidden = torch.empty_like(hidden)
        if dh1 is not None and not need_w:
            return dhidden, None, None, None, None, None, None, None
        dweight = None
        if need_w:  # float32 running sum over chunks; float64 weights keep float64
            dweight = torch.zeros(weight.shape, device=weight.device,
                                  dtype=_stat_dtype(weight.dtype))
        rows_bwd = _rows_bwd_triton if ctx.impl == "triton" else _rows_bwd_torch
        buf = hidden.new_empty(min(ctx.rows, N), weight.shape[0], dtype=_stat_dtype(hidden.dtype))
        for s, e in _chunks(N, ctx.rows):
            z = _mm32(hidden[s:e], weight.t(), out=buf[: e - s])
            rows_bwd(z, z, labels[s:e], lse[s:e], None if ent is None else ent[s:e], dlp[s:e],
                     None if dent is None else dent[s:e], *ctx.args)  # z now holds dL/dlogits
            if need_h and dh1 is None:
                dhidden[s:e] = _mm32(z, weight)
            if need_w:
                _mm32(z.t(), hidden[s:e], acc=dweight)
        if dweight is not None:
            dweight = dweight.to(weight.dtype)
        return dhidden, dweight, None, None, None, None, None, None


def linear_logprob_reference(hidden, weight, labels, *, temperature=1.0, ignore_index=-100,
                             return_entropy=False, chunk_size=None):
    """Plain PyTorch: materialises the [N, V] logits, then `logprob_reference`."""
    return logprob_reference(hidden @ weight.t(), labels, temperature=temperature,
                             ignore_index=ignore_index, return_entropy=return_entropy)


def _linear_logprob_impl(impl):
    def run(hidden, weight, labels, *, temperature=1.0, ignore_index=-100,
            return_entropy=False, chunk_size=None):
        _check(hidden, labels)
        assert weight.dim() == 2 and weight.shape[1] == hidden.shape[1], "weight must be [V, H]"
        assert weight.dtype == hidden.dtype, "hidden and weight must share a dtype"
        V = weight.shape[0]
        if impl == "torch":
            _check_labels_cpu(labels, V, ignore_index)
        rows = int(chunk_size) if chunk_size else max(1, _LINEAR_CHUNK_ELEMS // max(V, 1))
        return _LinearLogProb.apply(hidden.contiguous(), weight, labels.contiguous(),
                                    float(temperature), int(ignore_index), bool(return_entropy),
                                    rows, impl)
    run.__name__ = f"linear_logprob_{impl}"
    return run


linear_logprob_torch = _linear_logprob_impl("torch")
linear_logprob_triton = _linear_logprob_impl("triton")
_LINEAR = {"torch": linear_logprob_torch, "triton": linear_logprob_triton,
           "reference": linear_logprob_reference}


def linear_logprob(hidden, weight, labels, *, temperature=1.0, ignore_index=-100,
                   return_entropy=False, chunk_size=None):
    """`logprob(hidden @ weight.T, labels, ...)` without ever holding the [N, V] logits.

    hidden [N, H], weight [V, H] (e.g. a tied embedding; if it does not require grad its
    gradient is skipped), labels [N] int64. `chunk_size` rows of logits are live at a time
    (default: ~64 MB of them). Gradients flow to hidden and weight. Accumulates in float32
    for any input dtype (float64 for float64): each chunk's logits are float32 before the
    softmax, as are the row statistics and log-probs, and the weight's gradient is summed
    over chunks in float32 and cast to the weight's dtype once at the end. Labels outside
    [0, V) behave as in `logprob`."""
    return _LINEAR[backend("linear_logprob", hidden.device)](
        hidden, weight, labels, temperature=temperature, ignore_index=ignore_index,
        return_entropy=return_entropy, chunk_size=chunk_size)
