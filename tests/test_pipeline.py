"""cai run: config loading (bad keys named with their file), and a whole tiny run that is
killed twice (mid SL-CAI, mid labelling) and finishes with the same records as an
uninterrupted one."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cai.config import parse_set
from cai.pipeline import RunConfig, load_run_config
from engine import InputError

REPO = Path(__file__).resolve().parent.parent

TINY = """\
model: {model}
sl_prompts: 6
helpful_samples: 2
label_prompts: 6
label_helpful_prompts: 2
sl: {{rounds: 1, max_new_tokens: 8, chunk_size: 2, max_fewshot: 0}}
sft: {{epochs: 1, max_tokens_per_batch: 4096}}
label: {{principles_per_pair: 1, max_new_tokens: 8, chunk_size: 2, max_fewshot: 0}}
pm: {{epochs: 1}}
ppo: {{iterations: 2, prompts_per_iteration: 2, max_new_tokens: 8, minibatch_size: 2}}
eval: {{limit: 3, max_new_tokens: 8, principles_per_comparison: 1, max_fewshot: 0}}
"""


def test_presets_load_and_overrides_apply():
    cfg, _ = load_run_config(None, "demo", parse_set(["sl.rounds=3", "rl=dpo", "ppo.kl_coef=0.1"]))
    assert isinstance(cfg, RunConfig)
    assert (cfg.sl.rounds, cfg.rl, cfg.ppo.kl_coef) == (3, "dpo", 0.1)
    assert cfg.sft.optim.lr == pytest.approx(3e-4)  # nested sections of nested sections
    paper, _ = load_run_config(None, "paper", {})
    assert paper.sl.rounds == 4


def test_bad_key_names_the_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sl:\n  roundz: 2\n")
    with pytest.raises(InputError, match=r"bad.yaml: unknown key 'sl.roundz'"):
        load_run_config(str(bad), None, {})
    bad.write_text("sft:\n  optim:\n    learning_rate: 1\n")
    with pytest.raises(InputError, match=r"bad.yaml: unknown key 'sft.optim.learning_rate'"):
        load_run_config(str(bad), None, {})
    bad.write_text("rl: sarsa\n")
    with pytest.raises(InputError, match="bad.yaml: rl: must be one of 'ppo', 'dpo', got 'sarsa'"):
        load_run_config(str(bad), None, {})
    with pytest.raises(InputError, match="no preset 'nope'"):
        load_run_config(None, "nope", {})
    with pytest.raises(InputError, match="KEY=VALUE"):
        parse_set(["sl.rounds"])


def _run(cfg_path: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "cai.cli", "run", "--config", str(cfg_path), "--out", str(out)]


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _kill_when(cmd, env, ready) -> None:
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not ready() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_killed_run_resumes_to_the_same_records(tiny_model_dir, tmp_path):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(TINY.format(model=tiny_model_dir("llama")))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(_run(cfg_path, full), env=env, cwd=REPO, check=True, capture_output=True)

    _kill_when(_run(cfg_path, cut), env, lambda: _lines(cut / "sl.jsonl") >= 2)
    assert 2 <= _lines(cut / "sl.jsonl") < 6, "killed in the middle of SL-CAI"
    _kill_when(_run(cfg_path, cut), env, lambda: _lines(cut / "labels.jsonl") >= 2)
    assert _lines(cut / "labels.jsonl") < 8, "killed in the middle of labelling"
    done = subprocess.run(_run(cfg_path, cut), env=env, cwd=REPO, check=True, capture_output=True, text=True)
    assert "done earlier" in done.stdout  # finished stages were skipped, not redone

    for name in ("sl.jsonl", "helpful.jsonl", "labels.jsonl", "eval/responses.jsonl"):
        assert _lines(cut / name) == _lines(full / name) > 0, name
        ids = [json.loads(x)["id"] if "id" in x else x for x in (cut / name).read_text().splitlines()]
        assert len(ids) == len(set(ids)), f"{name} has duplicates"
    state = json.loads((cut / "state.json").read_text())
    assert state["done"] == ["sl", "helpful", "sft", "label", "pm", "rl", "eval"]
    for f in ("report.md", "eval/eval.json", "elo.png", "training_curves.png", "ppo/policy", "pm/reward",
              "sft/adapter", "config.yaml"):
        assert (cut / f).exists(), f
    # PPO drew red-team and helpfulness prompts half and half (ppo.helpful_fraction's default)
    ppo_lines = [json.loads(x) for x in (full / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["helpful_prompts"] for r in ppo_lines] == [1, 1]
    # the resumed folder holds the same records as the uninterrupted one
    assert sorted((cut / "sl.jsonl").read_text().splitlines()) == sorted((full / "sl.jsonl").read_text().splitlines())

    other = tmp_path / "other.yaml"
    other.write_text(TINY.format(model=tiny_model_dir("llama")).replace("rounds: 1", "rounds: 2"))
    res = subprocess.run(_run(other, cut), env=env, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2 and "started with other settings" in res.stderr
