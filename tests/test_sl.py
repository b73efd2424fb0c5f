"""SL-CAI loop: records, principle draws, batching, and resume after a kill."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cai.constitution import load_constitution
from cai.prompts import PromptRecord
from cai.records import ResumableJsonl
from cai.sft import read_sft_file, select_examples
from cai.sl import Round, SLConfig, SLRunner, draw_principles
from engine import InputError

REPO = Path(__file__).resolve().parent.parent
COLUMNS = ("init_prompt", "init_response", "critic_prompt", "critic_response", "revision_prompt",
           "revision_response", "messages", "chosen", "rejected")


def prompts(n: int) -> list[PromptRecord]:
    return [PromptRecord(id=f"p{i}", prompt=f"How do I bake bread number {i}?", messages=None,
                         category="test", split="train") for i in range(n)]


def small_cfg(**kw) -> SLConfig:
    return SLConfig(**{"rounds": 2, "max_new_tokens": 12, "chunk_size": 3, "max_slots": 4, "seed": 7,
                        "max_fewshot": 1, **kw})


def test_records_have_every_column_and_round(tiny_engine, tmp_path):
    con = load_constitution("default")
    runner = SLRunner(tiny_engine, con, small_cfg())
    with ResumableJsonl(tmp_path / "sl.jsonl", runner.meta()) as out:
        runner.run(prompts(5), out)
    recs = [json.loads(x) for x in (tmp_path / "sl.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recs] == [f"p{i}" for i in range(5)]
    ids = {p.id for p in con.critique_revision}
    for r in recs:
        assert all(c in r for c in COLUMNS)
        assert len(r["rounds"]) == 2 and len(r["principle_ids"]) == 2
        assert set(r["principle_ids"]) <= ids
        assert r["messages"][-1] == {"role": "assistant", "content": r["revision_response"]}
        assert r["rejected"][-1]["content"] == r["init_response"]
        assert r["revision_response"] == r["rounds"][-1]["revision"]
        assert r["critic_prompt"] == r["rounds"][-1]["critique_request"]
        assert r["seed"] == 7 and r["model"] == tiny_engine.source


def test_an_example_no_round_revised_is_flagged_and_kept_out_of_sft(tiny_engine, tmp_path):
    runner = SLRunner(tiny_engine, load_constitution("default"), small_cfg())
    p = prompts(1)[0]
    conv = [{"role": "user", "content": p.prompt}]
    kept = [Round("general_harm", "c", "k", "r", "Knead it.", ["kept_previous"]) for _ in range(2)]
    revised = [Round("general_harm", "c", "k", "r", "Knead it.", ["kept_previous"]),
               Round("general_harm", "c", "k", "r", "Knead, then bake it.", [])]
    records = [runner._record(p, conv, "Knead it.", kept), runner._record(p, conv, "Knead it.", revised)]
    assert "unrevised" in records[0]["flags"] and "unrevised" not in records[1]["flags"]
    f = tmp_path / "sl.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    kept_for_sft, skipped = select_examples(read_sft_file(f))
    assert skipped == 1 and [c.messages[-1]["content"] for c in kept_for_sft] == ["Knead, then bake it."]


def test_principles_drawn_per_round_and_seeded():
    con = load_constitution("default")
    a = [p.id for p in draw_principles(con, 0, "x", 40)]
    assert a == [p.id for p in draw_principles(con, 0, "x", 40)]
    assert len(set(a)) > 5  # drawn every round, not once per example
    assert a != [p.id for p in draw_principles(con, 1, "x", 40)]
    assert a[:4] == [p.id for p in draw_principles(con, 0, "x", 4)]


def test_chunking_does_not_change_records(tiny_engine, tmp_path):
    con = load_constitution("default")
    outs = []
    for chunk in (2, 5):
        runner = SLRunner(tiny_engine, con, small_cfg(chunk_size=chunk, temperature=0.0))
        path = tmp_path / f"c{chunk}.jsonl"
        with ResumableJsonl(path, runner.meta()) as out:
            runner.run(prompts(5), out)
        outs.append([json.loads(x)["rounds"] for x in path.read_text().splitlines()])
    assert outs[0] == outs[1]


def test_resume_refuses_other_settings(tiny_engine, tmp_path):
    con = load_constitution("default")
    runner = SLRunner(tiny_engine, con, small_cfg())
    with ResumableJsonl(tmp_path / "sl.jsonl", runner.meta()) as out:
        runner.run(prompts(1), out)
    other = SLRunner(tiny_engine, con, small_cfg(seed=8))
    with pytest.raises(InputError, match="seed"):
        ResumableJsonl(tmp_path / "sl.jsonl", other.meta())


def test_partial_last_line_is_dropped_on_resume(tmp_path):
    path = tmp_path / "r.jsonl"
    with ResumableJsonl(path, {"a": 1}) as out:
        out.append([{"id": "a"}, {"id": "b"}])
    with open(path, "a") as f:
        f.write('{"id": "c", "trunc')
    with ResumableJsonl(path, {"a": 1}) as out:
        assert out.done == {"a", "b"}
        out.append([{"id": "b"}, {"id": "c"}])
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == ["a", "b", "c"]


def _cli(model_dir, out, n):
    data = out.parent / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Tell me about bread {i}"}) + "\n"
                            for i in range(n)))
    return [sys.executable, "-m", "cai.cli", "sl", "--model", str(model_dir), "--prompts", str(data),
            "--out", str(out), "--rounds", "2", "--max-new-tokens", "12", "--chunk-size", "2",
            "--max-slots", "2", "--seed", "3", "--max-fewshot", "1"]


def test_kill_and_resume_loses_and_duplicates_nothing(tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    full = tmp_path / "full" / "sl.jsonl"
    full.parent.mkdir()
    subprocess.run(_cli(model, full, 8), check=True, env=env, capture_output=True, cwd=REPO)
    cut = tmp_path / "cut" / "sl.jsonl"
    cut.parent.mkdir()
    proc = subprocess.Popen(_cli(model, cut, 8), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.time() + 120
    while time.time() < deadline and (not cut.exists() or len(cut.read_text().splitlines()) < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(cut.read_text().splitlines())
    assert 2 <= written < 8, "the kill should land mid-run"
    subprocess.run(_cli(model, cut, 8), check=True, env=env, capture_output=True, cwd=REPO)
    a = [json.loads(x) for x in full.read_text().splitlines()]
    b = [json.loads(x) for x in cut.read_text().splitlines()]
    assert sorted(r["id"] for r in b) == sorted(r["id"] for r in a) == [f"q{i}" for i in range(8)]
    # same chunks, same seeds: the resumed file holds the very same records
    assert sorted(b, key=lambda r: r["id"]) == sorted(a, key=lambda r: r["id"])
