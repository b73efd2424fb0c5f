"""Preference model: reading pairs, the Bradley-Terry loss with soft labels by hand, training
on tiny data, calibration, export/load, the scorer's adapter hygiene, resume, the CLI."""
import argparse
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cai import pm_cmd
from cai.config import config_from_args
from cai.pairs import encode_pairs, read_pairs, split_heldout
from cai.pm import PMConfig, calibration, load_reward_model, new_head, rewards, train_pm
from engine import Engine, lora
from engine.batch import pack
from engine.errors import InputError
from engine.lora import LoraConfig
from engine.train import OptimConfig

PAIRS = Path(__file__).parent / "fixtures" / "prefs" / "pairs.jsonl"
BASE_KEYS = ("embed", "layers.0.attn.qkv.weight", "layers.1.mlp.down.weight", "norm")


def config(**kw) -> PMConfig:
    base = dict(epochs=8, max_tokens_per_batch=100_000, heldout_fraction=0.25, shuffle=False,
                lora=LoraConfig(rank=4, alpha=8), optim=OptimConfig(lr=5e-3, warmup_steps=0, schedule="constant"))
    return PMConfig(**{**base, **kw})


def base_weights(eng) -> dict:
    sd = eng.model.state_dict()
    return {k: sd[k].clone() for k in BASE_KEYS}


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One PM run shared by the checks below: (engine, summary, out, base weights before)."""
    eng = Engine.load(tiny_model_dir("llama"))
    before = base_weights(eng)
    out = tmp_path_factory.mktemp("pm")
    summary = train_pm(eng, read_pairs(PAIRS)[:16], config(), out)
    return eng, summary, out, before


def test_reads_pairs_and_transcripts():
    pairs = read_pairs(PAIRS)
    assert len(pairs) == 24 and all(0.5 <= p.p_chosen <= 1 for p in pairs)
    assert [m["role"] for m in pairs[5].prompt] == ["user", "assistant", "user"]
    assert pairs[5].prompt[1]["content"] == "Hello." and pairs[5].where == f"{PAIRS}:6"


def test_message_list_answers_and_hard_default(tmp_path):
    f = tmp_path / "hh.jsonl"
    conv = [{"role": "user", "content": "Hi?"}]
    f.write_text(json.dumps({"chosen": conv + [{"role": "assistant", "content": "Hello."}],
                             "rejected": conv + [{"role": "assistant", "content": "Go away."}]}) + "\n")
    (p,) = read_pairs(f)
    assert (p.prompt, p.chosen, p.rejected, p.p_chosen) == (conv, "Hello.", "Go away.", 1.0)


def test_conversation_field_wins_over_the_prompt(tmp_path):
    """``cai label`` records: ``prompt`` is for reading, ``conversation`` is what PPO scores."""
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And now?"}]
    f = tmp_path / "labels.jsonl"
    f.write_text(json.dumps({"prompt": "And now?", "conversation": conv, "chosen": "Now.", "rejected": "Later."}) + "\n")
    (p,) = read_pairs(f)
    assert p.prompt == conv
    f.write_text(json.dumps({"prompt": "p", "conversation": [{"role": "robot", "content": "x"}],
                             "chosen": "c", "rejected": "r"}) + "\n")
    with pytest.raises(InputError, match=r"labels.jsonl:1: conversation must be"):
        read_pairs(f)


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "p", "rejected": "r", "p_chosen": 0.7}', "missing field.*chosen"),
    ('{"chosen": "c", "rejected": "r"}', "missing field prompt"),
    ('{"prompt": "p", "chosen": "c", "rejected": "r", "p_chosen": 1.5}', r"p_chosen must be a number in \[0, 1\]"),
    ('{"prompt": "p", "chosen": "c", "rejected": "r", "p_chosen": "high"}', "p_chosen must be a number"),
    ('{"prompt": "p", "chosen": 3, "rejected": "r"}', "chosen must be a string"),
    ("{oops", "not valid JSON"),
])
def test_bad_files_name_file_and_line(tmp_path, line, message):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "p", "chosen": "c", "rejected": "r", "p_chosen": 0.8}\n' + line + "\n")
    with pytest.raises(InputError, match=rf"bad.jsonl:2: .*{message}"):
        read_pairs(f)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(InputError, match="empty.jsonl: no records"):
        read_pairs(tmp_path / "empty.jsonl")
    with pytest.raises(InputError, match="no such file"):
        read_pairs(tmp_path / "nope.jsonl")


def test_heldout_split_is_seeded_and_disjoint():
    train, held = split_heldout(24, 0.25, seed=3)
    assert len(held) == 6 and not set(train) & set(held) and sorted(train + held) == list(range(24))
    assert split_heldout(24, 0.25, seed=3) == (train, held) and split_heldout(1, 0.5, 0) == ([0], [])


def test_soft_label_loss_matches_the_formula(tiny_model_dir):
    """Step 1's loss is the soft BT loss of the initial scores (B = 0: the adapter adds
    nothing yet, whatever its dropout), recomputed here by hand on the bare base."""
    pairs = read_pairs(PAIRS)[:6]
    eng, losses = Engine.load(tiny_model_dir("llama")), {}
    for soft in (True, False):
        losses[soft] = train_pm(eng, pairs, config(heldout_fraction=0.0, soft_labels=soft, max_steps=1))["losses"][0]
        lora.remove_adapter(eng.model, "reward")
    enc = encode_pairs(eng, pairs)
    with torch.no_grad():
        r = rewards(eng.model, new_head(eng.model, 0), pack([s for e in enc for s in (e.chosen, e.rejected)])).double()
    m, p = r[0::2] - r[1::2], torch.tensor([x.p_chosen for x in pairs], dtype=torch.float64)
    soft = -(p * F.logsigmoid(m) + (1 - p) * F.logsigmoid(-m)).mean()
    assert losses[True] == pytest.approx(float(soft), rel=1e-5)
    assert losses[False] == pytest.approx(float(-F.logsigmoid(m).mean()), rel=1e-5)
    assert abs(losses[True] - losses[False]) > 1e-4


def test_training_lowers_the_loss_and_beats_chance(trained):
    _, summary, out, _ = trained
    # soft labels: the loss cannot fall below the labels' mean entropy; its excess must shrink
    pairs = read_pairs(PAIRS)[:16]
    train, _ = split_heldout(len(pairs), 0.25, 0)
    floor = sum(-(p * math.log(p) + (1 - p) * math.log1p(-p)) if p < 1 else 0.0
                for p in (pairs[i].p_chosen for i in train)) / len(train)
    excess = [loss - floor for loss in summary["losses"]]
    assert len(excess) == 8 and 0 < excess[-1] < 0.6 * excess[0]
    held = summary["heldout"]
    assert held["pairs"] == 4 and held["accuracy"] > 0.5 and held["mean_margin"] > 0
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 9))
    assert {"loss", "accuracy", "margin", "reward_chosen", "reward_rejected", "lr", "grad_norm"} <= set(lines[0])
    report = json.loads((out / "eval.json").read_text())
    assert sum(row["count"] for row in report["reliability"]) == 4 and 0 <= report["ece"] <= 1


def test_base_weights_stay_bit_identical(trained):
    eng, _, _, before = trained
    after = base_weights(eng)
    assert all(torch.equal(before[k], after[k]) for k in BASE_KEYS)
    assert not any(p.requires_grad for p in eng.model.parameters())


def test_exported_model_scores_like_the_trained_one(trained, tiny_model_dir):
    eng, _, out, before = trained
    pairs = read_pairs(PAIRS)[:5]
    prompts, answers = [p.prompt for p in pairs], [p.chosen for p in pairs]
    rm = load_reward_model(eng, out / "reward")  # replaces the in-process "reward" adapter
    fresh = load_reward_model(Engine.load(tiny_model_dir("llama")), out / "reward")
    lora.add_adapter(eng.model, "other", seed=1)
    with lora.use_adapter(eng.model, "other"):
        got = rm.score(prompts, answers)
        assert lora.active_adapter(eng.model) == "other"  # the scorer restored it
    lora.remove_adapter(eng.model, "other")
    assert got.shape == (5,) and got.dtype == torch.float32 and not got.is_inference()
    torch.testing.assert_close(got, fresh.score(prompts, answers), rtol=1e-5, atol=1e-5)
    one_by_one = torch.cat([fresh.score_packed(pack([fresh.encode(p, a)])) for p, a in zip(prompts, answers)])
    torch.testing.assert_close(got, one_by_one, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(before[k], base_weights(eng)[k]) for k in BASE_KEYS)


def test_calibration_by_hand():
    rc, rr = torch.tensor([2.0, 0.0, -1.0, 0.5]), torch.tensor([0.0, 0.1, 0.0, 0.5])
    p = torch.tensor([0.9, 0.7, 1.0, 0.6])
    rep = calibration(rc, rr, p, bins=5)
    q = torch.sigmoid((rc - rr).double())
    assert rep["accuracy"] == 0.25  # only pair 0 has the margin's sign right; a tie counts wrong
    assert rep["brier"] == pytest.approx(float(((q - 1) ** 2).mean()))
    assert rep["brier_soft"] == pytest.approx(float(((q - p.double()) ** 2).mean()))
    conf = [float(torch.sigmoid(torch.tensor(abs(x), dtype=torch.float64))) for x in (2.0, -0.1, -1.0, 0.0)]
    rows = {k: r for k, r in enumerate(rep["reliability"]) if r["count"]}
    assert {k: r["count"] for k, r in rows.items()} == {0: 2, 2: 1, 3: 1}  # conf .5 .52 | .73 | .88
    assert rows[0]["observed"] == 0.0 and rows[3]["observed"] == 1.0
    assert rows[0]["soft_label"] == pytest.approx((0.3 + 0.6) / 2)  # the predicted winner's label
    ece = (2 * abs((conf[1] + conf[3]) / 2 - 0) + abs(conf[2] - 0) + abs(conf[0] - 1)) / 4
    assert rep["ece"] == pytest.approx(ece)
    assert math.isclose(sum(r["count"] for r in rep["reliability"]), 4)


def test_resume_repeats_the_uninterrupted_run(tiny_model_dir, tmp_path):
    pairs = read_pairs(PAIRS)[:4]  # one pair per batch: 4 steps an epoch, resumed inside epoch 0
    cfg = dict(epochs=2, max_tokens_per_batch=200, shuffle=True, checkpoint_every=1, heldout_fraction=0.0,
               lora=LoraConfig(rank=4, alpha=8, dropout=0.1))  # dropout: the RNG must resume too
    full = train_pm(Engine.load(tiny_model_dir("llama")), pairs, config(**cfg), tmp_path / "a")["losses"]
    assert len(full) == 8
    train_pm(Engine.load(tiny_model_dir("llama")), pairs, config(**cfg, max_steps=3), tmp_path / "b")
    rest = train_pm(Engine.load(tiny_model_dir("llama")), pairs, config(**cfg), tmp_path / "b")["losses"]
    assert rest == pytest.approx(full[3:], rel=1e-5)
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(full) + 1))


def parse(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    pm_cmd.register(sub)
    assert "--lora-rank" in sub.choices["pm"].format_help()
    return parser.parse_args(["pm", *argv])


def test_cli_trains_and_rejects_bad_files(tiny_model_dir, tmp_path, capsys):
    args = parse(["--data", str(PAIRS), "--out", str(tmp_path / "o"), "--model", str(tiny_model_dir("llama")),
                  "--lora-rank", "2", "--lr", "1e-3", "--max-steps", "2", "--max-tokens-per-batch", "800", "--no-soft-labels", "--no-progress",
                  "--lora-targets", "q,v"])
    cfg = config_from_args(PMConfig, args)
    assert (cfg.lora.rank, cfg.lora.targets, cfg.optim.lr, cfg.soft_labels, cfg.heldout_fraction) == (2, ("q", "v"), 1e-3, False, 0.1)
    assert pm_cmd.run(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps"] == 2 and result["heldout"]["pairs"] == 2
    assert (tmp_path / "o" / "reward" / "reward_head.safetensors").is_file()
    (tmp_path / "bad.jsonl").write_text('{"prompt": "p", "chosen": "c", "rejected": "r", "p_chosen": -0.1}\n')
    with pytest.raises(InputError, match="bad.jsonl:1: p_chosen"):
        pm_cmd.run(parse(["--data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "x")]))
    with pytest.raises(InputError, match="--lora-dropout: must be in"):
        config_from_args(PMConfig, parse(["--data", "d", "--out", "o", "--lora-dropout", "1.5"]))
