"""SL-CAI: answer red-team prompts, then critique and revise the answers (Bai et al. 2022, §3).

For every prompt the model writes an initial answer; then, for R rounds (the paper's
default is 4), it critiques its latest answer under a critique request and revises it under
the paired revision request. A principle is drawn for every round of every example from a
seeded RNG keyed by (seed, example id, round), so the draw does not depend on batching or
on where a run was resumed.

Batching: each phase of each round is one ``Engine.generate`` call over every example of
the current chunk (continuous batching refills slots as answers of different lengths end).
Chunks are written to the output as they finish; a restarted run skips finished records.
Under ``torchrun`` the chunks are dealt to the ranks whole (``SLRunner.chunks``), so every
chunk, and with it every seed and batch, is the one a single process makes: the records do
not depend on the world size.

Deliberate differences from the paper: an empty or degenerate revision keeps the previous
answer (and is flagged) rather than training on it; an example whose every revision was
degenerate is flagged ``unrevised`` (SFT leaves it out, since its answer is the original
one); and output is cleaned of echoed role labels and of any next turn the model starts to
write. An example whose prompt outgrows the model's context in any phase is skipped with a
warning naming its id and input line (and counted in ``SLRunner.skipped``); the rest of the
chunk goes on.
"""
from __future__ import annotations

import random
import sys
import zlib
from dataclasses import asdict, dataclass, field

from cai import prompting
from cai.constitution import Constitution
from cai.outputs import sha256_of
from cai.prompts import PromptRecord
from cai.records import ResumableJsonl
from engine import Engine, SamplingParams, distributed, profiling


@dataclass
class SLConfig:
    """Settings of the critique -> revision loop."""

    rounds: int = 4
    """Critique -> revision rounds per example (the paper uses up to 4)."""
    seed: int = 0
    """Seeds the principle draws and the sampling."""
    style: str = "auto"
    """'chat' (the tokenizer's chat template), 'base' (Human:/Assistant: transcripts), or
    'auto': chat when the tokenizer has a chat template."""
    max_new_tokens: int = 192
    """Token limit for each answer, critique and revision."""
    temperature: float = 0.7
    """Sampling temperature for every phase; 0 is greedy."""
    top_p: float = 0.9
    """Nucleus sampling for every phase."""
    max_fewshot: int | None = -1
    """Few-shot exemplars per prompt; -1 keeps the style's default (chat 2, base all)."""
    chunk_size: int = 64
    """Examples per chunk: the unit that is generated together and then written."""
    max_slots: int = 32
    """Concurrent sequences in the generator (KV cache slots)."""


@dataclass
class Round:
    principle_id: str
    critique_request: str
    critique: str
    revision_request: str
    revision: str
    flags: list[str] = field(default_factory=list)


def resolve_style(style: str, engine: Engine) -> str:
    if style == "auto":
        return "chat" if getattr(engine.tokenizer, "chat_template", None) else "base"
    return style


def prompt_source(source: str, prompts: list[PromptRecord]) -> dict:
    """What identifies a run's prompt set, for the output's meta: the source (a file as an
    absolute path, or a built-in's name) and a hash of the prompts selected from it (so a
    changed file, split or --limit is a changed source)."""
    from pathlib import Path

    name = str(Path(source).resolve()) if Path(source).is_file() else str(source)
    content = [{"id": p.id, "prompt": p.prompt, "messages": p.messages, "category": p.category, "split": p.split}
               for p in prompts]
    return {"prompts": name, "prompts_sha256": sha256_of(content)}


def draw_principles(constitution: Constitution, seed: int, example_id: str, rounds: int) -> list:
    """The critique/revision pair of each round, drawn independently per round."""
    pairs = constitution.critique_revision
    return [random.Random(f"{seed}:{example_id}:{r}").choice(pairs) for r in range(rounds)]


class SLRunner:
    """Runs the loop over prompts and writes one record per example."""

    def __init__(self, engine: Engine, constitution: Constitution, cfg: SLConfig):
        constitution.require("critique_revision")
        self.eng, self.con, self.cfg = engine, constitution, cfg
        self.style = resolve_style(cfg.style, engine)
        self.fewshot_kw = {} if cfg.max_fewshot == -1 else {"max_fewshot": cfg.max_fewshot}
        self.fewshot = constitution.fewshot_critique_revision
        self.skipped: list[str] = []
        """Ids of the examples skipped because a prompt did not fit the model's context."""

    def meta(self) -> dict:
        return {"stage": "sl", "model": self.eng.source, "constitution": self.con.source,
                "style": self.style, **asdict(self.cfg)}

    def run(self, prompts: list[PromptRecord], out: ResumableJsonl, progress=None) -> None:
        for chunk in self.chunks(prompts):
            if any(p.id not in out.done for p in chunk):
                out.append(self.run_chunk(chunk, progress))

    def chunks(self, prompts: list[PromptRecord]) -> list[list[PromptRecord]]:
        """This rank's chunks. Chunks sit at fixed positions of the whole prompt list and
        are dealt to the ranks whole, so a resumed run, or a run on any number of ranks, makes
        the very chunks (and sampling seeds) of an uninterrupted single-process one, even
        around a skipped example."""
        size = self.cfg.chunk_size
        return distributed.shard([prompts[s : s + size] for s in range(0, len(prompts), size)])

    def _params(self, phase: str, round_: int, chunk: list[PromptRecord]) -> SamplingParams:
        key = f"{self.cfg.seed}:{phase}:{round_}:{chunk[0].id}"
        return SamplingParams(max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                              top_p=self.cfg.top_p, seed=zlib.crc32(key.encode()),
                              stop=prompting.stop_strings(self.style))

    def _generate(self, prompts: list, chunk: list[PromptRecord], alive: list[bool], phase: str,
                  round_: int) -> list[tuple[str, list[str]]]:
        """Cleaned outputs of the examples still ``alive`` (("", []) for the others). One whose
        prompt does not fit the context is skipped from here on (``alive`` set False)."""
        with profiling.phase(f"cai.sl.{phase}"):
            ids = [self._ids(p) if ok else None for p, ok in zip(prompts, alive)]
            limit = self.eng.max_context
            for i, t in enumerate(ids):
                if t is not None and len(t) >= limit:
                    alive[i], ids[i] = False, None
                    self._skip(chunk[i], f"{phase} prompt of round {round_}", len(t), limit)
            todo = [i for i, t in enumerate(ids) if t is not None]
            outs = self.eng.generate([ids[i] for i in todo], self._params(phase, round_, chunk),
                                     max_slots=self.cfg.max_slots) if todo else []
            res: list[tuple[str, list[str]]] = [("", [])] * len(prompts)
            for i, o in zip(todo, outs):
                res[i] = prompting.clean_response(o.text)
            return res

    def _ids(self, prompt) -> list[int]:
        return self.eng.tokenizer(prompting.render(prompt, self.eng.tokenizer), add_special_tokens=False)["input_ids"]

    def _skip(self, p: PromptRecord, what: str, n: int, limit: int) -> None:
        self.skipped.append(p.id)
        print(f"{distributed.tag()}warning: skipping record {p.id!r} ({p.where or 'input'}): "
              f"its {what} has {n} tokens, the model's context is {limit}", file=sys.stderr)

    def run_chunk(self, chunk: list[PromptRecord], progress=None) -> list[dict]:
        """Answer, then R rounds of critique -> revision, for every example of the chunk."""
        convs = [prompting.as_conversation(p.messages or p.prompt) for p in chunk]
        alive = [True] * len(chunk)
        answers = self._generate([prompting.initial_prompt(c, self.style) for c in convs], chunk, alive, "answer", 0)
        initial = [a for a, _ in answers]
        current = list(initial)
        draws = [draw_principles(self.con, self.cfg.seed, p.id, self.cfg.rounds) for p in chunk]
        history: list[list[Round]] = [[] for _ in chunk]
        for r in range(self.cfg.rounds):
            dialogues = [c + [{"role": "assistant", "content": a}] for c, a in zip(convs, current)]
            pairs = [d[r] for d in draws]
            crit_prompts = [prompting.critique_prompt(d, pr, self.style, self.fewshot, **self.fewshot_kw)
                            for d, pr in zip(dialogues, pairs)]
            critiques = self._generate(crit_prompts, chunk, alive, "critique", r)
            rev_prompts = [prompting.revision_prompt(d, c, pr, self.style, self.fewshot, **self.fewshot_kw)
                           for d, (c, _), pr in zip(dialogues, critiques, pairs)]
            revisions = self._generate(rev_prompts, chunk, alive, "revision", r)
            for i, ((crit, cflags), (rev, rflags), pr) in enumerate(zip(critiques, revisions, pairs)):
                flags = [f"critique_{f}" for f in cflags if f in ("empty", "degenerate")] + rflags
                if prompting.is_degenerate(rev):
                    flags.append("kept_previous")
                    rev = current[i]
                current[i] = rev
                history[i].append(Round(pr.id, pr.critique, crit, pr.revision, rev, flags))
        records = [self._record(p, c, a0, h) for p, c, a0, h, ok in zip(chunk, convs, initial, history, alive) if ok]
        if progress is not None:
            progress.update(len(chunk))
        return records

    def _record(self, p: PromptRecord, conv: list[dict], initial: str, rounds: list[Round]) -> dict:
        final = rounds[-1].revision if rounds else initial
        user = prompting.transcript(conv) if len(conv) > 1 else conv[0]["content"]
        last = rounds[-1] if rounds else None
        return {
            "id": p.id, "category": p.category, "init_prompt": user, "init_response": initial,
            "critic_prompt": last.critique_request if last else None,
            "critic_response": last.critique if last else None,
            "revision_prompt": last.revision_request if last else None,
            "revision_response": final,
            "messages": conv + [{"role": "assistant", "content": final}],
            "chosen": conv + [{"role": "assistant", "content": final}],
            "rejected": conv + [{"role": "assistant", "content": initial}],
            "rounds": [asdict(r) for r in rounds],
            "principle_ids": [r.principle_id for r in rounds],
            "flags": sorted({f for r in rounds for f in r.flags} | ({"unrevised"} if _unrevised(rounds) else set())),
            "model": self.eng.source, "seed": self.cfg.seed, "style": self.style,
        }


def _unrevised(rounds: list[Round]) -> bool:
    """No round produced a revision: the final answer is the initial one."""
    return bool(rounds) and all("kept_previous" in r.flags for r in rounds)
