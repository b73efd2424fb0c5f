"""LoRA adapters on the one set of frozen base weights (Hu et al. 2021, arXiv 2106.09685).

Every role of the method is the same base plus at most one active adapter: "sft", "policy"
(copied from "sft"), "reward". An adapter lives beside the model (``adapters(model)``) and is
switched on by pointing each targeted ``Linear.lora`` at it (``use_adapter``): no weight is
copied or modified, so the base stays bit-identical whatever is trained or switched.

The decoder fuses q, k, v into ``attn.qkv`` and gate, up into ``mlp.gate_up``. An adapter on
"q" therefore updates only the q rows of qkv's output:

    y[:, rows(q)] += dropout(x) @ A_q^T @ B_q^T * alpha / rank

All the A's of one fused linear are stacked into one ``[n*rank, in]`` matrix so the down
projection is one matmul; each B adds into its own output slice in place (``addmm_`` on a
view), so no full-size output is copied.

Differences from peft, none of which change an exported adapter's numbers: peft draws a
separate dropout mask per projection while here q, k and v (and gate, up) share one mask of
their common input, and peft's names are per projection while ours are per fused linear
(``export_peft`` / ``merged_state_dict`` translate).

Precision: an adapter's weights are float32 masters on the model's device whatever the base's
dtype; a forward casts them to the activations' dtype (a cast of a few small matrices), so
the update runs in the base's precision and the gradients and optimizer state stay float32.

Full fine-tuning needs no adapter: make the base trainable instead. Whatever then needs the
original weights (the KL reference, the feedback model) must use a frozen copy made before
training (``engine.train.frozen_copy``): the one extra copy of the model the engine keeps,
and only in that mode.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.errors import InputError
from engine.model import Decoder

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# target -> (fused linear inside a block, transformers' module name inside a layer)
_HOME = {
    "q": ("qkv", "self_attn.q_proj"), "k": ("qkv", "self_attn.k_proj"), "v": ("qkv", "self_attn.v_proj"),
    "o": ("o", "self_attn.o_proj"), "gate": ("gate_up", "mlp.gate_proj"), "up": ("gate_up", "mlp.up_proj"),
    "down": ("down", "mlp.down_proj"),
}
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter.safetensors"


@dataclass
class LoraConfig:
    """Shape and regularisation of one adapter."""

    rank: int = 16
    """Rank r of each update B @ A. 16 is the common default for 100M-1B models: enough to
    learn a style and refusal behaviour, ~1% of the parameters of SmolLM2-135M.
    """
    alpha: float = 32.0
    """The update is scaled by alpha / rank, so changing the rank keeps the initial step size
    comparable; alpha = 2 * rank is the usual choice.
    """
    dropout: float = 0.05
    """Dropout on the adapter's input during training only (the base path never drops)."""
    targets: tuple[str, ...] = field(default_factory=lambda: TARGETS)
    """Which projections get an update; all seven by default, as QLoRA found attention-only
    adapters noticeably weaker.
    """

    def __post_init__(self):
        self.targets = tuple(self.targets)
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise InputError(f"LoRA targets {list(self.targets)}: choose a non-empty subset of {list(TARGETS)}")
        if self.rank < 1 or not 0.0 <= self.dropout < 1.0:
            raise InputError(f"LoRA rank must be >= 1 and dropout in [0, 1) (got {self.rank}, {self.dropout})")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _slices(model: Decoder) -> dict[str, tuple[int, int, int]]:
    """target -> (in_features, first output row, end output row) in its fused linear."""
    c = model.cfg
    hq, hkv, h, i = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.hidden_size, c.intermediate_size
    return {
        "q": (h, 0, hq), "k": (h, hq, hq + hkv), "v": (h, hq + hkv, hq + 2 * hkv), "o": (hq, 0, h),
        "gate": (h, 0, i), "up": (h, i, 2 * i), "down": (i, 0, h),
    }


class FusedLora(nn.Module):
    """The adapter's part on one fused linear: stacked A [n*r, in], one B [rows, r] per target."""

    def __init__(self, targets: list[str], slices: dict, cfg: LoraConfig, device=None):
        super().__init__()
        self.targets, self.rank, self.scale, self.p = targets, cfg.rank, cfg.scale, cfg.dropout
        self.rows = [slices[t][1:] for t in targets]
        in_features = slices[targets[0]][0]
        f32 = dict(dtype=torch.float32, device=device)
        self.A = nn.Parameter(torch.empty(len(targets) * cfg.rank, in_features, **f32))
        self.B = nn.ParameterDict({t: nn.Parameter(torch.zeros(e - s, cfg.rank, **f32))
                                   for t, (s, e) in zip(targets, self.rows)})
        for a in self.A.data.split(cfg.rank):  # peft's init: kaiming-uniform per A, B = 0
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x [T, in], y [T, out] (the base output) -> y with every slice's update added."""
        if self.training and self.p > 0:
            x = F.dropout(x, self.p, training=True)
        h = x @ self.A.to(x.dtype).t()  # [T, n*r]
        for k, (t, (s, e)) in enumerate(zip(self.targets, self.rows)):
            y[:, s:e].addmm_(h[:, k * self.rank:(k + 1) * self.rank], self.B[t].to(y.dtype).t(), alpha=self.scale)
        return y

    def delta(self, target: str) -> torch.Tensor:
        """scale * B @ A for one target: [rows, in], the update merged into the weight slice."""
        k = self.targets.index(target)
        return (self.B[target] @ self.A[k * self.rank:(k + 1) * self.rank]) * self.scale


class LoraAdapter(nn.Module):
    """One named adapter: ``layers[i][fused linear name]`` -> FusedLora."""

    def __init__(self, model: Decoder, cfg: LoraConfig, device=None):
        super().__init__()
        self.cfg = cfg
        sl = _slices(model)
        homes = {}
        for t in TARGETS:  # keep the fused order (q, k, v / gate, up) inside each linear
            if t in cfg.targets:
                homes.setdefault(_HOME[t][0], []).append(t)
        self.layers = nn.ModuleList(
            nn.ModuleDict({lin: FusedLora(ts, sl, cfg, device) for lin, ts in homes.items()}) for _ in model.layers
        )

    def pieces(self):
        """(layer index, fused linear name, FusedLora) for every piece."""
        for i, d in enumerate(self.layers):
            for lin, piece in d.items():
                yield i, lin, piece


def _linear(block, name: str):
    return block.attn.qkv if name == "qkv" else block.attn.o if name == "o" else getattr(block.mlp, name)


def adapters(model: Decoder) -> dict[str, LoraAdapter]:
    """The model's named adapters (a plain dict kept on the model, not a submodule, so the
    base's ``parameters()`` and ``state_dict()`` never include adapter weights)."""
    if "_lora_adapters" not in model.__dict__:
        model.__dict__["_lora_adapters"] = {}
        model.__dict__["_lora_active"] = None
    return model.__dict__["_lora_adapters"]


def active_adapter(model: Decoder) -> str | None:
    adapters(model)
    return model.__dict__["_lora_active"]


def add_adapter(model: Decoder, name: str, cfg: LoraConfig | None = None, *, seed: int | None = None) -> LoraAdapter:
    """Create a fresh adapter (identity: B = 0) on the model's device, float32 masters.
    ``seed`` makes A's init reproducible (the same numbers on every device: drawn on the
    host, then moved)."""
    if name in adapters(model):
        raise InputError(f"adapter {name!r} already exists")
    with _seeded(seed):
        ad = LoraAdapter(model, cfg or LoraConfig(), device="cpu").to(model.device).eval()
    adapters(model)[name] = ad
    return ad


def copy_adapter(model: Decoder, src: str, dst: str) -> LoraAdapter:
    """A new adapter ``dst`` with ``src``'s config and a copy of its weights (policy from sft)."""
    source = get_adapter(model, src)
    ad = add_adapter(model, dst, LoraConfig(**asdict(source.cfg)))
    ad.load_state_dict(source.state_dict())
    return ad


def get_adapter(model: Decoder, name: str) -> LoraAdapter:
    try:
        return adapters(model)[name]
    except KeyError:
        raise InputError(f"no adapter {name!r} (have: {sorted(adapters(model))})") from None


def remove_adapter(model: Decoder, name: str) -> None:
    if active_adapter(model) == name:
        set_adapter(model, None)
    adapters(model).pop(name, None)


def set_adapter(model: Decoder, name: str | None) -> None:
    """Make ``name`` the active adapter (None: the bare base). Sets attributes only."""
    ad = None if name is None else get_adapter(model, name)
    for block in model.layers:
        for lin in ("qkv", "o", "gate_up", "down"):
            _linear(block, lin).lora = None
    if ad is not None:
        for i, lin, piece in ad.pieces():
            _linear(model.layers[i], lin).lora = piece.forward  # a bound method: not a submodule
    model.__dict__["_lora_active"] = name


@contextlib.contextmanager
def use_adapter(model: Decoder, name: str | None):
    """``with use_adapter(model, "policy"): ...`` runs the block with that adapter active
    (None: adapters off) and restores the previously active one afterwards."""
    previous = active_adapter(model)
    set_adapter(model, name)
    try:
        yield get_adapter(model, name) if name is not None else None
    finally:
        set_adapter(model, previous)


@contextlib.contextmanager
def _seeded(seed: int | None):
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ---- engine format: adapter.safetensors + adapter_config.json ---------------------------

def save_adapter(model: Decoder, name: str, folder: str | Path) -> Path:
    """Write one adapter in the engine's format (weights in safetensors, config in JSON)."""
    from safetensors.torch import save_file

    ad, folder = get_adapter(model, name), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in ad.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "cai-engine-lora"})
    meta = {"format": "cai-engine-lora", "name": name, "num_layers": len(model.layers), **asdict(ad.cfg)}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return folder


def load_adapter(model: Decoder, name: str, folder: str | Path) -> LoraAdapter:
    """Read an adapter written by ``save_adapter`` into a new adapter ``name``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text())
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder}: not a readable engine adapter folder: {exc}") from exc
    cfg = _config_from(meta, folder / CONFIG_FILE)
    if meta["num_layers"] != len(model.layers):
        raise InputError(f"{folder}: adapter for {meta['num_layers']} layers, model has {len(model.layers)}")
    ad = add_adapter(model, name, cfg)
    try:
        ad.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        remove_adapter(model, name)
        raise InputError(f"{folder}: adapter weights do not fit this model: {exc}") from exc
    return ad


def _config_from(meta, where: Path) -> LoraConfig:
    """The LoraConfig of an adapter_config.json, naming the file and the key that is wrong."""
    if not isinstance(meta, dict):
        raise InputError(f"{where}: expected a JSON object")
    missing = [k for k in ("num_layers", "rank", "alpha", "dropout", "targets") if k not in meta]
    if missing:
        raise InputError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")
    try:
        return LoraConfig(rank=meta["rank"], alpha=meta["alpha"], dropout=meta["dropout"], targets=meta["targets"])
    except (InputError, TypeError, ValueError) as exc:
        raise InputError(f"{where}: {exc}") from exc


# ---- exports: peft folder, merged weights ------------------------------------------------

def peft_state_dict(model: Decoder, name: str) -> dict[str, torch.Tensor]:
    """The adapter under peft's key names for a LlamaForCausalLM (per projection A and B)."""
    out = {}
    for i, lin, piece in get_adapter(model, name).pieces():
        for k, t in enumerate(piece.targets):
            key = f"base_model.model.model.layers.{i}.{_HOME[t][1]}"
            out[f"{key}.lora_A.weight"] = piece.A[k * piece.rank:(k + 1) * piece.rank].detach().cpu().clone()
            out[f"{key}.lora_B.weight"] = piece.B[t].detach().cpu().clone()
    return out


def export_peft(model: Decoder, name: str, folder: str | Path, base_model_name_or_path: str = "") -> Path:
    """A folder ``peft.PeftModel.from_pretrained(hf_model, folder)`` loads."""
    from safetensors.torch import save_file

    ad, folder = get_adapter(model, name), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(peft_state_dict(model, name), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": ad.cfg.rank, "lora_alpha": ad.cfg.alpha, "lora_dropout": ad.cfg.dropout,
        "target_modules": sorted(_HOME[t][1].split(".")[1] for t in ad.cfg.targets),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


@torch.no_grad()
def merged_state_dict(model: Decoder, name: str | None) -> dict[str, torch.Tensor]:
    """transformers-named weights with the adapter folded in: new tensors for every merged
    projection, the live base weights untouched."""
    from engine.loader import to_hf_state_dict

    sd = to_hf_state_dict(model)  # views of the live weights: never written in place
    if name is None:
        return sd
    for i, _, piece in get_adapter(model, name).pieces():
        for t in piece.targets:
            key = f"model.layers.{i}.{_HOME[t][1]}.weight"
            sd[key] = sd[key] + piece.delta(t).to(sd[key].dtype)
    return sd


def export_merged(model: Decoder, name: str | None, folder: str | Path, tokenizer, source: str | Path) -> Path:
    """A transformers checkpoint folder (config.json, model.safetensors, tokenizer files) of
    base + adapter. ``source`` is the folder (or GGUF file) the base was loaded from."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = merged_state_dict(model, name)
    if model.lm_head is None:
        sd.pop("lm_head.weight", None)
    _write_hf_config(Path(source), folder)
    save_file({k: v.cpu().contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(folder))
    return folder


def _write_hf_config(source: Path, folder: Path) -> None:
    if source.is_dir() and (source / "config.json").is_file():
        shutil.copyfile(source / "config.json", folder / "config.json")
        return
    if source.suffix == ".gguf":
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(source.parent), gguf_file=source.name).to_dict()
        config.pop("quantization_config", None)  # the merged weights are plain float
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        return
    raise InputError(f"{source}: cannot find the base model's config.json to export a merged checkpoint")
