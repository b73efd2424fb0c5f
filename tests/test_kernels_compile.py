"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 at its GPU launch
configuration, for every dtype its launcher accepts, within the target's shared memory.

The interpreter that runs the other kernel tests forgives what the compiler rejects
(loop-carried type changes, shared memory past the limit), so this compiles for real,
without a GPU (Triton ships ptxas), in a subprocess with the interpreter off. Compiled
kernels land in Triton's cache: the first run compiles ~170 variants (a few minutes on two
busy cores), later runs take seconds.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # today's default, stated (no warning)
    proc = subprocess.run([sys.executable, "-m", "kernels._aot"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, proc.stderr[-3000:]
    return lines[0], lines[1:]


def test_every_jit_kernel_has_an_aot_variant(compiled):
    header, _ = compiled
    assert len(header["kernels"]) >= 11
    assert set(header["kernels"]) == set(header["covered"])


def test_every_variant_compiles_for_sm80_and_sm90(compiled):
    _, rows = compiled
    errors = [r for r in rows if "error" in r]
    assert not errors, "\n".join(f"{r['name']} sm_{r['arch']}: {r['error'][:400]}"
                                 for r in errors)
    assert {r["arch"] for r in rows} == {80, 90}
    names = {r["name"] for r in rows}
    for dtype in ("fp32", "bf16", "fp16"):  # what the attention launchers accept on CUDA
        for D in (64, 128, 256):
            assert f"packed_fwd/{dtype}/D{D}" in names
            assert f"packed_bwd_dkdv/{dtype}/D{D}" in names
            assert f"decode/{dtype}/D{D}/S8" in names


def test_shared_memory_within_the_target_limit(compiled):
    _, rows = compiled
    over = [f"{r['name']} sm_{r['arch']}: {r['shared']} > {r['limit']} bytes"
            for r in rows if "shared" in r and r["shared"] > r["limit"]]
    assert not over, "\n".join(over)


def test_no_register_spills(compiled):
    """Tiles and warps per head dim and dtype are chosen so that no kernel spills
    registers to local memory (ptxas's count; the dK/dV kernel spilled at 64x64 tiles)."""
    _, rows = compiled
    assert all(r.get("spill_bytes") is not None for r in rows), "ptxas gave no spill count"
    spills = [f"{r['name']} sm_{r['arch']}: {r['spill_bytes']} bytes" for r in rows
              if r["spill_bytes"]]
    assert not spills, "\n".join(spills)


def test_float32_dots_are_full_precision(compiled):
    """tl.dot on float32 defaults to TF32 on CUDA: every float32 kernel asks for "ieee"."""
    _, rows = compiled
    fp32 = [r for r in rows if "/fp32/" in r["name"]]
    assert any(r["name"].startswith("packed_fwd/fp32") for r in fp32)
    assert all("fp32_tf32_dots" in r for r in fp32)
    assert [r["name"] for r in fp32 if r["fp32_tf32_dots"]] == []


def test_float64_attention_is_refused_on_cuda_before_launch():
    """float64 does not compile (the loop-carried accumulators change type): the launcher
    names the dtypes it takes instead of failing inside Triton. Checked on a meta tensor
    dressed as CUDA would need a GPU, so the rule itself is tested."""
    import torch

    from kernels import attention

    class _Cuda:  # the attributes `_check_launch_dtype` reads
        is_cuda, dtype, shape = True, torch.float64, (3, 2, 64)

    with pytest.raises(TypeError, match="float64"):
        attention._check_launch_dtype(_Cuda())
    for dtype in attention.ATTENTION_DTYPES:
        _Cuda.dtype = dtype
        attention._check_launch_dtype(_Cuda())
    _Cuda.dtype, _Cuda.shape = torch.bfloat16, (3, 2, 320)
    with pytest.raises(ValueError, match="256"):
        attention._check_launch_dtype(_Cuda())
