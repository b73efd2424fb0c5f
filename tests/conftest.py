"""Shared fixtures: tiny random models of each family, with a real (tiny) tokenizer.

Every tiny model is a genuine transformers checkpoint folder (config.json, safetensors,
tokenizer files with a chat template) written by transformers itself, so the engine's
loader, the parity tests and the exporters all read what a user's folder would hold.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    """Triton runs interpreted for the CPU suite, compiled for the GPU pass.

    Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when ``kernels`` is first
    imported, so it is one setting per pytest process: ``-m gpu`` (scripts/gpu_check.sh, and
    the second pass of scripts/test.sh on a CUDA machine) compiles; every other run
    interprets, so the Triton kernels are tested on CPU tensors too."""
    if config.option.markexpr.strip() != "gpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """On a CUDA machine, GPU-marked tests in an interpreted run would check the
    interpreter, not the compiled kernels: they run in the compiled ``-m gpu`` pass instead
    (``CAI_GPU_TEST_DEVICE=cpu`` is the deliberate self-check of tests/test_gpu_kernels.py)."""
    if (os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("CAI_GPU_TEST_DEVICE", "cuda") != "cuda"
            or not torch.cuda.is_available()):
        return  # (without CUDA the GPU tests skip themselves, saying so)
    skip = pytest.mark.skip(reason="interpreted run: GPU tests run in the compiled `pytest -m gpu` pass")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """Human: How do I bake bread? Assistant: Mix flour, water, yeast and salt, knead, let it rise, then bake.
Critique: The answer is helpful and harmless. Revision: Mix flour, water, yeast and salt; knead; rise; bake.
The quick brown fox jumps over the lazy dog. A model should refuse harmful requests and help with safe ones.
Which of these responses is less harmful? Options: (A) (B) The answer is: Let's think step by step.
0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'"()[]{}<>-_=+*/\\|@#$%^&~`
"""

FAMILIES = {
    "llama": dict(model_type="llama", tie_word_embeddings=True),
    "llama3": dict(
        model_type="llama",
        tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False),
    "mistral": dict(model_type="mistral", tie_word_embeddings=False, sliding_window=None),
}


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE trained on a few lines, with SmolLM2's chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_tiny_model(folder: Path, family: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a random-weight checkpoint of ``family`` into ``folder`` and return it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = build_tokenizer()
    fam = dict(FAMILIES[family])
    model_type = fam.pop("model_type")
    cfg = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
               rms_norm_eps=1e-6, rope_theta=10000.0, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg.update(fam)
    cfg.update(overrides)
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # transformers' init is small; widen it so logits are far from uniform
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0, 0.05)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: ``tiny_model_dir(family="llama", **config_overrides) -> Path`` (cached)."""
    made: dict[tuple, Path] = {}

    def make(family: str = "llama", seed: int = 0, **overrides) -> Path:
        key = (family, seed, tuple(sorted(overrides.items(), key=str)))
        if key not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            made[key] = write_tiny_model(folder, family, seed, **overrides)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    """The tiny llama-family model loaded into an Engine (shared; do not mutate)."""
    from engine import Engine

    return Engine.load(tiny_model_dir("llama"))


@pytest.fixture(scope="session")
def default_engine():
    """The embedded SmolLM2-135M-Instruct (converted once into CAI_HOME, then cached)."""
    from engine import Engine

    return Engine.load("default")
