"""Scale-out on torch.distributed: the same work on 1 process x 2 threads and on 2 processes
x 1 thread (the two ways to spend two CPU cores), and with CUDA, on 1 GPU and on every GPU.

Measured, per layout, in fresh processes (the 2-process one under ``torchrun``, gloo on the
CPU, NCCL on GPUs):
  - generation tokens/s: every prompt of a fixed set sampled once, each rank its share
    (draws keyed by prompt, so the work is the same whatever the layout);
  - SFT step time: optimizer steps of the same global batch (grad_accum x world micro-batches);
  - PPO iteration time: rollouts, scoring, reference log-probs and the update of the same
    iteration (a real, untrained preference model on the same base).

``efficiency`` is the ratio of throughputs (for step times, the inverse ratio of times) of
2 processes x 1 thread over 1 process x 2 threads: > 1 means data parallelism uses the two
cores better than torch's intra-op threads do. ``scaling`` is 2 processes x 1 thread over
twice 1 process x 1 thread (1 = perfect scaling; the single-thread layout is measured for
it). On N GPUs both are N GPUs over N x one GPU.
Prints a table, then one JSON line last. ``--tiny`` runs a seconds-long version on
``dummy:tiny`` (the test runs it).

    python -m bench.scale --tiny
    python -m bench.scale --model dummy:smollm2-135m --prompts 16 --new-tokens 32
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

STAGES = ("generate_tok_s", "sft_step_s", "ppo_iteration_s")


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model to load (default dummy:smollm2-135m; tiny: dummy:tiny)")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long run on dummy:tiny")
    ap.add_argument("--prompts", type=int, default=None, help="prompts generated and PPO prompts per iteration "
                    "(default 16; tiny 4)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens per response (default 32; tiny 4)")
    ap.add_argument("--sft-steps", type=int, default=None, help="SFT optimizer steps timed (default 4; tiny 2)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (1 GPU against all of them)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a layout's JSON result goes here
    ap.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.model = args.model or ("dummy:tiny" if args.tiny else "dummy:smollm2-135m")
    args.prompts = args.prompts or (4 if args.tiny else 16)
    args.new_tokens = args.new_tokens or (4 if args.tiny else 32)
    args.sft_steps = args.sft_steps or (2 if args.tiny else 4)
    return args


# ---- one layout (run inside each process) -------------------------------------------------

def _prompts(n: int) -> list[str]:
    return [f"Tell me how to bake bread, step {i}." for i in range(n)]


def _generation(eng, args, distributed) -> float:
    from engine import SamplingParams

    ids = [eng.encode(p, i) for i, p in enumerate(_prompts(args.prompts))]
    mine = distributed.shard(list(range(len(ids))))
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, seed=0)
    eng.generate([ids[0]], SamplingParams(max_new_tokens=2, seed=1))  # warm-up
    distributed.barrier()
    t0 = _now()
    outs = eng.generate([ids[i] for i in mine], params, sample_keys=mine)
    local = sum(len(o.samples[0].token_ids) for o in outs)
    distributed.barrier()  # the slowest rank's end is the layout's end
    dt = _now() - t0
    total = distributed.all_reduce_sum(torch.tensor([float(local)], device=_coll_device(eng)))
    return float(total) / dt


def _sft(eng, args, distributed) -> float:
    from cai.sft import SFTConfig, train_sft
    from engine.lora import LoraConfig
    from engine.train import OptimConfig

    world = distributed.world()
    micro = 2 * max(2, world)  # micro-batches per step over all ranks, the same for every layout
    convs = [[{"role": "user", "content": p}, {"role": "assistant", "content": "Mix flour, water and yeast; knead."}]
             for p in _prompts(micro * (args.sft_steps + 1))]
    cfg = SFTConfig(max_tokens_per_batch=128, shuffle=False, max_steps=args.sft_steps + 1, lora=LoraConfig(dropout=0.0),
                    optim=OptimConfig(grad_accum=micro // world, warmup_steps=1))
    with tempfile.TemporaryDirectory() as tmp:  # rank 0's metrics: every step's time
        out = Path(distributed.broadcast_object(tmp))
        train_sft(eng, convs, cfg, out, resume=False)
        times = [json.loads(line)["step_s"] for line in (out / "metrics.jsonl").read_text().splitlines()] \
            if distributed.is_main() else [0.0]
        distributed.barrier()
    return sum(times[1:]) / max(1, len(times) - 1)  # the first step pays one-time costs


def _ppo(eng, args, distributed) -> float:
    from cai.pm import RewardModel, new_head
    from cai.ppo import PPOConfig, train_ppo
    from cai.prompts import PromptRecord
    from engine import lora

    if "reward" not in lora.adapters(eng.model):
        lora.add_adapter(eng.model, "reward", seed=2)
    rm = RewardModel(eng, new_head(eng.model, 3).eval().requires_grad_(False), "reward", True, 4096)
    red = [PromptRecord(f"p{i}", p, None, "x", "train") for i, p in enumerate(_prompts(args.prompts))]
    cfg = PPOConfig(iterations=2, prompts_per_iteration=args.prompts, helpful_fraction=0.0,
                    max_new_tokens=args.new_tokens, minibatch_size=max(2, args.prompts // 2), ppo_epochs=1)
    log = train_ppo(eng, rm, red, cfg, "sft")
    return log[-1]["iteration_s"]  # the second: the first pays one-time costs


def _now() -> float:
    import time

    return time.perf_counter()


def _coll_device(eng) -> torch.device:
    return eng.model.device if eng.model.device.type == "cuda" else torch.device("cpu")


def worker(args) -> None:
    from engine import Engine, distributed

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = f"cuda:{distributed.local_rank()}" if args.device == "cuda" else "cpu"
    distributed.init(dev)
    eng = Engine.load(args.model, device=dev, dtype="float32" if dev == "cpu" else "auto")
    res = {"world": distributed.world(), "threads": torch.get_num_threads(),
           "generate_tok_s": _generation(eng, args, distributed), "sft_step_s": _sft(eng, args, distributed),
           "ppo_iteration_s": _ppo(eng, args, distributed)}
    if distributed.is_main():
        Path(args.worker).write_text(json.dumps(res))
    distributed.barrier()


# ---- the two layouts, side by side --------------------------------------------------------

def layouts(device: str) -> list[tuple[str, int, int]]:
    """(name, processes, threads each)."""
    if device == "cuda":
        n = torch.cuda.device_count()
        return [("1 GPU", 1, 1)] + ([(f"{n} GPUs", n, 1)] if n > 1 else [])
    return [("1 proc x 1 thread", 1, 1), ("1 proc x 2 threads", 1, 2), ("2 procs x 1 thread", 2, 1)]


def run_layout(args, procs: int, threads: int, out: Path) -> dict:
    flags = ["--worker", str(out), "--threads", str(threads), "--model", args.model, "--prompts", str(args.prompts),
             "--new-tokens", str(args.new_tokens), "--sft-steps", str(args.sft_steps), "--device", args.device]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # a layout is its own job
    cmd = [sys.executable, "-m", "bench.scale", *flags] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
         "-m", "bench.scale", *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench.scale: the {procs}-process layout failed:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def efficiency(one: dict, many: dict, per: int = 1) -> dict:
    """Throughput ratios, ``many`` over ``one``, divided by ``per``."""
    return {"generate": many["generate_tok_s"] / one["generate_tok_s"] / per,
            "sft": one["sft_step_s"] / many["sft_step_s"] / per,
            "ppo": one["ppo_iteration_s"] / many["ppo_iteration_s"] / per}


def main(argv=None) -> dict:
    args = parse(argv)
    if args.worker:
        worker(args)
        return {}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, procs, threads in layouts(args.device):
            results[name] = {**run_layout(args, procs, threads, Path(tmp) / f"{procs}.json"), "procs": procs}
    names = list(results)
    print(f"{'layout':<22}{'gen tok/s':>12}{'SFT step s':>12}{'PPO iter s':>12}")
    for name, r in results.items():
        print(f"{name:<22}{r['generate_tok_s']:>12.1f}{r['sft_step_s']:>12.4f}{r['ppo_iteration_s']:>12.4f}")
    many = results[names[-1]]
    if args.device == "cuda":  # N GPUs against N x one GPU
        eff = efficiency(results[names[0]], many, many["procs"]) if len(names) > 1 else None
        scaling = eff
    else:  # the two ways to use 2 cores; and 2 processes against twice one single-threaded one
        eff = efficiency(results["1 proc x 2 threads"], many)
        scaling = efficiency(results["1 proc x 1 thread"], many, 2)
    for label, row in (("efficiency", eff), ("per-core scaling", scaling if scaling is not eff else None)):
        if row:
            print(f"{label:<22}{row['generate']:>12.2f}{row['sft']:>12.2f}{row['ppo']:>12.2f}")
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    doc = {"bench": "scale", "model": args.model, "device": args.device, "prompts": args.prompts,
           "new_tokens": args.new_tokens, "layouts": results, "efficiency": eff,
           "scaling": scaling, "loadavg": [float(x) for x in load]}
    print(json.dumps(doc))
    return doc


if __name__ == "__main__":
    main()
