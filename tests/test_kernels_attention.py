"""packed_attention and decode_attention against a float64 reference."""


import pytest
import torch

from kernels.attention import (_buckets, packed_attention_reference, packed_attention_torch,
                               packed_attention_triton)
from kernels.decode_attention import (decode_attention_reference, decode_attention_torch,
                                      decode_attention_triton)

ATOL, RTOL = 1e-5, 1e-4
PACKED = {"triton": packed_attention_triton, "torch": packed_attention_torch}
DECODE = {"triton": decode_attention_triton, "torch": decode_attention_torch}


def _packed_inputs(lens, Hq, Hkv, D, seed, fused_qkv=False):
    gen = torch.Generator().manual_seed(seed)
    T = sum(lens)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    if fused_qkv:  # q, k, v as strided views of one projection, as a model produces them
        qkv = torch.randn(T, Hq + 2 * Hkv, D, generator=gen)
        q, k, v = qkv.split([Hq, Hkv, Hkv], dim=1)
    else:
        q, k, v = (torch.randn(T, h, D, generator=gen) for h in (Hq, Hkv, Hkv))
    return [x.detach().requires_grad_() for x in (q, k, v)], cu, max(lens)


def _check_packed(fn, lens, Hq, Hkv, D, seed=0, fused_qkv=False, scale=None):
    (q, k, v), cu, max_len = _packed_inputs(lens, Hq, Hkv, D, seed, fused_qkv)
    out = fn(q, k, v, cu, max_len, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = packed_attention_reference(qd, kd, vd, cu, max_len, scale)
    torch.testing.assert_close(out.double(), ref.detach(), atol=ATOL, rtol=RTOL)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    (out * grad).sum().backward()
    (ref * grad.double()).sum().backward()
    for x, xd in ((q, qd), (k, kd), (v, vd)):
        torch.testing.assert_close(x.grad.double(), xd.grad, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("lens,Hq,Hkv,D", [
    ([1], 2, 2, 16),                    # one token
    ([1, 5, 40, 3], 3, 3, 16),          # GQA ratio 1, lengths 1 and across blocks
    ([2, 1, 1, 70, 3, 1], 6, 2, 24),    # one long among many short, ratio 3, D not 2^k
    ([17, 33], 3, 1, 32),               # multi-query
])
def test_packed_attention_small(impl, lens, Hq, Hkv, D):
    _check_packed(PACKED[impl], lens, Hq, Hkv, D, seed=len(lens) * D)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_packed_attention_strided_views_and_scale(impl):
    _check_packed(PACKED[impl], [9, 20], 3, 1, 16, seed=4, fused_qkv=True, scale=0.3)


def test_packed_attention_torch_larger():
    _check_packed(packed_attention_torch, [1, 150, 7, 300, 64], 9, 3, 64, seed=5)


def test_packed_attention_torch_buckets_similar_lengths():
    """Similar long lengths share one right-padded call; short ones always do."""
    assert _buckets([500, 3, 490, 480, 9, 200]) == [[0, 2, 3], [5], [4, 1]]
    _check_packed(packed_attention_torch, [200, 3, 190, 185, 9, 64], 6, 2, 32, seed=9)


def test_packed_attention_sequences_are_independent():
    """A sequence's output does not depend on what is packed beside it."""
    (q, k, v), cu, _ = _packed_inputs([5, 12], 3, 1, 16, seed=6)
    packed = packed_attention_triton(q, k, v, cu, 12)
    alone = packed_attention_triton(q[5:], k[5:], v[5:], torch.tensor([0, 12], dtype=torch.int32),
                                    12)
    torch.testing.assert_close(packed[5:], alone, atol=ATOL, rtol=RTOL)


def _decode_inputs(lengths, Hq, Hkv, D, S, seed):
    gen = torch.Generator().manual_seed(seed)
    B = len(lengths)
    q = torch.randn(B, Hq, D, generator=gen)
    k_cache, v_cache = (torch.randn(B, Hkv, S, D, generator=gen) for _ in range(2))
    return q, k_cache, v_cache, torch.tensor(lengths, dtype=torch.int32)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("lengths,Hq,Hkv,D,S", [
    ([1], 3, 3, 16, 8),                 # batch 1, first token
    ([37], 9, 3, 64, 50),               # batch 1, the default model's heads
    ([1, 37, 20, 50], 9, 3, 64, 50),    # mixed lengths, one full cache
    ([3, 2], 4, 4, 24, 5),              # GQA ratio 1, D not 2^k
])
def test_decode_attention(impl, lengths, Hq, Hkv, D, S):
    q, k_cache, v_cache, lens = _decode_inputs(lengths, Hq, Hkv, D, S, seed=sum(lengths))
    out = DECODE[impl](q, k_cache, v_cache, lens, max(lengths))
    ref = decode_attention_reference(q.double(), k_cache.double(), v_cache.double(), lens,
                                     max(lengths))
    torch.testing.assert_close(out.double(), ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_decode_matches_last_row_of_packed(impl):
    """Decoding the last token of each sequence from a cache equals the last row of packed
    causal attention over the sequence: the invariant generation relies on."""
    lens, Hq, Hkv, D, S = [4, 1, 11], 9, 3, 16, 12
    (q, k, v), cu, _ = _packed_inputs(lens, Hq, Hkv, D, seed=8)
    q, k, v = q.detach(), k.detach(), v.detach()
    packed = packed_attention_reference(q, k, v, cu, max(lens))
    k_cache, v_cache = torch.zeros(3, Hkv, S, D), torch.zeros(3, Hkv, S, D)
    for b, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        k_cache[b, :, : e - s] = k[s:e].transpose(0, 1)
        v_cache[b, :, : e - s] = v[s:e].transpose(0, 1)
    last = cu[1:].long() - 1
    out = DECODE[impl](q[last], k_cache, v_cache, torch.tensor(lens, dtype=torch.int32),
                       max(lens))
    torch.testing.assert_close(out, packed[last], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("lengths,Hq,Hkv,D,S", [
    ([1], 3, 3, 16, 8),                 # GQA 1, batch 1, first token
    ([1, 200, 77], 9, 3, 24, 203),      # GQA 3, lengths 1 and long, D not 2^k
    ([130, 0, 5], 4, 1, 16, 140),       # multi-query, an empty slot
])
def test_decode_attention_triton_splits(splits, lengths, Hq, Hkv, D, S):
    """One program per (slot, kv head, split) with the group's queries as a tile; the
    splits' partial softmaxes merged by the combine kernel equal one softmax."""
    q, k_cache, v_cache, lens = _decode_inputs(lengths, Hq, Hkv, D, S, seed=D + sum(lengths))
    out = decode_attention_triton(q, k_cache, v_cache, lens, max(lengths), num_splits=splits)
    ref = decode_attention_reference(q.double(), k_cache.double(), v_cache.double(), lens,
                                     max(lengths))
    live = lens > 0  # the reference's softmax over no key is NaN; the kernel's output is 0
    torch.testing.assert_close(out[live].double(), ref[live], atol=ATOL, rtol=RTOL)
    assert (out[~live] == 0).all()


def test_decode_splits_fill_the_gpu_at_small_batch():
    from kernels.decode_attention import decode_splits

    assert decode_splits(1, 8, 4096, 64) == 16  # batch 1: many splits of >= 4 tiles each
    assert decode_splits(1, 2, 65536, 64) == 32  # capped
    assert decode_splits(64, 8, 4096, 64) == 1  # a full batch fills the GPU alone
    assert decode_splits(1, 8, 100, 64) == 1  # short caches are not split


def test_decode_attention_triton_clamps_lengths_past_the_cache():
    """A length past the cache must never address memory outside it (an illegal address
    on a GPU): the kernel attends to the whole cache, as if the length were S."""
    S = 20
    q, k_cache, v_cache, _ = _decode_inputs([S, S], 4, 2, 16, S, seed=3)
    too_long = torch.tensor([S + 7, S], dtype=torch.int32)
    out = decode_attention_triton(q, k_cache, v_cache, too_long, S)
    ref = decode_attention_reference(q.double(), k_cache.double(), v_cache.double(),
                                     torch.tensor([S, S]), S)
    torch.testing.assert_close(out.double(), ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_decode_attention_cpu_paths_refuse_lengths_past_the_cache(impl):
    fn = {"torch": decode_attention_torch, "reference": decode_attention_reference}[impl]
    q, k_cache, v_cache, _ = _decode_inputs([4, 4], 4, 2, 16, 6, seed=4)
    with pytest.raises(ValueError, match=r"\[0, 6\]"):
        fn(q, k_cache, v_cache, torch.tensor([9, 2], dtype=torch.int32), 6)
    with pytest.raises(ValueError, match="max_len 7"):
        fn(q, k_cache, v_cache, torch.tensor([4, 2], dtype=torch.int32), 7)
