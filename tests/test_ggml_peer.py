"""The float32 GGUF that llama.cpp runs beside the engine (bench/ggml_peer.py): the same
metadata as its source, every tensor the source's dequantised values, and, for the shipped
default model, exactly the weights the engine loads. None of this needs llama.cpp; the last
test runs llama.cpp itself through bench.generate where llama-cpp-python is installed."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from bench.ggml_peer import ALL_F32, f32_gguf, gguf_source, gguf_tensor_bytes, importable, peer_state

Q = gguf.GGMLQuantizationType
V = gguf.GGUFValueType


def _fields(path) -> dict:
    r = gguf.GGUFReader(str(path))
    return {k: ([t for t in f.types], f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}


def _write_synthetic(path, rng) -> dict:
    """A small llama GGUF with quantised, half and float tensors and metadata of every kind
    the shipped model uses; returns name -> (stored type, stored data)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 1)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "b", "ab"])
    w.add_key_value("tokenizer.ggml.token_type", [3, 1, 1, 1], V.ARRAY, sub_type=V.INT32)
    w.add_file_type(3)  # mostly Q4_1, as the shipped file says
    w.add_quantization_version(2)
    stored = {}
    for name, qtype, shape in [("token_embd.weight", Q.Q8_0, (4, 64)), ("blk.0.attn_q.weight", Q.Q4_1, (64, 64)),
                               ("blk.0.ffn_down.weight", Q.F16, (64, 32)), ("blk.0.attn_norm.weight", Q.F32, (64,))]:
        data = gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), qtype)
        w.add_tensor(name, data, raw_dtype=qtype if qtype in (Q.Q8_0, Q.Q4_1) else None)
        stored[name] = (qtype, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def test_f32_gguf_keeps_metadata_and_dequantised_values(tmp_path):
    src = tmp_path / "tiny.Q4_1.gguf"
    stored = _write_synthetic(src, np.random.default_rng(0))
    out = f32_gguf(src, tmp_path / "cache")
    assert out.parent == tmp_path / "cache" and out.name.endswith(".F32.gguf")

    before, after = _fields(src), _fields(out)
    assert after.pop("general.file_type") == ([V.UINT32], ALL_F32)
    assert before.pop("general.file_type")[1] == 3
    assert before.pop("general.quantization_version")[1] == 2 and "general.quantization_version" not in after
    assert after == before  # every other key, with its type and value (architecture and tokenizer included)

    r = gguf.GGUFReader(str(out))
    assert [t.name for t in r.tensors] == list(stored)
    for t in r.tensors:
        qtype, data = stored[t.name]
        want = gguf.quants.dequantize(data, qtype)
        assert t.tensor_type == Q.F32 and t.data.dtype == np.float32
        assert t.data.shape == want.shape
        np.testing.assert_array_equal(t.data, want)
    assert gguf_tensor_bytes(out) == sum(4 * gguf.quants.dequantize(d, q).size for q, d in stored.values())
    assert gguf_tensor_bytes(src) < gguf_tensor_bytes(out)  # the source's quantised bytes, as stored

    # Cached by content: the same source is not rewritten; a changed one gets its own file.
    mtime = out.stat().st_mtime_ns
    assert f32_gguf(src, tmp_path / "cache") == out and out.stat().st_mtime_ns == mtime
    _write_synthetic(src, np.random.default_rng(1))
    other = f32_gguf(src, tmp_path / "cache")
    assert other != out and other.is_file() and out.is_file()
    assert not list((tmp_path / "cache").glob(".*.tmp"))


def test_f32_gguf_refuses_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        f32_gguf(tmp_path / "nope.gguf", tmp_path)


def test_peer_state_says_why_llama_cpp_does_not_run(tmp_path):
    src = tmp_path / "m.gguf"
    assert "not importable" in peer_state(src, [1], "cpu", module="no_such_module_here")
    if importable():
        assert peer_state(src, [1], "cpu") is None
        assert "GGUF" in peer_state(None, [1], "cpu")
        assert "batch 1" in peer_state(src, [8], "cpu")
        assert "CPU" in peer_state(src, [1], "cuda")
    assert gguf_source("dummy:tiny") is None and gguf_source(str(src)) == src
    assert gguf_source("default").suffix == ".gguf"


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """GGUF's llama rows of q or k -> transformers': GGUF stores each head's rotary pairs
    interleaved (rows 2i, 2i+1 are a pair), transformers as two halves."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def test_f32_gguf_of_the_shipped_model_is_the_engines_weights(default_engine, tmp_path):
    from engine.loader import default_gguf_path, to_hf_state_dict

    out = f32_gguf(default_gguf_path(), tmp_path)
    cfg = default_engine.cfg
    r = gguf.GGUFReader(str(out))
    meta = {k: f.contents() for k, f in r.fields.items()}
    assert meta["general.architecture"] == "llama"
    assert (meta["llama.block_count"], meta["llama.embedding_length"], meta["llama.feed_forward_length"],
            meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (
        cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
        cfg.num_key_value_heads)
    assert len(meta["tokenizer.ggml.tokens"]) == len(default_engine.tokenizer)

    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    per_layer = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    ours = to_hf_state_dict(default_engine.model)
    seen = set()
    for t in r.tensors:
        assert t.tensor_type == Q.F32
        stem = t.name.removesuffix(".weight")
        if stem.startswith("blk."):
            _, i, part = stem.split(".")
            key = f"model.layers.{i}.{per_layer[part]}.weight"
        else:
            key = names[stem] + ".weight"
        data = np.array(t.data)
        if stem.endswith("attn_q"):
            data = _unpermute(data, cfg.num_attention_heads)
        elif stem.endswith("attn_k"):
            data = _unpermute(data, cfg.num_key_value_heads)
        assert torch.equal(torch.from_numpy(data), ours[key].float()), key  # bit for bit
        seen.add(key)
    assert seen == set(ours)  # every engine weight, nothing left over
    assert gguf_tensor_bytes(out) == sum(v.numel() * 4 for v in ours.values())


@pytest.mark.skipif(not importable(), reason="llama-cpp-python is an optional peer, not installed here "
                    "(the README's benchmark section says how to build it)")
def test_bench_generate_times_llama_cpp_beside_the_engine():
    from bench.generate import main

    out = main(["--batch-sizes", "1", "--new-tokens", "4", "--rollout-weights", "none"])
    llama = out["llama_cpp"]
    assert isinstance(llama, dict), llama
    (f32_name, f32), (shipped_name, shipped) = llama.items()
    assert f32_name.startswith("f32 ") and shipped_name.startswith("shipped ")
    for row in (f32, shipped):
        assert row["tok_s"] > 0 and row["engine_ratio"] > 0 and row["achieved_gbs"] > 0
    assert f32["agreement"] == 1.0  # the same float32 weights: the same greedy tokens
