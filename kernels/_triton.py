"""Optional Triton import.

Triton is an optional dependency: without it the kernel modules must still import, so the
`@triton.jit` kernels are defined against stand-ins that raise only when launched.
`TRITON_INTERPRET=1` must be set before the kernel modules are imported for the kernels to
run on CPU tensors (Triton picks interpreter or compiler when a kernel is decorated).
"""
import contextlib
import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

    class _Anything:
        """Stands in for `triton.language` so kernel signatures (`tl.constexpr`) evaluate."""

        def __getattr__(self, name):
            return self

        def __call__(self, *args, **kwargs):
            return self

    class _Unavailable:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            raise RuntimeError(f"{self.fn.__name__}: triton is not installed")

    class _TritonStub:
        @staticmethod
        def jit(fn=None, **kwargs):
            return _Unavailable(fn) if fn is not None else _Unavailable

        @staticmethod
        def next_power_of_2(n):
            return 1 << max(int(n) - 1, 0).bit_length()

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

    triton = _TritonStub()
    tl = _Anything()


def interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def launch_device(*tensors):
    """Check that a launch can run and return the context to launch it under.

    Raises a clear error without triton, for tensors on more than one device, or for CPU
    tensors outside the interpreter. For CUDA tensors the context makes their device the
    current one (Triton launches on the current device, not on the tensors')."""
    if not HAS_TRITON:
        raise RuntimeError("the triton kernels need the `triton` package")
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"triton kernel inputs must share one device, got "
                         f"{sorted(str(d) for d in devices)}")
    device = devices.pop() if devices else torch.device("cpu")
    if device.type == "cuda":
        return torch.cuda.device(device)
    if device.type == "cpu" and interpreted():
        return contextlib.nullcontext()
    if device.type == "cpu":
        raise RuntimeError("triton kernels on CPU tensors need TRITON_INTERPRET=1 set before "
                           "`kernels` is imported")
    raise ValueError(f"triton kernels run on CUDA tensors, got {device}")


def check_launchable(*tensors) -> None:
    """`launch_device` without the context (kept for callers that only check)."""
    launch_device(*tensors)
