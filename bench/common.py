"""What every benchmark needs: timing, peak memory, the machine's floors, and output.

Peak memory on the CPU: torch has no allocator statistics there, so a sampler thread reads
the process's resident set size (``/proc/self/statm``) every millisecond while the measured
call runs and reports the peak above the level before it. It sees every allocation torch
makes, including the ones freed before the call returns.
"""
from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRSS:
    """``with PeakRSS() as m: ...`` then ``m.peak_mb``: peak RSS growth during the block."""

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def peak_mb(self) -> float:
        return (self.peak - self.base) / 2**20


@contextmanager
def timer():
    """``with timer() as t: ...`` then ``t()`` is the elapsed seconds."""
    start = time.perf_counter()
    end = [None]
    yield lambda: (end[0] or time.perf_counter()) - start
    end[0] = time.perf_counter()


def memory_bandwidth_gbs(mib: int = 1024, repeats: int = 5) -> float:
    """Best-of-n read bandwidth: a sum over a buffer far larger than the caches."""
    buf = torch.ones(mib * 2**20 // 4)
    buf.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return buf.numel() * 4 / best / 1e9


def matmul_peak_gflops(m: int = 2048, k: int = 576, n: int = 1536, repeats: int = 5) -> float:
    """Best-of-n float32 GEMM rate through the same linear the engine uses."""
    from engine.model import linear

    a, w = torch.randn(m, k), torch.randn(n, k)
    with torch.inference_mode():
        linear(a, w)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            linear(a, w)
            best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


def machine() -> dict:
    return {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__}


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def emit_json(obj: dict) -> None:
    """The last line a benchmark prints."""
    print(json.dumps(obj, sort_keys=False))
