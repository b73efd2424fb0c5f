"""The decoder's configuration, read from a transformers ``config.json`` (or its object).

One dataclass covers the Llama family the engine runs: Llama / SmolLM2, Mistral and Qwen2.
They differ only in a few switches (qkv bias, tied embeddings, rope scaling), so one model
class serves them all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.errors import InputError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass
class ModelConfig:
    """Shape and numerics of a Llama-family decoder.

    Fields mirror transformers' names where they exist so a reader can map them one to one.
    """

    model_type: str = "llama"
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or {"rope_type": "linear"|"llama3", "factor": ..., ...} as in transformers.
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # Qwen2 puts a bias on q, k and v
    sliding_window: int | None = None  # Mistral; attention beyond it is not windowed here
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    @property
    def qkv_size(self) -> int:
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    @classmethod
    def from_hf(cls, hf: Any, source: str = "config") -> "ModelConfig":
        """Build from a transformers config object or its ``to_dict()``."""
        d = hf if isinstance(hf, dict) else hf.to_dict()
        model_type = d.get("model_type", "")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise InputError(
                f"{source}: unsupported architecture model_type={model_type!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
            theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            eos = d.get("eos_token_id")
            cfg = cls(
                model_type=model_type,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
                max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
                sliding_window=d.get("sliding_window") if d.get("use_sliding_window", True) else None,
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
                pad_token_id=d.get("pad_token_id"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{source}: missing or malformed field: {exc}") from exc
        if d.get("mlp_bias"):
            raise InputError(f"{source}: mlp_bias=true is not supported")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise InputError(f"{source}: num_attention_heads must be a multiple of num_key_value_heads")
        cfg.inv_freq()  # validates the rope settings now rather than at the first forward
        return cfg

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies [head_dim / 2], float64, with the configured scaling."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        sc = self.rope_scaling
        if not sc:
            return inv
        kind = sc.get("rope_type")
        if kind == "linear":
            return inv / float(sc["factor"])
        if kind == "llama3":
            return _llama3_inv_freq(inv, sc, self.max_position_embeddings)
        raise InputError(f"rope scaling {kind!r} is not supported (supported: linear, llama3)")


def _llama3_inv_freq(inv: torch.Tensor, sc: dict, max_pos: int) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths slowed by `factor`, short ones kept, a smooth
    ramp between the two wavelength bounds."""
    factor = float(sc["factor"])
    lo, hi = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    orig = float(sc.get("original_max_position_embeddings", max_pos))
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > orig / lo, inv / factor, inv)
    ramp = (orig / wavelen - lo) / (hi - lo)
    smoothed = (1 - ramp) * scaled / factor + ramp * scaled
    medium = (wavelen >= orig / hi) & (wavelen <= orig / lo)
    return torch.where(medium, smoothed, scaled)
