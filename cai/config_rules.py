"""The legal range of every config field, in one table that ``cai.config.build_config``
checks for every command and for ``cai run``.

A field's type comes from its annotation (an ``int`` field refuses ``"two"``, a ``float``
field refuses NaN and infinity); this table adds what the type cannot say: ranges and
choices. It lives beside the builder rather than in each stage's module so that a rule is
written once however many commands build that config. A field without an entry takes any
value of its type.
"""
from __future__ import annotations

from typing import Callable, NamedTuple


class Range(NamedTuple):
    """lo <= x <= hi (``open_lo`` / ``open_hi``: strict); None: unbounded."""

    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False

    def __call__(self, x) -> str | None:
        if isinstance(x, (tuple, list)):
            return next((p for p in map(self, x) if p), None)
        low_ok = self.lo is None or (x > self.lo if self.open_lo else x >= self.lo)
        high_ok = self.hi is None or (x < self.hi if self.open_hi else x <= self.hi)
        if low_ok and high_ok:
            return None
        if self.hi is None:
            return f"must be {'>' if self.open_lo else '>='} {self.lo}"
        if self.lo is None:
            return f"must be {'<' if self.open_hi else '<='} {self.hi}"
        return f"must be in {'(' if self.open_lo else '['}{self.lo}, {self.hi}{')' if self.open_hi else ']'}"


class OneOf(NamedTuple):
    values: tuple

    def __call__(self, x) -> str | None:
        return None if x in self.values else "must be one of " + ", ".join(map(repr, self.values))


class SubsetOf(NamedTuple):
    values: tuple

    def __call__(self, x) -> str | None:
        if x and all(v in self.values for v in x):
            return None
        return "must be a non-empty subset of " + ",".join(self.values)


def nonempty(x) -> str | None:
    return None if x.strip() else "must not be empty"


def ge(lo):
    return Range(lo)


def gt(lo):
    return Range(lo, open_lo=True)


PROB = Range(0.0, 1.0)
TOP_P = Range(0.0, 1.0, open_lo=True)
STYLE = OneOf(("auto", "chat", "base"))
FORMAT = OneOf(("auto", "chat", "text"))
COUNT, SIZE = ge(0), ge(1)
FEWSHOT = ge(-1)  # -1: the style's default

_TRAINING = {  # what every training stage's loop needs
    "epochs": SIZE, "max_tokens_per_batch": SIZE, "checkpoint_every": SIZE, "keep_checkpoints": SIZE,
    "max_steps": COUNT, "format": FORMAT, "adapter": nonempty,
}
_GENERATING = {"max_new_tokens": SIZE, "temperature": ge(0.0), "top_p": TOP_P, "max_fewshot": FEWSHOT,
               "chunk_size": SIZE, "max_slots": SIZE, "style": STYLE}


def _table() -> dict[str, dict[str, Callable]]:
    from cai.config import DTYPES, ROLLOUT_WEIGHTS
    from engine.lora import TARGETS

    return {
        "SamplingParams": {"max_new_tokens": SIZE, "temperature": ge(0.0), "top_k": COUNT, "top_p": TOP_P,
                           "n": SIZE},
        "LoraConfig": {"rank": SIZE, "alpha": gt(0.0), "dropout": Range(0.0, 1.0, open_hi=True),
                       "targets": SubsetOf(tuple(TARGETS))},
        "OptimConfig": {"lr": gt(0.0), "weight_decay": ge(0.0), "betas": Range(0.0, 1.0, open_hi=True),
                        "eps": gt(0.0), "warmup_steps": COUNT, "total_steps": COUNT,
                        "schedule": OneOf(("cosine", "constant")), "min_lr_ratio": PROB,
                        "max_grad_norm": ge(0.0), "grad_accum": SIZE},
        "SLConfig": {**_GENERATING, "rounds": SIZE},
        "SFTConfig": {**_TRAINING, "loss_on": OneOf(("last", "all")), "revisions": OneOf(("final", "all"))},
        "LabelConfig": {**_GENERATING, "principles_per_pair": SIZE, "clamp_low": PROB, "clamp_high": PROB,
                        "aspect": OneOf(("auto", "all", "harmlessness", "helpfulness"))},
        "PMConfig": {**_TRAINING, "heldout_fraction": Range(0.0, 1.0, open_hi=True), "calibration_bins": SIZE},
        "DPOConfig": {**_TRAINING, "beta": gt(0.0), "label_smoothing": Range(0.0, 0.5, open_hi=True)},
        "PPOConfig": {
            "iterations": SIZE, "prompts_per_iteration": SIZE, "max_new_tokens": SIZE,
            "temperature": gt(0.0),  # the learner's log-probs divide by it
            "ppo_epochs": SIZE, "minibatch_size": SIZE, "clip_eps": gt(0.0), "value_clip_eps": gt(0.0),
            "vf_coef": ge(0.0), "entropy_coef": ge(0.0), "kl_coef": ge(0.0), "kl_estimator": OneOf(("k1", "k2", "k3")),
            "target_kl": gt(0.0), "kl_horizon": SIZE, "gamma": PROB, "lam": PROB, "reward_clip": ge(0.0),
            "lr": gt(0.0), "max_grad_norm": ge(0.0), "max_slots": SIZE, "checkpoint_every": SIZE,
            "helpful_fraction": PROB, "missing_eos_penalty": Range(hi=0.0), "tis_cap": ge(1.0)},
        "EvalConfig": {**_GENERATING, "redteam": nonempty, "benign": nonempty, "limit": COUNT,
                       "principles_per_comparison": SIZE, "samples": COUNT, "attack_prompts": COUNT},
        "RunConfig": {"model": nonempty, "device": _device, "dtype": OneOf(DTYPES),
                      "rollout_weights": OneOf(ROLLOUT_WEIGHTS),
                      "constitution": nonempty, "redteam_prompts": nonempty, "helpful_prompts": nonempty,
                      "sl_prompts": SIZE, "helpful_samples": COUNT, "label_prompts": SIZE,
                      "label_helpful_prompts": COUNT, "rl": OneOf(("ppo", "dpo"))},
    }


def _device(x) -> str | None:
    from cai.config import check_device

    return check_device(x)


_TABLE: dict | None = None


def rule_for(cls, name: str) -> Callable | None:
    """The check of field ``name`` of config class ``cls``: value -> None, or what is wrong."""
    global _TABLE
    if _TABLE is None:
        _TABLE = _table()
    return _TABLE.get(cls.__name__, {}).get(name)
