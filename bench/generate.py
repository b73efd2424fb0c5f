"""Generation throughput: the engine against transformers' ``generate``, side by side.

Both run greedy decoding of the same chat prompts in this process, on the same weights,
with EOS ignored so every row makes ``--new-tokens`` tokens. transformers pads the batch
on the left (its documented way to batch decoder-only generation); the engine packs.

Floors: at batch 1 a decode step must read every weight once, so the machine's measured
read bandwidth over the weight bytes bounds tokens/s; at large batch the float32 GEMM rate
over 2 x parameters FLOPs per token bounds it.

    python -m bench.generate [--batch-sizes 1,8,32] [--new-tokens 64] [--model default]
"""
from __future__ import annotations

import argparse

import torch

from bench.common import PeakRSS, emit_json, machine, matmul_peak_gflops, memory_bandwidth_gbs, print_table, timer

PROMPTS = [
    "Write a short story about a lighthouse keeper.", "Explain how a refrigerator works.",
    "Give me three tips for learning a language.", "What causes the seasons on Earth?",
    "Describe a good morning routine.", "How do vaccines train the immune system?",
    "Summarise the plot of a heist movie you invent.", "Why is the sky blue?",
    "Plan a vegetarian dinner for four.", "What is a prime number? Give examples.",
    "Write a haiku about autumn rain.", "How should I prepare for a job interview?",
    "Explain recursion to a ten-year-old.", "List the planets of the solar system.",
    "What are the benefits of walking daily?", "How does a bill become law?",
]


def chat_prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" ({i})")}]
            for i in range(n)]


def run_engine(eng, prompts, new_tokens: int):
    from engine import SamplingParams

    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    with PeakRSS() as mem, timer() as t:
        outs = eng.generate(prompts, params, max_slots=len(prompts))
    return t(), mem.peak_mb, [o.samples[0].token_ids for o in outs]


def run_hf(hf, tok, prompts, new_tokens: int):
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode(), PeakRSS() as mem, timer() as t:
        out = hf.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    width = batch["input_ids"].shape[1]
    return t(), mem.peak_mb, [row[width:].tolist() for row in out]


def load_hf(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # ignore EOS: every row makes all its tokens
    hf.generation_config.pad_token_id = 0
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return hf, tok


def weight_bytes(model) -> int:
    """Bytes a batch-1 decode step reads: every parameter once (a tied head counts once;
    the embedding table is read in full by the head)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row")
    ap.add_argument("--model", default="default", help="model folder, .gguf file, or 'default'")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from engine import Engine

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    eng = Engine.load(args.model)
    hf, tok = load_hf(eng.source)
    run_engine(eng, chat_prompts(2), 4)  # warm both paths up once
    run_hf(hf, tok, chat_prompts(2), 4)

    results, rows, match = {}, [], True
    for b in sizes:
        prompts = chat_prompts(b)
        e_s, e_mb, e_ids = run_engine(eng, prompts, args.new_tokens)
        h_s, h_mb, h_ids = run_hf(hf, tok, prompts, args.new_tokens)
        if b == 1:
            match &= e_ids == h_ids
        e_tps, h_tps = b * args.new_tokens / e_s, b * args.new_tokens / h_s
        results[str(b)] = {"engine_tok_s": round(e_tps, 2), "hf_tok_s": round(h_tps, 2), "ratio": round(e_tps / h_tps, 2),
                           "engine_peak_mb": round(e_mb, 1), "hf_peak_mb": round(h_mb, 1)}
        rows.append([b, e_tps, h_tps, e_tps / h_tps, e_mb, h_mb])
    # Greedy parity outside the timed runs: the engine's rows inside a batch against
    # transformers one prompt at a time (unpadded, so its own numerics are not in question).
    probe = chat_prompts(max(sizes))
    _, _, batched = run_engine(eng, probe, args.new_tokens)
    for i in range(min(3, len(probe))):
        match &= batched[i] == run_hf(hf, tok, [probe[i]], args.new_tokens)[2][0]

    bw = memory_bandwidth_gbs()
    floor_b1 = bw * 1e9 / weight_bytes(eng.model)
    gflops = matmul_peak_gflops()
    n_params = sum(p.numel() for p in eng.model.parameters())
    ceiling = gflops * 1e9 / (2 * n_params)
    print(f"model {eng.source}  params {n_params / 1e6:.1f}M  float32  {machine()}")
    print(f"read bandwidth {bw:.1f} GB/s -> batch-1 floor {floor_b1:.1f} tok/s; "
          f"GEMM {gflops:.0f} GFLOP/s -> compute ceiling {ceiling:.0f} tok/s")
    print_table(["batch", "engine tok/s", "hf tok/s", "ratio", "engine peak MB", "hf peak MB"], rows)
    b1 = results.get("1", {}).get("engine_tok_s")
    summary = {"batch": results, "greedy_match": bool(match), "floor_tok_s_b1": round(floor_b1, 2),
               "floor_fraction_b1": round(b1 / floor_b1, 3) if b1 else None,
               "compute_ceiling_tok_s": round(ceiling, 1), "bandwidth_gbs": round(bw, 2), **machine()}
    print(f"greedy token ids identical to transformers': {match}")
    emit_json(summary)
    return summary


if __name__ == "__main__":
    main()
