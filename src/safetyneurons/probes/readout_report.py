"""``readouts.json`` / ``readouts.md`` of the readout comparison, and its benchmark JSON (docs/benchmarks)."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from safetyneurons._io import atomic_write_json, atomic_write_text, json_safe
from safetyneurons.results.machine import provenance

COLUMNS = ["variant", "features", "readout", "eligible", "val recall@t", "val composition recall",
           "val hard-neg flagged", "held-out AUROC", "held-out TPR@1%FPR", "held-out recall@t",
           "held-out ordinary benign flagged", "held-out hard-neg flagged", "held-out composition recall"]


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * float(v):.1f}%"


def table_rows(report: dict) -> list[list]:
    out = []
    for r in report["variants"]:
        v, h = r["val"], r["heldout"]
        out.append([r["name"], r["features"], r["readout"], r["eligible"], v["recall"], v["composition"]["recall"],
                    v["flag_hard_negative"], h["auroc"], h["tpr_at_1pct_fpr"], h["recall"], h["flag_ordinary_benign"],
                    h["flag_hard_negative"], h["composition"]["recall"]])
    return out


README_RECALL = 0.8  # the README's equal-recall column
README_COLUMNS = ["variant", "held-out AUROC", "held-out recall@t", "held-out ordinary benign flagged",
                  "held-out hard-neg flagged", "held-out composition recall",
                  f"at {README_RECALL:.0%} held-out recall: ordinary / hard-neg flagged"]
README_VARIANTS = ("all/mean_windows", "text/tfidf", "text/tfidf_windows", "safety+text/mean",
                   "safety+text/mean_windows", "safety+text/mean_windows/svm")
MARGIN_COLUMNS = ["piece margin", "val recall@t", "val composition recall", "val hard-neg flagged",
                  "held-out AUROC", "held-out recall@t", "held-out ordinary benign flagged",
                  "held-out hard-neg flagged", "held-out composition recall"]


def _flag_pair(f: dict) -> str:
    """One frontier point as "ordinary benign / hard negatives flagged"."""
    return f"{_pct(f['flag_ordinary_benign'])} / {_pct(f['flag_hard_negative'])}"


def readme_rows(rows: list[list], frontier: dict | None = None) -> list[list]:
    """The README's short table: the eligible readouts (the guard's safety neurons), all neurons of the same
    layers, the text baseline and both combined, with the held-out figures only, and the flag rates at equal
    held-out recall (``frontier``, :func:`~safetyneurons.probes.readout_metrics.frontier`)."""
    def equal_recall(name: str) -> str:
        f = next((f for f in (frontier or {}).get(name, []) if abs(f["recall_target"] - README_RECALL) < 1e-9), None)
        return "-" if f is None else _flag_pair(f)

    keep = [r for r in rows if r[3] is True or r[0] in README_VARIANTS]
    return [[r[0], None if r[7] is None else f"{r[7]:.3f}", *(_pct(v) for v in (r[9], r[10], r[11], r[12])),
             equal_recall(r[0])] for r in keep]


def readme_tables(report: dict, name: str = "deployed guard") -> list[dict]:
    """The README's by-length and rephrasing tables of ``name`` (the guard as it ships), one row per measure."""
    out = []
    buckets = report.get("length_buckets", {}).get(name)
    if buckets:
        out.append({"title": f"Held-out by content tokens ({name}; benign / harmful prompts in each):",
                    "columns": ["tokens"] + [f"{b['bucket']} ({b['n_benign']} / {b['n_harmful']})" for b in buckets],
                    "rows": [["benign flagged"] + [_pct(b["benign_flag_rate"]) for b in buckets],
                             ["harmful recall"] + [_pct(b["harmful_recall"]) for b in buckets]]})
    rows = report.get("rephrase", {}).get(name)
    if rows:
        out.append({"title": f"Verdicts kept when held-out prompts are rewritten by rule ({name}; rewrites):",
                    "columns": ["rule"] + [f"{r['rule']} ({r['n']})" for r in rows],
                    "rows": [["kept"] + [_pct(r["kept"]) for r in rows]]})
    return out


def _md_table(columns: list[str], rows: list[list], pct_from: int) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [str(c) if i < pct_from else (f"{c:.3f}" if "AUROC" in columns[i] else _pct(c))
                 for i, c in enumerate(row)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def choice_notes(report: dict) -> list[str]:
    """What the rules of docs/guard_quality.md picked beyond the readout: the guard's classifier and its piece
    margin (each a sentence; none when the report has no such figures)."""
    c, out = report["choice"], []
    if c.get("classifier"):
        out.append(f"Between logistic regression and the RBF SVM as the neuron probe of the guard with words, read as "
                   f"served, the rule picks `{c['classifier']}`.")
    if c.get("content_words") is not None:
        out.append(f"Between all words and content words only (English stop words left out) in the SVM guard's "
                   f"words, the rule picks {'content words' if c['content_words'] else 'all words'}.")
    if "piece_margin" in c:
        out.append(f"Piece margin of the deployed guard: the rule picks {c['piece_margin']:g} "
                   f"({report['piece_margin']['reason']}).")
    return out


def margin_rows(report: dict) -> list[list]:
    out = []
    for r in report.get("piece_margin", {}).get("rows", []):
        v, h = r["val"], r["heldout"]
        out.append([f"{r['margin']:g}", v["recall"], v["composition"]["recall"], v["flag_hard_negative"], h["auroc"],
                    h["recall"], h["flag_ordinary_benign"], h["flag_hard_negative"], h["composition"]["recall"]])
    return out


def render(report: dict) -> str:
    c = report["choice"]
    lines = ["# Readout comparison", "",
             f"Run `{report['run']}` (guard `{report['guard_id'][:12]}`), splits `{report['splits']}`. Every threshold "
             "flags at most 5% of the validation benign prompts; the rule is in docs/guard_quality.md.", "",
             f"**Chosen by the rule: `{c['chosen']}`** ({c['reason']}). With every row eligible the rule would pick "
             f"`{c['would_win']}`; with the words added to the guard's neurons eligible too, `{c.get('with_words')}`.",
             *[x for note in choice_notes(report) for x in ("", note)], "", "## Variants", ""]
    lines += _md_table(COLUMNS, table_rows(report), 4) + ["", "## Composition recall by cell (held-out)", ""]
    cells = list(report["variants"][0]["heldout"]["composition"]["cells"])
    lines += _md_table(["variant"] + cells, [[r["name"]] + [r["heldout"]["composition"]["cells"][k] for k in cells]
                                            for r in report["variants"]], 1)
    lines += ["", "## Composition recall by cell (validation)", ""]
    lines += _md_table(["variant"] + cells, [[r["name"]] + [r["val"]["composition"]["cells"][k] for k in cells]
                                            for r in report["variants"]], 1)
    if report.get("piece_margin"):
        lines += ["", "## Piece margin of the deployed guard", "",
                  "A piece other than the whole message (a window, a sentence) decides only when its summed logit "
                  "less the margin is the highest; each margin gets its own threshold (5% validation FPR). The "
                  "rule (docs/guard_quality.md) reads the validation columns only.", ""]
        lines += _md_table(MARGIN_COLUMNS, margin_rows(report), 1)
    lines += ["", "## k of the agreement readout (validation)", ""]
    lines += _md_table(["k", "val recall@t", "val composition recall"],
                       [[r["k"], r["val_recall"], r["val_composition_recall"]] for r in report["k_table"]], 1)
    if report.get("frontier"):
        targets = [f"{f['recall_target']:.0%}" for f in next(iter(report["frontier"].values()))]
        lines += ["", "## Held-out frontier: flag rates at equal recall", "",
                  "Each readout's threshold set, on the held-out prompts themselves, to the recall of each column: "
                  "ordinary benign / hard negatives flagged. It describes the trade-off a readout allows; it is "
                  "not an operating point.", ""]
        lines += _md_table(["variant"] + [f"recall {t}" for t in targets],
                           [[n] + [_flag_pair(f) for f in fs] for n, fs in report["frontier"].items()], 99)
    for name, buckets in report["length_buckets"].items():
        lines += ["", f"## Held-out by content-token length: `{name}`", ""]
        lines += _md_table(["tokens", "benign n", "harmful n", "benign flagged", "harmful recall"],
                           [[b["bucket"], b["n_benign"], b["n_harmful"], b["benign_flag_rate"], b["harmful_recall"]]
                            for b in buckets], 3)
    for name, rows in report["rephrase"].items():
        lines += ["", f"## Rephrasing stability (held-out, verdicts kept): `{name}`", ""]
        lines += _md_table(["rule", "n", "kept", "kept (harmful)", "kept (benign)"],
                           [[r["rule"], r["n"], r["kept"], r["kept_harmful"], r["kept_benign"]] for r in rows], 2)
    lines += ["", "## README examples (unsafe probability; flagged when >= the variant's threshold)", ""]
    ex = report["examples"]
    texts = [e["text"] for e in next(iter(report["explain"].values()))] if report.get("explain") else []
    lines += _md_table(["variant", "threshold"] + [f"`{t}`" for t in texts],
                       [[n, f"{e['threshold']:.3f}"] + [f"{s:.3f}" for s in e["scores"]] for n, e in ex.items()], 99)
    lines += _explain_lines(report)
    return "\n".join(lines) + "\n"


def _explain_lines(report: dict) -> list[str]:
    """Why each README example scores as it does: per-token logits of the mean probe, top neurons."""
    lines = ["", "## Why: per-token logits and the neurons contributing most (mean over content tokens)", ""]
    for name, rows in report.get("explain", {}).items():
        for e in rows:
            toks = " ".join(f"`{t}` {l:+.1f}" for t, l in e["tokens"])
            top = ", ".join(f"L{n['layer']}#{n['index']} {n['contribution']:+.2f}" for n in e["top_neurons"][:5])
            lines.append(f"- `{name}` on `{e['text']}` (p = {e['unsafe_probability']:.4f}): tokens {toks}; "
                         f"top neurons (logit contribution) {top}")
    return lines


def write_readouts(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "readouts.json", json_safe(report))
    atomic_write_text(out / "readouts.md", render(report))


def write_benchmark(report: dict, path: Path, command: str) -> None:
    """The comparison as a docs/benchmarks JSON (the project's schema) and its markdown table beside it."""
    c = report["choice"]
    where = provenance()
    bench = {"benchmark": "readouts", "title": "Where the guard's probe reads: readout variants side by side",
             "command": command, "code_version": where["code_version"], "machine": where["machine"],
             "artifact": {"guard_id": report["guard_id"], "path": report["run"]},
             "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
             "columns": COLUMNS, "rows": table_rows(report),
             "readme": {"columns": README_COLUMNS, "rows": readme_rows(table_rows(report), report.get("frontier")),
                        "tables": readme_tables(report)},
             "notes": [f"Chosen by the pre-registered rule (docs/guard_quality.md): {c['chosen']} ({c['reason']}).",
                       f"With every row eligible the same rule picks {c['would_win']}; with the neurons + TF-IDF "
                       f"as served eligible too (whether the guard adds the words), {c.get('with_words')}.",
                       *choice_notes(report),
                       "Thresholds: at most 5% false positives on the validation benign prompts; held-out figures "
                       "are never used to choose.",
                       f"Compositions: {report['n_compose_per_cell']} harmful prompts per cell (start/middle/end x "
                       "64/256/1024 tokens) inside benign text of the same split."]}
    atomic_write_json(path, json_safe(bench))
    md = [f"# {bench['title']}", "", f"`{command}` (code {bench['code_version']}, {bench['date']})", ""]
    md += _md_table(COLUMNS, bench["rows"], 4) + [""] + [f"- {n}" for n in bench["notes"]]
    # every other table of the comparison (cells, k, length buckets, rephrasing, examples), as readouts.md has them
    details = render(report).split("\n## Variants\n", 1)[1].split("\n## ", 1)
    md += [""] + (["## " + details[1].rstrip("\n")] if len(details) == 2 else [])
    atomic_write_text(path.with_suffix(".md"), "\n".join(md) + "\n")
