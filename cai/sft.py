"""Supervised fine-tuning on the SL-CAI revisions (Bai et al. 2022, section 3).

The paper fine-tunes the pretrained model on the final revisions (plus helpful samples so
it stays helpful). Here the update goes into the LoRA adapter "sft" on the shared base by
default (``full=True`` trains the base itself), on packed batches with no padding, with the
loss on the assistant's tokens only: the token mean of -log p over those tokens, computed by
the fused log-prob kernel straight from the hidden states.

Deliberate choice: in a multi-turn conversation only the *last* assistant message is a
target by default (``loss_on="last"``): earlier assistant turns of a red-team conversation
are the original model's answers, which are exactly what the revisions replace.

SL-CAI records (those with ``rounds``) give their final revision by default, or the
revision of every round (``revisions="all"``, as the paper's section 3.1 trains). A record
whose every revision was degenerate holds the original, possibly harmful answer in place of
a revision, so it is left out and counted (``unrevised_skipped`` in the summary).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence


from cai.outputs import atomic_folder, sha256_of
from cai.records import iter_jsonl
from cai.training import LoopSettings, my_share, reduce_sums, steps_per_epoch, summary, train_loop
from engine import distributed, lora, profiling
from engine.batch import batches_by_tokens
from engine.errors import InputError
from engine.lora import LoraConfig
from engine.scoring import token_logprobs
from engine.train import OptimConfig, Trainer

ROLES = ("system", "user", "assistant")


@dataclass
class SFTConfig:
    """One SFT run. Nested: ``lora`` (adapter shape) and ``optim`` (AdamW and schedule)."""

    epochs: int = 1
    """Passes over the data; the paper's SL stage is short, one epoch of a few thousand
    revisions.
    """
    max_tokens_per_batch: int = 4096
    """Token budget of one packed micro-batch (whole sequences only, never padded)."""
    full: bool = False
    """Train every base weight instead of an adapter (the reference then needs a frozen copy)."""
    adapter: str = "sft"
    """Name of the adapter trained (the later stages read "sft")."""
    loss_on: str = "last"
    """Which assistant messages are targets: "last" (the final one only) or "all"."""
    format: str = "auto"
    """Input format: "chat" (the template), "text" (Human:/Assistant:) or "auto" (chat when
    the tokenizer has a template)."""
    shuffle: bool = True
    """Shuffle the examples each epoch (seeded with seed + epoch, so resuming sees the same
    order).
    """
    seed: int = 0
    """Seed of the shuffle and of the adapter's initialisation."""
    checkpoint_every: int = 50
    """Save a checkpoint every this many optimizer steps (and always at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (older ones are deleted once a newer one is complete)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run every epoch). The schedule still spans the
    whole run, so a stopped run resumes onto the same curve.
    """
    export_merged: bool = False
    """Also write DIR/merged/, a transformers checkpoint with the adapter folded in."""
    revisions: str = "final"
    """Which revisions of an SL-CAI record are examples: "final" (its last revision) or
    "all" (the revision of every round, each after the prompt, as the paper fine-tunes on
    revisions from all revisional steps). Rounds whose revision was degenerate add nothing;
    records with no revision at all are left out either way."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self):
        if self.loss_on not in ("last", "all") or self.format not in ("auto", "chat", "text"):
            raise InputError("loss_on must be 'last' or 'all'; format 'auto', 'chat' or 'text'")
        if self.revisions not in ("final", "all"):
            raise InputError(f"revisions must be 'final' or 'all' (got {self.revisions!r})")


@dataclass
class Conversation:
    """Chat messages ending with the assistant's target answer; ``where`` names its origin.
    ``revisions``: for an SL-CAI record, the revision of every round that produced one, in
    order (empty: none did, the answer is the original); None for any other record."""

    messages: list[dict]
    where: str = ""
    revisions: list[str] | None = None


# ---- data ---------------------------------------------------------------------------------

def read_sft_file(path: str | Path) -> list[Conversation]:
    """JSON lines of SL-CAI records (``messages``, or ``init_prompt`` + ``revision_response``)
    or plain ``{"messages"}`` / ``{"prompt", "response"}`` records -> conversations."""
    return [Conversation(record_messages(rec, where), where, sl_revisions(rec, where))
            for where, rec in iter_jsonl(path)]


def sl_revisions(rec: dict, where: str) -> list[str] | None:
    """The revisions of an SL-CAI record's rounds, without the degenerate ones (flagged
    ``kept_previous`` by ``cai.sl``: they repeat the answer before them); None for a record
    without rounds."""
    rounds = rec.get("rounds")
    if not rounds:
        return None
    if not isinstance(rounds, list) or not all(isinstance(r, dict) and isinstance(r.get("revision"), str)
                                               and isinstance(r.get("flags", []), list) for r in rounds):
        raise InputError(f"{where}: 'rounds' must be a list of objects with a string 'revision' (and a list 'flags')")
    return [r["revision"] for r in rounds if "kept_previous" not in r.get("flags", [])]


def select_examples(convs: Sequence[Conversation], revisions: str = "final") -> tuple[list[Conversation], int]:
    """(training examples, SL-CAI records left out because no round revised them). With
    ``revisions="all"`` an SL-CAI record gives one example per revision."""
    out, unrevised = [], 0
    for c in convs:
        if c.revisions is None:
            out.append(c)
        elif not c.revisions:
            unrevised += 1
        elif revisions == "final":
            out.append(c)
        else:
            prompt = c.messages[:-1]
            out += [Conversation([*prompt, {"role": "assistant", "content": r}], f"{c.where} revision {k}")
                    for k, r in enumerate(c.revisions, 1)]
    return out, unrevised


def record_messages(rec, where: str) -> list[dict]:
    """One record -> validated messages ending with a non-empty assistant message."""
    if not isinstance(rec, dict):
        raise InputError(f"{where}: expected a JSON object")
    if "messages" in rec:
        msgs = rec["messages"]
    elif "init_prompt" in rec and "revision_response" in rec:
        msgs = [{"role": "user", "content": rec["init_prompt"]}, {"role": "assistant", "content": rec["revision_response"]}]
    elif "prompt" in rec and "response" in rec:
        msgs = [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["response"]}]
    else:
        raise InputError(f"{where}: needs 'messages', 'init_prompt' + 'revision_response', or 'prompt' + 'response'")
    if not isinstance(msgs, list) or not msgs:
        raise InputError(f"{where}: 'messages' must be a non-empty list")
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise InputError(f"{where}: message {k} needs a role in {ROLES} and a string content")
    if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
        raise InputError(f"{where}: the last message must be a non-empty assistant message")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


# ---- tokenisation -------------------------------------------------------------------------

def encode(tokenizer, messages: list[dict], *, chat: bool, loss_on: str = "last") -> tuple[list[int], list[bool]]:
    """Token ids of the conversation and the mask of the assistant tokens that are targets."""
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    turns = turns[-1:] if loss_on == "last" else turns
    return (_encode_chat if chat else _encode_text)(tokenizer, messages, set(turns))


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _encode_chat(tokenizer, messages, turns) -> tuple[list[int], list[bool]]:
    """Through the chat template. The targets of assistant turn k are the tokens between the
    template of messages[:k] with the assistant header opened and that of messages[:k+1]
    (its content and end-of-turn marker), located by common prefix with the full rendering
    so a template that renders a prefix slightly differently cannot shift the mask."""
    render = lambda msgs, gen: _ids(tokenizer, tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen))  # noqa: E731
    full = render(messages, False)
    mask = [False] * len(full)
    for k in turns:
        start, end = _common(render(messages[:k], True), full), _common(render(messages[: k + 1], False), full)
        if end <= start:
            raise InputError("could not locate the assistant's tokens in the chat template's output")
        mask[start:end] = [True] * (end - start)
    return full, mask


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _encode_text(tokenizer, messages, turns) -> tuple[list[int], list[bool]]:
    """A ``Human: ... / Assistant: ...`` transcript (the paper's format, system turns dropped),
    each piece tokenised on its own so the boundaries are exact; EOS closes the last answer."""
    names = {"user": "Human", "assistant": "Assistant"}
    ids = list(tokenizer("", add_special_tokens=True)["input_ids"])  # BOS where the tokenizer adds one
    mask = [False] * len(ids)
    sep = ""
    for k, m in enumerate(messages):
        if m["role"] not in names:
            continue
        head = _ids(tokenizer, f"{sep}{names[m['role']]}:")
        body = _ids(tokenizer, f" {m['content'].strip()}")
        if k == len(messages) - 1 and tokenizer.eos_token_id is not None:
            body.append(tokenizer.eos_token_id)
        ids += head + body
        mask += [False] * len(head) + [k in turns] * len(body)
        sep = "\n\n"
    return ids, mask


def use_chat(engine, fmt: str) -> bool:
    has = bool(getattr(engine.tokenizer, "chat_template", None))
    if fmt == "chat" and not has:
        raise InputError(f"{engine.source}: format 'chat' asked, but the tokenizer has no chat template")
    return has if fmt == "auto" else fmt == "chat"


# ---- training -----------------------------------------------------------------------------

def train_sft(engine, examples: Sequence[Conversation | list[dict]], cfg: SFTConfig, out: str | Path | None = None,
              *, progress: bool = False, resume: bool = True) -> dict:
    """Fine-tune ``engine.model`` on the examples; returns summary metrics.

    With ``out``: checkpoints in ``out/checkpoints`` (resumed from when ``resume``), one JSON
    line per optimizer step in ``out/metrics.jsonl``, and the exports (``adapter/``,
    ``peft/``, optionally ``merged/``), each written whole and renamed into place. A resume
    whose data, model or settings (other than when to stop or save) differ from the
    checkpoint's is refused, naming the fields. Leaves the trained adapter in the engine,
    inactive.
    """
    model, out = engine.model, Path(out) if out is not None else None
    convs = [c if isinstance(c, Conversation) else Conversation(list(c), f"example {i}") for i, c in enumerate(examples)]
    convs, unrevised = select_examples(convs, cfg.revisions)
    if not convs and unrevised:
        raise InputError(f"no SFT examples: all {unrevised} SL-CAI records had only degenerate revisions")
    chat = use_chat(engine, cfg.format)
    data = [encode(engine.tokenizer, c.messages, chat=chat, loss_on=cfg.loss_on) for c in convs]
    names = [c.where for c in convs]
    epoch_batches = lambda e: batches_by_tokens(  # noqa: E731
        data, cfg.max_tokens_per_batch, cfg.shuffle, cfg.seed + e, max_seqlen=model.cfg.max_position_embeddings, names=names,
        device=model.device)
    per_epoch = steps_per_epoch(len(epoch_batches(0)), cfg.optim.grad_accum)
    optim = replace(cfg.optim, total_steps=cfg.optim.total_steps or per_epoch * cfg.epochs)
    previous = lora.active_adapter(model)
    params = _trainable(engine, cfg)
    trainer = Trainer(params.values(), optim)
    run = LoopSettings("sft", cfg.epochs, cfg.checkpoint_every, cfg.keep_checkpoints, cfg.max_steps, cfg.seed,
                       postfix=("loss", "lr"), pinned=pinned_settings(engine, convs, cfg))
    try:
        log = train_loop(run, trainer, params, epoch_batches, _step_fn(model, trainer), out, progress, resume)
        if out is not None and distributed.is_main():
            _export(engine, cfg, out)
        distributed.barrier()  # the exports are whole before any rank reads them
        return {**summary(log, trainer.step), "examples": len(convs), "unrevised_skipped": unrevised}
    finally:
        _restore(engine, cfg, previous)


# Settings that only say when to stop, how often to save or what to export: a resumed run
# may change them without changing the result.
_UNPINNED = ("max_steps", "checkpoint_every", "keep_checkpoints", "export_merged")


def pinned_settings(engine, convs: Sequence[Conversation], cfg: SFTConfig) -> dict:
    """What determines an SFT run's result, flat (``optim.lr``, ``epochs``, ``data_sha256``,
    ...): a resume with any of it changed is refused."""
    flat = {}
    for k, v in asdict(cfg).items():
        if isinstance(v, dict):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        elif k not in _UNPINNED:
            flat[k] = v
    return {"model": str(engine.source), "examples": len(convs),
            "data_sha256": sha256_of([c.messages for c in convs]), **flat}


def _trainable(engine, cfg: SFTConfig) -> dict:
    model = engine.model
    if cfg.full:
        lora.set_adapter(model, None)
        model.requires_grad_(True)
        return dict(model.named_parameters())
    if cfg.adapter not in lora.adapters(model):
        lora.add_adapter(model, cfg.adapter, cfg.lora, seed=cfg.seed)
    ad = lora.get_adapter(model, cfg.adapter).train().requires_grad_(True)
    lora.set_adapter(model, cfg.adapter)
    return dict(ad.named_parameters())


def _restore(engine, cfg: SFTConfig, previous: str | None) -> None:
    if cfg.full:
        engine.model.requires_grad_(False)
    else:
        lora.get_adapter(engine.model, cfg.adapter).eval().requires_grad_(False)
    lora.set_adapter(engine.model, previous)


def _step_fn(model, trainer: Trainer):
    def step(group) -> dict:
        """One optimizer step: token-mean loss over all the group's target tokens (this
        rank runs its share of the group; the denominator counts the whole group's)."""
        denom = max(1, sum(b.num_targets for b in group))
        loss = 0.0
        for b in my_share(group):
            with profiling.phase("engine.train.forward"):
                lp = token_logprobs(model, b)
            loss += trainer.backward(-lp.sum() / denom)
        stats = trainer.apply()
        loss = reduce_sums({"loss": loss})["loss"]
        return {"step": trainer.step, "loss": loss, "lr": stats["lr"], "grad_norm": stats["grad_norm"],
                "target_tokens": denom}

    return step


def _export(engine, cfg: SFTConfig, out: Path) -> None:
    """Each export folder is written whole beside its place and renamed in (``atomic_folder``)."""
    model = engine.model
    if not cfg.full:
        with atomic_folder(out / "adapter") as tmp:
            lora.save_adapter(model, cfg.adapter, tmp)
        with atomic_folder(out / "peft") as tmp:
            lora.export_peft(model, cfg.adapter, tmp, base_model_name_or_path=str(engine.source))
    if cfg.full or cfg.export_merged:
        with atomic_folder(out / "merged") as tmp:
            lora.export_merged(model, None if cfg.full else cfg.adapter, tmp, engine.tokenizer, engine.source)
