"""Log-probs of given tokens, and scalar heads, over packed batches.

Every score starts from the decoder's final hidden states ``[T, H]``; the vocabulary
projection is fused into the log-prob kernel (``kernels.linear_logprob``), which never holds
the ``[T, V]`` logits, and only rows with a label reach it (prompt tokens cost no lm_head
matmul at all). Callers that also need a scalar head (PPO's value head, the preference
model's reward head) run ``hidden_states`` once and pass the hidden states to both.

A ``SharedBatch`` (groups of sequences with one shared prefix) scores the same way: its
targets are listed (row, label) pairs rather than one label per row, so ``target_logprobs``
and ``sequence_logprobs`` take either batch; ``token_logprobs`` (one value per row) takes a
``PackedBatch`` only.
"""
from __future__ import annotations

import torch
import torch.nn as nn

import kernels
from engine.batch import IGNORE, PackedBatch, SharedBatch
from engine.errors import InputError
from engine.model import Decoder


def hidden_states(model: Decoder, batch: PackedBatch | SharedBatch) -> torch.Tensor:
    """Final (normed) hidden states [T, H] of a packed (or shared-prefix) batch, with the
    active adapter."""
    return model(batch.tokens, batch.positions, batch.context())


def token_logprobs(
    model: Decoder,
    batch: PackedBatch,
    temperature: float = 1.0,
    return_entropy: bool = False,
    *,
    hidden: torch.Tensor | None = None,
):
    """log p(labels[t] | tokens[..t]) per token [T] (0 where the label is IGNORE); with
    ``return_entropy`` also the entropy of each of those rows' distributions [T] (0 elsewhere).
    Both float32 whatever the model's dtype. Differentiable with respect to the trainable weights."""
    if isinstance(batch, SharedBatch):
        raise InputError("token_logprobs: a SharedBatch has several targets on a prefix's last row; "
                         "use target_logprobs")
    hidden = hidden_states(model, batch) if hidden is None else hidden
    rows = batch.target_rows
    out = kernels.linear_logprob(
        hidden.index_select(0, rows), model.lm_head_weight, batch.labels.index_select(0, rows),
        temperature=temperature, ignore_index=IGNORE, return_entropy=return_entropy,
    )
    # float32 like the kernel's output, whatever the hidden states' dtype
    scatter = lambda v: v.new_zeros(batch.num_tokens).index_copy(0, rows, v)  # noqa: E731
    return tuple(scatter(v) for v in out) if return_entropy else scatter(out)


def target_logprobs(
    model: Decoder,
    batch: PackedBatch | SharedBatch,
    temperature: float = 1.0,
    return_entropy: bool = False,
    *,
    hidden: torch.Tensor | None = None,
):
    """log p of each of the batch's targets [N] (a ``PackedBatch``: its ``target_rows``'
    labels in order; a ``SharedBatch``: its distinct (row, label) targets); with
    ``return_entropy`` also each row's entropy [N]. float32, differentiable."""
    if isinstance(batch, PackedBatch):
        out = token_logprobs(model, batch, temperature, return_entropy, hidden=hidden)
        rows = batch.target_rows
        return tuple(v.index_select(0, rows) for v in out) if return_entropy else out.index_select(0, rows)
    hidden = hidden_states(model, batch) if hidden is None else hidden
    return kernels.linear_logprob(
        hidden.index_select(0, batch.target_rows), model.lm_head_weight, batch.target_labels,
        temperature=temperature, ignore_index=IGNORE, return_entropy=return_entropy,
    )


def segment_sum(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """values [T] -> per-sequence sums [B] over the spans of ``cu_seqlens`` [B+1]."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq = torch.repeat_interleave(torch.arange(lengths.shape[0], device=values.device), lengths,
                                  output_size=values.shape[0])
    return values.new_zeros(lengths.shape[0]).index_add(0, seq, values)


def sequence_logprobs(model: Decoder, batch: PackedBatch | SharedBatch, temperature: float = 1.0, *,
                      token_lp: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of the label log-probs of each sequence [B] (only loss-masked tokens count).
    ``token_lp``: precomputed values, per token [T] for a ``PackedBatch``, per target [N]
    (``target_logprobs``) for a ``SharedBatch``."""
    if isinstance(batch, SharedBatch):
        return batch.sequence_sums(target_logprobs(model, batch, temperature) if token_lp is None else token_lp)
    lp = token_logprobs(model, batch, temperature) if token_lp is None else token_lp
    return segment_sum(lp, batch.cu_seqlens)


class ScalarHead(nn.Module):
    """A linear map from the hidden state to one number: a value head reads every token
    (``forward``), a reward head the last token of each sequence (``last_token``).

    Initialised with small weights (std 1/sqrt(H+1), as TRL's value head) and zero bias, so
    the first scores are near zero and do not swamp the KL term. Its weights, and so its
    scores, are float32 whatever the model's dtype: the hidden state is cast up first.
    Create it on the model's device (``device=model.device``).
    """

    def __init__(self, hidden_size: int, *, device=None):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1, device=device, dtype=torch.float32)
        nn.init.normal_(self.proj.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, H] -> one float32 score per token [T]."""
        return self.proj(hidden.to(self.proj.weight.dtype)).squeeze(-1)

    def last_token(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], cu_seqlens [B+1] -> the score of each sequence's last token [B]."""
        return self.forward(hidden.index_select(0, (cu_seqlens[1:] - 1).long()))
