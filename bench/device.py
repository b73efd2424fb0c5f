"""Where a benchmark runs, how it loads the engine there, and the device's peak figures.

``--device auto|cpu|cuda`` and ``--model`` (``default``, a folder, a .gguf, ``dummy:<shape>``
or a config.json) mean the same in every benchmark; ``load_engine`` is the one place a
benchmark hands its device and dtype to the engine.

Peak figures on CUDA come from the vendors' data sheets (dense bfloat16 tensor-core rate,
HBM bandwidth), matched on the device's name; an unknown device reports only what it
achieved. On the CPU there is no data sheet to trust: the benchmarks measure the read
bandwidth and the float32 GEMM rate (``bench.common``) and use those as the floor.
"""
from __future__ import annotations

import time

import torch

# name fragment -> (memory bandwidth GB/s, dense bf16 TFLOP/s); first match wins, so the
# more specific names come first.
CUDA_PEAKS = [
    ("H200", (4800.0, 989.0)),
    ("H100 PCIe", (2000.0, 756.0)),
    ("H100 NVL", (3900.0, 835.0)),
    ("H100", (3350.0, 989.0)),
    ("A100 80GB PCIe", (1935.0, 312.0)),
    ("A100-SXM4-80GB", (2039.0, 312.0)),
    ("A100", (1555.0, 312.0)),
    ("L40S", (864.0, 362.0)),
    ("L4", (300.0, 121.0)),
]


def add_device_args(ap, model: bool = True) -> None:
    """The flags every device-aware benchmark takes."""
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="where to run: auto = the first CUDA device when there is one, else the CPU")
    if model:
        ap.add_argument("--model", default="default",
                        help="'default', a model folder, a .gguf file, dummy:<shape> (random weights; shapes: "
                             "tiny, smollm2-135m, llama-1b, llama-8b) or a config.json")


def resolve_device(name: str) -> torch.device:
    """``--device`` as the engine reads it (``engine.device``); a bad one ends the run."""
    from engine.device import resolve_device as resolve
    from engine.errors import InputError

    try:
        return resolve(name)
    except InputError as exc:
        raise SystemExit(f"--device {name}: {exc}") from None


def default_dtype(device: torch.device) -> torch.dtype:
    """The engine's ``auto`` dtype there: bfloat16 on CUDA, float32 on the CPU."""
    from engine.device import resolve_dtype

    return resolve_dtype("auto", device)


def load_engine(model: str, device: torch.device):
    """The engine on ``device`` in its default dtype: the one place a benchmark passes its
    device to the engine."""
    from engine import Engine

    return Engine.load(model, device=device, dtype=default_dtype(device))


def peaks(device: torch.device) -> dict | None:
    """{"name", "bandwidth_gbs", "tflops"} of a known CUDA device, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for frag, (gbs, tflops) in CUDA_PEAKS:
        if frag in name:
            return {"name": name, "bandwidth_gbs": gbs, "tflops": tflops}
    return None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def sync(device: torch.device) -> None:
    """Wait for queued work, so a host clock measures it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, object]:
    """(seconds, result) of ``fn()``, the device's queue drained before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def achieved(nbytes: float, flops: float, seconds: float, peak: dict | None, dtype: torch.dtype) -> dict:
    """Achieved GB/s and TFLOP/s of work that moved ``nbytes`` and did ``flops``, and their
    fractions of the device's peak where it is known (the FLOP/s peak is the bfloat16 one,
    so it is given only for 16-bit work)."""
    out = {"achieved_gbs": round(nbytes / seconds / 1e9, 2), "achieved_tflops": round(flops / seconds / 1e12, 4)}
    if peak is not None:
        out["bandwidth_fraction"] = round(out["achieved_gbs"] / peak["bandwidth_gbs"], 4)
        if dtype in (torch.bfloat16, torch.float16):
            out["flops_fraction"] = round(out["achieved_tflops"] / peak["tflops"], 4)
    return out


def peak_memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
