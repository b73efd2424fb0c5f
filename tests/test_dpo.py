"""DPO: the reference log-probs computed once and right, the start at log 2, the loss falling
on tiny data, soft labels and label smoothing by hand, base and SFT weights untouched,
resume, exports and the CLI."""
import argparse
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cai.dpo
from cai import dpo_cmd
from cai.config import config_from_args
from cai.dpo import DPOConfig, train_dpo
from cai.pairs import encode_pairs, read_pairs
from engine import Engine, lora
from engine.batch import pack
from engine.errors import InputError
from engine.lora import LoraConfig
from engine.scoring import sequence_logprobs
from engine.train import OptimConfig

PAIRS = Path(__file__).parent / "fixtures" / "prefs" / "pairs.jsonl"


def config(**kw) -> DPOConfig:
    base = dict(epochs=6, max_tokens_per_batch=100_000, shuffle=False, beta=0.5,
                optim=OptimConfig(lr=5e-3, warmup_steps=0, schedule="constant"))
    return DPOConfig(**{**base, **kw})


def engine_with_sft(tiny_model_dir) -> Engine:
    eng = Engine.load(tiny_model_dir("llama"))
    sft = lora.add_adapter(eng.model, "sft", LoraConfig(rank=4, alpha=8), seed=1)
    with torch.no_grad():  # a non-identity SFT adapter, so the reference is not the bare base
        for _, _, piece in sft.pieces():
            for b in piece.B.values():
                b.normal_(0, 0.02, generator=torch.Generator().manual_seed(b.numel()))
    return eng


def logprobs_one_by_one(eng, pairs, adapter) -> torch.Tensor:
    """[N, 2] summed response log-probs, each sequence in a forward of its own."""
    rows = []
    with lora.use_adapter(eng.model, adapter), torch.no_grad():
        for e in encode_pairs(eng, pairs):
            rows.append([float(sequence_logprobs(eng.model, pack([s], [m]))) for s, m in
                         ((e.chosen, e.chosen_mask), (e.rejected, e.rejected_mask))])
    return torch.tensor(rows)


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """One DPO run from an SFT adapter: (engine, pairs, summary, out, weights before, the
    reference log-probs as computed and a copy taken then, number of computations)."""
    eng = engine_with_sft(tiny_model_dir)
    pairs = read_pairs(PAIRS)[:8]
    before = {k: v.clone() for k, v in eng.model.state_dict().items() if k in ("embed", "layers.1.attn.qkv.weight")}
    before.update({f"sft.{k}": v.clone() for k, v in lora.get_adapter(eng.model, "sft").state_dict().items()})
    calls, real = [], cai.dpo.reference_logprobs

    def counting(*args, **kw):
        out = real(*args, **kw)
        calls.append((out, out.clone()))
        return out

    cai.dpo.reference_logprobs = counting
    try:
        out = tmp_path_factory.mktemp("dpo")
        summary = train_dpo(eng, pairs, config(soft_labels=False), "sft", out)
    finally:
        cai.dpo.reference_logprobs = real
    return eng, pairs, summary, out, before, calls


def test_reference_is_computed_once_and_right(run):
    eng, pairs, _, _, _, calls = run
    assert len(calls) == 1
    ref, at_the_time = calls[0]
    assert torch.equal(ref, at_the_time)  # never written during training
    torch.testing.assert_close(ref, logprobs_one_by_one(eng, pairs, "sft"), rtol=1e-4, atol=1e-4)


def test_starts_at_log2_and_the_loss_falls(run):
    _, _, summary, out, _, _ = run
    losses = summary["losses"]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # the policy starts as the reference
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 7))
    last = lines[-1]
    assert last["margin"] > 0 and last["reward_chosen"] > last["reward_rejected"] and last["accuracy"] > 0.5
    assert last["margin"] == pytest.approx(last["reward_chosen"] - last["reward_rejected"], abs=1e-5)


def test_base_and_sft_weights_are_untouched(run):
    eng, _, _, _, before, _ = run
    now = {**eng.model.state_dict(), **{f"sft.{k}": v for k, v in lora.get_adapter(eng.model, "sft").state_dict().items()}}
    assert all(torch.equal(v, now[k]) for k, v in before.items())
    assert lora.active_adapter(eng.model) is None
    assert not any(p.requires_grad for p in lora.get_adapter(eng.model, "policy").parameters())


def test_exports(run, tiny_model_dir):
    eng, pairs, _, out, _, _ = run
    assert (out / "peft" / "adapter_model.safetensors").is_file()
    fresh = Engine.load(tiny_model_dir("llama"))
    lora.load_adapter(fresh.model, "policy", out / "policy")
    torch.testing.assert_close(logprobs_one_by_one(fresh, pairs[:2], "policy"),
                               logprobs_one_by_one(eng, pairs[:2], "policy"), rtol=1e-5, atol=1e-5)


def test_resume_and_soft_labels_by_hand(tiny_model_dir, tmp_path):
    """Uninterrupted vs stopped after step 1 and resumed: the same later losses. Step 2's
    loss is also recomputed by hand from the policy left after step 1."""
    pairs = read_pairs(PAIRS)[:4]
    cfg = dict(epochs=3, label_smoothing=0.1)
    full = train_dpo(engine_with_sft(tiny_model_dir), pairs, config(**cfg), "sft", tmp_path / "a")["losses"]
    eng = engine_with_sft(tiny_model_dir)
    train_dpo(eng, pairs, config(**cfg, max_steps=1), "sft", tmp_path / "b")
    pol, ref = logprobs_one_by_one(eng, pairs, "policy").double(), logprobs_one_by_one(eng, pairs, "sft").double()
    m = 0.5 * ((pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1]))
    p = torch.tensor([x.p_chosen for x in pairs], dtype=torch.float64)
    p = 0.9 * p + 0.1 * (1 - p)
    by_hand = float(-(p * F.logsigmoid(m) + (1 - p) * F.logsigmoid(-m)).mean())
    rest = train_dpo(engine_with_sft(tiny_model_dir), pairs, config(**cfg), "sft", tmp_path / "b")["losses"]
    assert rest == pytest.approx(full[1:], rel=1e-5)
    assert full[1] == pytest.approx(by_hand, rel=1e-4)
    hard = float(-(0.9 * F.logsigmoid(m) + 0.1 * F.logsigmoid(-m)).mean())
    assert abs(by_hand - hard) > 1e-4  # the soft labels matter


def test_without_sft_the_base_is_the_reference(tiny_model_dir):
    eng = Engine.load(tiny_model_dir("llama"))
    pairs = read_pairs(PAIRS)[:3]
    summary = train_dpo(eng, pairs, config(epochs=2, lora=LoraConfig(rank=2, alpha=4)), None)
    assert summary["losses"][0] == pytest.approx(math.log(2), abs=1e-5)
    with pytest.raises(InputError, match="already has an adapter 'policy'"):
        train_dpo(eng, pairs, config(), None)
    with pytest.raises(InputError, match="no adapter 'sft'"):
        train_dpo(eng, pairs, config(adapter="policy2"), "sft")


def test_config_is_checked():
    with pytest.raises(InputError, match="beta"):
        DPOConfig(beta=0)
    with pytest.raises(InputError, match="label_smoothing"):
        DPOConfig(label_smoothing=0.5)


def parse(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    dpo_cmd.register(sub)
    assert "--label-smoothing" in sub.choices["dpo"].format_help()
    return parser.parse_args(["dpo", *argv])


def test_cli(tiny_model_dir, tmp_path, capsys):
    eng = engine_with_sft(tiny_model_dir)
    lora.save_adapter(eng.model, "sft", tmp_path / "sft")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(ln + "\n" for ln in PAIRS.read_text().splitlines()[:3]))
    args = parse(["--data", str(data), "--out", str(tmp_path / "o"), "--model", str(tiny_model_dir("llama")),
                  "--sft-adapter", str(tmp_path / "sft"), "--beta", "0.2", "--max-steps", "1", "--no-progress"])
    cfg = config_from_args(DPOConfig, args)
    assert (cfg.beta, cfg.optim.lr, cfg.lora.rank, cfg.soft_labels) == (0.2, 5e-5, 16, True)
    assert dpo_cmd.run(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 1
    assert (tmp_path / "o" / "policy" / "adapter.safetensors").is_file()
    data.write_text('{"prompt": "p", "chosen": "c"}\n')
    with pytest.raises(InputError, match="d.jsonl:1: missing field"):
        dpo_cmd.run(parse(["--data", str(data), "--out", str(tmp_path / "x")]))
