"""Model inputs for SL-CAI (answer, critique, revise) and for AI feedback labels, and the
cleaning of what the model writes back.

Two styles, one set of builders:

- ``"base"``: a Human:/Assistant: transcript string in the paper's formats, with the
  few-shot exemplars prepended (Bai et al. 2022, sections 3 and 4):
  ``... Critique Request: ... Critique:`` / ``... Revision Request: ... Revision:``, and
  ``Consider the following conversation between a human and an assistant: ... Options:
  (A) ... (B) ... The answer is:``.
- ``"chat"``: a list of ``{"role", "content"}`` messages for the tokenizer's chat template.
  Exemplars become earlier user/assistant turns, as the open recipes do. When the last
  message is the assistant's, it is a prefix the model continues ("The answer is:"):
  render it with ``continue_final_message=True`` (``render`` does).

Deviation from the paper and the open recipes: chat prompts keep at most
``DEFAULT_MAX_FEWSHOT["chat"]`` exemplars unless told otherwise, because a 135M chat model
drifts into copying exemplars when it is shown many; base prompts keep them all.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from cai.constitution import (CritiqueRevision, FewShotCritiqueRevision, FewShotPreference,
                              Message, Principle)
from engine.errors import InputError

STYLES = ("chat", "base")
DEFAULT_MAX_FEWSHOT: dict[str, int | None] = {"chat": 2, "base": None}
OPTIONS = (" (A)", " (B)")  # the continuations the labeller scores after "The answer is:"
ANSWER_CUE = "The answer is:"
COT_CUE = "Let's think step by step:"
_KEEP = object()  # default for max_fewshot: the style's default

Prompt = str | list[Message]


# ---------------------------------------------------------------- shared pieces

def _check_style(style: str) -> None:
    if style not in STYLES:
        raise InputError(f"prompt style must be one of {', '.join(STYLES)}, got {style!r}")


def _take(fewshot: Sequence, style: str, max_fewshot) -> list:
    k = DEFAULT_MAX_FEWSHOT[style] if max_fewshot is _KEEP else max_fewshot
    return list(fewshot) if k is None else list(fewshot)[:max(k, 0)]


def as_conversation(conversation: str | Sequence[Message]) -> list[Message]:
    """A bare prompt string is a one-turn conversation."""
    if isinstance(conversation, str):
        return [{"role": "user", "content": conversation}]
    return [dict(m) for m in conversation]


def transcript(conversation: Sequence[Message], sep: str = "\n\n") -> str:
    """Messages -> ``Human: ...`` / ``Assistant: ...`` text (system turns are dropped)."""
    names = {"user": "Human", "assistant": "Assistant"}
    return sep.join(f"{names[m['role']]}: {m['content'].strip()}"
                    for m in conversation if m["role"] in names)


# ---------------------------------------------------------------- SL-CAI

def initial_prompt(prompt: str | Sequence[Message], style: str) -> Prompt:
    """The red-team prompt as the model's first input; the model writes the answer."""
    _check_style(style)
    conversation = as_conversation(prompt)
    if style == "chat":
        return conversation
    return transcript(conversation) + "\n\nAssistant:"


def critique_prompt(conversation: Sequence[Message], pair: CritiqueRevision, style: str,
                    fewshot: Sequence[FewShotCritiqueRevision] = (),
                    max_fewshot=_KEEP) -> Prompt:
    """``conversation`` ends with the assistant answer to criticise; the model writes the
    critique of it under ``pair.critique``."""
    _check_style(style)
    shots = _take(fewshot, style, max_fewshot)
    if style == "chat":
        return [*_chat_shots(shots), *as_conversation(conversation),
                {"role": "user", "content": pair.critique}]
    return _base_shots(shots) + (f"{transcript(conversation)}\n\n"
                                 f"Critique Request: {pair.critique}\n\nCritique:")


def revision_prompt(conversation: Sequence[Message], critique: str, pair: CritiqueRevision,
                    style: str, fewshot: Sequence[FewShotCritiqueRevision] = (),
                    max_fewshot=_KEEP) -> Prompt:
    """The critique prompt plus the model's ``critique`` and ``pair.revision``; the model
    writes the revised answer."""
    _check_style(style)
    shots = _take(fewshot, style, max_fewshot)
    if style == "chat":
        return [*_chat_shots(shots), *as_conversation(conversation),
                {"role": "user", "content": pair.critique},
                {"role": "assistant", "content": critique.strip()},
                {"role": "user", "content": pair.revision}]
    return _base_shots(shots) + (
        f"{transcript(conversation)}\n\nCritique Request: {pair.critique}\n\n"
        f"Critique: {critique.strip()}\n\nRevision Request: {pair.revision}\n\nRevision:")


def _chat_shots(shots: Sequence[FewShotCritiqueRevision]) -> list[Message]:
    turns: list[Message] = []
    for s in shots:
        turns += [*as_conversation(s.conversation),
                  {"role": "user", "content": s.critique_request},
                  {"role": "assistant", "content": s.critique},
                  {"role": "user", "content": s.revision_request},
                  {"role": "assistant", "content": s.revision}]
    return turns


def _base_shots(shots: Sequence[FewShotCritiqueRevision]) -> str:
    return "".join(
        f"{transcript(s.conversation)}\n\nCritique Request: {s.critique_request}\n\n"
        f"Critique: {s.critique}\n\nRevision Request: {s.revision_request}\n\n"
        f"Revision: {s.revision}\n\n" for s in shots)


# ---------------------------------------------------------------- AI feedback

def _question(conversation: Sequence[Message], a: str, b: str, principle: str) -> str:
    """The paper's multiple-choice block, up to (not including) the answer cue."""
    return ("Consider the following conversation between a human and an assistant:\n"
            f"{transcript(conversation, sep=chr(10))}\n{principle.strip()}\n"
            f"Options:\n(A) {a.strip()}\n(B) {b.strip()}")


def feedback_prompt(conversation: str | Sequence[Message], response_a: str, response_b: str,
                    principle: Principle | str, style: str,
                    fewshot: Sequence[FewShotPreference] = (), max_fewshot=_KEEP,
                    cot: bool = False) -> Prompt:
    """Ask which of two responses to ``conversation`` (ending with the human's turn) is
    better under ``principle``. Ends with ``The answer is:`` so that the log-probs of
    ``OPTIONS`` can be compared, or with ``Let's think step by step:`` when ``cot`` (sample
    the reasoning, then score ``feedback_answer_prompt``). In chain-of-thought mode only
    exemplars with ``reasoning`` are shown."""
    _check_style(style)
    text = principle.text if isinstance(principle, Principle) else principle
    conv = as_conversation(conversation)
    if not conv or conv[-1]["role"] != "user":
        raise ValueError("feedback conversation must end with the human turn both "
                         "responses answer")
    shots = _take([s for s in fewshot if s.reasoning or not cot], style, max_fewshot)
    cue = COT_CUE if cot else ANSWER_CUE
    turns = []  # (question, worked answer) per exemplar
    for s in shots:
        answer = f"The answer is: ({s.answer})"
        if cot:
            answer = f"{COT_CUE} {s.reasoning.strip()}\n{answer}"
        turns.append((_question(s.conversation, s.response_a, s.response_b,
                                s.principle or text), answer))
    question = _question(conv, response_a, response_b, text)
    if style == "chat":
        messages: list[Message] = []
        for q, a in turns:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return messages + [{"role": "user", "content": question},
                           {"role": "assistant", "content": cue}]
    if cot:  # the paper asks the chain-of-thought question as a Human turn
        shots_text = "".join(f"Human: {q}\n\nAssistant: {a}\n\n" for q, a in turns)
        return f"{shots_text}Human: {question}\n\nAssistant: {cue}"
    return "".join(f"{q}\n{a}\n\n" for q, a in turns) + f"{question}\n{cue}"


def feedback_answer_prompt(cot_prompt: Prompt, reasoning: str) -> Prompt:
    """A chain-of-thought feedback prompt plus the sampled ``reasoning``, ending with
    ``The answer is:`` again so the options can be scored. Any answer the model already
    wrote is cut: the score, not the sampled text, gives the label."""
    reasoning = re.split(r"(?i)the answer is", reasoning)[0].strip()
    tail = f" {reasoning}\n{ANSWER_CUE}" if reasoning else f"\n{ANSWER_CUE}"
    if isinstance(cot_prompt, str):
        return cot_prompt + tail
    messages = [dict(m) for m in cot_prompt]
    messages[-1]["content"] += tail
    return messages


def render(prompt: Prompt, tokenizer) -> str:
    """The text the model reads: base prompts as they are, chat prompts through the
    tokenizer's chat template (an assistant last message is continued, not closed)."""
    if isinstance(prompt, str):
        return prompt
    prefill = prompt[-1]["role"] == "assistant"
    return tokenizer.apply_chat_template(prompt, tokenize=False,
                                         add_generation_prompt=not prefill,
                                         continue_final_message=prefill)


# ---------------------------------------------------------------- output cleaning

_LABELS = r"(?:Human|User|Assistant|Critique ?Request|Revision ?Request|Critique|Revision)"
# A new turn: a label at the start of a line, followed by a colon or by the end of the
# text (the generator stopped inside "\n\nHuman"), but not "Human rights ...".
_NEXT_TURN = re.compile(rf"\n[ \t]*{_LABELS}[ \t]*(?::|$)")
_SPECIAL = re.compile(r"<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>|<\|eot_id\|>|</s>|<\|end\|>")
_ECHO = re.compile(r"^\s*(?:Assistant|AI|Revised response|Revision|Critique)\s*:\s*",
                   re.IGNORECASE)


def clean_response(text: str) -> tuple[str, list[str]]:
    """Strip echoed role labels, cut at the start of a next turn, strip whitespace.
    Flags: ``stripped_label``, ``cut_next_turn``, ``empty``, ``degenerate``."""
    flags = []
    special = _SPECIAL.search(text)
    if special:
        text = text[:special.start()]
        flags.append("cut_next_turn")
    text = text.strip()
    while (m := _ECHO.match(text)):
        text = text[m.end():]
        if "stripped_label" not in flags:
            flags.append("stripped_label")
    turn = _NEXT_TURN.search(text)
    if turn:
        text = text[:turn.start()]
        if "cut_next_turn" not in flags:
            flags.append("cut_next_turn")
    text = text.strip()
    reason = degeneracy(text)
    if reason == "empty":
        flags.append("empty")
    elif reason:
        flags.append("degenerate")
    return text, flags


def degeneracy(text: str, min_chars: int = 2) -> str | None:
    """Why ``text`` is not a usable answer (``empty``, ``too_short``, ``repetitive``), or
    None. Short answers such as "Paris." pass: a revision of a short answer may be short."""
    s = text.strip()
    if not s:
        return "empty"
    if len(s) < min_chars or not re.search(r"\w", s):
        return "too_short"
    words = s.lower().split()
    if _distinct_ratio(words) < 0.5 or _distinct_ratio(words[len(words) // 2:]) < 0.3:
        return "repetitive"
    run = re.search(r"(.{1,20}?)\1{5,}", s, re.DOTALL)  # "!!!!!!", "abcabcabc..."
    if run and len(run.group(0)) >= max(24, len(s) // 2):
        return "repetitive"
    return None


def _distinct_ratio(words: list[str], n: int = 3) -> float:
    """Distinct word n-grams over all n-grams; 1.0 for texts too short to judge."""
    if len(words) < 2 * n:
        return 1.0
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams)


def is_degenerate(text: str, min_chars: int = 2) -> bool:
    return degeneracy(text, min_chars) is not None


def stop_strings(style: str, cot: bool = False) -> list[str]:
    """Strings that end a generation in ``style``: the start of a next turn. With ``cot``,
    also the answer cue, so that reasoning stops where option scoring takes over."""
    _check_style(style)
    if style == "chat":
        stops = ["<|im_end|>", "<|im_start|>", "<|endoftext|>", "\n\nHuman:", "\n\nUser:"]
    else:
        stops = ["\n\nHuman:", "\nHuman:", "\n\nAssistant:", "\n\nCritique Request:",
                 "\n\nCritiqueRequest:", "\n\nRevision Request:", "\n\nRevisionRequest:",
                 "\n\nCritique:", "\n\nRevision:"]
    return stops + (["The answer is", "the answer is"] if cot else [])
