"""The preference model (Bai et al. 2022, §4.2): a reward adapter and a scalar head on the
shared base, trained on the AI-feedback labels with the Bradley-Terry loss.

    loss = -[p log sigmoid(r_c - r_r) + (1 - p) log sigmoid(r_r - r_c)]

where r is the head's score of the last token of prompt + response and p the soft label
(``p_chosen``; 1 with ``soft_labels=False``). Both sequences of a pair sit in one packed
forward. The base weights never change: only the "reward" adapter and the head train.

Deliberate differences from the paper: no preference-model pretraining stage (PMP), and
the PM is a LoRA adapter on the policy's own base rather than a separate, larger model, so
PPO scores rollouts without a second copy of the weights. Held-out pairs report accuracy,
margin and calibration, as the paper's calibration plots do (``calibration``).

The exported folder ``out/reward/`` (the adapter, ``reward_head.safetensors`` and
``reward_model.json``) loads with ``load_reward_model`` into any engine of the same base.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

import kernels
from cai.pairs import (EncodedPair, PreferencePair, as_pairs, encode_pairs, encode_response, group_weights,
                       pair_batches, pair_labels, prompt_messages, split_heldout)
from cai.outputs import atomic_folder
from cai.training import LoopSettings, my_share, reduce_sums, steps_per_epoch, summary, train_loop
from cai.sft import use_chat
from engine import distributed, lora, profiling
from engine.batch import PackedBatch, SharedBatch, group_by_tokens, pack, pack_shared, shared_tokens
from engine.errors import InputError
from engine.lora import LoraConfig
from engine.scoring import ScalarHead, hidden_states
from engine.train import OptimConfig, Trainer

HEAD_FILE, META_FILE = "reward_head.safetensors", "reward_model.json"


@dataclass
class PMConfig:
    """One preference-model run. Nested: ``lora`` (the reward adapter) and ``optim``."""

    epochs: int = 1
    """Passes over the training pairs. The paper trains its PM for one epoch: more overfits
    quickly, and calibration degrades before accuracy does.
    """
    max_tokens_per_batch: int = 4096
    """Token budget of one packed micro-batch: the tokens its forward runs over, both
    sequences of every pair (with share_prompt, their common prefix once)."""
    share_prompt: bool = True
    """Run each pair's shared prompt (its longest common prefix) through the model once,
    both answers attending to it, in training and the held-out scoring; the rewards and
    gradients are those of the two whole sequences. Off: each sequence is packed whole."""
    heldout_fraction: float = 0.1
    """Pairs kept out of training to measure accuracy and calibration (a seeded split)."""
    soft_labels: bool = True
    """Train on p_chosen as a soft target (the paper's choice for AI labels); off: every
    pair is a hard win for chosen.
    """
    format: str = "auto"
    """Conversation format: "chat" (the template), "text" (Human:/Assistant:) or "auto"."""
    shuffle: bool = True
    """Shuffle the pairs each epoch (seeded with seed + epoch, so a resumed run sees the same
    order).
    """
    seed: int = 0
    """Seeds the split, the shuffle, the adapter's and the head's initialisation and dropout."""
    checkpoint_every: int = 50
    """Save a checkpoint every this many optimizer steps (and always at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (older ones are deleted once a newer one is complete)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run every epoch); the schedule still spans the
    whole run, so a stopped run resumes onto the same curve.
    """
    calibration_bins: int = 5
    """Bins of the reliability table over the confidence range [0.5, 1] (5 bins of 0.1: few
    enough that a held-out set of a few hundred pairs fills each).
    """
    adapter: str = "reward"
    """Name of the trained adapter (PPO reads "reward")."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4))
    """lr 1e-4: half the SFT rate, as the head starts from scratch and a reward model that
    moves fast overfits the labeller's noise.
    """

    def __post_init__(self):
        if self.format not in ("auto", "chat", "text") or self.calibration_bins < 1:
            raise InputError("format must be 'auto', 'chat' or 'text', and calibration_bins >= 1")


class RewardModel:
    """The preference model as a scorer: base + ``adapter`` + ``head``, on a shared engine.

    Every call runs under inference_mode with the reward adapter active and restores the
    adapter that was active before, so a caller (PPO) can score between its own forwards.
    """

    def __init__(self, engine, head: ScalarHead, adapter: str = "reward", chat: bool = True,
                 max_tokens_per_batch: int = 8192):
        self.engine, self.head, self.adapter, self.chat = engine, head, adapter, chat
        self.max_tokens_per_batch = max_tokens_per_batch

    def encode(self, prompt: str | list[dict], response: str) -> list[int]:
        """Token ids of prompt + response exactly as the PM was trained on them (the score is
        read at the last one, after the end-of-turn marker)."""
        return encode_response(self.engine.tokenizer, prompt_messages(prompt), response, chat=self.chat)[0]

    def score(self, prompts: Sequence[str | list[dict]], responses: Sequence[str]) -> torch.Tensor:
        """One reward per (prompt, response) [B] float32; prompts are strings or messages."""
        if len(prompts) != len(responses):
            raise InputError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        return self.score_ids([self.encode(p, r) for p, r in zip(prompts, responses)])

    def score_ids(self, sequences: Sequence[Sequence[int]], *, group: int = 1) -> torch.Tensor:
        """Rewards of token-id sequences [B], packed into batches of at most
        ``max_tokens_per_batch`` tokens (a longer sequence goes alone). ``group`` > 1: each
        run of ``group`` consecutive sequences (a pair's answers, a prompt's samples; the
        last run may be shorter) shares its common prefix, whose forward runs once."""
        lengths = [len(s) for s in sequences]
        limit = self.engine.model.cfg.max_position_embeddings
        for i, n in enumerate(lengths):
            if not 0 < n <= limit:
                raise InputError(f"score: sequence {i} has {n} tokens (the model takes 1..{limit})")
        if group < 1:
            raise InputError(f"score: group must be >= 1 (got {group})")
        out = torch.empty(len(sequences), dtype=torch.float32, device=self.engine.model.device)
        device = self.engine.model.device
        if group == 1:
            budget = max([self.max_tokens_per_batch, *lengths])
            for g in group_by_tokens(lengths, budget):
                out[g] = self.score_packed(pack([sequences[i] for i in g], index=g, device=device))
            return out
        runs = [list(range(k, min(k + group, len(sequences)))) for k in range(0, len(sequences), group)]
        cost = [shared_tokens([sequences[i] for i in r]) for r in runs]
        for g in group_by_tokens(cost, max([self.max_tokens_per_batch, *cost])):
            rows = [i for k in g for i in runs[k]]
            out[rows] = self.score_packed(pack_shared([[sequences[i] for i in runs[k]] for k in g], index=rows,
                                                      device=device))
        return out

    def score_packed(self, batch: PackedBatch | SharedBatch) -> torch.Tensor:
        """Rewards of a packed batch's sequences [B] float32 (each read at its last token)."""
        with lora.use_adapter(self.engine.model, self.adapter), torch.inference_mode():
            r = rewards(self.engine.model, self.head, batch).float()
        return r.clone()  # a normal tensor: callers may use it outside inference_mode


def rewards(model, head: ScalarHead, batch: PackedBatch | SharedBatch) -> torch.Tensor:
    """The head on each sequence's last hidden state [B], with the active adapter."""
    return head(hidden_states(model, batch).index_select(0, batch.last_rows))


def new_head(model, seed: int) -> ScalarHead:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ScalarHead(model.cfg.hidden_size, device=model.device)


# ---- training -----------------------------------------------------------------------------

def train_pm(engine, records: Sequence[dict | PreferencePair], cfg: PMConfig, out: str | Path | None = None,
             *, progress: bool = False, resume: bool = True) -> dict:
    """Train the reward adapter and head; returns summary metrics and ``heldout`` (see
    ``calibration``).

    With ``out``: ``metrics.jsonl`` (one line per optimizer step), ``checkpoints/`` (resumed
    from when ``resume``), ``eval.json`` and the export ``reward/``. Leaves the adapter in
    the engine, inactive; ``load_reward_model(engine, out / "reward")`` gives the scorer.
    """
    model, out = engine.model, Path(out) if out is not None else None
    pairs = as_pairs(records)
    if cfg.adapter in lora.adapters(model):
        raise InputError(f"the engine already has an adapter {cfg.adapter!r}; train the PM under another name")
    encoded = encode_pairs(engine, pairs, cfg.format)
    train_idx, held_idx = split_heldout(len(pairs), cfg.heldout_fraction, cfg.seed)
    names = [p.where for p in pairs]
    epoch_batches = lambda e: pair_batches(  # noqa: E731
        encoded, train_idx, cfg.max_tokens_per_batch, shuffle=cfg.shuffle, seed=cfg.seed + e,
        max_seqlen=model.cfg.max_position_embeddings, names=names, device=model.device, share_prompt=cfg.share_prompt)
    steps = steps_per_epoch(len(epoch_batches(0)), cfg.optim.grad_accum) * cfg.epochs
    optim = replace(cfg.optim, total_steps=cfg.optim.total_steps or steps)
    head, ad = new_head(model, cfg.seed), lora.add_adapter(model, cfg.adapter, cfg.lora, seed=cfg.seed)
    params = {**{f"adapter.{k}": p for k, p in ad.named_parameters()},
              **{f"head.{k}": p for k, p in head.named_parameters()}}
    trainer = Trainer([p.requires_grad_(True) for p in params.values()], optim)
    run = LoopSettings("pm", cfg.epochs, cfg.checkpoint_every, cfg.keep_checkpoints, cfg.max_steps, cfg.seed,
                      postfix=("loss", "accuracy"))
    step = _step_fn(model, head, trainer, pairs, cfg.soft_labels)
    ad.train()
    try:
        with lora.use_adapter(model, cfg.adapter):
            log = train_loop(run, trainer, params, epoch_batches, step, out, progress, resume)
    finally:
        ad.eval()
        for p in params.values():
            p.requires_grad_(False)
    rm = RewardModel(engine, head, cfg.adapter, use_chat(engine, cfg.format), cfg.max_tokens_per_batch)
    report = evaluate(rm, [encoded[i] for i in held_idx], [pairs[i].p_chosen for i in held_idx], cfg.calibration_bins,
                      share_prompt=cfg.share_prompt)
    if out is not None and distributed.is_main():
        (out / "eval.json").write_text(json.dumps(report, indent=2))
        save_reward_model(rm, out / "reward", {"heldout": {k: v for k, v in report.items() if k != "reliability"}})
    distributed.barrier()  # the export is whole before any rank reads it
    return {**summary(log, trainer.step), "train_pairs": len(train_idx), "heldout": report}


def _step_fn(model, head: ScalarHead, trainer: Trainer, pairs: list[PreferencePair], soft: bool):
    def step(group: list[PackedBatch | SharedBatch]) -> dict:
        sums = dict.fromkeys(("loss", "accuracy", "margin", "reward_chosen", "reward_rejected"), 0.0)
        for b, w in my_share(list(zip(group, group_weights(group)))):  # weights over the whole group
            with profiling.phase("engine.train.forward"):
                r = rewards(model, head, b)
            out = kernels.bt_loss(r[0::2], r[1::2], pair_labels(pairs, b) if soft else None)
            sums["loss"] += trainer.backward(out.loss * w)
            r = r.detach()
            for k, v in (("accuracy", out.accuracy), ("margin", out.margin.mean()),
                         ("reward_chosen", r[0::2].mean()), ("reward_rejected", r[1::2].mean())):
                sums[k] += float(v) * w
        stats = trainer.apply()
        return {"step": trainer.step, **reduce_sums(sums), **stats}
    return step


# ---- evaluation ---------------------------------------------------------------------------

def evaluate(rm: RewardModel, encoded: Sequence[EncodedPair], p_chosen: Sequence[float], bins: int = 5, *,
             share_prompt: bool = True) -> dict:
    """Held-out accuracy, margin and calibration of the PM (``calibration``); {"pairs": 0}
    when nothing is held out. ``share_prompt``: each pair's common prefix runs once."""
    if not encoded:
        return {"pairs": 0}
    r = rm.score_ids([s for e in encoded for s in (e.chosen, e.rejected)], group=2 if share_prompt else 1)
    return calibration(r[0::2], r[1::2], torch.tensor(p_chosen, device=r.device), bins)


def calibration(r_chosen: torch.Tensor, r_rejected: torch.Tensor, p_chosen: torch.Tensor, bins: int = 5) -> dict:
    """Agreement of the PM with the labels over N pairs (inputs [N]).

    The PM predicts q = sigmoid(r_c - r_r) = P(chosen is better). ``accuracy``: the sign of
    the margin agrees with the label's direction (p >= 0.5: chosen), as ``kernels.bt_loss``
    counts it; ``loss``: the soft Bradley-Terry loss; ``brier``: mean (q - y)^2 with y the
    label's direction, ``brier_soft``: mean (q - p)^2. Calibration is over the confidence
    c = max(q, 1 - q) in [0.5, 1]: ``reliability`` has one row per bin with the mean
    confidence (``predicted``), the fraction of pairs whose predicted winner is the label's
    (``observed``) and the mean soft label of the predicted winner (``soft_label``); ``ece``
    is the count-weighted mean |predicted - observed| over the bins.
    """
    m, p = (r_chosen - r_rejected).double(), p_chosen.double()
    q, y = torch.sigmoid(m), (p >= 0.5).double()
    correct = torch.where(p >= 0.5, m > 0, m < 0).double()
    conf, soft = torch.sigmoid(m.abs()), torch.where(m >= 0, p, 1 - p)
    which = ((conf - 0.5) * 2 * bins).long().clamp(0, bins - 1)
    table, ece, n = [], 0.0, m.numel()
    for k in range(bins):
        sel = which == k
        count = int(sel.sum())
        row = {"lo": 0.5 + k / (2 * bins), "hi": 0.5 + (k + 1) / (2 * bins), "count": count,
               "predicted": float(conf[sel].mean()) if count else None,
               "observed": float(correct[sel].mean()) if count else None,
               "soft_label": float(soft[sel].mean()) if count else None}
        if count:
            ece += count / n * abs(row["predicted"] - row["observed"])
        table.append(row)
    loss = -(p * F.logsigmoid(m) + (1 - p) * F.logsigmoid(-m)).mean()
    return {"pairs": n, "accuracy": float(correct.mean()), "mean_margin": float(m.mean()), "loss": float(loss),
            "brier": float(((q - y) ** 2).mean()), "brier_soft": float(((q - p) ** 2).mean()), "ece": ece,
            "reliability": table}


# ---- export and loading ---------------------------------------------------------------------

def save_reward_model(rm: RewardModel, folder: str | Path, extra: dict | None = None) -> Path:
    """The adapter (engine format), ``reward_head.safetensors`` and ``reward_model.json``."""
    from safetensors.torch import save_file

    with atomic_folder(folder) as tmp:  # written whole beside ``folder``, then renamed in
        lora.save_adapter(rm.engine.model, rm.adapter, tmp)
        save_file({k: v.detach().contiguous() for k, v in rm.head.state_dict().items()}, str(tmp / HEAD_FILE))
        meta = {"format": "cai-engine-reward", "hidden_size": rm.engine.model.cfg.hidden_size,
                "prompt_format": "chat" if rm.chat else "text", "base_model": rm.engine.source, **(extra or {})}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return Path(folder)


def load_reward_model(engine, folder: str | Path, name: str = "reward", max_tokens_per_batch: int = 8192) -> RewardModel:
    """Attach a PM written by ``train_pm`` (``out/reward``) as adapter ``name`` (replacing an
    adapter of that name, e.g. the one just trained in this process) plus its head."""
    from safetensors.torch import load_file

    folder, model = Path(folder), engine.model
    try:
        meta = json.loads((folder / META_FILE).read_text())
        head_sd = load_file(str(folder / HEAD_FILE))
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder}: not a preference model folder written by `cai pm`: {exc}") from exc
    if meta.get("hidden_size") != model.cfg.hidden_size:
        raise InputError(f"{folder}: reward head for hidden size {meta.get('hidden_size')}, model has {model.cfg.hidden_size}")
    chat = meta.get("prompt_format") == "chat"
    if chat and not getattr(engine.tokenizer, "chat_template", None):
        raise InputError(f"{folder}: trained on chat-formatted text, but {engine.source} has no chat template")
    head = ScalarHead(model.cfg.hidden_size, device=model.device)
    head.load_state_dict(head_sd)
    lora.remove_adapter(model, name)
    lora.load_adapter(model, name, folder)
    return RewardModel(engine, head.eval().requires_grad_(False), name, chat, max_tokens_per_batch)
