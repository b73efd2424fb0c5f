"""Sampling settings and the per-step token choice.

The log-prob returned for each sampled token is taken under the temperature-scaled model
distribution *before* top-k / top-p truncation: that is the quantity PPO recomputes at
train time (``log_softmax(logits / T)``), so rollouts and updates agree. Greedy decoding
returns the plain ``log_softmax(logits)`` value.

Seeding is per sample: sample j of prompt i draws from its own generator seeded from
``(seed, i, j)``, so a prompt's samples do not depend on what else is in the batch. The
generators live on the model's device. The choice is made in float32 whatever the logits'
dtype.

On a GPU nothing here synchronises with the host: the draw is ``argmax(p / E)`` with
``E ~ Exp(1)`` (an exact sample of ``p``, the race of exponential clocks gpt-fast uses) rather
than ``torch.multinomial``, and top-p sorts the vocabulary instead of the CPU's candidate
search, whose fallback needs a host-side count. The CPU keeps ``multinomial``, so its draws
for a seed are unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.errors import InputError


@dataclass
class SamplingParams:
    """How to sample. Defaults suit the paper's sampling (temperature 1, no truncation)."""

    max_new_tokens: int = 256
    """Tokens to generate at most per sample (EOS and stop strings may end it sooner)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 turns it off."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches p; 1 is off."""
    n: int = 1
    """Samples per prompt. The prompt is prefilled once and its cache shared by its samples."""
    seed: int | None = None
    """Same seed, same output. None draws a fresh seed."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a sample; the returned text stops before the first one."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks use it so every row makes max_new_tokens)."""

    def validate(self) -> "SamplingParams":
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise InputError(f"need top_k >= 0 and 0 < top_p <= 1, got {self.top_k}, {self.top_p}")
        if self.n < 1:
            raise InputError(f"n must be >= 1, got {self.n}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample_generator(seed: int, prompt_index: int, sample_index: int, device: torch.device) -> torch.Generator:
    """The generator of sample ``sample_index`` of prompt ``prompt_index``, on ``device``."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + prompt_index * 9_176 + sample_index) % (2**63 - 1))
    return g


def choose_tokens(
    logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator | None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (tokens [B] int64, log-probs [B] float32 of those tokens), on the
    logits' device."""
    logits = logits.float()
    if params.greedy:
        tokens = logits.argmax(dim=-1)
        return tokens, _logprob_of(logits, tokens)
    scaled = logits / params.temperature if params.temperature != 1.0 else logits
    filtered = _truncate(scaled.clone(), params.top_k, params.top_p)
    probs = torch.softmax(filtered, dim=-1)
    if probs.device.type == "cpu":
        tokens = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])
    else:
        clocks = torch.stack([torch.empty_like(p).exponential_(1.0, generator=g) for p, g in zip(probs, generators)])
        tokens = (probs / clocks).argmax(dim=-1)
    return tokens, _logprob_of(scaled, tokens)


def _logprob_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    picked = logits.gather(-1, tokens[:, None]).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _truncate(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (in place) everything outside the top-k and the top-p nucleus."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p < 1.0 and logits.device.type != "cpu":
        logits.masked_fill_(_outside_nucleus_sorted(logits, top_p), float("-inf"))
    elif top_p < 1.0:
        logits.masked_fill_(_outside_nucleus(logits, top_p), float("-inf"))
    return logits


# The nucleus of a sampled step is usually a handful of tokens. Looking for it among the top
# NUCLEUS_CANDIDATES first (a partial selection) instead of sorting the whole vocabulary cut
# the sampling of a [32, 49152] step from ~110 ms to a few ms here; a row whose nucleus
# reaches past the candidates falls back to the full sort, so the kept set is the same.
NUCLEUS_CANDIDATES = 256


def _outside_nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask [B, V] of the tokens outside each row's top-p nucleus (the smallest set of most
    likely tokens whose probability reaches top_p)."""
    k = min(NUCLEUS_CANDIDATES, logits.shape[-1])
    top, order = logits.topk(k, dim=-1)  # [B, k], descending
    probs = logits.softmax(dim=-1).gather(-1, order)  # (softmax is ~3x faster than logsumexp here)
    drop_top = (probs.cumsum(dim=-1) - probs) >= top_p
    drop = torch.ones_like(logits, dtype=torch.bool).scatter_(-1, order, drop_top)
    wide = (~drop_top[:, -1]).nonzero().flatten()  # rows whose nucleus may not end inside the top k
    if wide.numel():
        drop[wide] = _outside_nucleus_sorted(logits[wide], top_p)
    return drop


def _outside_nucleus_sorted(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # drop a token when the tokens before it already reach p; the top one always stays
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
    return torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
