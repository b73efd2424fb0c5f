"""Device placement: resolving --device/--dtype, streaming weights onto the device, every
tensor the engine and the stages create on the model's device (under a guard that catches
a forgotten ``device=`` even on a CPU-only machine), the static decode path CUDA graphs
replay, and scripts/gpu_check.sh refusing to run without CUDA."""
import gc
import os
import subprocess
import weakref
from pathlib import Path

import pytest
import torch

from cai.dpo import DPOConfig, train_dpo
from cai.label import LabelConfig, Labeller
from cai.constitution import load_constitution
from cai.pairs import read_pairs
from cai.pm import PMConfig, load_reward_model, train_pm
from cai.ppo import PPOConfig, PPOTrainer
from cai.prompts import PromptRecord
from cai.sft import SFTConfig, train_sft
from device_guard import DeviceGuard
from engine import Engine, InputError, SamplingParams, loader
from engine.batch import pack
from engine.device import resolve_device, resolve_dtype
from engine.generate import Generator
from engine.graphs import StaticDecoder, bucket_for
from engine.lora import LoraConfig
from engine.options import option_logprobs
from engine.scoring import ScalarHead
from engine.train import OptimConfig

REPO = Path(__file__).resolve().parent.parent
PAIRS = Path(__file__).parent / "fixtures" / "prefs" / "pairs.jsonl"
SMALL = dict(lora=LoraConfig(rank=2, alpha=4), optim=OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"))


# ---- --device / --dtype -------------------------------------------------------------------

def test_auto_device_and_dtype_on_this_machine():
    assert resolve_device("auto") == torch.device("cpu") == resolve_device(None)
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) is torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) is torch.float16
    assert resolve_dtype(torch.float32, torch.device("cpu")) is torch.float32
    assert resolve_device(torch.device("cpu")) == resolve_device("CPU") == torch.device("cpu")


@pytest.mark.parametrize("spec, message", [("gpu", "expected auto, cpu, cuda"), ("mps", "only cpu and cuda"),
                                           ("cuda:0", "no CUDA device is available")])
def test_bad_devices_are_named(spec, message):
    if torch.cuda.is_available() and spec.startswith("cuda"):
        pytest.skip("this machine has CUDA")  # the CPU machines this suite runs on have none
    with pytest.raises(InputError, match=message):
        resolve_device(spec)


@pytest.mark.parametrize("spec", ["float64", "int8", torch.float64, "fp8"])
def test_bad_dtypes_are_named(spec):
    with pytest.raises(InputError, match="dtype"):
        resolve_dtype(spec, torch.device("cpu"))


def test_engine_load_takes_device_and_dtype(tiny_model_dir):
    eng = Engine.load(tiny_model_dir("llama"), device="cpu", dtype="bfloat16")
    assert eng.device == torch.device("cpu") and eng.dtype is torch.bfloat16
    assert all(p.dtype is torch.bfloat16 for p in eng.model.parameters())
    assert eng.model.inv_freq.dtype is torch.float32  # RoPE frequencies are never rounded to bf16
    with pytest.raises(InputError, match="dtype 'int4'"):
        Engine.load(tiny_model_dir("llama"), device="cpu", dtype="int4")
    assert eng.static_decoder() is None  # CUDA graphs only where the model is on CUDA


def test_loader_streams_one_tensor_at_a_time(tiny_model_dir):
    """The loader reads each checkpoint tensor, copies it into its parameter and lets it go:
    host memory holds one tensor, never a second copy of the model."""
    folder = tiny_model_dir("qwen2")  # fused qkv with biases, untied lm_head
    alive, most = [], 0

    def tracked():
        nonlocal most
        for name, read in loader.iter_safetensors(folder):
            def read_one(read=read):
                nonlocal most
                gc.collect()
                most = max(most, sum(r() is not None for r in alive))
                t = read()
                alive.append(weakref.ref(t))
                return t
            yield name, read_one

    cfg = loader.ModelConfig.from_hf(__import__("json").loads((folder / "config.json").read_text()))
    model = loader._build(cfg, tracked(), torch.float32, torch.device("cpu"), str(folder))
    # at most the tensor just copied is still referenced when the next one is read
    assert len(alive) > 10 and most <= 1, f"{most} earlier checkpoint tensors still held while reading the next"
    ref, _ = loader.load_folder(folder)
    for (name, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), name


def test_missing_weight_is_named(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny_model_dir("llama")
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InputError, match="model.layers.1.mlp.up_proj.weight"):
        Engine.load(tmp_path, device="cpu")


# ---- the guard ------------------------------------------------------------------------------

def test_guard_catches_a_forgotten_device(tiny_engine):
    """What the guard exists for: on the CPU the tensor lands where the model is, yet the
    call that named no device is reported, with its file and line."""
    with DeviceGuard(tiny_engine.device) as g:
        pack([[1, 2, 3]])  # no device=: the engine's pack passes device=None through
        ScalarHead(8)
        pack([[1, 2, 3]], device=tiny_engine.device)
    assert any(v.startswith("engine/batch.py") and "torch.tensor without device=" in v for v in g.violations)
    assert any(v.startswith("engine/scoring.py") and "torch.empty without device=" in v for v in g.violations)
    with DeviceGuard(tiny_engine.device) as g:
        pack([[1, 2, 3]], device=tiny_engine.device)
        ScalarHead(8, device=tiny_engine.device)
    assert g.violations == []


def _prompts(n):
    return [PromptRecord(f"p{i}", f"Tell me about bread {i}", None, "x", "train") for i in range(n)]


def test_every_stage_creates_its_tensors_on_the_models_device(tiny_model_dir, tmp_path):
    """Generate, score options, label, an SFT step, a PM step, a PPO iteration and a DPO step
    of a tiny model, all under the guard."""
    eng = Engine.load(tiny_model_dir("llama"), device="cpu")
    tok, pairs = eng.tokenizer, read_pairs(PAIRS)[:4]
    few_shot = " ".join(["Which response is less harmful, the first or the second one?"] * 3)
    with DeviceGuard(eng.device) as g:
        eng.generate(["Hello", "Bake bread"], SamplingParams(max_new_tokens=4, n=2, top_p=0.9, top_k=20, seed=1))
        eng.generate(["Hello"], SamplingParams(max_new_tokens=3, temperature=0))
        prompts = [tok(few_shot + f" Question {i}:")["input_ids"] for i in range(2)]  # shared prefix: Extend path
        option_logprobs(eng.model, prompts, [[tok(" (A)")["input_ids"], tok(" (B)")["input_ids"]]] * 2)
        option_logprobs(eng.model, [[5, 6, 7], [8, 9]], [[[1], [2, 3]], [[4]]])  # packed path
        lab = Labeller(eng, load_constitution("default"), LabelConfig(max_new_tokens=4, principles_per_pair=1,
                                                                      max_fewshot=0))
        lab.label_chunk(_prompts(1))
        train_sft(eng, [[{"role": "user", "content": p.prompt}, {"role": "assistant", "content": "Knead it."}]
                        for p in _prompts(2)], SFTConfig(max_steps=1, shuffle=False, **SMALL))
        train_pm(eng, pairs, PMConfig(max_steps=1, heldout_fraction=0.25, shuffle=False, **SMALL), tmp_path / "pm")
        rm = load_reward_model(eng, tmp_path / "pm" / "reward")
        ppo = PPOTrainer(eng, rm, PPOConfig(prompts_per_iteration=2, max_new_tokens=4, ppo_epochs=1, minibatch_size=2))
        ppo.iterate(_prompts(2))
        train_dpo(eng, pairs, DPOConfig(max_steps=1, shuffle=False, adapter="dpo", **SMALL), "sft")
    assert g.violations == [], "\n".join(sorted(set(g.violations)))


# ---- static decode: what a CUDA graph replays, run eagerly ----------------------------------

def test_buckets():
    assert [bucket_for(b) for b in (1, 2, 3, 4, 5, 8, 9, 31, 32, 33)] == [1, 2, 4, 4, 8, 8, 16, 32, 32, 64]
    with pytest.raises(ValueError):
        bucket_for(0)


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=7, temperature=0),
                                    SamplingParams(max_new_tokens=6, n=3, top_p=0.9, seed=3)])
def test_static_decode_generates_what_eager_decode_does(tiny_engine, params):
    """Static cache (rounded up, full-length attention masked by lengths), padded buckets
    and fixed buffers: the same tokens and log-probs as the eager loop, as samples finish and
    slots are compacted and refilled."""
    prompts = [tiny_engine.encode(p) for p in ("Hello there", "Bake", "The quick brown fox jumps", "A")]
    eager = Generator(tiny_engine.model, tiny_engine.tokenizer, 5).run(prompts, params)
    static = StaticDecoder(tiny_engine.model, capture=False)
    again = Generator(tiny_engine.model, tiny_engine.tokenizer, 5, static=static).run(prompts, params)
    assert static.cache.num_slots == bucket_for(min(5, 4 * params.n)) and static.cache.max_len % 256 == 0
    for a, b in zip(eager, again):
        for x, y in zip(a.samples, b.samples):
            assert x.token_ids == y.token_ids
            assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)


def test_static_cache_is_kept_while_big_enough(tiny_engine):
    static = StaticDecoder(tiny_engine.model, capture=False)
    first = static.prepare(3, 40)
    assert static.prepare(4, 200) is first and static.prepare(1, 10) is first
    bigger = static.prepare(5, 300)
    assert bigger is not first and bigger.num_slots == 8 and bigger.max_len == 512


# ---- scripts/gpu_check.sh -------------------------------------------------------------------

@pytest.mark.parametrize("python", ["venv", "default"])
def test_gpu_check_stops_without_cuda(tmp_path, python):
    """With this suite's Python, or with whatever python3 the machine has (maybe no torch)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: gpu_check would run for minutes")
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    if python == "venv":
        env["PYTHON"] = str(Path(os.sys.executable))
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(tmp_path / "out")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "no CUDA device" in proc.stderr
    assert not (tmp_path / "out" / "summary.json").exists()


def test_packaging_keeps_a_users_torch_and_the_readme_documents_the_gpu_path():
    setup, env = (REPO / "setup.py").read_text(), (REPO / "scripts" / "env.sh").read_text()
    assert "torch==" not in setup and '"torch>=2.4"' in setup  # installing into a CUDA env keeps its torch
    pin, editable = env.index("install -q torch==2.13.0"), env.index('install -q -e ".[dev]"')
    assert pin < editable  # the local CPU build is installed first, so the range is already met
    readme = (REPO / "README.md").read_text()
    gpu = readme[readme.index("## On a GPU"):readme.index("## Benchmarks")]
    for text in ("--device", "--dtype", "--no-cuda-graphs", "device:", "dtype:", "nsys profile",
                 "engine.generate.decode", "dummy:llama-1b", "scripts/gpu_check.sh", "No GPU figures"):
        assert text in gpu, text
