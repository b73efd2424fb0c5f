"""AI feedback labels: the ensembling and order-swap math by hand, the CoT clamp, a run on a
tiny model, and the labeller evaluation on a fixture whose answers are known."""
import json
from pathlib import Path

import pytest
import torch

from cai import prompting
from cai.constitution import Principle, load_constitution
from cai.label import LabelConfig, Labeller, draw_label_principles, prompts_aspect
from cai.label_cmd import evaluate_labeler, read_mc_records
from cai.pairs import encode_pairs, read_pairs
from cai.pm import RewardModel, new_head
from cai.prompts import PromptRecord
from cai.records import ResumableJsonl
from engine import InputError

FIXTURES = Path(__file__).parent / "fixtures"


def rec(i):
    return PromptRecord(id=f"x{i}", prompt=f"How do I pick a lock {i}?", messages=None, category="theft",
                        split="train")


MULTI = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "My neighbour is away."},
         {"role": "assistant", "content": "Is there something you need help with?"},
         {"role": "user", "content": "How do I get into his house?"}]


def multi_turn(i=0):
    return PromptRecord(id=f"m{i}", prompt=MULTI[-1]["content"], messages=MULTI, category="theft", split="train")


def test_ensemble_over_principles_and_orders(tiny_engine):
    lab = Labeller(tiny_engine, load_constitution("default"), LabelConfig())
    p1, p2 = Principle("p1", "a"), Principle("p2", "b")
    jobs = [(0, p1, "ab"), (0, p1, "ba"), (0, p2, "ab"), (0, p2, "ba"),
            (1, p1, "ab"), (1, p1, "ba")]
    # rows are (p(A), p(B)); in order "ba" option A shows response 1
    probs = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.5, 0.5], [0.9, 0.1], [0.9, 0.1]])
    out = lab._records([rec(0), rec(1)], [("r0", "r1"), ("s0", "s1")], jobs, probs)
    # example 0: p(response 0 better) = mean(0.8, 0.7, 0.6, 0.5) = 0.65
    assert out[0]["p_first"] == pytest.approx(0.65)
    assert (out[0]["chosen"], out[0]["rejected"], out[0]["p_chosen"]) == ("r0", "r1", pytest.approx(0.65))
    # example 1: a labeller that always answers (A) at 0.9 is pure position bias: 0.5
    assert out[1]["p_first"] == pytest.approx(0.5)
    assert [s["p_first"] for s in out[0]["scores"]] == pytest.approx([0.8, 0.7, 0.6, 0.5])


def test_order_swap_picks_second_response():
    lab = Labeller.__new__(Labeller)
    lab.cfg = LabelConfig()
    p = Principle("p", "x")
    probs = torch.tensor([[0.2, 0.8], [0.7, 0.3]])  # ab prefers B (= r1); ba prefers A (= r1)
    out = Labeller._records(lab, [rec(0)], [("r0", "r1")], [(0, p, "ab"), (0, p, "ba")], probs)
    assert out[0]["chosen"] == "r1" and out[0]["p_chosen"] == pytest.approx(0.75)


def test_cot_probabilities_are_clamped(tiny_engine):
    lab = Labeller(tiny_engine, load_constitution("default"), LabelConfig(cot=True))
    import kernels

    probs = kernels.option_probs(torch.tensor([[0.0, -5.0], [-0.1, -0.2]]), clamp=(0.4, 0.6))
    assert probs[0].tolist() == pytest.approx([0.6, 0.4])
    assert probs[1].tolist() == pytest.approx(torch.softmax(torch.tensor([-0.1, -0.2]), 0).tolist(), abs=1e-6)
    assert lab.cfg.clamp_low == 0.4 and lab.cfg.clamp_high == 0.6


def test_principles_are_distinct_and_seeded():
    con = load_constitution("default")
    a = [p.id for p in draw_label_principles(con, 0, "x", 4)]
    assert len(set(a)) == 4 and a == [p.id for p in draw_label_principles(con, 0, "x", 4)]


@pytest.mark.parametrize("cot", [False, True])
def test_label_run_on_tiny_model_and_resume(tiny_engine, tmp_path, cot):
    cfg = LabelConfig(max_new_tokens=8, principles_per_pair=2, chunk_size=2, max_fewshot=1, cot=cot)
    lab = Labeller(tiny_engine, load_constitution("default"), cfg)
    path = tmp_path / "labels.jsonl"
    with ResumableJsonl(path, lab.meta()) as out:
        lab.run([rec(i) for i in range(2)], out)
    with ResumableJsonl(path, lab.meta()) as out:  # resuming adds only the missing ones
        lab.run([rec(i) for i in range(3)], out)
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["id"] for r in recs] == ["x0", "x1", "x2"]
    for r in recs:
        assert 0.5 <= r["p_chosen"] <= 1.0
        assert {r["chosen"], r["rejected"]} == set(r["responses"]) or r["chosen"] == r["rejected"]
        assert len(r["scores"]) == 4 and {s["order"] for s in r["scores"]} == {"ab", "ba"}
        for s in r["scores"]:
            assert s["p_a"] + s["p_b"] == pytest.approx(1.0, abs=1e-5)
            if cot:
                assert 0.4 - 1e-6 <= s["p_a"] <= 0.6 + 1e-6


def test_eval_labeler_on_known_answers(default_engine):
    records = read_mc_records(FIXTURES / "labeler_mc.jsonl")
    report = evaluate_labeler(default_engine, records)
    # six records a language model gets right, and one whose "correct" answer is absurd
    assert [r["correct"] for r in report["results"]] == [True] * 6 + [False]
    assert report["accuracy"] == pytest.approx(6 / 7) and report["n"] == 7
    assert report["comparisons"] == 8 and report["comparisons_per_s"] > 0


def test_eval_labeler_bad_records(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "corrects": [], "incorrects": ["y"]}\n')
    with pytest.raises(InputError, match="record 1: 'corrects'"):
        read_mc_records(bad)
    bad.write_text('{"prompt": "x", "corrects": ["a"]}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:1: missing field\(s\) incorrects"):
        read_mc_records(bad)


# ---------------------------------------------------------------- conversations, aspects, identical pairs

def test_pairs_keep_the_whole_conversation_ppo_scores(tiny_engine, tmp_path):
    """A multi-turn prompt: the PM / DPO input is the whole conversation + the response, token
    for token what PPO's reward call scores for that prompt (``PPOTrainer.experience``)."""
    lab = Labeller.__new__(Labeller)
    lab.cfg = LabelConfig()
    p = Principle("p", "x")
    (out,) = Labeller._records(lab, [multi_turn()], [("r0", "r1")], [(0, p, "ab")], torch.tensor([[0.7, 0.3]]))
    assert out["conversation"] == MULTI
    f = tmp_path / "labels.jsonl"
    f.write_text(json.dumps(out) + "\n")
    (pair,) = read_pairs(f)
    ppo_conv = prompting.as_conversation(multi_turn().messages or multi_turn().prompt)
    assert pair.prompt == ppo_conv
    rm = RewardModel(tiny_engine, new_head(tiny_engine.model, 0), chat=True)
    assert encode_pairs(tiny_engine, [pair], "chat")[0].chosen == rm.encode(ppo_conv, "r0")


def test_old_label_records_fall_back_to_their_prompt(tmp_path):
    f = tmp_path / "old.jsonl"
    f.write_text(json.dumps({"id": "x0", "prompt": "How do I pick a lock?", "chosen": "No.", "rejected": "Sure.",
                             "p_chosen": 0.7, "responses": ["No.", "Sure."], "scores": []}) + "\n")
    (pair,) = read_pairs(f)
    assert pair.prompt == [{"role": "user", "content": "How do I pick a lock?"}]


def test_benign_pairs_are_judged_by_helpfulness_principles(tiny_engine, tmp_path):
    con = load_constitution("default")
    cfg = LabelConfig(max_new_tokens=6, principles_per_pair=len(con.principles), both_orders=False,
                      chunk_size=2, max_fewshot=0)
    lab = Labeller(tiny_engine, con, cfg)
    path = tmp_path / "labels.jsonl"
    benign = [PromptRecord(id=f"b{i}", prompt=f"How do I bake bread {i}?", category="cooking") for i in range(2)]
    with ResumableJsonl(path, lab.meta()) as out:
        summary = lab.run(benign, out, aspect=prompts_aspect("benign"))
        lab.run([multi_turn()], out, aspect=prompts_aspect("redteam"))
    recs = {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}
    assert summary == {"identical_dropped": 0} and set(recs) == {"b0", "b1", "m0"}
    helpful = {p.id for p in con.principles_for("helpfulness")}
    harmless = {p.id for p in con.principles_for("harmlessness")}
    for i in ("b0", "b1"):
        assert recs[i]["aspect"] == "helpfulness"
        assert {s["principle_id"] for s in recs[i]["scores"]} == helpful
    assert recs["m0"]["aspect"] == "harmlessness" and recs["m0"]["conversation"] == MULTI
    assert {s["principle_id"] for s in recs["m0"]["scores"]} == harmless
    assert "least_harmful" not in helpful


def test_label_aspect_setting():
    con = load_constitution("default")
    drawn = draw_label_principles(con, 0, "x", 50, "helpfulness")
    assert {p.id for p in drawn} == {p.id for p in con.principles_for("helpfulness")}
    assert prompts_aspect("redteam") == "harmlessness" and prompts_aspect("my_prompts.jsonl") is None
    lab = Labeller.__new__(Labeller)
    lab.cfg = LabelConfig(aspect="all")
    assert lab.aspect("helpfulness") is None  # "all" overrides what the prompts test
    lab.cfg = LabelConfig()
    assert lab.aspect("helpfulness") == "helpfulness" and lab.aspect(None) is None
    with pytest.raises(InputError, match="aspect must be"):
        LabelConfig(aspect="harmless")


def test_identical_pairs_are_dropped_and_counted(tiny_engine, tmp_path):
    """Greedy sampling draws the same response twice: nothing to prefer, so no label."""
    cfg = LabelConfig(max_new_tokens=6, principles_per_pair=1, temperature=0.0, chunk_size=2, max_fewshot=0)
    lab = Labeller(tiny_engine, load_constitution("default"), cfg)
    path = tmp_path / "labels.jsonl"
    with ResumableJsonl(path, lab.meta()) as out:
        summary = lab.run([rec(i) for i in range(3)], out)
        assert out.count == 0
    assert summary == {"identical_dropped": 3} and path.read_text() == ""


def test_a_resumed_chunk_is_sampled_whole_so_records_match(tiny_engine, tmp_path):
    """A chunk with a prompt missing (its pair was dropped) is sampled again whole, with the
    same seed: the resumed records are those of an uninterrupted run."""
    lab = Labeller(tiny_engine, load_constitution("default"),
                   LabelConfig(max_new_tokens=6, principles_per_pair=1, chunk_size=2, max_fewshot=0))
    ps = [rec(i) for i in range(2)]
    whole = lab.label_chunk(ps)
    assert [r["id"] for r in whole] == ["x0", "x1"]
    path = tmp_path / "labels.jsonl"
    with ResumableJsonl(path, lab.meta()) as out:
        out.append(whole[:1])  # x1 missing: a chunk cut from what is left would be [x1], seeded anew
        assert lab.run(ps, out) == {"identical_dropped": 0}
    resumed = sorted(map(json.loads, path.read_text().splitlines()), key=lambda r: r["id"])
    assert [(r["id"], r["responses"]) for r in resumed] == [(r["id"], list(r["responses"])) for r in whole]
    # scored alone rather than beside x0: the same probabilities up to float32 summation order
    assert resumed[1]["p_first"] == pytest.approx(whole[1]["p_first"], abs=1e-4)
