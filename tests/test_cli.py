"""The ``cai`` command as a user meets it: every --help prints, bad numbers and undecodable
files are one clear message naming the flag or file (no traceback, no model loaded), a run
folder that a failed start touched does not block the corrected command, and built-in names
are not shadowed by the current folder."""
import argparse
import json

import pytest
import torch

from cai import cli
from cai.constitution import CONSTITUTIONS_DIR, load_constitution
from cai.prompts import select_prompts
from cai.records import ResumableJsonl


def _commands(parser: argparse.ArgumentParser, prefix=()):
    """Every sub-command path of ``parser``, nested ones included (constitution show)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,), sub
                yield from _commands(sub, prefix + (name,))


COMMANDS = dict(_commands(cli.build_parser()))
MODEL_COMMANDS = [c for c, p in COMMANDS.items() if any("--model" in a.option_strings for a in p._actions)]


@pytest.mark.parametrize("command", list(COMMANDS), ids=" ".join)
def test_help_of_every_subcommand_prints(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([*command, "--help"])
    assert exc.value.code == 0
    assert "usage: cai " + " ".join(command) in capsys.readouterr().out


@pytest.mark.parametrize("command", MODEL_COMMANDS, ids=" ".join)
def test_every_model_command_takes_device_and_dtype(command):
    flags = {s for a in COMMANDS[command]._actions for s in a.option_strings}
    assert {"--model", "--device", "--dtype", "--no-cuda-graphs"} <= flags


def test_model_flags_reach_the_engine(tiny_model_dir):
    from cai.config import open_engine

    parser = cli.build_parser()
    args = parser.parse_args(["generate", "--model", str(tiny_model_dir("llama")), "--device", "cpu",
                              "--dtype", "bfloat16", "--no-cuda-graphs"])
    eng = open_engine(args)
    assert (eng.device.type, eng.dtype, eng.cuda_graphs) == ("cpu", torch.bfloat16, False)
    assert open_engine(parser.parse_args(["generate", "--model", str(tiny_model_dir("llama"))])).cuda_graphs


def test_run_takes_device_dtype_and_cuda_graphs_as_settings(capsys):
    from cai.config import parse_set
    from cai.pipeline import load_run_config
    from cai.run_cmd import set_items

    args = cli.build_parser().parse_args(["run", "--preset", "demo", "--set", "dtype=float16", "--device", "cpu",
                                          "--dtype", "bfloat16", "--no-cuda-graphs"])
    cfg, _ = load_run_config(None, "demo", parse_set(set_items(args)))
    assert (cfg.device, cfg.dtype, cfg.cuda_graphs) == ("cpu", "bfloat16", False)
    assert cli.main(["run", "--preset", "demo", "--device", "tpu", "--out", "unused"]) != 0
    assert "--set device: must be auto, cpu, cuda or cuda:N" in capsys.readouterr().err


def test_device_and_dtype_are_checked(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--device", "tpu"])
    assert "must be auto, cpu, cuda or cuda:N, got 'tpu'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["pm", "--data", "d", "--out", "o", "--dtype", "float64"])
    assert "invalid choice: 'float64'" in capsys.readouterr().err


# ---- 11: files that are not UTF-8 -------------------------------------------------------

LATIN1_JSONL = b'{"prompt": "ok", "chosen": "a", "rejected": "b"}\n{"prompt": "caf\xe9"}\n'
LATIN1_YAML = b"name: mine\n# caf\xe9\n"


@pytest.mark.parametrize("command, kind", [
    (["constitution", "validate", "{yaml}"], "yaml"),
    (["constitution", "show", "{json}"], "json"),
    (["sl", "--constitution", "{yaml}", "--prompts", "{jsonl}", "--out", "{out}/sl.jsonl"], "yaml"),
    (["generate", "--prompts", "{jsonl}"], "jsonl"),
    (["sft", "--data", "{jsonl}", "--out", "{out}/sft"], "jsonl"),
    (["pm", "--data", "{jsonl}", "--out", "{out}/pm"], "jsonl"),
    (["dpo", "--data", "{jsonl}", "--out", "{out}/dpo"], "jsonl"),
    (["eval-labeler", "--file", "{jsonl}"], "jsonl"),
    (["run", "--config", "{yaml}", "--out", "{out}/run"], "yaml"),
    (["sft", "--data", "{ok}", "--config", "{yaml}", "--out", "{out}/sft"], "yaml"),
], ids=lambda x: x[0] if isinstance(x, list) else x)
def test_a_file_that_is_not_utf8_is_named(command, kind, tmp_path, capsys):
    files = {"jsonl": tmp_path / "bad.jsonl", "yaml": tmp_path / "bad.yaml", "json": tmp_path / "bad.json"}
    files["jsonl"].write_bytes(LATIN1_JSONL)
    files["yaml"].write_bytes(LATIN1_YAML)
    files["json"].write_bytes(b'{"constitutions": [{"critic": "caf\xe9"}]}')
    (tmp_path / "ok.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    argv = [a.format(out=tmp_path, ok=tmp_path / "ok.jsonl", **files) for a in command]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    line = {"jsonl": 2, "yaml": 2, "json": 1}[kind]
    assert f"bad.{kind}:{line}: not UTF-8 text (byte offset" in err
    assert "Traceback" not in err


# ---- 12: numbers every command checks before it loads a model -------------------------

@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompts", "{p}", "--temperature", "nan"], "--temperature: must be a finite number, got nan"),
    (["generate", "--prompts", "{p}", "--temperature", "inf"], "--temperature: must be a finite number, got inf"),
    (["generate", "--prompts", "{p}", "--top-p", "0"], "--top-p: must be in (0.0, 1.0]"),
    (["sft", "--data", "{x}", "--out", "{o}", "--lr", "nan"], "--lr: must be a finite number, got nan"),
    (["sft", "--data", "{x}", "--out", "{o}", "--lr", "inf"], "--lr: must be a finite number, got inf"),
    (["sft", "--data", "{x}", "--out", "{o}", "--checkpoint-every", "0"], "--checkpoint-every: must be >= 1, got 0"),
    (["sft", "--data", "{x}", "--out", "{o}", "--epochs", "0"], "--epochs: must be >= 1, got 0"),
    (["pm", "--data", "{x}", "--out", "{o}", "--epochs", "0"], "--epochs: must be >= 1, got 0"),
    (["dpo", "--data", "{x}", "--out", "{o}", "--lora-rank", "0"], "--lora-rank: must be >= 1, got 0"),
    (["ppo", "--reward", "{x}", "--out", "{o}", "--checkpoint-every", "0"], "--checkpoint-every: must be >= 1, got 0"),
    (["ppo", "--reward", "{x}", "--out", "{o}", "--temperature", "0"], "--temperature: must be > 0.0, got 0.0"),
    (["sl", "--prompts", "{x}", "--out", "{o}", "--chunk-size", "0"], "--chunk-size: must be >= 1, got 0"),
    (["sl", "--prompts", "{x}", "--out", "{o}", "--chunk-size", "-1"], "--chunk-size: must be >= 1, got -1"),
    (["sl", "--prompts", "{x}", "--out", "{o}", "--rounds", "-1"], "--rounds: must be >= 1, got -1"),
    (["label", "--prompts", "{x}", "--out", "{o}", "--clamp-high", "1.5"], "--clamp-high: must be in [0.0, 1.0]"),
    (["eval", "--out", "{o}", "--temperature=-inf"], "--temperature: must be a finite number, got -inf"),
], ids=lambda x: " ".join(x[:1] + x[-2:]) if isinstance(x, list) else None)
def test_bad_numbers_name_their_flag(argv, message, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    argv = [a.format(p=prompts, x=tmp_path / "missing.jsonl", o=tmp_path / "out") for a in argv]
    assert cli.main([*argv, "--model", str(tmp_path / "no-model")]) == 2  # checked before any load
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_run_with_a_bad_set_stops_before_the_model(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["run", "--preset", "demo", "--set", "model=/nonexistent/model", "--set", "sl.rounds=two",
                   "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--set sl.rounds: expected an integer, got 'two'" in err and "demo.yaml" not in err
    assert not out.exists()


# ---- 15: a failed start pins nothing ----------------------------------------------------

def test_jsonl_settings_are_pinned_by_the_first_record(tmp_path):
    path = tmp_path / "out.jsonl"
    ResumableJsonl(path, {"model": "typo"}).close()  # started, wrote nothing
    with ResumableJsonl(path, {"model": "right"}) as out:  # the corrected command is not refused
        out.append([{"id": "a"}])
    assert json.loads(path.with_name("out.jsonl.meta.json").read_text()) == {"model": "right"}
    with pytest.raises(Exception, match=r"other settings \(model\)"):
        ResumableJsonl(path, {"model": "other"})


def test_a_failed_start_does_not_block_the_corrected_run(tmp_path, capsys):
    out = tmp_path / "run"
    for model in ("/nonexistent/typo", "/nonexistent/fixed"):
        assert cli.main(["run", "--preset", "demo", "--set", f"model={model}", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{model}: not a model folder" in err and "other settings" not in err


def test_overwrite_starts_a_used_run_folder_over(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("model: another\n")
    (out / "sl.jsonl").write_text('{"id": "a"}\n')
    keep = out / "notes.txt"
    keep.write_text("mine")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_model_dir('llama')}\nredteam_prompts: {tmp_path / 'missing.jsonl'}\n")
    assert cli.main(["run", "--config", str(cfg), "--out", str(out)]) == 2
    assert "started with other settings" in capsys.readouterr().err
    assert cli.main(["run", "--config", str(cfg), "--out", str(out), "--overwrite"]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err  # got as far as the SL stage
    assert not (out / "sl.jsonl").exists() and keep.read_text() == "mine"


# ---- 20: built-in names win over the current folder --------------------------------------

def test_builtin_constitution_is_not_shadowed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "default").mkdir()
    c = load_constitution("default")
    assert c.counts() == load_constitution(CONSTITUTIONS_DIR / "default.yaml").counts() and c.principles
    assert "'default' is the built-in constitution; the folder 'default' here is not read" in capsys.readouterr().err
    assert load_constitution("builtin:default").counts() == c.counts()


def test_builtin_prompt_set_is_not_shadowed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "redteam").write_text("my only prompt\n")
    builtin = select_prompts("redteam")
    assert len(builtin) > 1 and {p.split for p in builtin} == {"train"}
    assert "write ./redteam to use it" in capsys.readouterr().err
    assert [p.prompt for p in select_prompts("./redteam")] == ["my only prompt"]
    assert [p.id for p in select_prompts("builtin:redteam")] == [p.id for p in builtin]
