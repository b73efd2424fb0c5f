"""``cai sl``: the SL-CAI critique -> revision loop over a prompt set, written as JSON lines.

Re-running the same command after an interruption continues where it stopped; finished
records are kept, none is written twice. Under ``torchrun --nproc-per-node N -m cai.cli sl
...`` the chunks of prompts are dealt to N ranks, each writes its own shard beside --out,
and rank 0 merges them into --out in the input order (the same records as one process).
"""
from __future__ import annotations

import argparse
from cai.config import add_config_flags, add_model_flags, config_from_args
from cai.prompts import add_prompt_flags
from cai.sl import SLConfig


def register(sub) -> None:
    p = sub.add_parser("sl", help="SL-CAI: answer, critique and revise red-team prompts",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_prompt_flags(p)
    p.add_argument("--constitution", default="default",
                   help="'default', our YAML, an open-recipe JSON, or a folder of the paper's files")
    add_model_flags(p, "the model")
    p.add_argument("--out", required=True, help="output JSON lines file (resumed if it exists)")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    add_config_flags(p, SLConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch
    from tqdm import tqdm

    from cai.constitution import load_constitution
    from cai.outputs import check_file_output
    from cai.prompts import select_prompts
    from cai.config import open_engine
    from cai.shards import open_output
    from cai.sl import SLRunner, prompt_source
    from engine import distributed

    cfg = config_from_args(SLConfig, args)
    check_file_output(args.out, inputs=(args.prompts, args.constitution), overwrite=args.overwrite)
    constitution = load_constitution(args.constitution)
    prompts = select_prompts(args.prompts, args.split, args.limit)
    eng = open_engine(args, max_slots=cfg.max_slots)
    runner = SLRunner(eng, constitution, cfg)
    meta = {**runner.meta(), **prompt_source(args.prompts, prompts)}
    with open_output(args.out, meta, [p.id for p in prompts], overwrite=args.overwrite) as out:
        left = sum(p.id not in out.done for p in prompts)
        if out.count:
            distributed.say(f"resuming {args.out}: {out.count} records done, {left} to go")
        mine = sum(p.id not in out.done for c in runner.chunks(prompts) for p in c)
        with tqdm(total=mine, desc="sl-cai", unit="example", disable=not distributed.is_main()) as bar:
            runner.run(prompts, out, bar)
    skipped = distributed.all_reduce_sum(torch.tensor([len(runner.skipped)])).item()
    skipped = f"; skipped {skipped} that did not fit the context" if skipped else ""
    distributed.say(f"wrote {out.count} records to {args.out}{skipped}")
    return 0
