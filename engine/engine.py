"""The engine: one model in one process, serving every role of the method.

``Engine.load(...)`` reads a model once; ``generate`` samples from it with continuous
batching; later layers add scoring, adapters and training steps on the same weights.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from engine import distributed, loader
from engine.device import resolve_device, resolve_dtype
from engine.errors import InputError
from engine.generate import Generator, RequestOutput
from engine.graphs import StaticDecoder
from engine.model import Decoder
from engine.sampling import SamplingParams

Prompt = Union[str, Sequence[dict], Sequence[int]]


class Engine:
    """A loaded model and its tokenizer.

    Attributes: ``model`` (the Decoder), ``tokenizer``, ``source`` (where it was loaded from),
    ``cuda_graphs`` (decode replays CUDA graphs when the model is on CUDA; ignored on the CPU),
    ``rollout_weights`` (what ``generate`` reads: ``fp32``, the weights themselves, or ``fp16``
    / ``int8`` copies of the base's linears and head, see ``engine.quant``; set it with
    ``set_rollout_weights``).
    """

    def __init__(self, model: Decoder, tokenizer, source: str = "", max_slots: int = 32, cuda_graphs: bool = True,
                 rollout_weights: str = "fp32"):
        self.model, self.tokenizer, self.source = model, tokenizer, str(source)
        self.max_slots, self.cuda_graphs = max_slots, cuda_graphs
        self._static: StaticDecoder | None = None
        self._rollout = None
        self._stand_ins: dict = {}  # mode -> engine.quant.RolloutWeights, kept once built
        self.set_rollout_weights(rollout_weights)

    @property
    def rollout_weights(self) -> str:
        return self._rollout.mode

    def set_rollout_weights(self, mode: str) -> None:
        """``fp32``, ``fp16`` or ``int8`` (the last two on the CPU only): what generation reads
        from now on. Scoring and training always read the weights themselves. A mode's
        stand-ins are built at its first generate call and kept (they rebuild themselves
        when the weights change)."""
        from engine.quant import RolloutWeights

        if mode not in self._stand_ins:
            self._stand_ins[mode] = RolloutWeights(self.model, mode)
        self._rollout = self._stand_ins[mode]

    @classmethod
    def load(cls, model: str = "default", *, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
             max_slots: int = 32, cuda_graphs: bool = True, rollout_weights: str = "fp32") -> "Engine":
        """Load ``default`` (the embedded SmolLM2-135M-Instruct), a checkpoint folder or a GGUF file.

        ``device``: "auto" (the first CUDA device when there is one, else the CPU), "cpu",
        "cuda", "cuda:N" or a torch.device. ``dtype``: "auto" (bfloat16 on CUDA, float32 on
        the CPU), "float32", "bfloat16", "float16" or a torch.dtype. ``cuda_graphs``: decode
        steps on CUDA replay a captured graph per batch-size bucket (False: eager decode).
        ``rollout_weights``: ``fp32``, ``fp16`` or ``int8`` (see the class docstring).
        """
        dev = resolve_device(device)
        decoder, tokenizer, source = loader.load(model, resolve_dtype(dtype, dev), dev)
        return cls(decoder, tokenizer, source, max_slots, cuda_graphs, rollout_weights)

    @property
    def cfg(self):
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def max_context(self) -> int:
        """The most tokens a sequence (prompt + completion) may hold."""
        return self.model.cfg.max_position_embeddings

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed.dtype

    def static_decoder(self) -> StaticDecoder | None:
        """The static KV cache and CUDA graphs kept between generate calls, or None for eager
        decode (the CPU, or ``cuda_graphs`` off)."""
        if not self.cuda_graphs or self.device.type != "cuda":
            return None
        if self._static is None:
            self._static = StaticDecoder(self.model, capture=True)
        return self._static

    def encode(self, prompt: Prompt, index: int = 0) -> list[int]:
        """A prompt as token ids: raw text, a chat message list (through the tokenizer's chat
        template, with the assistant turn opened) or token ids as they are."""
        if isinstance(prompt, str):
            return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
            return self.chat_ids(list(prompt))
        if isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise InputError(f"prompt {index}: expected a string, a list of chat messages or token ids")

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InputError(f"{self.source}: this tokenizer has no chat template; pass raw text prompts")
        for k, m in enumerate(messages):
            if "role" not in m or "content" not in m:
                raise InputError(f"message {k}: needs 'role' and 'content'")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams | None = None,
        *,
        progress: bool = False,
        max_slots: int | None = None,
        sample_keys: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Sample continuations for every prompt; one RequestOutput per prompt, in order.
        ``sample_keys``: what seeds each prompt's samples instead of its position (a rank
        passes the prompts' positions in the whole list it has a share of)."""
        params = params or SamplingParams()
        ids = [self.encode(p, i) for i, p in enumerate(prompts)]
        gen = Generator(self.model, self.tokenizer, max_slots or self.max_slots, static=self.static_decoder())
        bar = None
        if progress and distributed.is_main():  # one progress bar, from rank 0
            from tqdm import tqdm

            bar = tqdm(total=len(ids) * params.n, desc="generate", unit="sample")
        try:
            with self._rollout.installed():
                return gen.run(ids, params, bar, None if sample_keys is None else list(sample_keys))
        finally:
            if bar is not None:
                bar.close()
