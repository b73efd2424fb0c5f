"""Rollout weights (engine/quant.py): the fp16 and int8 stand-ins compute the product they
stand for, serve generation only, follow weight updates, and PPO corrects the sampler/learner
gap with truncated importance weights it can be checked against by hand."""
import pytest
import torch
import torch.nn.functional as F

from cai.ppo import PPOConfig, PPOTrainer
from engine import Engine, SamplingParams, lora
from engine.errors import InputError
from engine.model import Linear
from engine.quant import Fp16Product, Int8Product, quantize_rows
from engine.scoring import token_logprobs


def test_fp16_product_is_the_fp16_rounded_weight_in_float32():
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(48, 32, generator=g), torch.randn(48, generator=g), torch.randn(5, 7, 32, generator=g)
    want = F.linear(x.double(), w.half().double(), b.double()).float()
    got = Fp16Product(lambda: (w, b))(x)
    assert got.shape == (5, 7, 48) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and it is not the float32 product (the rounding is real, so the check above can fail)
    assert (got - F.linear(x, w, b)).abs().max() > 1e-5


def test_int8_rows_and_product():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 40, generator=g) * torch.linspace(0.01, 3.0, 64)[:, None]  # rows of very different range
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().amax(dim=1).eq(127).all()
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()  # round to nearest
    x = torch.randn(6, 40, generator=g)
    exact = x @ w.t()
    err = (Int8Product(lambda: (w, None))(x) - exact).norm() / exact.norm()
    assert err < 0.03  # int8 weights and a per-call int8 activation scale: ~1% on gaussian inputs


def test_the_cli_offers_the_engines_modes():
    from cai.config import ROLLOUT_WEIGHTS
    from engine.quant import MODES

    assert ROLLOUT_WEIGHTS == MODES


def test_unknown_mode_is_refused(tiny_engine):
    with pytest.raises(InputError, match="rollout_weights must be one of fp32, fp16, int8"):
        tiny_engine.set_rollout_weights("int4")


@pytest.mark.parametrize("mode", ["fp16", "int8"])
def test_stand_ins_serve_generation_only_and_follow_weight_updates(tiny_model_dir, mode):
    eng = Engine.load(tiny_model_dir("llama"), rollout_weights=mode)
    m = eng.model
    linears = [x for x in m.modules() if isinstance(x, Linear)]
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    seen = []
    hook = m.layers[0].mlp.down.register_forward_pre_hook(lambda mod, a: seen.append(mod.fast is not None))
    try:
        out = eng.generate(["hello there"], params)[0].samples[0]
    finally:
        hook.remove()
    assert seen and all(seen)  # every forward of the call read the stand-in
    assert all(x.fast is None for x in linears) and m.head_fast is None  # taken off after the call

    def fp32_run():
        eng.set_rollout_weights("fp32")
        try:
            return eng.generate(["hello there"], params)[0].samples[0]
        finally:
            eng.set_rollout_weights(mode)

    def agree(a, b):
        """Greedy tokens in common before the first difference, and the largest log-prob gap there."""
        n = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), len(a.token_ids))
        return n, max((abs(x - y) for x, y in zip(a.logprobs[:n], b.logprobs[:n])), default=0.0)

    # the sampler's log-probs are the stand-ins' own: close to fp32's, not equal
    n, gap = agree(out, fp32_run())
    assert n >= 1 and 0 < gap < 0.1

    # a full fine-tune's in-place update of the head and a trunk weight: the next generate
    # call samples from the new weights without being told (the stand-ins rebuild)
    with torch.no_grad():
        m.lm_head_weight.mul_(-1.0)
        m.layers[-1].mlp.down.weight.mul_(3.0)
    after = eng.generate(["hello there"], params)[0].samples[0]
    n_new, gap_new = agree(after, fp32_run())
    assert n_new >= 1 and gap_new < 0.1
    assert agree(after, out)[0] < n_new or after.logprobs[0] != pytest.approx(out.logprobs[0], abs=0.1)


def test_ppo_weights_the_policy_loss_by_truncated_importance_weights(tiny_model_dir):
    from test_ppo import CountScorer, prompts

    eng = Engine.load(tiny_model_dir("llama"), rollout_weights="fp16")
    lora.add_adapter(eng.model, "sft", seed=0)
    cfg = PPOConfig(prompts_per_iteration=3, max_new_tokens=10, helpful_fraction=0.0, tis_cap=1.000001)
    ppo = PPOTrainer(eng, CountScorer(), cfg)
    chosen, _ = ppo.prompts_for(prompts(), None, 0)
    ro = ppo.experience(chosen, ppo.rollout(chosen, 0))
    # the old log-probs are the learner's at full precision, not the sampler's
    with lora.use_adapter(eng.model, "policy"), torch.no_grad():
        full = token_logprobs(eng.model, ro.batch, cfg.temperature)[ro.batch.target_rows]
    torch.testing.assert_close(ro.old_lp, full, rtol=0, atol=1e-6)
    gap = ro.old_lp - ro.sampler_lp
    assert 0 < gap.abs().max() < 0.1
    # by hand: min(exp(old - sampler), cap)
    torch.testing.assert_close(ro.is_weights, gap.exp().clamp(max=cfg.tis_cap))
    assert (ro.is_weights < 1).any() and (ro.is_weights == cfg.tis_cap).any()  # both sides of 1 occur

    step = ppo._minibatch_step(ro, [0, 1, 2])  # the weighted loss trains
    assert all(v == v and abs(v) < float("inf") for v in step.values())
    # fp32 rollouts carry no weights
    eng.set_rollout_weights("fp32")
    assert ppo.experience(chosen, ppo.rollout(chosen, 0)).is_weights is None


def test_tis_cap_is_checked():
    with pytest.raises(InputError, match="tis_cap"):
        PPOConfig(tis_cap=0.5)
