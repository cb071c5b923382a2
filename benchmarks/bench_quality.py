"""Probe quality on the default data: the feature-set table and the selection-variant table, per setting.

For each setting (``reference``: hook point mlp_out, content positions, mean pooling over the user's message;
``paper``: mlp_neurons, completion tokens written by the base model, last prompt token) this script finds
the safety neurons of the default pair (base vs its aligned twin, change scores on the harmful prompts of
the contrast split, top ``--top-percent``%), extracts all-neuron activation stores of the train / test (and held-out, when the splits have one) prompts, and trains and scores every feature set
(safety, PCA, all, the random layer-matched / global and magnitude controls, text, length) with both
classifiers. It prints the table of test metrics, the safety set against each control (AUROC difference,
rank p-value) and, when there is a held-out split, the held-out table and controls.

Then the **selection-variant table** (``--variants``, see :mod:`safetyneurons.probes.variants`): the safety neurons
chosen by raw RMS (the paper), relative change RMS(change)/RMS(base) and harmful-minus-benign (which also
contrasts the benign part of the contrast split), each probed on the same stores against its controls (random
layer-matched, random global, magnitude): per variant the neuron count, the deepest layer, the safety probe's
test AUROC, each control's AUROC and the safety-minus-control difference with its 95% CI, then the layer
distribution and the Jaccard overlap of the variants.

With ``--curve`` it also prints the **cost-quality curve** of early exit: for a layer budget L (the deepest layer
the model runs; ``neurons.select(..., max_layer=L)``, same neuron count) the test and held-out AUROC of the
safety-neuron probe (``--curve-classifier``), and the one-prompt latency of pooling those neurons with early
exit (plus the probe) against a full forward pass of the model, p50 over ``--curve-prompts`` test prompts timed
alternately. It marks the smallest budget that keeps the test AUROC within 0.005 of the unconstrained set and
whether it meets <= 0.6x the full pass; that is the candidate for the default guard.

With ``--run DIR`` it reuses a finished ``safetyneurons run`` (its change scores, benign change scores and stores)
and prints only the variant table and, with ``--curve``, the curve, for that run's setting (the run's own report
already holds the feature-set tables).

Needs the default twin (built on first use, slow) and the default splits. Keep runs small with the limits::

    python benchmarks/bench_quality.py --limit-train 200 --limit-test 100 --limit-heldout 100 \
        [--settings reference,paper] [--aligned REF] [--features-from base|aligned] [--out DIR] \
        [--curve [--curve-layers 9,14,19,24] [--curve-classifier logreg] [--curve-prompts 32]]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from safetyneurons.probes.compare import DEFAULT_FEATURE_SETS, DEFAULT_RANDOM_DRAWS

SETTINGS = {"reference": {"hook_point": "mlp_out", "positions": "content", "pooling": "mean"},
            "paper": {"hook_point": "mlp_neurons", "positions": "completion", "pooling": "last"}}


def stratified(records, limit, seed):
    import numpy as np

    if not limit or limit >= len(records):
        return list(records)
    rng = np.random.default_rng(seed)
    by = {0: [r for r in records if int(r["label"]) == 0], 1: [r for r in records if int(r["label"]) == 1]}
    take = {1: round(limit * len(by[1]) / len(records))}
    take[0] = limit - take[1]
    out = []
    for lab, rs in by.items():
        idx = sorted(rng.choice(len(rs), size=min(take[lab], len(rs)), replace=False).tolist())
        out += [rs[i] for i in idx]
    order = {r["id"]: k for k, r in enumerate(records)}
    return sorted(out, key=lambda r: order[r["id"]])


def _latency_ratio(lm, probe, ns, prompts, hp, pooling, max_length) -> float:
    """p50 one-prompt latency of (early-exit pooling of ``ns`` + probe) / a full forward pass (LM head on)."""
    import numpy as np
    import torch

    from safetyneurons.activations.reader import pooled_features

    def full(p):
        enc = lm.encode([p], max_length=max_length)
        with torch.inference_mode():
            lm.model(**{k: v.to(lm.device) for k, v in enc.items()}).logits.float().sum().item()

    def ours(p):
        probe.unsafe_probability(pooled_features(lm, [p], hp, pooling, neuron_set=ns, batch_size=1, max_length=max_length))

    for p in prompts[:2]:
        full(p), ours(p)
    t_full, t_ours = [], []
    for k, p in enumerate(prompts):
        pair = [(ours, t_ours), (full, t_full)][:: -1 if k % 2 else 1]  # alternate which runs first
        for fn, sink in pair:
            t0 = time.perf_counter()
            fn(p)
            sink.append(time.perf_counter() - t0)
    return float(np.median(t_ours) / np.median(t_full))


def cost_quality_curve(args, scores, stores, lm, hp, pooling) -> list[dict]:
    """Test / held-out AUROC and latency of the safety-neuron probe against the deepest layer run."""
    from safetyneurons.probes.metrics import auroc
    from safetyneurons.neurons.selection import select
    from safetyneurons.probes.probe import Probe

    full = select(scores, top_percent=args.top_percent)
    n_layers = scores.num_layers
    if args.curve_layers:
        budgets = [int(x) for x in args.curve_layers.split(",")]
    else:
        budgets = sorted({max(0, round(n_layers * f) - 1) for f in (0.2, 0.33, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95)})
    budgets = sorted({b for b in budgets if b < full.deepest_layer} | {full.deepest_layer})
    tr, te, ho = stores["train"], stores["test"], stores.get("heldout")
    timing_prompts = te.prompts[: args.curve_prompts]
    rows = []
    for budget in budgets:
        try:
            ns = select(scores, top_percent=args.top_percent, max_layer=budget)
        except Exception as e:  # too few neurons up to this layer for the count
            print(f"  max layer {budget}: skipped ({e})", file=sys.stderr)
            continue
        probe = Probe(args.curve_classifier, seed=args.seed).fit(tr.select(ns), tr.labels)
        row = {"max_layer": budget, "layers_run": ns.deepest_layer + 1, "neurons": len(ns),
               "test_auroc": auroc(te.labels, probe.unsafe_probability(te.select(ns))),
               "heldout_auroc": auroc(ho.labels, probe.unsafe_probability(ho.select(ns))) if ho is not None else None,
               "latency_ratio": _latency_ratio(lm, probe, ns, timing_prompts, hp, pooling, args.max_length)}
        rows.append(row)
        print(f"  max layer {budget}: {row}", file=sys.stderr)
    best = rows[-1]["test_auroc"]  # the unconstrained set (its own deepest layer)
    print(f"\ncost-quality curve ({args.curve_classifier} on the top {args.top_percent}% safety neurons; "
          f"{n_layers} layers; latency p50 over {len(timing_prompts)} one-prompt calls vs a full forward pass)\n")
    print("| deepest layer run | neurons | test AUROC | vs unconstrained | held-out AUROC | latency vs full pass |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        held = f"{r['heldout_auroc']:.4f}" if r["heldout_auroc"] is not None else "-"
        print(f"| {r['max_layer']} | {r['neurons']} | {r['test_auroc']:.4f} | {r['test_auroc'] - best:+.4f} | "
              f"{held} | {r['latency_ratio']:.2f}x |")
    ok = [r for r in rows if r["test_auroc"] >= best - 0.005]
    pick = min(ok, key=lambda r: r["max_layer"])
    verdict = "meets" if pick["latency_ratio"] <= 0.6 else "misses"
    print(f"\nsmallest budget within 0.005 test AUROC of the unconstrained set: max layer {pick['max_layer']} "
          f"({pick['latency_ratio']:.2f}x a full pass; {verdict} the <= 0.6x goal)")
    return rows


def variant_table(args, name, scores, benign_scores, stores, out):
    """Select the safety neurons with each variant, probe each against its controls, print the tables."""
    import json

    from safetyneurons.probes.compare import compare_feature_sets
    from safetyneurons.probes.variants import compare_variants, selection_variants, variants_markdown

    sets, skipped = selection_variants(scores, benign_scores, args.top_percent, names=args.variants.split(","))
    rows, table = [], []
    for v, ns in sets.items():
        res = compare_feature_sets(stores["train"], stores["test"], ns, classifiers=args.classifiers,
                                   feature_sets="safety," + args.variant_controls, random_draws=args.random_draws,
                                   seed=args.seed, n_boot=args.bootstrap, progress=False)
        for clf in args.classifiers.split(","):
            safety = res.run("safety", clf).metrics["auroc"]
            cells = []
            for kind in args.variant_controls.split(","):
                d = res.report["safety_vs_controls"].get(kind, {}).get(clf)
                cells.append(f"{d['control_auroc']:.4f} / {d['diff']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"
                             if d else "n/a")
            rows.append({"variant": v, "classifier": clf, "neurons": len(ns), "deepest_layer": ns.deepest_layer,
                         "safety_auroc": safety, "controls": res.report["safety_vs_controls"]})
            table.append(f"| {v} | {clf} | {len(ns)} | {ns.deepest_layer} | {safety:.4f} | " + " | ".join(cells) + " |")
    kinds = args.variant_controls.split(",")
    print(f"\n### selection variants, {name} setting (top {args.top_percent}%; test split)\n")
    print("| variant | classifier | neurons | deepest layer | safety AUROC | "
          + " | ".join(f"{k}: AUROC / safety - {k} [95% CI]" for k in kinds) + " |")
    print("|---|---|---:|---:|---:|" + "---|" * len(kinds))
    print("\n".join(table))
    if sets:
        cmp = compare_variants(sets)
        print("\nlayer distribution (layers holding any selected neuron) and overlap:\n")
        print(variants_markdown(cmp))
    for v, why in skipped.items():
        print(f"{v}: skipped ({why})")
    (out / name).mkdir(parents=True, exist_ok=True)
    (out / name / "variants.json").write_text(json.dumps(
        {"comparison": compare_variants(sets) if sets else {}, "skipped": skipped, "rows": rows}, indent=1,
        default=float))


def from_run(args) -> None:
    """The selection-variant table and the cost-quality curve of a finished run (no new contrast or extraction)."""
    import json

    from safetyneurons.neurons.contrast import ChangeScores
    from safetyneurons.model.pair import DEFAULT_ALIGNED, DEFAULT_BASE, load_model
    from safetyneurons.activations.store import Store

    run = Path(args.run)
    settings = json.loads((run / "settings.json").read_text())
    scores = ChangeScores.load(run / "contrast")
    benign = run / "contrast" / "benign"
    benign_scores = ChangeScores.load(benign) if benign.is_dir() else None
    stores = {n: Store.load(run / "store" / n) for n in ("train", "test", "heldout") if (run / "store" / n).is_dir()}
    name = f"run {run} ({settings['hook_point']}, {settings['positions']} positions, {settings['pooling']} pooling)"
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_quality_"))
    print(f"{name}: " + ", ".join(f"{n} {len(st)}" for n, st in stores.items()) + f"; output {out}", file=sys.stderr)
    t0 = time.perf_counter()
    if args.variants:
        variant_table(args, "run", scores, benign_scores, stores, out)
    if args.curve:
        feature_model = (settings.get("base") or DEFAULT_BASE if settings.get("features_from", "base") == "base"
                         else settings.get("aligned") or DEFAULT_ALIGNED)
        lm = load_model(feature_model)
        cost_quality_curve(args, scores, stores, lm, settings["hook_point"], settings["pooling"])
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; output under {out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="reference,paper")
    ap.add_argument("--base", default=None, help="base model ref (default: pair.DEFAULT_BASE)")
    ap.add_argument("--aligned", default=None, help="aligned model ref (default: the default twin)")
    ap.add_argument("--features-from", choices=("base", "aligned"), default="base")
    ap.add_argument("--splits", default=None, help="splits directory (default: the default splits)")
    ap.add_argument("--limit-contrast", type=int, default=0, help="harmful contrast prompts (0: all)")
    ap.add_argument("--limit-train", type=int, default=0, help="train prompts, stratified (0: all)")
    ap.add_argument("--limit-test", type=int, default=0)
    ap.add_argument("--limit-heldout", type=int, default=0)
    ap.add_argument("--top-percent", type=float, default=5.0)
    ap.add_argument("--classifiers", default="svm,logreg")
    ap.add_argument("--feature-sets", default=",".join(DEFAULT_FEATURE_SETS))
    ap.add_argument("--random-draws", type=int, default=DEFAULT_RANDOM_DRAWS)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="keep stores and reports here (default: a temp dir)")
    ap.add_argument("--variants", default="rms,relative,harmful_minus_benign",
                    help="selection variants compared side by side ('' to skip the variant table)")
    ap.add_argument("--variant-controls", default="random,random_global,magnitude",
                    help="controls each variant is probed against")
    ap.add_argument("--completion-from", choices=("base", "aligned"), default="base",
                    help="who writes the answers for the paper setting's completion positions")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--curve", action="store_true", help="also print the early-exit cost-quality curve")
    ap.add_argument("--curve-layers", default=None, help="comma list of layer budgets (default: ~8 spread out)")
    ap.add_argument("--curve-classifier", choices=("logreg", "svm"), default="logreg")
    ap.add_argument("--curve-prompts", type=int, default=32, help="test prompts timed per budget")
    ap.add_argument("--run", default=None, metavar="DIR",
                    help="reuse a finished `safetyneurons run` directory (its change scores, benign change scores "
                         "and stores) instead of contrasting and extracting again; prints the variant table and "
                         "(with --curve) the curve for that run's setting, without the feature-set table")
    args = ap.parse_args()
    if args.run:
        return from_run(args)

    from safetyneurons.data import splits as data_mod
    from safetyneurons.neurons.contrast import contrast
    from safetyneurons.neurons.selection import select
    from safetyneurons.model.pair import DEFAULT_BASE, check_symmetry, load_model
    from safetyneurons.probes.compare import compare_feature_sets, score_store
    from safetyneurons.probes.report import controls_section, results_table, write_report
    from safetyneurons.activations.store import extract

    t_start = time.perf_counter()
    splits = Path(args.splits) if args.splits else data_mod.default_splits_dir(seed=args.seed)
    recs = {n: data_mod.read_records(splits / f"{n}.jsonl") for n in ("contrast", "train", "test", "heldout")
            if (splits / f"{n}.jsonl").is_file()}
    limits = {"train": args.limit_train, "test": args.limit_test, "heldout": args.limit_heldout}
    for n, lim in limits.items():
        if n in recs:
            recs[n] = stratified(recs[n], lim, args.seed + len(n))
    harmful = [r["prompt"] for r in recs["contrast"] if int(r["label"]) == 1]
    benign = [r["prompt"] for r in recs["contrast"] if int(r["label"]) == 0]
    if args.limit_contrast:
        harmful, benign = harmful[: args.limit_contrast], benign[: args.limit_contrast]

    base_ref = args.base or DEFAULT_BASE
    if args.aligned:
        aligned_ref = args.aligned
    else:
        from safetyneurons.twin import ensure_default_twin

        aligned_ref = str(ensure_default_twin(progress=True))
    base, aligned = load_model(base_ref), load_model(aligned_ref)
    check_symmetry(base, aligned)
    feat_lm = base if args.features_from == "base" else aligned
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_quality_"))
    print(f"splits {splits}; prompts: contrast {len(harmful)} harmful, "
          + ", ".join(f"{n} {len(r)}" for n, r in recs.items() if n != "contrast")
          + f"; features from {args.features_from} ({feat_lm.ref}); output {out}", file=sys.stderr)

    summary = []
    for name in args.settings.split(","):
        cfg = SETTINGS[name]
        hp, pooling = cfg["hook_point"], cfg["pooling"]
        t0 = time.perf_counter()
        kw = dict(hook_point=hp, positions=cfg["positions"], completion_from=args.completion_from,
                  max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, max_length=args.max_length,
                  progress=True)
        scores = contrast(base, aligned, harmful, **kw)
        ns = select(scores, top_percent=args.top_percent)
        stores = {n: extract(feat_lm, recs[n], out / name / "store" / n, hook_point=hp, pooling=pooling,
                             batch_size=args.batch_size, max_length=args.max_length, progress=True,
                             data_info={"split": n, "splits_dir": str(splits)})
                  for n in ("train", "test", "heldout") if n in recs}
        res = compare_feature_sets(stores["train"], stores["test"], ns, classifiers=args.classifiers,
                                   feature_sets=args.feature_sets, random_draws=args.random_draws, seed=args.seed,
                                   n_boot=args.bootstrap, progress=True)
        report = write_report(res, out / name / "report")
        print(f"\n## {name}: hook point {hp}, {pooling} pooling, {len(ns)} safety neurons "
              f"(top {args.top_percent}%, deepest layer {ns.deepest_layer}); train {len(stores['train'])}, "
              f"test {len(stores['test'])} prompts; {time.perf_counter() - t0:.0f} s\n")
        print(results_table(report["results"]))
        print(controls_section(report))
        if "heldout" in stores:
            h = stores["heldout"]
            held = score_store(res, h, n_boot=args.bootstrap, seed=args.seed)
            print(f"\nheld-out sources ({len(h)} prompts, {int(h.labels.sum())} unsafe):\n")
            print(results_table(held["results"]))
            print(controls_section(report, held["safety_vs_controls"], sets=False))
        if args.variants:
            benign_scores = contrast(base, aligned, benign, **kw) if benign else None
            variant_table(args, name, scores, benign_scores, stores, out)
        if args.curve:
            cost_quality_curve(args, scores, stores, feat_lm, hp, pooling)
        summary.append((name, report))
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; reports under {out}")


if __name__ == "__main__":
    main()
