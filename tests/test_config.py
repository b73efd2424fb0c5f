"""The one config builder: every field type- and range-checked wherever it was set, and the
error names the field and its source (a flag, a file, --set)."""
import pytest

from cai.config import Source, build_config, parse_set
from cai.pipeline import load_run_config
from cai.pm import PMConfig
from cai.sft import SFTConfig
from engine.errors import InputError


@pytest.mark.parametrize("item, message", [
    ("sl.rounds=two", "--set sl.rounds: expected an integer, got 'two'"),
    ("sl.rounds.x=1", "--set sl.rounds: 'sl.rounds' is one setting, not a section"),
    ("sl=3", "--set sl: expected a mapping of settings"),
    ("sl_prompts=-1", "--set sl_prompts: must be >= 1, got -1"),
    ("helpful_samples=-2", "--set helpful_samples: must be >= 0, got -2"),
    ("sl.chunk_size=0", "--set sl.chunk_size: must be >= 1, got 0"),
    ("sl.temperature=.nan", "--set sl.temperature: must be a finite number, got nan"),
    ("ppo.lr=.inf", "--set ppo.lr: must be a finite number, got inf"),
    ("sft.optim.lr=0", "--set sft.optim.lr: must be > 0.0, got 0.0"),
    ("sft.lora.targets=[q, x]", "--set sft.lora.targets: must be a non-empty subset of"),
    ("sft.full=yes please", "--set sft.full: expected true or false"),
    ("label.style=fancy", "--set label.style: must be one of 'auto', 'chat', 'base', got 'fancy'"),
    ("device=tpu", "--set device: must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ("dtype=float64", "--set dtype: must be one of 'auto', 'float32', 'bfloat16', 'float16'"),
])
def test_set_errors_name_the_set_not_the_preset(item, message):
    with pytest.raises(InputError) as exc:
        load_run_config(None, "demo", parse_set([item]))
    assert message in str(exc.value) and "demo.yaml" not in str(exc.value)


def test_file_errors_name_the_file_and_key(tmp_path):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("sft:\n  checkpoint_every: 0\n")
    with pytest.raises(InputError, match=r"mine.yaml: sft.checkpoint_every: must be >= 1, got 0"):
        load_run_config(str(cfg), "demo", {})
    cfg.write_text("ppo:\n  checkpoint_every: 0\n")
    with pytest.raises(InputError, match=r"mine.yaml: ppo.checkpoint_every: must be >= 1, got 0"):
        load_run_config(str(cfg), None, {})


def test_device_dtype_and_yaml_floats_resolve():
    cfg, _ = load_run_config(None, "demo", parse_set(["device=cuda:1", "dtype=bfloat16", "sft.optim.lr=1e-4"]))
    assert (cfg.device, cfg.dtype, cfg.sft.optim.lr) == ("cuda:1", "bfloat16", 1e-4)  # YAML reads 1e-4 as text


def test_a_section_keeps_its_stage_defaults():
    """PMConfig's optimizer defaults to lr 1e-4; setting another of its fields keeps that."""
    cfg, _ = load_run_config(None, None, parse_set(["pm.optim.warmup_steps=3"]))
    assert (cfg.pm.optim.lr, cfg.pm.optim.warmup_steps) == (PMConfig().optim.lr, 3)


def test_later_layers_win_and_are_blamed():
    file, flags = Source("file", "f.yaml"), Source("flag", flags=((("optim", "lr"), "--lr"),))
    cfg = build_config(SFTConfig, [({"epochs": 3, "optim": {"lr": 0.1}}, file), ({"optim": {"lr": 0.2}}, flags)])
    assert (cfg.epochs, cfg.optim.lr) == (3, 0.2)
    with pytest.raises(InputError, match=r"^--lr: must be a finite number, got nan$"):
        build_config(SFTConfig, [({"optim": {"lr": 0.1}}, file), ({"optim": {"lr": float("nan")}}, flags)])
    with pytest.raises(InputError, match=r"^f.yaml: epochs: must be >= 1, got 0$"):
        build_config(SFTConfig, [({"epochs": 0}, file), ({"optim": {"lr": 0.2}}, flags)])
