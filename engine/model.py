"""The engine's own Llama-family decoder, in plain PyTorch, over packed token streams.

Every forward takes a flat stream of tokens ``[T]`` with their positions ``[T]``; how the
tokens attend is described by an attention context:

- ``Packed``: B whole sequences laid end to end (``cu_seqlens[B+1]``), causal inside each,
  no padding anywhere. Training, scoring and prompt prefill use it; given a KV cache and a
  slot per token, it also writes the keys and values there.
- ``Shared``: groups of sequences that share a prefix, the prefix in the stream once
  (``engine.batch.SharedBatch``): preference pairs score both answers after one forward
  of their conversation.
- ``Decode``: one new token for each of the first B cache slots, attending to that slot's
  cached prefix. Generation uses it for every step after the prefill.

Deliberate differences from transformers' modules, none of which change the logits beyond
float32 rounding: q, k and v are one fused projection (one matmul instead of three), gate
and up are one fused projection, and RoPE is applied to q and k together.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from engine.config import ModelConfig


# oneDNN's linear reads weights at up to ~1.8x the rate of the default BLAS call on the
# CPUs we measured (AMD EPYC: 28 vs 16 GB/s at batch 1, 1.5-1.8x at batch 8-32). It has no
# autograd formula, so it serves forwards that need no gradient (generation, scoring).
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    if _ONEDNN_LINEAR is not None and x.dtype == torch.float32 and x.device.type == "cpu" and not (
        torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
    ):
        return _ONEDNN_LINEAR(x, w, b, "none", [], "")
    return F.linear(x, w, b)


class Linear(nn.Module):
    """``y = x W^T (+ b)``, plus the active LoRA adapter's update when one is set.

    ``lora`` is ``None`` or a callable ``(x, y) -> y`` installed by ``engine.lora``; keeping it
    a plain attribute means a forward with adapters off costs one attribute check.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.lora = None
        self.fast = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        return y if self.lora is None else self.lora(x, y)

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """``x W^T (+ b)``. ``fast`` is ``None`` or an inference-only stand-in for it (a
        prepacked or quantised copy of the frozen weight, a callable ``x -> y``); it serves
        only forwards that record no gradient, so training always reads ``weight``."""
        if self.fast is not None and not torch.is_grad_enabled():
            return self.fast(x)
        return linear(x, self.weight, self.bias)


class KVCache:
    """Preallocated keys and values for ``num_slots`` sequences of up to ``max_len`` tokens.

    Per layer ``k[l]`` and ``v[l]`` are ``[num_slots, Hkv, max_len, D]``: the layout SDPA and
    the decode kernel read without a copy.
    """

    def __init__(self, cfg: ModelConfig, num_slots: int, max_len: int, dtype=torch.float32, device=None):
        shape = (num_slots, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.num_slots, self.max_len = num_slots, max_len

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst`` (every layer)."""
        for k, v in zip(self.k, self.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass
class Packed:
    """Whole sequences packed end to end. ``cu_seqlens`` [B+1] int32 offsets into the stream.

    With ``cache`` set, ``slots`` [T] int64 names the cache slot of each token; keys and
    values are written at (slot, position) as the layers run.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    cache: KVCache | None = None
    slots: torch.Tensor | None = None

    def attend(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        if self.cache is not None:
            pos = self._positions
            self.cache.k[layer][self.slots, :, pos] = k
            self.cache.v[layer][self.slots, :, pos] = v
        return kernels.packed_attention(q, k, v, self.cu_seqlens, self.max_seqlen, scale)


@dataclass
class Shared:
    """Sequences whose common prefix is in the stream once (``engine.batch.pack_shared``).
    ``gather`` [T'] lists the stream rows of every sequence as a whole (prefix, then its
    continuation), ``cu_seqlens`` [S+1] int32 / ``max_seqlen`` delimit those, and ``pick``
    [T] names the row of that layout whose output each stream token takes: each
    continuation attends to its prefix and causally to itself, the prefix causally."""

    gather: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    pick: torch.Tensor

    def attend(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        return kernels.shared_prefix_attention(q, k, v, self.gather, self.cu_seqlens, self.max_seqlen, self.pick, scale)


@dataclass
class Decode:
    """One new token for each of cache slots ``0..B-1``. ``lengths`` [B] int32 counts the
    slot's tokens including the new one; ``max_len`` is its maximum, known on the host."""

    cache: KVCache
    lengths: torch.Tensor
    max_len: int

    def __post_init__(self):
        self._rows = torch.arange(self.lengths.shape[0], device=self.lengths.device)  # once per step, not per layer

    def attend(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        b = q.shape[0]
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        kc[self._rows, :, self._positions] = k
        vc[self._rows, :, self._positions] = v
        return kernels.decode_attention(q, kc[:b], vc[:b], self.lengths, self.max_len, scale)


@dataclass
class Extend:
    """New tokens appended to cached prefixes: sequence b (``counts[b]`` tokens, packed in
    order) goes into cache slot ``slots[b]`` after its first ``starts[b]`` positions and
    attends to that prefix and causally to itself. Scoring options after a shared prompt
    and prefilling prompts after a shared few-shot prefix use it. Host lists, as the
    attention loops over sequences on the host anyway."""

    cache: KVCache
    slots: list[int]
    starts: list[int]
    counts: list[int]

    def attend(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        out, offset = torch.empty_like(q), 0
        for slot, start, n in zip(self.slots, self.starts, self.counts):
            end = start + n
            kc[slot, :, start:end] = k[offset : offset + n].transpose(0, 1)
            vc[slot, :, start:end] = v[offset : offset + n].transpose(0, 1)
            qs = q[offset : offset + n].transpose(0, 1)[None]  # [1, Hq, n, D]
            # bottom-right causal: new token i sees the prefix and new tokens 0..i
            mask = torch.ones(n, end, dtype=torch.bool, device=q.device).tril_(start)
            o = F.scaled_dot_product_attention(qs, kc[slot : slot + 1, :, :end], vc[slot : slot + 1, :, :end],
                                               attn_mask=mask, scale=scale, enable_gqa=True)
            out[offset : offset + n] = o[0].transpose(0, 1)
            offset += n
        return out


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.hq, self.hkv, self.d = layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv = Linear(cfg.hidden_size, cfg.qkv_size, bias=cfg.attention_bias)
        self.o = Linear(self.hq * self.d, cfg.hidden_size)
        self.scale = self.d ** -0.5

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv(x).view(t, self.hq + 2 * self.hkv, self.d)  # [T, Hq+2Hkv, D]
        qk = apply_rope(qkv[:, : self.hq + self.hkv], *rope)  # [T, Hq+Hkv, D]
        q, k = qk.split([self.hq, self.hkv], dim=1)
        v = qkv[:, self.hq + self.hkv :]
        out = ctx.attend(self.layer, q, k, v, self.scale)  # [T, Hq, D]
        return self.o(out.reshape(t, self.hq * self.d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate).mul_(up))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.eps = cfg.rms_norm_eps
        self.attn_norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.attn = Attention(cfg, layer)
        self.mlp_norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.mlp = MLP(cfg)

    def forward(self, x, rope, ctx):
        n = x.shape[-1:]
        x = x + self.attn(F.rms_norm(x, n, self.attn_norm, self.eps), rope, ctx)
        return x + self.mlp(F.rms_norm(x, n, self.mlp_norm, self.eps))


class Decoder(nn.Module):
    """Embeddings, ``num_hidden_layers`` blocks, final norm; the vocabulary head is separate
    (``logits`` / ``lm_head_weight``) so scoring can fuse it into the log-prob kernel."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.lm_head = None if cfg.tie_word_embeddings else nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.register_buffer("inv_freq", cfg.inv_freq().float(), persistent=False)
        self.head_fast = None

    @property
    def device(self) -> torch.device:
        """Where the weights live: every tensor the engine creates for this model goes there."""
        return self.embed.device

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed if self.lm_head is None else self.lm_head

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor:
        """tokens [T] int64, positions [T] int64 -> final hidden states [T, H]."""
        x = F.embedding(tokens, self.embed)  # [T, H]
        rope = self.rope(positions)
        ctx._positions = positions
        for layer in self.layers:
            x = layer(x, rope, ctx)
        return F.rms_norm(x, x.shape[-1:], self.norm, self.cfg.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, H] -> logits [N, V]. ``head_fast``, like ``Linear.fast``, is an
        inference-only stand-in for the head's product (None: read ``lm_head_weight``)."""
        if self.head_fast is not None and not torch.is_grad_enabled():
            return self.head_fast(hidden)
        return linear(hidden, self.lm_head_weight)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, D] for the half-split rotation transformers' Llama uses."""
        # float32 angles from float32 frequencies, as transformers computes them: parity
        # at long positions depends on rounding the product the same way.
        ang = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # [T, D/2]
        ang = torch.cat((ang, ang), dim=-1)[:, None, :]
        dt = self.embed.dtype
        return ang.cos().to(dt), ang.sin().to(dt)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] by the angles in cos/sin [T, 1, D] (half-split layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((x2.neg(), x1), dim=-1)
    return torch.addcmul(x * cos, rotated, sin)


def packed_metadata(lengths: list[int], device=None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sequence lengths -> (positions [T] int64, cu_seqlens [B+1] int32, max_seqlen), built
    on the host as lists and sent to ``device`` in one copy each."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    positions = [j for n in lengths for j in range(n)]
    return (torch.tensor(positions, dtype=torch.int64, device=device),
            torch.tensor(cu, dtype=torch.int32, device=device), max(lengths, default=0))
