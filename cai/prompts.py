"""Prompt sets: the built-in red-team and benign sets, and a user's own files.

``load_prompts(source)`` takes a built-in name (``redteam``, ``benign``: JSON Lines in
``constitutions/``; ``builtin:redteam`` is the same, spelled so it cannot be a path) or a path to JSON Lines (``prompt`` or ``messages`` per record), a JSON
array (of such records or of strings), CSV (a ``prompt`` column) or plain text (one prompt
per line, blank lines skipped). Errors name the file and the line. A plain built-in name
always means the built-in set, even when the current folder holds a file of that name (a
warning says so; ``./redteam`` reads the file).

A user's file may name its prompt as public prompt sets do (``goal``, ``question``,
``behavior``: see ``PROMPT_KEYS``, column names matched ignoring case) and its category as
``category``, ``SemanticCategory`` or ``type`` (``CATEGORY_KEYS``); other fields are ignored.

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

from cai.constitution import CONSTITUTIONS_DIR, Message, builtin_name
from engine.errors import InputError

BUILTIN = ("redteam", "benign")
SPLITS = ("train", "heldout")
_ROLES = ("system", "user", "assistant")
PROMPT_KEYS = ("prompt", "goal", "question", "behavior")
"""Field or column names a prompt is read from in a user's file, the first present wins."""
CATEGORY_KEYS = ("category", "semantic_category", "semanticcategory", "harm_category", "type")
"""Field or column names a prompt's category is read from in a user's file."""


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
    builtin = is_builtin(source)
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


def is_builtin(source: str | Path) -> bool:
    """Whether ``source`` names a built-in prompt set (``redteam`` or ``builtin:redteam``)."""
    return isinstance(source, str) and builtin_name(source, BUILTIN, "prompt set") is not None


def _resolve(source: str | Path) -> tuple[Path, bool]:
    name = builtin_name(source, BUILTIN, "prompt set", warn=True) if isinstance(source, str) else None
    if name is not None:
        return CONSTITUTIONS_DIR / f"{name}.jsonl", True
    path = Path(source)
    if not path.is_file():
        raise InputError(f"{source}: no such file, and not a built-in prompt set "
                         f"({', '.join(BUILTIN)})")
    return path, False


def _read_text(path: Path, label: str) -> str:
    from cai.records import read_text

    return read_text(path, label)


def _record(obj: Any, where: str, default_id: str, strict: bool) -> PromptRecord:
    """A JSON object -> PromptRecord. ``strict`` (the built-in sets) requires every field;
    a user's file may carry any extra columns, which are ignored."""
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if strict:
        for key in ("id", "prompt", "category", "split"):
            if key not in obj:
                raise InputError(f"{where}: missing {key!r}")
    else:
        obj = _common_names(obj)
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


def _common_names(obj: dict) -> dict:
    """A public set's record with its prompt and category under our names."""
    lower = {str(k).lower(): k for k in obj}
    out = dict(obj)
    for ours, theirs in (("prompt", PROMPT_KEYS), ("category", CATEGORY_KEYS)):
        key = next((lower[k] for k in theirs if k in lower), None)
        if ours not in obj and key is not None and (ours == "prompt" or isinstance(obj[key], str)):
            out[ours] = obj[key]  # a numeric 'type' field is no category
    return out


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
    if not any(str(f).lower() in PROMPT_KEYS for f in reader.fieldnames):
        raise InputError(f"{label}:1: no 'prompt' column (nor {', '.join(map(repr, PROMPT_KEYS[1:]))}; columns: "
                         f"{', '.join(reader.fieldnames)})")
    stem = Path(label).stem
    records = []
    for row in reader:
        n = reader.line_num
        if not any((v or "").strip() for v in row.values()):
            continue
        row = _common_names({k: v for k, v in row.items() if k and v not in (None, "")})
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
