"""Ahead-of-time compilation of every Triton kernel for the GPUs users have.

The interpreter forgives what the compiler does not (loop-carried type changes, shared
memory past the hardware's limit, TF32 defaults), so the CPU test suite compiles each
kernel here for sm_80 and sm_90, with the launch configuration its launcher uses on a GPU
(the same `*_config` functions), for every dtype the launcher accepts. Triton ships ptxas,
so this needs no GPU. Run with `TRITON_INTERPRET` unset (the kernels must be decorated
for the compiler): `python -m kernels._aot` prints one JSON line per compiled variant.
"""
import importlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from ._triton import triton

# Dynamic shared memory one block may use (bytes): A100 163 KB, H100 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TARGETS = (80, 90)
HEAD_DIMS = (64, 128, 256)
_TL = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
       torch.float64: "fp64"}
_FLOATS = {"inv_temp", "qk_scale", "scale", "clip_eps", "beta", "p_const", "lo", "hi"}


class Variant(NamedTuple):
    """One compilation: kernel, pointer element types, constexprs and launch options."""

    name: str
    kernel: object
    ptrs: dict  # pointer arg -> Triton type ("fp32", "i64", ...); others take `default`
    default: str
    constexprs: dict
    num_warps: int
    num_stages: int


def _signature(v: Variant) -> dict:
    sig = {}
    for p in v.kernel.params:
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + v.ptrs.get(name, v.default)
        else:
            sig[name] = "fp32" if name in _FLOATS else "i32"
    return sig


def _split(cfg: dict):
    cfg = dict(cfg)
    return cfg, cfg.pop("num_warps"), cfg.pop("num_stages")


def _attention_variants():
    attn = importlib.import_module("kernels.attention")
    dec = importlib.import_module("kernels.decode_attention")
    stat = {"lse_ptr": "fp32", "delta_ptr": "fp32", "cu_ptr": "i32", "len_ptr": "i32"}
    for dtype in attn.ATTENTION_DTYPES:
        t, prec = _TL[dtype], attn.dot_precision(dtype)
        for D in HEAD_DIMS:
            # GROUP only sets loop bounds and indices (and decode's BLOCK_G, 16 for any
            # group up to 16): one group, 4 as in Llama 3, stands for all.
            meta = dict(GROUP=4, DOT_PRECISION=prec)
            cfg, w, s = _split(attn.packed_fwd_config(D, dtype))
            yield Variant(f"packed_fwd/{t}/D{D}", attn._packed_attention_fwd_kernel,
                          stat, t, {**meta, **cfg}, w, s)
            cfg, w, s = _split(attn.packed_bwd_config(D, dtype))
            for name, k in (("packed_bwd_dkdv", attn._packed_attention_bwd_kernel),
                            ("packed_bwd_dq", attn._packed_attention_bwd_dq_kernel)):
                yield Variant(f"{name}/{t}/D{D}", k, stat, t, {**meta, **cfg}, w, s)
            for splits in (1, 8):  # 1 writes the output, more write float32 partials
                cfg, w, s = _split(dec.decode_config(D, dtype, 4))
                ptrs = {**stat, "o_ptr": t if splits == 1 else "fp32"}
                yield Variant(f"decode/{t}/D{D}/S{splits}", dec._decode_attention_fwd_kernel,
                              ptrs, t, {**meta, "SPLITS": splits, **cfg}, w, s)
            cfg, w, s = _split(dec.decode_combine_config(8, D))
            yield Variant(f"decode_combine/{t}/D{D}", dec._decode_attention_combine_kernel,
                          {"part_ptr": "fp32", "lse_ptr": "fp32"}, t, {"SPLITS": 8, **cfg}, w, s)


def _logprob_variants():
    lp = importlib.import_module("kernels.logprob")
    ptrs = {"labels_ptr": "i64", "lp_ptr": "fp32", "lse_ptr": "fp32", "ent_ptr": "fp32",
            "dlp_ptr": "fp32", "dent_ptr": "fp32"}
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        t = _TL[dtype]
        for V in (49152,):  # any V >= 4096 launches the same tiles
            cfg, w, s = _split(lp.launch_config(V, dtype))
            for flag in (False, True):
                yield Variant(f"logprob_fwd/{t}/V{V}/ent{int(flag)}", lp._logprob_fwd_kernel,
                              ptrs, t, {"RETURN_ENTROPY": flag, **cfg}, w, s)
                yield Variant(f"logprob_bwd/{t}/V{V}/ent{int(flag)}", lp._logprob_bwd_kernel,
                              ptrs, t, {"HAS_ENTROPY_GRAD": flag, **cfg}, w, s)


def _small_variants():
    ppo = importlib.import_module("kernels.ppo")
    pref = importlib.import_module("kernels.preference")
    cfg, w, s = _split(ppo.launch_config())
    for kind in (1, 2, 3):
        yield Variant(f"kl_penalty/k{kind}", ppo._kl_penalty_fwd_kernel, {}, "fp32",
                      {"KIND": kind, **cfg}, w, s)
    yield Variant("ppo_policy", ppo._ppo_policy_fwd_kernel, {}, "fp32", cfg, w, s)
    yield Variant("ppo_value", ppo._ppo_value_fwd_kernel, {}, "fp32", cfg, w, s)
    cfg, w, s = _split(pref.pair_launch_config())
    for has_ref in (False, True):
        for has_p in (False, True):
            yield Variant(f"pair_loss/ref{int(has_ref)}/p{int(has_p)}",
                          pref._pair_loss_fwd_kernel, {}, "fp32",
                          {"HAS_REF": has_ref, "HAS_P": has_p, **cfg}, w, s)
    for K in (2, 5):
        cfg, w, s = _split(pref.option_launch_config(K))
        for clamp in (False, True):
            yield Variant(f"option_probs/K{K}/clamp{int(clamp)}", pref._option_probs_fwd_kernel,
                          {}, "fp32", {"CLAMP": clamp, **cfg}, w, s)


def variants():
    """Every kernel variant the GPU path can launch, at the GPU launch configuration."""
    yield from _logprob_variants()
    yield from _small_variants()
    yield from _attention_variants()


def jit_kernels() -> set:
    """Names of every `@triton.jit` kernel in the package (the test checks coverage)."""
    names = set()
    for mod in ("attention", "decode_attention", "logprob", "ppo", "preference"):
        m = importlib.import_module(f"kernels.{mod}")
        names |= {n for n, f in vars(m).items() if isinstance(f, triton.runtime.JITFunction)}
    return names


def _ptxas():
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):  # the one that reads Triton's PTX version
        if (bin_dir / name).exists():
            return str(bin_dir / name)
    return None


def spill_bytes(ptx: str, arch: int):
    """Register spill stores (bytes) ptxas reports for `ptx`, or None without ptxas."""
    ptxas = _ptxas()
    if ptxas is None:
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        proc = subprocess.run([ptxas, "-v", f"-arch=sm_{arch}{'a' if arch >= 90 else ''}",
                               "-o", "/dev/null", f.name], capture_output=True, text=True)
    found = re.findall(r"(\d+) bytes spill stores", proc.stderr)
    return sum(int(x) for x in found) if proc.returncode == 0 and found else None


def compile_variant(v: Variant, arch: int) -> dict:
    """Compile `v` for sm_<arch>; returns its shared memory (bytes), the limit, how many
    float32 dots would run in TF32, and the register spills ptxas reports."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=v.kernel, signature=_signature(v), constexprs=v.constexprs)
    out = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                         options=dict(num_warps=v.num_warps, num_stages=v.num_stages))
    # A float32 dot left at Triton's default runs in TF32 (~1e-3 error): count them.
    tf32 = out.asm["ttir"].count("inputPrecision = tf32") if v.default == "fp32" else 0
    return dict(name=v.name, arch=arch, shared=out.metadata.shared, limit=SHARED_LIMIT[arch],
                num_warps=v.num_warps, num_stages=v.num_stages, fp32_tf32_dots=tf32,
                spill_bytes=spill_bytes(out.asm["ptx"], arch))


def main(argv=None) -> int:
    """Compile every variant for every target; one JSON line each, errors included."""
    failures = 0
    covered = {v.kernel.fn.__name__ for v in variants()}
    print(json.dumps(dict(kernels=sorted(jit_kernels()), covered=sorted(covered))), flush=True)
    for v in variants():
        for arch in TARGETS:
            try:
                row = compile_variant(v, arch)
            except Exception as exc:  # report every failure, not only the first
                failures += 1
                row = dict(name=v.name, arch=arch, error=f"{type(exc).__name__}: {exc}"[:2000])
            print(json.dumps(row), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
