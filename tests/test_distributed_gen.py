"""Generation stages under torchrun: two CPU processes (gloo) make the records one process
makes, merged once into the stage's file, and a rank killed mid-stage loses nothing."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cai.shards import shard_files

REPO = Path(__file__).resolve().parent.parent
N = 8


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch(world: int, stage_args: list[str]) -> list[str]:
    """The command line of a stage on ``world`` processes (torchrun), or on one (plain)."""
    if world == 1:
        return [sys.executable, "-m", "cai.cli", *stage_args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
            "--master-addr", "127.0.0.1", "--master-port", _free_port(), "-m", "cai.cli", *stage_args]


def _run(world: int, stage_args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(_launch(world, stage_args), env=_env(), capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Tell me about bread {i}"}) + "\n"
                            for i in range(N)))
    return path


def _sl_args(model, prompts, out) -> list[str]:
    return ["sl", "--model", str(model), "--prompts", str(prompts), "--out", str(out), "--rounds", "2",
            "--max-new-tokens", "12", "--chunk-size", "2", "--max-slots", "2", "--seed", "3", "--max-fewshot", "1"]


def _label_args(model, prompts, out) -> list[str]:
    return ["label", "--model", str(model), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "8",
            "--principles-per-pair", "1", "--chunk-size", "2", "--max-fewshot", "0", "--seed", "5", "--limit", "5"]


DRIVER = """\
import json, sys
from cai import cli
from cai.pipeline import Pipeline, load_run_config
from engine import distributed
for args in json.loads(sys.argv[1]):  # stage commands, one after another in this process
    assert cli.main(args) == 0
pipe = Pipeline(load_run_config(sys.argv[2], None, {})[0], sys.argv[3])
summary = pipe.stage_sl(), pipe.stage_helpful()
if distributed.is_main():
    print("world", distributed.world(), *summary)
"""

RUN = """\
model: {model}
sl_prompts: 2
helpful_samples: 5
sl: {{rounds: 1, max_new_tokens: 8, chunk_size: 1, max_fewshot: 0, max_slots: 2}}
"""


@pytest.fixture(scope="module")
def runs(tiny_model_dir, prompts_file, tmp_path_factory) -> dict:
    """``cai sl``, ``cai label``, ``cai eval`` and `cai run`'s SL and helpful stages, run in one process
    (world 1) and under torchrun on two (world 2): {world: (folder, stdout)}."""
    model, root = tiny_model_dir("llama"), tmp_path_factory.mktemp("runs")
    (root / "driver.py").write_text(DRIVER)
    (root / "run.yaml").write_text(RUN.format(model=model))
    many = root / "many.jsonl"  # more than one chunk of `cai generate` (64 prompts)
    many.write_text("".join(json.dumps({"prompt": f"Bread {i}"}) + "\n" for i in range(70)))
    done = {}
    for world in (1, 2):
        d = root / f"w{world}"
        commands = [_sl_args(model, prompts_file, d / "sl.jsonl"), _label_args(model, prompts_file, d / "labels.jsonl"),
                    ["eval", "--model", str(model), "--out", str(d / "eval"), "--checkpoint", "initial=",
                     "--checkpoint", "again=", "--limit", "3", "--max-new-tokens", "8", "--chunk-size", "2",
                     "--principles-per-comparison", "1", "--max-fewshot", "0"],
                    ["generate", "--model", str(model), "--prompts", str(many), "--out", str(d / "gen.jsonl"),
                     "--max-new-tokens", "2", "--seed", "1", "--temperature", "1"]]
        cmd = _launch(world, ["x"])
        at = len(cmd) - 1 - cmd[::-1].index("-m")  # the driver script replaces `-m cai.cli x`
        cmd[at:] = [str(root / "driver.py"), json.dumps(commands), str(root / "run.yaml"), str(d / "run")]
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=REPO, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        done[world] = (d, proc.stdout + proc.stderr)
    return done


@pytest.fixture(scope="module")
def sl_world1(runs) -> Path:
    """The SL-CAI records of one process: what every distributed run must reproduce."""
    return runs[1][0] / "sl.jsonl"


def _same_output(a: Path, b: Path) -> None:
    """Same records in the same (input) order, the same settings, no shard left behind."""
    assert b.read_text() == a.read_text()
    meta = lambda p: json.loads(p.with_name(p.name + ".meta.json").read_text())  # noqa: E731
    assert meta(b) == meta(a)
    assert shard_files(b) == []


def test_sl_world2_gives_the_records_of_world1(runs):
    out, log = runs[2][0] / "sl.jsonl", runs[2][1]
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [f"q{i}" for i in range(N)]
    _same_output(runs[1][0] / "sl.jsonl", out)
    # rank 0 alone reports; the other rank is silent
    assert log.count(f"wrote {N} records") == 1 and "[rank" not in log


def test_labels_world2_give_the_records_of_world1(runs):
    one, two = runs[1][0] / "labels.jsonl", runs[2][0] / "labels.jsonl"
    assert one.read_text().strip(), "the tiny model should label some pairs"
    _same_output(one, two)
    assert runs[2][1].count("labelled pairs to") == 1


def test_eval_answers_and_judgments_world2_equal_world1(runs):
    for name in ("responses.jsonl", "judgments.jsonl"):
        _same_output(runs[1][0] / "eval" / name, runs[2][0] / "eval" / name)
    assert len((runs[2][0] / "eval" / "judgments.jsonl").read_text().splitlines()) == 6
    assert (runs[2][0] / "eval" / "report.md").exists() and runs[2][1].count("wrote ") == 3  # sl, label, eval


def test_generate_world2_equals_world1(runs):
    _same_output(runs[1][0] / "gen.jsonl", runs[2][0] / "gen.jsonl")
    assert [json.loads(x)["index"] for x in (runs[2][0] / "gen.jsonl").read_text().splitlines()] == list(range(70))


def test_run_stages_sl_and_helpful_world2_equal_world1(runs):
    """`cai run`'s generating stages before SFT, as torchrun runs them."""
    for name in ("sl.jsonl", "helpful.jsonl"):
        _same_output(runs[1][0] / "run" / name, runs[2][0] / "run" / name)
    assert len((runs[2][0] / "run" / "helpful.jsonl").read_text().splitlines()) == 5
    assert "world 2" in runs[2][1] and runs[2][1].count("world ") == 1  # rank 0 alone prints


def _worker(agent_pid: int, rank: int) -> int:
    """The pid of torchrun's worker process of ``rank`` (its child with RANK=rank)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (d / "environ").read_bytes().split(b"\0") if ppid == agent_pid else []
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(d.name)
    raise AssertionError(f"no worker of rank {rank} under {agent_pid}")


def test_a_rank_killed_mid_stage_then_restarted_ends_with_every_record_once(sl_world1, tiny_model_dir,
                                                                           prompts_file, tmp_path):
    out = tmp_path / "sl.jsonl"
    args = _sl_args(tiny_model_dir("llama"), prompts_file, out)
    agent = subprocess.Popen(_launch(2, args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             cwd=REPO)
    shard1 = out.with_name(out.name + ".rank1-of-2.jsonl")
    deadline = time.time() + 90
    first_chunk = lambda: shard1.exists() and shard1.read_text().count("\n") >= 2  # noqa: E731
    while time.time() < deadline and agent.poll() is None and not first_chunk():
        time.sleep(0.01)
    os.kill(_worker(agent.pid, 1), signal.SIGKILL)  # rank 1 dies after its first chunk
    assert agent.wait(timeout=60) != 0
    assert not out.exists(), "the kill should land before the merge"
    assert sum(len(p.read_text().splitlines()) for p in shard_files(out)) < N
    _run(2, args)  # the same command again resumes every shard
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert ids == [f"q{i}" for i in range(N)]  # every record once, in input order
    _same_output(sl_world1, out)


def test_resume_at_another_world_size_counts_every_shard_done(sl_world1, tiny_model_dir, prompts_file, tmp_path):
    """Shards a world-2 job left (here: rank 1's first chunk, cut mid-line) are resumed by one process."""
    out = tmp_path / "sl.jsonl"
    lines = sl_world1.read_text().splitlines(keepends=True)
    meta = sl_world1.with_name(sl_world1.name + ".meta.json").read_text()
    for rank, text in ((0, lines[0] + lines[1]), (1, lines[2] + lines[3] + lines[6][:20])):
        shard = out.with_name(f"{out.name}.rank{rank}-of-2.jsonl")
        shard.write_text(text)
        shard.with_name(shard.name + ".meta.json").write_text(meta)
    proc = _run(1, _sl_args(tiny_model_dir("llama"), prompts_file, out))
    assert "4 records done, 4 to go" in proc.stdout
    _same_output(sl_world1, out)



def test_overwrite_removes_the_shards_a_distributed_run_left(tmp_path):
    from cai.shards import open_output

    out = tmp_path / "sl.jsonl"
    for rank in (0, 1):
        shard = out.with_name(f"{out.name}.rank{rank}-of-2.jsonl")
        shard.write_text(json.dumps({"id": f"old{rank}"}) + "\n")
        shard.with_name(shard.name + ".meta.json").write_text("{}")
    with open_output(out, {"a": 1}, ["new"], overwrite=True) as o:
        assert o.done == set()
        o.append([{"id": "new"}])
    assert shard_files(out) == [] and out.read_text() == '{"id": "new"}\n'
