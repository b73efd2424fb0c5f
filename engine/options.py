"""Log-probs of a set of options after a shared prompt: the multiple-choice scores of the
paper's feedback model (" (A)" vs " (B)") and of the labeller evaluation.

Each prompt is prefilled once into a KV-cache slot (a prefix shared by all prompts, such
as the few-shot exemplars, only once: ``engine.prefill``); every option is then scored as a short
extension of that cached prompt, so a prompt of P tokens with K options of m tokens costs
P + K (m - 1) token-forwards, not K (P + m). Prompts are packed together (no padding),
and options of the same index across prompts run in one forward.
"""
from __future__ import annotations

import torch

import kernels
from engine import profiling
from engine.errors import InputError
from engine.model import Decoder, Extend, KVCache
from engine.prefill import prefill


@torch.inference_mode()
def option_logprobs(model: Decoder, prompts: list[list[int]], options: list[list[list[int]]],
                    max_batch_tokens: int = 8192) -> list[list[float]]:
    """prompts[i] (token ids) with options[i][k] (token ids) -> log p(option k | prompt i),
    summed over the option's tokens. Returns one list of K_i floats per prompt."""
    if len(prompts) != len(options):
        raise InputError(f"{len(prompts)} prompts but {len(options)} option lists")
    for i, (p, opts) in enumerate(zip(prompts, options)):
        if not p or not opts or any(not o for o in opts):
            raise InputError(f"prompt {i}: empty prompt, option list or option")
        if len(p) + max(map(len, opts)) > model.cfg.max_position_embeddings:
            raise InputError(f"prompt {i}: {len(p)} tokens plus an option exceed the model's context")
    out: list[list[float]] = [[] for _ in prompts]
    for group in _groups([len(p) for p in prompts], max_batch_tokens):
        with profiling.phase("engine.score.options"):
            scores = _score_group(model, [prompts[i] for i in group], [options[i] for i in group])
        profiling.step()
        for i, s in zip(group, scores):
            out[i] = s
    return out


def _groups(lengths: list[int], budget: int) -> list[list[int]]:
    groups, cur, used = [], [], 0
    for i, n in enumerate(lengths):
        if cur and used + n > budget:
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    return groups + [cur] if cur else groups


def _score_group(model: Decoder, prompts, options) -> list[list[float]]:
    lengths = [len(p) for p in prompts]
    longest = max(len(o) for opts in options for o in opts)
    cache = KVCache(model.cfg, len(prompts), max(lengths) + longest, model.embed.dtype, model.device)
    last = prefill(model, cache, prompts, list(range(len(prompts))))  # [P, H]: predicts first option tokens
    scores = [[0.0] * len(opts) for opts in options]
    for k in range(max(len(opts) for opts in options)):
        rows = [i for i, opts in enumerate(options) if k < len(opts)]
        first = torch.tensor([options[i][k][0] for i in rows], dtype=torch.int64, device=model.device)
        lp_first = kernels.linear_logprob(last[rows], model.lm_head_weight, first)
        for i, lp in zip(rows, lp_first.tolist()):  # host sync: the scores are returned as floats
            scores[i][k] = lp
        rest = [i for i in rows if len(options[i][k]) > 1]
        if rest:
            _score_rest(model, cache, prompts, options, k, rest, scores)
    return scores


def _score_rest(model, cache, prompts, options, k, rows, scores) -> None:
    """Feed tokens 1..m-1 of option k after each prompt; add the log-probs of tokens 2..m."""
    feed = [options[i][k][:-1] for i in rows]
    dev = model.device
    targets = torch.tensor([t for i in rows for t in options[i][k][1:]], dtype=torch.int64, device=dev)
    tokens = torch.tensor([t for f in feed for t in f], dtype=torch.int64, device=dev)
    positions = torch.tensor([len(prompts[i]) + j for i, f in zip(rows, feed) for j in range(len(f))],
                             dtype=torch.int64, device=dev)
    ctx = Extend(cache, rows, [len(prompts[i]) for i in rows], [len(f) for f in feed])
    hidden = model(tokens, positions, ctx)
    lp = kernels.linear_logprob(hidden, model.lm_head_weight, targets)
    sums = torch.stack([part.sum() for part in lp.split([len(f) for f in feed])])
    for i, total in zip(rows, sums.tolist()):  # one host sync per option, not one per prompt
        scores[i][k] += total
