"""Readers for the published constitution formats, into ``cai.constitution`` types.

- The open-recipe JSON: ``{"constitutions": [{"critic": str, "revision": str}],
  "system_chat": [[{"role", "content"}, ...], ...]}``. Each ``system_chat`` transcript is a
  conversation followed by four turns: the critique request (user), the critique
  (assistant), the revision request (user) and the revision (assistant).
- The paper repository's files, read from one folder (any subset may be present, at least
  one of the two instruction files):
  ``CritiqueRevisionInstructions.json`` (``{"harmful0": {"prompt": [str], "edit_request":
  str}}``), ``RLMadisonInstructions.json`` (a list of principle strings),
  ``CritiqueRevisionFewShotPrompts.json`` (a list of whole transcripts) and
  ``RLMadisonFewShotPrompts.json`` (a list of ``{"prompt", "corrects", "incorrects"}``).

The paper's strings carry their own framing ("CritiqueRequest: ...", "... Options:"); we
strip it and keep bare requests, so every format is rendered by the same prompt builders.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from cai.constitution import (Check, Constitution, CritiqueRevision, FewShotCritiqueRevision,
                              FewShotPreference, Message, Principle)
from engine.errors import InputError

PAPER_FILES = ("CritiqueRevisionInstructions.json", "RLMadisonInstructions.json",
               "CritiqueRevisionFewShotPrompts.json", "RLMadisonFewShotPrompts.json")

# Transcript labels, longest first so "Critique Request" is not read as "Critique".
_LABEL = re.compile(r"(?:^|\n+)[ \t]*(Human|Assistant|Critique ?Request|Critique|"
                    r"Revision ?Request|Revision):[ \t]*")


def _read_json(path: Path, check: Check) -> Any:
    from cai.records import read_text

    text = read_text(path, f"{check.source}/{path.name}" if check.source != str(path) else check.source)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        check.fail("", f"not valid JSON (line {exc.lineno}: {exc.msg})")


def _strip_framing(text: str, request: str, answer: str) -> str:
    """``"\\n\\nCritiqueRequest: Find ... \\n\\nCritique:"`` -> ``"Find ..."``."""
    text = re.sub(rf"^\s*{request} ?Request:\s*", "", text)
    return re.sub(rf"\s*{answer}:\s*$", "", text).strip()


def parse_transcript(text: str) -> list[tuple[str, str]]:
    """Split a Human:/Assistant:/CritiqueRequest:/... transcript into (label, text) turns.
    Labels are normalised ("Critique Request" -> "CritiqueRequest"); a trailing empty
    "Human:" or "Assistant:" (an open turn for the model to fill) is dropped."""
    parts = _LABEL.split(text.strip("\n"))
    if parts[0].strip():
        raise ValueError(f"text before the first label: {parts[0].strip()[:40]!r}")
    turns = [(label.replace(" ", ""), body.strip())
             for label, body in zip(parts[1::2], parts[2::2])]
    if turns and not turns[-1][1] and turns[-1][0] in ("Human", "Assistant"):
        turns.pop()
    return turns


def _conversation(turns: list[tuple[str, str]], last: str) -> list[Message]:
    """Human/Assistant turns -> messages, alternating from the user, ending with ``last``."""
    if not turns:
        raise ValueError("no Human:/Assistant: conversation")
    messages = []
    for i, (label, body) in enumerate(turns):
        want = "Human" if i % 2 == 0 else "Assistant"
        if label != want:
            raise ValueError(f"turn {i} is {label!r}, expected {want!r}")
        if not body:
            raise ValueError(f"turn {i} ({label}) is empty")
        messages.append({"role": "user" if want == "Human" else "assistant", "content": body})
    if messages[-1]["role"] != last:
        label = "a Human" if last == "user" else "an Assistant"
        raise ValueError(f"the conversation must end with {label} turn")
    return messages


# ---------------------------------------------------------------- open-recipe JSON

def load_open_recipe(path: Path, label: str | None = None) -> Constitution:
    check = Check(label or str(path))
    data = _read_json(path, check)
    check.fields(data, "top level", ("constitutions",), ("system_chat",))
    pairs = []
    for i, e in enumerate(check.items(data["constitutions"], "top level", "constitutions")):
        where = f"constitutions[{i}]"
        check.fields(e, where, ("critic", "revision"))
        pairs.append(CritiqueRevision(f"critic{i}", check.text(e["critic"], where, "critic"),
                                      check.text(e["revision"], where, "revision")))
    shots = []
    if "system_chat" in data:
        for i, chat in enumerate(check.items(data["system_chat"], "top level", "system_chat")):
            shots.append(_system_chat(check, f"system_chat[{i}]", chat, f"system_chat{i}"))
    return Constitution(pairs, [], shots, [], check.source, name=path.stem)


def _system_chat(check: Check, where: str, chat: Any, ident: str) -> FewShotCritiqueRevision:
    messages = check.messages(chat, where, "transcript", "assistant")
    if len(messages) < 6:
        check.fail(where, "needs a conversation and then four turns: critique request, "
                   f"critique, revision request, revision (got {len(messages)} turns)")
    *conversation, crit_req, crit, rev_req, rev = messages
    return FewShotCritiqueRevision(
        ident, conversation, crit_req["content"], crit["content"], rev_req["content"],
        rev["content"], kind=_kind(conversation, rev["content"]))


def _kind(conversation: list[Message], revision: str) -> str:
    # The published exemplars are not tagged; one whose revision leaves the answer as it
    # was teaches "keep a good answer", which is what our 'helpful' kind means.
    return "helpful" if revision.strip() == conversation[-1]["content"].strip() else "harmful"


# ---------------------------------------------------------------- the paper's files

def load_paper_folder(folder: Path, label: str | None = None) -> Constitution:
    found = {name: folder / name for name in PAPER_FILES if (folder / name).is_file()}
    if not any(n in found for n in PAPER_FILES[:2]):
        raise InputError(f"{label or folder}: not a constitution folder: expected "
                         f"{PAPER_FILES[0]} and/or {PAPER_FILES[1]} in it")
    return load_paper_files(found, label=label or str(folder))


def load_paper_files(files: dict[str, Path], label: str) -> Constitution:
    """Read whichever of the paper's files are given (name -> path)."""
    def each(name, reader):
        if name not in files:
            return []
        check = Check(str(files[name]))
        return reader(check, _read_json(files[name], check))

    return Constitution(each(PAPER_FILES[0], _paper_pairs),
                        each(PAPER_FILES[1], _paper_principles),
                        each(PAPER_FILES[2], _paper_shots_cr),
                        each(PAPER_FILES[3], _paper_shots_pref), source=label, name="paper")


def _paper_pairs(check: Check, data: Any) -> list[CritiqueRevision]:
    if not isinstance(data, dict) or not data:
        check.fail("top level", "expected a non-empty mapping of name -> "
                   "{\"prompt\": [str], \"edit_request\": str}")
    pairs = []
    for key, e in data.items():
        where = f"{key!r}"
        check.fields(e, where, ("prompt", "edit_request"))
        revision = _strip_framing(check.text(e["edit_request"], where, "edit_request"),
                                  "Revision", "Revision")
        prompts = check.items(e["prompt"], where, "prompt")
        for j, text in enumerate(prompts):
            critique = _strip_framing(check.text(text, f"{where}: prompt[{j}]", "prompt"),
                                      "Critique", "Critique")
            if not critique or not revision:
                check.fail(where, "request is empty once its framing is removed")
            ident = key if len(prompts) == 1 else f"{key}.{j}"
            pairs.append(CritiqueRevision(ident, critique, revision))
    return pairs


def _paper_principles(check: Check, data: Any) -> list[Principle]:
    items = check.items(data, "top level", "principles")
    out = []
    for i, text in enumerate(items):
        body = re.sub(r"\s*Options:\s*$", "", check.text(text, f"[{i}]", "principle")).strip()
        if not body:
            check.fail(f"[{i}]", "principle is empty once 'Options:' is removed")
        out.append(Principle(f"principle{i}", body))  # untagged: the files say nothing of aspects
    return out


def _paper_shots_cr(check: Check, data: Any) -> list[FewShotCritiqueRevision]:
    shots = []
    for i, text in enumerate(check.items(data, "top level", "transcripts")):
        where = f"[{i}]"
        try:
            turns = parse_transcript(check.text(text, where, "transcript"))
            labels = [label for label, _ in turns]
            tail = ["CritiqueRequest", "Critique", "RevisionRequest", "Revision"]
            for name in tail:
                if name not in labels:
                    raise ValueError(f"missing '{name}:'")
            if labels[-4:] != tail:
                raise ValueError("must end with CritiqueRequest:, Critique:, RevisionRequest:, "
                                 f"Revision: in that order (got {', '.join(labels[-4:])})")
            conversation = _conversation(turns[:-4], last="assistant")
        except ValueError as exc:
            check.fail(where, str(exc))
        (_, crit_req), (_, crit), (_, rev_req), (_, rev) = turns[-4:]
        if not all((crit_req, crit, rev_req, rev)):
            check.fail(where, "a critique or revision turn is empty")
        shots.append(FewShotCritiqueRevision(f"fewshot{i}", conversation, crit_req, crit,
                                             rev_req, rev, kind=_kind(conversation, rev)))
    return shots


def _paper_shots_pref(check: Check, data: Any) -> list[FewShotPreference]:
    shots = []
    for i, e in enumerate(check.items(data, "top level", "examples")):
        where = f"[{i}]"
        check.fields(e, where, ("prompt", "corrects", "incorrects"))
        try:
            turns = parse_transcript(check.text(e["prompt"], where, "prompt"))
            conversation = _conversation(turns, last="user")
        except ValueError as exc:
            check.fail(where, str(exc))
        corrects = [check.text(t, where, "corrects")
                    for t in check.items(e["corrects"], where, "corrects")]
        wrongs = [check.text(t, where, "incorrects")
                  for t in check.items(e["incorrects"], where, "incorrects")]
        for good in corrects:
            for bad in wrongs:
                # Alternate the correct option's position so the exemplars teach no A/B bias.
                a, b, answer = (good, bad, "A") if len(shots) % 2 == 0 else (bad, good, "B")
                shots.append(FewShotPreference(f"example{len(shots)}", conversation, a, b,
                                               answer))
    return shots
