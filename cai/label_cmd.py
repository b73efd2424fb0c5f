"""``cai label`` (AI preference labels) and ``cai eval-labeler`` (multiple-choice accuracy of
the feedback model)."""
from __future__ import annotations

import argparse
import json
import time

from cai.config import add_config_flags, add_model_flags, config_from_args, open_engine, positive_int
from cai.prompts import add_prompt_flags
from cai.label import LabelConfig
from engine.errors import InputError


def register(sub) -> None:
    p = sub.add_parser("label", help="AI feedback: sample response pairs and label them under the constitution",
                       description=label_doc(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_prompt_flags(p)
    p.add_argument("--constitution", default="default", help="'default', a YAML / JSON file, or the paper's folder")
    add_model_flags(p)
    p.add_argument("--policy-adapter", default=None,
                   help="SFT adapter folder (from `cai sft`) to sample the pairs with; default: the base")
    p.add_argument("--feedback-model", default=None,
                   help="another local model to label with (loaded once, same process); default: the base")
    p.add_argument("--out", required=True, help="output JSON lines (resumed if it exists)")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    add_config_flags(p, LabelConfig)
    p.set_defaults(func=run_label)

    e = sub.add_parser("eval-labeler", help="multiple-choice accuracy of the feedback model on a file",
                       description="Scores records {prompt, corrects, incorrects}: the prompt ends where the "
                       "answer begins; a record is right when every correct option has a higher log-prob "
                       "than every incorrect one.")
    e.add_argument("--file", required=True, help="JSON lines of {prompt, corrects: [str], incorrects: [str]}")
    add_model_flags(e, "the feedback model")
    e.add_argument("--json", action="store_true", help="print per-record results, then one JSON summary line")
    e.add_argument("--max-batch-tokens", type=positive_int, default=8192, help="prompt tokens per scoring forward")
    e.set_defaults(func=run_eval_labeler)


def label_doc() -> str:
    import cai.label

    return cai.label.__doc__


def load_policy(eng, folder: str | None) -> str | None:
    """Attach the SFT adapter from ``folder`` as 'sft'; returns the adapter name to sample with."""
    if folder is None:
        return None
    from engine.lora import load_adapter

    load_adapter(eng.model, "sft", folder)
    return "sft"


def run_label(args) -> int:
    from tqdm import tqdm

    from cai.constitution import load_constitution
    from cai.label import Labeller, prompts_aspect
    from cai.prompts import select_prompts
    from cai.shards import open_output
    from engine import distributed

    cfg = config_from_args(LabelConfig, args)
    con = load_constitution(args.constitution)
    prompts = select_prompts(args.prompts, args.split, args.limit)
    eng = open_engine(args, max_slots=cfg.max_slots)
    feedback = open_engine(args, args.feedback_model, max_slots=cfg.max_slots) if args.feedback_model else None
    labeller = Labeller(eng, con, cfg, load_policy(eng, args.policy_adapter), feedback)
    meta = {**labeller.meta(), "policy_adapter": args.policy_adapter}
    with open_output(args.out, meta, [p.id for p in prompts], overwrite=args.overwrite) as out:
        left = sum(p.id not in out.done for p in prompts)
        if out.count:
            distributed.say(f"resuming {args.out}: {out.count} labelled, {left} to go")
        mine = sum(p.id not in out.done for c in labeller.chunks(prompts) for p in c)
        with tqdm(total=mine, desc="label", unit="pair", disable=not distributed.is_main()) as bar:
            dropped = labeller.run(prompts, out, bar, prompts_aspect(args.prompts))["identical_dropped"]
    distributed.say(f"wrote {out.count} labelled pairs to {args.out}; left out {dropped} prompt(s) whose two "
                    "responses were identical")
    return 0


def evaluate_labeler(eng, records: list[dict], max_batch_tokens: int = 8192) -> dict:
    """Accuracy of ``eng`` on multiple-choice records, with per-record scores."""
    from engine.options import option_logprobs

    tok = eng.tokenizer
    prompts, options = [], []
    for r in records:
        prompts.append(tok(r["prompt"], add_special_tokens=False)["input_ids"])
        options.append([tok(o, add_special_tokens=False)["input_ids"] for o in r["corrects"] + r["incorrects"]])
    start = time.perf_counter()
    scores = option_logprobs(eng.model, prompts, options, max_batch_tokens)
    seconds = time.perf_counter() - start
    results, right, comparisons = [], 0, 0
    for r, s in zip(records, scores):
        good, bad = s[: len(r["corrects"])], s[len(r["corrects"]) :]
        ok = min(good) > max(bad)
        right += ok
        comparisons += len(good) * len(bad)
        results.append({"correct": ok, "correct_logprobs": good, "incorrect_logprobs": bad})
    return {"accuracy": right / len(records), "n": len(records), "comparisons": comparisons,
            "comparisons_per_s": comparisons / seconds, "seconds": seconds, "results": results}


def read_mc_records(path: str) -> list[dict]:
    from cai.records import read_jsonl

    records = read_jsonl(path, required=("prompt", "corrects", "incorrects"))
    for i, r in enumerate(records, 1):
        for k in ("corrects", "incorrects"):
            if not isinstance(r[k], list) or not r[k] or not all(isinstance(x, str) and x for x in r[k]):
                raise InputError(f"{path}: record {i}: '{k}' must be a non-empty list of non-empty strings")
        if not isinstance(r["prompt"], str) or not r["prompt"]:
            raise InputError(f"{path}: record {i}: 'prompt' must be a non-empty string")
    return records


def run_eval_labeler(args) -> int:
    records = read_mc_records(args.file)
    eng = open_engine(args)
    report = evaluate_labeler(eng, records, args.max_batch_tokens)
    if args.json:
        for i, r in enumerate(report["results"]):
            print(json.dumps({"index": i, **r}))
    print(f"accuracy {report['accuracy']:.3f} on {report['n']} records; "
          f"{report['comparisons_per_s']:.1f} comparisons/s")
    if args.json:
        print(json.dumps({k: report[k] for k in ("accuracy", "n", "comparisons_per_s")}))
    return 0
