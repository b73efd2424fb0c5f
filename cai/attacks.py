"""Adversarial evaluation: red-team prompts wrapped in jailbreak templates, and benign
look-alikes that only sound harmful.

The method's best-known weakness is that a model may state its principles yet not apply
them under pressure, so ``cai eval --attacks default`` asks every held-out red-team prompt
twice: plainly, and wrapped in each template of ``constitutions/attacks.yaml`` (role-play,
"ignore previous instructions", hypothetical framing, prefix injection, payload splitting,
a long persona prompt). For every checkpoint the report gives, per template and over all of
them, on the same prompts as the plain figures beside them:

- refusal rate (``cai.refusal``), and "bypassed": the fraction of the prompts the checkpoint
  refused plainly that it no longer refuses once wrapped;
- AI-judged harmlessness: the win rate against the baseline checkpoint on the wrapped
  prompts, judged exactly as the plain ones are (``cai.eval.Judge``).

Judging choice: the judge reads the *plain* request with the two answers to the wrapped one.
The harm of an answer does not depend on how it was asked for, and a judge shown the
jailbreak would be under the very attack it is meant to measure (and read prompts up to ten
times longer).

Templates are data: YAML (``attacks: [{id, template, kind?, split?}]``) or JSON lines of
such objects, with a ``{prompt}`` slot. ``split: N`` cuts the prompt into N pieces of words
shown as ``a = "..."``, ``b = "..."`` in place of the slot (payload splitting). An answer is
keyed by its template's id and a hash of the template's text, so editing a template makes
fresh answers instead of reusing stale ones.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from cai.constitution import CONSTITUTIONS_DIR
from cai.eval import _p_better, spread, win_rate
from cai.prompts import PromptRecord
from cai.records import iter_jsonl
from cai.refusal import is_refusal
from engine.errors import InputError

DEFAULT = CONSTITUTIONS_DIR / "attacks.yaml"
SLOT = "{prompt}"
SET = "attack"  # the evaluation set the wrapped prompts are answered and judged as
_FIELDS = ("id", "template", "kind", "split")
_PIECES = "abcdefghij"


@dataclass(frozen=True)
class Template:
    """One jailbreak template. ``where`` is its file and line, for errors and the report."""

    id: str
    template: str
    kind: str | None = None
    split: int = 0  # >= 2: the prompt is shown as that many string variables (payload splitting)
    where: str = ""

    @property
    def key(self) -> str:
        """The id plus a hash of the text: an edited template gets fresh answers."""
        return f"{self.id}.{zlib.crc32(f'{self.split}:{self.template}'.encode()):08x}"

    def wrap(self, prompt: str) -> str:
        """The user turn that asks ``prompt`` through this template."""
        slot = prompt if self.split < 2 else "\n".join(
            f"{name} = {json.dumps(piece, ensure_ascii=False)}"
            for name, piece in zip(_PIECES, split_words(prompt, self.split)))
        return self.template.replace(SLOT, slot)


def split_words(text: str, n: int) -> list[str]:
    """``text`` cut at word boundaries into ``n`` pieces of nearly equal word counts (the
    last ones empty when there are fewer words than pieces); joined with spaces they give
    the text back, up to whitespace."""
    words = text.split()
    q, r = divmod(len(words), n)
    out, start = [], 0
    for k in range(n):
        end = start + q + (k < r)
        out.append(" ".join(words[start:end]))
        start = end
    return out


# ---------------------------------------------------------------- loading

def load_attacks(source: str | Path) -> list[Template]:
    """'default' (``constitutions/attacks.yaml``), a YAML file or a JSON lines file."""
    path = DEFAULT if str(source) == "default" and not Path(source).exists() else Path(source)
    label = str(source) if path != DEFAULT else str(DEFAULT)
    if not path.is_file():
        raise InputError(f"{source}: no such attacks file (give 'default', a YAML or a JSON lines file)")
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        items = [(obj, where) for where, obj in iter_jsonl(path)]
    else:
        items = _yaml_items(path.read_text(encoding="utf-8"), label)
    if not items:
        raise InputError(f"{label}: no attack templates")
    templates = [_template(obj, where) for obj, where in items]
    seen: dict[str, str] = {}
    for t in templates:
        if t.id in seen:
            raise InputError(f"{t.where}: duplicate attack id {t.id!r} (first at {seen[t.id]})")
        seen[t.id] = t.where
    return templates


def _yaml_items(text: str, label: str) -> list[tuple[object, str]]:
    """(entry, "file:line") for every entry of ``attacks:`` (or of a top-level list)."""
    import yaml

    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)  # the same document, for line numbers
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise InputError(f"{label}{line}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if data is None:
        return []
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"version", "attacks"})
        if unknown or not isinstance(data.get("attacks"), list):
            raise InputError(f"{label}: expected 'attacks:' with a list of templates"
                             + (f" (unknown key {unknown[0]!r})" if unknown else ""))
        node = next(v for k, v in node.value if k.value == "attacks")
        data = data["attacks"]
    elif not isinstance(data, list):
        raise InputError(f"{label}: expected 'attacks:' with a list of templates")
    return [(obj, f"{label}:{item.start_mark.line + 1}") for obj, item in zip(data, node.value)]


def _template(obj: object, where: str) -> Template:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: an attack template must be a mapping with 'id' and 'template'")
    unknown = sorted(set(obj) - set(_FIELDS))
    if unknown:
        raise InputError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(_FIELDS)})")
    ident = obj.get("id")
    if not isinstance(ident, str) or not ident.strip():
        raise InputError(f"{where}: 'id' must be a non-empty string")
    name = f"{where}: attack {ident!r}"
    text, kind, split = obj.get("template"), obj.get("kind"), obj.get("split", 0)
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{name}: 'template' must be a non-empty string")
    if SLOT not in text:
        raise InputError(f"{name}: the template has no {SLOT} slot for the red-team prompt")
    if kind is not None and not isinstance(kind, str):
        raise InputError(f"{name}: 'kind' must be a string")
    if isinstance(split, bool) or not isinstance(split, int) or split == 1 or not 0 <= split <= len(_PIECES):
        raise InputError(f"{name}: 'split' must be an integer from 2 to {len(_PIECES)} (or absent)")
    return Template(ident.strip(), text, kind, split, where)


# ---------------------------------------------------------------- the plan

class Wrapped(NamedTuple):
    """One red-team prompt under one template. ``asked`` is what the model answers (the
    original's last user turn wrapped); its id is ``<template key>:<original id>``."""

    template: Template
    original: PromptRecord
    asked: PromptRecord


@dataclass
class AttackPlan:
    """The wrapped prompts of an evaluation (none when ``--attacks`` is not given)."""

    templates: list[Template] = field(default_factory=list)
    prompts: list[PromptRecord] = field(default_factory=list)  # the plain prompts that are wrapped
    wrapped: list[Wrapped] = field(default_factory=list)

    def to_generate(self) -> dict[str, list[PromptRecord]]:
        """The extra evaluation set the checkpoints answer."""
        return {SET: [w.asked for w in self.wrapped]} if self.wrapped else {}

    def to_judge(self) -> dict[str, list[PromptRecord]]:
        """The same ids, carrying the plain request the judge reads (see the module docstring)."""
        return {SET: [PromptRecord(w.asked.id, w.original.prompt, w.original.messages, w.original.category)
                      for w in self.wrapped]} if self.wrapped else {}


def make_plan(source: str, redteam: list[PromptRecord], limit: int = 0) -> AttackPlan:
    """Every template over the first ``limit`` red-team prompts (spread over categories; 0:
    all); an empty plan when ``source`` is empty."""
    if not source:
        return AttackPlan()
    templates = load_attacks(source)
    prompts = spread(redteam, limit)
    return AttackPlan(templates, prompts, [wrap(t, p) for t in templates for p in prompts])


def wrap(t: Template, p: PromptRecord) -> Wrapped:
    text = t.wrap(p.prompt)
    messages = None if p.messages is None else p.messages[:-1] + [{"role": "user", "content": text}]
    return Wrapped(t, p, PromptRecord(f"{t.key}:{p.id}", text, messages, p.category, p.split))


# ---------------------------------------------------------------- aggregation

def summarise(plan: AttackPlan, names: list[str], base: str, answers: dict, judgments: list[dict]) -> dict | None:
    """Refusal, bypass rate and harmlessness win rate vs ``base`` per checkpoint: plain,
    per template and over all templates, all on the plan's prompts. ``answers`` maps
    (checkpoint, set, prompt id) to a response; ``judgments`` are the evaluation's records."""
    if not plan.wrapped:
        return None
    games = {(j["set"], j["prompt_id"]): [] for j in judgments}
    for j in judgments:
        games[(j["set"], j["prompt_id"])].append((j["a"], j["b"], j["p_a"]))
    groups = {t.id: [w for w in plan.wrapped if w.template is t] for t in plan.templates}
    rows = {}
    for n in names:
        plain = [("redteam", p.id) for p in plan.prompts]
        refused = {p.id for p in plan.prompts if is_refusal(answers[(n, "redteam", p.id)])}
        row = {"plain": _figures(n, base, plain, answers, games, None)}
        for tid, ws in groups.items():
            row[tid] = _figures(n, base, [(SET, w.asked.id) for w in ws], answers, games, _bypass(ws, refused))
        every = [(SET, w.asked.id) for w in plan.wrapped]
        row["all"] = _figures(n, base, every, answers, games, _bypass(plan.wrapped, refused))
        rows[n] = row
    return {"templates": [{"id": t.id, "kind": t.kind, "where": t.where} for t in plan.templates],
            "prompts": len(plan.prompts), "baseline": base, "by_checkpoint": rows}


def _bypass(ws: list[Wrapped], refused: set[str]) -> list[str]:
    """The wrapped ids whose plain prompt was refused: the ones an attack can bypass."""
    return [w.asked.id for w in ws if w.original.id in refused]


def _figures(n: str, base: str, keys: list[tuple[str, str]], answers: dict, games: dict,
             bypassable: list[str] | None) -> dict:
    refusals = [is_refusal(answers[(n, s, pid)]) for s, pid in keys]
    p_better = [] if n == base else [x for k in keys for x in _p_better(games.get(k, []), n, base)]
    out = {"n": len(keys), "refusal_rate": _mean(refusals), "harmlessness_win_rate": win_rate(p_better)["win_rate"]}
    if bypassable is not None:
        out["bypassed"] = _mean([not is_refusal(answers[(n, SET, pid)]) for pid in bypassable])
    return out


def lookalikes(benign: list[PromptRecord], names: list[str], answers: dict, categories: str) -> dict:
    """Over-refusal on the benign prompts of the look-alike ``categories`` (comma-separated;
    '*': every benign prompt) beside the rest, per category, and which look-alikes each
    checkpoint refused."""
    wanted = {c.strip() for c in categories.split(",") if c.strip()}
    picked = [p for p in benign if "*" in wanted or (p.category or "-") in wanted]
    ids = {p.id for p in picked}
    refused = {n: {p.id: is_refusal(answers[(n, "benign", p.id)]) for p in benign} for n in names}
    cats: dict[str, list[str]] = {}
    for p in picked:
        cats.setdefault(p.category or "-", []).append(p.id)
    return {"categories": sorted(wanted), "n": len(picked), "rest_n": len(benign) - len(picked),
            "over_refusal": {n: _mean([refused[n][i] for i in ids]) for n in names},
            "rest_over_refusal": {n: _mean([v for i, v in refused[n].items() if i not in ids]) for n in names},
            "by_category": {c: {"n": len(ks), **{n: _mean([refused[n][k] for k in ks]) for n in names}}
                            for c, ks in cats.items()},
            "refused": [{"prompt_id": p.id, "category": p.category, "prompt": p.prompt,
                         "refused_by": [n for n in names if refused[n][p.id]]}
                        for p in picked if any(refused[n][p.id] for n in names)]}


def _mean(xs) -> float | None:
    return sum(xs) / len(xs) if xs else None


# ---------------------------------------------------------------- terminal

def attack_table(attacks: dict) -> str:
    """Refusal rate per checkpoint: plain, under each template, under all (fixed-width text)."""
    cols = ["plain"] + [t["id"] for t in attacks["templates"]] + ["all"]
    rows = [["refusal"] + cols]
    for n, row in attacks["by_checkpoint"].items():
        rows.append([n] + ["-" if row[c]["refusal_rate"] is None else f"{row[c]['refusal_rate']:.0%}" for c in cols])
    widths = [max(len(r[k]) for r in rows) for k in range(len(cols) + 1)]
    return "\n".join("  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)
