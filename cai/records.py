"""Resumable JSON Lines output: every long stage writes as it goes and picks up where it
stopped, with no record lost or duplicated.

A stage writes whole records, one ``write`` per record, flushed and fsynced before it moves
on. If the process dies inside a write, the file ends in a partial line: reopening cuts the
file back to its last complete line, so that record is simply made again. A sidecar
``<file>.meta.json`` keeps the settings that shape the records (model, seed, constitution,
...); resuming with different ones is refused rather than mixing two runs in one file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from engine.errors import InputError


class ResumableJsonl:
    """Append-only JSON lines keyed by ``key`` (a field every record has)."""

    def __init__(self, path: str | os.PathLike, meta: dict, key: str = "id", overwrite: bool = False):
        self.path, self.key = Path(path), key
        self.meta_path = self.path.with_name(self.path.name + ".meta.json")
        if overwrite:
            self.path.unlink(missing_ok=True)
            self.meta_path.unlink(missing_ok=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._check_meta(meta)
        self.done: set = set()
        self.count = 0
        if self.path.exists():
            self._repair_and_index()
        self._fh = open(self.path, "a", encoding="utf-8")

    def _check_meta(self, meta: dict) -> None:
        meta = json.loads(json.dumps(meta))  # normalise tuples etc. for comparison
        if self.meta_path.exists() and self.path.exists():
            old = json.loads(self.meta_path.read_text())
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            if diff:
                raise InputError(
                    f"{self.path}: exists from a run with other settings ({', '.join(diff)}); "
                    "use the same settings to resume, or another output path (or --overwrite)"
                )
        elif self.path.exists() and self.path.stat().st_size:
            # no sidecar: not a file this project wrote, so nothing in it is cut or appended to
            raise InputError(f"{self.path}: exists and was not written by cai (no {self.meta_path.name} beside it); "
                             "choose another output path, or --overwrite to replace it")
        else:
            tmp = self.meta_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(meta, indent=2))
            os.replace(tmp, self.meta_path)

    def _repair_and_index(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):  # a record cut off mid-write: drop it, it will be made again
            with open(self.path, "r+b") as f:
                f.truncate(end)
        for lineno, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{self.path}:{lineno}: not valid JSON ({exc.msg}); not resuming over it") from exc
            self.done.add(rec[self.key])
            self.count += 1

    def append(self, records: Iterable[dict]) -> None:
        for rec in records:
            if rec[self.key] in self.done:
                continue
            self._fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            self.done.add(rec[self.key])
            self.count += 1
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, object]]:
    """``("file:line", value)`` for every non-blank line of a JSON lines file; a missing
    file, a line that is not JSON, or a file with no records is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    empty = True
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{where}: not valid JSON: {exc.msg}") from exc
            empty = False
            yield where, value
    if empty:
        raise InputError(f"{path}: no records")


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...] = ()) -> list[dict]:
    """Every record of a JSON lines file, each an object with the ``required`` fields."""
    out = []
    for where, rec in iter_jsonl(path):
        if not isinstance(rec, dict):
            raise InputError(f"{where}: expected a JSON object")
        missing = [k for k in required if k not in rec]
        if missing:
            raise InputError(f"{where}: missing field(s) {', '.join(missing)}")
        out.append(rec)
    return out
