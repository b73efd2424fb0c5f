"""Packed (varlen) causal attention with grouped-query heads, and single-token decode.

packed_attention: q [T, Hq, D], k/v [T, Hkv, D] hold B sequences back to back
(`cu_seqlens` [B+1] int32 gives their starts); token i of a sequence attends to tokens
0..i of the same sequence. Query head h reads kv head h // (Hq / Hkv).
decode_attention: one new query per cache slot, q [B, Hq, D], over positions
[0, lengths[b]) of that slot's cache k/v_cache [B, Hkv, S, D].

Triton: flash-attention 2 style (Dao 2023). The forward keeps a running max and sum per
query row (online softmax) and stores only out and the row logsumexp; the backward
recomputes the probabilities block by block: one kernel accumulates dK, dV per kv head
(looping over the query heads of its group, so no atomics), one accumulates dQ. Nothing of
size T x T exists. The causal structure is used to skip blocks above the diagonal.
Decode: one program per (slot, query head) with an online softmax over the cache.

Minimum work, with P = sum_b L_b (L_b + 1) / 2 causal pairs:
  forward  FLOPs 4 P Hq D; bytes (2 T Hq D + 2 T Hkv D) b (read q, k, v, write out)
  backward FLOPs 10 P Hq D (recompute qk, dv, dp, dq, dk); bytes ~ (4 T Hq D + 4 T Hkv D) b
  decode   FLOPs 4 Hq D sum_b lengths_b; bytes 2 Hkv D sum_b lengths_b b (the cache read):
           memory-bound.

Torch (CPU) path: `scaled_dot_product_attention(is_causal=True, enable_gqa=True)` per
sequence, or per bucket of sequences of similar length (or all short) right-padded into one
call: the padding waste is bounded (`_USEFUL`), the per-call overhead is paid once per
bucket. It reads `cu_seqlens` on the host (free on the CPU, a sync on a GPU, where the
Triton path runs instead). Work is ~sum L_b^2, not B max(L)^2 as with one padded call.
"""

import torch
import torch.nn.functional as F

from ._dispatch import backend
from ._triton import check_launchable, interpreted, tl, triton

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
        s = tl.dot(q, k) * qk_scale
        s = tl.where((offs_m[:, None] >= cols[None, :]) & mask_n[None, :], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + (seq + cols)[:, None] * stride_vt + hk * stride_vh + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
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
            s = tl.dot(q, tl.trans(k)) * (scale * 1.4426950408889634)  # [BLOCK_M, BLOCK_N]
            keep = (rows[:, None] >= cols[None, :]) & mask_m[:, None] & mask_n[None, :]
            p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
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
        s = tl.dot(q, tl.trans(k)) * (scale * 1.4426950408889634)
        keep = (rows[:, None] >= cols[None, :]) & mask_m[:, None] & mask_n[None, :]
        p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    dq = dq * scale
    tl.store(dq_ptr + q_off, dq.to(dq_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _decode_attention_fwd_kernel(
    q_ptr,  # [B, Hq, D]
    k_ptr,  # [B, Hkv, S, D] cache
    v_ptr,  # [B, Hkv, S, D] cache
    o_ptr,  # [B, Hq, D] out
    len_ptr,  # [B] int32
    stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh,
    D,
    scale,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    hk = h // GROUP
    L = tl.load(len_ptr + b)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d, mask=mask_d, other=0.0)
    q = q.to(tl.float32) * scale
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for start_n in range(0, L, BLOCK_N):
        cols = (start_n + offs_n).to(tl.int64)
        mask_n = cols < L
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.where(mask_n, tl.sum(k.to(tl.float32) * q[None, :], 1), -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty),
             mask=mask_d)


# ------------------------------------------------------------------------------------------
# Launchers and the autograd.Function
# ------------------------------------------------------------------------------------------
def _blocks(D):
    block = 16 if interpreted() else 64  # the interpreter runs each program in numpy
    return block, block, max(16, triton.next_power_of_2(D))


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
        check_launchable(q)
        T, Hq, D = q.shape
        Hkv = k.shape[1]
        B = cu_seqlens.shape[0] - 1
        BM, BN, BD = _blocks(D)
        o = torch.empty_like(q)
        lse = torch.empty(T, Hq, device=q.device, dtype=torch.float32)
        grid = (triton.cdiv(max_seqlen, BM), B, Hq)
        _packed_attention_fwd_kernel[grid](
            q, k, v, o, lse, cu_seqlens, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), o.stride(0), o.stride(1), Hq, D, scale * _LOG2E,
            GROUP=Hq // Hkv, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD)
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
        BM, BN, BD = _blocks(D)
        delta = (do.float() * o.float()).sum(-1)  # [T, Hq]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
        meta = dict(GROUP=Hq // Hkv, BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD)
        _packed_attention_bwd_kernel[(triton.cdiv(ctx.max_seqlen, BN), B, Hkv)](
            q, k, v, do, lse, delta, dk, dv, cu_seqlens, *strides, Hq, D, ctx.scale, **meta)
        _packed_attention_bwd_dq_kernel[(triton.cdiv(ctx.max_seqlen, BM), B, Hq)](
            q, k, v, do, lse, delta, dq, cu_seqlens, *strides, Hq, D, ctx.scale, **meta)
        return dq, dk, dv, None, None, None


def packed_attention_triton(q, k, v, cu_seqlens, max_seqlen, scale=None):
    _check_packed(q, k, v, cu_seqlens)
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


# ------------------------------------------------------------------------------------------
# Decode
# ------------------------------------------------------------------------------------------
def _check_decode(q, k_cache, v_cache, lengths):
    assert q.dim() == 3 and k_cache.dim() == 4 and k_cache.shape == v_cache.shape
    assert q.shape[0] == k_cache.shape[0] and q.shape[2] == k_cache.shape[3]
    assert q.shape[1] % k_cache.shape[1] == 0, "Hq must be a multiple of Hkv"
    assert lengths.shape == q.shape[:1] and lengths.dtype in (torch.int32, torch.int64)


def decode_attention_triton(q, k_cache, v_cache, lengths, max_len, scale=None):
    _check_decode(q, k_cache, v_cache, lengths)
    check_launchable(q)
    for t in (q, k_cache, v_cache):
        assert t.stride(-1) == 1, "the head dimension must be contiguous"
    B, Hq, D = q.shape
    scale = D**-0.5 if scale is None else float(scale)
    o = torch.empty_like(q)
    _decode_attention_fwd_kernel[(B, Hq)](
        q, k_cache, v_cache, o, lengths.contiguous(), q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), o.stride(0), o.stride(1),
        D, scale, GROUP=Hq // k_cache.shape[1], BLOCK_N=_blocks(D)[1],
        BLOCK_D=triton.next_power_of_2(D))
    return o


def decode_attention_torch(q, k_cache, v_cache, lengths, max_len, scale=None):
    """One SDPA call over the first `max_len` positions; a key mask only when B > 1 (at
    B == 1, lengths[0] == max_len, so the slice is the mask)."""
    B = q.shape[0]
    k, v = k_cache[:, :, :max_len], v_cache[:, :, :max_len]
    mask = None
    if B > 1:
        positions = torch.arange(max_len, device=q.device)
        mask = (positions < lengths[:, None]).view(B, 1, 1, max_len)
    o = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=mask, scale=scale,
                                       enable_gqa=q.shape[1] != k.shape[1])
    return o.squeeze(2)


def decode_attention_reference(q, k_cache, v_cache, lengths, max_len, scale=None):
    _check_decode(q, k_cache, v_cache, lengths)
    B, Hq, D = q.shape
    group = Hq // k_cache.shape[1]
    scale = D**-0.5 if scale is None else scale
    k = k_cache[:, :, :max_len].repeat_interleave(group, 1)  # [B, Hq, L, D]
    v = v_cache[:, :, :max_len].repeat_interleave(group, 1)
    scores = torch.einsum("bhd,bhld->bhl", q, k) * scale
    valid = torch.arange(max_len, device=q.device) < lengths[:, None].to(torch.int64)
    p = torch.softmax(scores.masked_fill(~valid[:, None, :], float("-inf")), -1)
    return torch.einsum("bhl,bhld->bhd", p, v)


_PACKED = {"triton": packed_attention_triton, "torch": packed_attention_torch,
           "reference": packed_attention_reference}
_DECODE = {"triton": decode_attention_triton, "torch": decode_attention_torch,
           "reference": decode_attention_reference}


def packed_attention(q, k, v, cu_seqlens, max_seqlen: int, scale: float | None = None):
    """Causal attention within each packed sequence; q [T, Hq, D], k/v [T, Hkv, D],
    cu_seqlens [B+1] int32, max_seqlen = max length (host int) -> out [T, Hq, D].
    scale defaults to 1/sqrt(D). Differentiable in q, k, v."""
    return _PACKED[backend("packed_attention")](q, k, v, cu_seqlens, max_seqlen, scale)


def decode_attention(q, k_cache, v_cache, lengths, max_len: int, scale: float | None = None):
    """One new query per slot: q [B, Hq, D] over its slot's cache positions
    [0, lengths[b]) of k/v_cache [B, Hkv, S, D]; max_len = max(lengths) from the host.
    -> out [B, Hq, D]. Forward only."""
    return _DECODE[backend("decode_attention")](q, k_cache, v_cache, lengths, max_len, scale)
