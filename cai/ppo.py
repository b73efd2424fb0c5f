"""PPO against the preference model, in one process on one set of base weights (Bai et al.
2022, §4; the RL recipe of Stiennon et al. 2020 / Ouyang et al. 2022).

Roles are adapters on the shared base, switched by context, never copied:
  policy    = base + "policy" adapter (initialised from the SFT adapter) + value head
  reference = base + "sft" adapter (the KL anchor)
  reward    = base + "reward" adapter + reward head (the preference model)

One iteration: draw prompts, red-team and helpfulness ones mixed (``helpful_fraction``; the
paper's RL prompts are about half helpfulness prompts, so the policy is not pushed only
toward refusing); sample responses with the policy (continuous batching) at ``temperature``;
end each response at its first EOS or stop string; score them with the reward model (a
response cut by the length limit gets ``missing_eos_penalty`` on top); compute reference
and old-policy log-probs and values in packed forwards (no padding); per-token rewards
r_t = -beta * KL_t, plus the score on the last kept token; GAE advantages (whitened) and
returns; then ``ppo_epochs`` passes over packed minibatches with the clipped policy loss and
clipped value loss of ``kernels``. Tokens after the end of a response are masked out: they
get no reward, KL, value or gradient.

Every log-prob (policy, old policy, reference) is taken at the sampling temperature, as TRL
does: the ratio and the KL are then those of the distribution that drew the tokens.

Deliberate differences from TRL-style PPO: no second copy of any weights (TRL holds policy,
reference, value and reward models); the value head shares the policy's trunk and adapter
(a separate value model would be a fourth forward per step); old log-probs are recomputed
in one packed forward rather than taken from the sampler, so the importance ratio starts at
exactly 1 whatever the sampler's numerics (their largest gap to the sampler's log-probs is
reported each iteration as ``sampler_lp_gap``; when the engine samples from fp16/int8 rollout
weights, the policy loss is also weighted per token by the truncated importance weight
min(pi_old / pi_sampler, ``tis_cap``), and ``tis_truncated`` is the share of tokens the cap
bounded); responses end at stop strings as well as at
EOS (TRL ends them at one stop token).

Data parallel (under ``torchrun``): each rank rolls out, scores and takes reference and
old-policy log-probs for its share of the iteration's prompts (every ``world``-th; every
draw keyed by the prompt's position in the iteration, so the samples do not depend on the
world size). Advantages are whitened with the mean and variance of every rank's tokens
(all-reduced sums), the KL controller moves on the KL over every rank's sequences, and each
minibatch of the update is the same global set of sequences as on one process, each rank
running the ones it holds with its loss weighted by its share of the minibatch's tokens;
``engine.train.Trainer`` sums the gradients. Rank 0 writes metrics and checkpoints.
"""
from __future__ import annotations

import json
import math
import random
import resource
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch

import kernels
from cai import prompting
from cai.outputs import atomic_folder, remove_partial
from cai.prompts import PromptRecord, select_prompts
from cai.training import distributed_device, reduce_sums, truncate_metrics
from engine import Engine, SamplingParams, distributed, profiling
from engine import lora
from engine.batch import PackedBatch, pack
from engine.errors import InputError
from engine.generate import eos_ids, stop_window
from engine.scoring import ScalarHead, hidden_states, token_logprobs
from engine.train import OptimConfig, Trainer, latest_checkpoint, load_checkpoint, save_checkpoint


@dataclass
class PPOConfig:
    """PPO settings. Defaults follow the common RLHF recipe at small scale."""

    iterations: int = 2
    """Rollout + update iterations."""
    prompts_per_iteration: int = 8
    """Prompts sampled per iteration (one response each)."""
    helpful_fraction: float = 0.5
    """Share of each iteration's prompts drawn from the helpfulness (benign) prompts, the rest
    red-team; the paper's RL prompts are about half helpfulness prompts. 0 trains on red-team
    prompts alone, which pushes the policy toward refusing everything."""
    max_new_tokens: int = 64
    """Response length limit of each rollout."""
    missing_eos_penalty: float = -1.0
    """Added to the preference score of a response cut by max_new_tokens (or the context)
    before it reached EOS or a stop string, so the policy learns to finish its answers
    (TRL's missing_eos_penalty, as a signed reward); 0 turns it off. Must be <= 0."""
    temperature: float = 1.0
    """Rollout sampling temperature (1 samples the policy itself, as PPO assumes); every
    log-prob of the update is taken at this temperature too. Must be > 0."""
    ppo_epochs: int = 2
    """Passes over each iteration's rollouts."""
    minibatch_size: int = 4
    """Sequences per optimizer step."""
    clip_eps: float = 0.2
    """PPO ratio clip epsilon."""
    value_clip_eps: float = 0.2
    """Clip range of the value prediction around its old value."""
    vf_coef: float = 0.1
    """Weight of the value loss (small: the value head shares the policy's adapter)."""
    entropy_coef: float = 0.0
    """Entropy bonus weight (0: none, as in most RLHF recipes)."""
    kl_coef: float = 0.05
    """beta of the per-token KL penalty to the reference (base + SFT adapter)."""
    kl_estimator: str = "k1"
    """KL estimator in the reward: k1 (log ratio, unbiased), k2 or k3 (always >= 0)."""
    adaptive_kl: bool = False
    """Adapt beta toward target_kl (Ziegler et al. 2019's proportional controller)."""
    target_kl: float = 6.0
    """Target KL per sequence (nats) for the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon of the adaptive controller, in sequences."""
    gamma: float = 1.0
    """Discount (1: the reward arrives once, at the end)."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Normalise advantages to zero mean and unit variance over the iteration."""
    reward_clip: float = 10.0
    """Clip preference scores to [-c, c] (0: off) so one outlier cannot dominate."""
    seed: int = 0
    """Seeds the prompt draws, the sampling and the new heads."""
    lr: float = 1e-4
    """Learning rate of the policy adapter and the value head."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    max_slots: int = 32
    """Concurrent sequences in the rollout generator."""
    checkpoint_every: int = 1
    """Iterations between checkpoints."""
    tis_cap: float = 2.0
    """When the engine samples from fp16/int8 rollout weights (``rollout_weights``), each
    token's policy loss is weighted by min(pi_old / pi_sampler, tis_cap), the truncated
    importance weight between the full-precision old policy and the sampler that drew it
    (TIS); with fp32 rollouts the weight is 1 and nothing is applied. Must be >= 1."""

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise InputError(f"ppo temperature must be a finite number > 0 (the update's log-probs "
                             f"are taken at it), got {self.temperature}")
        if not 0.0 <= self.helpful_fraction <= 1.0:
            raise InputError(f"ppo helpful_fraction must be in [0, 1], got {self.helpful_fraction}")
        if not (math.isfinite(self.tis_cap) and self.tis_cap >= 1.0):
            raise InputError(f"ppo tis_cap must be a finite number >= 1, got {self.tis_cap}")
        if not (math.isfinite(self.missing_eos_penalty) and self.missing_eos_penalty <= 0):
            raise InputError(f"ppo missing_eos_penalty must be a finite number <= 0 (a penalty; 0 is off), "
                             f"got {self.missing_eos_penalty}")


class Samples(NamedTuple):
    """One iteration's sampled responses, B of them.

    prompt_ids  [B] token lists of the rendered prompts
    responses   [B] token lists as sampled (up to EOS, a stop string or the length limit)
    logprobs    [B] the sampler's log-probs of those tokens (at the sampling temperature)
    """

    prompt_ids: list[list[int]]
    responses: list[list[int]]
    logprobs: list[list[float]]


class Rollout(NamedTuple):
    """One iteration's experience; B sequences, T tokens packed, N = kept response tokens.

    batch       PackedBatch over prompt + response; the kept response tokens are its targets
    seqs        [B] token lists, prompt + response as sampled
    masks       [B] bool lists over seqs: True on the kept response tokens (up to and
                including the EOS or the stop string's last token), False elsewhere
    old_lp      [N] log-probs of the kept tokens under the policy that sampled them
    sampler_lp  [N] the same as the sampler reported them
    ref_lp      [N] the same under the reference
    values      [N] value estimates at the states that predict each kept token
    advantages  [N] GAE advantages (whitened if configured)
    returns     [N] value targets (advantages + values, before whitening)
    seq_of      [N] int64 the sequence each kept token belongs to
    scores      [B] preference-model scores of the responses (clipped)
    truncated   [B] bool: the response hit the length limit before EOS or a stop string
    penalty     [B] the missing-EOS penalty added to each score (0 where it ended)
    ids         [B] each sequence's position among the iteration's prompts (over all ranks)
    is_weights  [N] truncated importance weights old / sampler (``tis_cap``) when the sampler
                read other weights than the learner (fp16/int8 rollouts), else None
    """

    batch: PackedBatch
    seqs: list[list[int]]
    masks: list[list[bool]]
    old_lp: torch.Tensor
    sampler_lp: torch.Tensor
    ref_lp: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    seq_of: torch.Tensor
    scores: torch.Tensor
    truncated: torch.Tensor
    penalty: torch.Tensor
    ids: list[int]
    is_weights: torch.Tensor | None = None


def response_end(tokens: list[int], eos: set[int], stops: list[str],
                 decode: Callable[[list[int]], str]) -> tuple[int, bool]:
    """(tokens kept, whether the response ended): a response ends at its first EOS token or
    at the token that completes its first stop string, which is kept (the policy learns to
    end its turn there); one with neither was cut by the length limit and keeps every token.
    The stop check reads the same window of recent tokens as the generator's."""
    window = stop_window(stops)
    for i, t in enumerate(tokens):
        if t in eos or (stops and any(s in decode(tokens[max(0, i + 1 - window) : i + 1]) for s in stops)):
            return i + 1, True
    return len(tokens), False


def gae(rewards: torch.Tensor, values: torch.Tensor, seq_of: torch.Tensor, num_seqs: int,
        gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) per sequence.

    rewards, values, seq_of [N] (each sequence's tokens contiguous, in order) -> advantages,
    returns [N]. The value after a sequence's last token is 0 (the episode ends there).
    """
    # The recursion runs backwards token by token: on host floats (one copy each way)
    # rather than as one tiny device op per token, which on a GPU is a launch per token.
    counts = torch.bincount(seq_of, minlength=num_seqs).tolist()
    r, v = rewards.tolist(), values.tolist()
    adv, start = [0.0] * len(r), 0
    for n in counts:
        running = 0.0
        for t in range(start + n - 1, start - 1, -1):
            nxt = v[t + 1] if t + 1 < start + n else 0.0
            running = r[t] + gamma * nxt - v[t] + gamma * lam * running
            adv[t] = running
        start += n
    adv_t = torch.tensor(adv, dtype=rewards.dtype, device=rewards.device)
    return adv_t, adv_t + values


def whiten(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit (population) variance; distributed, over every rank's ``x`` together."""
    if not distributed.active():
        return (x - x.mean()) / (x.std(unbiased=False) + eps) if x.numel() > 1 else x - x.mean()
    dev = distributed_device()
    n, total = distributed.all_reduce_sum(torch.tensor([float(x.numel()), float(x.sum())],
                                                       dtype=torch.float64, device=dev)).tolist()
    mean = total / max(n, 1.0)
    sq = distributed.all_reduce_sum(((x.double() - mean) ** 2).sum().reshape(1).to(dev)).item()
    if n <= 1:
        return x - mean
    return (x - mean) / ((sq / n) ** 0.5 + eps)


class KLController:
    """Fixed beta, or the adaptive proportional controller of Ziegler et al. (2019)."""

    def __init__(self, cfg: PPOConfig, value: float | None = None):
        self.cfg, self.value = cfg, cfg.kl_coef if value is None else value

    def update(self, kl_per_seq: float, n_seqs: int) -> None:
        if self.cfg.adaptive_kl:
            error = max(-0.2, min(0.2, kl_per_seq / self.cfg.target_kl - 1))
            self.value *= 1 + error * n_seqs / self.cfg.kl_horizon


_STEP_SUMS = ("loss", "policy_loss", "value_loss", "clip_frac", "approx_kl", "value_clip_frac", "entropy")
"""Step metrics that are token means, summed over ranks from each rank's weighted part."""


class PPOTrainer:
    """Runs PPO iterations on one engine: rollout, score, update."""

    def __init__(self, engine: Engine, reward_model, cfg: PPOConfig, sft_adapter: str | None = "sft"):
        self.eng, self.rm, self.cfg = engine, reward_model, cfg
        self.model = engine.model
        self.ref_adapter = sft_adapter
        self.style = "chat" if getattr(engine.tokenizer, "chat_template", None) else "base"
        self.stops = prompting.stop_strings(self.style)
        self.eos = eos_ids(self.model, engine.tokenizer)  # the generator's EOS set
        if "policy" not in lora.adapters(self.model):
            if sft_adapter is not None:
                # copy_adapter draws an init that the copy then overwrites: keep that draw
                # off the caller's global RNG
                with torch.random.fork_rng(devices=[]):
                    lora.copy_adapter(self.model, sft_adapter, "policy")
            else:
                lora.add_adapter(self.model, "policy", seed=cfg.seed)
        self.value_head = self._new_value_head()
        self.policy = lora.get_adapter(self.model, "policy")
        self.params = {**{f"policy.{k}": p for k, p in self.policy.named_parameters()},
                       **{f"value_head.{k}": p for k, p in self.value_head.named_parameters()}}
        optim = OptimConfig(lr=cfg.lr, max_grad_norm=cfg.max_grad_norm, warmup_steps=0, schedule="constant")
        for p in self.params.values():
            p.requires_grad_(True)
        self.trainer = Trainer(self.params.values(), optim)
        self.kl = KLController(cfg)
        self.iteration = 0
        self._builtin_helpful: list[PromptRecord] | None = None

    def _new_value_head(self) -> ScalarHead:
        """ScalarHead's init (normal, std 1/sqrt(H+1); zero bias) drawn from a local generator
        on the model's device, so that building a trainer leaves the global RNG untouched."""
        h, w = self.model.cfg.hidden_size, self.model.lm_head_weight
        with torch.device("meta"):  # no init draws from the global RNG
            head = ScalarHead(h)
        head = head.to_empty(device=w.device)  # float32, as ScalarHead keeps its weights
        g = torch.Generator(device=w.device).manual_seed(self.cfg.seed)
        with torch.no_grad():
            head.proj.weight.normal_(0.0, 1.0 / (h + 1) ** 0.5, generator=g)
            head.proj.bias.zero_()
        return head

    # ---- prompts ------------------------------------------------------------------------
    def helpful_before(self, iteration: int) -> int:
        """Helpfulness prompts drawn by the first ``iteration`` iterations: the nearest whole
        number to helpful_fraction of all their prompts, so every prefix of a run keeps the
        proportion to within one prompt."""
        return math.floor(self.cfg.helpful_fraction * self.cfg.prompts_per_iteration * iteration + 0.5)

    def prompts_for(self, redteam: list[PromptRecord], helpful: list[PromptRecord] | None,
                    iteration: int) -> tuple[list[PromptRecord], int]:
        """Iteration ``iteration``'s prompts, red-team ones first, and how many helpfulness ones
        follow them. Each kind is a seeded pass over its own set, reshuffled when it wraps
        around; ``helpful`` None takes the train split of the built-in benign set."""
        k, done = self.cfg.prompts_per_iteration, self.helpful_before(iteration)
        n_help = self.helpful_before(iteration + 1) - done
        if n_help and helpful is None:
            if self._builtin_helpful is None:
                self._builtin_helpful = select_prompts("benign", "train")
            helpful = self._builtin_helpful
        red = _cycle(redteam, iteration * k - done, k - n_help, f"{self.cfg.seed}", "red-team")
        return red + _cycle(helpful or [], done, n_help, f"{self.cfg.seed}:helpful", "helpfulness"), n_help

    # ---- rollout ------------------------------------------------------------------------
    def rollout(self, prompts: list[PromptRecord], iteration: int, keys: list[int] | None = None) -> Samples:
        """``keys``: each prompt's position among the iteration's prompts (default: its own
        position), which keys its draws."""
        convs = [prompting.as_conversation(p.messages or p.prompt) for p in prompts]
        tok = self.eng.tokenizer
        ids = [tok(prompting.render(prompting.initial_prompt(c, self.style), tok), add_special_tokens=False)["input_ids"]
               for c in convs]
        params = SamplingParams(max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                                stop=list(self.stops), seed=zlib.crc32(f"{self.cfg.seed}:rollout:{iteration}".encode()))
        with lora.use_adapter(self.model, "policy"), torch.inference_mode(), profiling.phase("cai.ppo.rollout"):
            # sample_keys only when sharded: stand-in engines (bench's transformers driver) lack it
            keyed = {"sample_keys": keys} if keys is not None else {}
            outs = self.eng.generate(ids, params, max_slots=self.cfg.max_slots, **keyed)
        return Samples(ids, [o.samples[0].token_ids for o in outs], [o.samples[0].logprobs for o in outs])

    def _response_text(self, tokens: list[int]) -> str:
        """What the preference model reads: the kept tokens, cut before a stop string."""
        text = self.eng.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = [text.find(s) for s in self.stops if s in text]
        return prompting.clean_response(text[: min(cut)] if cut else text)[0]

    @torch.inference_mode()
    def experience(self, prompts: list[PromptRecord], samples: Samples, ids: list[int] | None = None) -> Rollout:
        """Ends, scores, reference and old log-probs, values, rewards and advantages (whitened
        over every rank's tokens). ``ids``: the prompts' positions in the iteration."""
        ends = [response_end(r, self.eos, self.stops, self.eng.tokenizer.decode) for r in samples.responses]
        kept = [n for n, _ in ends]
        seqs = [p + r for p, r in zip(samples.prompt_ids, samples.responses)]
        masks = [[False] * len(p) + [True] * n + [False] * (len(r) - n)
                 for p, r, n in zip(samples.prompt_ids, samples.responses, kept)]
        batch = pack(seqs, masks, device=self.model.device)
        convs = [prompting.as_conversation(p.messages or p.prompt) for p in prompts]
        with profiling.phase("cai.ppo.score"):
            texts = [self._response_text(r[:n]) for r, n in zip(samples.responses, kept)]
            scores = self.rm.score(convs, texts).float()
        if self.cfg.reward_clip:
            scores = scores.clamp(-self.cfg.reward_clip, self.cfg.reward_clip)
        truncated = torch.tensor([not ended for _, ended in ends], device="cpu")  # host flags for metrics
        # added after the clip: a cut response scores below a finished one of the same score
        penalty = scores.new_tensor([self.cfg.missing_eos_penalty if t else 0.0 for t in truncated.tolist()])
        temp = self.cfg.temperature
        with lora.use_adapter(self.model, self.ref_adapter), profiling.phase("cai.ppo.reference"):
            ref_lp = token_logprobs(self.model, batch, temp)[batch.target_rows]
        with lora.use_adapter(self.model, "policy"):
            hidden = hidden_states(self.model, batch)
            old_lp = token_logprobs(self.model, batch, temp, hidden=hidden)[batch.target_rows]
            values = self.value_head(hidden.index_select(0, batch.target_rows))
        sampler_lp = old_lp.new_tensor([x for lp, n in zip(samples.logprobs, kept) for x in lp[:n]])
        iw = None
        # the sampler read other weights (getattr: an engine-like object without the setting samples at fp32)
        if getattr(self.eng, "rollout_weights", "fp32") != "fp32":
            iw = kernels.truncated_is_weights(old_lp, sampler_lp, self.cfg.tis_cap)[0]
        dev = self.model.device
        seq_of = torch.repeat_interleave(torch.arange(len(seqs), device=dev), torch.tensor(kept, device=dev))
        rewards = -self.kl.value * kernels.kl_penalty(old_lp, ref_lp, kind=self.cfg.kl_estimator)
        last = torch.tensor(kept, device=dev).cumsum(0) - 1  # each response's last kept token
        rewards[last] += scores + penalty
        adv, ret = gae(rewards, values, seq_of, len(seqs), self.cfg.gamma, self.cfg.lam)
        if self.cfg.whiten_advantages:
            adv = whiten(adv)
        return Rollout(batch, seqs, masks, old_lp, sampler_lp, ref_lp, values, adv, ret, seq_of, scores,
                       truncated, penalty, list(ids) if ids is not None else list(range(len(seqs))), iw)

    # ---- update -------------------------------------------------------------------------
    def update(self, ro: Rollout, lengths: dict[int, int] | None = None) -> dict:
        """``ppo_epochs`` passes of clipped policy + value loss over packed minibatches.
        ``lengths``: kept tokens of every sequence of the iteration by position, over all
        ranks (default: this rank's, all there is on one process); a minibatch is a set of
        positions, and each rank runs those it holds."""
        if lengths is None:
            lengths = dict(zip(ro.ids, torch.bincount(ro.seq_of, minlength=len(ro.seqs)).tolist()))
        where = {gi: j for j, gi in enumerate(ro.ids)}
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.cfg.seed}:mb:{self.iteration}".encode()))
        sums: dict[str, float] = {}
        steps = 0
        # The adapter stays in eval mode: LoRA dropout would make the first ratio differ
        # from 1 and add noise PPO's clipping then fights (RLHF recipes turn it off too).
        for _ in range(self.cfg.ppo_epochs):
            order = torch.randperm(len(lengths), generator=g, device="cpu").tolist()  # a host-side order
            for k in range(0, len(order), self.cfg.minibatch_size):
                chosen = sorted(order[k : k + self.cfg.minibatch_size])
                mine = [where[i] for i in chosen if i in where]
                tokens = sum(lengths[i] for i in chosen)
                for name, v in self._minibatch_step(ro, mine, tokens).items():
                    sums[name] = sums.get(name, 0.0) + v
                steps += 1
        return {k: v / max(steps, 1) for k, v in sums.items()}

    def _minibatch_step(self, ro: Rollout, chosen: list[int], tokens: int | None = None) -> dict:
        """One optimizer step on this rank's sequences ``chosen`` (indices into ``ro``) of a
        minibatch of ``tokens`` kept tokens over all ranks (default: these alone): the token
        means are weighted by this rank's share, so the summed gradient and metrics are the
        whole minibatch's."""
        if not chosen:  # a rank holding none of the minibatch still joins the all-reduces
            stats = self.trainer.apply()
            return {**reduce_sums(dict.fromkeys(_STEP_SUMS, 0.0)), "grad_norm": stats["grad_norm"]}
        sel = torch.isin(ro.seq_of, torch.tensor(chosen, device=self.model.device))
        batch = pack([ro.seqs[i] for i in chosen], [ro.masks[i] for i in chosen], device=self.model.device)
        with lora.use_adapter(self.model, "policy"), profiling.phase("cai.ppo.train"):
            hidden = hidden_states(self.model, batch)
            lp, ent = token_logprobs(self.model, batch, self.cfg.temperature, return_entropy=True, hidden=hidden)
            values = self.value_head(hidden.index_select(0, batch.target_rows))
        rows = batch.target_rows
        lp, ent = lp[rows], ent[rows]
        ones = torch.ones_like(lp)
        iw = None if ro.is_weights is None else ro.is_weights[sel]
        pol = kernels.ppo_policy_loss(lp, ro.old_lp[sel], ro.advantages[sel], ones, clip_eps=self.cfg.clip_eps,
                                      is_weight=iw)
        val = kernels.ppo_value_loss(values, ro.values[sel], ro.returns[sel], ones, clip_eps=self.cfg.value_clip_eps)
        share = len(lp) / tokens if tokens else 1.0  # this rank's part of the minibatch's token mean
        loss = pol.loss + self.cfg.vf_coef * val.loss - self.cfg.entropy_coef * ent.mean()
        value = self.trainer.backward(loss * share)
        stats = self.trainer.apply()
        parts = (value, pol.loss.item() * share, val.loss.item() * share, float(pol.clip_frac) * share,
                 float(pol.approx_kl) * share, float(val.clip_frac) * share, ent.detach().mean().item() * share)
        return {**reduce_sums(dict(zip(_STEP_SUMS, parts))), "grad_norm": stats["grad_norm"]}

    # ---- iterations, checkpoints ----------------------------------------------------------
    def iterate(self, prompts: list[PromptRecord], helpful: list[PromptRecord] | None = None) -> dict:
        """One rollout + update iteration on red-team ``prompts`` mixed with ``helpful`` ones
        (None: the built-in benign train split); returns its metrics."""
        t0 = time.perf_counter()
        chosen, n_help = self.prompts_for(prompts, helpful, self.iteration)
        mine = distributed.shard(list(range(len(chosen))))  # this rank's positions among them
        local = [chosen[i] for i in mine]
        samples = self.rollout(local, self.iteration, keys=mine if distributed.active() else None)
        t1 = time.perf_counter()
        ro = self.experience(local, samples, mine)
        seqs = _gather_sequences(ro)
        t2 = time.perf_counter()
        train = self.update(ro, {i: s["kept"] for i, s in seqs.items()})
        t3 = time.perf_counter()
        n = len(seqs)
        kl = sum(s["kl"] for s in seqs.values()) / n  # the global KL per sequence
        beta = self.kl.value
        self.kl.update(kl, n)
        self.iteration += 1
        n_tokens = sum(s["tokens"] for s in seqs.values())
        scores = torch.tensor([seqs[i]["score"] for i in range(n)], device="cpu")  # host floats for the metrics
        by_kind = {"reward_redteam": scores[: n - n_help], "reward_helpful": scores[n - n_help :]}
        kept = sum(s["kept"] for s in seqs.values())
        return {"iteration": self.iteration, "reward_mean": float(scores.mean()),
                "reward_std": float(scores.std(unbiased=False)),
                **{k: float(v.mean()) if v.numel() else None for k, v in by_kind.items()},
                "helpful_prompts": n_help, "kl": kl, "kl_coef": beta,
                "response_len": kept / n, "truncated": sum(s["truncated"] for s in seqs.values()),
                "eos_penalty": sum(s["penalty"] for s in seqs.values()),
                "sampler_lp_gap": max((s["gap"] for s in seqs.values()), default=0.0),
                # share of this rank's kept tokens whose weight the cap bounded
                "tis_truncated": (None if ro.is_weights is None
                                  else float((ro.is_weights == self.cfg.tis_cap).float().mean())),
                **train,
                "generate_s": t1 - t0, "score_s": t2 - t1, "train_s": t3 - t2, "iteration_s": t3 - t0,
                "tokens_per_s": n_tokens * (1 + self.cfg.ppo_epochs) / (t3 - t0),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    def state(self) -> dict:
        return {"params": self.params, "optimizer": self.trainer.optimizer,
                "meta": {"iteration": self.iteration, "kl_coef": self.kl.value, "config": asdict(self.cfg)}}

    def resume(self, ckpt_dir: Path) -> bool:
        ckpt = latest_checkpoint(ckpt_dir)
        if ckpt is None:
            return False
        state = load_checkpoint(ckpt, self.params, self.trainer.optimizer)
        self.iteration = state["meta"]["iteration"]
        self.kl = KLController(self.cfg, state["meta"]["kl_coef"])
        self.trainer.step = state["step"]
        return True

    def export(self, out: Path) -> None:
        from safetensors.torch import save_file

        with atomic_folder(out / "policy") as tmp:  # each folder written whole, then renamed in
            lora.save_adapter(self.model, "policy", tmp)
            save_file({k: v.detach().contiguous() for k, v in self.value_head.state_dict().items()},
                      str(tmp / "value_head.safetensors"))
        with atomic_folder(out / "peft") as tmp:
            lora.export_peft(self.model, "policy", tmp, base_model_name_or_path=str(self.eng.source))


def train_ppo(engine: Engine, reward_model, prompts: list[PromptRecord], cfg: PPOConfig,
              sft_adapter: str | None = "sft", out: str | Path | None = None, progress: bool = False,
              helpful_prompts: list[PromptRecord] | None = None) -> list[dict]:
    """Run ``cfg.iterations`` PPO iterations on red-team ``prompts`` mixed with
    ``helpful_prompts`` (None: the train split of the built-in benign set) in the proportion
    ``cfg.helpful_fraction``; with ``out``: metrics.jsonl, checkpoints (resumed from), and the
    exported policy adapter. Returns the metrics of the iterations run now."""
    ppo = PPOTrainer(engine, reward_model, cfg, sft_adapter)
    out = Path(out) if out is not None else None
    metrics_path = out / "metrics.jsonl" if out is not None else None
    main = distributed.is_main()
    if out is not None:
        if main:
            out.mkdir(parents=True, exist_ok=True)
            remove_partial(out)  # what a run killed mid-write left behind
        distributed.barrier()
        if ppo.resume(out / "checkpoints"):  # every rank loads rank 0's checkpoint
            if main:
                _truncate(metrics_path, ppo.iteration)
        elif main and metrics_path.exists():
            metrics_path.unlink()
    bar = None
    if progress and main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.iterations, initial=ppo.iteration, desc="ppo", unit="iter")
    log = []
    try:
        while ppo.iteration < cfg.iterations:
            rec = ppo.iterate(prompts, helpful_prompts)
            log.append(rec)
            if metrics_path is not None and main:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                if ppo.iteration % cfg.checkpoint_every == 0 or ppo.iteration == cfg.iterations:
                    save_checkpoint(out / "checkpoints", ppo.iteration, ppo.state())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{rec['reward_mean']:.3f}", kl=f"{rec['kl']:.3f}")
    finally:
        if bar is not None:
            bar.close()
        for p in ppo.params.values():
            p.requires_grad_(False)
    if out is not None and main:
        ppo.export(out)
    distributed.barrier()  # the checkpoints and exports are whole before any rank goes on
    return log


def _gather_sequences(ro: Rollout) -> dict[int, dict]:
    """What the iteration's metrics, KL and minibatches need of every sequence, from every
    rank, by position: kept tokens, KL (sum over its tokens, old policy vs reference), score,
    penalty, truncation, total tokens, and the largest sampler log-prob gap."""
    diff = ro.old_lp - ro.ref_lp
    kl = diff.new_zeros(len(ro.seqs)).index_add(0, ro.seq_of.to(diff.device), diff).tolist()
    gap = (ro.old_lp - ro.sampler_lp).abs()
    kept = torch.bincount(ro.seq_of, minlength=len(ro.seqs)).tolist()
    gaps = gap.new_zeros(len(ro.seqs)).scatter_reduce_(0, ro.seq_of.to(gap.device), gap, "amax").tolist()
    mine = {gi: {"kept": kept[j], "kl": kl[j], "score": float(ro.scores[j]), "penalty": float(ro.penalty[j]),
                 "truncated": int(ro.truncated[j]), "tokens": len(ro.seqs[j]), "gap": gaps[j]}
            for j, gi in enumerate(ro.ids)}
    return {gi: rec for part in distributed.all_gather_objects(mine) for gi, rec in part.items()}


def _truncate(path: Path, iteration: int) -> None:
    """Drop metric lines past the checkpoint so a resumed run never repeats an iteration."""
    truncate_metrics(path, iteration, key="iteration")


def _cycle(pool: list[PromptRecord], start: int, count: int, seed: str, kind: str) -> list[PromptRecord]:
    """Items ``start .. start+count`` of endless seeded passes over ``pool``, each pass a new
    shuffle (a pure function of the seed, so a resumed run draws the same prompts)."""
    if count and not pool:
        raise InputError(f"ppo: no {kind} prompts to draw from (set helpful_fraction to "
                         f"{'0' if kind == 'helpfulness' else '1'} or give some)")
    out, n = [], len(pool)
    for j in range(start, start + count):
        order = list(range(n))
        random.Random(f"{seed}:{j // n}").shuffle(order)
        out.append(pool[order[j % n]])
    return out
