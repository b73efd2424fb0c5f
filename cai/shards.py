"""One stage's output written by many ranks: a resumable shard per rank, merged once.

Under ``torchrun`` every rank of a generating stage writes its own records to
``<out>.rank<k>-of-<w>.jsonl`` (a ``ResumableJsonl``, with its settings sidecar). When every
rank has finished (a barrier), rank 0 merges the shards, with whatever the stage's file
already held, into the stage's file in the input order: a temporary file renamed over it,
so a reader sees the old file or the whole new one. Only then are the shards removed; a
kill between the rename and the removal leaves records that the next merge drops as
duplicates.

Resuming works at any world size: a record in any shard (of any world size) or in the
stage's file counts as done, so a restarted job makes only what is missing, each record
once. Files written with other settings are refused, as ``ResumableJsonl`` refuses them.

One process with no shards on disk is exactly a ``ResumableJsonl`` on the stage's file.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

from cai.outputs import meta_path
from cai.records import ResumableJsonl, complete_records, read_text
from engine import distributed as dist
from engine.errors import InputError

_SHARD = re.compile(r"\.rank(\d+)-of-(\d+)\.jsonl$")


def shard_path(path: Path, rank: int, world: int) -> Path:
    return path.with_name(f"{path.name}.rank{rank}-of-{world}.jsonl")


def shard_files(path: Path) -> list[Path]:
    """Every shard of ``path`` on disk, of any world size, in (world, rank) order."""
    found = [q for q in path.parent.glob(f"{path.name}.rank*-of-*.jsonl") if _SHARD.search(q.name)]
    return sorted(found, key=lambda q: tuple(int(x) for x in _SHARD.search(q.name).groups())[::-1])


def _records(path: Path) -> list[dict]:
    """The complete records of a JSON lines file (a line cut off by a kill is ignored)."""
    return complete_records(path)[0] if path.is_file() else []


def open_output(path: str | os.PathLike, meta: dict, order: Sequence[str], key: str = "id",
                overwrite: bool = False):
    """The output of a generating stage: a plain ``ResumableJsonl`` on ``path`` for one
    process with no shards on disk (today's behaviour), else a ``ShardedJsonl``.
    ``order``: the ids of the stage's inputs, the order of the merged file."""
    path = Path(path)
    if dist.world() == 1 and overwrite:
        _remove_shards(path)
    if dist.world() == 1 and not shard_files(path):
        return ResumableJsonl(path, meta, key=key, overwrite=overwrite)
    return ShardedJsonl(path, meta, order, key=key, overwrite=overwrite)


class ShardedJsonl:
    """This rank's shard of a stage's output, with the ``done``/``count``/``append``
    interface of ``ResumableJsonl``; ``done`` also holds what other shards and the stage's
    file hold. Closing it without an error merges (rank 0) after every rank is done."""

    def __init__(self, path: Path, meta: dict, order: Sequence[str], key: str = "id", overwrite: bool = False):
        self.path, self.key, self.order = path, key, list(order)
        self.meta = json.loads(json.dumps(meta))
        if overwrite and dist.is_main():
            path.unlink(missing_ok=True)
            meta_path(path).unlink(missing_ok=True)
            _remove_shards(path)
        dist.barrier()  # nobody opens a file rank 0 is still removing
        self.own = ResumableJsonl(shard_path(path, dist.rank(), dist.world()), meta, key=key)
        self.done = set(self.own.done)
        for other in [path, *shard_files(path)]:
            if other != self.own.path:
                self.done |= {r[key] for r in self._read_checked(other)}
        self.count = len(self.done)
        dist.barrier()  # every rank has read the files before any rank appends

    def _read_checked(self, path: Path) -> list[dict]:
        records = _records(path)
        if records:
            old = json.loads(read_text(meta_path(path))) if meta_path(path).is_file() else None
            if old != self.meta:
                diff = sorted(k for k in set(old or {}) | set(self.meta) if (old or {}).get(k) != self.meta.get(k))
                what = ", ".join(diff) or "no settings file"
                raise InputError(f"{path}: exists from a run with other settings ({what}); "
                                 "use the same settings to resume, or another output path (or --overwrite)")
        return records

    def append(self, records: Iterable[dict]) -> None:
        fresh = [r for r in records if r[self.key] not in self.done]
        self.own.append(fresh)
        self.done.update(r[self.key] for r in fresh)
        self.count = len(self.done)

    def close(self, merge: bool = True) -> None:
        self.own.close()
        if not merge:
            return
        dist.barrier()  # every shard is complete
        if dist.is_main():
            merge_shards(self.path, self.meta, self.order, self.key)
        dist.barrier()  # nobody reads the stage's file before the merge is in place
        self.done = {r[self.key] for r in _records(self.path)}
        self.count = len(self.done)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        # a failed rank merges nothing: what it wrote stays in its shard for the restart
        self.close(merge=exc_type is None)


def merge_shards(path: Path, meta: dict, order: Sequence[str], key: str = "id") -> int:
    """Merge the stage's file and every shard of it into the stage's file: each record once,
    in ``order`` (records of ids outside it last, as found); atomically. Returns the count."""
    shards = shard_files(path)
    seen: dict = {}
    for src in [path, *shards]:
        for rec in _records(src):
            seen.setdefault(rec[key], rec)
    rank = {k: i for i, k in enumerate(order)}
    records = sorted(seen.values(), key=lambda r: rank.get(r[key], len(rank)))
    tmp_meta = meta_path(path).with_suffix(".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2))
    os.replace(tmp_meta, meta_path(path))
    tmp = path.with_name(path.name + ".merge.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _remove_shards(path)
    return len(records)


def _remove_shards(path: Path) -> None:
    for s in shard_files(path):
        s.unlink(missing_ok=True)
        meta_path(s).unlink(missing_ok=True)
