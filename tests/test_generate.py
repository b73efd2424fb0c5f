"""Generation: greedy parity with transformers, batching invariance, sampling, stops, n."""
import functools

import pytest
import torch

from engine import Engine, InputError, SamplingParams
from engine.model import Packed, packed_metadata

GREEDY = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


PROMPTS = [chat("How do I bake bread?"), chat("Which response is less harmful?"),
           chat("The quick brown fox"), chat("A"), chat("Critique: the answer is helpful and harmless. " * 6),
           "Human: hello", chat("Options (A) (B)"), chat("0123456789")]


@functools.lru_cache(maxsize=2)
def hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def hf_greedy(folder, ids: list[int], n: int, eos_id=None) -> list[int]:
    out = hf_model(str(folder)).generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos_id,
                      pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def reference_logprobs(eng: Engine, prompt: list[int], completion: list[int], temperature=1.0) -> torch.Tensor:
    """Log-probs of completion tokens from one full forward (no cache)."""
    seq = prompt + completion
    positions, cu, m = packed_metadata([len(seq)])
    with torch.no_grad():
        logits = eng.model.logits(eng.model(torch.tensor(seq), positions, Packed(cu, m)))
    logits = logits[len(prompt) - 1 : -1] / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def test_greedy_matches_transformers_tiny(tiny_model_dir):
    folder = tiny_model_dir("llama")
    eng = Engine.load(folder)
    outs = eng.generate(PROMPTS[:3], GREEDY)
    for p, out in zip(PROMPTS[:3], outs):
        assert out.samples[0].token_ids == hf_greedy(folder, eng.encode(p), 24, eos_id=-1)


def test_greedy_matches_transformers_default(default_engine):
    prompts = [chat("What is the capital of France?"), chat("Give me a tip for studying.")]
    outs = default_engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=32))
    for p, out in zip(prompts, outs):
        ids = default_engine.encode(p)
        ref = hf_greedy(default_engine.source, ids, 32, eos_id=default_engine.tokenizer.eos_token_id)
        assert out.samples[0].token_ids == ref
        assert out.samples[0].finish_reason == ("stop" if ref[-1] == 2 else "length")


def test_alone_equals_batched_with_refills(tiny_engine):
    alone = [tiny_engine.generate([p], GREEDY)[0].samples[0].token_ids for p in PROMPTS]
    # 3 slots for 8 prompts: slots finish, are compacted and refilled from the queue
    batched = tiny_engine.generate(PROMPTS, GREEDY, max_slots=3)
    assert [o.samples[0].token_ids for o in batched] == alone
    big = tiny_engine.generate(PROMPTS, GREEDY, max_slots=32)
    assert [o.samples[0].token_ids for o in big] == alone


def test_sampled_logprobs_match_a_full_forward(tiny_engine):
    params = SamplingParams(temperature=0.7, max_new_tokens=20, n=3, seed=5)
    outs = tiny_engine.generate(PROMPTS[:4], params, max_slots=5)
    for p, out in zip(PROMPTS[:4], outs):
        assert len(out.samples) == 3
        for s in out.samples:
            ref = reference_logprobs(tiny_engine, tiny_engine.encode(p), s.token_ids, 0.7)
            assert torch.allclose(torch.tensor(s.logprobs), ref, atol=1e-4)


def test_seed_reproducible_and_samples_differ(tiny_engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=16, n=4, seed=123, ignore_eos=True)
    a = tiny_engine.generate(PROMPTS[:2], params)
    b = tiny_engine.generate(PROMPTS[:2], params)
    assert [[s.token_ids for s in o.samples] for o in a] == [[s.token_ids for s in o.samples] for o in b]
    assert len({tuple(s.token_ids) for s in a[0].samples}) > 1
    c = tiny_engine.generate(PROMPTS[:2], SamplingParams(**{**params.__dict__, "seed": 124}))
    assert [s.token_ids for s in c[0].samples] != [s.token_ids for s in a[0].samples]


def test_top_k_one_is_greedy(tiny_engine):
    greedy = tiny_engine.generate(PROMPTS[:2], GREEDY)
    topk = tiny_engine.generate(PROMPTS[:2], SamplingParams(temperature=1.0, top_k=1, max_new_tokens=24,
                                                            ignore_eos=True, seed=0))
    assert [o.samples[0].token_ids for o in topk] == [o.samples[0].token_ids for o in greedy]


def test_stop_string_cuts_text(tiny_engine):
    full = tiny_engine.generate([PROMPTS[0]], GREEDY)[0].samples[0].text
    stop = full[6:9]
    assert stop and stop in full
    out = tiny_engine.generate([PROMPTS[0]], SamplingParams(temperature=0, max_new_tokens=24, stop=[stop]))
    s = out[0].samples[0]
    assert s.finish_reason == "stop"
    assert s.text == full[: full.find(stop)]
    assert len(s.token_ids) < 24


def test_eos_ends_sample(tiny_engine):
    eos = tiny_engine.tokenizer.eos_token_id
    outs = tiny_engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=64, seed=3, n=4))
    for o in outs:
        for s in o.samples:
            if s.finish_reason == "stop":
                assert s.token_ids[-1] == eos and eos not in s.token_ids[:-1]
            else:
                assert len(s.token_ids) == 64 and eos not in s.token_ids


def test_bad_inputs(tiny_engine):
    assert tiny_engine.generate([], GREEDY) == []
    with pytest.raises(InputError, match="prompt 1 is empty"):
        tiny_engine.generate(["hi", []], GREEDY)
    ctx = tiny_engine.cfg.max_position_embeddings
    with pytest.raises(InputError, match=f"prompt 0 has {ctx + 10} tokens"):
        tiny_engine.generate([[5] * (ctx + 10)], GREEDY)
    with pytest.raises(InputError, match="temperature"):
        tiny_engine.generate(["hi"], SamplingParams(temperature=-1))


def test_generation_stops_at_context_end(tiny_engine):
    ctx = tiny_engine.cfg.max_position_embeddings
    out = tiny_engine.generate([[7] * (ctx - 5)], SamplingParams(temperature=0, max_new_tokens=50, ignore_eos=True))
    s = out[0].samples[0]
    assert s.finish_reason == "length" and len(s.token_ids) == 6
