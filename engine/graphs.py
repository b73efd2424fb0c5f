"""Decode on CUDA at the speed of the hardware: a static KV cache and the decode step
replayed from a CUDA graph, one graph per batch-size bucket (the approach of gpt-fast).

At batch 1 a decode step of a small model is a few hundred short kernels; launching them
one by one from Python costs more than running them. A graph records the whole step once
and replays it with one launch. A graph replays fixed addresses and fixed shapes, so:

- the KV cache is static: allocated once, kept between ``generate`` calls while it is big
  enough, and every step attends over its full length (``max_len`` is the cache's), with
  the real lengths masking what lies past each slot's tokens;
- the step reads its inputs from static buffers (tokens, positions, lengths) that each step
  fills in place;
- a batch of B active slots runs the graph of the smallest bucket (1, 2, 4, 8, ...) that
  holds it; the rows B..bucket-1 are idle slots, fed position 0, whose cache a prefill
  rewrites before the slot is used again;
- a graph bakes in the active LoRA adapter (and its train/eval mode), so graphs are keyed by
  the adapter as well; adapter weights updated in place are read by the replay as they are.

``capture=False`` runs exactly the same static step eagerly: the CPU tests use it to check
everything but the capture and replay themselves.
"""
from __future__ import annotations

import torch

from engine import lora
from engine.model import Decode, Decoder, KVCache

MAX_LEN_ROUND = 256  # cache lengths grow in steps of this, so a longer prompt rarely re-captures


def bucket_for(batch: int) -> int:
    """The smallest power of two >= ``batch`` (the graph a batch of that many slots runs)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return 1 << (batch - 1).bit_length()


class StaticDecoder:
    """A static KV cache, static input buffers and one decode graph per (bucket, adapter)."""

    def __init__(self, model: Decoder, capture: bool = True):
        self.model, self.capture = model, capture
        self.cache: KVCache | None = None
        self.graphs: dict[tuple, object] = {}
        self.outputs: dict[tuple, torch.Tensor] = {}
        self.pool = None

    def prepare(self, slots: int, max_len: int) -> KVCache:
        """The static cache, reallocated (and every graph dropped) only when it is too small
        for ``slots`` sequences of ``max_len`` tokens."""
        c, dev, dtype = self.cache, self.model.device, self.model.embed.dtype
        need_slots = bucket_for(slots)
        if c is None or c.num_slots < need_slots or c.max_len < max_len or c.dtype != dtype:
            ctx = self.model.cfg.max_position_embeddings
            # max_len <= ctx, so rounding up within the context still holds it
            length = min(ctx, -(-max(max_len, c.max_len if c else 0) // MAX_LEN_ROUND) * MAX_LEN_ROUND)
            self.graphs, self.outputs = {}, {}
            self.cache = KVCache(self.model.cfg, max(need_slots, c.num_slots if c else 0), length, dtype, dev)
            n = self.cache.num_slots
            self.tokens = torch.zeros(n, dtype=torch.int64, device=dev)
            self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
            self.lengths = torch.ones(n, dtype=torch.int32, device=dev)
        return self.cache

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens, positions [B] int64 of slots 0..B-1 -> logits [B, V]."""
        b = tokens.shape[0]
        n = bucket_for(b)
        self.tokens[:b].copy_(tokens)
        self.positions[:b].copy_(positions)
        self.lengths[:b].copy_(positions + 1)
        self.tokens[b:n].zero_()
        self.positions[b:n].zero_()
        self.lengths[b:n].fill_(1)
        return self._run(n)[:b]

    def _forward(self, n: int) -> torch.Tensor:
        ctx = Decode(self.cache, self.lengths[:n], self.cache.max_len)
        return self.model.logits(self.model(self.tokens[:n], self.positions[:n], ctx))  # [n, V]

    def _run(self, n: int) -> torch.Tensor:
        if not self.capture:
            return self._forward(n)
        key = (n, *_adapter_key(self.model))
        if key not in self.graphs:
            self._capture(key, n)
        self.graphs[key].replay()
        return self.outputs[key]

    def _capture(self, key: tuple, n: int) -> None:
        dev = self.model.device
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up: lazy initialisation and kernel compilation
            for _ in range(2):
                self._forward(n)  # rewrites the same keys/values the real step writes
        torch.cuda.current_stream(dev).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.outputs[key] = self._forward(n)
        self.graphs[key] = graph


def _adapter_key(model: Decoder) -> tuple:
    name = lora.active_adapter(model)
    if name is None:
        return (None, False)
    ad = lora.get_adapter(model, name)
    return (id(ad), ad.training)
