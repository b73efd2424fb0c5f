"""``cai pm``: train the preference model (a reward adapter and a scalar head on the base) on
AI-feedback labels.

Data: JSON lines as ``cai label`` writes them: ``prompt`` (a string or chat messages),
``chosen``, ``rejected`` (strings) and ``p_chosen`` (the soft label in [0, 1]; without it a
pair is a hard win for chosen). ``chosen`` / ``rejected`` may also be message lists ending
with the answer, as in the open CAI datasets.

Writes into DIR: ``metrics.jsonl`` (one line per optimizer step), ``checkpoints/``,
``eval.json`` (held-out accuracy, margin, Brier score, ECE and the reliability table) and
``reward/``, the preference model ``cai ppo --reward DIR/reward`` reads. A run started again
with the same DIR resumes from its last checkpoint (``--no-resume`` starts over).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cai.config import add_config_flags, add_model_flags, config_from_args, open_engine
from cai.pm import PMConfig
from cai.training import fresh_start


def register(sub) -> None:
    p = sub.add_parser("pm", help="RL-CAI: train the preference model on AI-feedback labels (Bradley-Terry)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="JSON lines of preference pairs (the output of `cai label`)")
    p.add_argument("--out", required=True, help="output folder (metrics, checkpoints, eval.json, reward/)")
    add_model_flags(p)
    add_common_flags(p)
    add_config_flags(p, PMConfig, prefixes=TRAINING_PREFIXES)
    p.set_defaults(func=run)


TRAINING_PREFIXES = {"lora": "lora-", "optim": ""}
"""Flag prefixes of a training stage's sections: ``--lora-rank``, and the optimizer's bare ``--lr``."""


def add_common_flags(p) -> None:
    p.add_argument("--no-resume", dest="resume", action="store_false", help="start over even if DIR has a checkpoint")
    p.add_argument("--resume", dest="resume", action="store_true", help="continue from DIR's last checkpoint (default)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(resume=True, progress=True)


def run(args) -> int:
    from cai.pairs import read_pairs
    from cai.pm import train_pm
    from engine.train import NonFiniteLossError

    cfg = config_from_args(PMConfig, args)
    pairs = read_pairs(args.data)
    out = Path(args.out)
    fresh_start(out, args.resume)
    eng = open_engine(args)
    try:
        summary = train_pm(eng, pairs, cfg, out, progress=args.progress, resume=args.resume)
    except NonFiniteLossError as exc:
        print(f"cai pm: error: {exc}", file=sys.stderr)
        return 1
    summary.pop("losses")
    held = summary["heldout"]
    if held["pairs"]:
        print(f"held-out: {held['pairs']} pairs, accuracy {held['accuracy']:.3f}, margin {held['mean_margin']:.3f}, "
              f"Brier {held['brier']:.3f}, ECE {held['ece']:.3f}", file=sys.stderr)
        held.pop("reliability")
    print(json.dumps({"out": str(out), "pairs": len(pairs), **summary}))
    return 0
