"""Small measuring helpers shared by benchmarks (see also `bench.common`).

`peak_rss_mb` is exact where `bench.common.PeakRSS` samples: Linux keeps the process's
high-water mark of resident memory (VmHWM) and resets it to the current RSS when "5" is
written to /proc/self/clear_refs. Torch's CPU allocator has no cache (large blocks go
straight back to the OS), so the high-water mark above the level before a call is the
peak extra memory that call needed. Measure in a fresh process: glibc keeps small freed
blocks resident, which would hide a later call's use of them.
"""
from __future__ import annotations

import gc
import statistics
import time


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_rss_mb(fn) -> float:
    """Run `fn()` once; return the peak resident memory above the level before, in MiB."""
    gc.collect()
    base = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # no permission: fall back to sampling
        from bench.common import PeakRSS

        with PeakRSS() as m:
            fn()
        return m.peak_mb
    fn()
    return (_status_kb("VmHWM") - base) / 1024


def median_ms(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` calls, in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3
