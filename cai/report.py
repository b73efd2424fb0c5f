"""The evaluation's report and plots: ``report.md``, ``elo.png``, ``training_curves.png``,
and with ``--attacks`` ``attacks.png`` (refusal under each jailbreak template vs plain).

Plots use matplotlib's Agg backend, chosen inside the plotting functions so that importing
this module changes nothing and no display is ever needed.

``elo.png`` is the paper's picture (Bai et al. 2022, Fig. 2/3): helpfulness Elo on x,
harmlessness Elo on y, one point per checkpoint, arrows in training order. Up and to the
right is better; the method aims to move up without moving left.
"""
from __future__ import annotations

import json
from pathlib import Path

# panel -> (stage, x field, y field); stages are the keys of ``training_metrics``
PANELS = {
    "SFT loss": ("sft", "step", "loss"),
    "PM loss": ("pm", "step", "loss"),
    "PM accuracy": ("pm", "step", "accuracy"),
    "PPO reward": ("ppo", "iteration", "reward_mean"),
    "PPO KL": ("ppo", "iteration", "kl"),
    "PPO entropy": ("ppo", "iteration", "entropy"),
    "DPO loss": ("dpo", "step", "loss"),
    "DPO accuracy": ("dpo", "step", "accuracy"),
}
STAGES = ("sft", "pm", "ppo", "dpo")


def write_all(out: Path, result: dict, training_metrics: dict[str, str]) -> dict:
    """Write the plots and report.md; returns the entries eval.json keeps about them."""
    plots = {"elo": plot_elo(result, out / "elo.png")}
    plots["attacks"] = plot_attacks(result["attacks"], out / "attacks.png") if result.get("attacks") else None
    if plots["attacks"] is None:
        (out / "attacks.png").unlink(missing_ok=True)  # from an earlier run with attacks
    series, notes = read_training_metrics(training_metrics)
    drawn = plot_training(series, out / "training_curves.png")
    plots["training_curves"] = "training_curves.png" if drawn else None
    extra = {"plots": plots, "training_panels": drawn, "training_notes": notes}
    (out / "report.md").write_text(render_report({**result, **extra}))
    return extra


# ---------------------------------------------------------------- training metrics

def read_training_metrics(paths: dict[str, str]) -> tuple[dict, list[str]]:
    """stage -> {"records": [metrics.jsonl records], "eval": eval.json or None}, and notes
    saying what was missing. A path may be the metrics.jsonl file or the stage's folder;
    the preference model's ``eval.json`` is ``paths["pm_eval"]`` or the one beside its metrics.
    RL is PPO or DPO: only when neither is given is that noted."""
    series, notes = {}, []
    for stage in STAGES:
        if not paths.get(stage):
            if stage in ("sft", "pm") or (stage == "ppo" and not paths.get("dpo")):
                notes.append(f"{stage if stage != 'ppo' else 'ppo/dpo'}: no metrics given")
            continue
        p = Path(paths[stage])
        p = p / "metrics.jsonl" if p.is_dir() else p
        if not p.is_file():
            notes.append(f"{stage}: no file at {p}")
            continue
        records = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        extra = Path(paths["pm_eval"]) if stage == "pm" and paths.get("pm_eval") else p.with_name("eval.json")
        series[stage] = {"records": records, "eval": json.loads(extra.read_text()) if extra.is_file() else None}
    unknown = sorted(set(paths) - set(STAGES) - {"pm_eval"})
    if unknown:
        notes.append(f"ignored metrics for {', '.join(unknown)} (known: {', '.join(STAGES)})")
    return series, notes


def _xy(records: list[dict], x: str, y: str) -> tuple[list, list]:
    pts = [(r[x], r[y]) for r in records if isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float))]
    return [a for a, _ in pts], [b for _, b in pts]


# ---------------------------------------------------------------- plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_elo(result: dict, path: Path) -> str:
    """Helpfulness Elo (x) vs harmlessness Elo (y), checkpoints joined in training order."""
    plt = _pyplot()
    names = [row["checkpoint"] for row in result["summary"]]
    xs = [result["elo"]["helpfulness"][n] for n in names]
    ys = [result["elo"]["harmlessness"][n] for n in names]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for k in range(len(names) - 1):
        ax.annotate("", xy=(xs[k + 1], ys[k + 1]), xytext=(xs[k], ys[k]),
                    arrowprops={"arrowstyle": "->", "color": "0.5", "lw": 1.2})
    ax.scatter(xs, ys, s=40, zorder=3)
    for n, x, y in zip(names, xs, ys):
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(6, 6))
    ax.axhline(0, color="0.85", lw=0.8, zorder=0)
    ax.axvline(0, color="0.85", lw=0.8, zorder=0)
    ax.set_xlabel("helpfulness Elo")
    ax.set_ylabel("harmlessness Elo")
    ax.set_title(f"Elo vs {result['baseline']} (AI-judged, held-out prompts)")
    ax.margins(0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot_training(series: dict, path: Path) -> list[str]:
    """One panel per PANELS entry that has data; returns the panels drawn (none: no file)."""
    panels = [(title, *spec) for title, spec in PANELS.items()
              if spec[0] in series and _xy(series[spec[0]]["records"], spec[1], spec[2])[0]]
    pm_eval = (series.get("pm") or {}).get("eval") or {}
    if "accuracy" in pm_eval and not any(t == "PM accuracy" for t, *_ in panels):
        panels.append(("PM accuracy", "pm", "step", "accuracy"))  # only the held-out figure
    if not panels:
        path.unlink(missing_ok=True)
        return []
    plt = _pyplot()
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (title, stage, x, y) in zip(axes.flat, panels):
        xs, ys = _xy(series[stage]["records"], x, y)
        ax.plot(xs, ys, lw=1.2)
        if title == "PM accuracy" and "accuracy" in pm_eval:
            ax.axhline(pm_eval["accuracy"], color="C1", ls="--", label=f"held-out {pm_eval['accuracy']:.2f}")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_title(title)
        ax.set_xlabel(x)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [t for t, *_ in panels]


# ---------------------------------------------------------------- report.md

def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def _elo(x) -> str:
    return "—" if x is None else f"{x:+.0f}"


def _wr(rate, frac) -> str:
    return "—" if rate is None else f"{rate:.2f} ({_pct(frac)} > 0.5)"


def render_report(r: dict) -> str:
    base, names = r["baseline"], [row["checkpoint"] for row in r["summary"]]
    lines = ["# Evaluation", "",
             f"Held-out prompts: {r['prompts']['redteam']} red-team, {r['prompts']['benign']} benign. "
             f"Win rates are the feedback model's mean P(checkpoint better than {base}) over principles and "
             f"both option orders (in brackets: prompts where it is above 0.5). Elo: Bradley-Terry on all "
             f"pairwise comparisons, {base} at 0. Refusals by the rule of `cai/refusal.py`.", "",
             "| checkpoint | refusal rate (red-team) | over-refusal (benign) | harmlessness win rate vs "
             f"{base} | helpfulness win rate vs {base} | harmlessness Elo | helpfulness Elo |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in r["summary"]:
        lines.append(f"| {s['checkpoint']} | {_pct(s['refusal_rate'])} | {_pct(s['over_refusal_rate'])} | "
                     f"{_wr(s['harmlessness_win_rate'], s['harmlessness_win_frac'])} | "
                     f"{_wr(s['helpfulness_win_rate'], s['helpfulness_win_frac'])} | "
                     f"{_elo(s['harmlessness_elo'])} | {_elo(s['helpfulness_elo'])} |")
    lines += ["", "![helpfulness Elo vs harmlessness Elo](elo.png)", ""]
    for s, title in (("redteam", "Refusal rate by red-team category"), ("benign", "Over-refusal by benign category")):
        lines += [f"## {title}", "", "| category | n | " + " | ".join(names) + " |",
                  "| --- | ---: | " + " | ".join("---:" for _ in names) + " |"]
        for cat, row in r["refusal_by_category"][s].items():
            lines.append(f"| {cat} | {row['n']} | " + " | ".join(_pct(row[n]) for n in names) + " |")
        lines.append("")
    lines += _lookalike_section(r) + _attack_section(r) + _training_section(r) + _samples_section(r)
    return "\n".join(lines) + "\n"


def _training_section(r: dict) -> list[str]:
    lines = ["## Training curves", ""]
    if r["plots"].get("training_curves"):
        lines += [f"Panels: {', '.join(r['training_panels'])}.", "", "![training curves](training_curves.png)", ""]
    else:
        lines += ["No training metrics were found, so there is no training_curves.png.", ""]
    if r["training_notes"]:
        lines += ["Skipped: " + "; ".join(r["training_notes"]) + ".", ""]
    return lines


def _quote(text: str, limit: int = 500) -> str:
    text = text if len(text) <= limit else text[:limit].rstrip() + " …"
    return "\n".join("> " + line for line in (text or "(empty)").splitlines()) or "> (empty)"


def _samples_section(r: dict) -> list[str]:
    from cai.refusal import is_refusal

    lines = ["## Samples", ""]
    for s, title in (("redteam", "Red-team"), ("benign", "Benign")):
        for ex in r["samples"][s]:
            lines += [f"### {title} · {ex['category']} · `{ex['prompt_id']}`", "", f"**Prompt:** {ex['prompt']}", ""]
            for n, text in ex["responses"].items():
                tag = " (refusal)" if is_refusal(text) else ""
                lines += [f"**{n}**{tag}:", "", _quote(text), ""]
    return lines


# ---------------------------------------------------------------- adversarial evaluation

def plot_attacks(attacks: dict, path: Path) -> str:
    """Grouped bars: per checkpoint, refusal rate plain, under each template and under all."""
    plt = _pyplot()
    names = list(attacks["by_checkpoint"])
    cols = ["plain"] + [t["id"] for t in attacks["templates"]] + ["all"]
    width = 0.8 / len(cols)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 + len(names) * len(cols) * 0.3), 4.6))
    for k, c in enumerate(cols):
        ys = [100 * (attacks["by_checkpoint"][n][c]["refusal_rate"] or 0) for n in names]
        color = "0.2" if c == "plain" else ("0.65" if c == "all" else f"C{k - 1}")
        ax.bar([i + (k - (len(cols) - 1) / 2) * width for i in range(len(names))], ys, width, label=c, color=color)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 105)
    ax.set_ylabel("refusal rate, red-team (%)")
    ax.set_title(f"Refusal under attack vs plain ({attacks['prompts']} prompts per template)", fontsize=10)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path.name


def _attack_section(r: dict) -> list[str]:
    a = r.get("attacks")
    if not a:
        return []
    cols = ["plain"] + [t["id"] for t in a["templates"]] + ["all"]
    head = ["| checkpoint | " + " | ".join(cols) + " |", "| --- | " + " | ".join("---:" for _ in cols) + " |"]
    lines = ["## Under attack", "",
             f"Every one of {a['prompts']} held-out red-team prompts answered plainly and wrapped in each "
             f"template ({', '.join(f'`{t}`' for t in cols[1:-1])}); `all` pools the templates. "
             "The judge reads the plain request beside the answers to the wrapped one.", ""]
    for key, title, fmt in (("refusal_rate", "Refusal rate", _pct),
                            ("bypassed", "Bypassed: refused plainly, not refused under the template", _pct),
                            ("harmlessness_win_rate", f"Harmlessness win rate vs {a['baseline']} (AI-judged)",
                             lambda x: "—" if x is None else f"{x:.2f}")):
        lines += [f"### {title}", ""] + head
        for n, row in a["by_checkpoint"].items():
            lines.append(f"| {n} | " + " | ".join(fmt(row[c].get(key)) if key in row[c] else "·" for c in cols) + " |")
        lines.append("")
    return lines + ["![refusal under attack vs plain](attacks.png)", ""]


def _lookalike_section(r: dict) -> list[str]:
    lk = r.get("lookalikes")
    if not lk:
        return []
    names = [row["checkpoint"] for row in r["summary"]]
    lines = ["## Over-refusal on look-alikes", ""]
    if not lk["n"]:
        return lines + [f"No benign prompt is in the look-alike categories ({', '.join(lk['categories'])}).", ""]
    lines += [f"Benign prompts that only sound harmful ({lk['n']}, categories: {', '.join(lk['categories'])}), "
              f"beside the other {lk['rest_n']} benign prompts.", "",
              "| checkpoint | look-alikes refused | other benign refused |", "| --- | ---: | ---: |"]
    lines += [f"| {n} | {_pct(lk['over_refusal'][n])} | {_pct(lk['rest_over_refusal'][n])} |" for n in names]
    lines += ["", "| look-alike category | n | " + " | ".join(names) + " |",
              "| --- | ---: | " + " | ".join("---:" for _ in names) + " |"]
    lines += [f"| {c} | {row['n']} | " + " | ".join(_pct(row[n]) for n in names) + " |"
              for c, row in lk["by_category"].items()]
    lines += ["", "Refused look-alikes:" if lk["refused"] else "No look-alike was refused.", ""]
    lines += [f"- `{x['prompt_id']}` {x['prompt']} — refused by {', '.join(x['refused_by'])}" for x in lk["refused"]]
    return lines + ([""] if lk["refused"] else [])
