"""Direct preference optimisation (Rafailov et al. 2023) on the AI-feedback pairs: the
alternative to PM + PPO that skips both the reward model and sampling.

    m = beta [(log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))]
    loss = -[p log sigmoid(m) + (1 - p) log sigmoid(-m)]

with log-probs summed over the response tokens only. The policy is the LoRA adapter
"policy", a copy of the SFT adapter (a fresh one on the base without it); the reference is
base + SFT adapter (the bare base without it), the same weights with another adapter, so
nothing is copied. Its log-probs are computed once, before training, in packed
inference-mode forwards: the reference never changes, so the training forwards need only
the policy.

Soft labels: p is the labeller's p_chosen. Label smoothing eps (conservative DPO) mixes it
with the flipped label, p' = (1 - eps) p + eps (1 - p); with hard labels p' = 1 - eps.

Deliberate choice, as TRL's default: dropout is off while training (``disable_dropout``),
so at step 0 the policy equals the reference exactly (loss log 2, margins 0) and the
implicit rewards are not noised by dropout masks.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

import kernels
from cai.outputs import atomic_folder
from cai.pairs import EncodedPair, PreferencePair, as_pairs, encode_pairs, group_weights, pair_batches, pair_labels
from cai.training import LoopSettings, my_share, reduce_sums, steps_per_epoch, summary, train_loop
from engine import distributed, lora, profiling
from engine.batch import PackedBatch, SharedBatch
from engine.errors import InputError
from engine.lora import LoraConfig
from engine.scoring import sequence_logprobs
from engine.train import OptimConfig, Trainer


@dataclass
class DPOConfig:
    """One DPO run. Nested: ``lora`` (the policy adapter when there is no SFT adapter to copy)
    and ``optim``."""

    beta: float = 0.1
    """Strength of the implicit KL to the reference; 0.1 is the paper's default (smaller
    lets the policy drift further from the SFT model).
    """
    label_smoothing: float = 0.0
    """eps of conservative DPO: the label is trusted with probability 1 - eps (0: off)."""
    soft_labels: bool = True
    """Use p_chosen as the target probability (off: every pair is a hard win for chosen)."""
    disable_dropout: bool = True
    """Train the adapter without dropout, so the policy starts equal to the reference."""
    epochs: int = 1
    """Passes over the pairs; DPO overfits preference data quickly, one epoch is the usual."""
    max_tokens_per_batch: int = 4096
    """Token budget of one packed micro-batch: the tokens its forward runs over, both
    sequences of every pair (with share_prompt, their common prefix once)."""
    share_prompt: bool = True
    """Run each pair's shared prompt (its longest common prefix) through the model once,
    both answers attending to it, in the training steps and the reference pass; the
    log-probs and gradients are those of the two whole sequences. Off: each sequence is
    packed whole."""
    format: str = "auto"
    """Conversation format: "chat" (the template), "text" (Human:/Assistant:) or "auto"."""
    shuffle: bool = True
    """Shuffle the pairs each epoch (seeded with seed + epoch, so resuming sees the same order)."""
    seed: int = 0
    """Seeds the shuffle and a fresh adapter's initialisation."""
    checkpoint_every: int = 50
    """Save a checkpoint every this many optimizer steps (and always at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (older ones are deleted once a newer one is complete)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run every epoch); the schedule still spans the
    whole run, so a stopped run resumes onto the same curve.
    """
    export_merged: bool = False
    """Also write DIR/merged/, a transformers checkpoint with the policy folded in."""
    adapter: str = "policy"
    """Name of the trained adapter."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5))
    """lr 5e-5: a quarter of the SFT rate; DPO's gradient grows with the log-ratio, and LoRA
    DPO recipes use 5e-6 to 5e-5.
    """

    def __post_init__(self):
        if self.beta <= 0 or not 0.0 <= self.label_smoothing < 0.5:
            raise InputError(f"beta must be > 0 and label_smoothing in [0, 0.5) (got {self.beta}, {self.label_smoothing})")
        if self.format not in ("auto", "chat", "text"):
            raise InputError("format must be 'auto', 'chat' or 'text'")


def reference_logprobs(model, encoded: Sequence[EncodedPair], adapter: str | None, max_tokens: int, *,
                       share_prompt: bool = True) -> torch.Tensor:
    """Summed response log-probs under base + ``adapter`` (None: the bare base), [N, 2]
    float32: column 0 chosen, 1 rejected. ``share_prompt``: each pair's common prefix runs
    once (``DPOConfig.share_prompt``)."""
    parts = []
    batches = pair_batches(encoded, range(len(encoded)), max_tokens, shuffle=False, seed=0,
                           max_seqlen=model.cfg.max_position_embeddings, names=[f"pair {i}" for i in range(len(encoded))],
                           device=model.device, share_prompt=share_prompt)
    with lora.use_adapter(model, adapter), torch.inference_mode():
        for b in batches:
            parts.append((b.index[0::2], sequence_logprobs(model, b).float().view(-1, 2)))
    out = torch.empty(len(encoded), 2, device=model.device)
    for idx, lp in parts:
        out[idx] = lp
    return out


def shared_reference(model, encoded: Sequence[EncodedPair], adapter: str | None, max_tokens: int, *,
                     share_prompt: bool = True) -> torch.Tensor:
    """``reference_logprobs`` of every pair, each rank computing its share (every
    ``world``-th pair) and all of them gathered, so the one forward over the data is split
    like the training steps rather than repeated on every rank."""
    if not distributed.active():
        return reference_logprobs(model, encoded, adapter, max_tokens, share_prompt=share_prompt)
    mine = distributed.shard(list(range(len(encoded))))
    part = reference_logprobs(model, [encoded[i] for i in mine], adapter, max_tokens,
                              share_prompt=share_prompt).cpu().tolist()
    out = torch.empty(len(encoded), 2, device=model.device)
    for idx, rows in distributed.all_gather_objects((mine, part)):  # host lists from every rank
        if idx:
            out[idx] = torch.tensor(rows, device=model.device)
    return out


def train_dpo(engine, records: Sequence[dict | PreferencePair], cfg: DPOConfig, sft_adapter: str | None = "sft",
              out: str | Path | None = None, *, progress: bool = False, resume: bool = True) -> dict:
    """Train the policy adapter with DPO; returns summary metrics.

    ``sft_adapter`` names an adapter already in the engine (the reference and the policy's
    start); None: both start from the bare base. With ``out``: ``metrics.jsonl``,
    ``checkpoints/`` (resumed from when ``resume``), ``policy/`` (engine format) and
    ``peft/``. Leaves the policy adapter in the engine, inactive.
    """
    model, out = engine.model, Path(out) if out is not None else None
    pairs = as_pairs(records)
    if cfg.adapter in lora.adapters(model) or cfg.adapter == sft_adapter:
        raise InputError(f"the engine already has an adapter {cfg.adapter!r}; train DPO under another name")
    encoded = encode_pairs(engine, pairs, cfg.format)
    with profiling.phase("cai.dpo.reference"):
        ref = shared_reference(model, encoded, sft_adapter, cfg.max_tokens_per_batch, share_prompt=cfg.share_prompt)
    all_pairs, names = list(range(len(pairs))), [p.where for p in pairs]
    epoch_batches = lambda e: pair_batches(  # noqa: E731
        encoded, all_pairs, cfg.max_tokens_per_batch, shuffle=cfg.shuffle, seed=cfg.seed + e,
        max_seqlen=model.cfg.max_position_embeddings, names=names, device=model.device, share_prompt=cfg.share_prompt)
    steps = steps_per_epoch(len(epoch_batches(0)), cfg.optim.grad_accum) * cfg.epochs
    optim = replace(cfg.optim, total_steps=cfg.optim.total_steps or steps)
    ad = (lora.copy_adapter(model, sft_adapter, cfg.adapter) if sft_adapter is not None
          else lora.add_adapter(model, cfg.adapter, cfg.lora, seed=cfg.seed))
    params = dict(ad.named_parameters())
    trainer = Trainer([p.requires_grad_(True) for p in params.values()], optim)
    run = LoopSettings("dpo", cfg.epochs, cfg.checkpoint_every, cfg.keep_checkpoints, cfg.max_steps, cfg.seed,
                      postfix=("loss", "accuracy"))
    ad.train(not cfg.disable_dropout)
    try:
        with lora.use_adapter(model, cfg.adapter):
            log = train_loop(run, trainer, params, epoch_batches, _step_fn(model, trainer, pairs, ref, cfg),
                             out, progress, resume)
    finally:
        ad.eval().requires_grad_(False)
    if out is not None and distributed.is_main():
        _export(engine, cfg, out)
    distributed.barrier()  # the exports are whole before any rank reads them
    return {**summary(log, trainer.step), "pairs": len(pairs)}


def _targets(pairs: list[PreferencePair], batch: PackedBatch | SharedBatch, cfg: DPOConfig) -> torch.Tensor | None:
    """p' of each pair [P], or None (hard labels: the kernel applies the smoothing)."""
    if not cfg.soft_labels:
        return None
    p, eps = pair_labels(pairs, batch), cfg.label_smoothing
    return (1 - eps) * p + eps * (1 - p)


def _step_fn(model, trainer: Trainer, pairs: list[PreferencePair], ref: torch.Tensor, cfg: DPOConfig):
    keys = ("loss", "accuracy", "margin", "reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected")

    def step(group: list[PackedBatch | SharedBatch]) -> dict:
        sums = dict.fromkeys(keys, 0.0)
        for b, w in my_share(list(zip(group, group_weights(group)))):  # weights over the whole group
            with profiling.phase("engine.train.forward"):
                lp = sequence_logprobs(model, b)  # [2P]: chosen, rejected, chosen, ...
            r = ref[b.index[0::2]]  # [P, 2]
            out = kernels.dpo_loss(lp[0::2], lp[1::2], r[:, 0], r[:, 1], beta=cfg.beta,
                                   p_chosen=_targets(pairs, b, cfg), label_smoothing=cfg.label_smoothing)
            sums["loss"] += trainer.backward(out.loss * w)
            lp = lp.detach()
            for k, v in zip(keys[1:], (out.accuracy, out.margin.mean(), out.chosen_reward.mean(),
                                       out.rejected_reward.mean(), lp[0::2].mean(), lp[1::2].mean())):
                sums[k] += float(v) * w
        stats = trainer.apply()
        return {"step": trainer.step, **reduce_sums(sums), **stats}
    return step


def _export(engine, cfg: DPOConfig, out: Path) -> None:
    model = engine.model
    with atomic_folder(out / "policy") as tmp:  # each folder written whole, then renamed in
        lora.save_adapter(model, cfg.adapter, tmp)
    with atomic_folder(out / "peft") as tmp:
        lora.export_peft(model, cfg.adapter, tmp, base_model_name_or_path=str(engine.source))
    if cfg.export_merged:
        with atomic_folder(out / "merged") as tmp:
            lora.export_merged(model, cfg.adapter, tmp, engine.tokenizer, engine.source)
