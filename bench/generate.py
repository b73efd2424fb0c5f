"""Generation throughput: the engine against transformers' ``generate`` (and vLLM, when it
is importable), side by side.

All run greedy decoding of the same chat prompts in this process, on the same weights,
with EOS ignored so every row makes ``--new-tokens`` tokens. transformers pads the batch
on the left (its documented way to batch decoder-only generation); the engine packs.

Floors: at batch 1 a decode step must read every weight once, so read bandwidth over the
weight bytes bounds tokens/s; at large batch the GEMM rate over 2 x parameters FLOPs per
token bounds it. On the CPU both rates are measured here; on CUDA they are the device's
data-sheet peaks (``bench.device``), and each side's achieved GB/s and TFLOP/s (weights and
KV cache read per decode step; 2 x parameters FLOPs per token) are reported beside them.

    python -m bench.generate [--batch-sizes 1,8,32] [--new-tokens 64] [--model default]
                             [--device auto|cpu|cuda] [--tiny]

``--model dummy:<shape>`` (tiny, smollm2-135m, llama-1b, llama-8b) or a config.json runs
random weights of that shape; ``--tiny`` is a seconds-long run on ``dummy:tiny``.
"""
from __future__ import annotations

import argparse
import tempfile

import torch

from bench import device as dev
from bench.common import PeakRSS, emit_json, machine, matmul_peak_gflops, memory_bandwidth_gbs, print_table
from bench.peers import hf_causal_lm, hf_folder, hf_tokenizer

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


class Memory:
    """Peak memory of a block: the CUDA allocator's high-water mark on CUDA, else RSS growth."""

    def __init__(self, device: torch.device):
        self.device, self.rss = device, PeakRSS()

    def __enter__(self):
        dev.peak_memory_reset(self.device)
        self.rss.__enter__()
        return self

    def __exit__(self, *exc):
        self.rss.__exit__(*exc)
        cuda = dev.peak_memory_mb(self.device)
        self.peak_mb = cuda if cuda is not None else self.rss.peak_mb


def run_engine(eng, prompts, new_tokens: int, device):
    from engine import SamplingParams

    params = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    with Memory(device) as mem:
        dt, outs = dev.timed(lambda: eng.generate(prompts, params, max_slots=len(prompts)), device)
    return dt, mem.peak_mb, [o.samples[0].token_ids for o in outs]


def run_hf(hf, tok, prompts, new_tokens: int, device):
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    with torch.inference_mode(), Memory(device) as mem:
        dt, out = dev.timed(lambda: hf.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                do_sample=False), device)
    width = batch["input_ids"].shape[1]
    return dt, mem.peak_mb, [row[width:].tolist() for row in out]


def load_hf(eng, dtype, device):
    """transformers' model on the engine's weights, set to ignore EOS, and a left-padding tokenizer."""
    hf = hf_causal_lm(eng, dtype, device)
    hf.generation_config.eos_token_id = None  # ignore EOS: every row makes all its tokens
    tok = hf_tokenizer(eng, "left")
    hf.generation_config.pad_token_id = tok.pad_token_id
    return hf, tok


class VLLM:
    """vLLM's offline ``LLM`` on the same shape (a dummy shape gets vLLM's own random
    weights: the same bytes to read, other values), when vLLM is importable."""

    def __init__(self, eng, dtype, tmp):
        import vllm

        folder = hf_folder(eng, tmp, weights=not eng.source.startswith("dummy:") and not eng.source.endswith(".json"))
        fmt = "auto" if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")) else "dummy"
        self.llm = vllm.LLM(model=str(folder), load_format=fmt, dtype=str(dtype).split(".")[-1],
                            gpu_memory_utilization=0.3, seed=0)
        self.vllm, self.tok = vllm, eng.tokenizer

    def run(self, prompts, new_tokens: int, device):
        ids = [self.tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True) for p in prompts]
        params = self.vllm.SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
        dt, _ = dev.timed(lambda: self.llm.generate([{"prompt_token_ids": list(x)} for x in ids], params,
                                                    use_tqdm=False), device)
        return dt


def load_vllm(eng, dtype, device, tmp):
    """A VLLM peer, None when vLLM is not importable or not on CUDA, or the error it raised."""
    if device.type != "cuda":
        return None
    try:
        import vllm  # noqa: F401
    except ImportError:
        return None
    try:
        return VLLM(eng, dtype, tmp)
    except Exception as exc:  # an optional peer: its failure is reported, not fatal
        return f"{type(exc).__name__}: {exc}"


def weight_bytes(model) -> int:
    """Bytes a batch-1 decode step reads: every parameter once (a tied head counts once;
    the embedding table is read in full by the head)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def decode_work(eng, batch: int, prompt_len: float, new_tokens: int) -> tuple[float, float]:
    """(bytes read, FLOPs) of generating ``new_tokens`` for ``batch`` rows of ``prompt_len``
    prompt tokens: every decode step reads the weights once and each row's KV cache so far;
    every token costs 2 x parameters FLOPs (the prompt's too)."""
    cfg, el = eng.cfg, eng.model.embed.element_size()
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * el
    kv = batch * kv_per_token * sum(prompt_len + t for t in range(new_tokens))
    n_params = sum(p.numel() for p in eng.model.parameters())
    return new_tokens * weight_bytes(eng.model) + kv, 2 * n_params * batch * (prompt_len + new_tokens)


def floors(eng, device, tiny: bool) -> dict:
    """Batch-1 floor and compute ceiling in tokens/s, from measured (CPU) or data-sheet (CUDA) rates."""
    n_params = sum(p.numel() for p in eng.model.parameters())
    if device.type == "cuda":
        peak = dev.peaks(device)
        if peak is None:
            return {}
        bw, gflops = peak["bandwidth_gbs"], peak["tflops"] * 1e3
    else:
        bw = memory_bandwidth_gbs(64 if tiny else 1024, 2 if tiny else 5)
        gflops = matmul_peak_gflops(*((256, 64, 256) if tiny else ()))
    return {"bandwidth_gbs": round(bw, 2), "gflops": round(gflops, 1),
            "floor_tok_s_b1": round(bw * 1e9 / weight_bytes(eng.model), 2),
            "compute_ceiling_tok_s": round(gflops * 1e9 / (2 * n_params), 1)}


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default=None, help="comma-separated batch sizes (default 1,8,32; tiny 1,2)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens generated per row (default 64; tiny 4)")
    dev.add_device_args(ap)
    ap.add_argument("--tiny", action="store_true", help="a seconds-long run: dummy:tiny unless --model is given")
    ap.add_argument("--no-vllm", action="store_true", help="leave vLLM out even when it is importable")
    ap.add_argument("--no-llama-cpp", action="store_true",
                    help="leave llama.cpp out even when llama-cpp-python is importable (it runs at batch 1 on "
                         "the model's GGUF: a float32 copy and the file as shipped)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--rollout-weights", default=None,
                    help="comma-separated engine rollout weights to time beside fp32 (engine.quant: fp16, int8; "
                         "default on the CPU: fp16,int8; 'none' for fp32 alone); each row reports its speed-up "
                         "over the fp32 engine and its greedy agreement with it")
    args = ap.parse_args(argv)
    if args.tiny and args.model == "default":
        args.model = "dummy:tiny"
    args.batch_sizes = args.batch_sizes or ("1,2" if args.tiny else "1,8,32")
    args.new_tokens = args.new_tokens or (4 if args.tiny else 64)
    if args.rollout_weights is None:
        args.rollout_weights = "fp16,int8" if dev.resolve_device(args.device).type == "cpu" else "none"
    args.rollout_weights = [] if args.rollout_weights == "none" else args.rollout_weights.split(",")
    from engine.quant import MODES

    bad = [m for m in args.rollout_weights if m not in MODES or m == "fp32"]
    if bad:
        ap.error(f"--rollout-weights: unknown {', '.join(bad)} (choose from fp16, int8, or none)")
    return args


def greedy_agreement(ids: list[list[int]], ref: list[list[int]]) -> float:
    """Share of ``ref``'s greedy tokens that ``ids`` reproduces before its first difference
    (per row, pooled): 1 is the same text, and a row that differs at token t agrees on t."""
    same = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
               for a, b in zip(ids, ref))
    return same / max(sum(len(r) for r in ref), 1)


def measure(eng, peers, b: int, new_tokens: int, device, dtype, peak) -> tuple[dict, list, tuple]:
    """One batch size: every side's tokens/s, peak memory and achieved rates; the table row;
    the greedy ids of the engine and transformers."""
    prompts = chat_prompts(b)
    e_s, e_mb, e_ids = run_engine(eng, prompts, new_tokens, device)
    h_s, h_mb, h_ids = run_hf(*peers["hf"], prompts, new_tokens, device)
    e_tps, h_tps = b * new_tokens / e_s, b * new_tokens / h_s
    res = {"engine_tok_s": round(e_tps, 2), "hf_tok_s": round(h_tps, 2), "ratio": round(e_tps / h_tps, 2),
           "engine_peak_mb": round(e_mb, 1), "hf_peak_mb": round(h_mb, 1)}
    plen = sum(len(eng.encode(p)) for p in prompts) / b
    nbytes, flops = decode_work(eng, b, plen, new_tokens)
    res["engine"] = dev.achieved(nbytes, flops, e_s, peak, dtype)
    res["hf"] = dev.achieved(nbytes, flops, h_s, peak, dtype)
    row = [b, e_tps, h_tps, e_tps / h_tps, e_mb, h_mb]
    for mode in peers.get("rollout_weights", []):
        eng.set_rollout_weights(mode)
        try:
            q_s, q_mb, q_ids = run_engine(eng, prompts, new_tokens, device)
        finally:
            eng.set_rollout_weights("fp32")
        q_tps = b * new_tokens / q_s
        res[f"engine_{mode}_tok_s"] = round(q_tps, 2)
        res[f"engine_{mode}_vs_fp32"] = round(q_tps / e_tps, 2)
        res[f"engine_{mode}_agreement"] = round(greedy_agreement(q_ids, e_ids), 3)
        res[f"engine_{mode}_peak_mb"] = round(q_mb, 1)
    if isinstance(peers.get("vllm"), VLLM):
        v_s = peers["vllm"].run(prompts, new_tokens, device)
        res["vllm_tok_s"] = round(b * new_tokens / v_s, 2)
        res["vllm"] = dev.achieved(nbytes, flops, v_s, peak, dtype)
    return res, row + [res.get("vllm_tok_s", "")], (e_ids, h_ids)


def run_llama_cpp(args, eng, sizes, device, results, e_ids) -> dict | str:
    """llama.cpp at batch 1 on the batch-1 row's prompt, for the float32 copy of the model's
    GGUF and the file as shipped: tok/s, the engine's ratio to it, GB/s and greedy agreement
    with the engine's batch-1 tokens ``e_ids``; or why it did not run (never fatal)."""
    from bench import ggml_peer

    src = ggml_peer.gguf_source(args.model)
    why = ggml_peer.peer_state(src, sizes, device.type)
    if why is not None:
        return why
    ids = eng.encode(chat_prompts(1)[0])
    out = {}
    try:
        for name, path in (("f32", ggml_peer.f32_gguf(src)), ("shipped", src)):
            peer = ggml_peer.LlamaCpp(path, torch.get_num_threads())
            peer.run(ids, 4)  # warm up once, as the engine and transformers are
            dt, toks = peer.run(ids, args.new_tokens)
            tps = args.new_tokens / dt
            out[f"{name} ({path.name})"] = {
                "tok_s": round(tps, 2), "engine_ratio": round(results["1"]["engine_tok_s"] / tps, 2),
                "achieved_gbs": round(peer.weight_bytes * args.new_tokens / dt / 1e9, 2),
                "agreement": round(greedy_agreement([toks], e_ids), 3)}
            del peer
    except Exception as exc:  # an optional peer: its failure is reported, not fatal
        return f"{type(exc).__name__}: {exc}"
    return out


def main(argv=None) -> dict:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = dev.resolve_device(args.device)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    eng = dev.load_engine(args.model, device)
    dtype = eng.model.embed.dtype
    tmp = tempfile.TemporaryDirectory()
    peers = {"hf": load_hf(eng, dtype, device), "vllm": None if args.no_vllm else load_vllm(eng, dtype, device, tmp.name),
             "rollout_weights": args.rollout_weights}
    for mode in args.rollout_weights:  # build and warm each set of stand-ins once
        eng.set_rollout_weights(mode)
        run_engine(eng, chat_prompts(2), 4, device)
    eng.set_rollout_weights("fp32")
    run_engine(eng, chat_prompts(2), 4, device)  # warm both paths up once
    run_hf(*peers["hf"], chat_prompts(2), 4, device)
    peak = dev.peaks(device)

    results, rows, match, b1_ids = {}, [], True, None
    for b in sizes:
        results[str(b)], row, (e_ids, h_ids) = measure(eng, peers, b, args.new_tokens, device, dtype, peak)
        rows.append(row)
        if b == 1:
            match &= e_ids == h_ids
            b1_ids = e_ids
    # Greedy parity outside the timed runs: the engine's rows inside a batch against
    # transformers one prompt at a time (unpadded, so its own numerics are not in question).
    probe = chat_prompts(max(sizes))
    _, _, batched = run_engine(eng, probe, args.new_tokens, device)
    for i in range(min(3, len(probe))):
        match &= batched[i] == run_hf(*peers["hf"], [probe[i]], args.new_tokens, device)[2][0]

    llama = None if args.no_llama_cpp else run_llama_cpp(args, eng, sizes, device, results, b1_ids)

    fl = floors(eng, device, args.tiny)
    n_params = sum(p.numel() for p in eng.model.parameters())
    print(f"model {eng.source}  params {n_params / 1e6:.1f}M  {str(dtype).split('.')[-1]}  "
          f"device {dev.device_name(device)}  {machine()}")
    if fl:
        print(f"bandwidth {fl['bandwidth_gbs']:.1f} GB/s -> batch-1 floor {fl['floor_tok_s_b1']:.1f} tok/s; "
              f"GEMM {fl['gflops']:.0f} GFLOP/s -> compute ceiling {fl['compute_ceiling_tok_s']:.0f} tok/s")
    print_table(["batch", "engine tok/s", "hf tok/s", "ratio", "engine peak MB", "hf peak MB", "vllm tok/s"], rows)
    if args.rollout_weights:
        print("rollout weights (engine.quant): tok/s, x the fp32 engine, greedy agreement with it")
        print_table(["batch"] + [f"{m} {k}" for m in args.rollout_weights for k in ("tok/s", "x fp32", "agree")],
                    [[b] + [results[str(b)][f"engine_{m}_{k}"] for m in args.rollout_weights
                            for k in ("tok_s", "vs_fp32", "agreement")] for b in sizes])
    b1 = results.get("1", {}).get("engine_tok_s")
    vllm = peers["vllm"]
    summary = {"model": eng.source, "device": dev.device_name(device), "dtype": str(dtype).split(".")[-1],
               "params": n_params, "batch": results, "greedy_match": bool(match), **fl,
               "floor_fraction_b1": round(b1 / fl["floor_tok_s_b1"], 3) if b1 and fl else None,
               "peak": peak, "vllm": "ran" if isinstance(vllm, VLLM) else (vllm or "not importable or not on CUDA"),
               **machine()}
    print(f"greedy token ids identical to transformers': {match}")
    summary["llama_cpp"] = "left out (--no-llama-cpp)" if llama is None else llama
    if isinstance(llama, dict):
        print("llama.cpp, batch 1 (same prompt and length): tok/s, engine fp32 / llama.cpp, greedy agreement")
        print_table(["file", "llama.cpp tok/s", "engine / llama.cpp", "GB/s", "agree"],
                    [[k, v["tok_s"], v["engine_ratio"], v["achieved_gbs"], v["agreement"]] for k, v in llama.items()])
    tmp.cleanup()
    emit_json(summary)
    return summary


if __name__ == "__main__":
    main()
