"""The ``cai`` command: one sub-command per stage of the method.

Each stage module owns its flags through a ``register(subparsers)`` function that adds its
sub-parser and sets ``func``; this file only assembles them, so ``cai --help`` lists every
stage and ``cai STAGE --help`` documents its flags.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

from cai.config import positive_int
from engine import distributed
from engine.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    from cai import (constitution_cmd, dpo_cmd, eval_cmd, generate_cmd, label_cmd, pm_cmd, ppo_cmd, run_cmd,
                     sft_cmd, sl_cmd)

    parser = argparse.ArgumentParser(
        prog="cai",
        description="Constitutional AI end to end on one shared in-process model.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    generate_cmd.register(sub)
    constitution_cmd.register(sub)
    sl_cmd.register(sub)
    sft_cmd.register(sub)
    label_cmd.register(sub)
    pm_cmd.register(sub)
    ppo_cmd.register(sub)
    dpo_cmd.register(sub)
    eval_cmd.register(sub)
    run_cmd.register(sub)
    for p in sub.choices.values():
        p.add_argument("--profile", metavar="PATH", default=None,
                       help="write a Chrome trace (torch.profiler, with the NVTX phase names) of the first steps")
        p.add_argument("--profile-steps", type=positive_int, default=8, metavar="N",
                       help="steps (decode, train or scoring steps) the --profile trace covers (default: 8)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        if not distributed.is_main():  # ranks other than 0 print nothing but warnings and errors (stderr)
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        return _run(args)


def _run(args) -> int:
    try:
        if args.profile:
            from engine.profiling import Tracer

            with Tracer(args.profile, args.profile_steps):
                return int(args.func(args) or 0)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{distributed.tag()}interrupted: everything written so far is kept; run the same command to resume",
              file=sys.stderr)
        return 130
    except InputError as exc:
        print(f"{distributed.tag()}cai {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
