"""The engine on a CUDA GPU (``pytest -m gpu``; skipped without CUDA; scripts/gpu_check.sh
runs them with Triton compiled). Their CPU analogues run everywhere: parity with
transformers (test_model, test_generate), bfloat16 against float32 (test_precision), the
static decode path a graph replays (test_device), training steps (test_sft, test_pm,
test_ppo, test_dpo), traces (test_profiling).

Tolerances on CUDA: float32 logits within 1e-4 relative of transformers' (TF32 is off for
the float32 path); bfloat16 logits within 2e-2 relative (both sides round every op to 8 bits
of mantissa, in different orders and fused differently).
"""
import json
import math
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from cai.dpo import DPOConfig, train_dpo  # noqa: E402
from cai.pairs import read_pairs  # noqa: E402
from cai.pm import PMConfig, train_pm  # noqa: E402
from cai.ppo import PPOConfig, PPOTrainer  # noqa: E402
from cai.prompts import PromptRecord  # noqa: E402
from cai.sft import SFTConfig, train_sft  # noqa: E402
from device_guard import DeviceGuard  # noqa: E402
from engine import Engine, SamplingParams, lora, profiling  # noqa: E402
from engine.batch import pack  # noqa: E402
from engine.lora import LoraConfig  # noqa: E402
from engine.scoring import hidden_states  # noqa: E402
from engine.train import OptimConfig  # noqa: E402

PAIRS = Path(__file__).parent / "fixtures" / "prefs" / "pairs.jsonl"
FP32_RTOL, BF16_RTOL = 1e-4, 2e-2
OPTIM = OptimConfig(lr=5e-3, warmup_steps=0, schedule="constant")


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def hf(folder, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to("cuda").eval()


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, FP32_RTOL), (torch.bfloat16, BF16_RTOL)])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_logits_match_transformers_on_cuda(tiny_model_dir, family, dtype, rtol):
    folder = tiny_model_dir(family)
    eng = Engine.load(folder, device="cuda", dtype=dtype)
    assert eng.device.type == "cuda" and eng.dtype is dtype
    ref_model = hf(folder, dtype)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, eng.cfg.vocab_size, (n,), generator=g).tolist() for n in (1, 7, 33, 150)]
    b = pack(seqs, device=eng.device)
    with torch.no_grad():
        ours = eng.model.logits(hidden_states(eng.model, b)).split([len(s) for s in seqs])
        for o, s in zip(ours, seqs):
            ref = ref_model(torch.tensor([s], device="cuda")).logits[0]
            assert rel_err(o, ref) <= rtol


def test_auto_is_cuda_in_bfloat16(tiny_model_dir):
    eng = Engine.load(tiny_model_dir("llama"))
    assert eng.device.type == "cuda" and eng.dtype is torch.bfloat16


@pytest.mark.parametrize("graphs", [True, False])
def test_greedy_generation_matches_transformers_float32(tiny_model_dir, graphs):
    folder = tiny_model_dir("llama")
    eng = Engine.load(folder, device="cuda", dtype="float32", cuda_graphs=graphs)
    ref_model = hf(folder, torch.float32)
    prompts = [[{"role": "user", "content": t}] for t in ("How do I bake bread?", "A", "The quick brown fox " * 5)]
    params = SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True)
    outs = eng.generate(prompts, params, max_slots=2)  # refills: batch sizes 2 then 1
    assert (eng.static_decoder() is not None) == graphs
    for p, o in zip(prompts, outs):
        ids = eng.encode(p)
        ref = ref_model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=24, do_sample=False,
                                 pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long, device="cuda"))
        assert o.samples[0].token_ids == ref[0, len(ids):].tolist()


def test_graphs_and_eager_sample_the_same(tiny_model_dir):
    """Padded buckets, static buffers and the per-sample generators: the same draws."""
    folder = tiny_model_dir("llama")
    params = SamplingParams(max_new_tokens=16, n=3, top_p=0.9, seed=7)
    runs = [Engine.load(folder, device="cuda", dtype="float32", cuda_graphs=g).generate(["Hello", "Bake bread"], params)
            for g in (True, False)]
    for a, b in zip(*runs):
        assert [s.token_ids for s in a.samples] == [s.token_ids for s in b.samples]


def _falls(losses):
    return all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_sft_pm_ppo_dpo_steps_on_cuda(tiny_model_dir, tmp_path):
    eng = Engine.load(tiny_model_dir("llama"), device="cuda")
    small = dict(lora=LoraConfig(rank=4, alpha=8), optim=OPTIM, shuffle=False)
    convs = [[{"role": "user", "content": f"Tell me about bread {i}"},
              {"role": "assistant", "content": "Mix flour, water, yeast and salt, then bake."}] for i in range(4)]
    assert _falls(train_sft(eng, convs, SFTConfig(epochs=6, **small))["losses"])
    pairs = read_pairs(PAIRS)[:16]
    assert _falls(train_pm(eng, pairs, PMConfig(epochs=6, heldout_fraction=0.0, **small), tmp_path / "pm")["losses"])
    dpo = DPOConfig(epochs=6, beta=0.5, soft_labels=False, adapter="dpo", **{**small, "optim": OptimConfig(
        lr=1e-3, warmup_steps=0, schedule="constant")})
    assert _falls(train_dpo(eng, pairs, dpo, "sft")["losses"])

    class Score:
        def score(self, convs, responses):
            return torch.tensor([float(r.count("e")) for r in responses], device="cuda")

    ppo = PPOTrainer(eng, Score(), PPOConfig(prompts_per_iteration=4, max_new_tokens=12, lr=3e-3, minibatch_size=4,
                                             helpful_fraction=0.0))
    chosen, _ = ppo.prompts_for([PromptRecord(f"p{i}", f"Bread {i}?", None, "x", "train") for i in range(4)], [], 0)
    ro = ppo.experience(chosen, ppo.rollout(chosen, 0))
    assert _falls([ppo._minibatch_step(ro, [0, 1, 2, 3])["loss"] for _ in range(6)])
    assert lora.get_adapter(eng.model, "policy").layers[0]["qkv"].A.dtype is torch.float32


def test_device_guard_on_cuda(tiny_model_dir):
    eng = Engine.load(tiny_model_dir("llama"), device="cuda")
    with DeviceGuard(eng.device) as g:
        eng.generate(["Hello", "Bake"], SamplingParams(max_new_tokens=6, n=2, seed=0))
        train_sft(eng, [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]],
                  SFTConfig(max_steps=1, lora=LoraConfig(rank=2, alpha=4), optim=OPTIM))
    assert g.violations == [], "\n".join(sorted(set(g.violations)))


def test_profiler_trace_has_phase_names(tiny_model_dir, tmp_path):
    eng = Engine.load(tiny_model_dir("llama"), device="cuda")
    path = tmp_path / "trace.json"
    with profiling.Tracer(path, steps=6):
        eng.generate(["Hello", "Bake bread"], SamplingParams(max_new_tokens=8, temperature=0))
    doc = json.loads(path.read_text())
    names = {e.get("name") for e in (doc["traceEvents"] if isinstance(doc, dict) else doc)}
    assert {"engine.generate.prefill", "engine.generate.decode", "engine.generate.sample"} <= names
