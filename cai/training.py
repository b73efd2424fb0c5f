"""The optimizer loop every offline training stage runs (SFT, preference model, DPO).

A stage supplies its batches per epoch and a step function (forwards and backwards of one
group of ``grad_accum`` micro-batches, then ``trainer.apply()``); the loop does the rest:
one JSON line per optimizer step in ``out/metrics.jsonl``, atomic checkpoints in
``out/checkpoints``, resume from the newest one (cutting metric lines past it, so no step is
ever logged twice), a progress bar, and naming the last good checkpoint when a loss turns
non-finite.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from engine import profiling
from engine.batch import PackedBatch
from engine.errors import InputError
from engine.train import NonFiniteLossError, Trainer, latest_checkpoint, load_checkpoint, save_checkpoint


@dataclass
class LoopSettings:
    """What ``train_loop`` needs of a stage's config."""

    stage: str
    epochs: int
    checkpoint_every: int
    keep_checkpoints: int
    max_steps: int
    seed: int
    postfix: tuple[str, ...] = ("loss",)
    """Step metrics shown on the progress bar."""


StepFn = Callable[[list[PackedBatch]], dict]


def train_loop(run: LoopSettings, trainer: Trainer, params: dict, epoch_batches: Callable[[int], list[PackedBatch]],
               step: StepFn, out: Path | None, progress: bool, resume: bool) -> list[dict]:
    """Optimizer steps over every epoch's batches (``grad_accum`` micro-batches each).

    ``step(group)`` returns the step's metrics (at least ``step`` and ``loss``). Returns this
    call's step records.
    """
    start = resume_from(out, params, trainer) if resume and out is not None else None
    if start is None:  # fresh: seeded dropout masks; a resumed run restored the RNG state instead
        torch.manual_seed(run.seed)
        start = {"epoch": 0, "next_batch": 0}
        if out is not None:
            truncate_metrics(out / "metrics.jsonl", 0)
    ga, last = trainer.cfg.grad_accum, run.max_steps or trainer.cfg.total_steps
    ckpt_dir = out / "checkpoints" if out is not None else None
    bar, log = _bar(progress, run.stage, last, trainer.step), []
    try:
        for epoch in range(start["epoch"], run.epochs):
            batches = epoch_batches(epoch)
            first = start["next_batch"] if epoch == start["epoch"] else 0
            for bi in range(first, len(batches), ga):
                if trainer.step >= last:
                    break
                rec = _timed_step(run.stage, step, batches[bi:bi + ga], epoch, ckpt_dir)
                log.append(rec)
                write_metrics(out, rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{rec[k]:.4g}" for k in run.postfix if k in rec})
                nxt = {"epoch": epoch, "next_batch": bi + ga} if bi + ga < len(batches) else {"epoch": epoch + 1, "next_batch": 0}
                if ckpt_dir is not None and (trainer.step % run.checkpoint_every == 0 or trainer.step >= last):
                    save_checkpoint(ckpt_dir, trainer.step, {"params": params, "optimizer": trainer.optimizer, "meta": nxt},
                                    keep=run.keep_checkpoints)
    finally:
        if bar is not None:
            bar.close()
    return log


def _timed_step(stage: str, step: StepFn, group: list[PackedBatch], epoch: int, ckpt_dir: Path | None) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        with profiling.phase(f"cai.{stage}.step"):
            rec = step(group)
    except NonFiniteLossError as exc:
        kept = latest_checkpoint(ckpt_dir) if ckpt_dir is not None else None
        exc.args = (f"{exc.args[0]}; last good checkpoint: {kept or 'none yet'}",)
        raise
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0  # CPU time: steadier than wall on a shared machine
    tokens = sum(b.num_tokens for b in group)
    return {"step": rec.pop("step"), "epoch": epoch, **rec, "tokens": tokens, "step_s": dt, "cpu_s": cpu,
            "tokens_per_s": tokens / dt}


def summary(log: list[dict], step: int) -> dict:
    """A run's headline numbers from its step records."""
    steps = [r["step_s"] for r in log]
    return {
        "steps": step, "losses": [r["loss"] for r in log],
        "first_loss": log[0]["loss"] if log else None, "final_loss": log[-1]["loss"] if log else None,
        "mean_step_s": sum(steps) / len(steps) if steps else None,
        "tokens_per_s": sum(r["tokens"] for r in log) / sum(steps) if steps else None,
    }


def fresh_start(out: Path, resume: bool) -> None:
    """Without ``resume``, drop an earlier run's checkpoints and metrics in ``out``."""
    if not resume and (out / "checkpoints").exists():
        shutil.rmtree(out / "checkpoints")
        (out / "metrics.jsonl").unlink(missing_ok=True)


def resume_from(out: Path, params: dict, trainer: Trainer) -> dict | None:
    """Load the newest checkpoint under ``out/checkpoints`` into ``params`` and the optimizer;
    returns where the loop stopped, or None for a fresh run."""
    ckpt = latest_checkpoint(out / "checkpoints")
    if ckpt is None:
        return None
    try:
        state = load_checkpoint(ckpt, params, trainer.optimizer)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise InputError(f"{ckpt}: does not match this run's trainable weights ({exc}); "
                         "start over with --no-resume or another --out") from exc
    trainer.step = state["step"]
    truncate_metrics(out / "metrics.jsonl", trainer.step)
    return state["meta"]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines after the checkpoint, so a resumed run never duplicates a step."""
    if path.is_file():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in keep))


def write_metrics(out: Path | None, rec: dict) -> None:
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        with (out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(rec) + "\n")


def _bar(progress: bool, stage: str, total: int, done: int):
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=stage, unit="step")
