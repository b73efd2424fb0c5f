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
from dataclasses import fields, replace
from pathlib import Path

from cai.config import add_dataclass_flags, dataclass_from_args, field_docs
from cai.pm import PMConfig
from cai.training import fresh_start
from engine.errors import InputError


def register(sub) -> None:
    p = sub.add_parser("pm", help="RL-CAI: train the preference model on AI-feedback labels (Bradley-Terry)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="JSON lines of preference pairs (the output of `cai label`)")
    p.add_argument("--out", required=True, help="output folder (metrics, checkpoints, eval.json, reward/)")
    p.add_argument("--model", default="default", help="the shared base model: folder, .gguf file or 'default'")
    add_common_flags(p)
    add_dataclass_flags(p, PMConfig)
    add_section_flags(p, PMConfig().lora, "lora")
    add_section_flags(p, PMConfig().optim)
    p.set_defaults(func=run)


def add_common_flags(p) -> None:
    p.add_argument("--no-resume", dest="resume", action="store_false", help="start over even if DIR has a checkpoint")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(resume=True, progress=True)


def add_section_flags(p, defaults, prefix: str = "") -> None:
    """Flags for the fields of a nested config (``--lora-rank``; no prefix: ``--lr``), whose
    defaults are the stage's own (``defaults`` is an instance)."""
    docs = field_docs(type(defaults))
    for f in fields(defaults):
        value, dest = getattr(defaults, f.name), f"{prefix}_{f.name}" if prefix else f.name
        help_ = f"{docs.get(f.name, '')} (default: {value})".replace("%", "%%")  # argparse formats help with %
        kw = dict(dest=dest, default=value, help=help_)
        if isinstance(value, bool):
            p.add_argument("--" + dest.replace("_", "-"), action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(value, (int, float, str)):
            p.add_argument("--" + dest.replace("_", "-"), type=type(value), **kw)
        elif isinstance(value, tuple) and value:
            item = type(value[0])
            p.add_argument("--" + dest.replace("_", "-"), metavar="A,B,...",
                           type=lambda s, item=item: tuple(item(x.strip()) for x in s.split(",") if x.strip()), **kw)


def section_from_args(defaults, args, prefix: str = ""):
    """``defaults`` with every field its flag set (re-validated by the dataclass)."""
    given = {f.name: getattr(args, f"{prefix}_{f.name}" if prefix else f.name) for f in fields(defaults)
             if hasattr(args, f"{prefix}_{f.name}" if prefix else f.name)}
    return replace(defaults, **given)


def build_config(cls, args):
    """A stage config from its flags: top-level fields, ``--lora-*`` and the optimizer's."""
    try:
        base = cls()
        cfg = dataclass_from_args(cls, args)
        return replace(cfg, lora=section_from_args(base.lora, args, "lora"), optim=section_from_args(base.optim, args))
    except (TypeError, ValueError) as exc:
        raise InputError(f"{cls.__name__}: {exc}") from exc


def run(args) -> int:
    from cai.pairs import read_pairs
    from cai.pm import train_pm
    from engine import Engine
    from engine.train import NonFiniteLossError

    cfg = build_config(PMConfig, args)
    pairs = read_pairs(args.data)
    out = Path(args.out)
    fresh_start(out, args.resume)
    eng = Engine.load(args.model)
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
