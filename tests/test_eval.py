"""Evaluation: the Elo fit and win rates on known results, prompt selection, principle
checks, and a whole evaluation of two checkpoints on the tiny model (with resume)."""
import json
import math

import pytest
import torch

from cai.constitution import load_constitution
from cai.eval import ASPECT, EvalConfig, _p_better, evaluate, fit_elo, principle_pool, spread, win_rate
from cai.eval_cmd import parse_pairs, summary_table
from cai.prompts import PromptRecord
from engine import Engine, InputError, lora


def elo_gap(p: float) -> float:
    return 400 * math.log10(p / (1 - p))


# ---------------------------------------------------------------- Elo and win rates

def test_elo_two_players_soft_outcome():
    games = [("A", "B", 0.76)] * 50
    elo = fit_elo(["B", "A"], games)
    assert elo["B"] == 0.0
    assert elo["A"] == pytest.approx(elo_gap(0.76), abs=0.5)  # about 200
    assert elo_gap(0.76) == pytest.approx(200.0, abs=1.0)


def test_elo_order_of_games_and_sides_does_not_matter():
    games = [("A", "B", 0.7)] * 10 + [("B", "A", 0.3)] * 10
    elo = fit_elo(["A", "B"], games, anchor="B")
    assert elo["A"] == pytest.approx(elo_gap(0.7), abs=0.5)


def test_elo_three_players_consistent_odds():
    # strengths 0, 100, 250 Elo: every pair's outcome is the Bradley-Terry probability
    true = {"initial": 0.0, "sl": 100.0, "rl": 250.0}
    p = lambda x, y: 1 / (1 + 10 ** ((true[y] - true[x]) / 400))  # noqa: E731
    games = [(x, y, p(x, y)) for x, y in (("initial", "sl"), ("initial", "rl"), ("sl", "rl"))] * 30
    elo = fit_elo(list(true), games, anchor="initial", prior=1e-6)
    for name, value in true.items():
        assert elo[name] == pytest.approx(value, abs=0.1)


def test_elo_symmetric_results_are_equal_and_sweeps_stay_finite():
    elo = fit_elo(["a", "b", "c"], [("a", "b", 0.5), ("b", "c", 0.5), ("c", "a", 0.5)] * 4)
    assert all(v == pytest.approx(0.0, abs=1e-9) for v in elo.values())
    sweep = fit_elo(["a", "b"], [("b", "a", 1.0)] * 20)  # b always wins: the prior keeps it finite
    assert math.isfinite(sweep["b"]) and sweep["b"] > 800
    assert fit_elo(["solo"], []) == {"solo": 0.0}
    with pytest.raises(ValueError):
        fit_elo(["a", "b"], [("a", "b", 1.5)])


def test_win_rates_from_known_probabilities():
    wr = win_rate([0.9, 0.6, 0.5, 0.2])
    assert wr["win_rate"] == pytest.approx(0.55)
    assert wr["frac_above_half"] == pytest.approx(0.5)  # 0.5 is not a win
    assert wr["n"] == 4
    assert win_rate([]) == {"win_rate": None, "frac_above_half": None, "n": 0}
    games = [("initial", "sl", 0.2), ("sl", "initial", 0.9), ("initial", "rl", 0.4)]
    assert _p_better(games, "sl", "initial") == pytest.approx([0.8, 0.9])


# ---------------------------------------------------------------- prompts, principles, flags

def test_spread_covers_every_category_in_file_order():
    ps = [PromptRecord(f"{c}{k}", "q", None, c) for c in "abc" for k in range(3)]
    assert [p.id for p in spread(ps, 4)] == ["a0", "a1", "b0", "c0"]
    assert spread(ps, 0) == ps and spread(ps, 100) == ps


def test_principle_ids_are_checked():
    con = load_constitution("default")
    assert [p.id for p in principle_pool(con, "honesty, least_harmful", "helpfulness")] == ["honesty", "least_harmful"]
    with pytest.raises(InputError, match="no principle 'nope'"):
        principle_pool(con, "least_harmful, nope", "harmlessness")


def test_eval_judges_each_set_by_the_principles_labelling_uses():
    """By default the constitution's tags pick the pools, the same split ``cai label`` draws
    from for red-team and benign prompts: no "less harmful" question on a benign pair."""
    from cai.label import BUILTIN_ASPECT, draw_label_principles

    con, cfg = load_constitution("default"), EvalConfig()
    for set_name, aspect in ASPECT.items():
        pool = principle_pool(con, getattr(cfg, f"{aspect}_principles"), aspect)
        assert pool == con.principles_for(BUILTIN_ASPECT[set_name])
        assert {p.id for p in draw_label_principles(con, 0, "x", 99, BUILTIN_ASPECT[set_name])} == {p.id for p in pool}
    benign = {p.id for p in principle_pool(con, cfg.helpfulness_principles, "helpfulness")}
    assert "least_harmful" not in benign and "benign_helpfulness" in benign


def test_checkpoint_flags():
    assert parse_pairs(["initial=", "sl-cai=run/sft/adapter"], "checkpoint") == {"initial": None,
                                                                              "sl-cai": "run/sft/adapter"}
    with pytest.raises(InputError):
        parse_pairs(["sl-cai"], "checkpoint")
    with pytest.raises(InputError):
        parse_pairs(["a=x", "a=y"], "checkpoint")


# ---------------------------------------------------------------- end to end on the tiny model

def _metrics(tmp_path):
    sft, pm, ppo = (tmp_path / d for d in ("sft", "pm", "ppo"))
    for d in (sft, pm, ppo):
        d.mkdir()
    (sft / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 2 - s / 10}) + "\n" for s in range(1, 6)))
    (ppo / "metrics.jsonl").write_text("".join(
        json.dumps({"iteration": i, "reward_mean": i / 5, "kl": i / 50, "entropy": 2 - i / 10}) + "\n"
        for i in range(1, 4)))
    return {"sft": str(sft), "pm": str(pm / "metrics.jsonl"), "ppo": str(ppo / "metrics.jsonl")}


def test_evaluate_end_to_end_on_tiny_model(tiny_model_dir, tmp_path):
    eng = Engine.load(tiny_model_dir("llama"), max_slots=8)  # our own: adapters get attached
    ad = lora.add_adapter(eng.model, "play", lora.LoraConfig(rank=4, alpha=8), seed=0)
    with torch.no_grad():
        for p in ad.parameters():
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    lora.save_adapter(eng.model, "play", tmp_path / "sl-adapter")
    lora.remove_adapter(eng.model, "play")
    checkpoints = {"initial": None, "sl-cai": str(tmp_path / "sl-adapter")}
    cfg = EvalConfig(limit=2, max_new_tokens=6, principles_per_comparison=1, max_fewshot=0, samples=2)
    out = tmp_path / "eval"

    res = evaluate(eng, checkpoints, cfg, out, training_metrics=_metrics(tmp_path))

    for name in ("report.md", "elo.png", "training_curves.png", "eval.json", "responses.jsonl"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "eval.json").read_text())
    assert [r["checkpoint"] for r in saved["summary"]] == ["initial", "sl-cai"]
    assert saved["baseline"] == "initial"
    initial, row = saved["summary"]
    for key in ("refusal_rate", "over_refusal_rate", "harmlessness_win_rate", "helpfulness_win_rate",
                "harmlessness_win_frac", "helpfulness_win_frac", "harmlessness_elo", "helpfulness_elo"):
        assert key in row
    assert 0 <= row["harmlessness_win_rate"] <= 1 and 0 <= row["helpfulness_win_rate"] <= 1
    assert initial["harmlessness_elo"] == 0.0 and initial["harmlessness_win_rate"] is None
    assert saved["prompts"] == {"redteam": 2, "benign": 2}
    assert saved["training_panels"] == ["SFT loss", "PPO reward", "PPO KL", "PPO entropy"]
    assert any(n.startswith("pm: no file") for n in saved["training_notes"])
    assert res["summary"] == saved["summary"]
    # helpfulness Elo agrees with its win rate: above 0.5 means above the baseline
    assert (row["helpfulness_elo"] > 0) == (row["helpfulness_win_rate"] > 0.5)

    report = (out / "report.md").read_text()
    assert "| checkpoint | refusal rate" in report and "| sl-cai |" in report
    assert "Refusal rate by red-team category" in report and "## Samples" in report
    assert "pm: no file" in report
    lines = (out / "responses.jsonl").read_text().splitlines()
    assert len(lines) == 2 * (2 + 2)
    assert lora.adapters(eng.model) == {} and lora.active_adapter(eng.model) is None

    # a rerun answers and judges nothing again; a new checkpoint adds only its own work
    before = (out / "judgments.jsonl").read_text()
    again = evaluate(eng, checkpoints, cfg, out)
    assert (out / "judgments.jsonl").read_text() == before and again["summary"] == res["summary"]
    assert again["plots"]["training_curves"] is None and not (out / "training_curves.png").exists()
    evaluate(eng, {**checkpoints, "rl-cai": str(tmp_path / "sl-adapter")}, cfg, out)
    assert len((out / "responses.jsonl").read_text().splitlines()) == 3 * 4
    assert len((out / "judgments.jsonl").read_text().splitlines()) == 3 * 4  # 3 pairs x 4 prompts
    with pytest.raises(InputError, match="come from"):
        evaluate(eng, {"initial": None, "sl-cai": None}, cfg, out)
    text = summary_table(again)
    assert text.splitlines()[0].startswith("checkpoint") and "sl-cai" in text


def test_training_panels_from_dpo_and_pm_eval(tmp_path):
    from cai.report import plot_training, read_training_metrics

    (tmp_path / "pm.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.7 - s / 20}) + "\n" for s in (1, 2)))
    (tmp_path / "held.json").write_text(json.dumps({"pairs": 8, "accuracy": 0.75}))
    (tmp_path / "dpo.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 0.6, "accuracy": 0.5 + s / 10}) + "\n" for s in (1, 2, 3)))
    series, notes = read_training_metrics({"pm": str(tmp_path / "pm.jsonl"), "pm_eval": str(tmp_path / "held.json"),
                                           "dpo": str(tmp_path / "dpo.jsonl")})
    assert notes == ["sft: no metrics given"]  # RL is DPO here, so no PPO note
    assert series["pm"]["eval"]["accuracy"] == 0.75
    drawn = plot_training(series, tmp_path / "curves.png")
    assert drawn == ["PM loss", "DPO loss", "DPO accuracy", "PM accuracy"]
    assert (tmp_path / "curves.png").stat().st_size > 0
