"""``cai eval``: harmlessness and helpfulness of checkpoints on held-out prompts.

    cai eval --model default --checkpoint initial= --checkpoint sl-cai=RUN/sft/adapter \\
             --checkpoint rl-cai=RUN/ppo/policy --metrics sft=RUN/sft --metrics ppo=RUN/ppo --out DIR

Each ``--checkpoint NAME=FOLDER`` is an adapter folder on the base (an empty FOLDER is the
base itself), given in training order. Writes into DIR: ``responses.jsonl`` and
``judgments.jsonl`` (reused by a rerun), ``eval.json``, ``report.md``, ``elo.png``, with
``--metrics`` ``training_curves.png``, and with ``--attacks default`` (or a templates file)
``attacks.png``: every red-team prompt is also asked wrapped in each jailbreak template.
"""
from __future__ import annotations

import argparse

from cai.config import add_config_flags, add_model_flags, config_from_args, open_engine
from cai.eval import EvalConfig
from engine.errors import InputError


def register(sub) -> None:
    p = sub.add_parser("eval", help="refusal, AI-judged win rates and Elo of checkpoints on held-out prompts",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=FOLDER",
                   help="a checkpoint to evaluate, in training order; FOLDER empty: the base (default: initial=)")
    p.add_argument("--metrics", action="append", default=[], metavar="STAGE=PATH",
                   help="training metrics to plot: sft, pm, ppo or dpo = a metrics.jsonl or its folder; "
                   "pm_eval = the preference model's eval.json (default: beside its metrics)")
    p.add_argument("--constitution", default="default", help="'default', a YAML / JSON file, or the paper's folder")
    p.add_argument("--feedback-model", default=None,
                   help="another local model to judge with (loaded once, same process); default: the base")
    p.add_argument("--out", required=True, help="output folder (answers and judgments are reused on a rerun)")
    p.add_argument("--overwrite", action="store_true", help="discard cached answers and judgments")
    add_config_flags(p, EvalConfig)
    p.set_defaults(func=run_eval)


def parse_pairs(items: list[str], what: str) -> dict[str, str | None]:
    """["a=x", "b="] -> {"a": "x", "b": None}, in the order given."""
    out: dict[str, str | None] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise InputError(f"--{what} {item!r}: expected NAME=PATH")
        if name.strip() in out:
            raise InputError(f"--{what}: {name.strip()!r} given twice")
        out[name.strip()] = value.strip() or None
    return out


def run_eval(args) -> int:
    from cai.eval import evaluate
    from engine import distributed

    cfg = config_from_args(EvalConfig, args)
    checkpoints = parse_pairs(args.checkpoint, "checkpoint") or {"initial": None}
    metrics = {k: v for k, v in parse_pairs(args.metrics, "metrics").items() if v}
    eng = open_engine(args, max_slots=cfg.max_slots)
    feedback = open_engine(args, args.feedback_model, max_slots=cfg.max_slots) if args.feedback_model else None
    result = evaluate(eng, checkpoints, cfg, args.out, feedback, progress=True, constitution=args.constitution,
                      training_metrics=metrics, overwrite=args.overwrite)
    if not distributed.is_main():  # rank 0 reports
        return 0
    print(summary_table(result))
    if result.get("attacks"):
        from cai.attacks import attack_table

        print(attack_table(result["attacks"]))
    print(f"wrote {args.out}/report.md, eval.json, elo.png"
          + (", training_curves.png" if result["plots"]["training_curves"] else "")
          + (", attacks.png" if result["plots"].get("attacks") else ""))
    return 0


def summary_table(result: dict) -> str:
    """The summary as fixed-width text for the terminal."""
    head = ("checkpoint", "refusal", "over-refusal", "harm win", "help win", "harm Elo", "help Elo")
    rows = [head]
    for s in result["summary"]:
        rows.append((s["checkpoint"], _f(s["refusal_rate"], "{:.0%}"), _f(s["over_refusal_rate"], "{:.0%}"),
                     _f(s["harmlessness_win_rate"], "{:.2f}"), _f(s["helpfulness_win_rate"], "{:.2f}"),
                     _f(s["harmlessness_elo"], "{:+.0f}"), _f(s["helpfulness_elo"], "{:+.0f}")))
    widths = [max(len(r[k]) for r in rows) for k in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def _f(x, fmt: str) -> str:
    return "-" if x is None else fmt.format(x)
