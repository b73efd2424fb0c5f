"""``cai constitution show|validate PATH``: read a constitution in any supported format
and report what was read, or the first problem, naming the file and the entry."""
from __future__ import annotations

import argparse
import json
import textwrap

from cai.constitution import Constitution, load_constitution


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "constitution", help="inspect or check a constitution",
        description="Inspect or check a constitution: a built-in name (default), our YAML, "
        "an open-recipe JSON file, or a folder of the paper repository's files.")
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    show = sub.add_parser("show", help="summarise what the constitution holds")
    show.add_argument("path", metavar="PATH")
    show.add_argument("--json", action="store_true",
                      help="print only the counts, as one JSON object")
    show.set_defaults(func=_show)
    validate = sub.add_parser("validate", help="check it; exit 2 naming the first problem")
    validate.add_argument("path", metavar="PATH")
    validate.set_defaults(func=_validate)


def _show(args: argparse.Namespace) -> int:
    c = load_constitution(args.path)
    if args.json:
        print(json.dumps(c.counts()))
    else:
        print(summary(c))
    return 0


def _validate(args: argparse.Namespace) -> int:
    c = load_constitution(args.path)
    counts = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in c.counts().items())
    print(f"{args.path}: ok ({counts})")
    return 0


def summary(c: Constitution, width: int = 96) -> str:
    """A readable listing: every pair and principle by id, one line each."""
    def line(ident: str, text: str) -> str:
        # shorten() collapses whitespace, so the padded id column is added after it
        return f"  {ident:<24} " + textwrap.shorten(text, width=width - 27, placeholder=" ...")

    out = [f"constitution {c.name or '(unnamed)'} from {c.source}"]
    out.append(f"critique/revision pairs: {len(c.critique_revision)}")
    for p in c.critique_revision:
        tags = f"[{', '.join(p.tags)}] " if p.tags else ""
        out.append(line(p.id, tags + p.critique))
    out.append(f"preference principles: {len(c.principles)}")
    out += [line(p.id, p.text) for p in c.principles]
    out.append(f"few-shot critique/revision exemplars: {len(c.fewshot_critique_revision)}")
    out += [line(s.id, f"({s.kind}) {s.conversation[0]['content']}")
            for s in c.fewshot_critique_revision]
    out.append(f"few-shot preference exemplars: {len(c.fewshot_preference)}")
    out += [line(s.id, f"(answer {s.answer}) {s.conversation[0]['content']}")
            for s in c.fewshot_preference]
    return "\n".join(out)
