"""``cai dpo``: direct preference optimisation of the policy adapter on AI-feedback labels,
the alternative to ``cai pm`` + ``cai ppo``.

Data: the same JSON lines ``cai pm`` reads (``prompt``, ``chosen``, ``rejected``,
``p_chosen``). ``--sft-adapter DIR`` (``cai sft --out DIR`` writes DIR/adapter) is both the
policy's starting point and the reference; without it both are the base model.

Writes into DIR: ``metrics.jsonl`` (loss, accuracy, reward margin, implicit chosen and
rejected rewards per optimizer step), ``checkpoints/``, ``policy/`` (engine adapter format)
and ``peft/``. A run started again with the same DIR resumes from its last checkpoint
(``--no-resume`` starts over).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cai.config import add_config_flags, add_model_flags, config_from_args, open_engine
from cai.dpo import DPOConfig
from cai.pm_cmd import TRAINING_PREFIXES, add_common_flags
from cai.training import fresh_start


def register(sub) -> None:
    p = sub.add_parser("dpo", help="RL-CAI without a reward model: DPO on AI-feedback labels",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="JSON lines of preference pairs (the output of `cai label`)")
    p.add_argument("--out", required=True, help="output folder (metrics, checkpoints, policy/, peft/)")
    add_model_flags(p)
    p.add_argument("--sft-adapter", default=None,
                   help="SFT adapter folder: the policy's start and the reference (default: the base itself)")
    add_common_flags(p)
    add_config_flags(p, DPOConfig, prefixes=TRAINING_PREFIXES)
    p.set_defaults(func=run)


def run(args) -> int:
    from cai.dpo import train_dpo
    from cai.label_cmd import load_policy
    from cai.pairs import read_pairs
    from engine.train import NonFiniteLossError

    cfg = config_from_args(DPOConfig, args)
    pairs = read_pairs(args.data)
    out = Path(args.out)
    fresh_start(out, args.resume)
    eng = open_engine(args)
    sft = load_policy(eng, args.sft_adapter)
    try:
        summary = train_dpo(eng, pairs, cfg, sft, out, progress=args.progress, resume=args.resume)
    except NonFiniteLossError as exc:
        print(f"cai dpo: error: {exc}", file=sys.stderr)
        return 1
    summary.pop("losses")
    print(json.dumps({"out": str(out), **summary}))
    return 0
