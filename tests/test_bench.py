"""Every benchmark runs end to end at its tiny size, with its peers, and prints its JSON line;
and the random-weight models they measure where no weights are on disk are what they claim.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_bench(name: str, *flags: str) -> dict:
    """``python -m bench.<name> ...`` in a fresh process; its last stdout line, parsed."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", f"bench.{name}", *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    out = json.loads(last)
    assert isinstance(out, dict)
    return out


def _positive(*xs):
    for x in xs:
        assert isinstance(x, (int, float)) and math.isfinite(x) and x > 0, x


# ------------------------------------------------------------------------------------------
# The benchmarks, tiny
# ------------------------------------------------------------------------------------------
def test_generate_tiny_cpu():
    out = run_bench("generate", "--tiny", "--device", "cpu")
    assert out["model"] == "dummy:tiny" and out["device"] == "cpu" and out["dtype"] == "float32"
    assert set(out["batch"]) == {"1", "2"}
    for row in out["batch"].values():
        _positive(row["engine_tok_s"], row["hf_tok_s"], row["engine"]["achieved_gbs"], row["hf"]["achieved_tflops"])
    assert out["greedy_match"] is True  # same random weights on both sides: the same greedy tokens
    _positive(out["floor_tok_s_b1"], out["bandwidth_gbs"])
    assert out["peak"] is None  # no data-sheet peak on the CPU: measured rates instead


def test_kernels_tiny_cpu():
    from bench.kernels import IMPLS

    out = run_bench("kernels", "--tiny", "--device", "cpu", "--model", "dummy:tiny")
    assert out["meta"]["device"] == "cpu" and out["meta"]["heads"] == [4, 2, 16]
    for op, impls in IMPLS.items():
        (entry,) = out[op].values()
        _positive(entry["time_ms"], entry["floor_ms"])
        for impl in impls[1:]:  # every peer, TRL's log-prob helper included
            _positive(entry[f"{impl}_time_ms"])


def test_sl_tiny():
    out = run_bench("sl", "--tiny")
    assert out["model"] == "dummy:tiny"
    _positive(out["sl_examples_per_min"], out["sl_hf_examples_per_min"], out["sft_step_s"], out["trl_sft_step_s"])
    assert out["sft_tokens_per_step"] == out["trl_sft_tokens_per_step"]  # both sides train on the same tokens


def test_rl_tiny_cpu():
    out = run_bench("rl", "--tiny", "--device", "cpu")
    assert out["model"] == "dummy:tiny"
    _positive(out["ppo_iter_s"], out["trl_ppo_iter_s"], out["dpo_step_s"], out["trl_dpo_step_s"],
              out["dpo_cpu_s"], out["dpo_reference_pass_s"], out["label_cmp_per_s"], out["hf_label_cmp_per_s"],
              out["dpo_train_rate"]["tflops"])
    assert out["label_max_abs_logprob_diff"] < 1e-3  # the peer scores the same weights


# ------------------------------------------------------------------------------------------
# Random-weight models and the peers built from them
# ------------------------------------------------------------------------------------------
def n_params(cfg) -> int:
    """Parameters of a Llama-family config, counted from its dimensions."""
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    attn = h * cfg.qkv_size + cfg.num_attention_heads * cfg.head_dim * h
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
    return cfg.vocab_size * h + head + L * (attn + 3 * h * i + 2 * h) + h


@pytest.mark.parametrize("shape,billions", [("smollm2-135m", 0.1345), ("llama-1b", 1.236), ("llama-8b", 8.030)])
def test_dummy_shapes_have_the_published_sizes(shape, billions):
    from engine import dummy

    cfg = dummy.model_config(f"dummy:{shape}")
    assert n_params(cfg) / 1e9 == pytest.approx(billions, rel=2e-3)


def test_dummy_tiny_is_seeded_on_the_requested_dtype_and_generates():
    from engine import Engine, SamplingParams, dummy

    a, tok, src = dummy.load("dummy:tiny")
    b, _, _ = dummy.load("dummy:tiny")
    c, _, _ = dummy.load("dummy:tiny", seed=1)
    assert src == "dummy:tiny" and a.cfg.vocab_size == len(tok)
    assert torch.equal(a.layers[0].attn.qkv.weight, b.layers[0].attn.qkv.weight)
    assert not torch.equal(a.layers[0].attn.qkv.weight, c.layers[0].attn.qkv.weight)
    assert n_params(a.cfg) == sum(p.numel() for p in a.parameters())
    bf, _, _ = dummy.load("dummy:tiny", dtype=torch.bfloat16)
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16}
    eng = Engine.load("dummy:tiny")  # dispatched by the loader
    out = eng.generate([[{"role": "user", "content": "hi"}]], SamplingParams(max_new_tokens=3, temperature=0,
                                                                           ignore_eos=True))
    assert len(out[0].samples[0].token_ids) == 3


def test_config_json_loads_with_the_tokenizer_beside_it(tiny_model_dir):
    from engine import Engine

    folder = tiny_model_dir("qwen2")
    eng = Engine.load(str(folder / "config.json"))
    assert eng.cfg.attention_bias and eng.cfg.vocab_size == len(eng.tokenizer)
    assert eng.model.layers[0].attn.qkv.bias is not None


def test_bad_dummy_specs_are_input_errors(tmp_path):
    from engine import Engine
    from engine.errors import InputError

    with pytest.raises(InputError, match="unknown dummy shape"):
        Engine.load("dummy:gpt-5")
    with pytest.raises(InputError, match="not found"):
        Engine.load(str(tmp_path / "missing.json"))
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not a valid JSON config"):
        Engine.load(str(bad))


def test_hf_peer_shares_the_dummy_weights_and_logits():
    from bench.peers import hf_causal_lm
    from engine import Engine
    from engine.model import Packed, packed_metadata

    eng = Engine.load("dummy:tiny")
    hf = hf_causal_lm(eng)
    ids = eng.encode("Hello there")
    pos, cu, mx = packed_metadata([len(ids)])
    with torch.inference_mode():
        ours = eng.model.logits(eng.model(torch.tensor(ids), pos, Packed(cu, mx)))
        theirs = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_device_peaks_by_name():
    from bench import device as dev

    assert dev.peaks(torch.device("cpu")) is None
    assert dev.achieved(2e9, 1e12, 1.0, None, torch.float32) == {"achieved_gbs": 2.0, "achieved_tflops": 1.0}
    h200 = {"name": "NVIDIA H200", "bandwidth_gbs": 4800.0, "tflops": 989.0}
    got = dev.achieved(4.8e12, 98.9e12, 2.0, h200, torch.bfloat16)
    assert got["bandwidth_fraction"] == 0.5 and got["flops_fraction"] == 0.05
    assert "flops_fraction" not in dev.achieved(1, 1, 1.0, h200, torch.float32)  # the peak is bfloat16's


def test_scale_tiny_cpu():
    """Every layout runs the same work (1 process x 1 and x 2 threads, 2 torchrun processes x
    1 thread) and the efficiency and scaling are the ratios of their figures."""
    out = run_bench("scale", "--tiny")
    one, two = out["layouts"]["1 proc x 2 threads"], out["layouts"]["2 procs x 1 thread"]
    assert (one["world"], one["threads"], two["world"], two["threads"]) == (1, 2, 2, 1)
    for row in (one, two):
        _positive(row["generate_tok_s"], row["sft_step_s"], row["ppo_iteration_s"])
    single = out["layouts"]["1 proc x 1 thread"]
    assert (single["world"], single["threads"]) == (1, 1)
    assert out["scaling"]["sft"] == pytest.approx(single["sft_step_s"] / two["sft_step_s"] / 2)
    eff = out["efficiency"]
    assert eff["generate"] == pytest.approx(two["generate_tok_s"] / one["generate_tok_s"])
    assert eff["sft"] == pytest.approx(one["sft_step_s"] / two["sft_step_s"])
    assert eff["ppo"] == pytest.approx(one["ppo_iteration_s"] / two["ppo_iteration_s"])
    assert len(out["loadavg"]) == 3
