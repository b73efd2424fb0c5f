"""What every training stage shares (SFT, preference model, PPO, DPO): AdamW with warmup and
a cosine schedule, gradient accumulation and clipping, a guard against non-finite losses,
and atomic checkpoints that resume a run exactly.

A checkpoint is a folder ``step-00000042/`` holding ``params.safetensors`` (the trainable
tensors), ``optimizer.safetensors`` (AdamW's moments and step counts) and ``state.json``
(param groups, the caller's scalars, the Python and torch RNG states). It is written into a
temporary folder beside it and renamed into place, so a run killed mid-write leaves the
previous checkpoint whole. Nothing is pickled.

Devices: AdamW's moments are created beside each parameter (on the model's device, float32
for the float32 LoRA masters and heads); checkpoints are written from host copies and read
back into the live tensors wherever they are. The CUDA RNG is saved too when CUDA is in use,
so dropout on a GPU resumes exactly.

Data parallelism (under ``torchrun``): each rank runs its share of an optimizer step's
micro-batches, and ``Trainer.apply`` sums the gradients of the trainable tensors over ranks
(one all-reduce of one flat buffer) before clipping. The caller divides each micro-batch
loss by the count (tokens, pairs) of the whole *global* group, so the summed gradient is the
one a single process computes over the same global batch, and the clipping, schedule and
AdamW step that follow are identical on every rank. This explicit all-reduce is used rather
than wrapping the model in ``DistributedDataParallel`` because the trainable tensors are
LoRA adapters and heads attached to a shared frozen base that several roles use in turn
(policy, reference, reward) under context managers: DDP wants one module whose forward is
the training forward and all-reduces every parameter it owns, while here the base must never
be reduced and a rank may have no micro-batch at all in a step (it then contributes zeros).
The buffer is a few MB, so bucketing and overlap, DDP's gains, buy nothing measurable.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from engine import distributed, profiling
from engine.device import cuda_present

CKPT_PREFIX = "step-"
TMP_CKPT_PREFIX = ".tmp-ckpt-"


@dataclass
class OptimConfig:
    """AdamW and its schedule. Defaults suit LoRA fine-tuning of a ~100M-1B model."""

    lr: float = 2e-4
    """Peak learning rate. 2e-4 is the usual LoRA rate (full fine-tuning wants ~1e-5-2e-5)."""
    weight_decay: float = 0.0
    """Decoupled weight decay, applied to matrices only (not to biases or norms). LoRA rarely
    needs it; 0 keeps a fresh adapter free to move.
    """
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's moment decays; 0.999 is stable for the few hundred steps SFT runs."""
    eps: float = 1e-8
    """Adam's denominator floor; 1e-8 is the standard value in float32."""
    warmup_steps: int = 10
    """Linear warmup from 0 to lr over this many optimizer steps, so the first noisy gradients
    of a fresh head or adapter do not take full-size steps.
    """
    total_steps: int = 0
    """Optimizer steps of the whole run: where the cosine reaches min_lr. 0 = set by the caller
    from the data (epochs x batches / grad_accum).
    """
    schedule: str = "cosine"
    """Either "cosine" (decay to min_lr_ratio * lr after warmup) or "constant" (stay at lr)."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine as a fraction of lr; 0.1 keeps the last steps learning."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 = off); 1.0 is the common guard against a rare
    outlier batch.
    """
    grad_accum: int = 1
    """Micro-batches whose gradients are summed before one optimizer step: a larger effective
    batch without the memory of one.
    """

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule {self.schedule!r}: expected 'cosine' or 'constant'")
        if self.grad_accum < 1 or self.lr <= 0:
            raise ValueError("grad_accum must be >= 1 and lr > 0")


class NonFiniteLossError(RuntimeError):
    """A loss or gradient norm was NaN or infinite; optimizer step ``step`` (1-based, as in
    the metrics) was not taken."""

    def __init__(self, step: int, what: str, value: float):
        self.step = step
        super().__init__(f"step {step}: the {what} is {value}; the run stopped before updating the weights, "
                         "the last checkpoint is kept (lower the learning rate or check the data)")


class NonFiniteStateError(NonFiniteLossError):
    """The weights or optimizer state after optimizer step ``step`` hold NaN or infinite
    values (a finite loss can still take a step that overflows, e.g. with a huge learning
    rate); no checkpoint of that step is written, so every checkpoint on disk is finite."""

    def __init__(self, step: int, names: list[str], last_good: Path | None):
        self.step = step
        RuntimeError.__init__(
            self, f"step {step}: {len(names)} trained tensor(s) are not finite after the update "
            f"(e.g. {', '.join(names[:3])}); the checkpoint of step {step} was not written; "
            f"last good checkpoint: {last_good or 'none yet'} (lower the learning rate or check the data)")


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity (one host sync)."""
    names = [k for k, v in tensors.items() if v.is_floating_point() and v.numel()]
    if not names:
        return []
    ok = torch.stack([torch.isfinite(tensors[k]).all() for k in names]).tolist()
    return [k for k, good in zip(names, ok) if not good]


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``params``; weight decay on matrices only."""
    params = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=True)


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or cfg.total_steps <= cfg.warmup_steps:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / (cfg.total_steps - cfg.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


class Trainer:
    """Accumulates ``grad_accum`` micro-batch backwards, then clips, sets the scheduled lr and
    steps AdamW. ``step`` counts optimizer steps taken.

    The caller scales each micro-batch loss so the accumulated sum is the loss it means (e.g.
    divide a token sum by the target tokens of the whole accumulation group): only the caller
    knows whether a mean is over tokens, sequences or pairs.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], cfg: OptimConfig):
        self.params = [p for p in params if p.requires_grad]
        self.cfg, self.step, self.micro = cfg, 0, 0
        self.optimizer = make_optimizer(self.params, cfg)
        self._bad_loss: float | None = None  # a non-finite loss on this rank, raised at apply

    def backward(self, loss: torch.Tensor) -> float:
        """Backward of one micro-batch's (scaled) loss; returns its value. Raises
        NonFiniteLossError before any gradient is applied."""
        value = loss.item()  # one host sync per micro-batch: needed for logging anyway
        if not math.isfinite(value):
            if distributed.active():  # the other ranks wait in apply's all-reduce: raise there, on all
                self._bad_loss = value
                return value
            self.zero_grad()
            raise NonFiniteLossError(self.step + 1, "loss", value)
        with profiling.phase("engine.train.backward"):
            loss.backward()
        self.micro += 1
        return value

    @property
    def ready(self) -> bool:
        """True when ``grad_accum`` micro-batches are accumulated."""
        return self.micro >= self.cfg.grad_accum

    def apply(self) -> dict[str, float]:
        """Sum the gradients over ranks (when distributed), clip, schedule, step; returns
        {"lr", "grad_norm"} of this optimizer step."""
        if distributed.active():
            self._all_reduce_grads()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm or float("inf"), foreach=True)
        norm = float(norm)  # host sync: a non-finite norm must stop the step before it is applied
        if not math.isfinite(norm):
            self.zero_grad()
            raise NonFiniteLossError(self.step + 1, "gradient norm", norm)
        lr = lr_at(self.step, self.cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        with profiling.phase("engine.train.optimizer"):
            self.optimizer.step()
        self.zero_grad()
        self.step += 1
        profiling.step()
        return {"lr": lr, "grad_norm": norm}

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.micro, self._bad_loss = 0, None

    def _all_reduce_grads(self) -> None:
        """One all-reduce of every gradient (zeros where this rank had no micro-batch) and a
        flag counting ranks whose loss was not finite; raises NonFiniteLossError on every
        rank if any was, so none steps and none waits."""
        ref = self.params[0]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flag = torch.tensor([0.0 if self._bad_loss is None else 1.0], device=ref.device)
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [flag])  # [numel + 1]
        distributed.all_reduce_sum(flat)
        bad = int(flat[-1].item())
        if bad:
            value = self._bad_loss if self._bad_loss is not None else float("nan")
            self.zero_grad()
            raise NonFiniteLossError(self.step + 1, f"loss (on {bad} rank(s))", value)
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n


# ---- checkpoints --------------------------------------------------------------------------

def save_checkpoint(root: str | os.PathLike, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``root/step-{step}/`` atomically and keep only the newest ``keep`` checkpoints.
    Raises NonFiniteStateError, writing nothing, if a tensor to save is not finite.

    ``state`` keys: "params" {name: tensor} (required), "optimizer" (a torch optimizer, or
    None), "meta" (JSON-able scalars: epoch, batch position, config ...). The Python and
    torch RNG states are always saved, so a resumed run draws the same dropout masks.
    """
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CKPT_PREFIX}{step:08d}"
    params = {k: v.detach().cpu().contiguous() for k, v in state["params"].items()}
    opt = state.get("optimizer")
    opt_tensors, groups = _flatten_optimizer(opt.state_dict()) if opt is not None else ({}, None)
    bad = non_finite(params) + [f"optimizer {k}" for k in non_finite(opt_tensors)]
    if bad:
        raise NonFiniteStateError(step, bad, latest_checkpoint(root))
    tmp = Path(tempfile.mkdtemp(prefix=TMP_CKPT_PREFIX, dir=root))
    try:
        save_file(params, str(tmp / "params.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng = {"torch_rng": torch.get_rng_state()}
        if cuda_present() and torch.cuda.is_initialized():
            rng["cuda_rng"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        doc = {"step": step, "meta": state.get("meta", {}), "param_groups": groups,
               "python_rng": _py_rng_to_json(random.getstate())}
        (tmp / "state.json").write_text(json.dumps(doc, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(folder: str | os.PathLike, params: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Restore a checkpoint in place: copy its tensors into ``params`` (same names), load the
    optimizer, restore the RNGs; returns {"step", "meta"}."""
    from safetensors.torch import load_file

    folder = Path(folder)
    doc = json.loads((folder / "state.json").read_text())
    saved = load_file(str(folder / "params.safetensors"))
    missing = sorted(set(params) ^ set(saved))
    if missing:
        raise ValueError(f"{folder}: checkpoint tensors do not match the trainable ones: {missing[:5]}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k])
    if optimizer is not None and doc["param_groups"] is not None:
        optimizer.load_state_dict(_unflatten_optimizer(load_file(str(folder / "optimizer.safetensors")), doc["param_groups"]))
    rng = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(rng["torch_rng"])
    if "cuda_rng" in rng and cuda_present():
        torch.cuda.set_rng_state(rng["cuda_rng"])
    random.setstate(_py_rng_from_json(doc["python_rng"]))
    return {"step": doc["step"], "meta": doc["meta"]}


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """A torch optimizer state dict -> ({"state.{param}.{key}": tensor}, JSON param groups)."""
    tensors = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            tensors[f"state.{idx}.{key}"] = (val if torch.is_tensor(val) else torch.tensor(val, device="cpu")).cpu().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    return {"state": state, "param_groups": groups}


def _py_rng_to_json(st) -> list:
    version, internal, gauss = st
    return [version, list(internal), gauss]


def _py_rng_from_json(doc) -> tuple:
    version, internal, gauss = doc
    return (version, tuple(internal), gauss)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen deep copy of ``model`` (the reference a full fine-tune needs, since its live
    weights move; with LoRA the base itself is the reference and no copy is made)."""
    ref = copy.deepcopy(model)
    ref.__dict__.pop("_lora_adapters", None)
    ref.__dict__.pop("_lora_active", None)
    return ref.eval().requires_grad_(False)
