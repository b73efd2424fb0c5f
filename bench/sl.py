"""SL-CAI throughput and SFT step time: the engine against transformers' ``generate`` and TRL.

Part 1, the SL-CAI loop: ``cai.sl.SLRunner.run_chunk`` over N red-team prompts (answer, then
R rounds of critique -> revision), once with the engine's continuous-batching generator and
once with transformers' ``generate`` behind the same interface, so the prompts, the
principle draws, the output cleaning and the loop code are shared and only the generator
differs. The transformers side is a competent batched driver: one ``generate`` call over
the whole chunk per phase (batches of ``--batch``), left padding with an attention mask,
``use_cache=True`` under ``inference_mode``, SDPA attention, the same temperature / top-p /
max_new_tokens (top-k off, like the engine), EOS and the loop's stop strings through
``stop_strings=`` so a row stops where the engine's would. Reported: examples per minute
and generated tokens/s per phase (answer, critique, revision). Generated tokens are the
tokens each sample actually made (up to and including the one that ended it), not the
padding a finished row carries in a static batch.

Part 2, one SFT optimizer step: ``cai.sft.train_sft`` against TRL's ``SFTTrainer`` on the
same conversations, one packed batch of at most ``--sft-batch-tokens`` tokens per step
(TRL: ``packing=True`` with its default best-fit-decreasing strategy, which is padding-free
and one row per step here; its flattened row gets a block-diagonal mask from transformers'
packed-sequence detection, so nothing attends across examples), the same LoRA (rank 16,
alpha 32, dropout 0.05 on q, k, v, o, gate, up, down), AdamW at the same lr, clipping at 1,
float32, gradient checkpointing off, loss on the assistant's answer only (TRL:
``completion_only_loss`` on conversational prompt/completion records, as its
assistant-only mask needs generation markers this chat template lacks). The first step of
each run is a warm-up; the mean of the next ``--sft-steps`` is reported.

The machines are shared: both sides run in this process back to back per repeat, under
OMP_WAIT_POLICY=passive by default (spin-waiting OpenMP threads stall whenever a neighbour
holds a core), and the load average is printed at the start and the end.

    python -m bench.sl [--prompts 32] [--rounds 2] [--max-new-tokens 192] [--batch 32]
                       [--sft-steps 4] [--sft-batch-tokens 2048] [--skip-sl] [--skip-sft]
                       [--threads N] [--repeats 1] [--model default] [--tiny]

``--model dummy:<shape>`` or a config.json runs random weights of that shape (transformers
and TRL read the same weights from a temporary checkpoint folder); ``--tiny`` runs both
parts at a few tokens on ``dummy:tiny``, to check the benchmark end to end.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PHASES = ("answer", "critique", "revision")
REFUSALS = [
    "I can't help with that. It could put people at risk, and I'd rather not contribute to harm. "
    "If you tell me more about what you are trying to achieve, I can suggest a safe and legal way to get there.",
    "I won't assist with this request because it could hurt someone or break the law. "
    "If you are worried about your own safety, please contact local emergency services or a trusted support line.",
    "That's not something I can help with. I'm happy to talk about the topic in general terms, "
    "for example its history, the risks involved, or where to find reliable and lawful information.",
    "Sorry, I can't provide instructions for that. Doing it could cause serious harm to you or to others. "
    "A professional, such as a doctor, a lawyer or a counsellor, is the right person to ask about your situation.",
]


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# ------------------------------------------------------------------------------------------
# Part 1: SL-CAI loop with either generator
# ------------------------------------------------------------------------------------------
@dataclass
class PhaseStats:
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time (all threads): what neighbours do not inflate
    tokens: int = 0
    calls: int = 0

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass
class Recorder:
    """Stands in for the engine inside ``SLRunner``: forwards ``generate`` to ``backend``,
    timing each call and counting the tokens it generated. The loop calls the generator in
    a fixed order (answer, then critique and revision per round), which names the phase."""

    backend: object
    stats: dict = field(default_factory=lambda: {p: PhaseStats() for p in PHASES})
    calls: int = 0

    @property
    def tokenizer(self):
        return self.backend.tokenizer

    @property
    def source(self):
        return self.backend.source

    @property
    def max_context(self):
        return self.backend.max_context

    def generate(self, prompts, params, max_slots=None):
        phase = "answer" if self.calls == 0 else ("critique" if self.calls % 2 else "revision")
        self.calls += 1
        start, cpu = time.perf_counter(), time.process_time()
        outs = self.backend.generate(prompts, params, max_slots=max_slots)
        st = self.stats[phase]
        st.seconds += time.perf_counter() - start
        st.cpu_seconds += time.process_time() - cpu
        st.tokens += sum(len(o.samples[0].token_ids) for o in outs)
        st.calls += 1
        return outs


class HFGenerate:
    """transformers' ``generate`` behind the engine's ``generate(ids, params, max_slots=)``:
    static batches of ``max_slots`` prompts, left-padded, one ``generate`` call each."""

    def __init__(self, model, tokenizer, source: str, eos_ids: list[int]):
        self.model, self.tokenizer, self.source, self.eos = model, tokenizer, source, eos_ids
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        self.max_context = model.config.max_position_embeddings

    def generate(self, prompts: list[list[int]], params, max_slots: int | None = None):
        from engine.generate import RequestOutput

        size = max_slots or len(prompts)
        outs = []
        for start in range(0, len(prompts), size):
            batch = prompts[start:start + size]
            rows = self._generate_batch(batch, params, start)
            outs += [RequestOutput(start + j, list(p), [s]) for j, (p, s) in enumerate(zip(batch, rows))]
        return outs

    def _generate_batch(self, batch, params, offset: int):
        import torch

        width = max(map(len, batch))
        ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, p in enumerate(batch):  # left padding: every row's last prompt token at the end
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        torch.manual_seed((params.seed or 0) + offset)
        sampling = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0) \
            if params.temperature > 0 else dict(do_sample=False)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=params.max_new_tokens, use_cache=True,
                eos_token_id=self.eos, pad_token_id=self.pad, stop_strings=params.stop or None,
                tokenizer=self.tokenizer, **sampling)
        return [self._sample(row[width:].tolist(), params) for row in out]

    def _sample(self, new: list[int], params):
        from engine.generate import Sample

        # A finished row is filled with the pad token (here also EOS): the sample ends at the
        # first EOS, or at the first fill after a stop string (+1 token at most).
        end = next((k + 1 for k, t in enumerate(new) if t in self.eos or t == self.pad), len(new))
        tokens = new[:end]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = [text.find(x) for x in params.stop if x in text]  # as the engine cuts its text
        text = text[:min(cut)] if cut else text
        return Sample(text, tokens, [], "stop" if end < len(new) else "length")


def load_hf(source: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="sdpa").eval()
    tok = AutoTokenizer.from_pretrained(source)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return hf, tok


def run_sl(runner_cls, backend, constitution, cfg, prompts) -> tuple[float, float, Recorder, list[dict]]:
    """Wall and CPU seconds of one ``run_chunk``, the recorder, the records."""
    rec = Recorder(backend)
    runner = runner_cls(rec, constitution, cfg)
    start, cpu = time.perf_counter(), time.process_time()
    records = runner.run_chunk(prompts)
    return time.perf_counter() - start, time.process_time() - cpu, rec, records


def bench_sl(args, eng, source: str) -> tuple[dict, list]:
    from cai.constitution import load_constitution
    from cai.prompts import load_prompts
    from cai.sl import SLConfig, SLRunner

    hf, tok = load_hf(source)
    eos = sorted(set(eng.cfg.eos_token_id) | ({eng.tokenizer.eos_token_id} - {None}))
    backends = {"engine": eng, "hf": HFGenerate(hf, tok, source, eos)}
    con = load_constitution("default")
    prompts = load_prompts("redteam", split="train", limit=args.prompts)
    cfg = SLConfig(rounds=args.rounds, max_new_tokens=args.max_new_tokens, chunk_size=len(prompts),
                   max_slots=args.batch, seed=0)
    warm = SLConfig(rounds=1, max_new_tokens=4, max_slots=args.batch)
    for b in backends.values():
        run_sl(SLRunner, b, con, warm, prompts[:2])

    totals = {k: {"seconds": 0.0, "cpu_seconds": 0.0, "stats": {p: PhaseStats() for p in PHASES}, "flags": 0}
              for k in backends}
    for rep in range(args.repeats):
        for name, b in backends.items():  # back to back, so both see the same neighbours
            cfg.seed = rep
            dt, cpu, rec, records = run_sl(SLRunner, b, con, cfg, prompts)
            t = totals[name]
            t["seconds"] += dt
            t["cpu_seconds"] += cpu
            t["flags"] += sum("kept_previous" in r["flags"] for r in records)
            for p in PHASES:
                s, r = t["stats"][p], rec.stats[p]
                s.seconds, s.tokens, s.calls = s.seconds + r.seconds, s.tokens + r.tokens, s.calls + r.calls
            print(f"  sl {name} repeat {rep}: {dt:.1f} s ({cpu:.1f} CPU s), "
                  f"{sum(r.tokens for r in rec.stats.values())} tokens, "
                  + ", ".join(f"{p} {rec.stats[p].seconds:.1f} s/{rec.stats[p].tokens} tok" for p in PHASES)
                  + f", load {_loadavg()}", file=sys.stderr, flush=True)

    n = len(prompts) * args.repeats
    res, rows = {}, []
    for name, t in totals.items():
        gen = sum(s.tokens for s in t["stats"].values())
        res[name] = {"examples_per_min": 60 * n / t["seconds"], "seconds": t["seconds"],
                     "examples_per_cpu_min": 60 * n / t["cpu_seconds"],
                     "tokens_per_example": gen / n, "tok_s": gen / t["seconds"],
                     **{f"{p}_tok_s": t["stats"][p].tok_s for p in PHASES},
                     **{f"{p}_s": t["stats"][p].seconds for p in PHASES}}
    e, h = res["engine"], res["hf"]
    for key, label in [("examples_per_min", "examples/min"), ("examples_per_cpu_min", "examples/CPU-min"),
                       ("tok_s", "tok/s, all phases"),
                       *[(f"{p}_tok_s", f"tok/s, {p}") for p in PHASES], *[(f"{p}_s", f"seconds, {p}") for p in PHASES],
                       ("tokens_per_example", "generated tokens/example")]:
        rows.append([f"SL-CAI {label}", e[key], h[key], e[key] / h[key] if h[key] else float("nan")])
    out = {"sl_examples_per_min": round(e["examples_per_min"], 2), "sl_hf_examples_per_min": round(h["examples_per_min"], 2),
           "sl_ratio": round(e["examples_per_min"] / h["examples_per_min"], 2),
           "sl_cpu_ratio": round(e["examples_per_cpu_min"] / h["examples_per_cpu_min"], 2),
           "sl_tok_s": round(e["tok_s"], 1), "sl_hf_tok_s": round(h["tok_s"], 1),
           "sl_tokens_per_example": round(e["tokens_per_example"], 1),
           "sl_hf_tokens_per_example": round(h["tokens_per_example"], 1)}
    for p in PHASES:
        out[f"sl_{p}_tok_s"], out[f"sl_hf_{p}_tok_s"] = round(e[f"{p}_tok_s"], 1), round(h[f"{p}_tok_s"], 1)
    del hf
    return out, rows


# ------------------------------------------------------------------------------------------
# Part 2: SFT step, engine vs TRL
# ------------------------------------------------------------------------------------------
def sft_data(n: int) -> list[list[dict]]:
    """n SL-CAI-like conversations: a red-team prompt and a refusal of varied length."""
    from cai.prompts import load_prompts

    prompts = load_prompts("redteam", split="train")
    return [[{"role": "user", "content": prompts[i % len(prompts)].prompt},
             {"role": "assistant", "content": " ".join(REFUSALS[i % len(REFUSALS)].split(". ")[: 1 + i % 3])}]
            for i in range(n)]


LORA = dict(rank=16, alpha=32.0, dropout=0.05)
LR, WARMUP = 2e-4, 10


def engine_sft(eng, convs, args, rep: int) -> tuple[list[float], float]:
    """Per-step seconds of one train_sft run of 1 + sft_steps steps, and tokens per step."""
    import json

    from cai.sft import SFTConfig, train_sft
    from engine import lora
    from engine.lora import LoraConfig
    from engine.train import OptimConfig

    steps = 1 + args.sft_steps
    cfg = SFTConfig(epochs=100, max_tokens_per_batch=args.sft_batch_tokens, adapter="bench", max_steps=steps,
                    seed=rep, checkpoint_every=10**9, lora=LoraConfig(**LORA),
                    optim=OptimConfig(lr=LR, warmup_steps=WARMUP, max_grad_norm=1.0, total_steps=steps))
    with tempfile.TemporaryDirectory() as out:
        train_sft(eng, convs, cfg, out, resume=False)
        log = [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    lora.remove_adapter(eng.model, "bench")
    timed = log[1:]
    return [r["step_s"] for r in timed], sum(r["tokens"] for r in timed) / len(timed)


def trl_sft(source: str, convs, args, rep: int) -> tuple[list[float], float]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(source)
    data = Dataset.from_list([{"prompt": c[:-1], "completion": c[-1:]} for c in convs])
    peft_cfg = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], task_type="CAUSAL_LM",
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    timer_cb = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        cfg = SFTConfig(
            output_dir=out, max_length=args.sft_batch_tokens, packing=True, per_device_train_batch_size=1,
            gradient_accumulation_steps=1, completion_only_loss=True, learning_rate=LR, warmup_steps=WARMUP,
            lr_scheduler_type="cosine", optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0,
            max_steps=1 + args.sft_steps, bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
            report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True, seed=rep,
            dataloader_num_workers=0)
        trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, peft_config=peft_cfg,
                             callbacks=[timer_cb])
        rows = [len(r) for r in trainer.train_dataset["input_ids"]]
        trainer.train()
    return timer_cb.times[1:], sum(rows) / len(rows)


def bench_sft(args, eng, source: str) -> tuple[dict, list]:
    import logging

    logging.getLogger("trl").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    convs = sft_data(args.sft_examples)
    times = {"engine": [], "trl": []}
    toks = {"engine": 0.0, "trl": 0.0}
    for rep in range(args.repeats):
        times["engine"], t_e = times["engine"] + (r := engine_sft(eng, convs, args, rep))[0], r[1]
        print(f"  sft engine repeat {rep}: steps {[round(x, 2) for x in r[0]]} s, load {_loadavg()}", file=sys.stderr, flush=True)
        times["trl"], t_t = times["trl"] + (r := trl_sft(source, convs, args, rep))[0], r[1]
        print(f"  sft trl repeat {rep}: steps {[round(x, 2) for x in r[0]]} s, load {_loadavg()}", file=sys.stderr, flush=True)
        toks = {"engine": t_e, "trl": t_t}
    e, t = (sum(v) / len(v) for v in (times["engine"], times["trl"]))
    rows = [["SFT step seconds (mean)", e, t, t / e],
            ["SFT tokens per step", toks["engine"], toks["trl"], toks["engine"] / toks["trl"]],
            ["SFT tokens/s", toks["engine"] / e, toks["trl"] / t, (toks["engine"] / e) / (toks["trl"] / t)]]
    return {"sft_step_s": round(e, 3), "trl_sft_step_s": round(t, 3), "sft_ratio": round(t / e, 2),
            "sft_tokens_per_step": round(toks["engine"], 1), "trl_sft_tokens_per_step": round(toks["trl"], 1),
            "sft_tok_s": round(toks["engine"] / e, 1), "trl_sft_tok_s": round(toks["trl"] / t, 1),
            "sft_tok_s_ratio": round((toks["engine"] / e) / (toks["trl"] / t), 2)}, rows


# ------------------------------------------------------------------------------------------
def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=32, help="red-team prompts in the SL-CAI chunk")
    ap.add_argument("--rounds", type=int, default=2, help="critique -> revision rounds")
    ap.add_argument("--max-new-tokens", type=int, default=192, help="token limit of every answer, critique, revision")
    ap.add_argument("--batch", type=int, default=32, help="engine max_slots and transformers batch size")
    ap.add_argument("--sft-steps", type=int, default=4, help="timed SFT steps (after one warm-up step)")
    ap.add_argument("--sft-batch-tokens", type=int, default=2048, help="tokens per packed SFT batch (both sides)")
    ap.add_argument("--sft-examples", type=int, default=64, help="conversations in the SFT data")
    ap.add_argument("--repeats", type=int, default=1, help="back-to-back repeats of each comparison")
    ap.add_argument("--skip-sl", action="store_true", help="skip the SL-CAI loop comparison")
    ap.add_argument("--skip-sft", action="store_true", help="skip the SFT step comparison")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--model", default="default",
                    help="'default', a model folder, a .gguf file, dummy:<shape> (random weights) or a config.json")
    ap.add_argument("--tiny", action="store_true", help="both parts at a few tokens on dummy:tiny (unless --model)")
    ap.add_argument("--omp-wait-policy", choices=["passive", "active", "default"], default="passive",
                    help="OMP_WAIT_POLICY (applied by re-executing before torch starts its threads)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.model = "dummy:tiny" if args.model == "default" else args.model
        for k, v in TINY.items():
            setattr(args, k, v)
    return args


TINY = dict(prompts=2, rounds=1, max_new_tokens=4, batch=2, sft_steps=1, sft_batch_tokens=1024, sft_examples=4)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    want = args.omp_wait_policy.upper()
    if args.omp_wait_policy != "default" and os.environ.get("OMP_WAIT_POLICY") != want:
        os.environ["OMP_WAIT_POLICY"] = want  # read once, when OpenMP starts: start afresh
        os.execv(sys.executable, [sys.executable, "-m", "bench.sl", *argv])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from bench.common import emit_json, machine, print_table
    from bench.peers import hf_folder
    from engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    # Import what the run uses now: a source tree edited during a long run must not hand it
    # a newer module that no longer fits the ones already loaded.
    import cai.constitution, cai.prompts, cai.sft, cai.sl  # noqa: E401, F401
    if not args.skip_sft:
        import datasets, peft, trl  # noqa: E401, F401
    load_start = _loadavg()
    eng = Engine.load(args.model)
    tmp = tempfile.TemporaryDirectory()
    source = str(hf_folder(eng, tmp.name))  # the peers' checkpoint folder: the engine's source when it is one
    summary, rows = {}, []
    if not args.skip_sl:
        s, r = bench_sl(args, eng, source)
        summary.update(s)
        print(f"  sl done: {s}", file=sys.stderr, flush=True)  # kept if a later part fails
        rows += r
    if not args.skip_sft:
        s, r = bench_sft(args, eng, source)
        summary.update(s)
        rows += r
    load_end = _loadavg()
    tmp.cleanup()
    print(f"model {eng.source}  float32  {machine()}  OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}")
    print(f"SL-CAI: {args.prompts} red-team prompts, {args.rounds} rounds, max_new_tokens {args.max_new_tokens}, "
          f"batch {args.batch}, temperature 0.7, top_p 0.9; SFT: {args.sft_examples} conversations, "
          f"{args.sft_batch_tokens} tokens/batch, LoRA r16 a32 on 7 projections, {args.sft_steps} timed steps; "
          f"repeats {args.repeats}")
    print(f"load average: start {load_start}  end {load_end}")
    print_table(["measure", "engine", "peer", "engine/peer"], rows)
    print("peer: transformers generate (SL-CAI rows), TRL SFTTrainer (SFT rows); "
          "the SFT step ratio is peer seconds / engine seconds")
    summary.update({"model": args.model, "prompts": args.prompts, "rounds": args.rounds, "max_new_tokens": args.max_new_tokens,
                    "batch": args.batch, "sft_steps": args.sft_steps, "sft_batch_tokens": args.sft_batch_tokens,
                    "repeats": args.repeats, "load_start": load_start, "load_end": load_end,
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"), **machine()})
    emit_json(summary)
    return summary


if __name__ == "__main__":
    main()
