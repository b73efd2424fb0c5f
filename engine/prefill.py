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
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def prefill(model: Decoder, cache: KVCache, prompts: list[list[int]], slots: list[int],
            min_shared: int = MIN_SHARED) -> torch.Tensor:
    """Write each prompt's keys/values into its slot; return the last hidden state of each
    prompt [P, H] (what predicts its first new token)."""
    shared = shared_prefix_len(prompts) if len(prompts) > 1 else 0
    if shared < min_shared:
        return _packed(model, cache, prompts, slots)
    head = torch.tensor(prompts[0][:shared])
    positions, cu, m = packed_metadata([shared])
    model(head, positions, Packed(cu, m, cache, torch.full((shared,), slots[0])))
    for s in slots[1:]:
        cache.copy_slot(slots[0], s, shared)
    tails = [p[shared:] for p in prompts]
    counts = [len(t) for t in tails]
    tokens = torch.tensor([t for tail in tails for t in tail])
    positions = torch.cat([torch.arange(shared, shared + n) for n in counts])
    hidden = model(tokens, positions, Extend(cache, list(slots), [shared] * len(slots), counts))
    ends = torch.tensor(counts).cumsum(0) - 1
    return hidden[ends]


def _packed(model, cache, prompts, slots) -> torch.Tensor:
    lengths = [len(p) for p in prompts]
    positions, cu, m = packed_metadata(lengths)
    slot_of = torch.repeat_interleave(torch.tensor(slots), torch.tensor(lengths))
    tokens = torch.tensor([t for p in prompts for t in p])
    hidden = model(tokens, positions, Packed(cu, m, cache, slot_of))
    return hidden[cu[1:].long() - 1]
