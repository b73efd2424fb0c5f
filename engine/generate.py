"""Continuous-batching generation over a preallocated, slotted KV cache.

The loop alternates two kinds of forward:

- prefill: newly admitted prompts, packed end to end (no padding), write their keys and
  values into one slot each (a prefix common to all of them, such as few-shot exemplars,
  is computed once: ``engine.prefill``); a prompt asking for ``n`` samples is prefilled
  once and its cache copied into the other ``n - 1`` slots;
- decode: one token for every active slot in one forward.

Active slots are kept compact (``0..B-1``): when a sample finishes, the last active slot's
cache moves into the hole, so a decode step never reads an idle slot and never gathers.
A finished slot is refilled from the queue before the next step.

Every tensor lives on the model's device. The host reads the chosen tokens and their
log-probs once per step (one copy: EOS and stop strings are decided on the host); on CUDA
the decode step itself can replay a captured graph over a static cache (``engine.graphs``).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import torch

from engine.errors import InputError
from engine import profiling
from engine.graphs import StaticDecoder
from engine.model import Decode, Decoder, KVCache
from engine.prefill import PrefillCost, prefill
from engine.sampling import SamplingParams, choose_tokens, sample_generator


@dataclass
class Sample:
    """One generated continuation.

    token_ids [L] include the token that ended it (EOS or the end of a stop string);
    logprobs [L] are the log-probs of those tokens under the temperature-scaled model;
    text is decoded without special tokens and cut before the first stop string.
    finish_reason: "stop" (EOS or a stop string) or "length".
    """

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str


@dataclass
class RequestOutput:
    """All samples drawn for one prompt."""

    prompt_index: int
    prompt_token_ids: list[int]
    samples: list[Sample] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.samples[0].text


@dataclass
class _Slot:
    req: int
    sample: int
    length: int  # tokens in the cache
    pending: int  # sampled, not yet in the cache
    tokens: list[int]
    logprobs: list[float]
    gen: torch.Generator | None


def eos_ids(model: Decoder, tokenizer) -> set[int]:
    """The token ids that end a sample: the model config's EOS ids and the tokenizer's."""
    eos = set(model.cfg.eos_token_id)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos.add(tokenizer.eos_token_id)
    return eos


def stop_window(stops) -> int:
    """How many recent tokens are decoded to look for a stop string: enough for the longest
    one (a token decodes to at least one character) plus a few for merged tokens."""
    return max((len(s) for s in stops), default=0) + 8


class Generator:
    """Runs a batch of prompts through the model with continuous batching.

    max_slots bounds concurrent samples (and KV cache memory); max_prefill_tokens bounds
    how many prompt tokens one prefill forward packs together; ``static`` (None: eager
    decode) keeps a static cache and runs each decode step through it.
    """

    def __init__(self, model: Decoder, tokenizer, max_slots: int = 32, max_prefill_tokens: int = 4096,
                 static: StaticDecoder | None = None):
        self.model, self.tok, self.static = model, tokenizer, static
        self.max_slots, self.max_prefill_tokens = max_slots, max_prefill_tokens
        self.eos = eos_ids(model, tokenizer)

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], params: SamplingParams, progress=None,
            sample_keys: list[int] | None = None) -> list[RequestOutput]:
        """``sample_keys``: the index each prompt's sample generators are seeded by (default:
        its position), so a rank generating a share of a prompt list draws what one process
        drawing the whole list draws for those prompts."""
        params.validate()
        if sample_keys is not None and len(sample_keys) != len(prompts):
            raise InputError(f"{len(sample_keys)} sample keys for {len(prompts)} prompts")
        if not prompts:
            return []
        ctx_limit = self.model.cfg.max_position_embeddings
        for i, p in enumerate(prompts):
            if not p:
                raise InputError(f"prompt {i} is empty")
            if len(p) >= ctx_limit:
                raise InputError(f"prompt {i} has {len(p)} tokens; the model's context is {ctx_limit}")
        n = params.n
        if n > self.max_slots:
            raise InputError(f"n={n} samples per prompt exceeds max_slots={self.max_slots}")
        # a fresh seed is drawn from the host RNG: it only seeds the per-sample generators
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,), device="cpu"))
        max_len = min(ctx_limit, max(map(len, prompts)) + params.max_new_tokens)
        slots_needed = min(self.max_slots, n * len(prompts))
        self.max_len = max_len
        if self.static is not None:
            self.cache = self.static.prepare(slots_needed, max_len)
        else:
            self.cache = KVCache(self.model.cfg, slots_needed, max_len, self.model.embed.dtype, self.model.device)
        self.params, self.seed = params, seed
        self.keys = list(range(len(prompts))) if sample_keys is None else list(sample_keys)
        self.outputs = [RequestOutput(i, list(p), [None] * n) for i, p in enumerate(prompts)]
        self.progress = progress
        queue, active = deque(range(len(prompts))), []
        self._stop_window = stop_window(params.stop)
        while queue or active:
            self._admit(queue, active, prompts)
            self._decode(active)
        self.cache = None
        return self.outputs

    def _admit(self, queue: deque, active: list[_Slot], prompts) -> None:
        n, free = self.params.n, min(self.cache.num_slots, self.max_slots) - len(active)
        # The budget counts what the forward computes: a few-shot prefix shared by the batch
        # once. Counting whole prompts admitted ~5 of 32 critique prompts per prefill and ran
        # their 500-token shared prefix once per admission.
        batch, cost = [], PrefillCost()
        while queue and free >= n and (not batch or cost.with_prompt(prompts[queue[0]]) <= self.max_prefill_tokens):
            i = queue.popleft()
            batch.append(i)
            free -= n
            cost.add(prompts[i])
        if not batch:
            return
        lengths = [len(prompts[i]) for i in batch]
        first_slot = [len(active) + j * n for j in range(len(batch))]
        with profiling.phase("engine.generate.prefill"):
            last = prefill(self.model, self.cache, [prompts[i] for i in batch], first_slot)  # [P, H]
            logits = self.model.logits(last).repeat_interleave(n, dim=0)  # [P*n, V]
        new = []
        for j, i in enumerate(batch):
            for s in range(n):
                if s:
                    self.cache.copy_slot(first_slot[j], first_slot[j] + s, lengths[j])
                gen = None if self.params.greedy else sample_generator(self.seed, self.keys[i], s, self.model.device)
                new.append(_Slot(i, s, lengths[j], -1, [], [], gen))
        self._advance(new, logits)
        active.extend(new)
        self._retire(active)

    def _decode(self, active: list[_Slot]) -> None:
        if not active:
            return
        dev = self.model.device
        tokens = torch.tensor([s.pending for s in active], dtype=torch.long, device=dev)
        positions = torch.tensor([s.length for s in active], dtype=torch.long, device=dev)
        with profiling.phase("engine.generate.decode"):
            if self.static is not None:
                logits = self.static.step(tokens, positions)  # [B, V]
            else:
                ctx = Decode(self.cache, (positions + 1).to(torch.int32), max(s.length for s in active) + 1)
                logits = self.model.logits(self.model(tokens, positions, ctx))  # [B, V]
        for s in active:
            s.length += 1
        self._advance(active, logits)
        self._retire(active)
        profiling.step()

    def _advance(self, slots: list[_Slot], logits: torch.Tensor) -> None:
        """Choose each slot's next token from its logits row [B, V]."""
        with profiling.phase("engine.generate.sample"):
            tokens, logprobs = choose_tokens(logits, self.params, [s.gen for s in slots])
            # the one host sync of a step: EOS, stop strings and the outputs are host-side.
            # Token ids are exact in float64, so one copy brings both rows back.
            host_tokens, host_lp = torch.stack((tokens.double(), logprobs.double())).tolist()
        for s, t, lp in zip(slots, host_tokens, host_lp):
            t = int(t)
            s.pending = t
            s.tokens.append(t)
            s.logprobs.append(lp)

    def _retire(self, active: list[_Slot]) -> None:
        """Finish samples that hit EOS, a stop string or a limit; compact the slots."""
        j = 0
        while j < len(active):
            s = active[j]
            reason = self._finished(s)
            if reason is None:
                j += 1
                continue
            self._emit(s, reason)
            last = active.pop()
            if last is not s:
                self.cache.copy_slot(len(active), j, last.length)
                active[j] = last

    def _finished(self, s: _Slot) -> str | None:
        p = self.params
        if not p.ignore_eos and s.pending in self.eos:
            return "stop"
        if p.stop and any(x in self.tok.decode(s.tokens[-self._stop_window :]) for x in p.stop):
            return "stop"
        if len(s.tokens) >= p.max_new_tokens or s.length >= self.max_len:
            return "length"
        return None

    def _emit(self, s: _Slot, reason: str) -> None:
        text = self.tok.decode(s.tokens, skip_special_tokens=True)
        cut = [text.find(x) for x in self.params.stop if x in text]
        if cut:
            text = text[: min(cut)]
        self.outputs[s.req].samples[s.sample] = Sample(text, s.tokens, s.logprobs, reason)
        if self.progress is not None:
            self.progress.update(1)
