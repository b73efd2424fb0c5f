"""Option scoring after a cached prompt against full forwards of prompt + option."""
import torch

from engine.model import Packed, packed_metadata
from engine.options import option_logprobs


def full_forward_logprob(model, prompt, option):
    seq = prompt + option
    positions, cu, m = packed_metadata([len(seq)])
    with torch.no_grad():
        logits = model.logits(model(torch.tensor(seq), positions, Packed(cu, m)))
    lp = torch.log_softmax(logits.double(), -1)
    return sum(lp[len(prompt) - 1 + j, t].item() for j, t in enumerate(option))


def test_option_logprobs_match_full_forwards(tiny_engine):
    model = tiny_engine.model
    g = torch.Generator().manual_seed(0)
    rnd = lambda n: torch.randint(0, model.cfg.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    prompts = [rnd(1), rnd(17), rnd(40), rnd(5)]
    options = [[rnd(1), rnd(3)], [rnd(2), rnd(2), rnd(1)], [rnd(4)], [rnd(1), rnd(1)]]
    # a tiny token budget forces several prompt groups
    for budget in (8192, 30):
        got = option_logprobs(model, prompts, options, max_batch_tokens=budget)
        for p, opts, scores in zip(prompts, options, got):
            assert len(scores) == len(opts)
            for o, s in zip(opts, scores):
                assert abs(s - full_forward_logprob(model, p, o)) < 1e-4


def test_shared_prefix_prefill_matches_packed(tiny_engine):
    from engine.model import KVCache
    from engine.prefill import _packed, prefill, shared_prefix_len

    model = tiny_engine.model
    g = torch.Generator().manual_seed(3)
    head = torch.randint(0, model.cfg.vocab_size, (40,), generator=g).tolist()
    prompts = [head + torch.randint(0, model.cfg.vocab_size, (n,), generator=g).tolist() for n in (1, 9, 30)]
    assert shared_prefix_len(prompts) == 40
    assert shared_prefix_len([head, head]) == 39  # each keeps a token of its own
    with torch.no_grad():
        c1, c2 = (KVCache(model.cfg, 3, 80) for _ in range(2))
        a = prefill(model, c1, prompts, [0, 1, 2], min_shared=8)
        b = _packed(model, c2, prompts, [0, 1, 2])
    assert torch.allclose(a, b, atol=1e-5)
    for layer in range(model.cfg.num_hidden_layers):
        for s, p in enumerate(prompts):
            assert torch.allclose(c1.k[layer][s, :, : len(p)], c2.k[layer][s, :, : len(p)], atol=1e-5)
