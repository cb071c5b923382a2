"""Prompt-level statistics of a patching run: a paired bootstrap of (safety effect - mean control effect).

Every patched set is measured on the same prompts, so the comparison is paired: for prompt ``i`` the safety
set's effect ``s[i]`` (the patched reply's outcome minus the unpatched receiver's, oriented so that positive
means "towards the donor") is set against the control sets' effects ``c[r, i]`` on the same prompt. The
statistic is

    D = mean over prompts i of ( s[i] - mean over control sets r of c[r, i] )

and :func:`paired_bootstrap` resamples both sources of chance: the prompts (with replacement, the same
draw for the safety set and every control, which keeps the pairing) and the control sets (with replacement,
when there is more than one draw). Its 95% interval is the percentile interval of the resampled D, and its
p-value the two-sided bootstrap p of ``D = 0``: ``min(1, 2 * min(1 + #{D* <= 0}, 1 + #{D* >= 0}) / (1 + B))``.

The rank p-value among the control draws (:func:`safetyneurons.neurons.controls.rank_p_value`) is kept as a
descriptive figure: it treats the safety set's effect as a fixed number, ignoring that it comes from a
sample of prompts.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

N_BOOT = 2000
ALPHA = 0.05


def paired_bootstrap(safety: Sequence[float], controls: Sequence[Sequence[float]], n_boot: int = N_BOOT,
                     seed: int = 0) -> dict:
    """Paired bootstrap over prompts and control sets of ``mean(safety - mean(controls))``.

    ``safety``: [n prompts] effects of the safety set; ``controls``: [n sets, n prompts] effects of the control
    draws on the same prompts (one row for a single control such as zero ablation). Returns the estimate, the
    95% percentile interval, the two-sided bootstrap p-value and the counts; None values when there are no
    prompts."""
    s = np.asarray(safety, dtype=np.float64)
    c = np.atleast_2d(np.asarray(controls, dtype=np.float64))
    n, sets = len(s), c.shape[0]
    out = {"n_prompts": int(n), "n_sets": int(sets), "n_boot": int(n_boot)}
    if n == 0 or sets == 0:
        return {**out, "estimate": None, "ci95": [None, None], "p_value": None}
    if c.shape[1] != n:
        raise ValueError(f"controls cover {c.shape[1]} prompts, the safety set {n}")
    estimate = float(s.mean() - c.mean())
    rng = np.random.default_rng([int(seed), 424242])
    prompt_counts = np.zeros((n_boot, n))
    np.add.at(prompt_counts, (np.repeat(np.arange(n_boot), n), rng.integers(n, size=n_boot * n)), 1.0)
    safety_means = prompt_counts @ s / n  # [B]
    per_set = c @ prompt_counts.T / n  # [sets, B]: each control set's mean over the resampled prompts
    if sets > 1:
        set_counts = np.zeros((n_boot, sets))
        np.add.at(set_counts, (np.repeat(np.arange(n_boot), sets), rng.integers(sets, size=n_boot * sets)), 1.0)
        control_means = (set_counts * per_set.T).sum(1) / sets
    else:
        control_means = per_set[0]
    boot = safety_means - control_means
    lo, hi = np.quantile(boot, [ALPHA / 2, 1 - ALPHA / 2])
    below, above = int((boot <= 0).sum()), int((boot >= 0).sum())
    p = min(1.0, 2 * min(1 + below, 1 + above) / (1 + n_boot))
    return {**out, "estimate": estimate, "ci95": [float(lo), float(hi)], "p_value": float(p)}


def declared(test: dict) -> bool:
    """A safety effect beyond the control: the 95% interval of D lies above 0."""
    return test.get("ci95", [None])[0] is not None and test["ci95"][0] > 0
