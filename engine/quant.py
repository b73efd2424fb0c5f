"""Rollout weights: inference-only stand-ins for the frozen base's products, for generation.

``Engine(rollout_weights=...)`` picks what the generation roles read (the CPU only):

- ``fp32``: the weights themselves (the default; the sampler is the learner's numerics).
- ``fp16``: every base linear and the vocabulary head as float16, through fbgemm's
  weight-only fp16 GEMM (``torch.ops.quantized.linear_dynamic_fp16``: activations and
  accumulation stay float32). A batch-1 decode step reads half the bytes.
- ``int8``: as fp16, and the vocabulary head (a fifth of the default model's weights, and
  its largest single product) as int8 with one symmetric scale per output channel, through
  fbgemm's dynamic int8 GEMM (``torch.ops.quantized.linear_dynamic``: the activations are
  quantised per call, per tensor, to 7 bits; the product accumulates in int32).

What was measured and left out: PyTorch's weight-only ``_weight_int8pack_mm`` is 2.6-8.5x
slower than the float32 product on the AVX2 CPUs here; fbgemm's dynamic int8 on the trunk's
linears is ~2x faster again but its per-tensor activation scale cannot hold the outliers at
the inputs of q/k/v and of the MLP's down projection (the default model's final hidden
states then differ from float32's by ~65% of their norm, and greedy decoding of 8 prompts
diverged within the first two tokens), so the trunk stays fp16 in both modes. The
activations are quantised to 7 bits (fbgemm's ``reduce_range``): its u8 x s8 products add
pairs in int16, which full 8-bit activations can overflow.

LoRA adapters still run in float32 on top of the base product (``Linear.forward`` adds them
after ``base``); the embedding, norms and attention stay float32. The stand-ins are
installed on ``Linear.fast`` / ``Decoder.head_fast`` only for the duration of a generate
call (``installed``), so scoring and training never see them. Each reads its module's
weight at every call and repacks when it is another tensor or has been written since (its
version counter moved: a full fine-tune's optimizer step, ``load_state_dict``), so
generation after an update samples from the updated weights. Memory beside the weights: two bytes per base
parameter for fp16 (~270 MB for the 135M default model); the int8 head takes one byte per
head parameter instead of two.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import torch

from engine.errors import InputError
from engine.model import Decoder, Linear

MODES = ("fp32", "fp16", "int8")


def check_mode(mode: str, device: torch.device) -> str:
    if mode not in MODES:
        raise InputError(f"rollout_weights must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "fp32" and device.type != "cpu":
        raise InputError(f"rollout_weights {mode} runs on the CPU (fbgemm) only; this model is on {device} "
                         f"(use fp32 there: a GPU decodes in the model's own dtype)")
    if mode != "fp32" and "fbgemm" not in torch.backends.quantized.supported_engines:
        raise InputError(f"rollout_weights {mode} needs PyTorch's fbgemm quantized engine, which this build lacks")
    return mode


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [O, I] float -> (int8 [O, I], scale [O] float32): w ~= q * scale[:, None], each row
    scaled so its largest magnitude maps to 127 (round to nearest)."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class _Product:
    """``x -> x W^T (+ b)`` from a packed copy of ``source()``'s weight and bias, packed at the
    first call and again whenever the weight is another tensor, other storage or has been
    written in place since (its version counter moved)."""

    def __init__(self, source: Callable[[], tuple[torch.Tensor, torch.Tensor | None]]):
        self.source = source
        self._key = None
        self._packed = None

    def _pack(self, w: torch.Tensor, b: torch.Tensor | None):
        raise NotImplementedError

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.source()
        key = (w.data_ptr(), w._version)
        if self._key is None or self._key[0] is not w or self._key[1:] != key:
            self._packed = self._pack(w.detach().float(), None if b is None else b.detach().float())
            self._key = (w, *key)
        shape = x.shape
        y = self._apply(x.reshape(-1, shape[-1]).float().contiguous())
        return y.reshape(*shape[:-1], y.shape[-1]).to(x.dtype)


class Int8Product(_Product):
    """W as int8 with one scale per output channel (``quantize_rows``), through fbgemm's dynamic
    int8 GEMM; activations quantised per call to 7 bits (``reduce_range``)."""

    def _pack(self, w, b):
        q, scale = quantize_rows(w)
        zero = torch.zeros(q.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # the quantized tensor API warns that it is deprecated
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
            return torch.ops.quantized.linear_prepack(qw, b)

    def _apply(self, x):
        return torch.ops.quantized.linear_dynamic(x, self._packed, True)


class Fp16Product(_Product):
    """W stored as float16, through fbgemm's weight-only fp16 GEMM (activations and
    accumulation stay float32)."""

    def _pack(self, w, b):
        return torch.ops.quantized.linear_prepack_fp16(w, b)

    def _apply(self, x):
        return torch.ops.quantized.linear_dynamic_fp16(x, self._packed)


class RolloutWeights:
    """The stand-ins of one model for one mode, built lazily and kept between generate calls."""

    def __init__(self, model: Decoder, mode: str):
        self.model, self.mode = model, check_mode(mode, model.device)
        self.linears: dict[Linear, Fp16Product] = {}
        self.head: Int8Product | None = None
        if mode != "fp32":
            for m in model.modules():
                if isinstance(m, Linear):
                    self.linears[m] = Fp16Product(lambda m=m: (m.weight, m.bias))
            self.head = (Int8Product if mode == "int8" else Fp16Product)(lambda: (model.lm_head_weight, None))

    @contextlib.contextmanager
    def installed(self):
        """Generation inside reads the stand-ins; they are taken off again on the way out."""
        if self.mode == "fp32":
            yield
            return
        for m, fast in self.linears.items():
            m.fast = fast
        self.model.head_fast = self.head
        try:
            yield
        finally:
            for m in self.linears:
                m.fast = None
            self.model.head_fast = None
