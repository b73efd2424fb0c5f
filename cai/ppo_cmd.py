"""``cai ppo``: PPO against the preference model, on one shared base in one process.

Needs the SFT adapter (`cai sft --out DIR` writes DIR/adapter) for the initial policy and
the KL reference, and the preference model (`cai pm --out DIR` writes DIR/reward).
Each iteration mixes red-team prompts (--prompts) with helpfulness prompts
(--helpful-prompts) in the proportion --helpful-fraction.
Re-running the same command resumes from the last checkpoint in --out.
"""
from __future__ import annotations

import argparse

from cai.config import add_config_flags, add_model_flags, config_from_args, open_engine
from cai.prompts import add_prompt_flags
from cai.ppo import PPOConfig


def register(sub) -> None:
    p = sub.add_parser("ppo", help="RL-CAI: PPO against the preference model with a KL penalty to the SFT policy",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--sft-adapter", default=None,
                   help="SFT adapter folder: the initial policy and the KL reference (default: the base itself)")
    p.add_argument("--reward", required=True, help="preference model folder written by `cai pm` (DIR/reward)")
    add_prompt_flags(p)
    p.add_argument("--helpful-prompts", default="benign",
                   help="helpfulness prompts mixed into the red-team ones: 'benign' (its train split) or a file")
    p.add_argument("--out", required=True, help="run folder: metrics.jsonl, checkpoints/, policy/, peft/")
    add_config_flags(p, PPOConfig)
    p.set_defaults(func=run)


def run(args) -> int:
    from cai.label_cmd import load_policy
    from cai.pm import load_reward_model
    from cai.ppo import train_ppo
    from cai.prompts import select_prompts

    cfg = config_from_args(PPOConfig, args)
    prompts = select_prompts(args.prompts, args.split, args.limit)
    helpful = select_prompts(args.helpful_prompts, "train") if cfg.helpful_fraction > 0 else []
    eng = open_engine(args, max_slots=cfg.max_slots)
    sft = load_policy(eng, args.sft_adapter)
    reward = load_reward_model(eng, args.reward)
    log = train_ppo(eng, reward, prompts, cfg, sft_adapter=sft, out=args.out, progress=True,
                    helpful_prompts=helpful)
    for rec in log:
        print(f"iteration {rec['iteration']}: reward {rec['reward_mean']:.3f} ± {rec['reward_std']:.3f}, "
              f"KL {rec['kl']:.3f}, entropy {rec['entropy']:.2f}, clip {rec['clip_frac']:.3f}, "
              f"{rec['helpful_prompts']} helpfulness prompts, {rec['truncated']} cut at max_new_tokens "
              f"(penalty {rec['eos_penalty']:.2f}), "
              f"{rec['iteration_s']:.1f} s (generate {rec['generate_s']:.1f} / score {rec['score_s']:.1f} / "
              f"train {rec['train_s']:.1f}), peak RSS {rec['peak_rss_mb']:.0f} MB")
    return 0
