"""PPO: GAE by hand, the KL controller, the surrogate loss falling on a fixed rollout,
log-probs at the sampling temperature, the end of a response and the missing-EOS penalty,
the red-team / helpfulness prompt mix, the global RNG left alone, base weights untouched,
and resume reproducing an uninterrupted run."""
import argparse
import json

import pytest
import torch

from cai import ppo_cmd
from cai.config import field_docs
from cai.ppo import KLController, PPOConfig, PPOTrainer, Samples, gae, train_ppo
from cai.prompts import PromptRecord
from engine import Engine, lora
from engine.errors import InputError


class CountScorer:
    """A deterministic stand-in preference score: how often the response says 'e'."""

    def score(self, convs, responses):
        return torch.tensor([float(r.count("e")) for r in responses])


def prompts(n=8):
    return [PromptRecord(f"p{i}", f"Tell me about bread {i}", None, "x", "train") for i in range(n)]


def helpful(n=5):
    return [PromptRecord(f"h{i}", f"How do I bake bread {i}?", None, "cooking", "train") for i in range(n)]


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
    chosen, _ = ppo.prompts_for(prompts(), prompts(), 0)
    ro = ppo.experience(chosen, ppo.rollout(chosen, 0))
    steps = [ppo._minibatch_step(ro, [0, 1, 2, 3]) for _ in range(8)]
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


# ---- log-probs at the sampling temperature --------------------------------------------------

def test_old_logprobs_equal_the_samplers_at_temperature(tiny_model_dir):
    from engine.scoring import token_logprobs

    eng = fresh_engine(tiny_model_dir)
    ppo = PPOTrainer(eng, CountScorer(), PPOConfig(prompts_per_iteration=3, max_new_tokens=10, temperature=0.7,
                                                   helpful_fraction=0.0))
    chosen, _ = ppo.prompts_for(prompts(), None, 0)
    ro = ppo.experience(chosen, ppo.rollout(chosen, 0))
    assert ro.old_lp.numel() > 10
    assert (ro.old_lp - ro.sampler_lp).abs().max() < 1e-4
    # the reference is the SFT adapter, which the policy starts as: same tempered log-probs
    assert (ro.old_lp - ro.ref_lp).abs().max() < 1e-5
    # what temperature 1 would have given is far off: the comparison above can fail
    with lora.use_adapter(eng.model, "policy"), torch.no_grad():
        at_one = token_logprobs(eng.model, ro.batch)[ro.batch.target_rows]
    assert (at_one - ro.sampler_lp).abs().max() > 1e-2
    # the update's ratio is taken at the same temperature: it starts at exactly 1
    step = ppo._minibatch_step(ro, [0, 1, 2])
    assert step["clip_frac"] == 0.0 and abs(step["approx_kl"]) < 1e-6


def test_temperature_must_be_positive():
    with pytest.raises(InputError, match="temperature"):
        PPOConfig(temperature=0.0)
    with pytest.raises(InputError, match="temperature"):
        PPOConfig(temperature=float("nan"))


# ---- the end of a response ------------------------------------------------------------------

def end_trainer(tiny_model_dir, **kw):
    cfg = PPOConfig(kl_coef=0.0, gamma=1.0, lam=1.0, whiten_advantages=False, reward_clip=0.0, **kw)
    return PPOTrainer(fresh_engine(tiny_model_dir), CountScorer(), cfg)


def handmade(ppo, parts):
    """Samples whose responses are the token ids of ``parts`` (text or token id) joined."""
    tok = ppo.eng.tokenizer
    prompt = tok("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    responses = []
    for pieces in parts:
        ids = []
        for piece in pieces:
            ids += [piece] if isinstance(piece, int) else tok(piece, add_special_tokens=False)["input_ids"]
        responses.append(ids)
    return Samples([prompt] * len(parts), responses, [[0.0] * len(r) for r in responses])


def test_tokens_after_a_stop_get_no_mask_reward_or_gradient(tiny_model_dir):
    ppo = end_trainer(tiny_model_dir)
    eos = ppo.eng.tokenizer.eos_token_id
    samples = handmade(ppo, [["Bake the bread.", "\n\nHuman:", " eeee eeee"],
                             ["Knead it", eos, " eeee eeee"],
                             ["Mix, rise, bake.", eos]])
    ro = ppo.experience(prompts(3), samples)
    tok = ppo.eng.tokenizer
    for b, (seq, mask) in enumerate(zip(ro.seqs, ro.masks)):
        kept = [t for t, m in zip(seq, mask) if m]
        text = tok.decode(kept)
        after = seq[max(i for i, m in enumerate(mask) if m) + 1 :]
        if b == 0:
            assert text.startswith("Bake the bread.") and text.endswith("Human:") and "eeee" in tok.decode(after)
        elif b == 1:
            assert kept[-1] == eos and "eeee" in tok.decode(after)
        else:
            assert kept[-1] == eos and after == []
        assert sum(mask) == int((ro.seq_of == b).sum())
    assert not ro.truncated.any() and (ro.penalty == 0).all()
    # the preference model read only the kept text: the 'e's after the stop never count
    assert ro.scores.tolist() == [float(t.count("e")) for t in ("Bake the bread.", "Knead it", "Mix, rise, bake.")]
    # gamma = lam = 1, no KL, no whitening: each kept token's return is its response's score,
    # which is only true if the reward sits on the last kept token and nothing follows it
    assert ro.returns.tolist() == pytest.approx(ro.scores[ro.seq_of].tolist())
    assert ro.batch.num_targets == len(ro.seq_of) == sum(map(sum, ro.masks))


def test_a_truncated_rollout_gets_the_missing_eos_penalty(tiny_model_dir):
    ppo = end_trainer(tiny_model_dir, missing_eos_penalty=-2.5)
    eos = ppo.eng.tokenizer.eos_token_id
    ro = ppo.experience(prompts(2), handmade(ppo, [["Bake the bread and keep"], ["Bake the bread.", eos]]))
    assert ro.truncated.tolist() == [True, False]
    assert ro.penalty.tolist() == [-2.5, 0.0]
    first = ro.seq_of == 0
    assert ro.returns[first].tolist() == pytest.approx([float(ro.scores[0]) - 2.5] * int(first.sum()))
    assert ro.returns[~first].tolist() == pytest.approx([float(ro.scores[1])] * int((~first).sum()))


def test_missing_eos_penalty_is_on_by_default_and_documented():
    assert PPOConfig().missing_eos_penalty < 0
    assert "max_new_tokens" in field_docs(PPOConfig)["missing_eos_penalty"]
    sub = argparse.ArgumentParser().add_subparsers()
    ppo_cmd.register(sub)
    text = " ".join(sub.choices["ppo"].format_help().split())
    assert "--missing-eos-penalty" in text and "(default: -1.0)" in text
    with pytest.raises(InputError, match="missing_eos_penalty"):
        PPOConfig(missing_eos_penalty=1.0)


# ---- red-team and helpfulness prompts -------------------------------------------------------

def test_prompts_mix_redteam_and_helpful_in_the_documented_proportion(tiny_model_dir):
    assert PPOConfig().helpful_fraction == 0.5 and "helpfulness" in field_docs(PPOConfig)["helpful_fraction"]
    eng = fresh_engine(tiny_model_dir)
    red_ids, help_ids = {p.id for p in prompts()}, {p.id for p in helpful()}
    ppo = PPOTrainer(eng, CountScorer(), PPOConfig(prompts_per_iteration=4))
    for it in range(4):
        chosen, n_help = ppo.prompts_for(prompts(), helpful(), it)
        assert n_help == 2 and {p.id for p in chosen[:2]} <= red_ids and {p.id for p in chosen[2:]} <= help_ids
    # an uneven share: over a run the count stays within one prompt of the fraction
    uneven = PPOTrainer(eng, CountScorer(), PPOConfig(prompts_per_iteration=3, helpful_fraction=0.3))
    draws = [uneven.prompts_for(prompts(), helpful(), it) for it in range(10)]
    assert sum(n for _, n in draws) == 9 and all(n in (0, 1, 2) for _, n in draws)
    assert all(sum(p.id in help_ids for p in c) == n for c, n in draws)
    # every helpfulness prompt is drawn once per pass, in a seeded order
    again = PPOTrainer(eng, CountScorer(), PPOConfig(prompts_per_iteration=3, helpful_fraction=0.3))
    assert [[p.id for p in c] for c, _ in draws] == [[p.id for p in again.prompts_for(prompts(), helpful(), it)[0]]
                                                      for it in range(10)]
    first_pass = [p.id for c, n in draws for p in c[len(c) - n :]][:5]
    assert sorted(first_pass) == sorted(help_ids)
    # none given: the built-in benign train split
    chosen, n_help = ppo.prompts_for(prompts(), None, 0)
    assert n_help == 2 and all(p.id.startswith("bn-") and p.split == "train" for p in chosen[2:])
    with pytest.raises(InputError, match="helpfulness prompts"):
        ppo.prompts_for(prompts(), [], 0)


# ---- the global RNG -----------------------------------------------------------------------

def test_trainer_leaves_the_global_rng_alone_and_runs_reproduce(tiny_model_dir):
    cfg = PPOConfig(iterations=1, prompts_per_iteration=4, max_new_tokens=6, minibatch_size=2,
                    missing_eos_penalty=-1.0)
    eng = fresh_engine(tiny_model_dir)
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    ppo = PPOTrainer(eng, CountScorer(), cfg)
    assert torch.equal(before, torch.random.get_rng_state())
    head = {k: v.clone() for k, v in ppo.value_head.state_dict().items()}
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        runs.append(train_ppo(fresh_engine(tiny_model_dir), CountScorer(), prompts(), cfg, helpful_prompts=helpful()))
    keys = ("reward_mean", "kl", "loss", "policy_loss", "value_loss", "entropy", "truncated", "helpful_prompts")
    assert {k: runs[0][0][k] for k in keys} == {k: runs[1][0][k] for k in keys}
    assert PPOTrainer(fresh_engine(tiny_model_dir), CountScorer(), cfg).value_head.state_dict().keys() == head.keys()
    assert all(torch.equal(v, head[k]) for k, v in
               PPOTrainer(fresh_engine(tiny_model_dir), CountScorer(), cfg).value_head.state_dict().items())
    # the run's metrics say what the mix and the ends did
    rec = runs[0][0]
    assert rec["helpful_prompts"] == 2 and rec["reward_helpful"] is not None
    assert rec["truncated"] > 0 and rec["eos_penalty"] == pytest.approx(-1.0 * rec["truncated"])
