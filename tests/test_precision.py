"""bfloat16 weights on the CPU, against the same tiny model in float32: logits, log-probs and
one training step within stated tolerances, and the float32 accumulations asserted (LoRA
masters, their gradients and AdamW's moments, the heads' outputs, log-probs, losses).

Tolerances: bfloat16 keeps 8 bits of mantissa (relative rounding 2^-9 ~ 0.2% per op); over
two layers of a tiny model the logits (|z| <= ~2.5) differ from float32 by ~0.03 at most and
the per-token log-probs by ~0.035 nats, the loss of one step by 3e-4 relative, its LoRA
gradients point the same way (cosine 0.9998) and Adam's first update of B nearly so (cosine
0.97, Adam's normalised step amplifies the sign of tiny gradient entries): all measured.
The bounds below leave a margin of about 3x (5x for the loss).
"""
import pytest
import torch

from cai.pm import rewards
from engine import Engine, SamplingParams, lora
from engine.batch import pack
from engine.lora import LoraConfig
from engine.scoring import ScalarHead, hidden_states, sequence_logprobs, token_logprobs
from engine.train import OptimConfig, Trainer

LOGIT_ATOL, LOGPROB_ATOL, LOSS_RTOL = 0.08, 0.1, 2e-3


@pytest.fixture(scope="module")
def pair(tiny_model_dir):
    folder = tiny_model_dir("llama")
    return Engine.load(folder, device="cpu", dtype="float32"), Engine.load(folder, device="cpu", dtype="bfloat16")


def batch():
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 380, (n,), generator=g).tolist() for n in (17, 5, 30)]
    return pack(seqs, device="cpu")


def test_bf16_logits_and_logprobs_match_float32(pair):
    e32, e16 = pair
    b = batch()
    with torch.no_grad():
        l32, l16 = (e.model.logits(hidden_states(e.model, b)) for e in pair)
        lp32, lp16 = (token_logprobs(e.model, b) for e in pair)
        seq16 = sequence_logprobs(e16.model, b)
    assert l16.dtype is torch.bfloat16
    assert (l16.float() - l32).abs().max() < LOGIT_ATOL
    assert lp16.dtype is torch.float32 and seq16.dtype is torch.float32
    assert (lp16 - lp32).abs().max() < LOGPROB_ATOL
    assert (l16.argmax(-1) == l32.argmax(-1)).float().mean() > 0.9


def test_bf16_generation_keeps_float32_logprobs(pair):
    _, e16 = pair
    out = e16.generate(["Hello"], SamplingParams(max_new_tokens=4, temperature=0))[0].samples[0]
    assert len(out.token_ids) == 4 and all(lp <= 0 for lp in out.logprobs)


def _sft_step(eng):
    """One AdamW step of a fresh LoRA adapter (same seed in both dtypes) on a packed batch."""
    model = eng.model
    ad = lora.add_adapter(model, "p", LoraConfig(rank=4, alpha=8, dropout=0.0), seed=3)
    try:
        for p in ad.parameters():
            p.requires_grad_(True)
        trainer = Trainer(ad.parameters(), OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"))
        b = batch()
        with lora.use_adapter(model, "p"):
            loss = -token_logprobs(model, b).sum() / b.num_targets
            trainer.backward(loss)
            grads = {k: p.grad.clone() for k, p in ad.named_parameters()}
            trainer.apply()
        state = [s for s in trainer.optimizer.state.values()]
        return loss, grads, {k: p.detach().clone() for k, p in ad.named_parameters()}, state
    finally:
        lora.remove_adapter(model, "p")


def test_bf16_training_step_matches_float32_and_accumulates_in_float32(pair):
    (l32, g32, w32, _), (l16, g16, w16, st16) = (_sft_step(e) for e in pair)
    assert l16.dtype is torch.float32
    assert abs(l16.item() - l32.item()) < LOSS_RTOL * abs(l32.item())
    for k in g32:
        assert g16[k].dtype is torch.float32 and w16[k].dtype is torch.float32, k  # LoRA masters
        if ".A" in k:  # B = 0 at the start, so no gradient reaches A on the first step
            assert not g16[k].any() and not g32[k].any(), k
            continue
        cos = torch.nn.functional.cosine_similarity(g16[k].flatten(), g32[k].flatten(), dim=0)
        assert cos > 0.995, (k, float(cos))
    assert st16 and all(s["exp_avg"].dtype is torch.float32 and s["exp_avg_sq"].dtype is torch.float32 for s in st16)
    moved = [k for k in w16 if ".B." in k]
    for k in moved:  # B starts at zero: the whole step is the update, in the same direction
        cos = torch.nn.functional.cosine_similarity(w16[k].flatten(), w32[k].flatten(), dim=0)
        assert cos > 0.9, (k, float(cos))


def test_heads_score_in_float32_on_bf16_hidden_states(pair):
    e32, e16 = pair
    b = batch()
    head = ScalarHead(e16.cfg.hidden_size, device=e16.device)
    assert head.proj.weight.dtype is torch.float32
    with torch.no_grad():
        r16, r32 = rewards(e16.model, head, b), rewards(e32.model, head, b)
        v16 = head(hidden_states(e16.model, b))
    assert r16.dtype is torch.float32 and v16.dtype is torch.float32
    assert (r16 - r32).abs().max() < LOGIT_ATOL
