"""Config dataclasses <-> command-line flags, YAML files and ``--set`` overrides.

Every stage's settings are one dataclass whose fields carry their defaults and a docstring;
its CLI flags are generated from the fields (``rounds`` -> ``--rounds``, ``lora.rank`` ->
``--lora-rank``), so the flags and the YAML keys of ``cai run`` cannot drift apart from the
code. ``build_config`` is the one place a config is made from what a user wrote: it takes
layers (a preset, a YAML file, ``--set``, flags), each with its source, and checks every field
against its type and its rule in ``cai.config_rules``, so an error names the field and where
it was set (``--lr``, ``my.yaml: sft.optim.lr``, ``--set sl.rounds``).
"""
from __future__ import annotations

import argparse
import ast
import inspect
import re
from dataclasses import MISSING, dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from engine.errors import InputError

DEVICES_HELP = "auto, cpu, cuda or cuda:N"
DTYPES = ("auto", "float32", "bfloat16", "float16")
ROLLOUT_WEIGHTS = ("fp32", "fp16", "int8")  # engine.quant.MODES, without importing torch


# ---------------------------------------------------------------- sources of settings

@dataclass(frozen=True)
class Source:
    """Where a layer of settings came from: ``kind`` is "file", "set", "flag" or "default"."""

    kind: str
    label: str = ""
    flags: tuple = ()
    """For "flag": (path, flag) pairs, so a field set by ``--lora-rank`` is named so."""

    def origin(self) -> str:
        return {"file": self.label, "set": "--set", "flag": "flags"}.get(self.kind, "defaults")

    def where(self, path: tuple[str, ...]) -> str:
        dotted = ".".join(path)
        if self.kind == "file":
            return f"{self.label}: {dotted}"
        if self.kind == "set":
            return f"--set {dotted}"
        if self.kind == "flag":
            return dict(self.flags).get(path, "--" + dotted.replace("_", "-"))
        return f"{dotted} (default)"


DEFAULT = Source("default")


# ---------------------------------------------------------------- the one builder

def build_config(cls, layers: Sequence[tuple[dict, Source]] = ()):
    """``cls`` from layers of nested mappings, later layers winning; every field checked.

    A field whose default is a dataclass is a section and takes a nested mapping
    (``sl: {rounds: 2}``); a section's defaults are the enclosing config's own (PMConfig's
    optimizer keeps its lr when only ``warmup_steps`` is set).
    """
    given: dict[tuple[str, ...], tuple[Any, Source]] = {}
    for doc, source in layers:
        _flatten(cls, doc, source, (), given)
    return _build(cls, cls(), (), given)


def _sections(cls) -> dict[str, type]:
    """Fields of ``cls`` whose default is a dataclass: name -> its class."""
    out = {}
    for f in fields(cls):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if is_dataclass(default):
            out[f.name] = type(default)
    return out


def _flatten(cls, doc, source: Source, prefix: tuple, out: dict) -> None:
    if not isinstance(doc, dict):
        raise InputError(f"{source.where(prefix) if prefix else source.origin()}: expected a mapping of settings")
    known, sections = {f.name for f in fields(cls)}, _sections(cls)
    for key, value in doc.items():
        path = prefix + (str(key),)
        if key not in known:
            dotted = ".".join(path)
            raise InputError(f"{source.origin()}: unknown key '{dotted}' "
                             f"(known keys here: {', '.join(sorted(known))})")
        if key in sections:
            _flatten(sections[key], value if value is not None else {}, source, path, out)
        else:
            out[path] = (value, source)


def _build(cls, defaults, prefix: tuple, given: dict):
    from cai.config_rules import rule_for

    hints, sections, kwargs = _hints(cls), _sections(cls), {}
    for f in fields(cls):
        path = prefix + (f.name,)
        if f.name in sections:
            sub = getattr(defaults, f.name)
            if any(k[: len(path)] == path for k in given):
                kwargs[f.name] = _build(type(sub), sub, path, given)
            continue
        if path not in given:
            continue
        value, source = given[path]
        where = source.where(path)
        if isinstance(value, dict):
            raise InputError(f"{where}: '{'.'.join(path)}' is one setting, not a section")
        value = coerce(value, hints.get(f.name, Any), where)
        rule = rule_for(cls, f.name)
        problem = rule(value) if rule and value is not None else None
        if problem:
            raise InputError(f"{where}: {problem}, got {value!r}")
        kwargs[f.name] = value
    try:
        return replace(defaults, **kwargs)
    except (TypeError, ValueError) as exc:  # a check of the dataclass's own __post_init__
        raise InputError(f"{'.'.join(prefix) or cls.__name__}: {exc}") from exc


def _hints(cls) -> dict:
    import typing

    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that cannot be evaluated: fall back to the defaults' types
        return {}


# ---------------------------------------------------------------- types

_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def coerce(value, tp, where: str):
    """``value`` as type ``tp`` (int, float, str, bool, X | None, tuple[...], list[X]);
    floats must be finite. Raises InputError naming ``where``."""
    import math
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0] if len(inner) == 1 else Any, where)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{where}: expected a list, got {value!r}")
        items = args[:1] * len(value) if (origin is list or args[-1:] == (Ellipsis,)) else args
        if len(items) != len(value):
            raise InputError(f"{where}: expected {len(items)} values, got {list(value)!r}")
        out = [coerce(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, items))]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if not isinstance(value, bool):
            raise InputError(f"{where}: expected true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where}: expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as text
            try:
                value = float(value)
            except ValueError:
                raise InputError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{where}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise InputError(f"{where}: must be a finite number, got {value}")
    elif tp is str and not isinstance(value, str):
        raise InputError(f"{where}: expected a string, got {value!r}")
    return value


# ---------------------------------------------------------------- flags

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


def add_config_flags(p: argparse.ArgumentParser, cls, prefixes: dict[str, str] | None = None,
                     skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per field of ``cls`` and of its sections (``--lora-rank``; a section
    whose prefix is "" gets bare flags, ``--lr``). A flag not given leaves the field to the
    layers below it (a ``--config`` file, then the default); ``config_from_args`` reads them."""
    from cai.config_rules import OneOf, rule_for

    mapping: list[tuple[str, tuple, str]] = []
    prefixes = prefixes or {}

    def add(klass, defaults, path: tuple, flag_prefix: str) -> None:
        docs, hints, sections = field_docs(klass), _hints(klass), _sections(klass)
        for f in fields(klass):
            if f.name in skip and not path:
                continue
            value = getattr(defaults, f.name)
            if f.name in sections:
                pre = prefixes.get(f.name, f.name + "-")
                add(sections[f.name], value, path + (f.name,), flag_prefix + pre)
                continue
            flag = "--" + flag_prefix + f.name.replace("_", "-")
            dest = flag[2:].replace("-", "_")
            rule = rule_for(klass, f.name)
            help_ = f"{docs.get(f.name, '')} (default: {value})".replace("%", "%%")  # argparse %-formats help
            kw: dict = dict(dest=dest, default=argparse.SUPPRESS, help=help_)
            if isinstance(value, bool):
                p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            elif isinstance(value, tuple):
                p.add_argument(flag, metavar="A,B,...", **kw)  # split and typed by coerce()
            elif isinstance(value, (int, float, str)) or value is None:
                base = hints.get(f.name)
                typ = type(value) if value is not None else (int if "int" in str(base) else str)
                if isinstance(rule, OneOf):
                    kw["choices"] = rule.values
                p.add_argument(flag, type=typ, **kw)
            else:
                continue
            mapping.append((dest, path + (f.name,), flag))

    add(cls, cls(), (), "")
    p.set_defaults(config_flags=tuple(mapping))


def config_from_args(cls, args: argparse.Namespace, config_file: str | None = None):
    """``cls`` from an optional YAML file, then the flags given (``add_config_flags``)."""
    layers = [(read_yaml(config_file), Source("file", config_file))] if config_file else []
    mapping = getattr(args, "config_flags", ())
    doc: dict = {}
    for dest, path, _flag in mapping:
        if hasattr(args, dest):
            node = doc
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = getattr(args, dest)
    layers.append((doc, Source("flag", flags=tuple((path, flag) for _, path, flag in mapping))))
    return build_config(cls, layers)


def positive_int(text: str) -> int:
    """argparse type of a flag that is no config field: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# ---------------------------------------------------------------- the model flags

def check_device(value: str) -> str | None:
    """None when ``value`` names a device the engine takes, else what is wrong."""
    if isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        return None
    return f"must be {DEVICES_HELP}"


def _device(text: str) -> str:
    problem = check_device(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{problem}, got {text!r}")
    return text


def add_model_flags(p: argparse.ArgumentParser, help_: str = "the shared base model") -> None:
    """--model, --device and --dtype, as every command that loads a model takes them."""
    p.add_argument("--model", default="default",
                   help=f"{help_}: a checkpoint folder, a .gguf file or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--device", type=_device, default="auto",
                   help=f"where the model runs: {DEVICES_HELP} (default: auto, a GPU when there is one)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weight dtype (default: auto, bfloat16 on a GPU and float32 on the CPU)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, replay each decode step as a captured CUDA graph; --no-cuda-graphs "
                        "decodes eagerly (no effect on the CPU) (default: on)")
    p.add_argument("--rollout-weights", choices=ROLLOUT_WEIGHTS, default="fp32",
                   help="what generation reads on the CPU: fp32 (the weights), fp16 (fp16 copies of the "
                        "base's linears and head, half the bytes a decode step reads) or int8 (the head as "
                        "int8 too); scoring and training always read fp32 (default: fp32)")


def load_engine(model: str, device: str = "auto", dtype: str = "auto", cuda_graphs: bool = True, **kw):
    """``Engine.load`` with the device, dtype and CUDA-graph settings of a command or a run."""
    from engine import Engine, distributed

    eng = Engine.load(model, device=distributed.rank_device(device), dtype=dtype, cuda_graphs=cuda_graphs, **kw)
    distributed.init(eng.model.device)  # under torchrun: join the group (once), gloo or NCCL by device
    return eng


def open_engine(args: argparse.Namespace, model: str | None = None, **kw):
    """The engine of ``args.model`` (or ``model``, e.g. a feedback model) on ``args``' device."""
    kw.setdefault("rollout_weights", getattr(args, "rollout_weights", "fp32"))
    return load_engine(model or args.model, args.device, args.dtype, args.cuda_graphs, **kw)


# ---------------------------------------------------------------- YAML and --set

def read_yaml(path: str | Path) -> dict:
    """A YAML mapping (``yaml.safe_load``); errors name the file."""
    import yaml

    from cai.records import read_text

    text = read_text(path)
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: could not read YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise InputError(f"{path}: expected a mapping of settings at the top level")
    return doc


def parse_set(items: list[str]) -> dict:
    """``["sl.rounds=2", "rl=dpo"]`` -> ``{"sl": {"rounds": 2}, "rl": "dpo"}`` (values as YAML)."""
    import yaml

    doc: dict = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key or "" in key.split("."):
            raise InputError(f"--set {item!r}: expected KEY=VALUE, e.g. sl.rounds=2")
        node = doc
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise InputError(f"--set {item!r}: '{p}' was set to a value by an earlier --set")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise InputError(f"--set {item!r}: not a YAML value ({exc})") from None
    return doc
