"""The training stages of tests/test_distributed_train.py, runnable on any world size.

Run as a script under ``torchrun`` (``dist_train_worker.py MODEL_DIR OUT_DIR``) it joins the
gloo group and runs every stage with per-rank ``grad_accum`` 1; the test calls the same
functions in its own process (world 1) with ``grad_accum`` 2, so both see the same global
batch. Each stage writes its exports (rank 0) under OUT_DIR/<stage>.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from cai.dpo import DPOConfig, train_dpo
from cai.pairs import read_pairs
from cai.pm import PMConfig, RewardModel, new_head, train_pm
from cai.ppo import PPOConfig, PPOTrainer, train_ppo
from cai.prompts import PromptRecord
from cai.sft import SFTConfig, train_sft
from engine import Engine, distributed, lora
from engine.lora import LoraConfig
from engine.train import OptimConfig

PAIRS = Path(__file__).parent / "fixtures" / "prefs" / "pairs.jsonl"
CONVS = [
    [{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": "Mix flour, water and yeast."}],
    [{"role": "user", "content": "Which is less harmful?"}, {"role": "assistant", "content": "I would refuse."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help you today?"}],
    [{"role": "user", "content": "The quick brown fox?"}, {"role": "assistant", "content": "Jumps over the lazy dog."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "Is it safe?"}, {"role": "assistant", "content": "Only with care and a helmet."}],
    [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two, three."}],
]
FULL = dict(full=True, epochs=1)  # full fine-tuning, replicated: every weight all-reduced
PAIR_BUDGET = 190  # tokens: the longest pair fits, no two pairs do
NO_DROPOUT = LoraConfig(rank=4, alpha=8, dropout=0.0)  # dropout masks would differ by rank


def sft_config(grad_accum: int, **kw) -> SFTConfig:
    """Two epochs of 7 conversations, one per micro-batch (34-45 tokens each): 4 optimizer
    steps an epoch of a global batch of 2 micro-batches (an epoch's last step has one, so
    one rank sits that step out)."""
    optim = OptimConfig(lr=5e-3, warmup_steps=1, schedule="cosine", grad_accum=grad_accum)
    return SFTConfig(**{**dict(epochs=2, max_tokens_per_batch=48, shuffle=True, seed=3, checkpoint_every=1,
                               lora=NO_DROPOUT, optim=optim), **kw})


def run_sft(model_dir, out: Path, grad_accum: int, **kw) -> dict:
    return train_sft(Engine.load(model_dir), CONVS, sft_config(grad_accum, **kw), out)


def run_pm(model_dir, out: Path, grad_accum: int) -> dict:
    """6 pairs (126-183 tokens), one per micro-batch: 3 steps of 2 micro-batches."""
    cfg = PMConfig(epochs=1, max_tokens_per_batch=PAIR_BUDGET, heldout_fraction=0.0, shuffle=True, lora=NO_DROPOUT,
                   optim=OptimConfig(lr=5e-3, warmup_steps=0, schedule="constant", grad_accum=grad_accum))
    return train_pm(Engine.load(model_dir), read_pairs(PAIRS)[:6], cfg, out)


def with_sft(model_dir) -> Engine:
    eng = Engine.load(model_dir)
    sft = lora.add_adapter(eng.model, "sft", NO_DROPOUT, seed=1)
    with torch.no_grad():  # a non-identity SFT adapter, so the reference is not the bare base
        for _, _, piece in sft.pieces():
            for b in piece.B.values():
                b.normal_(0, 0.02, generator=torch.Generator().manual_seed(b.numel()))
    return eng


def run_dpo(model_dir, out: Path, grad_accum: int) -> dict:
    cfg = DPOConfig(epochs=1, max_tokens_per_batch=PAIR_BUDGET, shuffle=True, beta=0.5,
                    optim=OptimConfig(lr=5e-3, warmup_steps=0, schedule="constant", grad_accum=grad_accum))
    return train_dpo(with_sft(model_dir), read_pairs(PAIRS)[:6], cfg, "sft", out)


PPO = dict(iterations=3, prompts_per_iteration=5, max_new_tokens=8, ppo_epochs=1, minibatch_size=2,
           adaptive_kl=True, target_kl=0.6, kl_horizon=10, kl_coef=0.1, lr=3e-3)


def ppo_setup(model_dir) -> tuple[Engine, RewardModel, PPOConfig, list, list]:
    """An SFT adapter, a real (untrained) preference model, and 5 prompts an iteration (a
    world of 2 splits them 3 + 2). Adaptive KL, with a target near iteration 2's KL (about
    0.67 nats; iteration 1's is 0, the policy starting as the SFT adapter) so that the
    controller's step after it depends on the KL's value, not only on its sign."""
    eng = with_sft(model_dir)
    lora.add_adapter(eng.model, "reward", NO_DROPOUT, seed=2)
    rm = RewardModel(eng, new_head(eng.model, 4).eval().requires_grad_(False), "reward", False, 4096)
    cfg = PPOConfig(**PPO)
    red = [PromptRecord(f"p{i}", f"Tell me about bread {i}", None, "x", "train") for i in range(6)]
    helpful = [PromptRecord(f"h{i}", f"How do I bake bread {i}?", None, "cooking", "train") for i in range(4)]
    return eng, rm, cfg, red, helpful


def ppo_advantages(model_dir) -> list[list[float]]:
    """Iteration 0's whitened advantages of every sequence, by position (rank 0 gets all)."""
    eng, rm, cfg, red, helpful = ppo_setup(model_dir)
    ppo = PPOTrainer(eng, rm, cfg)
    chosen, _ = ppo.prompts_for(red, helpful, 0)
    mine = distributed.shard(list(range(len(chosen))))
    local = [chosen[i] for i in mine]
    ro = ppo.experience(local, ppo.rollout(local, 0, keys=mine), mine)
    per_seq = {gi: ro.advantages[ro.seq_of == j].tolist() for j, gi in enumerate(ro.ids)}
    merged = {k: v for part in distributed.all_gather_objects(per_seq) for k, v in part.items()}
    return [merged[i] for i in range(len(chosen))]


def run_ppo(model_dir, out: Path, iterations: int | None = None) -> list[dict]:
    eng, rm, cfg, red, helpful = ppo_setup(model_dir)
    cfg.iterations = iterations or cfg.iterations
    return train_ppo(eng, rm, red, cfg, "sft", out, helpful_prompts=helpful)


def nan_on_one_rank() -> str:
    """The last rank's loss is NaN: every rank must raise at the step (none waits forever
    in the all-reduce, none steps); returns what this rank raised."""
    from engine.train import NonFiniteLossError, Trainer

    p = torch.nn.Parameter(torch.ones(3))
    trainer = Trainer([p], OptimConfig(lr=0.1, warmup_steps=0))
    last = distributed.rank() == distributed.world() - 1
    trainer.backward((p * (float("nan") if last else 1.0)).sum())
    try:
        trainer.apply()
    except NonFiniteLossError as exc:
        return f"{exc.step}: {exc} | weights {p.tolist()}"
    return "no error"


def main(model_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    distributed.init("cpu")
    out = Path(out)
    run_sft(model_dir, out / "sft", 1)
    run_sft(model_dir, out / "resume", 1, max_steps=2)
    run_sft(model_dir, out / "sft_full", 1, **FULL)
    run_pm(model_dir, out / "pm", 1)
    run_dpo(model_dir, out / "dpo", 1)
    adv = ppo_advantages(model_dir)
    run_ppo(model_dir, out / "ppo")
    run_ppo(model_dir, out / "ppo_resume", iterations=2)
    raised = distributed.all_gather_objects(nan_on_one_rank())
    if distributed.is_main():
        (out / "advantages.json").write_text(json.dumps(adv))
        (out / "nan.json").write_text(json.dumps(raised))
    distributed.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:3])
