"""``cai sft``: fine-tune on SL-CAI revisions into a LoRA adapter (or the full model).

Data: JSON lines; each record is an SL-CAI record (``messages`` ending with the final
revision, or ``init_prompt`` + ``revision_response``), or ``{"messages"}`` /
``{"prompt", "response"}``. ``--include-helpful`` adds another such file (the paper mixes in
helpful samples so the model stays helpful).

Writes into DIR: ``metrics.jsonl`` (one line per optimizer step), ``checkpoints/``,
``adapter/`` (engine format), ``peft/`` (a peft adapter folder) and, with
``--export-merged`` or ``--full``, ``merged/`` (a transformers checkpoint). A run started
again with the same DIR resumes from its last checkpoint (``--no-resume`` starts over).

``--config FILE.yaml`` sets any field of the run (top-level fields of SFTConfig, and
``lora:`` / ``optim:`` sections); flags given on the command line win.
"""
from __future__ import annotations

import argparse
import json
import sys

from cai.config import add_config_flags, add_model_flags, config_from_args, open_engine
from cai.outputs import check_dir_output
from cai.pm_cmd import TRAINING_PREFIXES, add_common_flags
from cai.sft import SFTConfig
from cai.training import fresh_start


def register(sub) -> None:
    p = sub.add_parser("sft", help="supervised fine-tuning on SL-CAI revisions (LoRA by default)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="JSON lines of SL-CAI records or prompt/response pairs")
    p.add_argument("--out", required=True, help="output folder (checkpoints, metrics, exports)")
    add_model_flags(p, "the model")
    p.add_argument("--include-helpful", help="another JSON lines file of helpful examples to mix in")
    p.add_argument("--config", help="YAML file setting any SFTConfig field")
    add_common_flags(p)
    add_config_flags(p, SFTConfig, prefixes=TRAINING_PREFIXES)
    p.set_defaults(func=run)


def run(args) -> int:
    from cai.sft import read_sft_file, train_sft
    from engine.train import NonFiniteLossError

    cfg = config_from_args(SFTConfig, args, args.config)
    out = check_dir_output(args.out, inputs=(args.data, args.include_helpful, args.config))
    examples = read_sft_file(args.data)
    if args.include_helpful:
        examples += read_sft_file(args.include_helpful)
    fresh_start(out, args.resume)
    eng = open_engine(args)
    try:
        summary = train_sft(eng, examples, cfg, out, progress=args.progress, resume=args.resume)
    except NonFiniteLossError as exc:
        print(f"cai sft: error: {exc}", file=sys.stderr)
        return 1
    summary.pop("losses")
    print(json.dumps({"out": str(out), "examples": len(examples), **summary}))
    return 0
