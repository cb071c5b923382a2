"""Outputs of a patching run: patch.json, a readable patch.md, the patch.png figure and the generations."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from safetyneurons._io import atomic_dir, dumps_json, figure_png, json_safe
from safetyneurons.causal.patch import DIRECTIONS

MEASURES = {"refusal_rate": "share of harmful prompts the reply refuses (phrase judge)",
            "answer_rate": "share of benign prompts the reply answers (phrase judge)"}
JUDGE_NOTE = ("Refusals are judged by a phrase matcher (safetyneurons.model.judge): a heuristic that misses refusals "
              "worded otherwise and says nothing about whether an answer is harmful.")
MIN_GAP = 0.05  # the smallest difference between the two models' rates that an effect is normalised by


# ----------------------------------------------------------------------------------------- outputs
OUTPUT_FILES = ("patch.json", "patch.png", "patch.md", "generations.jsonl")
PAPER_NOTE = ("Paper (Chen et al. 2025, Table 1; Llama2-7B, Mistral-7B, Gemma-7B, Qwen2.5-3B): patching about 5% of "
              "the neurons recovers 73-101% of the aligned model's safety (causal effect), random neurons of the "
              "same count fall far below (t-test p from 1e-6 to 1e-18), general ability moves by -0.04 to +0.05.")


def _fmt(v, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    return f"{round(100 * v, 1) + 0.0:.1f}%" if pct else f"{round(v, 3) + 0.0:.3f}"


def _p(v) -> str:
    return "n/a" if v is None else f"{v:.2g}"


def _directions(result: dict) -> list[str]:
    """The result's directions in the canonical order (sufficiency first), whatever order its JSON keeps."""
    return [d for d in DIRECTIONS if d in result["directions"]]


def patch_png(result: dict) -> bytes:
    """Causal effect vs k per direction and measure: safety line, random band (min-max) and mean, baselines."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator


    directions = _directions(result)
    fig = Figure(figsize=(11, 3.6 * len(directions)), dpi=130, layout="constrained")
    axes = fig.subplots(len(directions), len(MEASURES), squeeze=False)
    for row, direction in enumerate(directions):
        res = sorted((r for r in result["results"] if r["direction"] == direction), key=lambda r: r["k"])
        ks = np.array([r["k"] for r in res], dtype=float)
        for col, measure in enumerate(MEASURES):
            ax, key = axes[row][col], f"effect_{measure}"
            nan = lambda v: np.nan if v is None else v  # noqa: E731
            lo = np.array([nan(r["random"][key]["min"]) for r in res])
            hi = np.array([nan(r["random"][key]["max"]) for r in res])
            mid = np.array([nan(r["random"][key]["mean"]) for r in res])
            if len(ks) > 1:
                ax.fill_between(ks, lo, hi, color="tab:gray", alpha=0.3, label="random sets (min-max)")
            ax.errorbar(ks, mid, yerr=[mid - lo, hi - mid], fmt="o--", color="tab:gray", capsize=4,
                        label="random sets (mean, min-max)")
            ax.plot(ks, [nan(r["safety"][key]) for r in res], "o-", color="tab:red", lw=2, label="safety neurons")
            for name, marker in (("mean", "s"), ("zero", "x")):
                ys = [nan(r["baselines"].get(name, {}).get(key)) for r in res]
                if not all(np.isnan(ys)):
                    ax.plot(ks, ys, marker, ls="none", color="tab:blue" if name == "mean" else "black",
                            label=f"{name} patching of the safety set" if name == "mean" else "zero ablation")
            if all(np.isnan(mid)) and all(np.isnan([nan(r["safety"][key]) for r in res])):
                ax.text(0.5, 0.5, f"not defined: the two models' {measure.replace('_', ' ')}s differ\n"
                        f"by less than {100 * MIN_GAP:g} points", transform=ax.transAxes, ha="center", va="center")
            ax.axhline(0, color="black", lw=0.6)
            ax.axhline(1, color="tab:green", lw=0.6, ls=":")
            ax.set_xscale("log")
            ax.set_xlim(ks.min() / 1.6, ks.max() * 1.6)
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticks(ks, [f"{k:g}" for k in ks])
            ax.set_xlabel("k: top % of neurons by change score")
            ax.set_ylabel(f"causal effect on {measure.replace('_', ' ')}")
            ax.set_title(f"{direction} ({result['directions'][direction].split(':')[0]})", fontsize=10)
            if row == 0 and col == 0:
                ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"Dynamic activation patching at {result['hook_point']} (1 = the donor's behaviour, 0 = unchanged)",
                 fontsize=11)
    return figure_png(fig)


def render_markdown(result: dict) -> str:
    s, pair = result["settings"], result["pair"]
    lines = ["# Causal validation: dynamic activation patching", "",
             f"- base `{pair['base']['ref']}`, aligned `{pair['aligned']['ref']}`, hook point `{result['hook_point']}`",
             f"- {result['data']['harmful']} harmful + {result['data']['benign']} benign held-out prompts, greedy, "
             f"{s['max_new_tokens']} new tokens"
             + ("; a reply stops once a refusal phrase appears (the verdict cannot change after it)"
                if s.get("stop_at_refusal") else "")
             + f"; {s['random_sets']} layer-matched random sets per k (none overlaps "
             f"the safety set); seed {s['seed']}",
             f"- causal effect = {result['causal_effect']}", f"- rank p-value = {result['rank_p_value']}",
             f"- perplexity: {result['perplexity']} ({result['data']['reference_texts']} texts)",
             f"- time: {result['timings']['total_s'] / 60:.1f} min ({s.get('dtype', 'float32')} on "
             f"{s.get('device', 'cpu')})", "", f"**Judge.** {result['judge']}", "",
             "## Unpatched models", "", "| model | refuses harmful | answers benign | perplexity (ratio to base) |",
             "|---|---:|---:|---:|"]
    for who, m in result["unpatched"].items():
        lines.append(f"| {who} | {_fmt(m['refusal_rate'], True)} | {_fmt(m['answer_rate'], True)} | "
                     f"{m['perplexity']:.2f} ({m['perplexity_ratio_to_base']:.3f}) |")
    for direction in _directions(result):
        doc = result["directions"][direction]
        lines += ["", f"## {direction}: {doc}", "",
                  "| k | set | neurons | refuses harmful | answers benign | effect (refusal) | effect (answer) | "
                  "perplexity ratio |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in sorted((r for r in result["results"] if r["direction"] == direction), key=lambda r: r["k"]):
            rnd = r["random"]

            def spread(key, pct=False):
                v = rnd[key]
                return "n/a" if v["mean"] is None else f"{_fmt(v['mean'], pct)} ± {_fmt(v['sd'], pct)}"

            def row(name, m):
                return (f"| {r['k']:g}% | {name} | {r['n_neurons']} | {_fmt(m['refusal_rate'], True)} | "
                        f"{_fmt(m['answer_rate'], True)} | {_fmt(m['effect_refusal_rate'])} | "
                        f"{_fmt(m['effect_answer_rate'])} | {_fmt(m['perplexity_ratio_to_base'])} |")

            lines.append(row("**safety neurons**", r["safety"]))
            lines.append(f"| {r['k']:g}% | random (mean ± sd of {rnd['n_sets']}) | {r['n_neurons']} | "
                         f"{spread('refusal_rate', True)} | {spread('answer_rate', True)} | "
                         f"{spread('effect_refusal_rate')} | {spread('effect_answer_rate')} | "
                         f"{spread('perplexity_ratio_to_base')} |")
            for name, m in r["baselines"].items():
                lines.append(row("mean patching" if name == "mean" else "zero ablation", m))
        lines += ["", "Safety set vs random sets (rank p-value; one-sample t-test p):", ""]
        for r in sorted((r for r in result["results"] if r["direction"] == direction), key=lambda r: r["k"]):
            parts = [f"{m.replace('_', ' ')}: rank p {_p(r['random'][f'effect_{m}']['rank_p_value'])}, "
                     f"t-test p {_p(r['random'][f'effect_{m}']['t_test_p'])}" for m in MEASURES]
            lines.append(f"- k = {r['k']:g}%: " + "; ".join(parts))
    lines += ["", "![causal effect vs k](patch.png)", "", PAPER_NOTE, "",
              "Every reply and its verdict: `generations.jsonl`. Every number: `patch.json`.", ""]
    return "\n".join(lines)


def summary_lines(result: dict) -> list[str]:
    """One line per direction and k: the safety set's causal effect on refusal against the random sets'."""
    lines = []
    for r in result["results"]:
        rnd = r["random"]["effect_refusal_rate"]
        spread = "n/a" if rnd["mean"] is None else f"{rnd['mean']:.3f} ± {rnd['sd']:.3f}"
        lines.append(f"{r['direction']:>11} k={r['k']:g}% ({r['n_neurons']} neurons): causal effect on refusal "
                     f"{_fmt(r['safety']['effect_refusal_rate'])} vs random {spread} "
                     f"(rank p {_p(rnd['rank_p_value'])})")
    return lines


def write_outputs(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """patch.json, patch.png, patch.md and generations.jsonl, rendered first and written atomically."""
    import json


    body = {k: v for k, v in result.items() if k != "generations"}
    contents = {
        "patch.json": dumps_json(json_safe(body)).encode(),
        "patch.png": patch_png(body),
        "patch.md": render_markdown(body).encode(),
        "generations.jsonl": "".join(json.dumps(json_safe(g), ensure_ascii=False, sort_keys=True) + "\n"
                                     for g in result.get("generations", [])).encode(),
    }
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        for name, blob in contents.items():
            (tmp / name).write_bytes(blob)
    return {name: out_dir / name for name in contents}
