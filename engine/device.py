"""Where the model lives and in what precision: ``device`` and ``dtype`` as users give them.

``auto`` picks the first CUDA device when there is one, else the CPU; on CUDA the weights
and activations are bfloat16 (float16 on request), on the CPU float32 (bfloat16 matmuls are
very slow on the CPUs this project is built on). Whatever the weights' dtype, the engine
keeps softmax statistics, log-probs, losses, the heads' outputs, LoRA master weights and
optimizer state in float32.
"""
from __future__ import annotations

import torch

from engine.errors import InputError

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cuda_present() -> bool:
    """A usable CUDA device exists: ``is_available()`` and at least one device counted (a
    CPU build, or a patched ``is_available``, counts none, so ``auto`` then means the CPU)."""
    try:
        return torch.cuda.is_available() and torch.cuda.device_count() > 0
    except (RuntimeError, AssertionError):
        return False


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | a torch.device -> a concrete device
    (``cuda`` means the current CUDA device, with its index)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        return torch.device("cuda", torch.cuda.current_device()) if cuda_present() else torch.device("cpu")
    try:
        dev = torch.device(spec.strip().lower() if isinstance(spec, str) else spec)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"device {spec!r}: expected auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise InputError(f"device {spec!r}: only cpu and cuda devices are supported")
    if not cuda_present():
        raise InputError(f"device {spec!r}: no CUDA device is available here (use --device cpu or auto)")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise InputError(f"device {spec!r}: there are only {torch.cuda.device_count()} CUDA devices")
    return torch.device("cuda", index)


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto`` (bfloat16 on CUDA, float32 on the CPU) | a name in DTYPES | a torch.dtype."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(spec, torch.dtype):
        dtype = spec
    elif isinstance(spec, str) and spec.strip().lower() in DTYPES:
        dtype = DTYPES[spec.strip().lower()]
    else:
        raise InputError(f"dtype {spec!r}: expected auto, float32, bfloat16 or float16")
    if dtype not in SUPPORTED_DTYPES:
        raise InputError(f"dtype {spec!r}: the engine runs float32, bfloat16 or float16 weights")
    return dtype
