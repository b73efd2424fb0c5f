"""``cai run``: the whole method in one command, into one run folder.

    cai run --preset demo --out runs/demo
    cai run --config my.yaml --out runs/mine --set sl.rounds=4 --set rl=dpo

The YAML file (and --set) may set any field of the run and of each stage's section
(sl, sft, label, pm, ppo, dpo, eval); an unknown key is an error naming it. Run the same
command again after an interruption and it resumes at the stage and record where it stopped;
every setting is checked before the model loads, and --overwrite starts the folder over.
--device, --dtype, --rollout-weights and --no-cuda-graphs are short for --set device=..., dtype=...,
rollout_weights=..., cuda_graphs=false.

    torchrun --nproc-per-node 2 -m cai.cli run --preset demo --out runs/demo

runs every stage on two ranks: the generating stages deal their prompts out and rank 0
merges the records; rank 0 alone prints and keeps the run folder's books.
"""
from __future__ import annotations

import argparse
import json

from cai.config import ROLLOUT_WEIGHTS


def register(sub) -> None:
    p = sub.add_parser("run", help="the whole method: SL-CAI -> SFT -> labels -> PM -> PPO/DPO -> eval",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of run settings")
    p.add_argument("--preset", help="a built-in preset: demo (about 20 minutes on 2 cores) or paper")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set sl.rounds=4 (repeatable)")
    p.add_argument("--out", help="run folder (default: runs/<preset or config name>)")
    p.add_argument("--device", help="where the model runs: auto, cpu, cuda or cuda:N (same as --set device=...)")
    p.add_argument("--dtype", help="weight dtype: auto, float32, bfloat16 or float16 (same as --set dtype=...)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=None,
                   help="decode eagerly on CUDA (same as --set cuda_graphs=false)")
    p.add_argument("--rollout-weights", choices=ROLLOUT_WEIGHTS,
                   help="what generation reads on the CPU (same as --set rollout_weights=...)")
    p.add_argument("--overwrite", action="store_true",
                   help="start the run folder over: remove what an earlier run with other settings wrote there")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from cai.config import parse_set
    from cai.pipeline import Pipeline, load_run_config
    from engine import distributed
    from engine.errors import InputError

    if not args.config and not args.preset:
        raise InputError("give --preset NAME or --config FILE (see cai run --help)")
    cfg, _ = load_run_config(args.config, args.preset, parse_set(set_items(args)))
    out = args.out or str(Path("runs") / (args.preset or Path(args.config).stem))
    result = Pipeline(cfg, out, overwrite=args.overwrite).run()
    if distributed.is_main():
        print_summary(result, out)
    return 0


def set_items(args) -> list[str]:
    """``--set`` items, with --device / --dtype / --no-cuda-graphs as the last (winning) ones."""
    items = list(args.set) + [f"{k}={v}" for k, v in (("device", args.device), ("dtype", args.dtype),
                                                             ("rollout_weights", args.rollout_weights)) if v]
    return items + (["cuda_graphs=false"] if args.cuda_graphs is False else [])


def print_summary(result: dict, out: str) -> None:
    rows = result.get("eval", {}).get("summary") or []
    if rows:
        keys = list(rows[0].keys())
        widths = [max(len(k), *(len(_fmt(r.get(k))) for r in rows)) for k in keys]
        print("  ".join(k.rjust(w) for k, w in zip(keys, widths)))
        for r in rows:
            print("  ".join(_fmt(r.get(k)).rjust(w) for k, w in zip(keys, widths)))
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in result["stages"].items())
    print(f"done in {result['seconds']:.0f} s ({stages}); report: {out}/report.md")
    print(json.dumps({"out": out, "seconds": result["seconds"]}))


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)
