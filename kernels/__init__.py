"""The hot ops: log-prob, KL / PPO loss, preference scoring, packed attention.

Each op picks its implementation from its inputs' device, once per (op, device type)
(`backend(op, device)`): "triton" for CUDA tensors when Triton is importable, else "torch"
(the CPU path); `CAI_KERNELS=triton|torch|reference` overrides everywhere and
`override(impl)` within a block. Each op module also exposes `<op>_triton`, `<op>_torch`
and `<op>_reference` with the public signature, to call one implementation directly.
"""
from ._dispatch import IMPLS, OPS, backend, override, validate_env
from .attention import packed_attention, shared_prefix_attention
from .decode_attention import decode_attention
from .logprob import linear_logprob, logprob
from .ppo import PolicyLossOutput, ValueLossOutput, kl_penalty, ppo_policy_loss, ppo_value_loss, truncated_is_weights
from .preference import (PairLossOutput, bt_loss, dpo_loss, option_probs,
                         sum_option_logprobs)

validate_env()  # a bad CAI_KERNELS fails at import rather than mid-run

__all__ = [
    "IMPLS", "OPS", "backend", "override",
    "logprob", "linear_logprob",
    "kl_penalty", "ppo_policy_loss", "ppo_value_loss", "truncated_is_weights", "PolicyLossOutput", "ValueLossOutput",
    "option_probs", "sum_option_logprobs", "bt_loss", "dpo_loss", "PairLossOutput",
    "packed_attention", "shared_prefix_attention", "decode_attention",
]
