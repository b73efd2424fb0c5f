"""Shared-prompt batches: hidden states, log-probs, rewards and every trainable gradient
equal those of the whole sequences packed apart (float64, tiny model)."""
import torch

from engine import Engine, lora
from engine.batch import pack, pack_shared
from engine.lora import LoraConfig
from engine.scoring import ScalarHead, hidden_states, sequence_logprobs

GROUPS = [[[1, 2, 3, 4, 5], [1, 2, 3, 9]],  # different continuation lengths
          [[7, 8], [7, 8, 9, 10]],  # chosen a prefix of rejected
          [[4], [5, 6]],  # nothing shared, a one-token sequence
          [[3, 3, 3], [3, 3, 3]],  # identical: both continuations empty
          [[6, 5, 4, 3], [6, 5, 4, 2], [6, 5, 1]]]  # a group of three


def test_shared_equals_unshared_forward_and_gradients(tiny_model_dir):
    eng = Engine.load(tiny_model_dir("llama"))
    m = eng.model.double()
    ad = lora.add_adapter(m, "t", LoraConfig(rank=4, alpha=8), seed=0)
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_(0, 0.05)
    head = ScalarHead(m.cfg.hidden_size).double()
    params = [*ad.parameters(), *head.parameters()]
    masks = [[[j > 0 and j % 3 != 2 for j in range(len(s))] for s in g] for g in GROUPS]
    flat, fm = [s for g in GROUPS for s in g], [x for g in masks for x in g]
    out = []
    with lora.use_adapter(m, "t"):
        for b in (pack(flat, fm), pack_shared(GROUPS, masks)):
            for p in params:
                p.requires_grad_(True).grad = None
            lp = sequence_logprobs(m, b)
            r = head(hidden_states(m, b).index_select(0, b.last_rows))
            loss = (lp * torch.linspace(0.5, 1.5, len(flat), dtype=torch.float64)).sum() + (r ** 2).sum()
            loss.backward()
            out.append((lp.detach(), r.detach(), loss.detach(), [p.grad.clone() for p in params]))
    (lp0, r0, l0, g0), (lp1, r1, l1, g1) = out
    torch.testing.assert_close(lp1, lp0, rtol=0, atol=1e-10)
    torch.testing.assert_close(r1, r0, rtol=0, atol=1e-10)
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-10)
    assert any(g.abs().sum() > 0 for g in g0)
    for p, a, b in zip(params, g1, g0):
        # adapter masters are float32 (engine.lora): their gradients carry float32 rounding
        tol = dict(rtol=0, atol=1e-10) if p.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a, b, **tol)
