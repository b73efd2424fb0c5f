"""Kernels on the CPU: our torch paths against what a user would write instead.

    python -m bench.kernels [--sizes 2048 8192] [--repeats 3] [--ops logprob attention ...]
                            [--model dummy:llama-8b | config.json | folder] [--device auto|cpu|cuda] [--tiny]

Per op and size: forward time (autograd on), forward+backward time (median of --repeats,
the implementations interleaved round by round so machine noise hits them alike) and peak
extra memory of one cold forward+backward (each in a fresh process: the high-water mark
of resident memory above the level before the call, gradients included; see
`bench._util.peak_rss_mb`). The floor beside each case is the least time the work can take
here: bytes / measured read bandwidth for the memory-bound ops, FLOPs / measured GEMM rate
for the matmul-bound ones. Prints a table, then one JSON line.

Workers run with OMP_WAIT_POLICY=passive by default (--omp-wait-policy): this project's
machines are shared, and with OpenMP's default spin-waiting a parallel region stalls
whenever another process holds one of the cores (a 16-token SDPA call went from 0.1 ms to
~65 ms here), which measures the neighbours rather than the code. It applies to every
implementation alike; the header line prints it with the load average before and after.

``--model`` takes the vocabulary, hidden size and attention heads from a model's config
(``dummy:<shape>``, a config.json or a checkpoint folder; default: SmolLM2-135M's). On CUDA
"ours" is the public op (the kernel its dispatch picks there), the logits, hidden states
and attention inputs are bfloat16, times are taken with the device synchronised, peak
memory is the allocator's high-water mark, and each case reports its achieved GB/s or
TFLOP/s against the device's data-sheet peak (``bench.device``; none for an unknown device).
``--tiny`` runs every case at a few dozen tokens, to check the benchmark end to end.

Peers: "naive" is the textbook PyTorch (full log_softmax + gather; materialised logits for
the fused linear case; unfused KL/PPO and pair losses; one padded SDPA call with a boolean
mask for attention); "trl" is TRL's `selective_log_softmax`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from bench import device as dev
from bench._util import median_ms, peak_rss_mb
from bench.common import emit_json, machine, memory_bandwidth_gbs, print_table

ATTENTION_LENS = [16, 37, 91, 160, 300, 512, 777, 1024]  # "mixed": 8 sequences, 16..1024
TINY_ATTENTION_LENS = [1, 7, 30]
HQ, HKV, HEAD_DIM = 9, 3, 64
IMPLS = {"logprob": ["ours", "naive", "trl"], "linear_logprob": ["ours", "naive"],
         "linear_logprob_frozen_weight": ["ours", "naive"],
         "ppo_loss": ["ours", "naive"], "preference": ["ours", "naive"],
         "attention": ["ours", "naive"]}


# ------------------------------------------------------------------------------------------
# Cases: build(size, impl, args) -> (forward, loss_of_output, leaves that take gradients)
# ------------------------------------------------------------------------------------------
def _device(args) -> torch.device:
    return torch.device(getattr(args, "dev", "cpu"))


def _on(t: torch.Tensor, args, big: bool = False, grad: bool = False) -> torch.Tensor:
    """``t`` (drawn on the CPU, so every device sees the same values) on the benchmark's
    device; ``big`` tensors (logits, hidden states, weights, q/k/v) in its working dtype."""
    d = _device(args)
    t = t.to(d, dev.default_dtype(d) if big and t.is_floating_point() else t.dtype)
    return t.requires_grad_() if grad else t


def _ours(module, name: str, args):
    """Our implementation: the public op on CUDA (its dispatch picks the kernel), the
    torch CPU path on the CPU."""
    return getattr(module, name if _device(args).type == "cuda" else f"{name}_torch")


def _logprob_case(N, impl, args):
    op = importlib.import_module("kernels.logprob")  # the module; the package exports the function

    gen = torch.Generator().manual_seed(0)
    logits = _on(2 * torch.randn(N, args.vocab, generator=gen), args, big=True, grad=True)
    labels = _on(torch.randint(0, args.vocab, (N,), generator=gen), args)
    if impl == "ours":
        fwd = lambda: _ours(op, "logprob", args)(logits, labels)  # noqa: E731
    elif impl == "naive":
        fwd = lambda: torch.log_softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)  # noqa: E731
    else:
        from trl.trainer.utils import selective_log_softmax

        fwd = lambda: selective_log_softmax(logits, labels)  # noqa: E731
    return fwd, lambda out: out.sum(), [logits]


def _linear_case(N, impl, args, train_weight=True):
    op = importlib.import_module("kernels.logprob")  # the module; the package exports the function

    gen = torch.Generator().manual_seed(0)
    hidden = _on(torch.randn(N, args.hidden, generator=gen), args, big=True, grad=True)
    weight = _on(0.05 * torch.randn(args.vocab, args.hidden, generator=gen), args, big=True, grad=train_weight)
    labels = _on(torch.randint(0, args.vocab, (N,), generator=gen), args)
    if impl == "ours":
        fwd = lambda: _ours(op, "linear_logprob", args)(hidden, weight, labels)  # noqa: E731
    else:
        fwd = lambda: torch.log_softmax(hidden @ weight.t(), -1).gather(  # noqa: E731
            1, labels[:, None]).squeeze(1)
    return fwd, lambda out: out.sum(), [hidden, weight] if train_weight else [hidden]


def _linear_frozen_case(N, impl, args):
    """The LoRA case: lm_head (often the tied embedding) frozen, gradient to hidden only."""
    return _linear_case(N, impl, args, train_weight=False)


def _ppo_case(N, impl, args):
    from kernels import ppo

    gen = torch.Generator().manual_seed(0)
    r = lambda: _on(torch.randn(N, generator=gen), args)  # noqa: E731
    lp, values = r().requires_grad_(), r().requires_grad_()
    old, ref, adv, old_v, ret = lp.detach() + 0.1 * r(), lp.detach() + 0.1 * r(), r(), r(), r()
    mask = _on(torch.rand(N, generator=gen) > 0.2, args)
    cu = _on(torch.arange(0, N + 1, min(512, N), dtype=torch.int32), args)
    kw = dict(reduction="sequence", cu_seqlens=cu)
    kl_fn, pol_fn, val_fn = {
        "ours": tuple(_ours(ppo, n, args) for n in ("kl_penalty", "ppo_policy_loss", "ppo_value_loss")),
        "naive": (ppo.kl_penalty_reference, ppo.ppo_policy_loss_reference,
                  ppo.ppo_value_loss_reference)}[impl]

    def fwd():
        kl = kl_fn(lp, ref, "k3")
        return (pol_fn(lp, old, adv, mask, **kw).loss + 0.5 * val_fn(values, old_v, ret, mask,
                                                                     **kw).loss
                + 0.05 * (kl * mask).sum() / mask.sum())
    return fwd, lambda out: out, [lp, values]


def _preference_case(B, impl, args):
    from kernels import preference as pref

    gen = torch.Generator().manual_seed(0)
    pc, pr, rwc, rwr = (_on(torch.randn(B, generator=gen), args, grad=True) for _ in range(4))
    rc, rr, p = (_on(x, args) for x in (torch.randn(B, generator=gen), torch.randn(B, generator=gen), torch.rand(B)))
    dpo, bt = {"ours": (_ours(pref, "dpo_loss", args), _ours(pref, "bt_loss", args)),
               "naive": (pref.dpo_loss_reference, pref.bt_loss_reference)}[impl]
    fwd = lambda: dpo(pc, pr, rc, rr, beta=0.1, p_chosen=p).loss + bt(rwc, rwr, p).loss  # noqa: E731
    return fwd, lambda out: out, [pc, pr, rwc, rwr]


def padded_attention(q, k, v, lens):
    """What packing replaces: pad to [B, L, H, D], one SDPA call with a boolean mask."""
    B, L = len(lens), max(lens)
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    d = q.device
    idx = torch.cat([torch.arange(n, device=d) + b * L for b, n in enumerate(lens)])
    pad = lambda x, h: x.new_zeros(B * L, h, D).index_copy(0, idx, x).view(B, L, h, D)  # noqa: E731
    qp, kp, vp = pad(q, Hq), pad(k, Hkv), pad(v, Hkv)
    valid = torch.arange(L, device=d)[None, :] < torch.tensor(lens, device=d)[:, None]  # [B, L] keys
    mask = torch.ones(L, L, dtype=torch.bool, device=d).tril()[None] & valid[:, None, :]
    out = F.scaled_dot_product_attention(qp.transpose(1, 2), kp.transpose(1, 2),
                                         vp.transpose(1, 2), attn_mask=mask[:, None],
                                         enable_gqa=True)
    return out.transpose(1, 2).reshape(B * L, Hq, D)[idx]


def _attention_case(_, impl, args):
    op = importlib.import_module("kernels.attention")

    lens, (hq, hkv, d) = _lens(args), _heads(args)
    gen = torch.Generator().manual_seed(0)
    T = sum(lens)
    q, k, v = (_on(torch.randn(T, h, d, generator=gen), args, big=True, grad=True) for h in (hq, hkv, hkv))
    cu = _on(torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32), args)
    if impl == "ours":
        fwd = lambda: _ours(op, "packed_attention", args)(q, k, v, cu, max(lens))  # noqa: E731
    else:
        fwd = lambda: padded_attention(q, k, v, lens)  # noqa: E731
    return fwd, lambda out: out.sum(), [q, k, v]


def _lens(args) -> list[int]:
    return getattr(args, "attention_lens", None) or ATTENTION_LENS


def _heads(args) -> tuple[int, int, int]:
    return tuple(getattr(args, "heads", None) or (HQ, HKV, HEAD_DIM))


CASES = {"logprob": _logprob_case, "linear_logprob": _linear_case,
         "linear_logprob_frozen_weight": _linear_frozen_case, "ppo_loss": _ppo_case,
         "preference": _preference_case, "attention": _attention_case}


def _fwd_bwd(fwd, loss, leaves):
    def run():
        for x in leaves:
            x.grad = None
        loss(fwd()).backward()
    return run


# ------------------------------------------------------------------------------------------
# Workers (fresh processes) and the driver
# ------------------------------------------------------------------------------------------
def _synced(fn, d: torch.device):
    """``fn`` followed by draining the device's queue, so a host clock times the work."""
    def run():
        fn()
        dev.sync(d)
    return run


def _peak_mb(fn, d: torch.device) -> float:
    """Peak extra memory of one ``fn()``: the CUDA allocator's high-water mark there, else RSS."""
    if d.type != "cuda":
        return peak_rss_mb(fn)
    torch.cuda.synchronize(d)
    base = torch.cuda.memory_allocated(d)
    torch.cuda.reset_peak_memory_stats(d)
    _synced(fn, d)()
    return (torch.cuda.max_memory_allocated(d) - base) / 2**20


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    op, size = args.worker_case.split(":")
    size = int(size) if size.isdigit() else size
    d = _device(args)
    if args.worker == "mem":
        fwd, loss, leaves = CASES[op](size, args.worker_impl, args)
        return {"peak_mb": _peak_mb(_fwd_bwd(fwd, loss, leaves), d)}
    built = {impl: CASES[op](size, impl, args) for impl in IMPLS[op]}
    times = {impl: {"fwd": [], "fwd_bwd": []} for impl in built}
    for rnd in range(args.repeats + 1):  # round 0 warms up
        for impl, (fwd, loss, leaves) in built.items():
            with torch.enable_grad():
                f = median_ms(_synced(fwd, d), args.inner, warmup=0)
            fb = median_ms(_synced(_fwd_bwd(fwd, loss, leaves), d), args.inner, warmup=0)
            for x in leaves:
                x.grad = None  # free before the next implementation runs
            if rnd:
                times[impl]["fwd"].append(f)
                times[impl]["fwd_bwd"].append(fb)
    return {impl: {k: sorted(v)[len(v) // 2] for k, v in t.items()} for impl, t in times.items()}


def _spawn(args, *extra) -> dict:
    cmd = [sys.executable, "-m", "bench.kernels", "--threads", str(args.threads),
           "--vocab", str(args.vocab), "--hidden", str(args.hidden),
           "--repeats", str(args.repeats), "--inner", str(args.inner), "--device", str(args.dev),
           "--heads", ",".join(map(str, args.heads)), "--attention-lens", ",".join(map(str, args.attention_lens)),
           *extra]
    env = dict(os.environ)
    if args.omp_wait_policy != "default":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _memory(args, case: str, impl: str) -> float:
    """Peak MB of one cold fwd+bwd, in a fresh process; ``--tiny`` measures in this one
    (its figures are not the point, and a process per case would dominate its run time)."""
    if args.tiny:
        return worker(argparse.Namespace(**{**vars(args), "worker": "mem", "worker_case": case,
                                            "worker_impl": impl}))["peak_mb"]
    return _spawn(args, "--worker", "mem", "--worker-case", case, "--worker-impl", impl)["peak_mb"]


def gemm_gflops(m=2048, k=576, n=8192, repeats=5) -> float:
    """Best-of-n float32 GEMM rate at the lm_head's shape."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * m * k * n / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def work(op, size, args) -> tuple[float, str]:
    """What fwd+bwd must spend at least: bytes moved ("bytes") or FLOPs done ("flops")."""
    V, H = args.vocab, args.hidden
    el = 2 if _device(args).type == "cuda" else 4  # the working dtype of logits / hidden states
    if op == "logprob":  # read logits (fwd), read them again and write the gradient (bwd)
        return 3 * size * V * el, "bytes"
    if op == "linear_logprob":  # logits, dhidden, dweight GEMMs; no recompute
        return 6 * size * V * H, "flops"
    if op == "linear_logprob_frozen_weight":  # logits, dhidden GEMMs
        return 4 * size * V * H, "flops"
    if op == "ppo_loss":  # 8 [N] float32 inputs read, 2 gradients written
        return 10 * size * 4, "bytes"
    if op == "preference":  # 7 [B] float32 inputs read, 4 gradients written
        return 11 * size * 4, "bytes"
    hq, _, d = _heads(args)
    pairs = sum(n * (n + 1) // 2 for n in _lens(args))  # causal (query, key) pairs
    return 12 * pairs * hq * d, "flops"  # fwd 4, bwd 8 per pair*dim


def rates(args) -> tuple[float | None, float | None]:
    """(GB/s, GFLOP/s) the floor divides by: measured on the CPU, data-sheet peaks on CUDA
    (None for an unknown device: then only achieved figures are reported)."""
    d = _device(args)
    if d.type == "cuda":
        peak = dev.peaks(d)
        return (peak["bandwidth_gbs"], peak["tflops"] * 1e3) if peak else (None, None)
    if args.tiny:
        return memory_bandwidth_gbs(64, 2), gemm_gflops(256, 64, 512, 2)
    return memory_bandwidth_gbs(), gemm_gflops()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--sizes", nargs="+", type=int, default=[2048, 8192],
                   help="token counts N for logprob and linear_logprob")
    p.add_argument("--ppo-tokens", type=int, default=8192)
    p.add_argument("--pairs", type=int, default=4096, help="B for the preference losses")
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    p.add_argument("--inner", type=int, default=1, help="calls per round (median)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--omp-wait-policy", choices=["passive", "active", "default"],
                   default="passive", help="OMP_WAIT_POLICY for the worker processes")
    p.add_argument("--model", default=None,
                   help="take vocab, hidden size and heads from a model: dummy:<shape>, a config.json or a folder")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run: auto = the first CUDA device when there is one, else the CPU")
    p.add_argument("--tiny", action="store_true", help="every case at a few dozen tokens (checks it end to end)")
    p.add_argument("--heads", type=lambda x: [int(v) for v in x.split(",")], default=[HQ, HKV, HEAD_DIM],
                   help="attention: query heads, KV heads, head dim")
    p.add_argument("--attention-lens", type=lambda x: [int(v) for v in x.split(",")], default=None,
                   help="attention: the packed sequences' lengths")
    p.add_argument("--worker", choices=["mem", "time"], help=argparse.SUPPRESS)
    p.add_argument("--worker-case", help=argparse.SUPPRESS)
    p.add_argument("--worker-impl", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dev = dev.resolve_device(args.device)
    if args.model:
        cfg = _model_config(args.model)
        args.vocab, args.hidden = cfg.vocab_size, cfg.hidden_size
        args.heads = [cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim]
    if args.tiny and not args.worker:
        args.sizes, args.ppo_tokens, args.pairs, args.repeats = [37], 300, 64, 1
        args.vocab = args.vocab if args.model else 1000
        args.attention_lens = args.attention_lens or TINY_ATTENTION_LENS
    args.attention_lens = args.attention_lens or ATTENTION_LENS
    return args


def _model_config(spec: str):
    """The shape of ``spec`` without loading weights: a dummy shape, a config.json, a folder's."""
    from pathlib import Path

    from engine import dummy
    from engine.config import ModelConfig

    if dummy.is_dummy(spec):
        return dummy.model_config(spec)
    if spec == "default":
        from engine.loader import default_model_folder

        spec = str(default_model_folder())
    return dummy.model_config(str(Path(spec) / "config.json"))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return {}
    gbs, gflops = rates(args)
    d = _device(args)
    print(f"# {machine()}  device {dev.device_name(d)}  bandwidth {gbs} GB/s  GEMM {gflops} GFLOP/s  "
          f"vocab {args.vocab} hidden {args.hidden} heads {args.heads}  "
          f"OMP_WAIT_POLICY={args.omp_wait_policy}  load {_load()}")
    sizes = {"logprob": args.sizes, "linear_logprob": args.sizes,
             "linear_logprob_frozen_weight": args.sizes, "ppo_loss": [args.ppo_tokens],
             "preference": [args.pairs], "attention": ["mixed"]}
    small = {"ppo_loss", "preference"}  # microsecond ops: more calls per round
    result, rows = {}, []
    for op in args.ops:
        for size in sizes[op]:
            case = f"{op}:{size}"
            inner = ["--inner", "50"] if op in small else []
            t = _spawn(args, "--worker", "time", "--worker-case", case, *inner)
            mem = {impl: _memory(args, case, impl) for impl in IMPLS[op]}
            amount, kind = work(op, size, args)
            rate = gbs if kind == "bytes" else gflops  # None on an unknown CUDA device
            rate = rate * 1e9 if rate else None
            floor = amount / rate * 1e3 if rate else None
            achieved = amount / (t["ours"]["fwd_bwd"] / 1e3) / 1e9  # GB/s or GFLOP/s
            entry = {"time_ms": t["ours"]["fwd_bwd"], "fwd_ms": t["ours"]["fwd"],
                     "peak_mb": mem["ours"], "floor_ms": floor, "floor_kind": kind,
                     ("achieved_gbs" if kind == "bytes" else "achieved_gflops"): round(achieved, 2),
                     "floor_fraction": round(floor / t["ours"]["fwd_bwd"], 4) if floor else None}
            for impl in IMPLS[op][1:]:
                entry.update({f"{impl}_time_ms": t[impl]["fwd_bwd"],
                              f"{impl}_fwd_ms": t[impl]["fwd"], f"{impl}_peak_mb": mem[impl]})
            result.setdefault(op, {})[str(size)] = entry
            for impl in IMPLS[op]:
                ratio = t[impl]["fwd_bwd"] / t["ours"]["fwd_bwd"]
                rows.append([op, size, impl, t[impl]["fwd"], t[impl]["fwd_bwd"], mem[impl],
                             f"{ratio:.2f}x", f"{floor:.3g} ({kind})" if impl == "ours" and floor else ""])
            print(f"# done {case}", file=sys.stderr, flush=True)
    print(f"# load average after: {_load()}")
    print_table(["op", "size", "impl", "fwd ms", "fwd+bwd ms", "peak MB", "time/ours",
                 "floor ms"], rows)
    result["meta"] = {"device": dev.device_name(d), "vocab": args.vocab, "hidden": args.hidden, "heads": args.heads,
                      "model": args.model, "peak": dev.peaks(d), "bandwidth_gbs": gbs, "gflops": gflops}
    emit_json(result)
    return result


if __name__ == "__main__":
    main()
