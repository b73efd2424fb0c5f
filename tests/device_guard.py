"""A guard that fails any tensor the engine creates off the model's device.

On a CPU-only machine a forgotten ``device=`` is invisible: the tensor lands on the CPU,
where the model is. On a user's GPU it is a crash (or a silent host round trip). So the
guard checks what the code *says*, not only where the tensor landed: every factory call
(``torch.tensor``, ``zeros``, ``arange``, ``nn.Linear``'s ``empty`` ...) made from
``engine/`` or ``cai/`` must name a device, and every tensor those files produce must be
on the model's device. An explicit ``device="cpu"`` marks a deliberate host tensor (a seed,
a shuffle order) and is allowed; so are ``.cpu()`` / ``.to()``.

Calls are attributed to the first frame outside ``torch/nn`` and torch's Python tensor
methods (so a module built in
``engine/scoring.py`` counts as built there); frames in ``kernels/``, ``torch/optim`` or the
tests are someone else's and are not checked here.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

REPO = Path(__file__).resolve().parent.parent
WATCHED = (str(REPO / "engine") + "/", str(REPO / "cai") + "/")
_TORCH = Path(torch.__file__).parent
PASS_THROUGH = (str(_TORCH / "nn") + "/", str(_TORCH / "overrides.py"), str(_TORCH / "_tensor.py"),
                str(_TORCH / "functional.py"))
FACTORIES = {
    torch.tensor, torch.as_tensor, torch.empty, torch.zeros, torch.ones, torch.full, torch.arange, torch.rand,
    torch.randn, torch.randint, torch.randperm, torch.linspace, torch.eye, torch.empty_strided, torch.scalar_tensor,
}
MOVES = {torch.Tensor.cpu, torch.Tensor.to, torch.Tensor.tolist, torch.Tensor.item}


def _caller() -> str | None:
    """file:line of the engine/cai frame that made this call, or None if it is not ours."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(PASS_THROUGH):
        frame = frame.f_back
    if frame is None or not frame.f_code.co_filename.startswith(WATCHED):
        return None
    return f"{Path(frame.f_code.co_filename).relative_to(REPO)}:{frame.f_lineno}"


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for y in x:
            yield from _tensors(y)


class DeviceGuard(TorchFunctionMode):
    """``with DeviceGuard(model.device) as g: ...``; then ``g.violations`` lists each
    offending call as "file:line: what"."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device, self.violations = torch.device(device), []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        where = _caller()
        if where is None or func in MOVES:
            return out
        name = getattr(func, "__name__", str(func))
        if func in FACTORIES:
            dev = kwargs.get("device")
            if dev is None and not (func is torch.as_tensor and args and isinstance(args[0], torch.Tensor)):
                self.violations.append(f"{where}: torch.{name} without device=")
            if dev is not None and torch.device(dev).type == "cpu" and self.device.type != "cpu":
                return out  # a deliberate host tensor
        for t in _tensors(out):
            if t.device != self.device:
                self.violations.append(f"{where}: torch.{name} made a tensor on {t.device}, the model is on {self.device}")
        return out
