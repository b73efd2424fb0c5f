"""Data-parallel training on two CPU processes (gloo, under torchrun) against one process on
the same global batch: SFT (LoRA, and full fine-tuning replicated), PM and DPO steps, a PPO
iteration's whitening and KL, world-1 resumes from world-2 checkpoints (SFT and PPO), and a
non-finite loss on one rank stopping every rank.

World 2 runs with per-rank grad_accum 1 and world 1 with grad_accum 2, so both take the same
2 micro-batches per optimizer step. Tolerance: the two sum the same float32 gradients in
another order (an all-reduce instead of accumulation in .grad; PPO's whitening sums in
float64 across ranks), so the trained tensors (entries up to ~0.4) are held to 2e-5
absolute (measured: at most 1e-6) and the step metrics to 1e-5 relative.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dist_train_worker as w
from engine.errors import InputError
from engine.train import list_checkpoints

WORKER = Path(__file__).parent / "dist_train_worker.py"
ATOL = 2e-5


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def world2(model, tmp_path_factory) -> Path:
    """Every stage run once by two ranks; their rank-0 outputs."""
    out = tmp_path_factory.mktemp("world2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(WORKER), str(model), str(out)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def world1(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("world1")


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {f"{f.name}:{k}": v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert found, f"no tensors in {folder}"
    return found


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=ATOL, rtol=0, msg=lambda m: f"{k}: {m}")


def assert_same_steps(a: list[dict], b: list[dict], keys: tuple[str, ...]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (ra["step"], k)


STAGES = {  # stage: (run on world 1, export folder, steps, metrics compared)
    "sft": (lambda m, o: w.run_sft(m, o, 2), "adapter", 8, ("loss", "lr", "grad_norm", "target_tokens", "tokens")),
    "sft_full": (lambda m, o: w.run_sft(m, o, 2, **w.FULL), "merged", 4, ("loss", "lr", "grad_norm")),
    "pm": (lambda m, o: w.run_pm(m, o, 2), "reward", 3, ("loss", "accuracy", "margin", "reward_chosen", "grad_norm")),
    "dpo": (lambda m, o: w.run_dpo(m, o, 2), "policy", 3, ("loss", "accuracy", "margin", "logp_chosen", "grad_norm")),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_world2_step_equals_world1_on_the_same_global_batch(stage, model, world2, world1):
    run, export, steps, keys = STAGES[stage]
    run(model, world1 / stage)
    one, two = metrics(world1 / stage), metrics(world2 / stage)
    assert len(one) == steps  # 2 micro-batches a step, an epoch's odd one alone in its last step
    assert_same_steps(two, one, keys)
    assert_same_tensors(world2 / stage / export, world1 / stage / export)


def test_ppo_whitening_and_kl_come_from_global_statistics(model, world2, world1):
    one = w.ppo_advantages(model)  # world 1: whitened over all 5 sequences' tokens
    two = json.loads((world2 / "advantages.json").read_text())
    assert [len(a) for a in two] == [len(a) for a in one]  # same samples, whatever the world size
    flat2 = torch.tensor([x for a in two for x in a], dtype=torch.float64)
    torch.testing.assert_close(flat2, torch.tensor([x for a in one for x in a], dtype=torch.float64), atol=1e-5, rtol=0)
    assert abs(flat2.mean()) < 1e-5 and abs(flat2.std(unbiased=False) - 1) < 1e-4
    rank0 = torch.tensor([x for a in two[0::2] for x in a])  # rank 0's share is not whitened on its own
    assert abs(rank0.mean()) > 1e-3 or abs(rank0.std(unbiased=False) - 1) > 1e-3
    w.run_ppo(model, world1 / "ppo")
    m1, m2 = metrics(world1 / "ppo"), metrics(world2 / "ppo")
    assert [r["iteration"] for r in m2] == [1, 2, 3]
    for r1, r2 in zip(m1, m2):
        for k in ("kl", "kl_coef", "reward_mean", "reward_std", "response_len", "loss", "policy_loss", "value_loss",
                  "approx_kl", "grad_norm"):
            assert r2[k] == pytest.approx(r1[k], rel=1e-4, abs=1e-6), (r1["iteration"], k)
    error = m2[1]["kl"] / w.PPO["target_kl"] - 1  # iteration 2's KL against the target: inside the controller's clip
    assert abs(error) < 0.2
    assert m2[2]["kl_coef"] == pytest.approx(m2[1]["kl_coef"] * (1 + error * w.PPO["prompts_per_iteration"] / w.PPO["kl_horizon"]), rel=1e-6)
    assert_same_tensors(world2 / "ppo" / "policy", world1 / "ppo" / "policy")


def test_world1_resumes_a_world2_checkpoint_on_the_same_schedule(model, world2, world1, tmp_path):
    shutil.copytree(world2 / "resume", tmp_path / "resume")
    assert [c.name for c in list_checkpoints(tmp_path / "resume" / "checkpoints")][-1] == "step-00000002"
    with pytest.raises(InputError, match=r"grad_accum x world \(was 2, now 1\)"):
        w.run_sft(model, tmp_path / "resume", 1)  # world 1 alone would halve the global batch
    w.run_sft(model, tmp_path / "resume", 2)
    if not (world1 / "sft" / "metrics.jsonl").exists():
        w.run_sft(model, world1 / "sft", 2)
    whole, resumed = metrics(world1 / "sft"), metrics(tmp_path / "resume")
    assert len(resumed) == 8 and [r["lr"] for r in resumed] == [r["lr"] for r in whole]
    assert_same_steps(resumed, whole, ("loss", "grad_norm", "target_tokens"))
    assert_same_tensors(tmp_path / "resume" / "adapter", world1 / "sft" / "adapter")


def test_world1_resumes_a_world2_ppo_checkpoint(model, world2, world1, tmp_path):
    shutil.copytree(world2 / "ppo_resume", tmp_path / "ppo")
    w.run_ppo(model, tmp_path / "ppo")  # iterations 1-2 on world 2, iteration 3 here
    if not (world1 / "ppo" / "metrics.jsonl").exists():
        w.run_ppo(model, world1 / "ppo")
    whole, resumed = metrics(world1 / "ppo"), metrics(tmp_path / "ppo")
    assert [r["iteration"] for r in resumed] == [1, 2, 3]
    for k in ("kl", "kl_coef", "reward_mean", "loss"):
        assert resumed[2][k] == pytest.approx(whole[2][k], rel=1e-4, abs=1e-6), k
    assert_same_tensors(tmp_path / "ppo" / "policy", world1 / "ppo" / "policy")


def test_a_nan_loss_on_one_rank_stops_every_rank_before_the_update(world2):
    raised = json.loads((world2 / "nan.json").read_text())
    assert len(raised) == 2
    for r in raised:  # both ranks raised at step 1, on the other rank's NaN too, weights untouched
        assert r.startswith("1: step 1: the loss (on 1 rank(s)) is ") and r.endswith("weights [1.0, 1.0, 1.0]"), r


def test_cai_sft_under_torchrun_prints_once_and_trains_what_one_process_does(model, tmp_path):
    """The command itself under torchrun: one summary line (rank 1's stdout is silent), and
    the adapter of world 2 x grad_accum 1 equals world 1 x grad_accum 2 (LoRA dropout off:
    with it on, each rank draws its own dropout masks)."""
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Tell me about bread {i}"},
        {"role": "assistant", "content": "Mix flour, water, yeast and salt, then bake."}]}) + "\n" for i in range(8)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    common = ["sft", "--model", str(model), "--data", str(data), "--epochs", "1", "--max-tokens-per-batch", "64",
              "--lora-dropout", "0", "--no-progress"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "cai", *common, "--out", str(tmp_path / "w2")],
                         env=env, capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "cai", *common, "--grad-accum", "2", "--out", str(tmp_path / "w1")],
                         env=env, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.stdout.count('{"out"') == 1
    assert_same_tensors(tmp_path / "w1" / "adapter", tmp_path / "w2" / "adapter")
    assert_same_steps(metrics(tmp_path / "w1"), metrics(tmp_path / "w2"), ("loss", "lr", "grad_norm"))
