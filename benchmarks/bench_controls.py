"""Cost of the neuron controls: 20 draws x 2 classifiers x 2 random controls, against one safety-probe fit.

Synthetic features shaped like the default run (SmolLM2-135M, mlp_out: 30 layers x 576 neurons, a safety set
of 864 neurons with 570 in the last layer), on the ``--quick`` split sizes by default (train 300, test 150).
It times, in one process:

- the baseline: fitting the safety probe (SVM + logreg, 5-fold CV for calibration and threshold);
- drawing the control sets (layer-matched with spill, global);
- fitting every draw with the safety probe's protocol (``control_cv`` = ``cv`` = 5, the default) and with
  one fit per draw (``control_cv=0``);
- the paired bootstrap (1000 resamples of prompts and draws) for every control and classifier.

    python benchmarks/bench_controls.py [--train 300] [--test 150] [--draws 20] [--features 864]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=300)
    ap.add_argument("--test", type=int, default=150)
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--cv", type=int, default=5)
    args = ap.parse_args()

    from safetyneurons.neurons.controls import random_global, random_layer_matched
    from safetyneurons.probes.metrics import paired_bootstrap_diff
    from safetyneurons.neurons.selection import NeuronSet
    from safetyneurons.probes.probe import Probe

    L, W = 30, 576
    rng = np.random.default_rng(0)
    n = args.train + args.test
    y = np.arange(n) % 2
    X = rng.normal(size=(n, L * W)).astype(np.float32)
    X[:, -2000:] += 0.15 * y[:, None]  # signal in the late layers, as in the default run
    per_layer = np.zeros(L, dtype=int)
    per_layer[29], per_layer[28], per_layer[27] = 570, 200, 94
    layers = np.repeat(np.arange(L), per_layer)
    indices = np.concatenate([rng.choice(W, c, replace=False) for c in per_layer if c])
    ns = NeuronSet(hook_point="mlp_out", num_layers=L, width=W, layers=layers, indices=indices,
                   scores=np.ones(len(layers)))
    tr, te = slice(0, args.train), slice(args.train, n)

    def fit_all(sets, cv):
        probas = {}
        for clf in ("svm", "logreg"):
            probas[clf] = []
            for s in sets:
                cols = s.flat_indices()
                p = Probe(clf, cv=cv).fit(X[tr][:, cols], y[tr])
                probas[clf].append(p.unsafe_probability(X[te][:, cols]))
        return probas

    t = time.perf_counter()
    safety = fit_all([ns], args.cv)
    base = time.perf_counter() - t
    t = time.perf_counter()
    controls = {"random": [random_layer_matched(ns, d, 0, num_layers=L, width=W) for d in range(args.draws)],
                "random_global": [random_global(ns, d, 0, num_layers=L, width=W) for d in range(args.draws)]}
    t_draw = time.perf_counter() - t
    timings, probas = {}, {}
    for cv in (args.cv, 0):
        t = time.perf_counter()
        probas[cv] = {k: fit_all(v, cv) for k, v in controls.items()}
        timings[cv] = time.perf_counter() - t
    t = time.perf_counter()
    for k in controls:
        for clf in ("svm", "logreg"):
            paired_bootstrap_diff(y[te], safety[clf][0], probas[args.cv][k][clf], n_boot=args.boot)
    t_boot = time.perf_counter() - t

    fits = 2 * 2 * args.draws
    print(f"train {args.train}, test {args.test}, {len(ns)} safety neurons (layer 29: {per_layer[29]} of {W}); "
          f"{args.draws} draws x 2 controls x 2 classifiers = {fits} fits\n")
    print("| step | seconds | x safety-probe fit (svm + logreg) |\n|---|---:|---:|")
    print(f"| safety probe, svm + logreg, cv {args.cv} (baseline) | {base:.2f} | 1.00 |")
    print(f"| draw the {2 * args.draws} control sets | {t_draw:.2f} | {t_draw / base:.2f} |")
    print(f"| fit all draws, control_cv {args.cv} (default) | {timings[args.cv]:.2f} | {timings[args.cv] / base:.2f} |")
    print(f"| fit all draws, control_cv 0 | {timings[0]:.2f} | {timings[0] / base:.2f} |")
    print(f"| paired bootstraps ({args.boot} resamples of prompts and draws), 4 of them | {t_boot:.2f} | "
          f"{t_boot / base:.2f} |")
    from safetyneurons.probes.metrics import auroc

    same = max(abs(auroc(y[te], a) - auroc(y[te], b)) for k in controls for clf in ("svm", "logreg")
               for a, b in zip(probas[args.cv][k][clf], probas[0][k][clf]))
    print(f"\nlargest AUROC difference of a draw between control_cv {args.cv} and 0: {same:.2e}")


if __name__ == "__main__":
    main()
