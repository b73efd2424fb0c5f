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
from dataclasses import fields
from pathlib import Path

from cai.outputs import check_dir_output
from cai.training import fresh_start
from engine.errors import InputError

# flag -> (section, field); section None is SFTConfig itself
_FLAGS = {
    "epochs": (None, "epochs"), "max_tokens_per_batch": (None, "max_tokens_per_batch"), "full": (None, "full"),
    "loss_on": (None, "loss_on"), "format": (None, "format"), "seed": (None, "seed"),
    "checkpoint_every": (None, "checkpoint_every"), "max_steps": (None, "max_steps"),
    "export_merged": (None, "export_merged"), "lora_rank": ("lora", "rank"), "lora_alpha": ("lora", "alpha"),
    "lora_dropout": ("lora", "dropout"), "lora_targets": ("lora", "targets"), "lr": ("optim", "lr"),
    "warmup_steps": ("optim", "warmup_steps"), "weight_decay": ("optim", "weight_decay"),
    "grad_accum": ("optim", "grad_accum"), "max_grad_norm": ("optim", "max_grad_norm"),
    "schedule": ("optim", "schedule"),
}


def register(sub) -> None:
    p = sub.add_parser("sft", help="supervised fine-tuning on SL-CAI revisions (LoRA by default)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="JSON lines of SL-CAI records or prompt/response pairs")
    p.add_argument("--out", required=True, help="output folder (checkpoints, metrics, exports)")
    p.add_argument("--model", default="default", help="model folder, .gguf file, or 'default'")
    p.add_argument("--include-helpful", help="another JSON lines file of helpful examples to mix in")
    p.add_argument("--config", help="YAML file setting any SFTConfig field")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="start over even if DIR has a checkpoint")
    p.add_argument("--resume", dest="resume", action="store_true", help="continue from DIR's last checkpoint (default)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate (default 2e-4)")
    p.add_argument("--max-tokens-per-batch", type=int, help="token budget of one packed batch (default 4096)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--max-grad-norm", type=float)
    p.add_argument("--schedule", choices=["cosine", "constant"])
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--lora-alpha", type=float)
    p.add_argument("--lora-dropout", type=float)
    p.add_argument("--lora-targets", type=lambda s: tuple(t.strip() for t in s.split(",") if t.strip()),
                   help="comma-separated subset of q,k,v,o,gate,up,down")
    p.add_argument("--full", action="store_const", const=True, help="full fine-tuning instead of LoRA")
    p.add_argument("--loss-on", choices=["last", "all"], help="which assistant messages are targets (default last)")
    p.add_argument("--format", choices=["auto", "chat", "text"], help="chat template or Human:/Assistant: text")
    p.add_argument("--seed", type=int)
    p.add_argument("--checkpoint-every", type=int, help="optimizer steps between checkpoints (default 50)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--export-merged", action="store_const", const=True, help="also write DIR/merged/")
    p.set_defaults(func=run, resume=True, progress=True)


def build_config(args):
    """SFTConfig from the YAML file (if any), then the flags given."""
    from cai.sft import SFTConfig
    from engine.lora import LoraConfig
    from engine.train import OptimConfig

    doc = _read_yaml(args.config) if args.config else {}
    sections = {"lora": dict(doc.pop("lora", None) or {}), "optim": dict(doc.pop("optim", None) or {}), None: doc}
    for flag, (section, name) in _FLAGS.items():
        if getattr(args, flag, None) is not None:
            sections[section][name] = getattr(args, flag)
    try:
        _check_keys(sections[None], SFTConfig, args.config, exclude=("lora", "optim"))
        _check_keys(sections["lora"], LoraConfig, args.config)
        _check_keys(sections["optim"], OptimConfig, args.config)
        return SFTConfig(lora=LoraConfig(**sections["lora"]), optim=OptimConfig(**sections["optim"]), **sections[None])
    except (TypeError, ValueError) as exc:
        raise InputError(f"sft config: {exc}") from exc


def _check_keys(d: dict, cls, source, exclude=()) -> None:
    known = {f.name for f in fields(cls)} - set(exclude)
    unknown = sorted(set(d) - known)
    if unknown:
        raise InputError(f"{source}: unknown field(s) {unknown} for {cls.__name__}; known: {sorted(known)}")


def _read_yaml(path: str) -> dict:
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: could not read YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise InputError(f"{path}: expected a mapping of SFT settings")
    return doc


def run(args) -> int:
    from cai.sft import read_sft_file, train_sft
    from engine import Engine
    from engine.train import NonFiniteLossError

    cfg = build_config(args)
    out = check_dir_output(args.out, inputs=(args.data, args.include_helpful, args.config))
    examples = read_sft_file(args.data)
    if args.include_helpful:
        examples += read_sft_file(args.include_helpful)
    fresh_start(out, args.resume)
    eng = Engine.load(args.model)
    try:
        summary = train_sft(eng, examples, cfg, out, progress=args.progress, resume=args.resume)
    except NonFiniteLossError as exc:
        print(f"cai sft: error: {exc}", file=sys.stderr)
        return 1
    summary.pop("losses")
    print(json.dumps({"out": str(out), "examples": len(examples), **summary}))
    return 0
