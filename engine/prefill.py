"""Prompt prefill into KV-cache slots, computing a prefix shared by every prompt only once.

The method's prompts share long prefixes: the few-shot exemplars of every critique,
revision and feedback prompt, the chat template's system turn. When the prompts of one
prefill share at least ``min_shared`` leading tokens, that prefix is run once into the
first slot, copied into the others, and each prompt's own tail is appended to its copy
(``Extend``). Otherwise the prompts are packed end to end in one forward (``Packed``).
Either way no padding reaches a matmul.
"""
from __future__ import annotations

import torch

from engine.model import Decoder, Extend, KVCache, Packed, packed_metadata

MIN_SHARED = 32


def shared_prefix_len(prompts: list[list[int]]) -> int:
    """Leading tokens common to every prompt, leaving each at least one token of its own."""
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        n = _common(first, p, n)
    return max(n, 0)


def _common(a: list[int], b: list[int], limit: int) -> int:
    k = 0
    while k < limit and a[k] == b[k]:
        k += 1
    return k


class PrefillCost:
    """Tokens ``prefill`` computes for a growing list of prompts (a shared prefix of at least
    ``min_shared`` tokens counts once), kept up to date one prompt at a time, so a generator
    can fill its prefill budget with what the forward really computes rather than with
    whole prompt lengths."""

    def __init__(self, min_shared: int = MIN_SHARED):
        self.min_shared, self.first, self.shared, self.total, self.count = min_shared, None, 0, 0, 0

    def _with(self, prompt: list[int]) -> tuple[int, int, int]:
        if self.first is None:
            return len(prompt) - 1, len(prompt), 1
        return _common(self.first, prompt, min(self.shared, len(prompt) - 1)), self.total + len(prompt), self.count + 1

    def with_prompt(self, prompt: list[int]) -> int:
        """The cost if ``prompt`` were added."""
        shared, total, count = self._with(prompt)
        return total - (count - 1) * shared if count > 1 and shared >= self.min_shared else total

    def add(self, prompt: list[int]) -> None:
        self.shared, self.total, self.count = self._with(prompt)
        self.first = self.first if self.first is not None else prompt


def prefill(model: Decoder, cache: KVCache, prompts: list[list[int]], slots: list[int],
            min_shared: int = MIN_SHARED) -> torch.Tensor:
    """Write each prompt's keys/values into its slot; return the last hidden state of each
    prompt [P, H] (what predicts its first new token)."""
    shared = shared_prefix_len(prompts) if len(prompts) > 1 else 0
    if shared < min_shared:
        return _packed(model, cache, prompts, slots)
    dev = cache.device
    head = torch.tensor(prompts[0][:shared], dtype=torch.int64, device=dev)
    positions, cu, m = packed_metadata([shared], dev)
    model(head, positions, Packed(cu, m, cache, torch.full((shared,), slots[0], dtype=torch.int64, device=dev)))
    for s in slots[1:]:
        cache.copy_slot(slots[0], s, shared)
    tails = [p[shared:] for p in prompts]
    counts = [len(t) for t in tails]
    tokens = torch.tensor([t for tail in tails for t in tail], dtype=torch.int64, device=dev)
    positions = torch.tensor([shared + j for n in counts for j in range(n)], dtype=torch.int64, device=dev)
    hidden = model(tokens, positions, Extend(cache, list(slots), [shared] * len(slots), counts))
    ends = torch.tensor(counts, device=dev).cumsum(0) - 1
    return hidden[ends]


def _packed(model, cache, prompts, slots) -> torch.Tensor:
    lengths, dev = [len(p) for p in prompts], cache.device
    positions, cu, m = packed_metadata(lengths, dev)
    slot_of = torch.tensor([s for s, n in zip(slots, lengths) for _ in range(n)], dtype=torch.int64, device=dev)
    tokens = torch.tensor([t for p in prompts for t in p], dtype=torch.int64, device=dev)
    hidden = model(tokens, positions, Packed(cu, m, cache, slot_of))
    return hidden[cu[1:].long() - 1]
