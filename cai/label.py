"""AI feedback: preference labels from the feedback model under the constitution (Bai et al.
2022, §4.1).

For each prompt the policy (base + SFT adapter) samples two responses (``n=2``, one shared
prefill). The feedback model (the base, adapters off, as in the paper; or another local
model) reads the multiple-choice question "which response is better under principle P",
and the log-probs of " (A)" and " (B)" after "The answer is:" give a soft label. Labels
are averaged over K principles drawn for the pair and over both orders of the options,
which cancels the position bias small models have. In chain-of-thought mode the
reasoning is sampled first and the probabilities are clamped to [0.4, 0.6], as the paper
does to keep over-confident CoT labels from dominating.

Scoring never generates: each feedback prompt is prefilled once and both options are
scored as extensions of it (``engine.options``).

Which principles judge a pair depends on what its prompt tests, as in ``cai eval``:
red-team prompts draw from the principles the constitution tags ``harmlessness``, benign
prompts from those tagged ``helpfulness`` (untagged principles judge both), so a benign pair
is never judged by "which is less harmful".

Each record keeps the whole conversation before the responses (``conversation``), so the
preference model and DPO train on exactly the inputs PPO scores. A pair whose two samples
are the same text says nothing about preference; it is left out of the labels (and counted),
instead of becoming a 50/50 label the preference model can only get wrong.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import kernels
from cai import prompting
from cai.constitution import ASPECTS, Constitution
from cai.prompts import BUILTIN, PromptRecord
from cai.records import ResumableJsonl
from cai.sl import resolve_style
from engine import Engine, SamplingParams, distributed, profiling
from engine.errors import InputError
from engine.lora import use_adapter
from engine.options import option_logprobs

# What the built-in prompt sets test, hence the principles their pairs are judged by.
BUILTIN_ASPECT = {"redteam": "harmlessness", "benign": "helpfulness"}


@dataclass
class LabelConfig:
    """Settings of the AI-feedback labeller."""

    principles_per_pair: int = 4
    """K: principles drawn (without replacement) for each pair; labels are averaged over them."""
    both_orders: bool = True
    """Score each pair in both option orders and average, cancelling position bias."""
    cot: bool = False
    """Chain-of-thought: sample reasoning before scoring, then clamp the probabilities."""
    clamp_low: float = 0.4
    """Lower clamp of chain-of-thought probabilities (the paper's 40%)."""
    clamp_high: float = 0.6
    """Upper clamp of chain-of-thought probabilities (the paper's 60%)."""
    seed: int = 0
    """Seeds the principle draws and the sampling."""
    style: str = "auto"
    """Prompt style: 'chat', 'base' or 'auto' (chat when the tokenizer has a template)."""
    max_new_tokens: int = 128
    """Token limit of each sampled response (and of chain-of-thought reasoning)."""
    temperature: float = 1.0
    """Temperature of the two response samples (the paper samples at 1)."""
    top_p: float = 0.95
    """Nucleus sampling for the response samples."""
    max_fewshot: int = -1
    """Labelling exemplars per prompt; -1 keeps the style's default."""
    chunk_size: int = 32
    """Prompts per chunk: generated and labelled together, then written."""
    max_slots: int = 32
    """Concurrent sequences in the generator."""
    aspect: str = "auto"
    """Principles the pairs are judged by: "harmlessness" or "helpfulness" (those the
    constitution tags so, and the untagged), "all" (every principle), or "auto": what the
    prompts test, harmlessness for red-team prompts and helpfulness for benign ones (the
    built-in sets, and the red-team and helpful sets of `cai run`; every principle for a
    file of one's own)."""

    def __post_init__(self):
        if self.aspect not in ("auto", "all", *ASPECTS):
            raise InputError(f"aspect must be 'auto', 'all', {', '.join(map(repr, ASPECTS))} (got {self.aspect!r})")


def prompts_aspect(source) -> str | None:
    """What the prompts of ``source`` test: a built-in set's aspect, None for a file."""
    builtin = str(source) in BUILTIN and not Path(source).exists()
    return BUILTIN_ASPECT[str(source)] if builtin else None


def draw_label_principles(constitution: Constitution, seed: int, pair_id: str, k: int,
                          aspect: str | None = None) -> list:
    """K distinct principles for one pair, from those that judge ``aspect`` (None: all)."""
    pool = constitution.principles_for(aspect)
    return random.Random(f"{seed}:{pair_id}:label").sample(pool, min(k, len(pool)))


def same_response(a: str, b: str) -> bool:
    """Two samples that encode alike: no preference to learn from them."""
    return a.strip() == b.strip()


def ensemble(p_first: list[float]) -> float:
    """Average probability that response 0 is better, over principles and orders."""
    return sum(p_first) / len(p_first)


class Labeller:
    """Samples response pairs with the policy and labels them with the feedback model."""

    def __init__(self, engine: Engine, constitution: Constitution, cfg: LabelConfig,
                 policy_adapter: str | None = None, feedback: Engine | None = None):
        constitution.require("principles")
        self.eng, self.con, self.cfg = engine, constitution, cfg
        self.policy_adapter = policy_adapter
        self.fb = feedback or engine
        self.style = resolve_style(cfg.style, self.fb)
        self.policy_style = resolve_style(cfg.style, engine)
        self.fewshot_kw = {} if cfg.max_fewshot == -1 else {"max_fewshot": cfg.max_fewshot}
        tok = self.fb.tokenizer
        self.option_ids = [tok(o, add_special_tokens=False)["input_ids"] for o in prompting.OPTIONS]

    def meta(self) -> dict:
        return {"stage": "label", "model": self.eng.source, "feedback_model": self.fb.source,
                "policy_adapter": self.policy_adapter, "constitution": self.con.source,
                "style": self.style, **asdict(self.cfg)}

    def aspect(self, prompts_aspect: str | None) -> str | None:
        """The aspect pairs are judged for: the configured one, else (``auto``) what the
        caller says the prompts test; None: every principle."""
        chosen = prompts_aspect if self.cfg.aspect == "auto" else self.cfg.aspect
        return None if chosen == "all" else chosen

    def run(self, prompts: list[PromptRecord], out: ResumableJsonl, progress=None,
            aspect: str | None = None) -> dict:
        """Label the prompts ``out`` lacks; ``aspect``: what they test (see ``LabelConfig``).
        Returns ``identical_dropped``: prompts left without a label because their two samples
        were the same.

        Chunks are cut from the whole prompt list, not from what is left, and a chunk with
        anything missing is sampled again whole (its seed is keyed by its first prompt): so a
        resumed run draws the very samples an uninterrupted one draws, and a dropped pair is
        dropped again instead of being sampled anew."""
        aspect = self.aspect(aspect)
        self.con.principles_for(aspect)  # fail before any sampling when none judges it
        mine = self.chunks(prompts)
        for chunk in mine:
            left = sum(p.id not in out.done for p in chunk)
            if left:
                out.append(self.label_chunk(chunk, aspect, skip=out.done))
            if progress is not None and left:
                progress.update(left)
        dropped = torch.tensor([sum(p.id not in out.done for c in mine for p in c)])
        return {"identical_dropped": int(distributed.all_reduce_sum(dropped).item())}  # over every rank

    def chunks(self, prompts: list[PromptRecord]) -> list[list[PromptRecord]]:
        """This rank's chunks: cut from the whole prompt list and dealt to the ranks whole,
        so each is the chunk (with the seeds) a single process makes, at any world size."""
        size = self.cfg.chunk_size
        return distributed.shard([prompts[s : s + size] for s in range(0, len(prompts), size)])

    def sample_pairs(self, chunk: list[PromptRecord]) -> list[tuple[str, str]]:
        convs = [prompting.as_conversation(p.messages or p.prompt) for p in chunk]
        ids = [self.eng.tokenizer(prompting.render(prompting.initial_prompt(c, self.policy_style),
                                                   self.eng.tokenizer), add_special_tokens=False)["input_ids"]
               for c in convs]
        params = SamplingParams(max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                                top_p=self.cfg.top_p, n=2, stop=prompting.stop_strings(self.policy_style),
                                seed=zlib.crc32(f"{self.cfg.seed}:pairs:{chunk[0].id}".encode()))
        with use_adapter(self.eng.model, self.policy_adapter), profiling.phase("cai.label.sample"):
            outs = self.eng.generate(ids, params, max_slots=self.cfg.max_slots)
        return [tuple(prompting.clean_response(s.text)[0] for s in o.samples) for o in outs]

    def label_chunk(self, chunk: list[PromptRecord], aspect: str | None = None, skip=frozenset()) -> list[dict]:
        """Sample a pair for every prompt of ``chunk``; label those whose id is not in
        ``skip`` and whose two samples differ."""
        pairs, key = self.sample_pairs(chunk), chunk[0].id
        keep = [i for i, (a, b) in enumerate(pairs) if chunk[i].id not in skip and not same_response(a, b)]
        chunk, pairs = [chunk[i] for i in keep], [pairs[i] for i in keep]
        jobs = []  # (example index, principle, order)
        for i, p in enumerate(chunk):
            for pr in draw_label_principles(self.con, self.cfg.seed, p.id, self.cfg.principles_per_pair, aspect):
                for order in (("ab", "ba") if self.cfg.both_orders else ("ab",)):
                    jobs.append((i, pr, order))
        prompts = []
        for i, pr, order in jobs:
            a, b = pairs[i] if order == "ab" else pairs[i][::-1]
            conv = prompting.as_conversation(chunk[i].messages or chunk[i].prompt)
            prompts.append(prompting.feedback_prompt(conv, a, b, pr, self.style, self.con.fewshot_preference,
                                                     cot=self.cfg.cot, **self.fewshot_kw))
        if not jobs:
            return []
        if self.cfg.cot:
            prompts = self._reason(prompts, key)
        probs = self.score(prompts)  # [J, 2]: p(A), p(B)
        return self._records(chunk, pairs, jobs, probs, aspect)

    def _reason(self, prompts: list, key: str) -> list:
        """Chain of thought: sample the reasoning, then ask for the answer after it."""
        tok = self.fb.tokenizer
        ids = [tok(prompting.render(p, tok), add_special_tokens=False)["input_ids"] for p in prompts]
        params = SamplingParams(max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                                top_p=self.cfg.top_p, stop=prompting.stop_strings(self.style, cot=True),
                                seed=zlib.crc32(f"{self.cfg.seed}:cot:{key}".encode()))
        with use_adapter(self.fb.model, None), profiling.phase("cai.label.reason"):
            outs = self.fb.generate(ids, params, max_slots=self.cfg.max_slots)
        return [prompting.feedback_answer_prompt(p, o.text) for p, o in zip(prompts, outs)]

    def score(self, prompts: list) -> torch.Tensor:
        """Feedback prompts -> normalised option probabilities [J, 2] (clamped under CoT)."""
        tok = self.fb.tokenizer
        ids = [tok(prompting.render(p, tok), add_special_tokens=False)["input_ids"] for p in prompts]
        with use_adapter(self.fb.model, None), profiling.phase("cai.label.score"):
            lps = option_logprobs(self.fb.model, ids, [self.option_ids] * len(ids))
        clamp = (self.cfg.clamp_low, self.cfg.clamp_high) if self.cfg.cot else None
        return kernels.option_probs(torch.tensor(lps, dtype=torch.float32, device=self.fb.model.device), clamp=clamp)

    def _records(self, chunk, pairs, jobs, probs, aspect: str | None = None) -> list[dict]:
        per_example: list[list[dict]] = [[] for _ in chunk]
        for (i, pr, order), (pa, pb) in zip(jobs, probs.tolist()):
            p_first = pa if order == "ab" else pb  # probability response 0 is better
            per_example[i].append({"principle_id": pr.id, "order": order, "p_a": pa, "p_b": pb,
                                   "p_first": p_first})
        records = []
        for p, (r0, r1), scores in zip(chunk, pairs, per_example):
            p0 = ensemble([s["p_first"] for s in scores])
            chosen, rejected, pc = (r0, r1, p0) if p0 >= 0.5 else (r1, r0, 1 - p0)
            conv = prompting.as_conversation(p.messages or p.prompt)  # what PPO scores
            prompt_text = prompting.transcript(conv) if len(conv) > 1 else conv[0]["content"]
            records.append({"id": p.id, "prompt": prompt_text, "conversation": conv, "chosen": chosen,
                            "rejected": rejected, "p_chosen": pc, "responses": [r0, r1], "p_first": p0,
                            "scores": scores, "category": p.category, "aspect": aspect or "all",
                            "cot": self.cfg.cot})
        return records
