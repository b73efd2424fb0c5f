"""Kernels on the CPU: our torch paths against what a user would write instead.

    python -m bench.kernels [--sizes 2048 8192] [--repeats 3] [--ops logprob attention ...]

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

Peers: "naive" is the textbook PyTorch (full log_softmax + gather; materialised logits for
the fused linear case; unfused KL/PPO and pair losses; one padded SDPA call with a boolean
mask for attention); "trl" is TRL's `selective_log_softmax`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from bench._util import median_ms, peak_rss_mb
from bench.common import emit_json, machine, memory_bandwidth_gbs, print_table

ATTENTION_LENS = [16, 37, 91, 160, 300, 512, 777, 1024]  # "mixed": 8 sequences, 16..1024
HQ, HKV, HEAD_DIM = 9, 3, 64
IMPLS = {"logprob": ["ours", "naive", "trl"], "linear_logprob": ["ours", "naive"],
         "linear_logprob_frozen_weight": ["ours", "naive"],
         "ppo_loss": ["ours", "naive"], "preference": ["ours", "naive"],
         "attention": ["ours", "naive"]}


# ------------------------------------------------------------------------------------------
# Cases: build(size, impl, args) -> (forward, loss_of_output, leaves that take gradients)
# ------------------------------------------------------------------------------------------
def _logprob_case(N, impl, args):
    from kernels.logprob import logprob_torch

    gen = torch.Generator().manual_seed(0)
    logits = (2 * torch.randn(N, args.vocab, generator=gen)).requires_grad_()
    labels = torch.randint(0, args.vocab, (N,), generator=gen)
    if impl == "ours":
        fwd = lambda: logprob_torch(logits, labels)  # noqa: E731
    elif impl == "naive":
        fwd = lambda: torch.log_softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)  # noqa: E731
    else:
        from trl.trainer.utils import selective_log_softmax

        fwd = lambda: selective_log_softmax(logits, labels)  # noqa: E731
    return fwd, lambda out: out.sum(), [logits]


def _linear_case(N, impl, args, train_weight=True):
    from kernels.logprob import linear_logprob_torch

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, args.hidden, generator=gen).requires_grad_()
    weight = (0.05 * torch.randn(args.vocab, args.hidden, generator=gen))
    weight.requires_grad_(train_weight)
    labels = torch.randint(0, args.vocab, (N,), generator=gen)
    if impl == "ours":
        fwd = lambda: linear_logprob_torch(hidden, weight, labels)  # noqa: E731
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
    r = lambda: torch.randn(N, generator=gen)  # noqa: E731
    lp, values = r().requires_grad_(), r().requires_grad_()
    old, ref, adv, old_v, ret = lp.detach() + 0.1 * r(), lp.detach() + 0.1 * r(), r(), r(), r()
    mask = torch.rand(N, generator=gen) > 0.2
    cu = torch.arange(0, N + 1, 512, dtype=torch.int32)
    kw = dict(reduction="sequence", cu_seqlens=cu)
    kl_fn, pol_fn, val_fn = {
        "ours": (ppo.kl_penalty_torch, ppo.ppo_policy_loss_torch, ppo.ppo_value_loss_torch),
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
    pc, pr, rwc, rwr = (torch.randn(B, generator=gen).requires_grad_() for _ in range(4))
    rc, rr, p = torch.randn(B, generator=gen), torch.randn(B, generator=gen), torch.rand(B)
    dpo, bt = {"ours": (pref.dpo_loss_torch, pref.bt_loss_torch),
               "naive": (pref.dpo_loss_reference, pref.bt_loss_reference)}[impl]
    fwd = lambda: dpo(pc, pr, rc, rr, beta=0.1, p_chosen=p).loss + bt(rwc, rwr, p).loss  # noqa: E731
    return fwd, lambda out: out, [pc, pr, rwc, rwr]


def padded_attention(q, k, v, lens):
    """What packing replaces: pad to [B, L, H, D], one SDPA call with a boolean mask."""
    B, L = len(lens), max(lens)
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    idx = torch.cat([torch.arange(n) + b * L for b, n in enumerate(lens)])
    pad = lambda x, h: x.new_zeros(B * L, h, D).index_copy(0, idx, x).view(B, L, h, D)  # noqa: E731
    qp, kp, vp = pad(q, Hq), pad(k, Hkv), pad(v, Hkv)
    valid = torch.arange(L)[None, :] < torch.tensor(lens)[:, None]  # [B, L] keys
    mask = torch.ones(L, L, dtype=torch.bool).tril()[None] & valid[:, None, :]
    out = F.scaled_dot_product_attention(qp.transpose(1, 2), kp.transpose(1, 2),
                                         vp.transpose(1, 2), attn_mask=mask[:, None],
                                         enable_gqa=True)
    return out.transpose(1, 2).reshape(B * L, Hq, D)[idx]


def _attention_case(_, impl, args):
    from kernels.attention import packed_attention_torch

    lens = ATTENTION_LENS
    gen = torch.Generator().manual_seed(0)
    T = sum(lens)
    q, k, v = (torch.randn(T, h, HEAD_DIM, generator=gen).requires_grad_()
               for h in (HQ, HKV, HKV))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    if impl == "ours":
        fwd = lambda: packed_attention_torch(q, k, v, cu, max(lens))  # noqa: E731
    else:
        fwd = lambda: padded_attention(q, k, v, lens)  # noqa: E731
    return fwd, lambda out: out.sum(), [q, k, v]


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
def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    op, size = args.worker_case.split(":")
    size = int(size) if size.isdigit() else size
    if args.worker == "mem":
        fwd, loss, leaves = CASES[op](size, args.worker_impl, args)
        return {"peak_mb": peak_rss_mb(_fwd_bwd(fwd, loss, leaves))}
    built = {impl: CASES[op](size, impl, args) for impl in IMPLS[op]}
    times = {impl: {"fwd": [], "fwd_bwd": []} for impl in built}
    for rnd in range(args.repeats + 1):  # round 0 warms up
        for impl, (fwd, loss, leaves) in built.items():
            with torch.enable_grad():
                f = median_ms(lambda: fwd(), args.inner, warmup=0)
            fb = median_ms(_fwd_bwd(fwd, loss, leaves), args.inner, warmup=0)
            for x in leaves:
                x.grad = None  # free before the next implementation runs
            if rnd:
                times[impl]["fwd"].append(f)
                times[impl]["fwd_bwd"].append(fb)
    return {impl: {k: sorted(v)[len(v) // 2] for k, v in t.items()} for impl, t in times.items()}


def _spawn(args, *extra) -> dict:
    cmd = [sys.executable, "-m", "bench.kernels", "--threads", str(args.threads),
           "--vocab", str(args.vocab), "--hidden", str(args.hidden),
           "--repeats", str(args.repeats), "--inner", str(args.inner), *extra]
    env = dict(os.environ)
    if args.omp_wait_policy != "default":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


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


def floor_ms(op, size, args, gbs, gflops) -> tuple[float, str]:
    """Least fwd+bwd time: the bytes or FLOPs any implementation must spend."""
    V, H = args.vocab, args.hidden
    if op == "logprob":  # read logits (fwd), read them again and write the gradient (bwd)
        return 3 * size * V * 4 / gbs / 1e6, "bytes"
    if op == "linear_logprob":  # logits, dhidden, dweight GEMMs; no recompute
        return 6 * size * V * H / gflops / 1e6, "flops"
    if op == "linear_logprob_frozen_weight":  # logits, dhidden GEMMs
        return 4 * size * V * H / gflops / 1e6, "flops"
    if op == "ppo_loss":  # 8 [N] inputs read, 2 gradients written
        return 10 * size * 4 / gbs / 1e6, "bytes"
    if op == "preference":  # 7 [B] inputs read, 4 gradients written
        return 11 * size * 4 / gbs / 1e6, "bytes"
    pairs = sum(n * (n + 1) // 2 for n in ATTENTION_LENS)  # causal (query, key) pairs
    return 12 * pairs * HQ * HEAD_DIM / gflops / 1e6, "flops"  # fwd 4, bwd 8 per pair*dim


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
    p.add_argument("--worker", choices=["mem", "time"], help=argparse.SUPPRESS)
    p.add_argument("--worker-case", help=argparse.SUPPRESS)
    p.add_argument("--worker-impl", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return {}
    gbs, gflops = memory_bandwidth_gbs(), gemm_gflops()
    print(f"# {machine()}  read bandwidth {gbs:.1f} GB/s  fp32 GEMM {gflops:.0f} GFLOP/s  "
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
            mem = {impl: _spawn(args, "--worker", "mem", "--worker-case", case,
                                "--worker-impl", impl)["peak_mb"] for impl in IMPLS[op]}
            floor, kind = floor_ms(op, size, args, gbs, gflops)
            entry = {"time_ms": t["ours"]["fwd_bwd"], "fwd_ms": t["ours"]["fwd"],
                     "peak_mb": mem["ours"], "floor_ms": floor, "floor_kind": kind}
            for impl in IMPLS[op][1:]:
                entry.update({f"{impl}_time_ms": t[impl]["fwd_bwd"],
                              f"{impl}_fwd_ms": t[impl]["fwd"], f"{impl}_peak_mb": mem[impl]})
            result.setdefault(op, {})[str(size)] = entry
            for impl in IMPLS[op]:
                ratio = t[impl]["fwd_bwd"] / t["ours"]["fwd_bwd"]
                rows.append([op, size, impl, t[impl]["fwd"], t[impl]["fwd_bwd"], mem[impl],
                             f"{ratio:.2f}x", f"{floor:.3g} ({kind})" if impl == "ours" else ""])
            print(f"# done {case}", file=sys.stderr, flush=True)
    print(f"# load average after: {_load()}")
    print_table(["op", "size", "impl", "fwd ms", "fwd+bwd ms", "peak MB", "time/ours",
                 "floor ms"], rows)
    emit_json(result)
    return result


if __name__ == "__main__":
    main()
