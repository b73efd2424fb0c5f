"""Where the time goes: every phase is an NVTX range and a ``torch.profiler`` record.

``phase("generate.decode")`` marks a span of work. Under Nsight Systems
(``nsys profile -t cuda,nvtx,osrt ...``) it shows as an NVTX range of that name; under
``torch.profiler`` it is a ``record_function`` span. Both cost well under a microsecond when
no tool is listening, so the marks stay on in production.

``Tracer(path, steps)`` records a Chrome trace (``chrome://tracing``, Perfetto) of the first
``steps`` steps of a run: the stages call ``step()`` once per decode step, train step or
scoring batch, and after ``steps`` of them the trace is written and profiling stops, so a
long run yields a small trace.

Range names, by layer:
  engine.generate.prefill / engine.generate.decode / engine.generate.sample
  engine.score.options / engine.train.forward / engine.train.backward / engine.train.optimizer
  cai.sl.answer / cai.sl.critique / cai.sl.revision
  cai.label.sample / cai.label.reason / cai.label.score
  cai.sft.step / cai.pm.step / cai.dpo.step
  cai.ppo.rollout / cai.ppo.score / cai.ppo.reference / cai.ppo.train
  cai.run.<stage> / cai.eval.generate / cai.eval.judge
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from engine.device import cuda_present

try:  # the nvtx package is a thin wrapper; without a CUDA driver its ranges are no-ops
    import nvtx as _nvtx
except ImportError:  # pragma: no cover - nvtx is a declared dependency
    _nvtx = None

_tracer: "Tracer | None" = None


@contextlib.contextmanager
def phase(name: str):
    """An NVTX range and a torch.profiler record named ``name`` around the block."""
    rng = _nvtx.start_range(name) if _nvtx is not None else None
    try:
        with torch.profiler.record_function(name):
            yield
    finally:
        if rng is not None:
            _nvtx.end_range(rng)


def step() -> None:
    """Count one step toward the active Tracer's budget (no-op when none is active)."""
    if _tracer is not None:
        _tracer.step()


class Tracer:
    """Profile the first ``steps`` steps of a run into a Chrome trace at ``path``."""

    def __init__(self, path: str | Path, steps: int = 8):
        self.path, self.budget, self.done = Path(path), steps, 0
        acts = [torch.profiler.ProfilerActivity.CPU]
        if cuda_present():  # kernel times on the GPU timeline, under the same phase names
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=acts, record_shapes=False)
        self.written = False

    def __enter__(self) -> "Tracer":
        global _tracer
        _tracer = self
        self.prof.__enter__()
        return self

    def step(self) -> None:
        self.done += 1
        if self.done >= self.budget:
            self._finish()

    def _finish(self) -> None:
        global _tracer
        if self.written:
            return
        self.prof.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.path))
        self.written = True
        _tracer = None

    def __exit__(self, *exc) -> None:
        self._finish()
