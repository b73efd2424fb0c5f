"""The whole method in one run: constitution -> SL-CAI -> SFT -> AI feedback labels ->
preference model -> PPO (or DPO) -> evaluation, on one engine in one process.

Everything lands in one run folder:

    config.yaml      the resolved configuration (once a stage has written anything, a
                     restarted run must match it; ``overwrite`` starts the folder over)
    state.json       finished stages and their wall times
    sl.jsonl         SL-CAI records (every round's critique and revision)
    helpful.jsonl    the base model's answers to benign prompts, mixed into SFT
    sft/             SFT adapter, checkpoints, metrics.jsonl
    labels.jsonl     AI preference labels
    pm/              preference model (reward adapter + head), metrics, eval.json
    ppo/ or dpo/     the RL-CAI policy adapter, checkpoints, metrics.jsonl
    eval/            report.md, eval.json, plots, every evaluated response
    metrics.jsonl    one line per finished stage
    report.md        the run's summary and the evaluation report

Every stage writes as it goes and resumes where it stopped (records for the generating
stages, checkpoints for the training ones), so a killed run started again with the same
command finishes with the same records as an uninterrupted one.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from cai.config import Source, build_config, load_engine, read_yaml
from cai.label import LabelConfig
from cai.outputs import meta_path
from cai.ppo import PPOConfig
from cai.sft import SFTConfig
from cai.sl import SLConfig
from engine import Engine, SamplingParams, distributed, profiling
from engine.errors import InputError

PRESETS = Path(__file__).resolve().parent / "presets"
STAGES = ("sl", "helpful", "sft", "label", "pm", "rl", "eval")
# what a run writes into its folder; overwrite removes these and nothing else
OUTPUTS = ("config.yaml", "state.json", "metrics.jsonl", "report.md", "sl.jsonl", "helpful.jsonl", "labels.jsonl",
           "sl.jsonl.meta.json", "helpful.jsonl.meta.json", "labels.jsonl.meta.json", "sft", "pm", "ppo", "dpo",
           "eval", "elo.png", "training_curves.png")
_BOOKKEEPING = ("config.yaml", "state.json")
_GENERATED = ("sl.jsonl", "helpful.jsonl", "labels.jsonl")  # written by rank shards under torchrun


def _pm_config():
    from cai.pm import PMConfig

    return PMConfig()


def _dpo_config():
    from cai.dpo import DPOConfig

    return DPOConfig()


def _eval_config():
    from cai.eval import EvalConfig

    return EvalConfig()


@dataclass
class RunConfig:
    """One run of the whole method. Stage sections take that stage's settings."""

    model: str = "default"
    """The shared base model: 'default', a checkpoint folder or a .gguf file."""
    device: str = "auto"
    """Where the model runs: auto, cpu, cuda or cuda:N (auto: a GPU when there is one)."""
    dtype: str = "auto"
    """Weight dtype: auto, float32, bfloat16 or float16 (auto: bfloat16 on a GPU, float32 on the CPU)."""
    cuda_graphs: bool = True
    """On CUDA, replay each decode step as a captured CUDA graph; false decodes eagerly."""
    rollout_weights: str = "fp32"
    """What generation reads on the CPU: fp32 (the weights), fp16 (fp16 copies of the base's
    linears and head: half the bytes per decode step) or int8 (the head as int8 too); scoring
    and training always read fp32, and PPO corrects for the gap (see engine.quant)."""
    constitution: str = "default"
    """'default', our YAML, an open-recipe JSON, or a folder of the paper's files."""
    redteam_prompts: str = "redteam"
    """Red-team prompts for SL-CAI, labels and PPO (train split of a built-in set)."""
    helpful_prompts: str = "benign"
    """Benign prompts: helpful SFT samples, helpfulness labels and PPO's helpfulness prompts (train split)."""
    sl_prompts: int = 64
    """Red-team prompts revised by SL-CAI."""
    helpful_samples: int = 32
    """Benign prompts whose base-model answers join the SFT data (0: none)."""
    label_prompts: int = 64
    """Red-team prompts whose response pairs are labelled (taken after the SL ones)."""
    label_helpful_prompts: int = 16
    """Benign prompts whose response pairs are labelled too."""
    rl: str = "ppo"
    """RL-CAI algorithm: 'ppo' (against the preference model) or 'dpo' (from the labels)."""
    seed: int = 0
    """Seed for every stage that has none of its own set."""
    sl: SLConfig = field(default_factory=SLConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    pm: object = field(default_factory=_pm_config)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: object = field(default_factory=_dpo_config)
    eval: object = field(default_factory=_eval_config)


def load_run_config(config: str | None, preset: str | None, overrides: dict) -> tuple[RunConfig, str]:
    """A RunConfig from a preset and/or a YAML file, then ``--set`` overrides; every field is
    checked here, before any model loads, and an error names the layer that set it."""
    layers, source = [], "defaults"
    if preset:
        path = PRESETS / f"{preset}.yaml"
        if not path.is_file():
            names = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
            raise InputError(f"no preset {preset!r} (presets: {names})")
        source = str(path)
        layers.append((read_yaml(path), Source("file", f"preset {preset} ({path})")))
    if config:
        source = config
        layers.append((read_yaml(config), Source("file", config)))
    if overrides:
        layers.append((overrides, Source("set")))
    return build_config(RunConfig, layers), source


class Pipeline:
    """Runs the stages of one RunConfig into one folder, skipping finished ones."""

    def __init__(self, cfg: RunConfig, out: str | Path, engine: Engine | None = None, overwrite: bool = False):
        from cai.constitution import load_constitution

        self.cfg, self.out = cfg, Path(out)
        self.resolved = yaml.safe_dump(json.loads(json.dumps(asdict(self.cfg))), sort_keys=False)
        if not overwrite:
            self._check_config()
        self.eng = engine or load_engine(cfg.model, cfg.device, cfg.dtype, cfg.cuda_graphs,
                                         rollout_weights=cfg.rollout_weights)
        self.con = load_constitution(cfg.constitution)
        # only once the model and constitution loaded, so a typo loses nothing
        if overwrite and distributed.is_main():
            self._clear()
        if distributed.is_main():  # rank 0 keeps the books; replaced whole, as other ranks may read it
            self.out.mkdir(parents=True, exist_ok=True)
            tmp = self.out / "config.yaml.tmp"
            tmp.write_text(self.resolved)
            tmp.replace(self.out / "config.yaml")
        distributed.barrier()
        self.state = self._read_state()

    # ---- bookkeeping ----------------------------------------------------------------------
    def _check_config(self) -> None:
        """Refuse other settings once a stage has written something into the folder; a
        start that wrote nothing (a wrong model path) pins nothing."""
        path = self.out / "config.yaml"
        if path.exists() and path.read_text() != self.resolved and self._has_records():
            raise InputError(f"{path}: this run folder was started with other settings; use the same "
                             "config to resume, another --out, or --overwrite to start it over")

    def _has_records(self) -> bool:
        """Whether any stage wrote something: a non-empty output file, bookkeeping aside."""
        for name in OUTPUTS:
            p = self.out / name
            files = [p] if p.is_file() else [q for q in p.rglob("*") if q.is_file()] if p.is_dir() else []
            if any(f.stat().st_size and f.name not in _BOOKKEEPING and not f.name.endswith(".meta.json")
                   for f in files):
                return True
        return any(f.stat().st_size for f in self._shards())

    def _shards(self) -> list[Path]:
        """What ranks of a distributed run left of the generating stages' outputs."""
        from cai.shards import shard_files

        return [f for name in _GENERATED for f in shard_files(self.out / name)]

    def _clear(self) -> None:
        for name in OUTPUTS:
            p = self.out / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
        for f in self._shards():
            f.unlink()
            meta_path(f).unlink(missing_ok=True)

    def _read_state(self) -> dict:
        path = self.out / "state.json"
        return json.loads(path.read_text()) if path.exists() else {"done": [], "seconds": {}}

    def _finish(self, stage: str, seconds: float, summary: dict) -> None:
        self.state["done"].append(stage)
        self.state["seconds"][stage] = round(seconds, 1)
        if not distributed.is_main():
            return
        tmp = self.out / "state.json.tmp"
        tmp.write_text(json.dumps(self.state, indent=2))
        tmp.replace(self.out / "state.json")
        with (self.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"stage": stage, "seconds": round(seconds, 1), **summary}) + "\n")

    def run(self) -> dict:
        for stage in STAGES:
            if stage in self.state["done"]:
                distributed.say(f"[{stage}] done earlier ({self.state['seconds'].get(stage, 0):.0f} s), skipped")
                continue
            distributed.say(f"[{stage}] ...")
            t0 = time.perf_counter()
            with profiling.phase(f"cai.run.{stage}"):
                summary = getattr(self, f"stage_{stage}")() or {}
            self._finish(stage, time.perf_counter() - t0, summary)
        return self.summary()

    # ---- prompt sets ----------------------------------------------------------------------
    def _prompts(self, source: str, start: int, count: int):
        from cai.prompts import select_prompts

        pool = select_prompts(source, "train")
        if not pool:
            raise InputError(f"{source}: no prompts")
        return [pool[(start + i) % len(pool)] for i in range(min(count, len(pool)))]

    def _adapter(self, name: str, folder: Path) -> str:
        """Make sure adapter ``name`` is attached (after a restart it is read from disk)."""
        from engine import lora

        if name not in lora.adapters(self.eng.model):
            lora.load_adapter(self.eng.model, name, folder)
        return name

    # ---- stages ---------------------------------------------------------------------------
    def stage_sl(self) -> dict:
        from tqdm import tqdm

        from cai.shards import open_output
        from cai.sl import SLRunner

        prompts = self._prompts(self.cfg.redteam_prompts, 0, self.cfg.sl_prompts)
        runner = SLRunner(self.eng, self.con, self.cfg.sl)
        mine = sum(len(c) for c in runner.chunks(prompts))
        with open_output(self.out / "sl.jsonl", runner.meta(), [p.id for p in prompts]) as out, \
                tqdm(total=mine, initial=sum(p.id in out.done for c in runner.chunks(prompts) for p in c),
                     desc="sl-cai", unit="example", disable=not distributed.is_main()) as bar:
            runner.run(prompts, out, bar)
        return {"records": out.count}

    def stage_helpful(self) -> dict:
        from cai import prompting
        from cai.shards import open_output

        prompts = self._prompts(self.cfg.helpful_prompts, 0, self.cfg.helpful_samples)
        meta = {"stage": "helpful", "model": self.eng.source, "n": len(prompts), "seed": self.cfg.seed}
        with open_output(self.out / "helpful.jsonl", meta, [p.id for p in prompts]) as out:
            # each rank its share; samples keyed by the prompt's place in the whole list
            todo = [(k, p) for k, p in distributed.shard(list(enumerate(prompts))) if p.id not in out.done]
            if todo:
                convs = [prompting.as_conversation(p.messages or p.prompt) for _, p in todo]
                params = SamplingParams(max_new_tokens=self.cfg.sl.max_new_tokens, temperature=self.cfg.sl.temperature,
                                        top_p=self.cfg.sl.top_p, seed=self.cfg.seed)
                outs = self.eng.generate(convs, params, progress=True, sample_keys=[k for k, _ in todo])
                out.append({"id": p.id, "messages": c + [{"role": "assistant", "content": prompting.clean_response(o.text)[0]}]}
                           for (_, p), c, o in zip(todo, convs, outs) if not prompting.is_degenerate(o.text))
        return {"records": out.count}

    def stage_sft(self) -> dict:
        from cai.sft import read_sft_file, train_sft

        examples = read_sft_file(self.out / "sl.jsonl")  # SL-CAI records: the revisions SFT selects
        if (self.out / "helpful.jsonl").exists() and self.cfg.helpful_samples:
            examples += read_sft_file(self.out / "helpful.jsonl")
        summary = train_sft(self.eng, examples, self.cfg.sft, self.out / "sft", progress=True)
        return {k: v for k, v in summary.items() if k != "losses"}

    def stage_label(self) -> dict:
        from tqdm import tqdm

        from cai.label import Labeller
        from cai.shards import open_output

        sets = [(self._prompts(self.cfg.redteam_prompts, self.cfg.sl_prompts, self.cfg.label_prompts), "harmlessness"),
                (self._prompts(self.cfg.helpful_prompts, self.cfg.helpful_samples, self.cfg.label_helpful_prompts),
                 "helpfulness")]
        sft = self._adapter("sft", self.out / "sft" / "adapter")
        labeller = Labeller(self.eng, self.con, self.cfg.label, sft)
        order = [p.id for ps, _ in sets for p in ps]
        mine = [p for ps, _ in sets for c in labeller.chunks(ps) for p in c]
        with open_output(self.out / "labels.jsonl", labeller.meta(), order) as out, \
                tqdm(total=len(mine), initial=sum(p.id in out.done for p in mine), desc="label", unit="pair",
                     disable=not distributed.is_main()) as bar:
            dropped = sum(labeller.run(ps, out, bar, aspect)["identical_dropped"] for ps, aspect in sets)
        return {"records": out.count, "identical_dropped": dropped}

    def stage_pm(self) -> dict:
        from cai.pm import train_pm
        from cai.records import read_jsonl

        records = read_jsonl(self.out / "labels.jsonl")
        return _scalars(train_pm(self.eng, records, self.cfg.pm, self.out / "pm", progress=True))

    def stage_rl(self) -> dict:
        sft = self._adapter("sft", self.out / "sft" / "adapter")
        if self.cfg.rl == "dpo":
            from cai.dpo import train_dpo
            from cai.records import read_jsonl

            records = read_jsonl(self.out / "labels.jsonl")
            return _scalars(train_dpo(self.eng, records, self.cfg.dpo, sft, self.out / "dpo", progress=True))
        from cai.pm import load_reward_model
        from cai.ppo import train_ppo

        prompts = self._prompts(self.cfg.redteam_prompts, self.cfg.sl_prompts, self.cfg.label_prompts)
        # the helpfulness prompts the labels used (those after the SFT samples; as many as the
        # red-team ones when no benign pair was labelled), as the red-team ones above
        helpful = self._prompts(self.cfg.helpful_prompts, self.cfg.helpful_samples,
                                self.cfg.label_helpful_prompts or self.cfg.label_prompts)
        reward = load_reward_model(self.eng, self.out / "pm" / "reward")
        log = train_ppo(self.eng, reward, prompts, self.cfg.ppo, sft_adapter=sft, out=self.out / "ppo", progress=True,
                        helpful_prompts=helpful)
        return _scalars(log[-1]) if log else {}

    def stage_eval(self) -> dict:
        from cai.eval import evaluate

        rl_dir = self.out / ("dpo" if self.cfg.rl == "dpo" else "ppo") / "policy"
        checkpoints = {"initial": None, "sl-cai": str(self.out / "sft" / "adapter"), "rl-cai": str(rl_dir)}
        metrics = {"sft": self.out / "sft" / "metrics.jsonl", "pm": self.out / "pm" / "metrics.jsonl",
                   "pm_eval": self.out / "pm" / "eval.json", self.cfg.rl: self.out / self.cfg.rl / "metrics.jsonl"}
        result = evaluate(self.eng, checkpoints, self.cfg.eval, self.out / "eval", progress=True,
                          constitution=self.con,
                          training_metrics={k: str(v) for k, v in metrics.items() if v.exists()})
        return {"summary": result["summary"]}

    # ---- summary ----------------------------------------------------------------------------
    def summary(self) -> dict:
        eval_json = self.out / "eval" / "eval.json"
        result = json.loads(eval_json.read_text()) if eval_json.exists() else {}
        total = sum(self.state["seconds"].values())
        lines = [f"# cai run: {self.out}", "", f"Model: `{self.eng.source}`; constitution: `{self.con.source}`; "
                 f"RL: {self.cfg.rl}.", "", "| stage | seconds |", "| --- | ---: |"]
        lines += [f"| {s} | {self.state['seconds'].get(s, 0):.0f} |" for s in STAGES]
        lines += [f"| **total** | **{total:.0f}** |", ""]
        report = self.out / "eval" / "report.md"
        if report.exists():
            lines += [report.read_text()]
        if distributed.is_main():
            (self.out / "report.md").write_text("\n".join(lines) + "\n")
            for png in (self.out / "eval").glob("*.png"):
                shutil.copy(png, self.out / png.name)
        return {"seconds": total, "stages": self.state["seconds"], "eval": result}


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool))}
