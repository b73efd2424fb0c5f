"""Preference pairs, shared by the preference model (``cai pm``) and DPO (``cai dpo``).

A pair is a prompt, a chosen and a rejected response, and ``p_chosen``: the labeller's
probability that the chosen response is the better one (``cai label`` writes soft labels in
[0.5, 1]; a file without the field holds hard labels, p = 1). Each pair becomes two
sequences, prompt + chosen and prompt + rejected, packed side by side into the *same*
batch (rows 2i and 2i+1), so one forward scores both and no sequence is ever padded. With
``share_prompt`` (the default of both stages) the pair's common prefix (the conversation,
and any first tokens the two answers share) is in the batch once
(``engine.batch.pack_shared``): its forward runs once per pair, and the scores and
gradients are those of the two whole sequences.

The conversation is encoded exactly as SFT encodes it (``cai.sft.encode``): through the
chat template when the tokenizer has one, else as a ``Human:/Assistant:`` transcript; the
response's tokens (with its end-of-turn marker) are the loss mask. The conversation is a
record's ``conversation`` (chat messages: ``cai label`` writes the whole conversation
before the responses there, exactly what PPO scores), else its ``prompt``: a string, read
back into turns when it is a ``Human: ... Assistant: ...`` transcript, or a message list.
Label files written before ``conversation`` existed load through ``prompt``, which holds
the same conversation for single-turn prompts.

Both stages train through ``cai.training.train_loop`` with a pair-specific step function.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

from cai.sft import encode, use_chat
from cai.records import iter_jsonl
from engine.batch import PackedBatch, SharedBatch, group_by_tokens, pack, pack_shared, shared_tokens
from engine.errors import InputError

_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


@dataclass
class PreferencePair:
    """One labelled comparison. ``prompt``: the conversation before the answer (chat
    messages); ``where``: its origin ("labels.jsonl:7") for error messages."""

    prompt: list[dict]
    chosen: str
    rejected: str
    p_chosen: float = 1.0
    where: str = ""


class EncodedPair(NamedTuple):
    """Token ids of prompt + chosen and prompt + rejected, each with the mask of its
    response tokens (True where a token belongs to the answer)."""

    chosen: list[int]
    chosen_mask: list[bool]
    rejected: list[int]
    rejected_mask: list[bool]

    @property
    def num_tokens(self) -> int:
        return len(self.chosen) + len(self.rejected)

    @property
    def shared_tokens(self) -> int:
        """Tokens of the pair in a shared-prompt batch: the common prefix once."""
        return shared_tokens([self.chosen, self.rejected])


# ---- reading ------------------------------------------------------------------------------

def read_pairs(path: str | Path) -> list[PreferencePair]:
    """JSON lines of ``{"conversation"? | "prompt", "chosen", "rejected", "p_chosen"?}`` ->
    pairs; errors name the file and line."""
    return [record_pair(rec, where) for where, rec in iter_jsonl(path)]


def as_pairs(records: Sequence[dict | PreferencePair]) -> list[PreferencePair]:
    """In-memory records (dicts as ``cai label`` writes them, or pairs) -> validated pairs."""
    if not records:
        raise InputError("no preference records")
    return [r if isinstance(r, PreferencePair) else record_pair(r, f"record {i}") for i, r in enumerate(records)]


def record_pair(rec, where: str) -> PreferencePair:
    """One record -> a pair. ``chosen`` / ``rejected`` may also be message lists ending with
    the assistant's answer (the open CAI datasets' columns); their earlier turns are the
    prompt when the record has no ``prompt``."""
    if not isinstance(rec, dict):
        raise InputError(f"{where}: expected a JSON object")
    missing = [k for k in ("chosen", "rejected") if k not in rec]
    if missing:
        raise InputError(f"{where}: missing field(s) {', '.join(missing)}")
    chosen, turns = _answer(rec["chosen"], where, "chosen")
    rejected, _ = _answer(rec["rejected"], where, "rejected")
    if "conversation" in rec:
        prompt = prompt_messages(rec["conversation"], where, "conversation")
    elif "prompt" in rec:
        prompt = prompt_messages(rec["prompt"], where)
    elif turns:
        prompt = turns
    else:
        raise InputError(f"{where}: missing field prompt")
    return PreferencePair(prompt, chosen, rejected, _probability(rec.get("p_chosen", 1.0), where), where)


def _answer(value, where: str, name: str) -> tuple[str, list[dict]]:
    if isinstance(value, str):
        return value, []
    if isinstance(value, list) and value and isinstance(value[-1], dict) and value[-1].get("role") == "assistant":
        return str(value[-1].get("content", "")), prompt_messages(value[:-1], where) if len(value) > 1 else []
    raise InputError(f"{where}: {name} must be a string or messages ending with the assistant's answer")


def _probability(p, where: str) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0.0 <= p <= 1.0:
        raise InputError(f"{where}: p_chosen must be a number in [0, 1] (got {p!r})")
    return float(p)


def prompt_messages(prompt, where: str = "", name: str = "prompt") -> list[dict]:
    """A prompt string (a ``Human: ... Assistant: ...`` transcript is split back into
    turns) or a message list -> validated chat messages; errors name the field ``name``."""
    if isinstance(prompt, str):
        return _from_transcript(prompt) if prompt.startswith("Human:") else [{"role": "user", "content": prompt}]
    ok = isinstance(prompt, list) and prompt and all(
        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
        for m in prompt)
    if not ok:
        raise InputError(f"{where}: {name} must be a string or a non-empty list of chat messages")
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def _from_transcript(text: str) -> list[dict]:
    parts = _TURN.split(text)[1:]  # [name, content, name, content, ...]
    roles = {"Human": "user", "Assistant": "assistant"}
    turns = [{"role": roles[n], "content": c.strip()} for n, c in zip(parts[::2], parts[1::2])]
    if turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns.pop()  # "...\n\nAssistant:" opens the answer the pair supplies
    return turns


# ---- encoding and batching ------------------------------------------------------------------

def encode_response(tokenizer, prompt: list[dict], response: str, *, chat: bool) -> tuple[list[int], list[bool]]:
    """prompt + response as SFT encodes a conversation: ids and the mask of the answer's tokens."""
    return encode(tokenizer, [*prompt, {"role": "assistant", "content": response}], chat=chat, loss_on="last")


def encode_pairs(engine, pairs: Sequence[PreferencePair], fmt: str = "auto") -> list[EncodedPair]:
    chat = use_chat(engine, fmt)
    out = []
    for p in pairs:
        c, r = (encode_response(engine.tokenizer, p.prompt, x, chat=chat) for x in (p.chosen, p.rejected))
        out.append(EncodedPair(c[0], c[1], r[0], r[1]))
    return out


def pack_pairs(encoded: Sequence[EncodedPair], which: Sequence[int], device=None, *,
               share_prompt: bool = False) -> PackedBatch | SharedBatch:
    """Pairs ``which`` -> one batch: sequence 2k is pair k's chosen, 2k+1 its rejected;
    ``index`` names the pair of each sequence. ``share_prompt``: a ``SharedBatch`` holding
    each pair's common prefix once (else a ``PackedBatch`` of the whole sequences)."""
    index = [i for i in which for _ in range(2)]
    if share_prompt:
        return pack_shared([[encoded[i].chosen, encoded[i].rejected] for i in which],
                           [[encoded[i].chosen_mask, encoded[i].rejected_mask] for i in which], index, device=device)
    seqs, masks = [], []
    for i in which:
        e = encoded[i]
        seqs += [e.chosen, e.rejected]
        masks += [e.chosen_mask, e.rejected_mask]
    return pack(seqs, masks, index, device=device)


def pair_batches(encoded: Sequence[EncodedPair], subset: Sequence[int], max_tokens: int, *, shuffle: bool,
                 seed: int, max_seqlen: int, names: Sequence[str], device=None,
                 share_prompt: bool = False) -> list[PackedBatch | SharedBatch]:
    """The pairs ``subset`` grouped by a token budget: the tokens the forward runs over,
    both sequences of a pair (with ``share_prompt``, their common prefix counted once)."""
    for i in subset:
        n = max(len(encoded[i].chosen), len(encoded[i].rejected))
        if n > max_seqlen:
            raise InputError(f"{names[i]}: {n} tokens, longer than the model's context of {max_seqlen}")
    cost = [encoded[i].shared_tokens if share_prompt else encoded[i].num_tokens for i in subset]
    groups = group_by_tokens(cost, max_tokens, shuffle=shuffle, seed=seed, names=[names[i] for i in subset])
    return [pack_pairs(encoded, [subset[k] for k in g], device, share_prompt=share_prompt) for g in groups]


def pair_labels(pairs: Sequence[PreferencePair], batch: PackedBatch | SharedBatch) -> torch.Tensor:
    """p_chosen of each pair in ``batch`` [P] (float32)."""
    return torch.tensor([pairs[i].p_chosen for i in batch.index[0::2].tolist()], dtype=torch.float32,
                        device=batch.tokens.device)


def split_heldout(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices: a seeded shuffle, held-out at least one pair when the
    fraction is positive and two or more pairs exist, so train is never empty."""
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"heldout_fraction must be in [0, 1) (got {fraction})")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = min(n - 1, max(1, round(n * fraction))) if fraction > 0 and n > 1 else 0
    return sorted(order[k:]), sorted(order[:k])


# ---- the optimizer loop ---------------------------------------------------------------------

def group_weights(group: list[PackedBatch | SharedBatch]) -> list[float]:
    """Each micro-batch's share of the group's pairs: scales its pair-mean loss so the
    accumulated gradient is that of the mean over the whole group."""
    total = sum(b.num_seqs for b in group)
    return [b.num_seqs / total for b in group]
