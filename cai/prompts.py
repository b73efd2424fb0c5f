"""Prompt sets: the built-in red-team and benign sets, and a user's own files.

``load_prompts(source)`` takes a built-in name (``redteam``, ``benign``: JSON Lines in
``constitutions/``) or a path to JSON Lines (``prompt`` or ``messages`` per record), a JSON
array (of such records or of strings), CSV (a ``prompt`` column) or plain text (one prompt
per line, blank lines skipped). Errors name the file and the line.

The built-in sets carry a ``split``: ``heldout`` prompts (about 20% of every category) are
for evaluation only, so that training never sees what the evaluation asks.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai.constitution import CONSTITUTIONS_DIR, Message
from engine.errors import InputError

BUILTIN = ("redteam", "benign")
SPLITS = ("train", "heldout")
_ROLES = ("system", "user", "assistant")


@dataclass
class PromptRecord:
    """One prompt. ``prompt`` is the text of the last user turn; ``messages`` holds the
    whole conversation when the source gave one (None for a single prompt)."""

    id: str
    prompt: str
    messages: list[Message] | None = None
    category: str | None = None  # harm or task category, for per-category reports
    split: str | None = None  # "train" or "heldout"; None when the source has no split
    where: str | None = None  # "file:line" it was read from, for messages about it


def add_prompt_flags(p) -> None:
    """--prompts / --split / --limit, as every prompt-driven command takes them."""
    p.add_argument("--prompts", default="redteam",
                   help="'redteam', 'benign', or a JSON lines / CSV / plain-text file of prompts")
    p.add_argument("--split", default="train", help="split of a built-in set: 'train', 'heldout' or 'all'")
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts")


def select_prompts(source: str | Path, split: str = "train", limit: int | None = None) -> list[PromptRecord]:
    """The prompts a stage runs on: ``split`` of a built-in set ("all" for every split); a
    user's file is taken whole (it need not carry splits)."""
    builtin = str(source) in BUILTIN and not Path(source).exists()
    return load_prompts(source, split=split if builtin and split != "all" else None, limit=limit)


def load_prompts(source: str | Path, split: str | None = None,
                 limit: int | None = None) -> list[PromptRecord]:
    """Read prompts, keep those of ``split`` (if given), then the first ``limit``."""
    if split is not None and split not in SPLITS:
        raise InputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if limit is not None and limit < 0:
        raise InputError(f"limit must be >= 0, got {limit}")
    path, builtin = _resolve(source)
    label = str(source)
    suffix = path.suffix.lower()
    text = _read_text(path, label)
    if suffix in (".jsonl", ".ndjson"):
        records = _from_jsonl(text, label, strict=builtin)
    elif suffix == ".json":
        records = _from_json(text, label)
    elif suffix == ".csv":
        records = _from_csv(text, label)
    else:
        records = _from_text(text, label)
    if not records:
        raise InputError(f"{label}: empty file (no prompts)")
    _check_ids(records, label)
    if split is not None:
        missing = [r for r in records if r.split is None]
        if missing:
            raise InputError(f"{label}: record {missing[0].id!r} has no 'split' to select "
                             f"{split!r} by")
        records = [r for r in records if r.split == split]
    return records if limit is None else records[:limit]


def _resolve(source: str | Path) -> tuple[Path, bool]:
    if str(source) in BUILTIN and not Path(source).exists():
        return CONSTITUTIONS_DIR / f"{source}.jsonl", True
    path = Path(source)
    if not path.is_file():
        raise InputError(f"{source}: no such file, and not a built-in prompt set "
                         f"({', '.join(BUILTIN)})")
    return path, False


def _read_text(path: Path, label: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets write a BOM
    except UnicodeDecodeError:
        raise InputError(f"{label}: not UTF-8 text") from None


def _record(obj: Any, where: str, default_id: str, strict: bool) -> PromptRecord:
    """A JSON object -> PromptRecord. ``strict`` (the built-in sets) requires every field;
    a user's file may carry any extra columns, which are ignored."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if strict:
        for key in ("id", "prompt", "category", "split"):
            if key not in obj:
                raise InputError(f"{where}: missing {key!r}")
    messages = _messages(obj["messages"], where) if "messages" in obj else None
    if messages is None and "prompt" not in obj:
        raise InputError(f"{where}: missing 'prompt'")
    prompt = messages[-1]["content"] if messages else obj["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"{where}: 'prompt' must be a non-empty string")
    ident = obj.get("id", default_id)
    category, split = obj.get("category"), obj.get("split")
    if not isinstance(ident, (str, int)) or isinstance(ident, bool):
        raise InputError(f"{where}: 'id' must be a string")
    if category is not None and not isinstance(category, str):
        raise InputError(f"{where}: 'category' must be a string")
    if split is not None and split not in SPLITS:
        raise InputError(f"{where}: 'split' must be one of {', '.join(SPLITS)}, got {split!r}")
    return PromptRecord(str(ident), prompt.strip(), messages, category, split, where)


def _messages(value: Any, where: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(value):
        if (not isinstance(m, dict) or m.get("role") not in _ROLES
                or not isinstance(m.get("content"), str)):
            raise InputError(f"{where}: messages[{i}] must be {{\"role\": "
                             f"system|user|assistant, \"content\": str}}")
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "user":
        raise InputError(f"{where}: 'messages' must end with a user turn (the model answers it)")
    return out


def _from_jsonl(text: str, label: str, strict: bool) -> list[PromptRecord]:
    stem = Path(label).stem
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"{label}:{n}: not valid JSON") from None
        records.append(_record(obj, f"{label}:{n}", f"{stem}-{n}", strict))
    return records


def _from_json(text: str, label: str) -> list[PromptRecord]:
    try:
        data = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as exc:
        raise InputError(f"{label}:{exc.lineno}: not valid JSON") from None
    if not isinstance(data, list):
        raise InputError(f"{label}: expected a JSON array of prompts or records")
    stem = Path(label).stem
    return [_record({"prompt": item} if isinstance(item, str) else item,
                    f"{label}: [{i}]", f"{stem}-{i}", strict=False)
            for i, item in enumerate(data)]


def _from_csv(text: str, label: str) -> list[PromptRecord]:
    # newline='' keeps line breaks inside quoted fields (a multi-line prompt)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None:
        return []
    if "prompt" not in reader.fieldnames:
        raise InputError(f"{label}:1: no 'prompt' column (columns: "
                         f"{', '.join(reader.fieldnames)})")
    stem = Path(label).stem
    records = []
    for row in reader:
        n = reader.line_num
        if not any((v or "").strip() for v in row.values()):
            continue
        row = {k: v for k, v in row.items() if k and v not in (None, "")}
        if "prompt" not in row:
            raise InputError(f"{label}:{n}: empty 'prompt'")
        records.append(_record(row, f"{label}:{n}", f"{stem}-{n}", strict=False))
    return records


def _from_text(text: str, label: str) -> list[PromptRecord]:
    stem = Path(label).stem
    return [PromptRecord(f"{stem}-{n}", line.strip(), where=f"{label}:{n}")
            for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _check_ids(records: list[PromptRecord], label: str) -> None:
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise InputError(f"{label}: duplicate id {r.id!r}")
        seen.add(r.id)
