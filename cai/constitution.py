"""Constitutions: the written rules SL-CAI critiques against and the labeller judges by.

A constitution holds critique/revision request pairs (stage 1: one pair is drawn for every
round of every example), preference principles (stage 2: "which response is better under
P"), and few-shot exemplars for both. ``load_constitution`` reads three formats into the
same typed ``Constitution``:

- our YAML (``constitutions/default.yaml``; fields in ``constitutions/SCHEMA.md``);
- the open-recipe JSON ``{"constitutions": [{"critic", "revision"}], "system_chat": [...]}``;
- a folder holding the paper repository's JSON files (``cai.constitution_formats``).

Unlike the open recipes, a malformed entry is never skipped: every problem is an
``InputError`` that names the file and the entry, because a silently dropped principle
changes what the model is trained towards.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from engine.errors import InputError

CONSTITUTIONS_DIR = Path(__file__).resolve().parent.parent / "constitutions"

Message = dict[str, str]  # {"role": "user" | "assistant", "content": str}

# What a comparison is judged for: harmlessness (red-team prompts) or helpfulness (benign
# prompts). A principle tagged with some of these judges only those; untagged, it judges both.
ASPECTS = ("harmlessness", "helpfulness")


@dataclass
class CritiqueRevision:
    """One SL-CAI request pair. ``critique`` asks the model to find what is wrong with its
    last answer; ``revision`` asks it to rewrite the answer accordingly. Both are bare
    requests: the "Critique Request:" framing is added by ``cai.prompting``."""

    id: str
    critique: str
    revision: str
    tags: list[str] = field(default_factory=list)  # harm categories, for reporting


@dataclass
class Principle:
    """One preference principle for AI labelling, e.g. "Which of these responses is less
    harmful?". Bare text: the "Options:" framing is added by ``cai.prompting``. ``tags``:
    the aspects (``ASPECTS``) it judges; empty judges every comparison."""

    id: str
    text: str
    tags: list[str] = field(default_factory=list)

    def judges(self, aspect: str | None) -> bool:
        return aspect is None or not self.tags or aspect in self.tags


@dataclass
class FewShotCritiqueRevision:
    """A worked SL-CAI example: a conversation ending with the assistant answer under
    critique, the requests used, the critique and the revised answer."""

    id: str
    conversation: list[Message]  # alternating user/assistant, ends with the assistant
    critique_request: str
    critique: str
    revision_request: str
    revision: str
    kind: str = "harmful"  # "harmful" (the answer needed fixing) or "helpful" (it did not)


@dataclass
class FewShotPreference:
    """A worked multiple-choice label: which of two responses to ``conversation`` is
    better. ``principle`` is the principle text, or None to show the exemplar under the
    principle of the comparison being labelled."""

    id: str
    conversation: list[Message]  # alternating user/assistant, ends with the user
    response_a: str
    response_b: str
    answer: str  # "A" or "B"
    principle: str | None = None
    reasoning: str | None = None  # for the chain-of-thought prompt; None: not shown


@dataclass
class Constitution:
    """Everything both stages need. Lists may be empty only when the source format has no
    place for them (the open-recipe JSON has no preference principles); ``require`` lets a
    stage fail early with a message naming the file."""

    critique_revision: list[CritiqueRevision]
    principles: list[Principle]
    fewshot_critique_revision: list[FewShotCritiqueRevision]
    fewshot_preference: list[FewShotPreference]
    source: str  # the path it was read from, for messages and provenance
    name: str = ""

    def counts(self) -> dict[str, int]:
        return {
            "critique_revision_pairs": len(self.critique_revision),
            "preference_principles": len(self.principles),
            "fewshot_critique_revision": len(self.fewshot_critique_revision),
            "fewshot_preference": len(self.fewshot_preference),
        }

    def principles_for(self, aspect: str | None) -> list[Principle]:
        """The principles that judge a comparison of ``aspect`` ("harmlessness" for red-team
        prompts, "helpfulness" for benign ones): those tagged with it and the untagged ones;
        None: every principle. Raises InputError when none is left."""
        if aspect is not None and aspect not in ASPECTS:
            raise InputError(f"aspect must be one of {', '.join(ASPECTS)} (got {aspect!r})")
        pool = [p for p in self.principles if p.judges(aspect)]
        if not pool:
            raise InputError(f"{self.source}: no principle judges {aspect} (tagged {aspect!r}, "
                             f"or untagged)")
        return pool

    def require(self, *fields: str) -> None:
        """Raise InputError if any named list (e.g. "principles") is empty."""
        for name in fields:
            if not getattr(self, name):
                raise InputError(f"{self.source}: has no {name.replace('_', ' ')}, "
                                 f"which this stage needs")


class Check:
    """Validation helpers that raise InputError naming the file and the entry."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, message: str) -> None:
        raise InputError(f"{self.source}: {where}: {message}" if where
                         else f"{self.source}: {message}")

    @staticmethod
    def where(section: str, index: int, entry: Any) -> str:
        ident = entry.get("id") if isinstance(entry, dict) else None
        return f"{section}[{index}]" + (f" (id {ident!r})" if isinstance(ident, str) else "")

    def fields(self, obj: Any, where: str, required: tuple[str, ...],
               optional: tuple[str, ...] = ()) -> dict:
        if not isinstance(obj, dict):
            self.fail(where, f"expected a mapping, got {type(obj).__name__}")
        unknown = sorted(set(obj) - set(required) - set(optional))
        if unknown:
            self.fail(where, f"unknown field {unknown[0]!r} (allowed: "
                      f"{', '.join(required + optional)})")
        for key in required:
            if key not in obj:
                self.fail(where, f"missing {key!r}")
        return obj

    def text(self, value: Any, where: str, key: str) -> str:
        if not isinstance(value, str):
            self.fail(where, f"{key!r} must be a string, got {type(value).__name__}")
        if not value.strip():
            self.fail(where, f"{key!r} is empty")
        return value.strip()

    def items(self, value: Any, where: str, key: str) -> list:
        if not isinstance(value, list):
            self.fail(where, f"{key!r} must be a list, got {type(value).__name__}")
        if not value:
            self.fail(where, f"{key!r} is an empty list")
        return value

    def messages(self, value: Any, where: str, key: str, last: str) -> list[Message]:
        """Alternating user/assistant turns starting with the user, ending with ``last``."""
        turns = self.items(value, where, key)
        out: list[Message] = []
        for i, turn in enumerate(turns):
            at = f"{where}: {key}[{i}]"
            self.fields(turn, at, ("role", "content"))
            want = "user" if i % 2 == 0 else "assistant"
            if turn["role"] != want:
                self.fail(at, f"role must be {want!r} (turns alternate, user first), "
                          f"got {turn['role']!r}")
            out.append({"role": want, "content": self.text(turn["content"], at, "content")})
        if out[-1]["role"] != last:
            self.fail(where, f"{key!r} must end with a turn of role {last!r}")
        return out

    def unique_ids(self, entries: list, section: str) -> None:
        seen: set[str] = set()
        for i, entry in enumerate(entries):
            if entry.id in seen:
                self.fail(f"{section}[{i}] (id {entry.id!r})", "duplicate id")
            seen.add(entry.id)


_TOP = ("critique_revision", "principles")
_TOP_OPTIONAL = ("version", "name", "description", "fewshot_critique_revision",
                 "fewshot_preference")


def load_constitution(path: str | Path) -> Constitution:
    """Read a constitution: a built-in name (``default``), our YAML, an open-recipe JSON,
    or a folder (or one file) of the paper repository's JSON files."""
    from cai import constitution_formats as formats  # it imports this module's types

    p = resolve_path(path)
    if p.is_dir():
        return formats.load_paper_folder(p, label=str(path))
    if p.suffix.lower() in (".yaml", ".yml"):
        return load_yaml(p, label=str(path))
    if p.suffix.lower() == ".json":
        if p.name in formats.PAPER_FILES:
            return formats.load_paper_files({p.name: p}, label=str(path))
        return formats.load_open_recipe(p, label=str(path))
    raise InputError(f"{path}: unknown constitution format (expected .yaml, .json or a "
                     f"folder of the paper repository's files)")


BUILTIN_PREFIX = "builtin:"


def builtin_name(source: str, names, what: str, warn: bool = False) -> str | None:
    """The built-in ``source`` names (``default`` or ``builtin:default``), else None.

    A plain name always means the built-in, so that a file or folder of that name in the
    current folder cannot replace it unnoticed; with ``warn`` such a clash is reported, with
    the spelling that reads the file instead.
    """
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        if name not in names:
            raise InputError(f"{source}: no built-in {what} of that name (built-in: {', '.join(sorted(names))})")
        return name
    if source not in names:
        return None
    if warn and Path(source).exists():
        print(f"warning: '{source}' is the built-in {what}; the {'folder' if Path(source).is_dir() else 'file'} "
              f"'{source}' here is not read (write ./{source} to use it)", file=sys.stderr)
    return source


def resolve_path(path: str | Path) -> Path:
    names = tuple(sorted(q.stem for q in CONSTITUTIONS_DIR.glob("*.yaml")))
    name = builtin_name(path, names, "constitution", warn=True) if isinstance(path, str) else None
    if name is not None:
        return CONSTITUTIONS_DIR / f"{name}.yaml"
    p = Path(path)
    if p.exists():
        return p
    raise InputError(f"{path}: no such file or folder, and not a built-in constitution "
                     f"(built-in: {', '.join(names) or 'none'}; also spelled builtin:NAME)")


def load_yaml(path: Path, label: str | None = None) -> Constitution:
    from cai.records import read_text

    check = Check(label or str(path))
    text = read_text(path, check.source)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InputError(f"{check.source}: not valid YAML: {exc}") from None
    if data is None:
        check.fail("", "empty file")
    check.fields(data, "top level", _TOP, _TOP_OPTIONAL)
    pairs = [_pair(check, check.where("critique_revision", i, e), e)
             for i, e in enumerate(check.items(data["critique_revision"], "top level",
                                               "critique_revision"))]
    check.unique_ids(pairs, "critique_revision")
    principles = [_principle(check, check.where("principles", i, e), e)
                  for i, e in enumerate(check.items(data["principles"], "top level",
                                                    "principles"))]
    check.unique_ids(principles, "principles")
    by_pair = {p.id: p for p in pairs}
    by_principle = {p.id: p for p in principles}
    shots_cr, shots_pref = [], []
    if "fewshot_critique_revision" in data:
        items = check.items(data["fewshot_critique_revision"], "top level",
                            "fewshot_critique_revision")
        shots_cr = [_shot_cr(check, check.where("fewshot_critique_revision", i, e), e, by_pair)
                    for i, e in enumerate(items)]
        check.unique_ids(shots_cr, "fewshot_critique_revision")
    if "fewshot_preference" in data:
        items = check.items(data["fewshot_preference"], "top level", "fewshot_preference")
        shots_pref = [_shot_pref(check, check.where("fewshot_preference", i, e), e,
                                 by_principle) for i, e in enumerate(items)]
        check.unique_ids(shots_pref, "fewshot_preference")
    name = data.get("name", "")
    if not isinstance(name, str):
        check.fail("top level", "'name' must be a string")
    return Constitution(pairs, principles, shots_cr, shots_pref, check.source, name)


def _pair(check: Check, where: str, e: Any) -> CritiqueRevision:
    check.fields(e, where, ("id", "critique", "revision"), ("tags",))
    tags = e.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
        check.fail(where, "'tags' must be a list of non-empty strings")
    return CritiqueRevision(check.text(e["id"], where, "id"),
                            check.text(e["critique"], where, "critique"),
                            check.text(e["revision"], where, "revision"), list(tags))


def _principle(check: Check, where: str, e: Any) -> Principle:
    check.fields(e, where, ("id", "text"), ("tags",))
    tags = _aspect_tags(check, where, e["tags"]) if "tags" in e else []
    return Principle(check.text(e["id"], where, "id"), check.text(e["text"], where, "text"), tags)


def _aspect_tags(check: Check, where: str, tags: Any) -> list[str]:
    if not isinstance(tags, list) or not tags or any(t not in ASPECTS for t in tags):
        check.fail(where, f"'tags' must be a non-empty list of {' / '.join(ASPECTS)} (got {tags!r}); "
                   "leave it out for a principle that judges both")
    if len(set(tags)) != len(tags):
        check.fail(where, f"'tags' repeats an aspect ({tags!r})")
    return list(tags)


def _shot_cr(check: Check, where: str, e: Any,
             pairs: dict[str, CritiqueRevision]) -> FewShotCritiqueRevision:
    check.fields(e, where, ("id", "kind", "pair", "conversation", "critique", "revision"))
    if e["kind"] not in ("harmful", "helpful"):
        check.fail(where, f"'kind' must be 'harmful' or 'helpful', got {e['kind']!r}")
    pair = pairs.get(check.text(e["pair"], where, "pair"))
    if pair is None:
        check.fail(where, f"'pair' {e['pair']!r} is not a critique_revision id")
    return FewShotCritiqueRevision(
        id=check.text(e["id"], where, "id"),
        conversation=check.messages(e["conversation"], where, "conversation", "assistant"),
        critique_request=pair.critique, critique=check.text(e["critique"], where, "critique"),
        revision_request=pair.revision, revision=check.text(e["revision"], where, "revision"),
        kind=e["kind"])


def _shot_pref(check: Check, where: str, e: Any,
               principles: dict[str, Principle]) -> FewShotPreference:
    check.fields(e, where, ("id", "conversation", "response_a", "response_b", "answer"),
                 ("principle", "reasoning"))
    if e["answer"] not in ("A", "B"):
        check.fail(where, f"'answer' must be 'A' or 'B', got {e['answer']!r}")
    principle = None
    if "principle" in e:
        found = principles.get(check.text(e["principle"], where, "principle"))
        if found is None:
            check.fail(where, f"'principle' {e['principle']!r} is not a principles id")
        principle = found.text
    reasoning = check.text(e["reasoning"], where, "reasoning") if "reasoning" in e else None
    return FewShotPreference(
        id=check.text(e["id"], where, "id"),
        conversation=check.messages(e["conversation"], where, "conversation", "user"),
        response_a=check.text(e["response_a"], where, "response_a"),
        response_b=check.text(e["response_b"], where, "response_b"),
        answer=e["answer"], principle=principle, reasoning=reasoning)
