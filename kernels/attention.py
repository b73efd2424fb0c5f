"""Packed (varlen) causal attention with grouped-query heads (decode: `kernels.decode_attention`).

packed_attention: q [T, Hq, D], k/v [T, Hkv, D] hold B sequences back to back
(`cu_seqlens` [B+1] int32 gives their starts); token i of a sequence attends to tokens
0..i of the same sequence. Query head h reads kv head h // (Hq / Hkv).

Triton: flash-attention 2 style (Dao 2023). The forward keeps a running max and sum per
query row (online softmax) and stores only out and the row logsumexp; the backward
recomputes the probabilities block by block: one kernel accumulates dK, dV per kv head
(looping over the query heads of its group, so no atomics), one accumulates dQ. Nothing of
size T x T exists. The causal structure is used to skip blocks above the diagonal.
Precision: float32 dots use "ieee" (never TF32), half-precision dots accumulate in
float32; the softmax statistics (max, sum, lse), the accumulators and decode's partial
are float32 for every input dtype. Tiles, warps and stages come from one
`*_config` function per kernel, which the AOT compile test (`kernels._aot`) also reads.
float64 runs only under the interpreter (it does not compile for CUDA: refused there).

Torch (CPU) path: `scaled_dot_product_attention(is_causal=True, enable_gqa=True)` per
sequence, or per bucket of sequences of similar length (or all short) right-padded into one
call: the padding waste is bounded (`_USEFUL`), the per-call overhead is paid once per
bucket. It reads `cu_seqlens` on the host (free on the CPU, a sync on a GPU, where the
Triton path runs instead). Work is ~sum L_b^2, not B max(L)^2 as with one padded call.
"""

import torch
import torch.nn.functional as F

from ._dispatch import backend
from ._triton import interpreted, launch_device, tl, triton

_LOG2E = 1.4426950408889634


# ------------------------------------------------------------------------------------------
# Triton kernels. Positions are within a sequence; token index = seq_start + position.
# ------------------------------------------------------------------------------------------
@triton.jit
def _packed_attention_fwd_kernel(
    q_ptr,  # [T, Hq, D]
    k_ptr,  # [T, Hkv, D]
    v_ptr,  # [T, Hkv, D]
    o_ptr,  # [T, Hq, D] out
    lse_ptr,  # [T, Hq] float32 out: row logsumexp of the scaled scores, base 2
    cu_ptr,  # [B+1] int32
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    Hq,
    D,
    qk_scale,  # softmax scale * log2(e)
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32: no silent TF32 on CUDA
):
    start_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    hk = h // GROUP
    seq = tl.load(cu_ptr + b).to(tl.int64)
    L = tl.load(cu_ptr + b + 1).to(tl.int64) - seq
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < L
    mask_d = offs_d < D
    q = tl.load(q_ptr + (seq + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # Blocks above the diagonal are skipped; a program past the sequence's end runs none.
    hi = tl.where(start_m * BLOCK_M < L, tl.minimum((start_m + 1) * BLOCK_M, L), 0)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < L
        k = tl.load(k_ptr + (seq + cols)[None, :] * stride_kt + hk * stride_kh + offs_d[:, None],
                    mask=mask_n[None, :] & mask_d[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where((offs_m[:, None] >= cols[None, :]) & mask_n[None, :], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + (seq + cols)[:, None] * stride_vt + hk * stride_vh + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    acc = acc / l_safe[:, None]
    tl.store(o_ptr + (seq + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             acc.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(lse_ptr + (seq + offs_m) * Hq + h, m_i + tl.log2(l_safe), mask=mask_m)


@triton.jit
def _packed_attention_bwd_kernel(
    q_ptr, k_ptr, v_ptr,  # as in the forward
    do_ptr,  # [T, Hq, D] upstream gradient, strides as q
    lse_ptr,  # [T, Hq] float32, base 2
    delta_ptr,  # [T, Hq] float32: rowsum(dO * O)
    dk_ptr,  # [T, Hkv, D] out, strides as k
    dv_ptr,  # [T, Hkv, D] out, strides as v
    cu_ptr,  # [B+1] int32
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    Hq,
    D,
    scale,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32: no silent TF32 on CUDA
):
    """dK, dV for one block of keys of one kv head, summed over the query heads of its group."""
    start_n = tl.program_id(0)
    b = tl.program_id(1)
    hk = tl.program_id(2)
    seq = tl.load(cu_ptr + b).to(tl.int64)
    L = tl.load(cu_ptr + b + 1).to(tl.int64) - seq
    cols = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = cols < L
    mask_d = offs_d < D
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(k_ptr + (seq + cols)[:, None] * stride_kt + hk * stride_kh + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + (seq + cols)[:, None] * stride_vt + hk * stride_vh + offs_d[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    lo = (start_n * BLOCK_N // BLOCK_M) * BLOCK_M  # queries before the block see none of it
    hi = tl.where(start_n * BLOCK_N < L, L, 0)
    for g in range(GROUP):
        h = hk * GROUP + g
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            mask_m = rows < L
            q_off = (seq + rows)[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
            q = tl.load(q_ptr + q_off, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            do = tl.load(do_ptr + q_off, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            lse = tl.load(lse_ptr + (seq + rows) * Hq + h, mask=mask_m, other=0.0)
            delta = tl.load(delta_ptr + (seq + rows) * Hq + h, mask=mask_m, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
            s = s * (scale * 1.4426950408889634)
            keep = (rows[:, None] >= cols[None, :]) & mask_m[:, None] & mask_n[None, :]
            p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    dk = dk * scale
    tl.store(dk_ptr + (seq + cols)[:, None] * stride_kt + hk * stride_kh + offs_d[None, :],
             dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + (seq + cols)[:, None] * stride_vt + hk * stride_vh + offs_d[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _packed_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr,  # as in _packed_attention_bwd_kernel
    dq_ptr,  # [T, Hq, D] out, strides as q
    cu_ptr,  # [B+1] int32
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    Hq,
    D,
    scale,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32: no silent TF32 on CUDA
):
    """dQ for one block of queries of one query head."""
    start_m = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    hk = h // GROUP
    seq = tl.load(cu_ptr + b).to(tl.int64)
    L = tl.load(cu_ptr + b + 1).to(tl.int64) - seq
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = rows < L
    mask_d = offs_d < D
    q_off = (seq + rows)[:, None] * stride_qt + h * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    do = tl.load(do_ptr + q_off, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    lse = tl.load(lse_ptr + (seq + rows) * Hq + h, mask=mask_m, other=0.0)
    delta = tl.load(delta_ptr + (seq + rows) * Hq + h, mask=mask_m, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    hi = tl.where(start_m * BLOCK_M < L, tl.minimum((start_m + 1) * BLOCK_M, L), 0)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < L
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + (seq + cols)[:, None] * stride_kt + hk * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + (seq + cols)[:, None] * stride_vt + hk * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * (scale * 1.4426950408889634)
        keep = (rows[:, None] >= cols[None, :]) & mask_m[:, None] & mask_n[None, :]
        p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    dq = dq * scale
    tl.store(dq_ptr + q_off, dq.to(dq_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


# ------------------------------------------------------------------------------------------
# Launch configuration: one function per kernel, read by the launchers and by the AOT
# compile test (which compiles exactly these for sm_80 and sm_90).
# ------------------------------------------------------------------------------------------
ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what compiles for CUDA
_INTERPRETER_BLOCK = 16  # the interpreter runs each program in numpy: small tiles are faster


def dot_precision(dtype: torch.dtype) -> str:
    """float32 dots in full precision ("ieee"): on CUDA the default is TF32 (~1e-3)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def packed_fwd_config(D: int, dtype: torch.dtype, gpu: bool = True) -> dict:
    """Tiles, warps and pipeline stages of `_packed_attention_fwd_kernel`. Shared memory
    holds num_stages copies of the K and V tiles (BLOCK_N x BLOCK_D each): float32 and
    large heads take smaller tiles and fewer stages to fit an sm_80's 163 KB."""
    BD = _block_d(D)
    if not gpu:
        return dict(BLOCK_M=_INTERPRETER_BLOCK, BLOCK_N=_INTERPRETER_BLOCK, BLOCK_D=BD,
                    num_warps=4, num_stages=1)
    wide = dtype == torch.float32
    if BD <= 64:  # spill-free per ptxas on sm_80 and sm_90 (the AOT test checks)
        bm, bn, stages = (64, 32, 2) if wide else (64, 64, 3)
    elif BD <= 128:
        bm, bn, stages = (32, 32, 2) if wide else (64, 64, 2)
    else:
        bm, bn, stages = (32, 16, 1) if wide else (32, 32, 2)
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=BD, num_warps=8, num_stages=stages)


def packed_bwd_config(D: int, dtype: torch.dtype, gpu: bool = True) -> dict:
    """Tiles of both backward kernels (dK/dV and dQ share them). The dK/dV kernel keeps
    K, V, dK and dV tiles live across its loop: smaller tiles and 8 warps at D >= 128 keep
    them out of local memory."""
    BD = _block_d(D)
    if not gpu:
        return dict(BLOCK_M=_INTERPRETER_BLOCK, BLOCK_N=_INTERPRETER_BLOCK, BLOCK_D=BD,
                    num_warps=4, num_stages=1)
    wide = dtype == torch.float32
    if BD <= 64:  # larger tiles spill registers in the dK/dV kernel (ptxas, sm_80/sm_90)
        bm, bn, warps = (16, 16, 4) if wide else (16, 32, 4)
    elif BD <= 128:
        bm, bn, warps = (16, 16, 8) if wide else (16, 32, 8)
    else:
        bm, bn, warps = (16, 16, 8)
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=BD, num_warps=warps, num_stages=1)


def _check_launch_dtype(x: torch.Tensor) -> None:
    if x.is_cuda and x.dtype not in ATTENTION_DTYPES:
        raise TypeError(f"triton attention on CUDA takes {[str(d) for d in ATTENTION_DTYPES]}"
                        f", got {x.dtype} (float64 does not compile; use the torch path)")
    if _block_d(x.shape[-1]) > 256:
        raise ValueError(f"triton attention supports head dims up to 256, got {x.shape[-1]}")


# ------------------------------------------------------------------------------------------
# Launchers and the autograd.Function
# ------------------------------------------------------------------------------------------
def _check_packed(q, k, v, cu_seqlens):
    assert q.dim() == 3 and k.dim() == 3 and v.dim() == 3, "q, k, v must be [T, H, D]"
    assert k.shape == v.shape and q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2]
    assert q.shape[1] % k.shape[1] == 0, "Hq must be a multiple of Hkv"
    assert q.dtype == k.dtype == v.dtype
    assert cu_seqlens.dim() == 1 and cu_seqlens.dtype in (torch.int32, torch.int64)
    for t in (q, k, v):
        assert t.stride(2) == 1, "the head dimension must be contiguous"


class _PackedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale):
        T, Hq, D = q.shape
        Hkv = k.shape[1]
        B = cu_seqlens.shape[0] - 1
        cfg = packed_fwd_config(D, q.dtype, gpu=not interpreted())
        o = torch.empty_like(q)
        lse = torch.empty(T, Hq, device=q.device, dtype=torch.float32)
        grid = (triton.cdiv(max_seqlen, cfg["BLOCK_M"]), B, Hq)
        with launch_device(q, k, v, cu_seqlens):
            _packed_attention_fwd_kernel[grid](
                q, k, v, o, lse, cu_seqlens, q.stride(0), q.stride(1), k.stride(0),
                k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1), Hq, D,
                scale * _LOG2E, GROUP=Hq // Hkv, DOT_PRECISION=dot_precision(q.dtype), **cfg)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
        ctx.max_seqlen, ctx.scale = max_seqlen, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
        do = do.contiguous() if do.stride() != q.stride() else do
        T, Hq, D = q.shape
        Hkv = k.shape[1]
        B = cu_seqlens.shape[0] - 1
        cfg = packed_bwd_config(D, q.dtype, gpu=not interpreted())
        delta = (do.float() * o.float()).sum(-1)  # [T, Hq]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
        meta = dict(GROUP=Hq // Hkv, DOT_PRECISION=dot_precision(q.dtype), **cfg)
        with launch_device(q, do, cu_seqlens):
            _packed_attention_bwd_kernel[(triton.cdiv(ctx.max_seqlen, cfg["BLOCK_N"]), B, Hkv)](
                q, k, v, do, lse, delta, dk, dv, cu_seqlens, *strides, Hq, D, ctx.scale, **meta)
            _packed_attention_bwd_dq_kernel[(triton.cdiv(ctx.max_seqlen, cfg["BLOCK_M"]), B, Hq)](
                q, k, v, do, lse, delta, dq, cu_seqlens, *strides, Hq, D, ctx.scale, **meta)
        return dq, dk, dv, None, None, None


def packed_attention_triton(q, k, v, cu_seqlens, max_seqlen, scale=None):
    _check_packed(q, k, v, cu_seqlens)
    _check_launch_dtype(q)
    launch_device(q, k, v, cu_seqlens)  # refuse mixed devices before any copy
    # dk/dv are written with k/v's strides and dq with q's: give them dense layouts.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _PackedAttention.apply(q, k, v, cu_seqlens.contiguous(), int(max_seqlen), scale)


_SHORT = 128  # sequences at most this long share one padded SDPA call regardless of waste
_USEFUL = 0.9  # longer ones share a call only if >= 90% of its (L x L) work is real


def _buckets(lengths):
    """Group sequence indices, longest first, into SDPA calls over right-padded batches.
    Each call costs a fixed overhead (several parallel regions); padding costs work."""
    buckets, real = [], []
    for b in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[b]
        if n == 0:
            continue
        if buckets:
            top = lengths[buckets[-1][0]]
            padded = (len(buckets[-1]) + 1) * top * top
            if top <= _SHORT or real[-1] + n * n >= _USEFUL * padded:
                buckets[-1].append(b)
                real[-1] += n * n
                continue
        buckets.append([b])
        real.append(n * n)
    return buckets


def packed_attention_torch(q, k, v, cu_seqlens, max_seqlen, scale=None):
    _check_packed(q, k, v, cu_seqlens)
    bounds = cu_seqlens.tolist()
    starts, lengths = bounds[:-1], [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    gqa = q.shape[1] != k.shape[1]
    outs, rows = [], torch.empty(q.shape[0], dtype=torch.int64)  # out row of each token
    done = 0
    for bucket in _buckets(lengths):
        if len(bucket) == 1:  # a view, no copy
            s, n = starts[bucket[0]], lengths[bucket[0]]
            o = F.scaled_dot_product_attention(
                q[s:s + n].transpose(0, 1), k[s:s + n].transpose(0, 1),
                v[s:s + n].transpose(0, 1), is_causal=True, scale=scale, enable_gqa=gqa)
            outs.append(o.transpose(0, 1))  # [n, Hq, D]
            rows[s:s + n] = torch.arange(done, done + n)
            done += n
            continue
        # Right padding is exact under the causal mask: a real query never sees a padded
        # key, padded queries' outputs are dropped (so their gradients are zero), and
        # padded slots repeat the sequence's last token so every value stays finite.
        top = lengths[bucket[0]]
        pos = torch.arange(top, device=q.device)
        idx = torch.cat([starts[b] + pos.clamp(max=lengths[b] - 1) for b in bucket])
        pad = lambda x: x.index_select(0, idx).view(len(bucket), top, *x.shape[1:])  # noqa: E731
        o = F.scaled_dot_product_attention(
            pad(q).transpose(1, 2), pad(k).transpose(1, 2), pad(v).transpose(1, 2),
            is_causal=True, scale=scale, enable_gqa=gqa)  # [nb, Hq, top, D]
        outs.append(o.transpose(1, 2).reshape(len(bucket) * top, *q.shape[1:]))
        for j, b in enumerate(bucket):
            s, n = starts[b], lengths[b]
            rows[s:s + n] = torch.arange(done + j * top, done + j * top + n)
        done += len(bucket) * top
    if not outs:
        return torch.empty_like(q)
    out = torch.cat(outs)
    return out if done == q.shape[0] and len(outs) == 1 else out.index_select(0, rows.to(q.device))


def packed_attention_reference(q, k, v, cu_seqlens, max_seqlen, scale=None):
    """Explicit softmax per sequence, in the inputs' dtype (float64 in the tests)."""
    _check_packed(q, k, v, cu_seqlens)
    group = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bounds = cu_seqlens.tolist()
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs = q[s:e].transpose(0, 1)  # [Hq, L, D]
        ks = k[s:e].transpose(0, 1).repeat_interleave(group, 0)
        vs = v[s:e].transpose(0, 1).repeat_interleave(group, 0)
        scores = qs @ ks.transpose(1, 2) * scale
        causal = torch.ones(e - s, e - s, dtype=torch.bool, device=q.device).tril()
        p = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
        outs.append((p @ vs).transpose(0, 1))
    return torch.cat(outs) if outs else torch.empty_like(q)


_PACKED = {"triton": packed_attention_triton, "torch": packed_attention_torch,
           "reference": packed_attention_reference}


def shared_prefix_attention(q, k, v, gather, cu_seqlens, max_seqlen: int, pick, scale: float | None = None):
    """Causal attention for sequences that share prefixes held once in the stream.

    q [T, Hq, D], k/v [T, Hkv, D]: a stream where some rows (a group's prefix) belong to
    several sequences. ``gather`` [T'] int64 lays every sequence out whole (rows of the
    stream), ``cu_seqlens`` [S+1] / ``max_seqlen`` delimit those sequences, ``pick`` [T]
    int64 names the row of that layout each stream row's output comes from -> out
    [T, Hq, D]. A continuation thus attends to its prefix's keys and values (computed once,
    as every projection and MLP of the prefix is) and causally to itself.

    It runs ``packed_attention`` (the op dispatched per device: Triton on CUDA, SDPA
    buckets on the CPU) over the whole sequences, so only the attention itself repeats the
    prefix's queries, once per continuation; the gradient of a prefix row's key and value
    sums over every sequence reading it (index_select's backward)."""
    sel = lambda x: x.index_select(0, gather)  # noqa: E731
    return packed_attention(sel(q), sel(k), sel(v), cu_seqlens, max_seqlen, scale).index_select(0, pick)


def packed_attention(q, k, v, cu_seqlens, max_seqlen: int, scale: float | None = None):
    """Causal attention within each packed sequence; q [T, Hq, D], k/v [T, Hkv, D],
    cu_seqlens [B+1] int32, max_seqlen = max length (host int) -> out [T, Hq, D].
    scale defaults to 1/sqrt(D). Differentiable in q, k, v. Accumulates in float32 (softmax
    max / sum / lse, the output and gradient accumulators) and returns q's dtype; float32
    inputs are multiplied without TF32. CUDA takes float16, bfloat16 or float32."""
    impl = backend("packed_attention", q.device)
    return _PACKED[impl](q, k, v, cu_seqlens, max_seqlen, scale)
