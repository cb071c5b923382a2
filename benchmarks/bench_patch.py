"""Dynamic activation patching cost on the default model, against plain greedy generation of the base model;
and the one causal table of the project from patch runs.

    python benchmarks/bench_patch.py [--per-class 8] [--random-sets 5] [--scores runs/default/contrast]
                                     [--directions sufficiency,necessity] [--threads 2]
    python benchmarks/bench_patch.py --table runs/causal-default/patch.json runs/causal-paper/patch/patch.json
                                     [--command "..."]   # writes docs/benchmarks/causal.json and causal.md
    python benchmarks/bench_patch.py --readme   # recomputes only causal.json's README table from its rows

The table: one row per set x hook point x direction (the unpatched receiver and donor, the safety set, its part
outside saturated layers, the layer- and change-matched random sets as the mean of their draws, the refusal
direction, mean patching, zero ablation), with the phrase judge's rates, the refusal score, the degenerate share,
the perplexity ratio, the causal effect, and for each control the paired bootstrap (safety - control) with its 95%
interval and p on the judge's refusal and on the refusal score. A run without the direction baseline borrows the
direction rows of another run in the table (the direction does not depend on the hook point).

Aligned model: the default twin (`twin:default`) when it has been built, else a copy of the base with every
weight perturbed by seeded Gaussian noise (1% of each tensor's std); the output says which. Neurons: the top 5%
of the change scores in --scores when given (e.g. runs/default/contrast), else 5% of the `mlp_out` neurons drawn
with the layer profile of the README's default run (most in the last layers).
Prompts: the first --per-class harmful and benign prompts of the default `test` split (fixed hash order).

Baseline (same run, same prompts): Hugging Face `generate`, greedy, 32 new tokens, batches of --batch-size,
for the base model. Then `causal.run_patch` (both directions, --random-sets layer- and change-matched sets, mean
and zero baselines, perplexity; no refusal direction) on the same prompts. Prints both times, their ratio, the
patch run's own split, and the time the default slice (200 + 100 prompts) would take at the measured rate.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import numpy as np
import torch


def load_aligned(base, pair):
    from safetyneurons.errors import UserError

    try:
        return pair.load_model(pair.DEFAULT_ALIGNED), "default twin (twin:default)"
    except (UserError, ImportError) as e:
        print(f"[bench] default twin unavailable ({str(e)[:100]}...); using a perturbed copy of the base",
              file=sys.stderr)
    model = copy.deepcopy(base.model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.01 * p.float().std().to(p.dtype))
    return pair.from_objects(model, base.tokenizer, ref="perturbed-copy-of-base"), "copy of the base, 1% weight noise"


def neurons_for(base, scores_dir):
    from safetyneurons.neurons.contrast import ChangeScores
    from safetyneurons.model.hooks import hook_width, num_layers
    from safetyneurons.neurons.selection import select

    if scores_dir:
        return ChangeScores.load(scores_dir), f"change scores in {scores_dir}"
    layers, width = num_layers(base.model), hook_width(base.model, "mlp_out")
    rng = np.random.default_rng(0)
    profile = np.linspace(0.05, 1.0, layers) ** 6  # concentrated in the last layers, as in the default run
    scores = rng.random((layers, width)) * profile[:, None]
    return select(scores, top_percent=5, hook_point="mlp_out"), "synthetic 5% of mlp_out, late-layer profile"


@torch.no_grad()
def hf_generate(lm, prompts, batch_size, tokens):
    from transformers import GenerationConfig

    from safetyneurons.causal.patch import stop_token_ids

    config = GenerationConfig(do_sample=False, max_new_tokens=tokens, eos_token_id=stop_token_ids(lm),
                              pad_token_id=lm.tokenizer.pad_token_id)
    for start in range(0, len(prompts), batch_size):
        enc = lm.encode(prompts[start:start + batch_size], padding_side="left")
        lm.model.generate(**enc, generation_config=config)


TABLE_COLUMNS = ["hook point", "direction", "k %", "set", "neurons", "refuses harmful (judge) %",
                 "answers benign (judge) %",
                 "refusal score (harmful)", "degenerate %", "perplexity ratio", "effect on refusal (judge)",
                 "safety - this: judge refusal D", "95% CI (judge)", "p (judge)", "safety - this: refusal score D",
                 "95% CI (score)", "p (score)"]
TABLE_SETS = [("safety", "safety neurons"), ("safety_matched", "safety neurons outside saturated layers"),
              ("layer_matched", "layer-matched random (mean of draws)"),
              ("change_matched", "change-matched random (mean of draws)"),
              ("change_scaled", "change-matched random, effect / change ratio"), ("direction", "refusal direction"),
              ("mean", "mean patching of the safety set"), ("zero", "zero ablation of the safety set")]


def _r(v, digits=3, pct=False):
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return None
    return round(100 * v, 1) if pct else round(float(v), digits)


def _test_cells(test):
    if not test or test.get("estimate") is None:
        return [None, None, None]
    return [_r(test["estimate"]), [_r(test["ci95"][0]), _r(test["ci95"][1])], float(f"{test['p_value']:.3g}")]


def table_rows(result: dict, borrowed_direction: dict | None = None) -> tuple[list[list], list[str]]:
    """Rows of one patch run (each direction and k) and its notes."""
    rows, notes = [], []
    hp = result["hook_point"]
    for r in result["results"]:
        direction = r["direction"]
        receiver, donor = ("base", "aligned") if direction == "sufficiency" else ("aligned", "base")
        for who in (receiver, donor):
            m = result["unpatched"][who]
            rows.append([hp, direction, r["k"], f"{who} unpatched ({'receiver' if who == receiver else 'donor'})", None,
                         _r(m["refusal_rate"], pct=True), _r(m["answer_rate"], pct=True), _r(m["refusal_score"]),
                         _r(m["degenerate_rate"], pct=True), _r(m["perplexity_ratio_to_base"]), None,
                         None, None, None, None, None, None])
        baselines = dict(r["baselines"])
        tests = dict(r["tests"])
        if "direction" not in baselines and borrowed_direction and direction in borrowed_direction:
            # the rates of the run that computed the direction; its paired test compared it with that run's
            # safety set on that run's prompts, not with this one's, so no test is shown here
            baselines["direction"] = borrowed_direction[direction][0]
            tests.pop("direction", None)
        metrics = {"safety": r["safety"], "safety_matched": r.get("safety_matched"), **r["controls"], **baselines}
        metrics["change_scaled"] = r["controls"].get("change_matched")
        counts = {"safety": r["n_neurons"], "safety_matched": r["n_matched"], "layer_matched": r["n_matched"],
                  "change_matched": r["n_matched"], "change_scaled": r["n_matched"], "mean": r["n_neurons"],
                  "zero": r["n_neurons"]}
        for name, label in TABLE_SETS:
            m = metrics.get(name)
            if not m:
                continue
            test = tests.get(name, {})
            rows.append([hp, direction, r["k"], label, counts.get(name), _r(m["refusal_rate"], pct=True),
                         _r(m["answer_rate"], pct=True), _r(m["refusal_score"]), _r(m["degenerate_rate"], pct=True),
                         _r(m["perplexity_ratio_to_base"]), _r(m.get("effect_refusal_rate")),
                         *_test_cells(test.get("refusal")), *_test_cells(test.get("refusal_score"))])
        if r["saturated_layers"]:
            notes.append(f"{hp}, k = {r['k']:g}%: the safety set saturates layer(s) {r['saturated_layers']} "
                         f"(holds more than half of their neurons); the layer- and change-matched controls are drawn "
                         f"for, and tested against, the other {r['n_matched']} safety neurons, never spilled.")
        ratio = r["controls"].get("change_matched", {}).get("change_ratio")
        if ratio and direction == "sufficiency":
            notes.append(f"{hp}, k = {r['k']:g}%: the change-matched draws carry {min(ratio):.2f}-{max(ratio):.2f} "
                         f"of the matched safety neurons' summed change score.")
        survived = [c for c, by in r["survives"].items() if by.get("refusal")]
        notes.append(f"{hp} {direction} k = {r['k']:g}%: the safety effect on the judge's refusal is declared (95% "
                     f"interval above 0) against: {', '.join(survived) or 'none of the controls'}.")
    return rows, notes


README_SETS = tuple(label for _, label in TABLE_SETS)  # every patched set; the unpatched models stay in causal.md
SCALED = dict(TABLE_SETS)["change_scaled"]
README_COLUMNS = ("hook point", "direction", "set", "refuses harmful (judge) %", "effect on refusal (judge)",
                  "refusal score (harmful)", "degenerate %", "perplexity ratio", "safety - this, judge: D [95% CI] p",
                  "safety - this, refusal score: D [95% CI] p")


def _test_text(d, ci, p) -> str | None:
    """One cell for a paired test: ``D [lo, hi] p``; None where the row has no test."""
    return None if d is None else f"{d:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}] p {p:.3g}"


def readme_table(rows: list[list]) -> dict:
    """The README's table: per hook point and direction, the safety set, its part outside saturated layers, the
    matched controls, the change-matched test with effects scaled by the change ratio (its own D only: the draws'
    measured cells are in the row above), the refusal direction once per direction (the row that carries a paired
    test: it does not depend on the hook point) and the mean / zero baselines; both refusal measures, the causal
    effect (share of the receiver-donor gap closed), the degenerate share, the perplexity ratio and the paired test
    of safety - each control on both measures."""
    col = {c: TABLE_COLUMNS.index(c) for c in TABLE_COLUMNS}
    measured = ("refuses harmful (judge) %", "effect on refusal (judge)", "refusal score (harmful)", "degenerate %",
                "perplexity ratio")
    out = []
    for r in rows:
        label = r[col["set"]]
        if label not in README_SETS:
            continue
        tests = [_test_text(r[col[f"safety - this: {m} D"]], r[col[f"95% CI ({short})"]], r[col[f"p ({short})"]])
                 for m, short in (("judge refusal", "judge"), ("refusal score", "score"))]
        cells = [None if label == SCALED else r[col[c]] for c in measured]
        out.append([r[col["hook point"]], r[col["direction"]], label, *cells, *tests])
    keep = {}  # direction -> the index of its one refusal-direction row: the first with a test, else the first
    for i, row in enumerate(out):
        if row[2] == "refusal direction":
            j = keep.setdefault(row[1], i)
            if out[j][-2:] == [None, None] and row[-2:] != [None, None]:
                keep[row[1]] = i
    out = [row for i, row in enumerate(out) if row[2] != "refusal direction" or keep[row[1]] == i]
    return {"columns": list(README_COLUMNS), "rows": out}


def rewrite_readme(path: str = "docs/benchmarks/causal.json") -> None:
    """Recompute the ``readme`` table of an existing causal.json from its rows (nothing else changes)."""
    import json
    from pathlib import Path

    from safetyneurons._io import atomic_write_json

    doc = json.loads(Path(path).read_text())
    if doc.get("columns") != TABLE_COLUMNS:
        raise SystemExit(f"{path}: its columns are not this script's table columns; rebuild it with --table.")
    doc["readme"] = readme_table(doc["rows"])
    atomic_write_json(path, doc)
    print(f"rewrote the readme table of {path} ({len(doc['readme']['rows'])} rows)")


def write_table(paths, command=None) -> None:
    """docs/benchmarks/causal.json and causal.md from patch.json files (see the module doc)."""
    import json
    from datetime import datetime, timezone
    from pathlib import Path

    from safetyneurons.results.machine import provenance

    from safetyneurons._io import atomic_write_json, atomic_write_text

    results = [json.loads(Path(p).read_text()) for p in paths]
    borrowed = {}
    for res in results:
        for r in res["results"]:
            if "direction" in r["baselines"]:
                borrowed[r["direction"]] = (r["baselines"]["direction"], r["tests"]["direction"])
    rows, notes = [], []
    for res in results:
        got, more = table_rows(res, borrowed)
        rows += got
        notes += more
        s = res["settings"]
        notes.append(f"{res['hook_point']}: {res['data']['harmful']} harmful + {res['data']['benign']} benign test "
                     f"prompts, k = {', '.join(f'{k:g}' for k in s['k'])}%, {s['random_sets']} layer-matched and "
                     f"{s['change_sets']} change-matched draws, {s['max_new_tokens']} new tokens, {s['dtype']}; "
                     f"{res['timings']['total_s'] / 60:.1f} min ({res['timings']}).")
    notes.append("D = mean over harmful prompts of (safety effect - control effect) towards the donor (sufficiency: "
                 "more refusal, necessity: less); paired bootstrap over prompts and draws, 95% percentile interval, "
                 "two-sided p.")
    if not any("direction" in r["baselines"] for res in results for r in res["results"]) or len(results) > 1:
        notes.append("The refusal-direction rows come from the run that computed the direction (it acts on the "
                     "residual stream and does not depend on the hook point); in the other runs they show its rates "
                     "only: a paired test needs the same prompts.")
    where = provenance()  # patch runs record where they ran; older ones did not, and the table's code stands in
    unrecorded = sum(not r.get("code_version") for r in results)
    if unrecorded:
        notes.append(f"Code version: that of this table ({where['code_version']}); {unrecorded} of the patch runs "
                     f"do not record theirs.")
    else:
        where = {"code_version": ", ".join(sorted({str(r["code_version"]) for r in results})),
                 "machine": results[0].get("machine") or where["machine"]}
    d = results[0]["refusal_direction"] or {}
    doc = {"benchmark": "causal", "title": "Causal validation: dynamic activation patching against matched controls",
           "command": command or " ; ".join(f"(patch.json: {p})" for p in paths),
           "code_version": where["code_version"], "machine": where["machine"],
           "artifact": {"guard_id": None, "path": ", ".join(str(p) for p in paths)},
           "date": datetime.now(timezone.utc).date().isoformat(), "columns": TABLE_COLUMNS, "rows": rows,
           "readme": readme_table(rows), "notes": notes + ([f"Refusal direction: layer {d['layer']}, {d['rule']}."] if d else [])}
    Path("docs/benchmarks").mkdir(parents=True, exist_ok=True)
    atomic_write_json("docs/benchmarks/causal.json", doc)
    cell = lambda v: "" if v is None else (f"[{v[0]}, {v[1]}]" if isinstance(v, list) else str(v))  # noqa: E731
    md = [f"# {doc['title']}", "", f"`{doc['command']}` (code {doc['code_version']}, {doc['date']})", "",
          "| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    md += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    md += ["", *[f"- {n}" for n in doc["notes"]], ""]
    atomic_write_text("docs/benchmarks/causal.md", "\n".join(md))
    print(f"wrote docs/benchmarks/causal.json and causal.md ({len(rows)} rows)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=8)
    ap.add_argument("--random-sets", type=int, default=5)
    ap.add_argument("--table", nargs="+", default=None, metavar="PATCH_JSON")
    ap.add_argument("--command", default=None, help="the command(s) that produced the patch runs (--table)")
    ap.add_argument("--readme", action="store_true",
                    help="only recompute the README table of docs/benchmarks/causal.json from its rows")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--directions", default="sufficiency,necessity")
    ap.add_argument("--scores", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.table:
        write_table(args.table, args.command)
        return
    if args.readme:
        rewrite_readme()
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    from safetyneurons.model import pair
    from safetyneurons.causal.causal import PatchSettings, load_prompts, run_patch

    base = pair.load_model(pair.DEFAULT_BASE)
    aligned, what = load_aligned(base, pair)
    neurons, where = neurons_for(base, args.scores)
    harmful, benign, _ = load_prompts("split:test", args.per_class, args.per_class)
    prompts = harmful + benign
    print(f"aligned: {what}; neurons: {where}; {len(harmful)} + {len(benign)} prompts; threads "
          f"{torch.get_num_threads()}")

    t0 = time.perf_counter()
    hf_generate(base, prompts, 16, 32)
    baseline = time.perf_counter() - t0
    settings = PatchSettings(random_sets=args.random_sets, change_sets=args.random_sets, harmful=args.per_class,
                             benign=args.per_class, batch_size=args.batch_size, directions=args.directions)
    t0 = time.perf_counter()
    result = run_patch(base, aligned, neurons, harmful, benign, settings=settings, progress=False)
    patched = time.perf_counter() - t0
    print(f"baseline (HF generate, base model, 32 tokens): {baseline:.1f} s")
    print(f"patch run ({', '.join(settings.directions)}; {args.random_sets} layer- and change-matched sets each + "
          f"mean + zero): "
          f"{patched:.1f} s = {patched / baseline:.1f}x the baseline; split: {result['timings']}")
    scale = 300 / len(prompts)
    print(f"default slice (200 + 100 prompts) at this rate: {patched * scale / 60:.1f} min")


if __name__ == "__main__":
    main()
