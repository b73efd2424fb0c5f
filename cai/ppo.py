"""PPO against the preference model, in one process on one set of base weights (Bai et al.
2022, §4; the RL recipe of Stiennon et al. 2020 / Ouyang et al. 2022).

Roles are adapters on the shared base, switched by context, never copied:
  policy    = base + "policy" adapter (initialised from the SFT adapter) + value head
  reference = base + "sft" adapter (the KL anchor)
  reward    = base + "reward" adapter + reward head (the preference model)

One iteration: sample responses with the policy (continuous batching); score them with the
reward model; compute reference and old-policy log-probs and values in packed forwards
(no padding); per-token rewards r_t = -beta * KL_t, plus the preference score on the last
token; GAE advantages (whitened) and returns; then ``ppo_epochs`` passes over packed
minibatches with the clipped policy loss and clipped value loss of ``kernels``.

Deliberate differences from TRL-style PPO: no second copy of any weights (TRL holds policy,
reference, value and reward models); the value head shares the policy's trunk and adapter
(a separate value model would be a fourth forward per step); old log-probs are recomputed
in one packed forward rather than taken from the sampler, so the importance ratio starts at
exactly 1 whatever the sampler's numerics.
"""
from __future__ import annotations

import json
import random
import resource
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch

import kernels
from cai import prompting
from cai.outputs import atomic_folder, remove_partial
from cai.prompts import PromptRecord
from cai.training import truncate_metrics
from engine import Engine, SamplingParams, profiling
from engine import lora
from engine.batch import PackedBatch, pack
from engine.scoring import ScalarHead, hidden_states, segment_sum, token_logprobs
from engine.train import OptimConfig, Trainer, latest_checkpoint, load_checkpoint, save_checkpoint


@dataclass
class PPOConfig:
    """PPO settings. Defaults follow the common RLHF recipe at small scale."""

    iterations: int = 2
    """Rollout + update iterations."""
    prompts_per_iteration: int = 8
    """Prompts sampled per iteration (one response each)."""
    max_new_tokens: int = 64
    """Response length limit of each rollout."""
    temperature: float = 1.0
    """Rollout sampling temperature (1 samples the policy itself, as PPO assumes)."""
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
    """Seeds the prompt order, the sampling and the new heads."""
    lr: float = 1e-4
    """Learning rate of the policy adapter and the value head."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    max_slots: int = 32
    """Concurrent sequences in the rollout generator."""
    checkpoint_every: int = 1
    """Iterations between checkpoints."""


class Rollout(NamedTuple):
    """One iteration's experience; B sequences, T tokens packed, N = response tokens.

    batch       PackedBatch over prompt + response; the response tokens are its targets
    old_lp      [N] log-probs of the response tokens under the policy that sampled them
    ref_lp      [N] the same under the reference
    values      [N] value estimates at the states that predict each response token
    advantages  [N] GAE advantages (whitened if configured)
    returns     [N] value targets (advantages + values, before whitening)
    seq_of      [N] int64 the sequence each response token belongs to
    scores      [B] preference-model scores of the responses
    """

    batch: PackedBatch
    old_lp: torch.Tensor
    ref_lp: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    seq_of: torch.Tensor
    scores: torch.Tensor


def gae(rewards: torch.Tensor, values: torch.Tensor, seq_of: torch.Tensor, num_seqs: int,
        gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) per sequence.

    rewards, values, seq_of [N] (each sequence's tokens contiguous, in order) -> advantages,
    returns [N]. The value after a sequence's last token is 0 (the episode ends there).
    """
    adv = torch.zeros_like(rewards)
    counts = torch.bincount(seq_of, minlength=num_seqs).tolist()
    start = 0
    for n in counts:
        r, v = rewards[start : start + n], values[start : start + n]
        nxt = torch.cat([v[1:], v.new_zeros(1)])
        delta = r + gamma * nxt - v
        running = 0.0
        for t in range(n - 1, -1, -1):
            running = delta[t] + gamma * lam * running
            adv[start + t] = running
        start += n
    return adv, adv + values


def whiten(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return (x - x.mean()) / (x.std(unbiased=False) + eps) if x.numel() > 1 else x - x.mean()


class KLController:
    """Fixed beta, or the adaptive proportional controller of Ziegler et al. (2019)."""

    def __init__(self, cfg: PPOConfig, value: float | None = None):
        self.cfg, self.value = cfg, cfg.kl_coef if value is None else value

    def update(self, kl_per_seq: float, n_seqs: int) -> None:
        if self.cfg.adaptive_kl:
            error = max(-0.2, min(0.2, kl_per_seq / self.cfg.target_kl - 1))
            self.value *= 1 + error * n_seqs / self.cfg.kl_horizon


class PPOTrainer:
    """Runs PPO iterations on one engine: rollout, score, update."""

    def __init__(self, engine: Engine, reward_model, cfg: PPOConfig, sft_adapter: str | None = "sft"):
        self.eng, self.rm, self.cfg = engine, reward_model, cfg
        self.model = engine.model
        self.ref_adapter = sft_adapter
        self.style = "chat" if getattr(engine.tokenizer, "chat_template", None) else "base"
        if "policy" not in lora.adapters(self.model):
            if sft_adapter is not None:
                lora.copy_adapter(self.model, sft_adapter, "policy")
            else:
                lora.add_adapter(self.model, "policy", seed=cfg.seed)
        torch.manual_seed(cfg.seed)
        self.value_head = ScalarHead(self.model.cfg.hidden_size)
        self.policy = lora.get_adapter(self.model, "policy")
        self.params = {**{f"policy.{k}": p for k, p in self.policy.named_parameters()},
                       **{f"value_head.{k}": p for k, p in self.value_head.named_parameters()}}
        optim = OptimConfig(lr=cfg.lr, max_grad_norm=cfg.max_grad_norm, warmup_steps=0, schedule="constant")
        for p in self.params.values():
            p.requires_grad_(True)
        self.trainer = Trainer(self.params.values(), optim)
        self.kl = KLController(cfg)
        self.iteration = 0

    # ---- rollout ------------------------------------------------------------------------
    def prompts_for(self, prompts: list[PromptRecord], iteration: int) -> list[PromptRecord]:
        """A seeded pass over the prompts, reshuffled each time it wraps around."""
        k, n = self.cfg.prompts_per_iteration, len(prompts)
        out = []
        for j in range(iteration * k, (iteration + 1) * k):
            order = list(range(n))
            random.Random(f"{self.cfg.seed}:{j // n}").shuffle(order)
            out.append(prompts[order[j % n]])
        return out

    def rollout(self, prompts: list[PromptRecord], iteration: int) -> tuple[list[list[int]], list[list[int]], list[str]]:
        convs = [prompting.as_conversation(p.messages or p.prompt) for p in prompts]
        tok = self.eng.tokenizer
        ids = [tok(prompting.render(prompting.initial_prompt(c, self.style), tok), add_special_tokens=False)["input_ids"]
               for c in convs]
        params = SamplingParams(max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                                seed=zlib.crc32(f"{self.cfg.seed}:rollout:{iteration}".encode()))
        with lora.use_adapter(self.model, "policy"), torch.inference_mode(), profiling.phase("cai.ppo.rollout"):
            outs = self.eng.generate(ids, params, max_slots=self.cfg.max_slots)
        return ids, [o.samples[0].token_ids for o in outs], [o.text for o in outs]

    @torch.inference_mode()
    def experience(self, prompts, prompt_ids, responses, texts) -> Rollout:
        """Scores, reference and old log-probs, values, rewards and advantages."""
        seqs = [p + r for p, r in zip(prompt_ids, responses)]
        masks = [[False] * len(p) + [True] * len(r) for p, r in zip(prompt_ids, responses)]
        batch = pack(seqs, masks)
        convs = [prompting.as_conversation(p.messages or p.prompt) for p in prompts]
        with profiling.phase("cai.ppo.score"):
            scores = self.rm.score(convs, [prompting.clean_response(t)[0] for t in texts]).float()
        if self.cfg.reward_clip:
            scores = scores.clamp(-self.cfg.reward_clip, self.cfg.reward_clip)
        with lora.use_adapter(self.model, self.ref_adapter), profiling.phase("cai.ppo.reference"):
            ref_lp = token_logprobs(self.model, batch)[batch.target_rows]
        with lora.use_adapter(self.model, "policy"):
            hidden = hidden_states(self.model, batch)
            old_lp = token_logprobs(self.model, batch, hidden=hidden)[batch.target_rows]
            values = self.value_head(hidden.index_select(0, batch.target_rows))
        seq_of = torch.repeat_interleave(torch.arange(len(seqs)), torch.tensor([len(r) for r in responses]))
        rewards = -self.kl.value * kernels.kl_penalty(old_lp, ref_lp, kind=self.cfg.kl_estimator)
        last = torch.tensor([len(r) for r in responses]).cumsum(0) - 1
        rewards[last] += scores
        adv, ret = gae(rewards, values, seq_of, len(seqs), self.cfg.gamma, self.cfg.lam)
        if self.cfg.whiten_advantages:
            adv = whiten(adv)
        return Rollout(batch, old_lp, ref_lp, values, adv, ret, seq_of, scores)

    # ---- update -------------------------------------------------------------------------
    def update(self, ro: Rollout, seqs: list[list[int]], masks: list[list[bool]]) -> dict:
        """``ppo_epochs`` passes of clipped policy + value loss over packed minibatches."""
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.cfg.seed}:mb:{self.iteration}".encode()))
        sums: dict[str, float] = {}
        steps = 0
        # The adapter stays in eval mode: LoRA dropout would make the first ratio differ
        # from 1 and add noise PPO's clipping then fights (RLHF recipes turn it off too).
        for _ in range(self.cfg.ppo_epochs):
            order = torch.randperm(len(seqs), generator=g).tolist()
            for k in range(0, len(order), self.cfg.minibatch_size):
                chosen = sorted(order[k : k + self.cfg.minibatch_size])
                for name, v in self._minibatch_step(ro, seqs, masks, chosen).items():
                    sums[name] = sums.get(name, 0.0) + v
                steps += 1
        return {k: v / max(steps, 1) for k, v in sums.items()}

    def _minibatch_step(self, ro: Rollout, seqs, masks, chosen: list[int]) -> dict:
        sel = torch.isin(ro.seq_of, torch.tensor(chosen))
        batch = pack([seqs[i] for i in chosen], [masks[i] for i in chosen])
        with lora.use_adapter(self.model, "policy"), profiling.phase("cai.ppo.train"):
            hidden = hidden_states(self.model, batch)
            lp, ent = token_logprobs(self.model, batch, return_entropy=True, hidden=hidden)
            values = self.value_head(hidden.index_select(0, batch.target_rows))
        rows = batch.target_rows
        lp, ent = lp[rows], ent[rows]
        ones = torch.ones_like(lp)
        pol = kernels.ppo_policy_loss(lp, ro.old_lp[sel], ro.advantages[sel], ones, clip_eps=self.cfg.clip_eps)
        val = kernels.ppo_value_loss(values, ro.values[sel], ro.returns[sel], ones, clip_eps=self.cfg.value_clip_eps)
        loss = pol.loss + self.cfg.vf_coef * val.loss - self.cfg.entropy_coef * ent.mean()
        value = self.trainer.backward(loss)
        stats = self.trainer.apply()
        return {"loss": value, "policy_loss": pol.loss.item(), "value_loss": val.loss.item(),
                "clip_frac": float(pol.clip_frac), "approx_kl": float(pol.approx_kl),
                "value_clip_frac": float(val.clip_frac), "entropy": ent.detach().mean().item(), "grad_norm": stats["grad_norm"]}

    # ---- iterations, checkpoints ----------------------------------------------------------
    def iterate(self, prompts: list[PromptRecord]) -> dict:
        """One rollout + update iteration; returns its metrics."""
        t0 = time.perf_counter()
        chosen = self.prompts_for(prompts, self.iteration)
        prompt_ids, responses, texts = self.rollout(chosen, self.iteration)
        t1 = time.perf_counter()
        ro = self.experience(chosen, prompt_ids, responses, texts)
        seqs = [p + r for p, r in zip(prompt_ids, responses)]
        masks = [[False] * len(p) + [True] * len(r) for p, r in zip(prompt_ids, responses)]
        t2 = time.perf_counter()
        train = self.update(ro, seqs, masks)
        t3 = time.perf_counter()
        kl_seq = segment_sum(ro.old_lp - ro.ref_lp, torch.tensor([0] + [len(r) for r in responses]).cumsum(0))
        beta = self.kl.value
        self.kl.update(float(kl_seq.mean()), len(seqs))
        self.iteration += 1
        n_tokens = sum(len(s) for s in seqs)
        return {"iteration": self.iteration, "reward_mean": float(ro.scores.mean()),
                "reward_std": float(ro.scores.std(unbiased=False)), "kl": float(kl_seq.mean()), "kl_coef": beta,
                "response_len": sum(map(len, responses)) / len(responses), **train,
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
              sft_adapter: str | None = "sft", out: str | Path | None = None, progress: bool = False) -> list[dict]:
    """Run ``cfg.iterations`` PPO iterations; with ``out``: metrics.jsonl, checkpoints (resumed
    from), and the exported policy adapter. Returns the metrics of the iterations run now."""
    ppo = PPOTrainer(engine, reward_model, cfg, sft_adapter)
    out = Path(out) if out is not None else None
    metrics_path = out / "metrics.jsonl" if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        remove_partial(out)  # what a run killed mid-write left behind
        if ppo.resume(out / "checkpoints"):
            _truncate(metrics_path, ppo.iteration)
        elif metrics_path.exists():
            metrics_path.unlink()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.iterations, initial=ppo.iteration, desc="ppo", unit="iter")
    log = []
    try:
        while ppo.iteration < cfg.iterations:
            rec = ppo.iterate(prompts)
            log.append(rec)
            if metrics_path is not None:
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
    if out is not None:
        ppo.export(out)
    return log


def _truncate(path: Path, iteration: int) -> None:
    """Drop metric lines past the checkpoint so a resumed run never repeats an iteration."""
    truncate_metrics(path, iteration, key="iteration")
