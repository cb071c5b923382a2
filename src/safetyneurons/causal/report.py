"""Outputs of a patching run: patch.json, a readable patch.md, the patch.png figure and the generations."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from safetyneurons._io import atomic_dir, dumps_json, figure_png, json_safe
from safetyneurons.data.records import jsonl
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
              "same count fall far below (a one-sample t-test of the random effects against the safety set's, p "
              "from 1e-6 to 1e-18), general ability moves by -0.04 to +0.05.")


def _fmt(v, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    return f"{round(100 * v, 1) + 0.0:.1f}%" if pct else f"{round(v, 3) + 0.0:.3f}"


def _p(v) -> str:
    return "n/a" if v is None else f"{v:.2g}"


def _directions(result: dict) -> list[str]:
    """The result's directions in the canonical order (sufficiency first), whatever order its JSON keeps."""
    return [d for d in DIRECTIONS if d in result["directions"]]


SET_LABELS = {"safety": "**safety neurons**", "safety_matched": "safety neurons outside saturated layers",
              "layer_matched": "layer-matched random (mean of draws)",
              "change_matched": "change-matched random (mean of draws)", "direction": "refusal direction",
              "mean": "mean patching of the safety set", "zero": "zero ablation of the safety set"}


def _rows_of(r: dict) -> list[tuple[str, dict]]:
    """(label, metrics) of every reported set of one result, controls as the mean of their draws."""
    rows = [("safety", r["safety"])]
    if r.get("safety_matched"):
        rows.append(("safety_matched", r["safety_matched"]))
    rows += [(name, r["controls"][name]) for name in ("layer_matched", "change_matched") if name in r["controls"]]
    rows += [(name, r["baselines"][name]) for name in ("direction", "mean", "zero") if name in r["baselines"]]
    return rows


def _test_cell(test: dict | None) -> str:
    if not test or test.get("estimate") is None:
        return "n/a"
    lo, hi = test["ci95"]
    return f"{test['estimate']:+.3f} [{lo:+.3f}, {hi:+.3f}] p {_p(test['p_value'])}"


def patch_png(result: dict) -> bytes:
    """Causal effect on refusal vs k per direction: the safety set, the controls' means, the baselines."""
    from matplotlib.figure import Figure

    directions = _directions(result)
    fig = Figure(figsize=(6.5, 3.4 * len(directions)), dpi=130, layout="constrained")
    axes = fig.subplots(len(directions), 1, squeeze=False)
    nan = lambda v: np.nan if v is None else v  # noqa: E731
    for row, direction in enumerate(directions):
        ax = axes[row][0]
        res = sorted((r for r in result["results"] if r["direction"] == direction), key=lambda r: r["k"])
        ks = np.array([r["k"] for r in res], dtype=float)
        styles = {"safety": ("o-", "tab:red"), "layer_matched": ("s--", "tab:gray"),
                  "change_matched": ("^--", "tab:orange"), "direction": ("D", "tab:purple"),
                  "mean": ("x", "tab:blue"), "zero": ("+", "black")}
        for name, (fmt, color) in styles.items():
            ys = [nan(dict(_rows_of(r)).get(name, {}).get("effect_refusal_rate")) for r in res]
            if not all(np.isnan(ys)):
                ax.plot(ks, ys, fmt, color=color, label=SET_LABELS[name].strip("*"))
        ax.axhline(0, color="black", lw=0.6)
        ax.axhline(1, color="tab:green", lw=0.6, ls=":")
        ax.set_xticks(ks, [f"{k:g}" for k in ks])
        ax.set_xlabel("k: top % of neurons by change score")
        ax.set_ylabel("causal effect on refusal")
        ax.set_title(f"{direction} ({result['directions'][direction].split(':')[0]})", fontsize=10)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(0.5, 0.5, f"not defined: the two models' refusal rates differ by less than "
                    f"{100 * MIN_GAP:g} points", transform=ax.transAxes, ha="center", va="center", fontsize=8)
    fig.suptitle(f"Dynamic activation patching at {result['hook_point']} (1 = the donor's behaviour)", fontsize=10)
    return figure_png(fig)


def _shortfall(result: dict) -> list[str]:
    """A line when the data held fewer prompts of a class than were asked for (then all of them are used)."""
    prompts = result["data"].get("prompts", {})
    asked, available = prompts.get("asked"), prompts.get("available")
    if not asked or not available:
        return []
    short = [f"{available[c]} {c} (asked for {asked[c]})" for c in ("harmful", "benign") if available[c] < asked[c]]
    return [f"- the data holds only {' and '.join(short)}: all of them are used"] if short else []


def render_markdown(result: dict) -> str:
    s, pair = result["settings"], result["pair"]
    d = result.get("refusal_direction")
    lines = ["# Causal validation: dynamic activation patching", "",
             f"- base `{pair['base']['ref']}`, aligned `{pair['aligned']['ref']}`, hook point `{result['hook_point']}`",
             f"- {result['data']['harmful']} harmful + {result['data']['benign']} benign held-out prompts, greedy, "
             f"{s['max_new_tokens']} new tokens; {s['random_sets']} layer-matched and {s['change_sets']} "
             f"change-matched random sets per k; seed {s['seed']}",
             *_shortfall(result),
             f"- causal effect = {result['causal_effect']}",
             f"- tests: {result['tests']['statistic']}; {s['n_boot']} resamples",
             f"- refusal score: {result['measures']['refusal_score']}",
             f"- {result['measures']['degenerate_rate']}",
             f"- perplexity: {result['perplexity']} ({result['data']['reference_texts']} texts)",
             f"- time: {result['timings']['total_s'] / 60:.1f} min ({s.get('dtype', 'float32')} on "
             f"{s.get('device', 'cpu')})", "", f"**Judge.** {result['judge']}", ""]
    if d:
        lines += [f"**Refusal direction:** layer {d['layer']} ({d['rule']}), norm {d['norm']:.2f}, from "
                  f"{d['n_harmful']} + {d['n_benign']} contrast prompts.", ""]
    lines += ["## Unpatched models", "", "| model | refuses harmful | answers benign | refusal score | degenerate | "
              "perplexity (ratio to base) |", "|---|---:|---:|---:|---:|---:|"]
    for who, m in result["unpatched"].items():
        lines.append(f"| {who} | {_fmt(m['refusal_rate'], True)} | {_fmt(m['answer_rate'], True)} | "
                     f"{_fmt(m['refusal_score'])} | {_fmt(m['degenerate_rate'], True)} | "
                     f"{m['perplexity']:.2f} ({m['perplexity_ratio_to_base']:.3f}) |")
    for direction in _directions(result):
        lines += ["", f"## {direction}: {result['directions'][direction]}"]
        for r in sorted((r for r in result["results"] if r["direction"] == direction), key=lambda r: r["k"]):
            sat = r["saturated_layers"]
            lines += ["", f"k = {r['k']:g}% ({r['n_neurons']} neurons"
                      + (f"; saturated layers {sat}: the matched controls cover the other {r['n_matched']}" if sat
                         else "") + ")", "",
                      "| set | refuses harmful | answers benign | refusal score | degenerate | effect (refusal) | "
                      "perplexity ratio |", "|---|---:|---:|---:|---:|---:|---:|"]
            for name, m in _rows_of(r):
                lines.append(f"| {SET_LABELS[name]} | {_fmt(m['refusal_rate'], True)} | "
                             f"{_fmt(m['answer_rate'], True)} | {_fmt(m['refusal_score'])} | "
                             f"{_fmt(m['degenerate_rate'], True)} | {_fmt(m['effect_refusal_rate'])} | "
                             f"{_fmt(m['perplexity_ratio_to_base'])} |")
            lines += ["", "| safety - control (towards the donor) | judge refusal: D [95% CI] p | "
                      "refusal score: D [95% CI] p |", "|---|---|---|"]
            for name, tests in r["tests"].items():
                lines.append(f"| {result['tests']['controls'][name]} | {_test_cell(tests.get('refusal'))} | "
                             f"{_test_cell(tests.get('refusal_score'))} |")
    lines += ["", "![causal effect vs k](patch.png)", "", PAPER_NOTE, "",
              "Every reply with its verdict, refusal score and degenerate flag: `generations.jsonl`. Every number: "
              "`patch.json`.", ""]
    return "\n".join(lines)


def summary_lines(result: dict) -> list[str]:
    """One line per direction and k: the safety set's refusal and its paired test against each matched control."""
    lines = []
    for r in result["results"]:
        tests = r["tests"]
        parts = [f"vs {name}: {_test_cell(tests[name].get('refusal'))}" for name in ("layer_matched", "change_matched")
                 if name in tests]
        lines.append(f"{r['direction']:>11} k={r['k']:g}% ({r['n_neurons']} neurons): refuses "
                     f"{_fmt(r['safety']['refusal_rate'], True)}, effect {_fmt(r['safety']['effect_refusal_rate'])}; "
                     + "; ".join(parts))
    return lines


def write_outputs(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """patch.json, patch.png, patch.md and generations.jsonl, rendered first and written atomically."""
    body = {k: v for k, v in result.items() if k != "generations"}
    contents = {
        "patch.json": dumps_json(json_safe(body)).encode(),
        "patch.png": patch_png(body),
        "patch.md": render_markdown(body).encode(),
        "generations.jsonl": jsonl(json_safe(g) for g in result.get("generations", [])).encode(),
    }
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        for name, blob in contents.items():
            (tmp / name).write_bytes(blob)
    return {name: out_dir / name for name in contents}
