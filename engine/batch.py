"""Packed training and scoring batches: whole sequences end to end, never any padding.

A batch is a flat stream of ``T`` tokens holding ``B`` sequences; ``cu_seqlens`` says where
each starts. The label of a token is the next token of the same sequence, so the shift
happens once here, and a sequence's last token (whose "next" token belongs to another
sequence) gets ``IGNORE``. The loss mask names which tokens are *targets* (e.g. the
assistant's tokens): a token is a label only where the mask of the token it predicts is on.

The batcher groups whole sequences by a token budget rather than a sequence count, so every
step costs about the same and a batch of short answers is not mostly empty.

``SharedBatch`` (``pack_shared``) is the same for groups of sequences that begin alike (a
preference pair's chosen and rejected answers after one conversation): each group's common
prefix is in the stream once, followed by the rest of each sequence, so the prefix's
forward runs once per group. Its labels are listed per target rather than per token, as the
prefix's last token predicts the first token of every continuation.
"""
from __future__ import annotations

import random
from typing import NamedTuple, Sequence

import torch

from engine.errors import InputError
from engine.model import Packed, Shared, packed_metadata

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

    @property
    def last_rows(self) -> torch.Tensor:
        """The row of each sequence's last token [B] int64 (where a reward head reads)."""
        return (self.cu_seqlens[1:] - 1).long()

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


class SharedBatch(NamedTuple):
    """B sequences in G groups; each group's common prefix is packed once, then the rest
    (the *continuation*) of each of its sequences, positions continuing after the prefix.

    tokens       [T] int64    group by group: prefix tokens, then each continuation's
    positions    [T] int64    position of each token inside its (whole) sequence
    gather       [T'] int64   stream rows of every sequence as a whole (its group's prefix,
                              then its continuation), laid end to end: attention runs over
                              these (``Shared``); a group whose continuations are all empty
                              has its prefix alone there once
    cu_seqlens   [S+1] int32  the whole sequences in ``gather``
    max_seqlen   int          the longest of them (host int)
    pick         [T] int64    the row of ``gather`` whose attention output each token takes
    target_rows  [N] int64    the stream row of each distinct (row, label) target
    target_labels [N] int64   the token it predicts (a prefix's last row predicts the first
                              token of each continuation: one row, several labels)
    target_of    [M] int64    every sequence's targets in order, as ``pack`` of the whole
                              sequences would list them: which of the N each is ...
    seq_of       [M] int64    ... and the sequence it belongs to (0..B-1)
    last_rows    [B] int64    the stream row of each sequence's last token
    index        [B] int64    the caller's index of each sequence
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    gather: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    pick: torch.Tensor
    target_rows: torch.Tensor
    target_labels: torch.Tensor
    target_of: torch.Tensor
    seq_of: torch.Tensor
    last_rows: torch.Tensor
    index: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_seqs(self) -> int:
        return self.last_rows.shape[0]

    @property
    def num_targets(self) -> int:
        return self.target_rows.shape[0]

    def context(self) -> Shared:
        """The attention context the decoder's forward takes."""
        return Shared(self.gather, self.cu_seqlens, self.max_seqlen, self.pick)

    def sequence_sums(self, per_target: torch.Tensor) -> torch.Tensor:
        """Values of the N distinct targets [N] -> each sequence's sum over its targets [B]."""
        return per_target.new_zeros(self.num_seqs).index_add(0, self.seq_of, per_target.index_select(0, self.target_of))

    def to(self, device) -> "SharedBatch":
        t = lambda x: x.to(device, non_blocking=True)  # noqa: E731
        return self._replace(**{k: t(v) if isinstance(v, torch.Tensor) else v for k, v in self._asdict().items()})


def common_prefix(sequences: Sequence[Sequence[int]]) -> int:
    """The length of the longest prefix every one of ``sequences`` starts with."""
    if not sequences:
        return 0
    first, n = sequences[0], min(len(s) for s in sequences)
    for s in sequences[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return n


def shared_tokens(sequences: Sequence[Sequence[int]]) -> int:
    """Tokens ``pack_shared`` puts in the stream for one group: the prefix once, then the
    continuations (what the batch's matmuls run over)."""
    return sum(len(s) for s in sequences) - (len(sequences) - 1) * common_prefix(sequences)


def pack_shared(
    groups: Sequence[Sequence[Sequence[int]]],
    loss_masks: Sequence[Sequence[Sequence[bool]]] | None = None,
    index: Sequence[int] | None = None,
    *,
    device=None,
) -> SharedBatch:
    """Groups of token lists -> one ``SharedBatch``, each group's longest common prefix once.

    Sequences are numbered group by group (group 0's, then group 1's, ...), as ``pack`` of
    the flattened list numbers them; ``loss_masks`` mirrors ``groups`` (None: every token
    but the first is a target); ``index`` is per sequence (default 0..B-1). The prefix may be
    empty (nothing shared) or a whole sequence (one answer a prefix of another). A forward
    over the batch gives every sequence's tokens the hidden states ``pack`` would."""
    if loss_masks is not None and len(loss_masks) != len(groups):
        raise InputError(f"pack_shared: {len(groups)} groups but {len(loss_masks)} loss mask groups")
    tokens, positions, gather, cu, pick = [], [], [], [0], []
    rows, labels, target_of, seq_of, last_rows, where = [], [], [], [], [], {}
    b = 0
    for g, group in enumerate(groups):
        masks = loss_masks[g] if loss_masks is not None else [None] * len(group)
        if len(masks) != len(group):
            raise InputError(f"pack_shared: group {g} has {len(group)} sequences but {len(masks)} loss masks")
        if not group:
            raise InputError(f"pack_shared: group {g} is empty")
        for j, (seq, mask) in enumerate(zip(group, masks)):
            if not seq:
                raise InputError(f"pack_shared: sequence {b + j} is empty")
            if mask is not None and len(mask) != len(seq):
                raise InputError(f"pack_shared: sequence {b + j} has {len(seq)} tokens but a loss mask of {len(mask)}")
        p, base = common_prefix(group), len(tokens)
        tokens.extend(group[0][:p])
        positions.extend(range(p))
        prefix_rows, prefix_done = list(range(base, base + p)), False
        for j, (seq, mask) in enumerate(zip(group, masks)):
            start = len(tokens)
            rest = len(seq) - p
            tokens.extend(seq[p:])
            positions.extend(range(p, len(seq)))
            row = lambda i: base + i if i < p else start + i - p  # noqa: E731
            if rest or (not prefix_done and j == len(group) - 1):
                offset = len(gather)
                if not prefix_done:  # the prefix's outputs come from the first whole sequence
                    pick.extend(range(offset, offset + p))
                    prefix_done = True
                gather.extend(prefix_rows)
                gather.extend(range(start, start + rest))
                pick.extend(range(offset + p, offset + p + rest))
                cu.append(len(gather))
            for i in range(len(seq) - 1):
                if mask is None or mask[i + 1]:
                    key = (row(i), seq[i + 1])
                    if key not in where:
                        where[key] = len(rows)
                        rows.append(key[0])
                        labels.append(key[1])
                    target_of.append(where[key])
                    seq_of.append(b)
            last_rows.append(row(len(seq) - 1))
            b += 1
    tensor = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
    lengths = [e - s for s, e in zip(cu[:-1], cu[1:])]
    return SharedBatch(
        tokens=tensor(tokens), positions=tensor(positions), gather=tensor(gather),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device), max_seqlen=max(lengths, default=0),
        pick=tensor(pick), target_rows=tensor(rows), target_labels=tensor(labels), target_of=tensor(target_of),
        seq_of=tensor(seq_of), last_rows=tensor(last_rows),
        index=tensor(list(index) if index is not None else list(range(b))),
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
