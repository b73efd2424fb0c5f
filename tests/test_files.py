"""Files: nothing a user wrote is cut or overwritten, outputs are checked before a model
loads, resumes refuse changed settings, exports are written whole, non-finite state never
reaches a checkpoint, and a run killed mid-write resumes."""
import json

import pytest
import torch

from cai.cli import main as cli
from cai.constitution import load_constitution
from cai.prompts import PromptRecord
from cai.records import ResumableJsonl
from cai.sft import SFTConfig, train_sft
from cai.sl import SLConfig, SLRunner
from engine import Engine, lora
from engine.errors import InputError
from engine.lora import LoraConfig
from engine.train import NonFiniteLossError, OptimConfig, list_checkpoints

CONVS = [
    [{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": "Mix flour and water."}],
    [{"role": "user", "content": "The quick brown fox?"}, {"role": "assistant", "content": "Jumps over the dog."}],
]
NO_MODEL = "/nonexistent/model"  # a command that gets this far would fail on loading it


def sft_cfg(**kw):
    optim = kw.pop("optim", OptimConfig(lr=1e-2, warmup_steps=1))
    return SFTConfig(max_tokens_per_batch=50, lora=LoraConfig(rank=2, alpha=4, dropout=0.0), optim=optim,
                     shuffle=False, **kw)


def prompts_file(path, n=2, start=0):
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Tell me about bread {i}"}) + "\n"
                            for i in range(start, start + n)))
    return path


# ---- 13: non-finite state never reaches a checkpoint --------------------------------------

def test_overflowing_step_writes_no_checkpoint_and_names_none(tiny_model_dir, tmp_path):
    eng = Engine.load(tiny_model_dir("llama"))
    # the loss of step 1 is finite, but its decoupled weight decay (p *= 1 - lr * wd) takes
    # the weights past float32's range, as `--lr inf` did
    cfg = sft_cfg(epochs=2, checkpoint_every=1, optim=OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=1e42))
    with pytest.raises(NonFiniteLossError, match=r"step 1: .*not finite.*last good checkpoint: none yet"):
        train_sft(eng, CONVS, cfg, tmp_path)
    assert list_checkpoints(tmp_path / "checkpoints") == []


# ---- 16: a file this project did not write is never cut; an input is never an output -----

def test_resumable_output_refuses_a_foreign_file_untouched(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("first line\nsecond line, no newline")
    with pytest.raises(InputError, match="not written by cai"):
        ResumableJsonl(notes, {"stage": "sl"})
    assert notes.read_text() == "first line\nsecond line, no newline"
    assert not (tmp_path / "notes.txt.meta.json").exists()


@pytest.mark.parametrize("extra", [[], ["--overwrite"]])
def test_sl_refuses_its_input_as_output(tiny_model_dir, tmp_path, capsys, extra):
    data = prompts_file(tmp_path / "p.jsonl")
    before = data.read_text()
    rc = cli(["sl", "--model", str(tiny_model_dir("llama")), "--prompts", str(data), "--out", str(tmp_path / "." / "p.jsonl"),
              "--rounds", "1", "--max-new-tokens", "4", *extra])
    assert rc == 2 and "is also an input" in capsys.readouterr().err
    assert data.read_text() == before and not (tmp_path / "p.jsonl.meta.json").exists()


# ---- 17: a resume that changes what determines the result is refused ---------------------

def test_sl_resume_with_other_prompts_is_refused(tiny_model_dir, tmp_path, capsys):
    model, out = str(tiny_model_dir("llama")), tmp_path / "sl.jsonl"
    args = ["sl", "--model", model, "--out", str(out), "--rounds", "1", "--max-new-tokens", "4", "--max-fewshot", "0"]
    assert cli([*args, "--prompts", str(prompts_file(tmp_path / "a.jsonl", 1))]) == 0
    prompts_file(tmp_path / "a.jsonl", 1, start=5)  # same file, other prompts
    assert cli([*args, "--prompts", str(tmp_path / "a.jsonl")]) == 2
    assert "prompts_sha256" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 1


@pytest.mark.parametrize("change, field", [
    (dict(epochs=3), "epochs"),
    (dict(optim=OptimConfig(lr=2e-2, warmup_steps=1)), "optim.lr"),
    (dict(data=CONVS[:1]), "data_sha256"),
])
def test_sft_resume_with_changed_settings_is_refused(tiny_model_dir, tmp_path, change, field):
    folder = tiny_model_dir("llama")
    train_sft(Engine.load(folder), CONVS, sft_cfg(epochs=2, max_steps=1), tmp_path)
    data = change.pop("data", CONVS)
    with pytest.raises(InputError, match=rf"other settings: .*{field}"):
        train_sft(Engine.load(folder), data, sft_cfg(**{"epochs": 2, **change}), tmp_path)


# ---- 18: a half-written metrics line does not break resume --------------------------------

def test_sft_resumes_over_a_cut_off_metrics_line(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("llama")
    train_sft(Engine.load(folder), CONVS, sft_cfg(epochs=2, max_steps=1), tmp_path)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "lo')  # the kill landed mid-write
    train_sft(Engine.load(folder), CONVS, sft_cfg(epochs=2), tmp_path)
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


class CountScorer:
    """A deterministic stand-in preference score: how often the response says 'e'."""

    def score(self, convs, responses):
        return torch.tensor([float(r.count("e")) for r in responses])


def test_ppo_resumes_over_a_cut_off_metrics_line(tiny_model_dir, tmp_path):
    from cai.ppo import PPOConfig, train_ppo

    prompts = [PromptRecord(f"p{i}", f"Tell me about bread {i}") for i in range(4)]

    def engine():
        eng = Engine.load(tiny_model_dir("llama"))
        lora.add_adapter(eng.model, "sft", seed=0)
        return eng

    cfg = dict(prompts_per_iteration=2, max_new_tokens=4, minibatch_size=2)
    train_ppo(engine(), CountScorer(), prompts, PPOConfig(iterations=1, **cfg), out=tmp_path)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"iteration": 2, "rew')
    train_ppo(engine(), CountScorer(), prompts, PPOConfig(iterations=2, **cfg), out=tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [1, 2]


# ---- 19: outputs are checked before the model loads; generate writes as it goes ----------

def test_outputs_of_the_wrong_kind_are_refused_before_the_model_loads(tmp_path, capsys):
    data = prompts_file(tmp_path / "p.jsonl")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    (tmp_path / "folder").mkdir()
    cases = [
        (["sl", "--prompts", str(data), "--out", str(tmp_path / "folder")], "is a folder"),
        (["sl", "--prompts", str(data), "--out", str(a_file / "sl.jsonl")], "is a file, not a folder"),
        (["sft", "--data", str(data), "--out", str(a_file)], "is not a folder"),
        (["generate", "--prompts", str(data), "--out", str(tmp_path / "folder")], "is a folder"),
    ]
    for argv, message in cases:
        assert cli([*argv, "--model", NO_MODEL]) == 2
        assert message in capsys.readouterr().err, argv


def _generate(model, data, out, *extra):
    return cli(["generate", "--model", str(model), "--prompts", str(data), "--out", str(out),
                "--max-new-tokens", "4", "--temperature", "0.8", *extra])


def test_generate_refuses_to_overwrite_without_the_flag(tiny_model_dir, tmp_path, capsys):
    data, out = prompts_file(tmp_path / "p.jsonl"), tmp_path / "mine.jsonl"
    out.write_text("my notes\n")
    assert _generate(tiny_model_dir("llama"), data, out) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "my notes\n"
    assert _generate(tiny_model_dir("llama"), data, out, "--overwrite") == 0
    assert [json.loads(x)["index"] for x in out.read_text().splitlines()] == [0, 1]


def test_generate_resumes_and_makes_missing_folders(tiny_model_dir, tmp_path, capsys):
    model, data = tiny_model_dir("llama"), prompts_file(tmp_path / "p.jsonl", 3)
    full = tmp_path / "new" / "deeper" / "full.jsonl"  # the folders do not exist yet
    assert _generate(model, data, full) == 0
    cut = tmp_path / "cut.jsonl"  # what an interrupt after the first record leaves
    lines = full.read_text().splitlines()
    cut.write_text(lines[0] + "\n" + lines[1][:20])
    (tmp_path / "cut.jsonl.meta.json").write_text((full.parent / "full.jsonl.meta.json").read_text())
    capsys.readouterr()
    assert _generate(model, data, cut) == 0
    assert "1 of 3 prompts done" in capsys.readouterr().err
    assert cut.read_text() == full.read_text()


# ---- 21: adapter configs and prompts that do not fit ---------------------------------------

def test_adapter_config_without_a_key_names_file_and_key(tiny_model_dir, tmp_path):
    eng = Engine.load(tiny_model_dir("llama"))
    lora.add_adapter(eng.model, "a", LoraConfig(rank=2), seed=0)
    folder = lora.save_adapter(eng.model, "a", tmp_path / "ad")
    meta = json.loads((folder / "adapter_config.json").read_text())
    del meta["rank"]
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"adapter_config.json: missing key\(s\) 'rank'"):
        lora.load_adapter(eng.model, "b", folder)


def test_sl_skips_a_prompt_longer_than_the_context_and_goes_on(tiny_model_dir, tmp_path, capsys):
    eng = Engine.load(tiny_model_dir("llama", max_position_embeddings=1024))
    runner = SLRunner(eng, load_constitution("default"),
                      SLConfig(rounds=1, max_new_tokens=4, chunk_size=3, max_slots=3, max_fewshot=0))
    ps = [PromptRecord("short-1", "Bake bread?", where="in.jsonl:1"),
          PromptRecord("long", "bread " * 2000, where="in.jsonl:2"),
          PromptRecord("short-3", "Bake a cake?", where="in.jsonl:3")]
    with ResumableJsonl(tmp_path / "sl.jsonl", runner.meta()) as out:
        runner.run(ps, out)
    err = capsys.readouterr().err
    assert "'long'" in err and "in.jsonl:2" in err
    assert [json.loads(x)["id"] for x in (tmp_path / "sl.jsonl").read_text().splitlines()] == ["short-1", "short-3"]
    assert runner.skipped == ["long"]


# ---- 22: exports are written whole; what a kill left behind is removed --------------------

def test_sft_exports_replace_whole_folders_and_remove_partial_ones(tiny_model_dir, tmp_path):
    folder = tiny_model_dir("llama")
    train_sft(Engine.load(folder), CONVS, sft_cfg(max_steps=1), tmp_path)
    stale = [tmp_path / "adapter" / "stale.bin", tmp_path / "peft" / "stale.bin"]
    left = [tmp_path / ".tmp-export-adapter-x", tmp_path / "checkpoints" / ".tmp-ckpt-x"]
    for p in stale:
        p.write_text("from an older export")
    for p in left:
        p.mkdir()
    train_sft(Engine.load(folder), CONVS, sft_cfg(), tmp_path)
    assert not any(p.exists() for p in stale + left)
    assert (tmp_path / "adapter" / "adapter.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_pm_and_ppo_exports_replace_whole_folders(tiny_model_dir, tmp_path):
    from cai.pm import RewardModel, load_reward_model, new_head, save_reward_model
    from cai.ppo import PPOConfig, PPOTrainer

    eng = Engine.load(tiny_model_dir("llama"))
    lora.add_adapter(eng.model, "reward", LoraConfig(rank=2), seed=0)
    (tmp_path / "reward").mkdir()
    (tmp_path / "reward" / "stale.bin").write_text("old")
    save_reward_model(RewardModel(eng, new_head(eng.model, 0)), tmp_path / "reward")
    assert not (tmp_path / "reward" / "stale.bin").exists()
    load_reward_model(eng, tmp_path / "reward")
    lora.add_adapter(eng.model, "sft", LoraConfig(rank=2), seed=0)
    for name in ("policy", "peft"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "stale.bin").write_text("old")
    PPOTrainer(eng, CountScorer(), PPOConfig()).export(tmp_path)
    assert not (tmp_path / "policy" / "stale.bin").exists() and not (tmp_path / "peft" / "stale.bin").exists()
    assert (tmp_path / "policy" / "value_head.safetensors").is_file()
