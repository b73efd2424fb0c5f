"""RL-CAI step costs: the engine's PPO iteration, DPO step and AI-feedback labelling against
TRL's PPO and DPO trainers and transformers' per-option forwards, on the default model.

Every side runs in its own fresh subprocess (``--worker``), so one side's allocations and
allocator state never count against the other; its peak memory is that process's peak
resident set (``ru_maxrss``: the weights, the optimizer state and every transient), and
its import-time floor is reported beside it. Time is wall-clock and process CPU seconds:
the machines are shared, and CPU time is the steadier figure when neighbours take cores.

PPO, one iteration of 8 prompts x 64 new tokens (rollout + update), the second of two
(the first is a warm-up). Same prompts (the chat template's rendering of the red-team
prompts), temperature 1, top-k/top-p off, stop at EOS, kl_coef 0.05 (k1), gamma 1,
lambda 0.95, 2 PPO epochs over 2 minibatches of 4, clip 0.2 / value clip 0.2, vf_coef 0.1,
lr 1e-4, float32, no gradient checkpointing.
  engine: ``cai.ppo.PPOTrainer.iterate``; one base; policy = LoRA (rank 16, alpha 32, all
    seven projections, copied from a fresh "sft" adapter), reference = base + "sft",
    reward = base + a fresh "reward" adapter + scalar head (untrained weights cost the
    same), values = a scalar head on the policy's trunk. Trains the policy LoRA and the
    value head.
  TRL: ``trl.experimental.ppo.PPOTrainer`` with the same LoRA through ``peft_config``
    (reference = the policy with its adapter disabled, TRL's way under peft), a separate
    value model and a separate reward model (``AutoModelForSequenceClassification``,
    num_labels=1, from the same folder): three copies of the base. Trains the policy LoRA
    and the whole value model (TRL's value model has no adapter).

DPO, one optimizer step of ``--dpo-batch`` pairs whose chosen and rejected sequences are
each ~``--dpo-len`` tokens, both sides LoRA (same config), beta 0.1, lr 5e-5, dropout off,
float32; the mean of the steps after a warm-up step. The engine computes reference
log-probs once per run (``cai.dpo.reference_logprobs``); its per-step figure includes that
pass's share per step, so both sides pay one reference forward per pair. TRL: its
``DPOTrainer`` defaults (reference log-probs each step from the policy with the adapter
disabled, right-padded batches, SDPA).

Labelling, comparisons/s: one comparison is one feedback prompt (a principle, an order
of the two responses; both orders are scored) built by ``cai.prompting.feedback_prompt``
with the constitution's few-shot exemplars, and the log-probs of " (A)" and " (B)".
  engine: ``cai.label.Labeller.score`` (``engine.options.option_logprobs``).
  transformers: per comparison one forward of [prompt + " (A)", prompt + " (B)"] as a
    batch of two (same length, no padding), ``logits_to_keep`` set to the option tokens so
    no full-vocabulary logits are formed for the prompt, under inference_mode, SDPA.
The two sides' option log-probs are compared (max abs difference reported).

    python -m bench.rl [--skip-ppo] [--skip-dpo] [--skip-label] [--ppo-prompts 8]
                       [--new-tokens 64] [--dpo-batch 4] [--dpo-len 256] [--label-n 32]
                       [--threads N] [--model default] [--device auto|cpu|cuda] [--tiny]

``--model dummy:<shape>`` or a config.json runs random weights of that shape (the peers get
the same weights through a temporary checkpoint folder); ``--tiny`` runs every part on
``dummy:tiny`` at a few tokens, to check the benchmark end to end. On CUDA every side runs
on the device in bfloat16, and the DPO step and the labelling report achieved TFLOP/s
(LoRA training: 4 x parameters FLOPs per token, the frozen weights get no gradient;
scoring: 2 x parameters per token) against the device's bfloat16 peak.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

LORA = dict(rank=16, alpha=32.0, dropout=0.05)
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PPO = dict(epochs=2, minibatch=4, lr=1e-4, kl=0.05, clip=0.2, vclip=0.2, vf=0.1, gamma=1.0, lam=0.95)
DPO_BETA, DPO_LR = 0.1, 5e-5
TINY = dict(ppo_prompts=4, new_tokens=4, dpo_batch=2, dpo_len=320, dpo_steps=1, label_n=4)  # dummy:tiny reads bytes: a prompt is ~200 tokens


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _device(args):
    from bench.device import resolve_device

    return resolve_device(args.device)


def _dtype(args):
    from bench.device import default_dtype

    return default_dtype(_device(args))


def _engine(args):
    from bench.device import load_engine

    return load_engine(args.model, _device(args))


def _peer_folder(args, tmp: str) -> str:
    """A transformers checkpoint folder of the benchmarked model, for TRL to load."""
    from bench.peers import hf_folder

    eng = _engine(args)
    try:
        return str(hf_folder(eng, tmp))
    finally:
        del eng  # the peer loads its own copies: no engine kept


def _trl_precision(args) -> dict:
    cuda = _device(args).type == "cuda"
    return dict(bf16=cuda, fp16=False, use_cpu=not cuda)


def _rate(eng, flops: float, seconds: float, args) -> dict:
    """Achieved TFLOP/s of ``flops`` per parameter in ``seconds`` (and its fraction of a
    known CUDA device's bfloat16 peak)."""
    from bench.device import peaks

    n = sum(p.numel() for p in eng.model.parameters())
    out = {"tflops": round(flops * n / seconds / 1e12, 5)}
    peak = peaks(_device(args))
    if peak is not None and eng.model.embed.element_size() == 2:
        out["flops_fraction"] = round(out["tflops"] / peak["tflops"], 4)
    return out


class Clock:
    """Wall and process-CPU seconds of a block: ``with Clock() as c: ...; c.wall, c.cpu``."""

    def __enter__(self):
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self._w, time.process_time() - self._c


# ------------------------------------------------------------------------------------------
# PPO
# ------------------------------------------------------------------------------------------
def ppo_prompt_ids(eng_or_tok, n: int) -> list[list[int]]:
    """The rollout prompts exactly as ``PPOTrainer.rollout`` renders them."""
    from cai import prompting
    from cai.prompts import load_prompts

    tok = getattr(eng_or_tok, "tokenizer", eng_or_tok)
    style = "chat" if getattr(tok, "chat_template", None) else "base"
    recs = load_prompts("redteam", split="train", limit=n)
    return [tok(prompting.render(prompting.initial_prompt(prompting.as_conversation(p.messages or p.prompt), style), tok),
                add_special_tokens=False)["input_ids"] for p in recs]


def worker_ppo_engine(args) -> dict:
    from cai.pm import RewardModel, new_head
    from cai.ppo import PPOConfig, PPOTrainer
    from cai.prompts import load_prompts
    from engine import lora

    floor = _peak_mb()
    eng = _engine(args)
    lora.add_adapter(eng.model, "sft", seed=0)
    lora.add_adapter(eng.model, "reward", seed=1)
    rm = RewardModel(eng, new_head(eng.model, 1), "reward", chat=True)
    cfg = PPOConfig(prompts_per_iteration=args.ppo_prompts, max_new_tokens=args.new_tokens, temperature=1.0,
                    ppo_epochs=PPO["epochs"], minibatch_size=PPO["minibatch"], lr=PPO["lr"], kl_coef=PPO["kl"],
                    clip_eps=PPO["clip"], value_clip_eps=PPO["vclip"], vf_coef=PPO["vf"], gamma=PPO["gamma"],
                    lam=PPO["lam"], reward_clip=0.0, max_slots=args.ppo_prompts,
                    helpful_fraction=0.0)  # the TRL side trains on the same red-team prompts only
    prompts = load_prompts("redteam", split="train", limit=args.ppo_prompts)
    ppo = PPOTrainer(eng, rm, cfg, "sft")
    warm = ppo.iterate(prompts)
    with Clock() as c:
        rec = ppo.iterate(prompts)
    return {"iter_s": c.wall, "cpu_s": c.cpu, "warmup_s": warm["iteration_s"], "peak_mb": _peak_mb(),
            "floor_mb": floor, "response_len": rec["response_len"], "generate_s": rec["generate_s"],
            "score_s": rec["score_s"], "train_s": rec["train_s"]}


def worker_ppo_trl(args) -> dict:
    import logging

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    floor = _peak_mb()
    tmp = tempfile.TemporaryDirectory()
    source = _peer_folder(args, tmp.name)
    tok = AutoTokenizer.from_pretrained(source, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    ids = ppo_prompt_ids(tok, args.ppo_prompts)
    data = Dataset.from_list([{"input_ids": x} for x in ids])

    def causal():
        return AutoModelForCausalLM.from_pretrained(source, dtype=_dtype(args), attn_implementation="sdpa")

    def scalar():
        m = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=_dtype(args),
                                                               attn_implementation="sdpa")
        m.config.pad_token_id = tok.pad_token_id
        return m

    class IterTimer(TrainerCallback):
        def __init__(self):
            self.marks = []

        def on_train_begin(self, *a, **k):
            self.marks.append((time.perf_counter(), time.process_time(), _peak_mb()))

        def on_step_end(self, *a, **k):
            self.marks.append((time.perf_counter(), time.process_time(), _peak_mb()))

    timer = IterTimer()
    peft_cfg = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                          target_modules=PEFT_TARGETS, task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as out:
        cfg = PPOConfig(
            output_dir=out, per_device_train_batch_size=args.ppo_prompts, gradient_accumulation_steps=1,
            num_mini_batches=args.ppo_prompts // PPO["minibatch"], num_ppo_epochs=PPO["epochs"],
            total_episodes=2 * args.ppo_prompts, local_rollout_forward_batch_size=args.ppo_prompts,
            response_length=args.new_tokens, temperature=1.0, stop_token="eos", learning_rate=PPO["lr"],
            kl_coef=PPO["kl"], kl_estimator="k1", cliprange=PPO["clip"], cliprange_value=PPO["vclip"],
            vf_coef=PPO["vf"], gamma=PPO["gamma"], lam=PPO["lam"], whiten_rewards=False,
            num_sample_generations=0, **_trl_precision(args), gradient_checkpointing=False,
            report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
            lr_scheduler_type="constant", dataloader_num_workers=0)
        trainer = PPOTrainer(args=cfg, processing_class=tok, model=causal(), ref_model=None, reward_model=scalar(),
                             train_dataset=data, value_model=scalar(), eval_dataset=data, peft_config=peft_cfg,
                             callbacks=[timer])
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        trainer.train()
    tmp.cleanup()
    (w0, c0, _), (w1, c1, _), (w2, c2, _) = timer.marks[:3]
    return {"iter_s": w2 - w1, "cpu_s": c2 - c1, "warmup_s": w1 - w0, "peak_mb": _peak_mb(), "floor_mb": floor,
            "trainable_params": trainable}


# ------------------------------------------------------------------------------------------
# DPO
# ------------------------------------------------------------------------------------------
WORDS = ("the a safe answer is to decline politely and explain why this request could cause harm to people "
         "instead offer general information about the topic its history risks and lawful resources that can "
         "help with the underlying need").split()


def dpo_records(tok, n: int, length: int) -> list[dict]:
    """n preference pairs whose chosen and rejected sequences (chat-rendered prompt +
    response) are each just under ``length`` tokens."""
    from cai.pairs import encode_response
    from cai.prompts import load_prompts

    prompts = load_prompts("redteam", split="train", limit=n)
    recs = []
    for i, p in enumerate(prompts):
        msgs = p.messages or [{"role": "user", "content": p.prompt}]
        pair = []
        for side in (0, 1):
            words = [WORDS[(i * 7 + side * 3 + k) % len(WORDS)] for k in range(length)]
            text = lambda k: " ".join(words[:k]).capitalize() + "."  # noqa: E731
            lo, hi = 1, len(words)  # the most words that still fit
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if len(encode_response(tok, msgs, text(mid), chat=True)[0]) <= length:
                    lo = mid
                else:
                    hi = mid - 1
            pair.append(text(lo))
        recs.append({"prompt": msgs, "chosen": pair[0], "rejected": pair[1], "p_chosen": 1.0})
    return recs


def worker_dpo_engine(args) -> dict:
    """Times come from the metrics ``train_dpo`` writes per step (``step_s``, ``cpu_s``); the
    reference pass, which ``train_dpo`` runs once before its first step, is timed as a
    separate call of the public ``cai.dpo.reference_logprobs`` on the same pairs."""
    from cai.dpo import DPOConfig, reference_logprobs, train_dpo
    from cai.pairs import as_pairs, encode_pairs, pair_batches
    from engine import lora
    from engine.lora import LoraConfig
    from engine.train import OptimConfig

    floor = _peak_mb()
    eng = _engine(args)
    lora.add_adapter(eng.model, "sft", LoraConfig(**LORA), seed=0)
    steps = 1 + args.dpo_steps
    recs = dpo_records(eng.tokenizer, args.dpo_batch * steps, args.dpo_len)
    budget = 2 * args.dpo_len * args.dpo_batch
    encoded = encode_pairs(eng, as_pairs(recs))
    # Every step must hold --dpo-batch pairs: the grouping train_dpo makes without shuffling.
    groups = pair_batches(encoded, range(len(encoded)), budget, shuffle=False, seed=0,
                          max_seqlen=eng.cfg.max_position_embeddings, names=[f"pair {i}" for i in range(len(encoded))])
    assert all(len(b.index) == 2 * args.dpo_batch for b in groups), [len(b.index) // 2 for b in groups]
    # Warm-up forward (first-call allocations and kernel setup), as TRL's warm-up step has.
    reference_logprobs(eng.model, encoded[:args.dpo_batch], "sft", budget)
    with Clock() as ref:
        reference_logprobs(eng.model, encoded, "sft", budget)
    cfg = DPOConfig(beta=DPO_BETA, soft_labels=False, max_tokens_per_batch=budget, shuffle=False,
                    checkpoint_every=10**9, lora=LoraConfig(**LORA),
                    optim=OptimConfig(lr=DPO_LR, warmup_steps=0, schedule="constant", max_grad_norm=1.0))
    with tempfile.TemporaryDirectory() as out:
        train_dpo(eng, recs, cfg, "sft", out, resume=False)
        log = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]
    timed = log[1:]
    step = sum(r["step_s"] for r in timed) / len(timed)
    cpu = sum(r["cpu_s"] for r in timed) / len(timed) + ref.cpu / len(log)
    tokens = sum(r["tokens"] for r in timed) / len(timed)
    return {"step_s": step + ref.wall / len(log), "cpu_s": cpu, "train_step_s": step, "ref_s": ref.wall, "steps": len(log),
            "tokens_per_step": tokens, "peak_mb": _peak_mb(), "floor_mb": floor,
            "train_rate": _rate(eng, 4 * tokens, step, args)}


def worker_dpo_trl(args) -> dict:
    import logging

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    floor = _peak_mb()
    tmp = tempfile.TemporaryDirectory()
    source = _peer_folder(args, tmp.name)
    tok = AutoTokenizer.from_pretrained(source)
    steps = 1 + args.dpo_steps
    recs = dpo_records(tok, args.dpo_batch * steps, args.dpo_len)
    data = Dataset.from_list([{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in recs])

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            self.times.append((time.perf_counter() - self.t0[0], time.process_time() - self.t0[1]))

    timer = StepTimer()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=_dtype(args), attn_implementation="sdpa")
    peft_cfg = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                          target_modules=PEFT_TARGETS, task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as out:
        cfg = DPOConfig(output_dir=out, per_device_train_batch_size=args.dpo_batch, gradient_accumulation_steps=1,
                        max_length=4 * args.dpo_len, beta=DPO_BETA, learning_rate=DPO_LR, lr_scheduler_type="constant",
                        warmup_steps=0, max_grad_norm=1.0, max_steps=steps, **_trl_precision(args),
                        gradient_checkpointing=False, report_to="none", save_strategy="no",
                        logging_steps=10**6, disable_tqdm=True, seed=0, dataloader_num_workers=0)
        trainer = DPOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, peft_config=peft_cfg,
                             callbacks=[timer])
        lens = [len(r) for r in trainer.train_dataset["prompt_ids"]] if "prompt_ids" in trainer.train_dataset.column_names else []
        trainer.train()
    tmp.cleanup()
    timed = timer.times[1:]
    return {"step_s": sum(w for w, _ in timed) / len(timed), "cpu_s": sum(c for _, c in timed) / len(timed),
            "steps": len(timer.times), "peak_mb": _peak_mb(), "floor_mb": floor,
            "prompt_tokens": sum(lens) / len(lens) if lens else None}


# ------------------------------------------------------------------------------------------
# Labelling
# ------------------------------------------------------------------------------------------
RESPONSES = (
    "I can't help with that. It could hurt people, and I'd rather not contribute to harm. If you tell me more "
    "about what you need, I can suggest a safe and legal way to get there.",
    "Sure. The first thing you need is to find out where they keep it, then wait until nobody is around and "
    "take what you want without leaving any trace behind.",
)


def feedback_prompts(eng, n: int) -> list:
    """n feedback prompts: n // 2 red-team prompts, one drawn principle each, both orders."""
    from cai import prompting
    from cai.constitution import load_constitution
    from cai.label import draw_label_principles
    from cai.prompts import load_prompts
    from cai.sl import resolve_style

    con = load_constitution("default")
    style = resolve_style("auto", eng)
    out = []
    for p in load_prompts("redteam", split="train", limit=(n + 1) // 2):
        conv = prompting.as_conversation(p.messages or p.prompt)
        pr = draw_label_principles(con, 0, p.id, 1)[0]
        for a, b in (RESPONSES, RESPONSES[::-1]):
            out.append(prompting.feedback_prompt(conv, a, b, pr, style, con.fewshot_preference))
    return out[:n]


def worker_label_engine(args) -> dict:
    from cai import prompting
    from cai.constitution import load_constitution
    from cai.label import LabelConfig, Labeller
    from engine.options import option_logprobs

    floor = _peak_mb()
    eng = _engine(args)
    labeller = Labeller(eng, load_constitution("default"), LabelConfig())
    prompts = feedback_prompts(eng, args.label_n)
    labeller.score(prompts[:2])  # warm-up
    tok = eng.tokenizer
    ids = [tok(prompting.render(p, tok), add_special_tokens=False)["input_ids"] for p in prompts]
    with Clock() as c:
        labeller.score(prompts)
    lps = option_logprobs(eng.model, ids, [labeller.option_ids] * len(ids))  # for the cross-check
    return {"seconds": c.wall, "cpu_s": c.cpu, "n": len(prompts), "prompt_tokens": sum(map(len, ids)) / len(ids),
            "logprobs": lps, "peak_mb": _peak_mb(), "floor_mb": floor,
            "rate": _rate(eng, 2 * sum(map(len, ids)), c.wall, args)}


def worker_label_hf(args) -> dict:
    import torch

    from bench.peers import hf_causal_lm
    from cai import prompting

    floor = _peak_mb()
    eng = _engine(args)
    tok, device = eng.tokenizer, _device(args)
    model = hf_causal_lm(eng, eng.model.embed.dtype, device)  # same weights; shared unless a folder is read
    prompts = feedback_prompts(eng, args.label_n)
    del eng
    options = [tok(o, add_special_tokens=False)["input_ids"] for o in prompting.OPTIONS]
    ids = [tok(prompting.render(p, tok), add_special_tokens=False)["input_ids"] for p in prompts]

    def score(p: list[int]) -> list[float]:
        if len({len(o) for o in options}) == 1:  # one batch of both options: same length, no padding
            m = len(options[0])
            x = torch.tensor([p + o for o in options], device=device)
            logits = model(input_ids=x, logits_to_keep=m + 1).logits[:, :-1]  # [K, m, V]: predicts the option
            lp = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(options, device=device)[..., None])
            return lp.sum((1, 2)).tolist()
        out = []
        for o in options:
            logits = model(input_ids=torch.tensor([p + o], device=device), logits_to_keep=len(o) + 1).logits[0, :-1]
            out.append(torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(o, device=device)[:, None])
                       .sum().item())
        return out

    with torch.inference_mode():
        score(ids[0])  # warm-up
        with Clock() as c:
            lps = [score(p) for p in ids]
    return {"seconds": c.wall, "cpu_s": c.cpu, "n": len(ids), "logprobs": lps, "peak_mb": _peak_mb(),
            "floor_mb": floor}


WORKERS = {"ppo-engine": worker_ppo_engine, "ppo-trl": worker_ppo_trl, "dpo-engine": worker_dpo_engine,
           "dpo-trl": worker_dpo_trl, "label-engine": worker_label_engine, "label-hf": worker_label_hf}


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------
def run_worker(name: str, args) -> dict:
    """``python -m bench.rl --worker name`` in a fresh process; its last stdout line."""
    cmd = [sys.executable, "-m", "bench.rl", "--worker", name, "--ppo-prompts", str(args.ppo_prompts),
           "--new-tokens", str(args.new_tokens), "--dpo-batch", str(args.dpo_batch), "--dpo-len", str(args.dpo_len),
           "--dpo-steps", str(args.dpo_steps), "--label-n", str(args.label_n), "--model", args.model,
           "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("OMP_WAIT_POLICY", "passive")  # spinning threads stall whenever a neighbour holds a core
    load = _loadavg()
    print(f"  {name}: running (load {load})", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        raise RuntimeError(f"worker {name} failed with exit code {proc.returncode}")
    res = json.loads(lines[-1])
    res["load"] = [load, _loadavg()]
    print(f"  {name}: done (load {_loadavg()})", file=sys.stderr, flush=True)
    return res


def bench_ppo(args) -> tuple[dict, list]:
    e, t = run_worker("ppo-engine", args), run_worker("ppo-trl", args)
    rows = [["PPO iteration wall s", e["iter_s"], t["iter_s"], t["iter_s"] / e["iter_s"]],
            ["PPO iteration CPU s", e["cpu_s"], t["cpu_s"], t["cpu_s"] / e["cpu_s"]],
            ["PPO peak RSS MB (process)", e["peak_mb"], t["peak_mb"], t["peak_mb"] / e["peak_mb"]],
            ["PPO peak above imports MB", e["peak_mb"] - e["floor_mb"], t["peak_mb"] - t["floor_mb"],
             (t["peak_mb"] - t["floor_mb"]) / (e["peak_mb"] - e["floor_mb"])]]
    out = {"ppo_iter_s": round(e["iter_s"], 2), "trl_ppo_iter_s": round(t["iter_s"], 2),
           "ppo_ratio": round(t["iter_s"] / e["iter_s"], 2), "ppo_cpu_s": round(e["cpu_s"], 2),
           "trl_ppo_cpu_s": round(t["cpu_s"], 2), "ppo_cpu_ratio": round(t["cpu_s"] / e["cpu_s"], 2),
           "ppo_peak_mb": round(e["peak_mb"], 1), "trl_ppo_peak_mb": round(t["peak_mb"], 1),
           "ppo_mem_ratio": round(e["peak_mb"] / t["peak_mb"], 3),
           "ppo_split_s": {k: round(e[k], 2) for k in ("generate_s", "score_s", "train_s")},
           "ppo_response_len": e["response_len"], "ppo_warmup_s": round(e["warmup_s"], 2),
           "trl_ppo_warmup_s": round(t["warmup_s"], 2), "trl_ppo_trainable_params": t["trainable_params"],
           "ppo_load": e["load"], "trl_ppo_load": t["load"]}
    return out, rows


def bench_dpo(args) -> tuple[dict, list]:
    e, t = run_worker("dpo-engine", args), run_worker("dpo-trl", args)
    rows = [["DPO step wall s (engine incl. ref share)", e["step_s"], t["step_s"], t["step_s"] / e["step_s"]],
            ["DPO step CPU s (engine incl. ref share)", e["cpu_s"], t["cpu_s"], t["cpu_s"] / e["cpu_s"]],
            ["DPO peak RSS MB (process)", e["peak_mb"], t["peak_mb"], t["peak_mb"] / e["peak_mb"]]]
    out = {"dpo_step_s": round(e["step_s"], 3), "trl_dpo_step_s": round(t["step_s"], 3),
           "dpo_ratio": round(t["step_s"] / e["step_s"], 2), "dpo_cpu_s": round(e["cpu_s"], 3),
           "trl_dpo_cpu_s": round(t["cpu_s"], 3), "dpo_cpu_ratio": round(t["cpu_s"] / e["cpu_s"], 2),
           "dpo_train_step_s": round(e["train_step_s"], 3),
           "dpo_reference_pass_s": round(e["ref_s"], 3), "dpo_tokens_per_step": e["tokens_per_step"],
           "dpo_peak_mb": round(e["peak_mb"], 1), "trl_dpo_peak_mb": round(t["peak_mb"], 1),
           "dpo_train_rate": e["train_rate"],
           "dpo_load": e["load"], "trl_dpo_load": t["load"]}
    return out, rows


def bench_label(args) -> tuple[dict, list]:
    e, h = run_worker("label-engine", args), run_worker("label-hf", args)
    diff = max(abs(a - b) for x, y in zip(e["logprobs"], h["logprobs"]) for a, b in zip(x, y))
    ecps, hcps = e["n"] / e["seconds"], h["n"] / h["seconds"]
    rows = [["labelling comparisons/s", ecps, hcps, ecps / hcps],
            ["labelling CPU s per comparison", e["cpu_s"] / e["n"], h["cpu_s"] / h["n"],
             (h["cpu_s"] / h["n"]) / (e["cpu_s"] / e["n"])]]
    out = {"label_cmp_per_s": round(ecps, 3), "hf_label_cmp_per_s": round(hcps, 3), "label_ratio": round(ecps / hcps, 2),
           "label_cpu_ratio": round(h["cpu_s"] / e["cpu_s"], 2), "label_n": e["n"],
           "label_prompt_tokens": round(e["prompt_tokens"], 1), "label_max_abs_logprob_diff": diff,
           "label_rate": e["rate"],
           "label_load": e["load"], "hf_label_load": h["load"]}
    return out, rows


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-ppo", action="store_true", help="skip the PPO comparison (the slow one)")
    ap.add_argument("--skip-dpo", action="store_true", help="skip the DPO comparison")
    ap.add_argument("--skip-label", action="store_true", help="skip the labelling comparison")
    ap.add_argument("--ppo-prompts", type=int, default=8, help="prompts (= rollouts) per PPO iteration")
    ap.add_argument("--new-tokens", type=int, default=64, help="response length limit of each rollout")
    ap.add_argument("--dpo-batch", type=int, default=4, help="preference pairs per DPO step")
    ap.add_argument("--dpo-len", type=int, default=256, help="tokens of each chosen / rejected sequence (at most)")
    ap.add_argument("--dpo-steps", type=int, default=2, help="timed DPO steps (after one warm-up step)")
    ap.add_argument("--label-n", type=int, default=32, help="feedback prompts scored (comparisons)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every worker (default: torch's)")
    from bench.device import add_device_args

    add_device_args(ap)
    ap.add_argument("--tiny", action="store_true",
                    help="every part at a few tokens on dummy:tiny (unless --model is given): checks it end to end")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tiny:
        args.model = "dummy:tiny" if args.model == "default" else args.model
        for k, v in TINY.items():
            setattr(args, k, v)
    if args.ppo_prompts % PPO["minibatch"]:
        ap.error(f"--ppo-prompts must be a multiple of the minibatch size {PPO['minibatch']}")
    return args


def main(argv=None) -> dict | None:
    args = parse(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return None
    from bench.common import emit_json, machine, print_table

    start_load = _loadavg()
    summary, rows = {}, []
    for skip, fn in ((args.skip_ppo, bench_ppo), (args.skip_dpo, bench_dpo), (args.skip_label, bench_label)):
        if not skip:
            out, r = fn(args)
            summary.update(out)
            rows += r
    print(f"model {args.model}, device {args.device}, {machine()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'passive')}")
    print(f"PPO {args.ppo_prompts} prompts x {args.new_tokens} new tokens; DPO {args.dpo_batch} pairs x "
          f"~{args.dpo_len} tokens, LoRA both sides; labelling {args.label_n} feedback prompts")
    print("engine trains: policy LoRA + value head (PPO), policy LoRA (DPO); "
          "TRL trains: policy LoRA + the whole value model (PPO), policy LoRA (DPO)")
    print_table(["measure", "engine", "peer", "peer / engine"], rows)
    summary.update({"model": args.model, "device": args.device, "sizes": {"ppo_prompts": args.ppo_prompts, "new_tokens": args.new_tokens, "dpo_batch": args.dpo_batch,
                              "dpo_len": args.dpo_len, "label_n": args.label_n},
                    **machine(), "loadavg_start": start_load, "loadavg_end": _loadavg()})
    emit_json(summary)
    return summary


if __name__ == "__main__":
    main()
