"""Preference scoring: option probabilities (soft AI-feedback labels) and pairwise losses.

Option scoring (Bai et al. 2022, sec. 4.1): the feedback model's log-probs of each option
(" (A)", " (B)", ...; an option of several tokens sums its tokens' log-probs, see
`sum_option_logprobs`) are normalised over the options: probs = softmax(logprobs / T).
With `clamp=(lo, hi)` the probabilities are clamped and renormalised, as the paper does for
chain-of-thought labels ([0.4, 0.6] with two options). Labels are data: `option_probs`
returns detached probabilities.

Pairwise losses on a batch of B pairs, with soft labels p (probability that "chosen" is
preferred; p = 1 for hard labels) and the logit m of the pair:
    loss = -mean_b [ p log s(m) + (1 - p) log s(-m) ] = mean_b [ softplus(-m) + (1 - p) m ]
    dloss/dm = (s(m) - p) / B
  Bradley-Terry (the preference model): m = r_chosen - r_rejected.
  DPO (Rafailov et al. 2023, eq. 7; sigmoid loss): m = beta ((pi_c - ref_c) - (pi_r - ref_r)),
  with soft labels p, or p = 1 - label_smoothing when no labels are given (the "conservative
  DPO" of the peers). Gradients flow to all four log-prob inputs (a frozen reference simply
  does not ask for them).
margin [B] is m (for DPO, chosen minus rejected implicit reward); accuracy is the fraction
of pairs whose margin has the label's sign (m > 0 where p >= 0.5, m < 0 elsewhere).

Precision: every input is cast to float32; margins, softplus, sigmoid, soft-label
probabilities and the batch means are float32, the loss comes back in the input's dtype.

Minimum traffic (Triton): the pair loss reads 2 or 4 (+1 with labels) [B] vectors and writes
one [B] gradient coefficient and [B] margins, ~15 FLOPs a pair; option probs read and write
[B, K]. Memory- and launch-bound: the point of the kernel is one launch instead of ~12.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ._dispatch import backend
from ._triton import launch_device, tl, triton

_BLOCK = 1024


class PairLossOutput(NamedTuple):
    """loss: scalar (differentiable); margin [B] and accuracy (scalar) detached;
    chosen_reward / rejected_reward [B] (DPO's implicit rewards, detached) or None."""

    loss: torch.Tensor
    margin: torch.Tensor
    accuracy: torch.Tensor
    chosen_reward: Optional[torch.Tensor] = None
    rejected_reward: Optional[torch.Tensor] = None


# ------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------
@triton.jit
def _option_probs_fwd_kernel(
    x_ptr,  # [B, K] float32 option log-probs
    out_ptr,  # [B, K] float32 out: probabilities
    K,
    inv_temp,
    lo,
    hi,
    CLAMP: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    inb = offs < K
    x = tl.load(x_ptr + row * K + offs, mask=inb, other=-float("inf")) * inv_temp
    e = tl.exp(x - tl.max(x, 0))
    p = e / tl.sum(e, 0)
    if CLAMP:
        p = tl.where(inb, tl.minimum(tl.maximum(p, lo), hi), 0.0)
        p = p / tl.sum(p, 0)
    tl.store(out_ptr + row * K + offs, p, mask=inb)


@triton.jit
def _pair_loss_fwd_kernel(
    c_ptr,  # [B] float32 chosen (reward or policy log-prob)
    r_ptr,  # [B] float32 rejected
    rc_ptr,  # [B] float32 reference chosen (read when HAS_REF)
    rr_ptr,  # [B] float32 reference rejected (read when HAS_REF)
    p_ptr,  # [B] float32 soft labels (read when HAS_P)
    m_ptr,  # [B] float32 out: margin m
    dm_ptr,  # [B] float32 out: dloss/dm
    part_ptr,  # [num_blocks, 2] float32 out: sums of loss and of correct pairs
    B,
    beta,
    p_const,
    HAS_REF: tl.constexpr,
    HAS_P: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < B
    m = tl.load(c_ptr + offs, mask=inb, other=0.0) - tl.load(r_ptr + offs, mask=inb, other=0.0)
    if HAS_REF:
        m -= tl.load(rc_ptr + offs, mask=inb, other=0.0) - tl.load(rr_ptr + offs, mask=inb,
                                                                    other=0.0)
    m = m * beta
    if HAS_P:
        p = tl.load(p_ptr + offs, mask=inb, other=0.0)
    else:
        p = tl.full((BLOCK,), 0.0, tl.float32) + p_const
    softplus_neg_m = tl.maximum(-m, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(m)))
    loss = tl.where(inb, softplus_neg_m + (1.0 - p) * m, 0.0)
    correct = tl.where(p >= 0.5, m > 0.0, m < 0.0) & inb
    tl.store(m_ptr + offs, m, mask=inb)
    tl.store(dm_ptr + offs, (tl.sigmoid(m) - p) / B, mask=inb)
    tl.store(part_ptr + pid * 2 + 0, tl.sum(loss, 0))
    tl.store(part_ptr + pid * 2 + 1, tl.sum(correct.to(tl.float32), 0))


# ------------------------------------------------------------------------------------------
# Option scoring
# ------------------------------------------------------------------------------------------
def sum_option_logprobs(token_logprobs, option_index, num_options):
    """Sum the log-probs of each option's tokens: token_logprobs [M], option_index [M] int64
    in [0, num_options) -> [num_options]. Flatten a batch of B prompts with K options each
    as option b*K + k, then `.view(B, K)`. One index_add on every backend (already a single
    fused op); differentiable. Sums in the log-probs' dtype (float32 from `logprob`)."""
    assert token_logprobs.dim() == 1 and option_index.shape == token_logprobs.shape
    assert option_index.dtype == torch.int64
    out = token_logprobs.new_zeros(num_options)
    return out.index_add(0, option_index, token_logprobs)


def option_probs_reference(option_logprobs, *, temperature=1.0, clamp=None):
    probs = torch.softmax(option_logprobs.detach() / temperature, dim=-1)
    if clamp is not None:
        probs = probs.clamp(*clamp)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def option_probs_torch(option_logprobs, *, temperature=1.0, clamp=None):
    assert option_logprobs.dim() == 2, "option_logprobs must be [B, K]"
    wide = torch.promote_types(option_logprobs.dtype, torch.float32)  # bfloat16 in: float32 math
    probs = option_probs_reference(option_logprobs.to(wide), temperature=temperature,
                                   clamp=clamp)
    return probs.to(option_logprobs.dtype)


def option_launch_config(K: int) -> dict:
    """Launch resources of the option-probs kernel on the GPU: one row of K options per
    program (the AOT compile test reads this too)."""
    return dict(BLOCK_K=triton.next_power_of_2(K), num_warps=1, num_stages=1)


def option_probs_triton(option_logprobs, *, temperature=1.0, clamp=None):
    assert option_logprobs.dim() == 2, "option_logprobs must be [B, K]"
    x = option_logprobs.detach().to(torch.float32).contiguous()
    B, K = x.shape
    out = torch.empty_like(x)
    lo, hi = clamp if clamp is not None else (0.0, 1.0)
    with launch_device(x):
        _option_probs_fwd_kernel[(B,)](x, out, K, 1.0 / temperature, float(lo), float(hi),
                                       CLAMP=clamp is not None, **option_launch_config(K))
    return out.to(option_logprobs.dtype)


# ------------------------------------------------------------------------------------------
# Pairwise losses
# ------------------------------------------------------------------------------------------
class _PairLoss(torch.autograd.Function):
    """loss given dloss/dm (computed in the forward); m = beta ((c - rc) - (r - rr))."""

    @staticmethod
    def forward(ctx, c, r, rc, rr, dm, beta, loss):
        ctx.save_for_backward(dm)
        ctx.beta = beta
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        (dm,) = ctx.saved_tensors
        d = dm * (grad * ctx.beta)
        needs = ctx.needs_input_grad
        out = [d if needs[0] else None, -d if needs[1] else None,
               -d if needs[2] else None, d if needs[3] else None]
        return (*out, None, None, None)


def _pair_torch(c, r, rc, rr, p, p_const, beta):
    m = c - r
    if rc is not None:
        m = m - (rc - rr)
    m = m * beta
    p = torch.full_like(m, p_const) if p is None else p
    loss = (F.softplus(-m) + (1.0 - p) * m).mean()
    correct = torch.where(p >= 0.5, m > 0, m < 0)
    return m, (torch.sigmoid(m) - p) / m.shape[0], loss, correct.float().mean()


def pair_launch_config() -> dict:
    """Launch resources of the pair-loss kernel on the GPU (the AOT compile test reads
    this too): BLOCK pairs per program, 4 per thread (8 with 4 warps spilled on sm_90)."""
    return dict(BLOCK=_BLOCK, num_warps=8, num_stages=1)


def _pair_triton(c, r, rc, rr, p, p_const, beta):
    B = c.shape[0]
    grid = (triton.cdiv(B, _BLOCK),)
    m, dm = torch.empty_like(c), torch.empty_like(c)
    parts = torch.zeros(grid[0], 2, device=c.device, dtype=torch.float32)
    with launch_device(c, r, rc, rr, p):
        _pair_loss_fwd_kernel[grid](
            c, r, c if rc is None else rc, r if rr is None else rr, c if p is None else p,
            m, dm, parts, B, float(beta), float(p_const),
            HAS_REF=rc is not None, HAS_P=p is not None, **pair_launch_config())
    sums = parts.sum(0) / max(B, 1)
    return m, dm, sums[0], sums[1]


def _pair_loss(impl, c, r, rc, rr, p, p_const, beta):
    tensors = [t for t in (c, r, rc, rr, p) if t is not None]
    for t in tensors:
        assert t.dim() == 1 and t.shape == c.shape, "pair inputs must all be [B]"
    flat = [None if t is None else t.detach().to(torch.float32).contiguous()
            for t in (c, r, rc, rr, p)]
    run = _pair_triton if impl == "triton" else _pair_torch
    m, dm, loss, acc = run(*flat, p_const, beta)
    loss = _PairLoss.apply(c, r, rc, rr, dm.to(c.dtype), float(beta), loss.to(c.dtype))
    return loss, m, acc


def _bt_impl(impl):
    def run(r_chosen, r_rejected, p_chosen=None):
        loss, m, acc = _pair_loss(impl, r_chosen, r_rejected, None, None, p_chosen, 1.0, 1.0)
        return PairLossOutput(loss, m, acc)
    run.__name__ = f"bt_loss_{impl}"
    return run


def _dpo_impl(impl):
    def run(pol_chosen, pol_rejected, ref_chosen, ref_rejected, *, beta=0.1, p_chosen=None,
            label_smoothing=0.0):
        loss, m, acc = _pair_loss(impl, pol_chosen, pol_rejected, ref_chosen, ref_rejected,
                                  p_chosen, 1.0 - label_smoothing, beta)
        chosen = beta * (pol_chosen - ref_chosen).detach()
        rejected = beta * (pol_rejected - ref_rejected).detach()
        return PairLossOutput(loss, m, acc, chosen, rejected)
    run.__name__ = f"dpo_loss_{impl}"
    return run


def _pair_reference(m, p):
    loss = -(p * F.logsigmoid(m) + (1 - p) * F.logsigmoid(-m)).mean()
    acc = torch.where(p >= 0.5, m > 0, m < 0).to(m.dtype).mean()
    return loss, m.detach(), acc


def bt_loss_reference(r_chosen, r_rejected, p_chosen=None):
    p = torch.ones_like(r_chosen) if p_chosen is None else p_chosen
    return PairLossOutput(*_pair_reference(r_chosen - r_rejected, p))


def dpo_loss_reference(pol_chosen, pol_rejected, ref_chosen, ref_rejected, *, beta=0.1,
                       p_chosen=None, label_smoothing=0.0):
    chosen = beta * (pol_chosen - ref_chosen)
    rejected = beta * (pol_rejected - ref_rejected)
    p = torch.full_like(chosen, 1.0 - label_smoothing) if p_chosen is None else p_chosen
    return PairLossOutput(*_pair_reference(chosen - rejected, p), chosen.detach(),
                          rejected.detach())


bt_loss_torch, bt_loss_triton = _bt_impl("torch"), _bt_impl("triton")
dpo_loss_torch, dpo_loss_triton = _dpo_impl("torch"), _dpo_impl("triton")
_OPTION = {"torch": option_probs_torch, "triton": option_probs_triton,
           "reference": option_probs_reference}
_BT = {"torch": bt_loss_torch, "triton": bt_loss_triton, "reference": bt_loss_reference}
_DPO = {"torch": dpo_loss_torch, "triton": dpo_loss_triton, "reference": dpo_loss_reference}


def option_probs(option_logprobs, *, temperature=1.0, clamp=None):
    """Soft labels [B, K] from summed option log-probs [B, K]: softmax(x / T), optionally
    clamped to `clamp=(lo, hi)` and renormalised. Detached. Computed in float32 (float64
    for float64 input on the torch path), returned in the input's dtype."""
    impl = backend("option_probs", option_logprobs.device)
    return _OPTION[impl](option_logprobs, temperature=temperature, clamp=clamp)


def bt_loss(r_chosen, r_rejected, p_chosen=None) -> PairLossOutput:
    """Bradley-Terry loss with soft labels over [B] reward pairs (p_chosen None: hard).
    Margins, loss and accuracy in float32; loss returned in the rewards' dtype."""
    return _BT[backend("bt_loss", r_chosen.device)](r_chosen, r_rejected, p_chosen)


def dpo_loss(pol_chosen, pol_rejected, ref_chosen, ref_rejected, *, beta=0.1, p_chosen=None,
             label_smoothing=0.0) -> PairLossOutput:
    """Sigmoid DPO loss with soft labels over [B] pairs of sequence log-probs. Margins,
    loss and accuracy in float32; loss returned in the log-probs' dtype."""
    return _DPO[backend("dpo_loss", pol_chosen.device)](
        pol_chosen, pol_rejected, ref_chosen, ref_rejected, beta=beta, p_chosen=p_chosen,
        label_smoothing=label_smoothing)
