"""Packed training and scoring batches: whole sequences end to end, never any padding.

A batch is a flat stream of ``T`` tokens holding ``B`` sequences; ``cu_seqlens`` says where
each starts. The label of a token is the next token of the same sequence, so the shift
happens once here, and a sequence's last token (whose "next" token belongs to another
sequence) gets ``IGNORE``. The loss mask names which tokens are *targets* (e.g. the
assistant's tokens): a token is a label only where the mask of the token it predicts is on.

The batcher groups whole sequences by a token budget rather than a sequence count, so every
step costs about the same and a batch of short answers is not mostly empty.
"""
from __future__ import annotations

import random
from typing import NamedTuple, Sequence

import torch

from engine.errors import InputError
from engine.model import Packed, packed_metadata

IGNORE = -100


class PackedBatch(NamedTuple):
    """B sequences, T tokens in all, packed end to end.

    tokens      [T] int64    the token ids
    positions   [T] int64    position of each token inside its own sequence (0-based)
    cu_seqlens  [B+1] int32  sequence b is tokens[cu_seqlens[b]:cu_seqlens[b+1]]
    max_seqlen  int          the longest sequence (host int: attention sizes its work by it)
    labels      [T] int64    the next token of the same sequence where that token is a loss
                             target, else IGNORE (-100); always IGNORE at a sequence's end
    index       [B] int64    the caller's index of each sequence (e.g. the example number)
    target_rows [N] int64    the rows of ``labels`` that are not IGNORE, found on the host
                             when packing, so scoring can skip the others without a sync
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    labels: torch.Tensor
    index: torch.Tensor
    target_rows: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @property
    def num_targets(self) -> int:
        return self.target_rows.shape[0]

    def context(self) -> Packed:
        """The attention context the decoder's forward takes."""
        return Packed(self.cu_seqlens, self.max_seqlen)

    def to(self, device) -> "PackedBatch":
        t = lambda x: x.to(device, non_blocking=True)  # noqa: E731
        return self._replace(tokens=t(self.tokens), positions=t(self.positions), cu_seqlens=t(self.cu_seqlens),
                             labels=t(self.labels), index=t(self.index), target_rows=t(self.target_rows))


def pack(
    sequences: Sequence[Sequence[int]],
    loss_masks: Sequence[Sequence[bool]] | None = None,
    index: Sequence[int] | None = None,
    *,
    device=None,
) -> PackedBatch:
    """Pack token lists into one batch on ``device`` (pass the model's). ``loss_masks[b][j]``
    marks token j of sequence b as a target (None: every token but the first). ``index``
    defaults to 0..B-1. Everything is computed on the host from the lists (the target rows
    too, so finding them never syncs a device) and copied once per tensor."""
    if loss_masks is not None and len(loss_masks) != len(sequences):
        raise InputError(f"pack: {len(sequences)} sequences but {len(loss_masks)} loss masks")
    flat, labels = [], []
    for b, seq in enumerate(sequences):
        mask = loss_masks[b] if loss_masks is not None else None
        if mask is not None and len(mask) != len(seq):
            raise InputError(f"pack: sequence {b} has {len(seq)} tokens but a loss mask of {len(mask)}")
        if not seq:
            raise InputError(f"pack: sequence {b} is empty")
        flat.extend(seq)
        labels.extend(seq[j + 1] if mask is None or mask[j + 1] else IGNORE for j in range(len(seq) - 1))
        labels.append(IGNORE)
    positions, cu, max_len = packed_metadata([len(s) for s in sequences], device)
    tensor = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
    return PackedBatch(
        tokens=tensor(flat),
        positions=positions,
        cu_seqlens=cu,
        max_seqlen=max_len,
        labels=tensor(labels),
        index=tensor(list(index) if index is not None else list(range(len(sequences)))),
        target_rows=tensor([j for j, y in enumerate(labels) if y != IGNORE]),
    )


def group_by_tokens(
    lengths: Sequence[int], max_tokens: int, *, shuffle: bool = False, seed: int = 0, names: Sequence[str] | None = None
) -> list[list[int]]:
    """Indices grouped into batches of at most ``max_tokens`` tokens, whole sequences only.

    Greedy in order (shuffled first if asked, with a seeded RNG so a resumed run sees the
    same batches); a sequence longer than the budget is an error naming it.
    """
    order = list(range(len(lengths)))
    if shuffle:
        random.Random(seed).shuffle(order)
    groups, cur, used = [], [], 0
    for i in order:
        n = lengths[i]
        if n > max_tokens:
            who = names[i] if names is not None else f"example {i}"
            raise InputError(f"{who}: {n} tokens, more than the batch budget of {max_tokens}; raise max_tokens")
        if used + n > max_tokens and cur:
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        groups.append(cur)
    return groups


def batches_by_tokens(
    examples: Sequence[tuple[Sequence[int], Sequence[bool] | None]],
    max_tokens: int,
    shuffle: bool = False,
    seed: int = 0,
    *,
    max_seqlen: int | None = None,
    names: Sequence[str] | None = None,
    device=None,
) -> list[PackedBatch]:
    """``(tokens, loss_mask)`` examples -> packed batches of at most ``max_tokens`` tokens.

    ``max_seqlen`` (the model's context) rejects longer sequences with an error naming the
    example (``names[i]`` if given, e.g. "data.jsonl line 7"). ``batch.index`` holds the
    example indices. The batches are built on ``device`` (pass the model's).
    """
    lengths = [len(tokens) for tokens, _ in examples]
    for i, n in enumerate(lengths):
        if max_seqlen is not None and n > max_seqlen:
            who = names[i] if names is not None else f"example {i}"
            raise InputError(f"{who}: {n} tokens, longer than the model's context of {max_seqlen}")
    groups = group_by_tokens(lengths, max_tokens, shuffle=shuffle, seed=seed, names=names)
    return [pack([examples[i][0] for i in g], [_mask(examples[i]) for i in g], g, device=device) for g in groups]


def _mask(example) -> Sequence[bool]:
    tokens, mask = example
    return mask if mask is not None else [False] + [True] * (len(tokens) - 1)
