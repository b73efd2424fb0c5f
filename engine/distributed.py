"""Data parallelism on torch.distributed, launched by ``torchrun``.

Rank and world size come from the environment torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``); without it the process is rank 0 of 1 and every helper here is a no-op, so
one process behaves exactly as if this module did not exist. The process group is gloo on
the CPU and NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``).

Why plain data parallelism and not a placement framework: every role of the method (policy,
reference, reward model, feedback model) is an adapter or head on one shared base, so each
rank holds the whole method and only the prompts (for generation) and the batches (for
training) are split.
"""
from __future__ import annotations

import os
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def env_world() -> int:
    """The world size torchrun announced (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(device: torch.device | str | None = None) -> bool:
    """Join the process group torchrun describes, once; True when running distributed.
    ``device``: the model's device (its type picks NCCL or gloo)."""
    if env_world() <= 1:
        return False
    if not dist.is_initialized():
        dev = torch.device(device) if device is not None else torch.device("cpu")
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return True


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (torchrun's ``RANK`` even before the group is joined)."""
    if active():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if env_world() > 1 else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one that prints, shows progress bars, merges shards and writes checkpoints."""
    return rank() == 0


def shard(items: Sequence[T], r: int | None = None, w: int | None = None) -> list[T]:
    """This rank's share of ``items``: every ``world``-th item from position ``rank``
    (deterministic, and balanced to within one item)."""
    r = rank() if r is None else r
    w = world() if w is None else w
    return list(items[r::w])


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over ranks (in place, and returned); ``t`` itself on one process."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` in rank order (``[obj]`` on one process)."""
    if not active():
        return [obj]
    out: list = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def tag() -> str:
    """``"[rank k of w] "`` when running distributed, else ``""``: the prefix of every
    warning or error a rank prints, so a failure names the rank it came from."""
    return f"[rank {rank()} of {env_world()}] " if env_world() > 1 else ""


def say(*args, **kwargs) -> None:
    """``print`` on rank 0 only: progress and summaries come from one rank."""
    if is_main():
        print(*args, **kwargs)


def rank_device(spec: str | None) -> str | None:
    """The device of this rank: several ranks on one machine take a GPU each, so ``auto``
    (with a GPU present) and ``cuda`` mean ``cuda:LOCAL_RANK``; anything else is kept."""
    from engine.device import cuda_present

    name = (spec or "auto").strip().lower()
    if env_world() > 1 and name in ("auto", "cuda") and cuda_present():
        return f"cuda:{local_rank()}"
    return spec
