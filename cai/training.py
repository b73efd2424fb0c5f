"""The optimizer loop every offline training stage runs (SFT, preference model, DPO).

A stage supplies its batches per epoch and a step function (forwards and backwards of one
group of ``grad_accum`` micro-batches, then ``trainer.apply()``); the loop does the rest:
one JSON line per optimizer step in ``out/metrics.jsonl``, atomic checkpoints in
``out/checkpoints``, resume from the newest one (cutting metric lines past it, so no step is
ever logged twice), a progress bar, and naming the last good checkpoint when a loss turns
non-finite (no checkpoint with non-finite weights is ever written, so that one is finite).

A stage pins what determines its result (``LoopSettings.pinned``: data hash, epochs,
learning rate, ...) in every checkpoint; resuming with other values is refused, naming the
fields, rather than continuing one run with another's settings.

Data parallel (under ``torchrun``, see ``engine.distributed``): an optimizer step takes
``grad_accum x world`` micro-batches of the epoch's batch list (which every rank builds the
same), and each rank runs every ``world``-th of them (``my_share``); a stage's step function
normalises its losses by the counts of the whole group, so a step equals one process's step
with ``grad_accum x world`` micro-batches of accumulation, the learning-rate schedule
included. Rank 0 alone writes metrics, checkpoints and the progress bar; every rank loads the
checkpoint on resume. What is pinned is the global batch (``grad_accum x world``), not
``grad_accum`` itself, so a run resumes on any world size that keeps the global batch (e.g.
world 2 with grad_accum 1, then world 1 with grad_accum 2) and is refused on one that does
not.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from cai.outputs import remove_partial
from cai.records import complete_records
from engine import distributed, profiling
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
    pinned: dict = field(default_factory=dict)
    """JSON-able settings that determine the result (flat: field name -> value); stored in
    every checkpoint, and a resume with any of them changed is refused."""


StepFn = Callable[[list[PackedBatch]], dict]


def train_loop(run: LoopSettings, trainer: Trainer, params: dict, epoch_batches: Callable[[int], list[PackedBatch]],
               step: StepFn, out: Path | None, progress: bool, resume: bool) -> list[dict]:
    """Optimizer steps over every epoch's batches (``grad_accum`` micro-batches each).

    ``step(group)`` returns the step's metrics (at least ``step`` and ``loss``). Returns this
    call's step records.
    """
    main, ga = distributed.is_main(), global_accum(trainer.cfg.grad_accum)
    pinned = global_pinned(run.pinned, ga)
    if out is not None and main:
        remove_partial(out)  # what a run killed mid-write left behind
    distributed.barrier()
    start = resume_from(out, params, trainer, pinned) if resume and out is not None else None
    if start is None:  # fresh: seeded dropout masks; a resumed run restored the RNG state instead
        torch.manual_seed(run.seed)
        start = {"epoch": 0, "next_batch": 0}
        if out is not None and main:
            truncate_metrics(out / "metrics.jsonl", 0)
    last = run.max_steps or trainer.cfg.total_steps
    ckpt_dir = out / "checkpoints" if out is not None and main else None
    bar, log = _bar(progress and main, run.stage, last, trainer.step), []
    try:
        for epoch in range(start["epoch"], run.epochs):
            batches = epoch_batches(epoch)
            first = start["next_batch"] if epoch == start["epoch"] else 0
            for bi in range(first, len(batches), ga):
                if trainer.step >= last:
                    break
                rec = _timed_step(run.stage, step, batches[bi:bi + ga], epoch, ckpt_dir)
                log.append(rec)
                if main:
                    write_metrics(out, rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{rec[k]:.4g}" for k in run.postfix if k in rec})
                nxt = {"epoch": epoch, "next_batch": bi + ga} if bi + ga < len(batches) else {"epoch": epoch + 1, "next_batch": 0}
                if ckpt_dir is not None and (trainer.step % run.checkpoint_every == 0 or trainer.step >= last):
                    save_checkpoint(ckpt_dir, trainer.step, {"params": params, "optimizer": trainer.optimizer,
                                                             "meta": {**nxt, "pinned": pinned}},
                                    keep=run.keep_checkpoints)
    finally:
        if bar is not None:
            bar.close()
    distributed.barrier()  # the last checkpoint is whole before any rank goes on
    return log


GLOBAL_ACCUM = "grad_accum x world"
"""The pinned name of the global batch, in micro-batches per optimizer step."""


def global_accum(grad_accum: int) -> int:
    """Micro-batches per optimizer step over all ranks: grad_accum x world size."""
    return grad_accum * distributed.world()


def steps_per_epoch(num_batches: int, grad_accum: int) -> int:
    """Optimizer steps one epoch of ``num_batches`` micro-batches takes on this world size."""
    return math.ceil(num_batches / global_accum(grad_accum))


def my_share(group: list) -> list:
    """This rank's micro-batches of a step's group (every ``world``-th one); all of it on one
    process."""
    return distributed.shard(group)


def reduce_sums(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over ranks (one all-reduce); the values themselves on one process.
    Step metrics are sums of per-micro-batch parts already weighted by the global group, so
    the sum is the global figure."""
    if not distributed.active():
        return values
    t = distributed.all_reduce_sum(torch.tensor([float(v) for v in values.values()], dtype=torch.float64,
                                                device=distributed_device()))
    return dict(zip(values, t.tolist()))


def distributed_device() -> torch.device:
    """Where collectives' tensors live: the CUDA device under NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_pinned(pinned: dict, ga: int) -> dict:
    """The stage's pinned settings with the per-rank ``optim.grad_accum`` replaced by the
    global batch, which is what determines the result."""
    out = {k: v for k, v in pinned.items() if k != "optim.grad_accum"}
    out[GLOBAL_ACCUM] = ga
    return out


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
    """Without ``resume``, drop an earlier run's checkpoints and metrics in ``out`` (rank 0
    does; the others wait for it)."""
    if not resume and distributed.is_main() and (out / "checkpoints").exists():
        shutil.rmtree(out / "checkpoints")
        (out / "metrics.jsonl").unlink(missing_ok=True)
    distributed.barrier()


def resume_from(out: Path, params: dict, trainer: Trainer, pinned: dict | None = None) -> dict | None:
    """Load the newest checkpoint under ``out/checkpoints`` into ``params`` and the optimizer;
    returns where the loop stopped, or None for a fresh run. A checkpoint whose pinned
    settings differ from ``pinned`` is refused (one written before settings were pinned is
    taken as it is)."""
    ckpt = latest_checkpoint(out / "checkpoints")
    if ckpt is None:
        return None
    check_pinned(ckpt, pinned or {})
    try:
        state = load_checkpoint(ckpt, params, trainer.optimizer)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise InputError(f"{ckpt}: does not match this run's trainable weights ({exc}); "
                         "start over with --no-resume or another --out") from exc
    trainer.step = state["step"]
    if distributed.is_main():
        truncate_metrics(out / "metrics.jsonl", trainer.step)
    return state["meta"]


def check_pinned(ckpt: Path, pinned: dict) -> None:
    """Refuse to resume from ``ckpt`` if a pinned setting changed, naming every field."""
    old = json.loads((ckpt / "state.json").read_text())["meta"].get("pinned")
    if old is None or not pinned:
        return
    old = dict(old)
    if GLOBAL_ACCUM not in old:  # written before the global batch was pinned: by one process
        if "optim.grad_accum" not in old:
            pinned = {k: v for k, v in pinned.items() if k != GLOBAL_ACCUM}
        else:
            old[GLOBAL_ACCUM] = old.pop("optim.grad_accum")
    new = json.loads(json.dumps(pinned))  # tuples -> lists, as stored
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        shown = ", ".join(k if k.endswith("sha256") else f"{k} (was {old.get(k)!r}, now {new.get(k)!r})"
                          for k in changed)
        raise InputError(f"{ckpt.parent.parent}: its checkpoints come from a run with other settings: {shown}; "
                         "use the same settings to resume, or start over with --no-resume or another --out")


def truncate_metrics(path: Path, step: int, key: str = "step") -> None:
    """Keep the metric lines up to ``step``, so a resumed run never logs a step twice. A
    line cut off by a kill mid-write is not a record (``complete_records``, the rule
    ``ResumableJsonl`` resumes by); anything else that is not JSON is named by file and line.
    """
    if not path.is_file():
        return
    keep = [rec for rec in complete_records(path)[0] if rec[key] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(rec) + "\n" for rec in keep))
    tmp.replace(path)


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
