"""Markdown tables of results, each from one JSON file: probes against controls, the guard, the twin, benchmarks.

Numbers have a fixed format (percentages to 0.1, AUROC to 3 decimals), so the same JSON gives the same bytes.
"""

from __future__ import annotations

import math
from typing import Sequence

from safetyneurons.results.sources import BenchmarkSource, RunSource, shown

LABELS = {"safety": "safety neurons", "pca": "PCA (95% var.) of all", "all": "all neurons",
          "random": "random layer-matched neurons", "random_global": "random neurons (global)",
          "magnitude": "largest-magnitude neurons", "text": "text only (TF-IDF)",
          "length": "length only (token count)"}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def pct(v) -> str:
    return f"{100 * v:.1f}%" if _finite(v) else "n/a"


def num(v, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if _finite(v) else "n/a"


def ci(pair, digits: int = 3, sign: str = "") -> str:
    """`` [lo, hi]`` of a confidence interval, or nothing when there is none."""
    if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(_finite(v) for v in pair):
        return ""
    return f" [{pair[0]:{sign}.{digits}f}, {pair[1]:{sign}.{digits}f}]"


def cell(v) -> str:
    """A benchmark cell: text as is, integers whole, floats to 4 significant digits (1 decimal from 100 up)."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "n/a"
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(cell(x) for x in v) + "]"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool] = ()) -> list[str]:
    """Lines of a markdown table; columns flagged in ``numeric`` are right-aligned."""
    align = ["---:" if k < len(numeric) and numeric[k] else "---" for k in range(len(columns))]
    return (["| " + " | ".join(columns) + " |", "|" + "|".join(align) + "|"]
            + ["| " + " | ".join(r) + " |" for r in rows])


def source_line(file: str, code: str, machine: str, guard_id: str | None = None, command: str | None = None) -> str:
    """The provenance line under a table: file, code version, machine, artifact, command."""
    parts = [f"`{file}`", f"code {code}", machine]
    if guard_id:
        parts.append(f"guard {guard_id}")
    if command:
        parts.append(f"command `{command}`")
    return "_Source: " + "; ".join(parts) + "._"


def _with_sd(m: dict, key: str, digits: int = 3) -> str:
    sd = m.get(f"{key}_std")
    return num(m.get(key), digits) + (f" ± {sd:.{digits}f}" if _finite(sd) else "")


def probe_label(r: dict) -> str:
    m = r["metrics"]
    extra = f" (mean of {m['draws']} draws)" if "draws" in m else ""
    return LABELS.get(r["feature_set"], r["feature_set"]) + extra


def probe_table(report: dict) -> list[str]:
    """Every feature set's probe on the test split and the held-out sources: AUROC with its CI, accuracy."""
    held = {(r["feature_set"], r["classifier"]): r["metrics"]
            for r in (report.get("heldout") or {}).get("results", [])}
    rows = []
    for r in report["results"]:
        m, h = r["metrics"], held.get((r["feature_set"], r["classifier"]), {})
        rows.append([probe_label(r), r["classifier"], str(r["n_features"]), _with_sd(m, "auroc") + ci(m.get("auroc_ci")),
                     _with_sd(m, "accuracy"), _with_sd(h, "auroc") + ci(h.get("auroc_ci")) if h else "n/a",
                     _with_sd(h, "accuracy") if h else "n/a"])
    held_n = next(iter(held.values()), {}).get("n", "n/a")
    return markdown_table(["feature set", "classifier", "features", "test AUROC [95% CI]", "test accuracy",
                           "held-out AUROC [95% CI]", "held-out accuracy"], rows, [False, False, True] + [True] * 4) \
        + ["", f"Test split: {report['test']['n']} prompts; held-out sources: {held_n} prompts (never trained on)."]


def controls_table(report: dict) -> list[str]:
    """The safety set against each control (paired bootstrap over clusters): test split and held-out sources."""
    splits = [("test", report.get("safety_vs_controls") or {}),
              ("held-out", (report.get("heldout") or {}).get("safety_vs_controls") or {})]
    rows = []
    for split, vs in splits:
        for kind, per in vs.items():
            for clf, d in per.items():
                rows.append([LABELS.get(kind, kind), clf, split, num(d["safety_auroc"]),
                             f"{num(d['control_auroc'])} ± {num(d.get('control_auroc_sd'))}",
                             f"{d['diff']:+.3f}{ci(d.get('ci'), sign='+')}", num(d.get("p_le_0")),
                             num(d.get("rank_p_auroc"))])
    if not rows:
        return ["No control comparison in this run."]
    first = next(iter(next(iter(next(vs for _, vs in splits if vs).values())).values()))
    return markdown_table(["control", "classifier", "split", "AUROC safety", "AUROC control (mean ± sd)",
                           "safety − control [95% CI]", "share ≤ 0", "rank p"], rows,
                          [False, False, False, True, True, False, True, True]) \
        + ["", f"Paired bootstrap over {first.get('unit', 'prompt')}s ({first.get('n_units', 'n/a')} units on the "
               f"test split); rank p = (1 + draws with AUROC ≥ safety) / (1 + draws)."]


def calibration_table(cal: dict) -> list[str]:
    """The guard's operating points, set on the validation split read as the guard reads it."""
    rows = []
    for name, fig in sorted(cal["operating_points"].items()):
        v = fig["validation"]
        rows.append([name, pct(fig["target_fpr"]), num(fig["threshold"], 4), pct(v["fpr_benign"]),
                     pct(v["flag_rate_ordinary_benign"]), pct(v["flag_rate_hard_negative"]), pct(v["recall_harmful"])])
    v = next(iter(cal["operating_points"].values()))["validation"]
    return markdown_table(["operating point", "target FPR", "threshold", "val FPR (benign)", "val flags ordinary",
                           "val flags hard negatives", "val recall"], rows, [False] + [True] * 6) \
        + ["", f"Validation split: {v['n_harmful']} harmful, {v['n_benign']} benign of which "
               f"{v['n_hard_negative']} hard negatives."]


def heldout_table(overrefusal: dict, probes: Sequence[str] | None = None, short: bool = False) -> list[str]:
    """Flag rates and recall on the held-out sources (never trained on), each probe at its own threshold set on
    validation: the guard as served next to the probes and baselines (``probes``: only those rows)."""
    rows = []
    for r in overrefusal["summary"]:
        if probes is not None and r["probe"] not in probes:
            continue
        row = [r["probe"], pct(r["flag_rate_ordinary_benign"]), pct(r["flag_rate_hard_negative"]),
               pct(r["recall_harmful"])]
        rows.append(row + ([num(r.get("auroc"))] if short else [pct(r.get("recall_at_1pct_fpr")), num(r.get("auroc"))]))
    cols = ["probe", "flags ordinary benign", "flags hard negatives", "recall harmful"] \
        + (["AUROC"] if short else ["recall at 1% FPR", "AUROC"])
    return markdown_table(cols, rows, [False] + [True] * (len(cols) - 1)) \
        + ["", f"Held-out prompts: {overrefusal['n']}."]


def headline_probes(overrefusal: dict) -> list[str]:
    """The guard's rows (as served at each operating point, or the guard probe) and the TF-IDF baseline."""
    names = [r["probe"] for r in overrefusal["summary"]]
    served = [n for n in names if n.startswith("guard as served")]
    return (served or [n for n in names if n.startswith("guard")][:1]) + [n for n in names if n.startswith("text")]


def budget_line(report: dict, short: bool = False) -> str:
    """Which neurons the guard reads (its layer budget); ``short``: one clause without the rule."""
    b = report.get("guard_budget") or {}
    if b.get("max_layer") is None and "deepest_layer" in b:
        if short:
            return f"reads the run's {b['neurons']} safety neurons as selected (no layer budget), so the model " \
                   f"stops after layer {b['deepest_layer']}"
        return (f"The guard reads the run's {b['neurons']} safety neurons as selected and stops after layer "
                f"{b['deepest_layer']}, its deepest safety neuron (no layer budget: {b['rule']}).")
    if not b or b.get("max_layer") is None:
        return "reads the run's safety neurons as selected" if short else \
            "The guard reads the run's safety neurons as selected."
    if short:
        return f"reads {b['neurons']} neurons in layers 0..{b['max_layer']}, so the model stops after layer " \
               f"{b['deepest_layer']}"
    return (f"The guard reads {b['neurons']} neurons in layers 0..{b['max_layer']} and stops after layer "
            f"{b['deepest_layer']} (budget rule: {b['rule']}).")


def twin_table(twin: dict) -> list[str]:
    """Refusals of the base and its twin on held-out prompts (phrase judge)."""
    ev = twin["evaluation"]
    rows = []
    for who in ("base", "twin"):
        s = ev[who]
        rows.append([who, f"{s['refused_harmful']}/{s['n_harmful']} ({pct(s['refusal_rate_harmful'])})",
                     f"{s['answered_benign']}/{s['n_benign']} ({pct(s['answer_rate_benign'])})",
                     pct(s.get("refusal_rate_benign"))])
    return markdown_table(["model", "refuses harmful", "answers benign", "refuses benign"], rows,
                          [False, True, True, True]) \
        + ["", f"Held-out prompts: {ev['n_harmful']} harmful, {ev['n_benign']} benign; judge: "
               f"{(ev.get('judge') or {}).get('kind', 'refusal phrases')}."]


def _benchmark_rows(d: dict) -> list[str]:
    def is_number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    # a column of numbers is right-aligned; its empty cells (None, shown "n/a") do not change that
    numeric = [any(is_number(r[k]) for r in d["rows"]) and all(r[k] is None or is_number(r[k]) for r in d["rows"])
               for k in range(len(d["columns"]))]
    return markdown_table([cell(c) for c in d["columns"]], [[cell(v) for v in r] for r in d["rows"]], numeric)


def benchmark_table(b: BenchmarkSource, short: bool = False) -> list[str]:
    """A benchmark's rows and its notes; ``short``: its ``readme`` subset when it has one (no notes), and the
    small tables it adds (``readme.tables``: a title line, then the table)."""
    d = b.data
    if short and d.get("readme"):
        lines = _benchmark_rows(d["readme"])
        for t in d["readme"].get("tables", []):
            lines += ["", cell(t["title"]), ""] + _benchmark_rows(t)
        return lines
    notes = [f"- {cell(n)}" for n in d.get("notes") or []]
    return _benchmark_rows(d) + ([""] + notes if notes else [])


def benchmark_source(b: BenchmarkSource) -> str:
    extra = f"; measured {b.artifact_path}" if b.artifact_path else ""
    date = f"; {b.data['date']}" if b.data.get("date") else ""
    return source_line(shown(b.path), b.code, b.machine, b.guard_id, str(b.data["command"]))[:-2] + extra + date + "._"


def run_source(run: RunSource, file: str) -> str:
    return source_line(run.file(file), run.code, run.machine, run.guard_id, run.command)
