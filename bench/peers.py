"""The peers' view of the engine's model: a transformers model or checkpoint folder with the
same weights, whatever the engine was loaded from.

A real checkpoint folder is handed to the peers as it is (``from_pretrained`` of the folder,
as a user would). A model with no folder (``dummy:<shape>``, a config.json, a GGUF file)
is given to transformers from the engine's own tensors: in memory for inference (the
peer's projections are views of the engine's fused weights, so nothing is copied), or
written once to a temporary folder for the trainers, which load, wrap and train their own
copies.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def checkpoint_folder(eng) -> Path | None:
    """The engine's source when it is a transformers checkpoint folder, else None."""
    src = Path(eng.source)
    return src if src.is_dir() and (src / "config.json").is_file() else None


def hf_config(eng):
    from transformers import AutoConfig

    from engine.dummy import hf_config_of

    d = hf_config_of(eng.cfg)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def hf_causal_lm(eng, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """A transformers causal LM with the engine's weights, in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from engine.loader import to_hf_state_dict

    folder = checkpoint_folder(eng)
    if folder is not None:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="sdpa")
    else:
        cfg = hf_config(eng)
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)]
        model = cls.from_pretrained(None, config=cfg, state_dict=to_hf_state_dict(eng.model), dtype=dtype,
                                    attn_implementation="sdpa")
    return model.to(device).eval()


def hf_folder(eng, tmp: str | Path, weights: bool = True) -> Path:
    """A checkpoint folder of the engine's weights and tokenizer: its source when it is one,
    else one written under ``tmp`` (config.json, model.safetensors unless not ``weights``,
    tokenizer files)."""
    from safetensors.torch import save_file

    from engine.dummy import hf_config_of
    from engine.loader import to_hf_state_dict

    folder = checkpoint_folder(eng)
    if folder is not None:
        return folder
    folder = Path(tmp) / "hf-model"
    folder.mkdir(parents=True, exist_ok=True)
    cfg = hf_config_of(eng.cfg)
    cfg["architectures"] = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                             "qwen2": "Qwen2ForCausalLM"}[cfg["model_type"]]]
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    if weights:
        state = {k: v.detach().cpu().contiguous().clone() for k, v in to_hf_state_dict(eng.model).items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    eng.tokenizer.save_pretrained(str(folder))
    return folder


def hf_tokenizer(eng, padding_side: str = "left"):
    """The engine's tokenizer for a batched peer: padded on ``padding_side``, with a pad token."""
    import copy

    tok = copy.deepcopy(eng.tokenizer)
    tok.padding_side = padding_side
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
