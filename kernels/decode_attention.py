"""Single-token decode attention: one new query per cache slot, q [B, Hq, D], over
positions [0, lengths[b]) of that slot's cache k/v_cache [B, Hkv, S, D].

Triton (flash-decoding): one program per (slot, kv head, split of the cache) with the
group's queries as one tile, so each K/V tile is read once per group rather than once per
query head; long caches are split over the sequence (`decode_splits`) so that batch 1
still fills the GPU, and a combine kernel merges the splits' partial softmaxes. Precision
and launch rules are packed attention's (`kernels.attention`): float32 dots without TF32,
float32 statistics and partial outputs, tiles from one `*_config` function per kernel,
which the AOT compile test also reads.

Torch (CPU) path: `scaled_dot_product_attention` over each slot's cache with a length mask.
"""

import torch
import torch.nn.functional as F

from ._dispatch import backend
from ._triton import interpreted, launch_device, tl, triton
from .attention import _INTERPRETER_BLOCK, _LOG2E, _block_d, _check_launch_dtype, dot_precision

@triton.jit
def _decode_attention_fwd_kernel(
    q_ptr,  # [B, Hq, D]
    k_ptr,  # [B, Hkv, S, D] cache
    v_ptr,  # [B, Hkv, S, D] cache
    o_ptr,  # [B, Hq, D] out (SPLITS == 1), else [B, Hq, SPLITS, D] float32 partial outputs
    lse_ptr,  # [B, Hq, SPLITS] float32 out: partial logsumexp, base 2 (when SPLITS > 1)
    len_ptr,  # [B] int32 / int64
    stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    S,
    D,
    qk_scale,  # softmax scale * log2(e)
    split_len,  # cache positions per split, a multiple of BLOCK_N
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,  # GROUP rounded up to a tile (>= 16 for tl.dot)
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32: no silent TF32 on CUDA
):
    """One program per (slot, kv head, split of the cache): the group's queries share each
    K/V tile, which is read once for the whole group."""
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    split = tl.program_id(2)
    # A length past the cache (or negative) is clamped: never an address outside it.
    L = tl.minimum(tl.maximum(tl.load(len_ptr + b).to(tl.int64), 0), S)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, L)
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GROUP
    mask_d = offs_d < D
    heads = hk * GROUP + offs_g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    m_i = tl.full((BLOCK_G,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    for start_n in range(lo, hi, BLOCK_N):  # every tile has a valid column: m stays finite
        cols = start_n + offs_n
        mask_n = cols < hi
        k = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None],
                    mask=mask_n[None, :] & mask_d[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    l_safe = tl.where(l_i > 0, l_i, 1.0)  # an empty split (or slot) gives 0 and lse -inf
    acc = acc / l_safe[:, None]
    o_off = b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    tl.store(o_ptr + o_off, acc.to(o_ptr.dtype.element_ty),
             mask=mask_g[:, None] & mask_d[None, :])
    if SPLITS > 1:
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), -float("inf"))
        row = b * tl.num_programs(1) * GROUP + heads
        tl.store(lse_ptr + row * SPLITS + split, lse, mask=mask_g)


@triton.jit
def _decode_attention_combine_kernel(
    part_ptr,  # [B, Hq, SPLITS, D] float32 partial outputs
    lse_ptr,  # [B, Hq, SPLITS] float32 partial logsumexp, base 2
    o_ptr,  # [B, Hq, D] out
    stride_ob, stride_oh,
    Hq,
    D,
    SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M): the splits' softmaxes merged."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < SPLITS
    row = (b * Hq + h) * SPLITS
    lse = tl.load(lse_ptr + row + offs_s, mask=mask_s, other=-float("inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == -float("inf"), 0.0, m))  # empty splits weigh 0
    part = tl.load(part_ptr + (row + offs_s)[:, None] * D + offs_d[None, :],
                   mask=mask_s[:, None] & (offs_d < D)[None, :], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * part, 0) / tl.where(total > 0, total, 1.0)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty),
             mask=offs_d < D)



# ------------------------------------------------------------------------------------------
# Launch configuration (see kernels.attention)
# ------------------------------------------------------------------------------------------
def decode_config(D: int, dtype: torch.dtype, group: int, gpu: bool = True) -> dict:
    """Tiles of `_decode_attention_fwd_kernel`: the group's queries as one tile of
    BLOCK_G >= 16 rows (the smallest tl.dot), cache tiles of BLOCK_N positions."""
    BD = _block_d(D)
    BG = max(16, triton.next_power_of_2(group))
    if not gpu:
        return dict(BLOCK_G=BG, BLOCK_N=_INTERPRETER_BLOCK, BLOCK_D=BD, num_warps=4,
                    num_stages=1)
    bn = 64 if BD <= 64 else 32
    if dtype == torch.float32 and BD > 64:
        bn //= 2
    return dict(BLOCK_G=BG, BLOCK_N=bn, BLOCK_D=BD, num_warps=4, num_stages=2)


def decode_combine_config(splits: int, D: int) -> dict:
    """Tiles of `_decode_attention_combine_kernel`: all splits of one (slot, head) at once."""
    return dict(BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=_block_d(D), num_warps=4,
                num_stages=1)


# ------------------------------------------------------------------------------------------
# Decode
# ------------------------------------------------------------------------------------------
def _check_decode(q, k_cache, v_cache, lengths, max_len):
    assert q.dim() == 3 and k_cache.dim() == 4 and k_cache.shape == v_cache.shape
    assert q.shape[0] == k_cache.shape[0] and q.shape[2] == k_cache.shape[3]
    assert q.shape[1] % k_cache.shape[1] == 0, "Hq must be a multiple of Hkv"
    assert lengths.shape == q.shape[:1] and lengths.dtype in (torch.int32, torch.int64)
    S = k_cache.shape[2]
    if not 0 <= max_len <= S:
        raise ValueError(f"decode max_len {max_len} is outside the cache's [0, {S}] positions")


def _check_lengths_cpu(lengths, S):
    """Lengths past the cache are an error where checking is free (CPU tensors); the
    Triton kernel clamps them to the cache instead (checking on CUDA would sync)."""
    if lengths.device.type == "cpu" and lengths.numel() and (
            int(lengths.min()) < 0 or int(lengths.max()) > S):
        raise ValueError(f"decode lengths must lie in [0, {S}] (the cache's positions), got "
                         f"{lengths.tolist()}")


_DECODE_TARGET_PROGRAMS = 264  # ~2 waves of a 132-SM GPU; the split count aims for it
_MAX_SPLITS = 32


def decode_splits(B: int, Hkv: int, max_len: int, block_n: int) -> int:
    """How many parts of the cache each (slot, kv head) is split into (flash-decoding):
    enough programs to fill the GPU at small batch, no split shorter than 4 tiles. Uses
    host ints only, so a CUDA graph captured with max_len = the cache size stays valid."""
    tiles = triton.cdiv(max(max_len, 1), block_n)
    want = max(1, _DECODE_TARGET_PROGRAMS // max(B * Hkv, 1))
    return max(1, min(want, _MAX_SPLITS, tiles // 4))


def decode_attention_triton(q, k_cache, v_cache, lengths, max_len, scale=None, num_splits=None):
    """`num_splits` forces the split of the cache (tests); default `decode_splits`."""
    _check_decode(q, k_cache, v_cache, lengths, max_len)
    _check_launch_dtype(q)
    for t in (q, k_cache, v_cache):
        assert t.stride(-1) == 1, "the head dimension must be contiguous"
    B, Hq, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    scale = D**-0.5 if scale is None else float(scale)
    cfg = decode_config(D, q.dtype, Hq // Hkv, gpu=not interpreted())
    bn = cfg["BLOCK_N"]
    splits = num_splits or decode_splits(B, Hkv, max_len, bn)
    split_len = triton.cdiv(triton.cdiv(max(max_len, 1), splits), bn) * bn
    splits = triton.cdiv(max(max_len, 1), split_len)
    o = torch.empty_like(q)
    lengths = lengths.contiguous()
    if splits == 1:
        part, lse, part_strides = o, o, (o.stride(0), o.stride(1), 0)
    else:  # float32 partials [B, Hq, splits, D], merged by the combine kernel
        part = torch.empty(B, Hq, splits, D, device=q.device, dtype=torch.float32)
        lse = torch.empty(B, Hq, splits, device=q.device, dtype=torch.float32)
        part_strides = (part.stride(0), part.stride(1), part.stride(2))
    with launch_device(q, k_cache, v_cache, lengths):
        _decode_attention_fwd_kernel[(B, Hkv, splits)](
            q, k_cache, v_cache, part, lse, lengths, q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), *part_strides,
            S, D, scale * _LOG2E, split_len, GROUP=Hq // Hkv, SPLITS=splits,
            DOT_PRECISION=dot_precision(q.dtype), **cfg)
        if splits > 1:
            _decode_attention_combine_kernel[(B, Hq)](
                part, lse, o, o.stride(0), o.stride(1), Hq, D, SPLITS=splits,
                **decode_combine_config(splits, D))
    return o


def decode_attention_torch(q, k_cache, v_cache, lengths, max_len, scale=None):
    """One SDPA call over the first `max_len` positions; a key mask only when B > 1 (at
    B == 1, lengths[0] == max_len, so the slice is the mask)."""
    _check_decode(q, k_cache, v_cache, lengths, max_len)
    _check_lengths_cpu(lengths, k_cache.shape[2])
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
    _check_decode(q, k_cache, v_cache, lengths, max_len)
    _check_lengths_cpu(lengths, k_cache.shape[2])
    B, Hq, D = q.shape
    group = Hq // k_cache.shape[1]
    scale = D**-0.5 if scale is None else scale
    k = k_cache[:, :, :max_len].repeat_interleave(group, 1)  # [B, Hq, L, D]
    v = v_cache[:, :, :max_len].repeat_interleave(group, 1)
    scores = torch.einsum("bhd,bhld->bhl", q, k) * scale
    valid = torch.arange(max_len, device=q.device) < lengths[:, None].to(torch.int64)
    p = torch.softmax(scores.masked_fill(~valid[:, None, :], float("-inf")), -1)
    return torch.einsum("bhl,bhld->bhd", p, v)


_DECODE = {"triton": decode_attention_triton, "torch": decode_attention_torch,
           "reference": decode_attention_reference}


def decode_attention(q, k_cache, v_cache, lengths, max_len: int, scale: float | None = None):
    """One new query per slot: q [B, Hq, D] over its slot's cache positions
    [0, lengths[b]) of k/v_cache [B, Hkv, S, D]; max_len = max(lengths) from the host,
    at most S. -> out [B, Hq, D] in q's dtype. Forward only. Accumulates in float32 (the
    softmax statistics, the output and the split partials). A slot of length 0 gives 0.
    Lengths outside [0, S] raise on CPU tensors; on CUDA the kernel clamps them to the cache
    (checking would sync)."""
    impl = backend("decode_attention", q.device)
    return _DECODE[impl](q, k_cache, v_cache, lengths, max_len, scale)
