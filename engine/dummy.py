"""Random-weight models of real shapes, so speed can be measured where no weights are on disk.

``dummy:<name>`` names a shape from ``SHAPES`` (the dimensions of the published configs);
a path ending in ``.json`` is a transformers ``config.json``. The weights are drawn from a
seeded normal distribution straight into the engine's own ``Decoder`` on the requested
device and dtype: no transformers model is built and no second copy is held, so an 8B
shape needs only its own bytes on the GPU.

The tokenizer: one saved beside a ``config.json`` when there is one; else the default
model's (SmolLM2's, when its converted folder is already in ``$CAI_HOME``); else a
byte-level tokenizer built here (256 byte tokens and the chat markers, nothing to read).
``dummy:tiny`` always uses the byte-level one, so it behaves the same on every machine.
Token ids past the tokenizer's vocabulary decode to nothing; the text of a random model is
noise anyway.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.errors import InputError
from engine.model import Decoder

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

SHAPES: dict[str, dict] = {
    "tiny": dict(model_type="llama", vocab_size=0, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                 max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0),
    # HuggingFaceTB/SmolLM2-135M(-Instruct)
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_theta=100000.0),
    # meta-llama/Llama-3.2-1B
    "llama-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                     tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5,
                     rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE),
    # meta-llama/Llama-3.1-8B
    "llama-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     tie_word_embeddings=False, max_position_embeddings=131072, rms_norm_eps=1e-5,
                     rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}),
}
BYTE_TOKENIZER_SHAPES = ("tiny",)
INIT_STD = 0.02  # transformers' initializer_range for these families

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def is_dummy(spec: str) -> bool:
    """True for the specs this module builds: ``dummy:<name>`` or a ``*.json`` config path."""
    return spec.startswith("dummy:") or spec.endswith(".json")


def hf_config(spec: str, tokenizer=None) -> dict:
    """The transformers-style config of ``spec`` (a named shape or a config.json's content);
    with ``tokenizer``, its special tokens (and, for ``tiny``, its vocabulary size) filled in."""
    if spec.startswith("dummy:"):
        name = spec[len("dummy:"):]
        if name not in SHAPES:
            raise InputError(f"{spec}: unknown dummy shape; known: {', '.join(SHAPES)}")
        raw = json.loads(json.dumps(SHAPES[name]))  # a deep copy
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise InputError(f"{path}: config file not found")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: not a valid JSON config: {exc}") from exc
        if not isinstance(raw, dict):
            raise InputError(f"{path}: expected a JSON object (a transformers config.json)")
    if tokenizer is not None:
        if not raw.get("vocab_size"):
            raw["vocab_size"] = len(tokenizer)
        raw.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    return raw


def model_config(spec: str) -> ModelConfig:
    """The engine's config of ``spec``, without building a model or a tokenizer."""
    raw = hf_config(spec)
    if not raw.get("vocab_size"):
        raw["vocab_size"] = len(byte_tokenizer())
    return ModelConfig.from_hf(raw, source=spec)


def load(spec: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0):
    """``dummy:<name>`` | config.json -> (Decoder with random weights, tokenizer, spec)."""
    tokenizer = _tokenizer_for(spec)
    cfg = ModelConfig.from_hf(hf_config(spec, tokenizer), source=spec)
    if cfg.vocab_size < len(tokenizer):
        raise InputError(f"{spec}: vocab_size {cfg.vocab_size} is smaller than the tokenizer's {len(tokenizer)}")
    return random_decoder(cfg, dtype, device, seed), tokenizer, spec


def random_decoder(cfg: ModelConfig, dtype: torch.dtype, device, seed: int = 0) -> Decoder:
    """A Decoder whose weights are drawn on ``device`` in ``dtype`` (norms at one), seeded."""
    device = torch.device(device)
    with torch.device("meta"):
        model = Decoder(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, p in model.named_parameters():
        t = torch.empty(p.shape, dtype=dtype, device=device)
        if name.endswith("norm"):  # RMSNorm gains: one, as a trained model's are near one
            t.fill_(1.0)
        elif name.endswith("bias"):
            t.zero_()
        else:
            t.normal_(0.0, INIT_STD, generator=gen)
        state[name] = t
    model.load_state_dict(state, strict=True, assign=True)
    model.inv_freq = cfg.inv_freq().float().to(device)
    return model.eval().requires_grad_(False)


def _tokenizer_for(spec: str):
    from transformers import AutoTokenizer

    if not spec.startswith("dummy:"):
        folder = Path(spec).expanduser().parent
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
            try:
                return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
            except (OSError, ValueError) as exc:
                raise InputError(f"{folder}: could not load the tokenizer: {exc}") from exc
    elif spec[len("dummy:"):] in BYTE_TOKENIZER_SHAPES:
        return byte_tokenizer()
    from engine.loader import DEFAULT_NAME, cai_home

    default = cai_home() / "models" / DEFAULT_NAME
    if (default / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(default), trust_remote_code=False)
    return byte_tokenizer()


def byte_tokenizer():
    """A byte-level tokenizer with no merges: every byte one token, then the chat markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def hf_config_of(cfg: ModelConfig) -> dict:
    """The engine's config back in transformers' field names (to build a peer model)."""
    out = {k: getattr(cfg, k) for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                                          "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                          "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
                                          "tie_word_embeddings", "attention_bias", "bos_token_id", "pad_token_id")}
    out["eos_token_id"] = cfg.eos_token_id[0] if len(cfg.eos_token_id) == 1 else (cfg.eos_token_id or None)
    if cfg.rope_scaling:
        out["rope_scaling"] = dict(cfg.rope_scaling)
    if cfg.model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    return out
