"""PPO: GAE by hand, the KL controller, the surrogate loss falling on a fixed rollout,
base weights untouched, and resume reproducing an uninterrupted run."""
import json

import pytest
import torch

from cai.ppo import KLController, PPOConfig, PPOTrainer, gae, train_ppo
from cai.prompts import PromptRecord
from engine import Engine, lora


class CountScorer:
    """A deterministic stand-in preference score: how often the response says 'e'."""

    def score(self, convs, responses):
        return torch.tensor([float(r.count("e")) for r in responses])


def prompts(n=8):
    return [PromptRecord(f"p{i}", f"Tell me about bread {i}", None, "x", "train") for i in range(n)]


def fresh_engine(tiny_model_dir):
    eng = Engine.load(tiny_model_dir("llama"))
    lora.add_adapter(eng.model, "sft", seed=0)
    return eng


def test_gae_by_hand():
    rewards = torch.tensor([0.0, 0.0, 1.0, 0.5, -1.0])
    values = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    seq_of = torch.tensor([0, 0, 0, 1, 1])
    adv, ret = gae(rewards, values, seq_of, 2, gamma=0.9, lam=0.8)
    # sequence 0: deltas d2 = 1 - .3 = .7; d1 = 0 + .9*.3 - .2 = .07; d0 = .9*.2 - .1 = .08
    a2 = 0.7
    a1 = 0.07 + 0.72 * a2
    a0 = 0.08 + 0.72 * a1
    # sequence 1: d4 = -1 - .5 = -1.5; d3 = .5 + .9*.5 - .4 = .55
    a4 = -1.5
    a3 = 0.55 + 0.72 * a4
    assert adv.tolist() == pytest.approx([a0, a1, a2, a3, a4], abs=1e-6)
    assert ret.tolist() == pytest.approx((adv + values).tolist(), abs=1e-6)


def test_adaptive_kl_controller_moves_toward_target():
    cfg = PPOConfig(adaptive_kl=True, kl_coef=0.1, target_kl=1.0, kl_horizon=100)
    up, down = KLController(cfg), KLController(cfg)
    up.update(5.0, 10)  # KL above target: beta grows (error clipped at +0.2)
    down.update(0.5, 10)
    assert up.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    assert down.value == pytest.approx(0.1 * (1 - 0.2 * 10 / 100))  # error -0.5 clipped to -0.2
    fixed = KLController(PPOConfig(kl_coef=0.1))
    fixed.update(5.0, 10)
    assert fixed.value == 0.1


def test_surrogate_loss_falls_on_a_fixed_rollout(tiny_model_dir):
    eng = fresh_engine(tiny_model_dir)
    ppo = PPOTrainer(eng, CountScorer(), PPOConfig(prompts_per_iteration=4, max_new_tokens=12, lr=3e-3,
                                                   minibatch_size=4, vf_coef=0.5))
    chosen = ppo.prompts_for(prompts(), 0)
    ids, responses, texts = ppo.rollout(chosen, 0)
    ro = ppo.experience(chosen, ids, responses, texts)
    seqs = [p + r for p, r in zip(ids, responses)]
    masks = [[False] * len(p) + [True] * len(r) for p, r in zip(ids, responses)]
    steps = [ppo._minibatch_step(ro, seqs, masks, [0, 1, 2, 3]) for _ in range(8)]
    assert steps[-1]["loss"] < steps[0]["loss"] - 1e-3
    # the first step sees the rollout's own policy (no dropout): ratio 1, nothing clipped
    assert steps[0]["clip_frac"] == 0.0 and abs(steps[0]["approx_kl"]) < 1e-6
    assert ro.advantages.abs().sum() > 0


def test_ppo_leaves_base_weights_bit_identical(tiny_model_dir):
    eng = fresh_engine(tiny_model_dir)
    before = {k: v.clone() for k, v in eng.model.state_dict().items()}
    train_ppo(eng, CountScorer(), prompts(), PPOConfig(iterations=1, prompts_per_iteration=4, max_new_tokens=8))
    after = eng.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert lora.active_adapter(eng.model) is None


def test_resume_matches_uninterrupted(tiny_model_dir, tmp_path):
    cfg = PPOConfig(iterations=3, prompts_per_iteration=4, max_new_tokens=10, minibatch_size=2, lr=1e-3)
    full = train_ppo(fresh_engine(tiny_model_dir), CountScorer(), prompts(), cfg, out=tmp_path / "a")
    # stop after 2 iterations, then run the same command in a fresh process-like engine
    train_ppo(fresh_engine(tiny_model_dir), CountScorer(), prompts(), PPOConfig(**{**cfg.__dict__, "iterations": 2}),
              out=tmp_path / "b")
    resumed = train_ppo(fresh_engine(tiny_model_dir), CountScorer(), prompts(), cfg, out=tmp_path / "b")
    assert len(resumed) == 1
    keys = ("reward_mean", "kl", "loss", "policy_loss", "value_loss", "entropy")
    assert {k: resumed[0][k] for k in keys} == pytest.approx({k: full[2][k] for k in keys}, rel=1e-5, abs=1e-6)
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [1, 2, 3]
    assert (tmp_path / "b" / "policy" / "value_head.safetensors").is_file()
