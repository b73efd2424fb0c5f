"""Config dataclasses <-> command-line flags.

Every stage's settings are one dataclass whose fields carry their defaults and a docstring;
its CLI flags are generated from the fields (``rounds`` -> ``--rounds``), so the flags and
the YAML keys of ``cai run`` can never drift apart from the code.
"""
from __future__ import annotations

import argparse
import ast
import inspect
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path

from engine.errors import InputError


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


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping (``yaml.safe_load``); errors name the file."""
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise InputError(f"{path}: no such file") from exc
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: could not read YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise InputError(f"{path}: expected a mapping of settings at the top level")
    return doc


def build_dataclass(cls, doc: dict, source: str, prefix: str = ""):
    """``cls`` from a (nested) mapping; an unknown key is an error naming the key and file.

    A field whose default is itself a dataclass takes a nested mapping (``sl: {rounds: 2}``).
    """
    if not isinstance(doc, dict):
        raise InputError(f"{source}: '{prefix.rstrip('.') or cls.__name__}' must be a mapping")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise InputError(f"{source}: unknown key '{prefix}{unknown[0]}' "
                         f"(known keys here: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in doc.items():
        f = known[name]
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if is_dataclass(default):
            kwargs[name] = build_dataclass(type(default), value or {}, source, f"{prefix}{name}.")
        else:
            kwargs[name] = tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{source}: {prefix.rstrip('.') or cls.__name__}: {exc}") from exc


def merge(base: dict, override: dict) -> dict:
    """Deep-merge ``override`` into a copy of ``base``."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_set(items: list[str]) -> dict:
    """``["sl.rounds=2", "rl=dpo"]`` -> ``{"sl": {"rounds": 2}, "rl": "dpo"}`` (values as YAML)."""
    import yaml

    doc: dict = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise InputError(f"--set {item!r}: expected KEY=VALUE, e.g. sl.rounds=2")
        node = doc
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return doc
