"""Resumable JSON Lines output: every long stage writes as it goes and picks up where it
stopped, with no record lost or duplicated.

A stage writes whole records, one ``write`` per record, flushed and fsynced before it moves
on. If the process dies inside a write, the file ends in a partial line: reopening cuts the
file back to its last complete line, so that record is simply made again. A sidecar
``<file>.meta.json`` keeps the settings that shape the records (model, seed, constitution,
...); resuming with different ones is refused rather than mixing two runs in one file. The
settings are pinned by the first record written: a run that wrote none (it failed to start)
leaves nothing a corrected command has to match.

``read_text`` is the one way input files are decoded: UTF-8 (a leading BOM dropped), and a
file that is not is an error naming it, the line and the byte offset.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from cai.outputs import meta_path, refuse_foreign
from engine.errors import InputError


class ResumableJsonl:
    """Append-only JSON lines keyed by ``key`` (a field every record has)."""

    def __init__(self, path: str | os.PathLike, meta: dict, key: str = "id", overwrite: bool = False):
        self.path, self.key = Path(path), key
        self.meta_path = meta_path(self.path)
        if overwrite:
            self.path.unlink(missing_ok=True)
            self.meta_path.unlink(missing_ok=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.meta = json.loads(json.dumps(meta))  # normalise tuples etc. for comparison
        self.done: set = set()
        self.count = 0
        refuse_foreign(self.path)
        if self.path.exists():
            self._repair_and_index()
        if self.count:
            self._check_meta()
        self._pinned = bool(self.count)
        self._fh = open(self.path, "a", encoding="utf-8")

    def _check_meta(self) -> None:
        old = json.loads(read_text(self.meta_path))
        diff = sorted(k for k in set(old) | set(self.meta) if old.get(k) != self.meta.get(k))
        if diff:
            raise InputError(
                f"{self.path}: exists from a run with other settings ({', '.join(diff)}); "
                "use the same settings to resume, or another output path (or --overwrite)"
            )

    def _pin(self) -> None:
        tmp = self.meta_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.meta, indent=2))
        os.replace(tmp, self.meta_path)
        self._pinned = True

    def _repair_and_index(self) -> None:
        records, end, size = complete_records(self.path)
        if end != size:  # a record cut off mid-write: drop it, it will be made again
            with open(self.path, "r+b") as f:
                f.truncate(end)
        for rec in records:
            self.done.add(rec[self.key])
            self.count += 1

    def append(self, records: Iterable[dict]) -> None:
        for rec in records:
            if rec[self.key] in self.done:
                continue
            if not self._pinned:  # the settings are pinned before the first record lands
                self._pin()
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


def complete_records(path: Path) -> tuple[list[dict], int, int]:
    """(the complete records of a JSON lines file a stage writes, the bytes they span, the
    file's size): a last line cut off by a kill is not a record."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    records = []
    for lineno, line in enumerate(decode_text(data[:end], path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{lineno}: not valid JSON ({exc.msg}); not resuming over it") from exc
    return records, end, len(data)


def read_text(path: str | os.PathLike, label: str | None = None) -> str:
    """A whole input file as text; a missing file, a folder or bytes that are not UTF-8 are
    an error naming the file (``label`` if given)."""
    path = Path(path)
    name = label or str(path)
    if path.is_dir():
        raise InputError(f"{name}: is a folder, not a file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{name}: no such file") from None
    except OSError as exc:
        raise InputError(f"{name}: cannot read it ({exc.strerror})") from None
    return decode_text(data, name)


def decode_text(data: bytes, name: str | os.PathLike) -> str:
    """``data`` as UTF-8 (a leading BOM, as spreadsheets write, dropped); else an error
    naming ``name``, the line and the byte offset of the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(f"{name}:{line}: not UTF-8 text (byte offset {exc.start}: "
                         f"{data[exc.start:exc.start + 1].hex()}); save the file as UTF-8") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, object]]:
    """``("file:line", value)`` for every non-blank line of a JSON lines file; a missing
    file, a line that is not JSON, or a file with no records is an error naming it."""
    path = Path(path)
    empty = True
    # split on "\n" only: a JSON string may hold U+2028, which str.splitlines() would cut at
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
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
