"""SFT: data validation, the assistant-token mask, training, resume, the NaN guard, the CLI."""
import argparse
import json

import pytest
import torch

from cai import sft
from cai.sft import Conversation, SFTConfig, encode, read_sft_file, train_sft
from engine import Engine, lora
from engine.errors import InputError
from engine.lora import LoraConfig
from engine.train import NonFiniteLossError, OptimConfig, list_checkpoints

CONVS = [
    [{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": "Mix flour, water and yeast."}],
    [{"role": "user", "content": "Which is less harmful?"}, {"role": "assistant", "content": "I would refuse."},
     {"role": "user", "content": "Revise it."}, {"role": "assistant", "content": "A safe answer: be kind."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "user", "content": "The quick brown fox?"}, {"role": "assistant", "content": "Jumps over the lazy dog."}],
]


@pytest.fixture
def eng(tiny_model_dir):
    return Engine.load(tiny_model_dir("llama"))


def write_jsonl(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def test_reads_every_record_form(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": CONVS[0], "principle_ids": [3]},
        {"init_prompt": "Q?", "init_response": "bad", "revision_response": "good"},
        "",
        {"prompt": "P", "response": "R"},
    ])
    got = read_sft_file(f)
    assert [c.messages[-1]["content"] for c in got] == [CONVS[0][-1]["content"], "good", "R"]
    assert got[2].where == f"{f}:4"


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('{"text": "x"}', "needs 'messages'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "last message must be a non-empty assistant"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "message 0 needs a role"),
    ('{"prompt": "p", "response": "  "}', "non-empty assistant"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_data_names_file_and_line(tmp_path, line, message):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "response": "r"}, line])
    with pytest.raises(InputError, match=rf"bad.jsonl:2: .*{message}"):
        read_sft_file(f)


HARMFUL = "Sure: wedge the latch, then twist."


def sl_record(rid: str, revisions: list[str], degenerate: list[bool]) -> dict:
    """An SL-CAI record as ``cai sl`` writes it: a degenerate round keeps the answer before it."""
    conv = [{"role": "user", "content": f"How do I open lock {rid}?"}]
    rounds = [{"principle_id": "general_harm", "critique_request": "c", "critique": "k", "revision_request": "r",
               "revision": rev, "flags": ["kept_previous"] if bad else []} for rev, bad in zip(revisions, degenerate)]
    return {"id": rid, "init_prompt": conv[0]["content"], "init_response": HARMFUL, "revision_response": revisions[-1],
            "messages": conv + [{"role": "assistant", "content": revisions[-1]}], "rounds": rounds}


SL_RECORDS = [
    sl_record("ok", ["I can't help with that.", "I can't help; a locksmith can."], [False, False]),
    sl_record("partly", ["Please call a locksmith.", "Please call a locksmith."], [False, True]),
    sl_record("never", [HARMFUL, HARMFUL], [True, True]),  # every revision degenerate: the original answer
    {"prompt": "How do I bake bread?", "response": "Mix flour, water and yeast."},
]


def test_unrevised_sl_records_are_left_out_and_counted(eng, tmp_path):
    convs = read_sft_file(write_jsonl(tmp_path / "sl.jsonl", SL_RECORDS))
    final, skipped = sft.select_examples(convs, "final")
    assert skipped == 1 and [c.messages[-1]["content"] for c in final] == [
        "I can't help; a locksmith can.", "Please call a locksmith.", "Mix flour, water and yeast."]
    out = train_sft(eng, convs, small_cfg(max_steps=1))
    assert (out["examples"], out["unrevised_skipped"]) == (3, 1)
    with pytest.raises(InputError, match="all 1 SL-CAI records had only degenerate revisions"):
        train_sft(eng, convs[2:3], small_cfg(max_steps=1))


def test_revisions_of_every_round(tmp_path):
    convs = read_sft_file(write_jsonl(tmp_path / "sl.jsonl", SL_RECORDS))
    every, skipped = sft.select_examples(convs, SFTConfig(revisions="all").revisions)
    assert skipped == 1
    assert [(c.messages[0]["content"], c.messages[-1]["content"]) for c in every] == [
        ("How do I open lock ok?", "I can't help with that."), ("How do I open lock ok?", "I can't help; a locksmith can."),
        ("How do I open lock partly?", "Please call a locksmith."), ("How do I bake bread?", "Mix flour, water and yeast.")]
    assert every[1].where == f"{tmp_path / 'sl.jsonl'}:1 revision 2"
    assert all(HARMFUL not in m["content"] for c in every for m in c.messages)
    with pytest.raises(InputError, match="revisions must be 'final' or 'all'"):
        SFTConfig(revisions="last")


def masked_text(tok, ids, mask):
    return tok.decode([t for t, m in zip(ids, mask) if m])


def test_chat_mask_covers_exactly_the_assistant_tokens(eng):
    tok = eng.tokenizer
    ids, mask = encode(tok, CONVS[1], chat=True, loss_on="last")
    assert ids == tok(tok.apply_chat_template(CONVS[1], tokenize=False), add_special_tokens=False)["input_ids"]
    assert masked_text(tok, ids, mask) == "A safe answer: be kind.<|im_end|>\n"
    first = mask.index(True)
    assert tok.decode(ids[:first]).endswith("<|im_start|>assistant\n")
    _, mask_all = encode(tok, CONVS[1], chat=True, loss_on="all")
    assert masked_text(tok, ids, mask_all) == "I would refuse.<|im_end|>\nA safe answer: be kind.<|im_end|>\n"


def test_text_mask_for_base_models(eng):
    tok = eng.tokenizer
    ids, mask = encode(tok, CONVS[2], chat=False)
    assert tok.decode(ids) == "Human: Hi\n\nAssistant: Hello!<|im_end|>"  # system turn dropped, EOS closes
    assert masked_text(tok, ids, mask) == " Hello!<|im_end|>"


def small_cfg(**kw):
    optim = kw.pop("optim", OptimConfig(lr=3e-2, warmup_steps=1))
    return SFTConfig(max_tokens_per_batch=kw.pop("max_tokens_per_batch", 100), lora=LoraConfig(rank=4, alpha=8, dropout=0.1), optim=optim, **kw)


def test_lora_sft_loss_decreases_and_base_is_untouched(eng):
    before = {k: v.clone() for k, v in eng.model.state_dict().items()}
    out = train_sft(eng, CONVS * 2, small_cfg(epochs=6, shuffle=False))
    losses = out["losses"]
    assert out["steps"] == len(losses) >= 12
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3  # from ~ln(V) = 5.95
    assert all(torch.equal(before[k], v) for k, v in eng.model.state_dict().items())
    assert lora.active_adapter(eng.model) is None and "sft" in lora.adapters(eng.model)


def test_full_finetune_trains_the_base(tiny_model_dir, tmp_path):
    eng = Engine.load(tiny_model_dir("llama"))
    before = eng.model.embed.clone()
    out = train_sft(eng, CONVS, small_cfg(full=True, epochs=4, optim=OptimConfig(lr=3e-3, warmup_steps=1)),
                    tmp_path / "run", progress=False)
    assert out["final_loss"] < out["first_loss"] and not torch.equal(before, eng.model.embed)
    assert not any(p.requires_grad for p in eng.model.parameters())
    assert (tmp_path / "run" / "merged" / "model.safetensors").is_file()


def test_resume_gives_identical_losses(tiny_model_dir, tmp_path):
    cfg = dict(epochs=3, checkpoint_every=2, optim=OptimConfig(lr=1e-2, warmup_steps=2, grad_accum=2))
    folder = tiny_model_dir("llama")
    whole = train_sft(Engine.load(folder), CONVS * 2, small_cfg(**cfg), tmp_path / "a")["losses"]
    first = train_sft(Engine.load(folder), CONVS * 2, small_cfg(max_steps=3, **cfg), tmp_path / "b")["losses"]
    rest = train_sft(Engine.load(folder), CONVS * 2, small_cfg(**cfg), tmp_path / "b")["losses"]
    assert first == whole[:3] and first + rest == whole
    lines = [json.loads(ln) for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, len(whole) + 1))


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(eng, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = sft.token_logprobs

    def poisoned(model, batch, *a, **kw):
        calls["n"] += 1
        lp = real(model, batch, *a, **kw)
        return lp * float("nan") if calls["n"] == 3 else lp

    monkeypatch.setattr(sft, "token_logprobs", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 3: the loss is nan.*last good checkpoint: .*step-00000002"):
        train_sft(eng, CONVS, small_cfg(epochs=3, checkpoint_every=1, max_tokens_per_batch=80), tmp_path)
    assert [c.name for c in list_checkpoints(tmp_path / "checkpoints")] == ["step-00000001", "step-00000002"]


def test_cli_writes_adapter_peft_and_merged(tiny_model_dir, tmp_path):
    from cai import sft_cmd

    parser = argparse.ArgumentParser()
    sft_cmd.register(parser.add_subparsers())
    data = write_jsonl(tmp_path / "sl.jsonl", [{"messages": c} for c in CONVS])
    helpful = write_jsonl(tmp_path / "helpful.jsonl", [{"prompt": "Bake?", "response": "Yes, bread."}])
    yaml_cfg = tmp_path / "sft.yaml"
    yaml_cfg.write_text("epochs: 2\nlora:\n  rank: 2\noptim:\n  warmup_steps: 1\n")
    out = tmp_path / "run"
    args = parser.parse_args(["sft", "--data", str(data), "--out", str(out), "--model", str(tiny_model_dir("llama")),
                              "--include-helpful", str(helpful), "--config", str(yaml_cfg), "--lora-targets", "q,v",
                              "--max-tokens-per-batch", "128", "--export-merged", "--no-progress"])
    assert args.func(args) == 0
    cfg = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["target_modules"] == ["q_proj", "v_proj"]
    assert (out / "adapter" / "adapter.safetensors").is_file() and (out / "merged" / "config.json").is_file()
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] >= 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  rnak: 2\n")
    args = parser.parse_args(["sft", "--data", str(data), "--out", str(out), "--config", str(bad)])
    with pytest.raises(InputError, match="bad.yaml: unknown key 'lora.rnak'"):
        args.func(args)
