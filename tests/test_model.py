"""The decoder against transformers: logits for each family and for the default model,
and the loader's errors."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from engine import Engine, InputError
from engine.model import Packed, packed_metadata


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def packed_logits(eng: Engine, seqs: list[list[int]]) -> list[torch.Tensor]:
    positions, cu, max_len = packed_metadata([len(s) for s in seqs])
    tokens = torch.tensor([t for s in seqs for t in s])
    with torch.no_grad():
        logits = eng.model.logits(eng.model(tokens, positions, Packed(cu, max_len)))
    return list(logits.split([len(s) for s in seqs]))


def hf_logits(folder, seqs):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return [hf(torch.tensor([s])).logits[0] for s in seqs]


@pytest.mark.parametrize("family", ["llama", "llama3", "qwen2", "mistral"])
def test_packed_logits_match_transformers(tiny_model_dir, family):
    folder = tiny_model_dir(family)
    eng = Engine.load(folder)
    g = torch.Generator().manual_seed(1)
    # odd lengths, a length-1 sequence, and one past llama3's original context (64)
    seqs = [torch.randint(0, eng.cfg.vocab_size, (n,), generator=g).tolist() for n in (1, 7, 33, 150)]
    for ours, ref in zip(packed_logits(eng, seqs), hf_logits(folder, seqs)):
        assert ours.shape == ref.shape
        assert rel_err(ours, ref) <= 1e-4


def test_family_switches_are_read(tiny_model_dir):
    assert Engine.load(tiny_model_dir("qwen2")).cfg.attention_bias
    assert Engine.load(tiny_model_dir("qwen2")).model.lm_head is not None
    assert Engine.load(tiny_model_dir("llama")).model.lm_head is None
    assert Engine.load(tiny_model_dir("llama3")).cfg.rope_scaling["rope_type"] == "llama3"


def test_default_model_logits_match_transformers(default_engine):
    folder = default_engine.source
    ids = default_engine.encode([{"role": "user", "content": "Name three primary colours."}])
    seqs = [ids, ids[:5] + [42, 4242, 17]]
    for ours, ref in zip(packed_logits(default_engine, seqs), hf_logits(folder, seqs)):
        assert rel_err(ours, ref) <= 1e-4


def test_gguf_file_loads_directly(default_engine):
    from engine.loader import default_gguf_path

    eng = Engine.load(default_gguf_path())
    ids = default_engine.encode("Hello, my name is")
    ours, ref = packed_logits(eng, [ids])[0], packed_logits(default_engine, [ids])[0]
    assert rel_err(ours, ref) <= 1e-6  # the same dequantised weights, read two ways
    assert eng.tokenizer("Hello")["input_ids"] == default_engine.tokenizer("Hello")["input_ids"]


def test_second_default_load_reads_the_cache_not_the_gguf(default_engine, monkeypatch):
    from engine import loader

    def no_gguf(path):
        raise AssertionError(f"the GGUF file was read again: {path}")

    monkeypatch.setattr(loader, "_read_gguf", no_gguf)
    again = Engine.load("default")
    assert again.source == default_engine.source
    assert (Path(again.source) / "model.safetensors").is_file()


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="no such folder or file"):
        Engine.load(tmp_path / "nope")
    with pytest.raises(InputError, match="no config.json"):
        Engine.load(tmp_path)


def test_unsupported_architecture_is_named(tiny_model_dir, tmp_path):
    folder = tmp_path / "gpt"
    shutil.copytree(tiny_model_dir("llama"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"config.json: unsupported architecture model_type='gpt2'"):
        Engine.load(folder)


def test_truncated_safetensors_is_a_clear_error(tiny_model_dir, tmp_path):
    folder = tmp_path / "cut"
    shutil.copytree(tiny_model_dir("llama"), folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"model.safetensors: unreadable safetensors file"):
        Engine.load(folder)


def test_missing_weight_is_named(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial"
    shutil.copytree(tiny_model_dir("llama"), folder)
    sd = load_file(str(folder / "model.safetensors"))
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(InputError, match="model.layers.1.mlp.down_proj.weight"):
        Engine.load(folder)
