"""Which implementation each op runs: chosen by the inputs' device, resolved once per
(op, device type), overridable.

CUDA tensors (and Triton importable) -> "triton"; any other tensors -> "torch" (the chunked
CPU path). What the machine has does not matter: CPU tensors on a CUDA machine run the torch
path. `CAI_KERNELS=triton|torch|reference` forces one implementation for every op and device
(read at the first resolution); `override()` does the same in-process for a block (tests and
benchmarks use it). Forcing "triton" onto CPU tensors is legal only under the interpreter
(`TRITON_INTERPRET=1`), and otherwise fails with a message saying so.
"""
import contextlib
import os

import torch

from ._triton import HAS_TRITON, interpreted

IMPLS = ("triton", "torch", "reference")
OPS = ("logprob", "linear_logprob", "kl_penalty", "ppo_policy_loss", "ppo_value_loss",
       "option_probs", "bt_loss", "dpo_loss", "packed_attention", "decode_attention")

_resolved: dict[tuple[str, str], str] = {}  # (op, device type) -> impl
_forced: dict[str, str] = {}  # op -> impl, inside `override()` blocks


def _env() -> str:
    env = os.environ.get("CAI_KERNELS", "").strip().lower()
    if env and env not in IMPLS:
        raise ValueError(f"CAI_KERNELS={env!r}: expected one of {IMPLS}")
    return env


def _device_type(device) -> str:
    if device is None:  # what the op would run on the machine's default accelerator
        return "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device, torch.Tensor):
        device = device.device
    return torch.device(device).type


def _check_forced(impl: str, dev: str, source: str) -> str:
    if impl == "triton" and not HAS_TRITON:
        raise RuntimeError(f"{source}=triton but triton is not installed")
    if impl == "triton" and dev != "cuda" and not interpreted():
        raise RuntimeError(f"{source}=triton on {dev} tensors needs TRITON_INTERPRET=1 set "
                           "before `kernels` is imported (the Triton kernels run on CUDA)")
    return impl


def _resolve(dev: str) -> str:
    env = _env()
    if env:
        return _check_forced(env, dev, "CAI_KERNELS")
    return "triton" if HAS_TRITON and dev == "cuda" else "torch"


def backend(op: str, device=None) -> str:
    """The implementation `op` runs for inputs on `device` (a torch.device, a string, or a
    tensor; None: the first CUDA device if there is one, else the CPU): "triton", "torch"
    or "reference"."""
    if op not in OPS:
        raise KeyError(f"unknown op {op!r}; ops are {OPS}")
    dev = _device_type(device)
    if op in _forced:
        return _check_forced(_forced[op], dev, "override")
    key = (op, dev)
    if key not in _resolved:
        _resolved[key] = _resolve(dev)
    return _resolved[key]


def validate_env() -> None:
    """Fail now on a CAI_KERNELS that no device could run, rather than at the first op."""
    env = _env()
    if env == "triton" and not torch.cuda.is_available():
        _check_forced(env, "cpu", "CAI_KERNELS")
    elif env == "triton":
        _check_forced(env, "cuda", "CAI_KERNELS")


@contextlib.contextmanager
def override(impl: str, ops=OPS):
    """Run `ops` with `impl` on every device inside the block, then restore what was
    resolved before."""
    if impl not in IMPLS:
        raise ValueError(f"impl {impl!r}: expected one of {IMPLS}")
    ops = list(ops)
    for op in ops:
        if op not in OPS:
            raise KeyError(f"unknown op {op!r}; ops are {OPS}")
    saved = {op: _forced.get(op) for op in ops}
    _forced.update({op: impl for op in ops})
    try:
        yield
    finally:
        for op, impl_before in saved.items():
            if impl_before is None:
                _forced.pop(op, None)
            else:
                _forced[op] = impl_before
