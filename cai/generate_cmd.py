"""``cai generate``: completions for a file of prompts, as JSON lines.

Input: JSON lines with ``prompt`` (a string) or ``messages`` (chat messages), or plain text
on stdin (one prompt per line). A ``prompt`` goes through the chat template when the
tokenizer has one, unless ``--raw``. Output: one JSON line per prompt, in input order,
with its ``index`` (0-based position in the input), every sample's text, token ids,
log-probs and finish reason.

Prompts are generated in chunks of a fixed size, each written (and fsynced) as it
finishes. An ``--out`` file is resumed like ``cai sl``'s: the same command started again
after an interruption skips the finished chunks; other settings, or a file this command
did not write, are refused unless ``--overwrite``. Under torchrun the chunks are dealt to
the ranks (``--out`` a file), each rank writes a shard and rank 0 merges them in input order.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cai.config import Source, add_model_flags, build_config, open_engine, positive_int
from engine.errors import InputError

# SamplingParams field -> its flag here
_SAMPLING_FLAGS = {"max_new_tokens": "--max-new-tokens", "temperature": "--temperature", "top_k": "--top-k",
                   "top_p": "--top-p", "n": "-n", "seed": "--seed", "stop": "--stop"}


def register(sub) -> None:
    p = sub.add_parser("generate", help="sample completions for prompts (JSON lines in, JSON lines out)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p, "the model")
    p.add_argument("--prompts", default="-", help="JSON lines file with 'prompt' or 'messages'; '-' reads stdin")
    p.add_argument("--out", default="-", help="output JSON lines file; '-' writes stdout")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 turns top-k off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("-n", type=int, default=1, help="samples per prompt (one shared prefill)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--max-slots", type=positive_int, default=32, help="concurrent sequences (KV cache slots)")
    p.add_argument("--raw", action="store_true", help="feed 'prompt' strings as raw text, without the chat template")
    p.add_argument("--overwrite", action="store_true", help="replace --out instead of resuming it")
    p.set_defaults(func=run)


def read_prompt_records(path: str, raw: bool) -> list:
    """JSON lines (or plain lines from stdin) -> prompts for Engine.generate."""
    from cai.records import decode_text, read_text

    name = "<stdin>" if path == "-" else path
    text = decode_text(sys.stdin.buffer.read(), name) if path == "-" else read_text(path)
    prompts = []
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.strip()
        if not line:
            continue
        if not line.startswith("{"):
            if path != "-":
                raise InputError(f"{name}:{lineno}: expected a JSON object")
            prompts.append(line if raw else [{"role": "user", "content": line}])
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{name}:{lineno}: not valid JSON: {exc.msg}") from exc
        if isinstance(rec.get("messages"), list):
            prompts.append(rec["messages"])
        elif isinstance(rec.get("prompt"), str):
            prompts.append(rec["prompt"] if raw else [{"role": "user", "content": rec["prompt"]}])
        else:
            raise InputError(f"{name}:{lineno}: needs a 'prompt' string or a 'messages' list")
    if not prompts:
        raise InputError(f"{name}: no prompts")
    return prompts


def sampling_params(args):
    """SamplingParams from the flags, checked by the one config builder."""
    from engine import SamplingParams

    given = {name: getattr(args, name) for name in _SAMPLING_FLAGS}
    source = Source("flag", flags=tuple(((name,), flag) for name, flag in _SAMPLING_FLAGS.items()))
    return build_config(SamplingParams, [(given, source)]).validate()


CHUNK = 64
"""Prompts per generate call: the unit written at once (and the unit of the sampling seeds,
so a resumed run samples exactly what an uninterrupted one does)."""


def run(args) -> int:
    from dataclasses import asdict

    from cai.outputs import check_file_output, sha256_of
    from cai.shards import open_output
    from engine import distributed

    params = sampling_params(args)
    if args.out == "-" and distributed.env_world() > 1:
        raise InputError("--out -: ranks cannot share standard output; under torchrun give --out FILE "
                         "(each rank writes its shard, rank 0 merges them in input order)")
    if args.out != "-":
        check_file_output(args.out, inputs=() if args.prompts == "-" else (args.prompts,), overwrite=args.overwrite)
    prompts = read_prompt_records(args.prompts, args.raw)
    eng = open_engine(args, max_slots=args.max_slots)
    if not eng.tokenizer.chat_template:
        prompts = [p[-1]["content"] if isinstance(p, list) and len(p) == 1 else p for p in prompts]
    if args.out == "-":
        for start in range(0, len(prompts), CHUNK):
            for rec in _chunk(eng, prompts, start, params, args.max_slots):
                sys.stdout.write(json.dumps(rec, ensure_ascii=False) + "\n")
            sys.stdout.flush()
        return 0
    meta = {"stage": "generate", "model": eng.source, "prompts": _source(args.prompts), "raw": args.raw,
            "prompts_sha256": sha256_of(prompts), "chunk": CHUNK, **asdict(params)}
    with open_output(args.out, meta, range(len(prompts)), key="index", overwrite=args.overwrite) as out:
        if out.count and distributed.is_main():
            print(f"resuming {args.out}: {out.count} of {len(prompts)} prompts done", file=sys.stderr)
        from tqdm import tqdm

        mine = distributed.shard(range(0, len(prompts), CHUNK))  # whole chunks, seeded by their position
        with tqdm(total=len(prompts), initial=out.count, desc="generate", unit="prompt",
                  disable=not distributed.is_main()) as bar:
            for start in mine:
                idx = range(start, min(start + CHUNK, len(prompts)))
                if all(i in out.done for i in idx):
                    continue
                out.append(_chunk(eng, prompts, start, params, args.max_slots))
                bar.update(len(idx))
    return 0


def _chunk(eng, prompts: list, start: int, params, max_slots: int) -> list[dict]:
    """The records of prompts[start : start + CHUNK], seeded by the chunk's position."""
    from dataclasses import replace

    part = prompts[start:start + CHUNK]
    outs = eng.generate(part, replace(params, seed=params.seed + start), max_slots=max_slots)
    return [{"index": start + k, "prompt": prompt, "samples": [s.__dict__ for s in o.samples], "text": o.text}
            for k, (prompt, o) in enumerate(zip(part, outs))]


def _source(path: str) -> str:
    return path if path == "-" else str(Path(path).resolve())
