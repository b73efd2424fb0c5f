"""Which implementation each op runs: resolved once per op, overridable.

CUDA available and Triton importable -> "triton"; otherwise "torch" (the chunked CPU path).
`CAI_KERNELS=triton|torch|reference` overrides every op at import; `override()` does the
same in-process for a block (tests and benchmarks use it).
"""
import contextlib
import os

import torch

from ._triton import HAS_TRITON, interpreted

IMPLS = ("triton", "torch", "reference")
OPS = ("logprob", "linear_logprob", "kl_penalty", "ppo_policy_loss", "ppo_value_loss",
       "option_probs", "bt_loss", "dpo_loss", "packed_attention", "decode_attention")

_resolved: dict[str, str] = {}


def _default() -> str:
    env = os.environ.get("CAI_KERNELS", "").strip().lower()
    if env:
        if env not in IMPLS:
            raise ValueError(f"CAI_KERNELS={env!r}: expected one of {IMPLS}")
        if env == "triton" and not HAS_TRITON:
            raise RuntimeError("CAI_KERNELS=triton but triton is not installed")
        if env == "triton" and not torch.cuda.is_available() and not interpreted():
            raise RuntimeError("CAI_KERNELS=triton without CUDA needs TRITON_INTERPRET=1")
        return env
    return "triton" if HAS_TRITON and torch.cuda.is_available() else "torch"


def backend(op: str) -> str:
    """The implementation `op` runs: "triton", "torch" or "reference"."""
    if op not in OPS:
        raise KeyError(f"unknown op {op!r}; ops are {OPS}")
    if op not in _resolved:
        _resolved[op] = _default()
    return _resolved[op]


@contextlib.contextmanager
def override(impl: str, ops=OPS):
    """Run `ops` with `impl` inside the block, then restore what was resolved before."""
    if impl not in IMPLS:
        raise ValueError(f"impl {impl!r}: expected one of {IMPLS}")
    saved = {op: backend(op) for op in ops}
    _resolved.update({op: impl for op in ops})
    try:
        yield
    finally:
        _resolved.update(saved)
