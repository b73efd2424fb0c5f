"""Profiling: the Chrome trace of --profile holds the phase names users look for in Nsight."""
import json

from cai.cli import main


def trace_names(path) -> set[str]:
    doc = json.loads(path.read_text())
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    return {e.get("name") for e in events}


def test_generate_trace_has_engine_phases(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"prompt": "bread"}\n')
    trace = tmp_path / "gen.trace.json"
    rc = main(["generate", "--model", str(tiny_model_dir("llama")), "--prompts", str(prompts),
               "--out", str(tmp_path / "o.jsonl"), "--max-new-tokens", "12", "--profile", str(trace),
               "--profile-steps", "4"])
    assert rc == 0
    names = trace_names(trace)
    assert {"engine.generate.prefill", "engine.generate.decode", "engine.generate.sample"} <= names


def test_sl_trace_has_stage_phases(tiny_model_dir, tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text('{"id": "a", "prompt": "How do I bake bread?"}\n')
    trace = tmp_path / "sl.trace.json"
    rc = main(["sl", "--model", str(tiny_model_dir("llama")), "--prompts", str(data), "--out",
               str(tmp_path / "sl.jsonl"), "--rounds", "1", "--max-new-tokens", "6", "--max-fewshot", "0",
               "--profile", str(trace), "--profile-steps", "1000"])
    assert rc == 0
    assert {"cai.sl.answer", "cai.sl.critique", "cai.sl.revision", "engine.generate.decode"} <= trace_names(trace)
