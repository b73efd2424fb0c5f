"""Config dataclasses <-> command-line flags.

Every stage's settings are one dataclass whose fields carry their defaults and a docstring;
its CLI flags are generated from the fields (``rounds`` -> ``--rounds``), so the flags and
the YAML keys of ``cai run`` can never drift apart from the code.
"""
from __future__ import annotations

import argparse
import ast
import inspect
from dataclasses import MISSING, fields


def field_docs(cls) -> dict[str, str]:
    """The docstring written under each field of a dataclass (read from its source)."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body, docs = tree.body[0].body, {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def add_dataclass_flags(p: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per field; its type is the default's type, its help the field's docstring."""
    docs = field_docs(cls)
    for f in fields(cls):
        if f.name in skip or f.default is MISSING:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{docs.get(f.name, '')} (default: {f.default})"
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        elif isinstance(f.default, (int, float, str)):
            p.add_argument(flag, type=type(f.default), default=f.default, help=help_)


def dataclass_from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})
