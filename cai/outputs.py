"""Where the stages write: output paths checked before any model loads, and folders written
whole or not at all.

A command refuses an output of the wrong kind (a folder where a file goes, a file where a
folder goes, a parent that is a file), an output that is also one of its inputs, and an
existing file this project did not write (no ``<file>.meta.json`` sidecar beside it), all
before the minutes a model takes to load and before anything is truncated.

An export folder (an adapter, a peft folder, a merged checkpoint, a preference model) is
written into a temporary folder beside it and renamed into place, as checkpoints are, so a
run killed mid-export leaves the previous export whole; the next run removes what such a
kill left behind (``remove_partial``).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from engine.errors import InputError
from engine.train import TMP_CKPT_PREFIX

TMP_EXPORT_PREFIX = ".tmp-export-"


def meta_path(path: str | os.PathLike) -> Path:
    """The settings sidecar of a resumable JSON lines file (as ``ResumableJsonl`` writes it)."""
    path = Path(path)
    return path.with_name(path.name + ".meta.json")


def check_file_output(path: str | os.PathLike, inputs: Iterable = (), overwrite: bool = False) -> Path:
    """A JSON lines output file: not a folder, its parent a folder (or creatable), not one of
    ``inputs``, and, unless ``overwrite``, not an existing file another program wrote."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{p}: is a folder; the output here is a JSON lines file")
    _check_parents(p)
    _check_not_input(p, inputs)
    if not overwrite:
        refuse_foreign(p)
    return p


def refuse_foreign(p: Path) -> None:
    """Settings are pinned before the first record lands, so a non-empty file without a
    sidecar was not written by cai: nothing in it is cut or appended to."""
    if p.is_file() and p.stat().st_size and not meta_path(p).is_file():
        raise InputError(f"{p}: exists and was not written by cai (no {meta_path(p).name} beside it); "
                         "choose another output path, or --overwrite to replace it")


def check_dir_output(path: str | os.PathLike, inputs: Iterable = ()) -> Path:
    """An output folder: a folder or nothing yet, under folders, not one of ``inputs``."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"{p}: exists and is not a folder; the output here is a folder")
    _check_parents(p)
    _check_not_input(p, inputs)
    return p


def _check_parents(p: Path) -> None:
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{p}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise InputError(f"{p}: cannot write in {parent}")
            return


def _check_not_input(p: Path, inputs: Iterable) -> None:
    for src in inputs:
        if src is not None and same_path(p, src):
            raise InputError(f"{p}: is also an input of this command ({src}); write to another path")


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """The same file or folder (through links and relative spellings)."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.absolute().resolve() == b.absolute().resolve()


def sha256_of(value) -> str:
    """A content hash of JSON-able data, independent of key order."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@contextmanager
def atomic_folder(final: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty temporary folder beside ``final``; on success it replaces ``final``.

    The old folder is renamed aside before the new one is renamed in and only then deleted,
    so at every moment one complete version exists on disk.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_EXPORT_PREFIX}{final.name}-", dir=final.parent))
    old = None
    try:
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{TMP_EXPORT_PREFIX}{final.name}-old-", dir=final.parent))
            os.replace(final, old / final.name)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def remove_partial(out: str | os.PathLike) -> list[Path]:
    """Delete the temporary folders a killed run left in ``out`` (exports) and in
    ``out/checkpoints`` (checkpoints); returns what was removed."""
    out = Path(out)
    found = []
    for folder, prefix in ((out, TMP_EXPORT_PREFIX), (out / "checkpoints", TMP_CKPT_PREFIX)):
        if folder.is_dir():
            found += [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(prefix)]
    for p in found:
        shutil.rmtree(p, ignore_errors=True)
    return found
