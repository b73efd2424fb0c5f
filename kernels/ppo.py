"""Per-token KL penalty and the clipped PPO policy and value losses, fused.

KL estimators (J. Schulman, "Approximating KL Divergence", 2020), for tokens sampled from
the policy, with log r = ref_logprob - logprob:
    k1 = -log r                 (unbiased, high variance, can be negative)
    k2 = (log r)^2 / 2          (biased, low variance)
    k3 = (r - 1) - log r        (unbiased, low variance, >= 0)

PPO (Schulman et al. 2017, arXiv 1707.06347, eq. 7 and the clipped value loss of its
baselines), with ratio rho = exp(logprob - old_logprob) and A the advantages:
    policy:  l = max(-A rho, -A clip(rho, 1 - eps, 1 + eps))
    value:   l = 1/2 max((v - R)^2, (clip(v, v_old - eps, v_old + eps) - R)^2)
Reductions over the masked tokens: "token" = sum(l * mask) / sum(mask); "sequence" = mean
over each sequence's masked tokens (sequences from `cu_seqlens`), then mean over the
sequences that have any masked token. clip_frac and approx_kl (k3 of the new policy
against the old) use the same reduction as the loss.

Fusion: one pass computes the reduced loss, the metrics and dloss/dinput per token; the
backward is that saved coefficient times the upstream scalar (one multiply, so there is no
separate backward kernel). Gradients flow only to `logprob` / `values`: old log-probs,
advantages, returns and the mask are data.

Precision: inputs are cast to float32 and every per-token value (ratio, KL, loss,
gradient coefficient) and every reduction is float32; results come back in the input's
dtype (float32 for the engine's float32 log-probs and values).

Truncated importance sampling: an optional per-token weight ``iw`` (data, no gradient)
multiplies each token's clipped policy loss, l' = iw * l; ``truncated_is_weights`` builds
iw = min(exp(old_logprob - sampler_logprob), cap).

Minimum traffic (Triton): 5 reads of [N] (logprob, old, advantages, weight, mask; a 6th
with importance weights) and one
[N] write of the gradient coefficient, ~20 FLOPs per token: purely memory-bound.
"""
from typing import NamedTuple

import torch

from ._dispatch import backend
from ._triton import launch_device, tl, triton

_BLOCK = 1024


class PolicyLossOutput(NamedTuple):
    """loss: scalar, differentiable in logprob; clip_frac, approx_kl: scalars, detached."""

    loss: torch.Tensor
    clip_frac: torch.Tensor
    approx_kl: torch.Tensor


class ValueLossOutput(NamedTuple):
    """loss: scalar, differentiable in values; clip_frac: scalar, detached."""

    loss: torch.Tensor
    clip_frac: torch.Tensor


def token_weights(mask, reduction="token", cu_seqlens=None):
    """Per-token weights w [N] (float32) such that the reduced loss is sum(w * l).

    mask [N] (bool or float); cu_seqlens [B+1] (int32/int64) is needed for "sequence".
    No host sync: counts stay on the device."""
    m = mask.to(torch.float32)
    if reduction == "token":
        return m / m.sum().clamp(min=1.0)
    if reduction != "sequence":
        raise ValueError(f"reduction {reduction!r}: expected 'token' or 'sequence'")
    assert cu_seqlens is not None, "reduction='sequence' needs cu_seqlens"
    N = m.shape[0]
    pos = torch.arange(N, device=m.device, dtype=cu_seqlens.dtype)
    seq = torch.searchsorted(cu_seqlens[1:].contiguous(), pos, right=True)  # [N]
    counts = torch.zeros(cu_seqlens.shape[0] - 1, device=m.device).index_add_(0, seq, m)
    nonempty = (counts > 0).sum().clamp(min=1)
    return m / counts.clamp(min=1.0)[seq] / nonempty


# ------------------------------------------------------------------------------------------
# Triton kernels: one program per BLOCK tokens, writing per-token gradient coefficients and
# per-block partial sums (reduced on the host side by one torch.sum, no sync).
# ------------------------------------------------------------------------------------------
@triton.jit
def _kl_penalty_fwd_kernel(
    lp_ptr,  # [N] float32 logprob
    ref_ptr,  # [N] float32 ref_logprob
    kl_ptr,  # [N] float32 out
    dkl_ptr,  # [N] float32 out: dkl / dlogprob
    N,
    KIND: tl.constexpr,  # 1, 2 or 3
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    lp = tl.load(lp_ptr + offs, mask=inb, other=0.0)
    ref = tl.load(ref_ptr + offs, mask=inb, other=0.0)
    log_r = ref - lp
    if KIND == 1:
        kl = -log_r
        dkl = tl.full((BLOCK,), 1.0, tl.float32)
    elif KIND == 2:
        kl = 0.5 * log_r * log_r
        dkl = -log_r
    else:
        r = tl.exp(log_r)
        kl = (r - 1.0) - log_r
        dkl = 1.0 - r
    tl.store(kl_ptr + offs, kl, mask=inb)
    tl.store(dkl_ptr + offs, dkl, mask=inb)


@triton.jit
def _ppo_policy_fwd_kernel(
    lp_ptr,  # [N] float32 logprob
    old_ptr,  # [N] float32 old_logprob
    adv_ptr,  # [N] float32 advantages
    w_ptr,  # [N] float32 reduction weights (0 where masked out)
    iw_ptr,  # [N] float32 importance weights (read only when HAS_IW)
    dlp_ptr,  # [N] float32 out: dloss / dlogprob
    part_ptr,  # [num_blocks, 3] float32 out: sums of w*iw*loss, w*clipped, w*approx_kl
    N,
    clip_eps,
    HAS_IW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    lp = tl.load(lp_ptr + offs, mask=inb, other=0.0)
    old = tl.load(old_ptr + offs, mask=inb, other=0.0)
    adv = tl.load(adv_ptr + offs, mask=inb, other=0.0)
    w = tl.load(w_ptr + offs, mask=inb, other=0.0)
    log_ratio = lp - old
    ratio = tl.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_eps), 1.0 + clip_eps)
    take_unclipped = unclipped >= clipped
    loss = tl.where(take_unclipped, unclipped, clipped)
    approx_kl = (ratio - 1.0) - log_ratio
    if HAS_IW:
        w_loss = w * tl.load(iw_ptr + offs, mask=inb, other=0.0)
    else:
        w_loss = w
    tl.store(dlp_ptr + offs, tl.where(take_unclipped, unclipped, 0.0) * w_loss, mask=inb)
    tl.store(part_ptr + pid * 3 + 0, tl.sum(w_loss * loss, 0))
    tl.store(part_ptr + pid * 3 + 1, tl.sum(tl.where(take_unclipped, 0.0, w), 0))
    tl.store(part_ptr + pid * 3 + 2, tl.sum(w * approx_kl, 0))


@triton.jit
def _ppo_value_fwd_kernel(
    v_ptr,  # [N] float32 values
    old_ptr,  # [N] float32 old_values
    ret_ptr,  # [N] float32 returns
    w_ptr,  # [N] float32 reduction weights
    dv_ptr,  # [N] float32 out: dloss / dvalues
    part_ptr,  # [num_blocks, 2] float32 out: sums of w*loss, w*clipped
    N,
    clip_eps,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < N
    v = tl.load(v_ptr + offs, mask=inb, other=0.0)
    old = tl.load(old_ptr + offs, mask=inb, other=0.0)
    ret = tl.load(ret_ptr + offs, mask=inb, other=0.0)
    w = tl.load(w_ptr + offs, mask=inb, other=0.0)
    err = v - ret
    # clip(v, old - eps, old + eps) is exactly v inside the range, so ties are exact there
    err_clipped = tl.minimum(tl.maximum(v, old - clip_eps), old + clip_eps) - ret
    take_unclipped = err * err >= err_clipped * err_clipped
    loss = 0.5 * tl.where(take_unclipped, err * err, err_clipped * err_clipped)
    tl.store(dv_ptr + offs, tl.where(take_unclipped, err, 0.0) * w, mask=inb)
    tl.store(part_ptr + pid * 2 + 0, tl.sum(w * loss, 0))
    tl.store(part_ptr + pid * 2 + 1, tl.sum(tl.where(take_unclipped, 0.0, w), 0))


def _flat(*tensors):
    n = tensors[0].shape
    for t in tensors:
        assert t.dim() == 1 and t.shape == n, f"expected [N] tensors of one length, got {t.shape}"
    return [t.detach().to(torch.float32).contiguous() for t in tensors]


_KINDS = {"k1": 1, "k2": 2, "k3": 3}


def _kl_torch(lp, ref, kind):
    log_r = ref - lp
    if kind == 1:
        return -log_r, torch.ones_like(lp)
    if kind == 2:
        return 0.5 * log_r.square(), -log_r
    r = log_r.exp()
    return (r - 1.0) - log_r, 1.0 - r


def _policy_torch(lp, old, adv, w, eps, iw=None):
    log_ratio = lp - old
    ratio = log_ratio.exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - eps, 1.0 + eps)
    take = unclipped >= clipped
    loss = torch.where(take, unclipped, clipped)
    w_loss = w if iw is None else w * iw
    dlp = torch.where(take, unclipped, 0.0).mul_(w_loss)
    approx_kl = (ratio - 1.0).sub_(log_ratio)
    sums = torch.stack([(w_loss * loss).sum(), w.sum() - (w * take).sum(), (w * approx_kl).sum()])
    return dlp, sums


def _value_torch(v, old, ret, w, eps):
    err = v - ret
    err_c = torch.clamp(v, old - eps, old + eps) - ret
    sq, sq_c = err.square(), err_c.square()
    take = sq >= sq_c
    dv = torch.where(take, err, 0.0).mul_(w)
    sums = torch.stack([0.5 * (w * torch.maximum(sq, sq_c)).sum(), w.sum() - (w * take).sum()])
    return dv, sums


def launch_config() -> dict:
    """Launch resources of the three elementwise kernels, as the GPU path uses them (the
    AOT compile test reads this too): BLOCK tokens per program, 8 per thread."""
    return dict(BLOCK=_BLOCK, num_warps=4, num_stages=1)


def _launch(kernel, n_parts, *args, eps, **constexprs):
    N = args[0].shape[0]
    grid = (triton.cdiv(N, _BLOCK),)
    dx = torch.empty_like(args[0])
    parts = torch.zeros(grid[0], n_parts, device=args[0].device, dtype=torch.float32)
    with launch_device(*args):
        kernel[grid](*args, dx, parts, N, float(eps), **constexprs, **launch_config())
    return dx, parts.sum(0)


class _Fused(torch.autograd.Function):
    """Forward computes the loss and dloss/dx in one pass; backward scales dloss/dx."""

    @staticmethod
    def forward(ctx, x, dx, loss):
        ctx.save_for_backward(dx)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        (dx,) = ctx.saved_tensors
        return dx * grad, None, None


class _KLPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logprob, ref_logprob, kind, impl):
        lp, ref = _flat(logprob, ref_logprob)
        if impl == "triton":
            kl, dkl = torch.empty_like(lp), torch.empty_like(lp)
            grid = (triton.cdiv(lp.shape[0], _BLOCK),)
            with launch_device(lp, ref):
                _kl_penalty_fwd_kernel[grid](lp, ref, kl, dkl, lp.shape[0], KIND=kind,
                                             **launch_config())
        else:
            kl, dkl = _kl_torch(lp, ref, kind)
        ctx.save_for_backward(dkl)
        return kl.to(logprob.dtype)

    @staticmethod
    def backward(ctx, grad):
        (dkl,) = ctx.saved_tensors
        return (grad * dkl).to(grad.dtype), None, None, None


def _kl_impl(impl):
    def run(logprob, ref_logprob, kind="k1"):
        if kind not in _KINDS:
            raise ValueError(f"kind {kind!r}: expected k1, k2 or k3")
        return _KLPenalty.apply(logprob, ref_logprob, _KINDS[kind], impl)
    run.__name__ = f"kl_penalty_{impl}"
    return run


def kl_penalty_reference(logprob, ref_logprob, kind="k1"):
    log_r = ref_logprob.detach() - logprob
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        return torch.exp(log_r) - 1 - log_r
    raise ValueError(f"kind {kind!r}: expected k1, k2 or k3")


def _policy_impl(impl):
    def run(logprob, old_logprob, advantages, mask, *, clip_eps=0.2, reduction="token",
            cu_seqlens=None, is_weight=None):
        lp, old, adv = _flat(logprob, old_logprob, advantages)
        w = token_weights(mask, reduction, cu_seqlens)
        iw = None if is_weight is None else _flat(lp, is_weight)[1]
        if impl == "triton":
            dlp, sums = _launch(_ppo_policy_fwd_kernel, 3, lp, old, adv, w, w if iw is None else iw,
                                eps=clip_eps, HAS_IW=iw is not None)
        else:
            dlp, sums = _policy_torch(lp, old, adv, w, clip_eps, iw)
        loss = _Fused.apply(logprob, dlp.to(logprob.dtype), sums[0].to(logprob.dtype))
        return PolicyLossOutput(loss, sums[1], sums[2])
    run.__name__ = f"ppo_policy_loss_{impl}"
    return run


def _value_impl(impl):
    def run(values, old_values, returns, mask, *, clip_eps=0.2, reduction="token",
            cu_seqlens=None):
        v, old, ret = _flat(values, old_values, returns)
        w = token_weights(mask, reduction, cu_seqlens)
        if impl == "triton":
            dv, sums = _launch(_ppo_value_fwd_kernel, 2, v, old, ret, w, eps=clip_eps)
        else:
            dv, sums = _value_torch(v, old, ret, w, clip_eps)
        loss = _Fused.apply(values, dv.to(values.dtype), sums[0].to(values.dtype))
        return ValueLossOutput(loss, sums[1])
    run.__name__ = f"ppo_value_loss_{impl}"
    return run


def ppo_policy_loss_reference(logprob, old_logprob, advantages, mask, *, clip_eps=0.2,
                              reduction="token", cu_seqlens=None, is_weight=None):
    """Unfused PyTorch, as PPO implementations usually write it."""
    w = token_weights(mask, reduction, cu_seqlens).to(logprob.dtype)
    log_ratio = logprob - old_logprob
    ratio = torch.exp(log_ratio)
    losses1 = -advantages * ratio
    losses2 = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    per_token = torch.max(losses1, losses2)
    if is_weight is not None:
        per_token = per_token * is_weight.detach().to(logprob.dtype)
    loss = (per_token * w).sum()
    clip_frac = ((losses2 > losses1).to(w.dtype) * w).sum().detach()
    approx_kl = (((ratio - 1) - log_ratio) * w).sum().detach()
    return PolicyLossOutput(loss, clip_frac, approx_kl)


def ppo_value_loss_reference(values, old_values, returns, mask, *, clip_eps=0.2,
                             reduction="token", cu_seqlens=None):
    """Unfused PyTorch, as PPO implementations usually write it."""
    w = token_weights(mask, reduction, cu_seqlens).to(values.dtype)
    v_clipped = torch.clamp(values, old_values - clip_eps, old_values + clip_eps)
    losses1 = (values - returns) ** 2
    losses2 = (v_clipped - returns) ** 2
    loss = 0.5 * (torch.max(losses1, losses2) * w).sum()
    clip_frac = ((losses2 > losses1).to(w.dtype) * w).sum().detach()
    return ValueLossOutput(loss, clip_frac)


kl_penalty_torch, kl_penalty_triton = _kl_impl("torch"), _kl_impl("triton")
ppo_policy_loss_torch, ppo_policy_loss_triton = _policy_impl("torch"), _policy_impl("triton")
ppo_value_loss_torch, ppo_value_loss_triton = _value_impl("torch"), _value_impl("triton")
_KL = {"torch": kl_penalty_torch, "triton": kl_penalty_triton, "reference": kl_penalty_reference}
_POLICY = {"torch": ppo_policy_loss_torch, "triton": ppo_policy_loss_triton,
           "reference": ppo_policy_loss_reference}
_VALUE = {"torch": ppo_value_loss_torch, "triton": ppo_value_loss_triton,
          "reference": ppo_value_loss_reference}


def kl_penalty(logprob, ref_logprob, kind="k1"):
    """Per-token KL estimate [N] of the policy from the reference (k1, k2 or k3, see the
    module docstring); differentiable in `logprob` only. Computed in float32, returned in
    `logprob`'s dtype."""
    return _KL[backend("kl_penalty", logprob.device)](logprob, ref_logprob, kind)


def ppo_policy_loss(logprob, old_logprob, advantages, mask, *, clip_eps=0.2, reduction="token",
                    cu_seqlens=None, is_weight=None) -> PolicyLossOutput:
    """Clipped PPO policy loss over [N] tokens; "sequence" reduction needs cu_seqlens [B+1].
    Ratios, per-token losses, reduction weights and the sums (loss, clip_frac, approx_kl)
    in float32; loss returned in `logprob`'s dtype, the metrics in float32.

    ``is_weight`` [N] (optional): per-token importance weights that multiply each token's
    clipped surrogate (and its gradient), e.g. ``truncated_is_weights`` when the rollout
    sampled from a policy other than the one the old log-probs are taken under. Data: no
    gradient flows to it; clip_frac and approx_kl are not weighted by it."""
    return _POLICY[backend("ppo_policy_loss", logprob.device)](
        logprob, old_logprob, advantages, mask, clip_eps=clip_eps, reduction=reduction,
        cu_seqlens=cu_seqlens, is_weight=is_weight)


def truncated_is_weights(old_logprob, sampler_logprob, cap=2.0):
    """Truncated importance sampling weights [N] (float32, detached):
    ``min(exp(old_logprob - sampler_logprob), cap)``, the correction of a policy loss whose
    tokens were drawn by a sampler that differs slightly from the learner (e.g. quantised
    rollout weights). Returns (weights, truncated [N] bool: where the cap applied)."""
    if not (cap > 0):
        raise ValueError(f"cap must be > 0, got {cap}")
    ratio = (old_logprob.detach().float() - sampler_logprob.detach().float()).exp()
    return ratio.clamp(max=cap), ratio > cap


def ppo_value_loss(values, old_values, returns, mask, *, clip_eps=0.2, reduction="token",
                   cu_seqlens=None) -> ValueLossOutput:
    """Clipped value loss over [N] tokens; "sequence" reduction needs cu_seqlens [B+1].
    Errors, weights and sums in float32; loss returned in `values`' dtype, clip_frac in
    float32."""
    return _VALUE[backend("ppo_value_loss", values.device)](
        values, old_values, returns, mask, clip_eps=clip_eps, reduction=reduction,
        cu_seqlens=cu_seqlens)
