"""Packed batches, the token-budget batcher, and log-prob scoring over them."""
import pytest
import torch

from engine import Engine
from engine.batch import IGNORE, batches_by_tokens, group_by_tokens, pack
from engine.errors import InputError
from engine.scoring import ScalarHead, segment_sum, sequence_logprobs, token_logprobs


def test_pack_shapes_and_labels():
    b = pack([[5, 6, 7], [8], [9, 10]], [[False, True, True], [False], [False, False]], index=[4, 0, 2])
    assert b.tokens.tolist() == [5, 6, 7, 8, 9, 10]
    assert b.positions.tolist() == [0, 1, 2, 0, 0, 1]
    assert b.cu_seqlens.tolist() == [0, 3, 4, 6] and b.cu_seqlens.dtype == torch.int32
    assert b.max_seqlen == 3 and b.index.tolist() == [4, 0, 2]
    assert b.labels.tolist() == [6, 7, IGNORE, IGNORE, IGNORE, IGNORE]  # never across sequences
    assert b.target_rows.tolist() == [0, 1] and b.num_targets == 2
    default = pack([[1, 2, 3]])
    assert default.labels.tolist() == [2, 3, IGNORE]


def test_pack_rejects_bad_input():
    with pytest.raises(InputError, match="sequence 1 is empty"):
        pack([[1], []])
    with pytest.raises(InputError, match="loss mask"):
        pack([[1, 2]], [[True]])


def test_batcher_budget_whole_sequences_and_errors():
    lengths = [5, 3, 7, 1, 8, 2]
    groups = group_by_tokens(lengths, 8, shuffle=True, seed=3)
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert all(sum(lengths[i] for i in g) <= 8 for g in groups)
    assert groups == group_by_tokens(lengths, 8, shuffle=True, seed=3)  # seeded: resumable
    ex = [([1] * n, None) for n in lengths]
    batches = batches_by_tokens(ex, 8)
    assert all(b.num_tokens <= 8 for b in batches) and sum(b.num_seqs for b in batches) == 6
    with pytest.raises(InputError, match="data.jsonl:3: 7 tokens, longer than the model's context of 6"):
        batches_by_tokens(ex, 8, max_seqlen=6, names=[f"data.jsonl:{i + 1}" for i in range(6)])
    with pytest.raises(InputError, match="example 4: 8 tokens, more than the batch budget"):
        batches_by_tokens(ex, 7)


def test_token_and_sequence_logprobs_match_logits(tiny_model_dir):
    eng = Engine.load(tiny_model_dir("llama"))
    m = eng.model
    seqs = [[3, 9, 27, 81, 12], [7], [5, 50, 60]]
    b = pack(seqs, [[False, False, True, True, True], [False], [False, True, True]])
    with torch.no_grad():
        hidden = m(b.tokens, b.positions, b.context())
        lp = token_logprobs(m, b, temperature=0.7, hidden=hidden)
        full = torch.log_softmax(m.logits(hidden).double() / 0.7, -1)
        ok = b.labels != IGNORE
        want = torch.zeros(b.num_tokens, dtype=torch.float64)
        want[ok] = full[ok].gather(1, b.labels[ok, None]).squeeze(1)
        torch.testing.assert_close(lp.double(), want, rtol=1e-5, atol=1e-5)
        seq = sequence_logprobs(m, b, 0.7, token_lp=lp)
        torch.testing.assert_close(seq, torch.stack([lp[0:5].sum(), lp[5:6].sum(), lp[6:9].sum()]))
        lp2, ent = token_logprobs(m, b, return_entropy=True)
        assert ent.shape == (9,) and (ent[~ok] == 0).all() and (ent[ok] > 0).all()


def test_segment_sum_values_and_gradient():
    v = torch.randn(6, requires_grad=True)
    s = segment_sum(v, torch.tensor([0, 2, 2, 6], dtype=torch.int32))
    torch.testing.assert_close(s, torch.stack([v[:2].sum(), v.new_zeros(()), v[2:].sum()]))
    s.sum().backward()
    assert torch.equal(v.grad, torch.ones(6))


def test_scalar_head_per_token_and_last_token():
    head = ScalarHead(8)
    h = torch.randn(5, 8)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    per_token = head(h)
    assert per_token.shape == (5,)
    torch.testing.assert_close(head.last_token(h, cu), per_token[[1, 4]])
