"""Safety neurons: selection from change scores, the neuron-set file, sparsity statistics and plots."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from safetyneurons._io import atomic_write_bytes, atomic_write_json, dumps_json, figure_png, read_json, sha256_json
from safetyneurons.errors import UserError

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

    from safetyneurons.neurons.contrast import ChangeScores

NEURON_SET_FORMAT = "safetyneurons.neuron_set/1"


@dataclass
class NeuronSet:
    """A set of (layer, index) neurons at one hook point, with their change scores.

    Arrays are sorted by (layer, index). ``model`` describes the base model the set was found on
    (ref, sha256, dims); ``settings`` records how it was selected.
    """

    hook_point: str
    num_layers: int
    width: int
    layers: np.ndarray  # int64 [n]
    indices: np.ndarray  # int64 [n]
    scores: np.ndarray  # float64 [n]
    model: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        self.layers = np.asarray(self.layers, dtype=np.int64)
        self.indices = np.asarray(self.indices, dtype=np.int64)
        self.scores = np.asarray(self.scores, dtype=np.float64)
        order = np.lexsort((self.indices, self.layers))
        self.layers, self.indices, self.scores = self.layers[order], self.indices[order], self.scores[order]
        if len(self.layers) == 0:
            raise UserError("A neuron set must hold at least one neuron.")
        if self.layers.min() < 0 or self.layers.max() >= self.num_layers:
            raise UserError(f"Neuron set has a layer outside 0..{self.num_layers - 1}.")
        if self.indices.min() < 0 or self.indices.max() >= self.width:
            raise UserError(f"Neuron set has a neuron index outside 0..{self.width - 1}.")

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def deepest_layer(self) -> int:
        return int(self.layers.max())

    def per_layer_counts(self) -> np.ndarray:
        """Number of neurons in each layer, length num_layers."""
        return np.bincount(self.layers, minlength=self.num_layers)

    def by_layer(self) -> dict[int, np.ndarray]:
        """{layer: sorted neuron indices} for the layers that hold any neuron."""
        return {int(l): self.indices[self.layers == l] for l in np.unique(self.layers)}

    def flat_indices(self) -> np.ndarray:
        """Index of each neuron in the flattened [num_layers * width] feature vector."""
        return self.layers * self.width + self.indices

    def to_json(self) -> dict:
        return {
            "format": NEURON_SET_FORMAT,
            "hook_point": self.hook_point,
            "num_layers": self.num_layers,
            "width": self.width,
            "count": len(self),
            "model": self.model,
            "settings": self.settings,
            "neurons": [{"layer": int(l), "index": int(i), "score": float(s)}
                        for l, i, s in zip(self.layers, self.indices, self.scores)],
        }

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_json())

    @classmethod
    def from_json(cls, obj: dict, source: str = "neuron set") -> "NeuronSet":
        if not isinstance(obj, dict) or obj.get("format") != NEURON_SET_FORMAT:
            raise UserError(f"{source}: not a safetyneurons neuron set (expected format {NEURON_SET_FORMAT}).")
        try:
            neurons = obj["neurons"]
            return cls(hook_point=obj["hook_point"], num_layers=int(obj["num_layers"]), width=int(obj["width"]),
                       layers=[n["layer"] for n in neurons], indices=[n["index"] for n in neurons],
                       scores=[n["score"] for n in neurons], model=obj.get("model", {}),
                       settings=obj.get("settings", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{source}: malformed neuron set ({e}).") from None

    @classmethod
    def load(cls, path: str | Path) -> "NeuronSet":
        return cls.from_json(read_json(path), source=str(path))


# ------------------------------------------------------------------------------ matching a model
def neuron_set_key(ns: NeuronSet) -> str:
    """sha256 identifying *which* neurons a set holds (hook point, dims, (layer, index) pairs)."""
    return sha256_json({"hook_point": ns.hook_point, "num_layers": int(ns.num_layers), "width": int(ns.width),
                        "layers": ns.layers.tolist(), "indices": ns.indices.tolist()})


def neuron_set_fingerprints(ns: NeuronSet) -> set[str]:
    """Model sha256 values a neuron set records: its ``model`` (the base model it was found on, top level or
    one level nested) and any model descriptions nested one level in ``settings`` (e.g. the aligned twin)."""
    out: set[str] = set()
    m = ns.model if isinstance(ns.model, dict) else {}
    settings = ns.settings if isinstance(ns.settings, dict) else {}
    for key in ("sha256", "fingerprint"):
        if isinstance(m.get(key), str) and m[key]:
            out.add(m[key])
    for v in list(m.values()) + list(settings.values()):
        if isinstance(v, dict):
            for key in ("sha256", "fingerprint"):
                if isinstance(v.get(key), str) and v[key]:
                    out.add(v[key])
    return out


def check_neuron_set_matches(ns: NeuronSet, *, hook_point: str, num_layers: int, width: int, fingerprint: str,
                             what: str) -> None:
    """A neuron set must come from the same hook point, dims and (when both are known) model weights."""
    if ns.hook_point != hook_point:
        raise UserError(f"Neuron set / {what} mismatch: the neuron set is at hook point {ns.hook_point!r} but "
                        f"the {what} is at {hook_point!r}. Use a neuron set found at {hook_point!r}, or "
                        f"re-extract with --hook-point {ns.hook_point}.")
    if (ns.num_layers, ns.width) != (num_layers, width):
        raise UserError(f"Neuron set / {what} mismatch: the neuron set is for {ns.num_layers} layers x {ns.width} "
                        f"neurons but the {what} has {num_layers} x {width}. Use a neuron set found on the "
                        f"same model.")
    fps = neuron_set_fingerprints(ns)
    if fingerprint and fps and fingerprint not in fps:
        raise UserError(f"Neuron set / {what} mismatch: the neuron set was found on model weights "
                        f"{', '.join(sorted(f[:12] for f in fps))}... but the {what} comes from model "
                        f"{fingerprint[:12]}... Extract with the model the neuron set was found on.")


# ------------------------------------------------------------------------------------------ selection
DEFAULT_TOP_PERCENT = 5.0
TIE_BREAK = "higher change score first; equal scores: lower layer, then lower index"


def _score_matrix(scores) -> np.ndarray:
    """[num_layers, width] float64 from a ChangeScores (anything with ``.scores``) or an array."""
    matrix = np.asarray(getattr(scores, "scores", scores), dtype=np.float64)
    if matrix.ndim != 2 or matrix.size == 0:
        raise UserError(f"Change scores must be a non-empty [num_layers, width] matrix, got shape {matrix.shape}.")
    if not np.isfinite(matrix).all():
        raise UserError("Change scores contain NaN or infinite values; re-run `safetyneurons contrast`.")
    return matrix


def check_selection(top_percent: float | None = None, top_n: int | None = None) -> tuple[float | None, int | None]:
    """Validate a selection rule; ``(None, None)`` means the default top 5%."""
    if top_percent is not None and top_n is not None:
        raise UserError("Give either --top-percent or --top-n, not both.")
    if top_n is not None:
        if isinstance(top_n, bool) or int(top_n) != top_n or top_n < 1:
            raise UserError(f"--top-n must be a positive whole number of neurons, got {top_n!r}.")
        return None, int(top_n)
    if top_percent is None:
        return DEFAULT_TOP_PERCENT, None
    try:
        top_percent = float(top_percent)
    except (TypeError, ValueError):
        raise UserError(f"--top-percent must be a number in (0, 100], got {top_percent!r}.") from None
    if not (0.0 < top_percent <= 100.0):
        raise UserError(f"--top-percent must be in (0, 100] (a percentage of the neurons), got {top_percent:g}.")
    return top_percent, None


def count_for_percent(percent: float, total: int) -> int:
    """How many of ``total`` neurons make up the top ``percent``%: ceil, at least 1."""
    return max(1, math.ceil(round(percent * total / 100.0, 6)))


def _ranking(values: np.ndarray) -> np.ndarray:
    """Positions of ``values`` from highest to lowest; equal values keep their (row-major) order."""
    return np.lexsort((np.arange(values.size), -values.ravel()))


def check_max_layer(max_layer: int | None, num_layers: int | None = None) -> int | None:
    """Validate a layer budget (deepest layer a neuron may sit in); None means no budget."""
    if max_layer is None:
        return None
    if isinstance(max_layer, bool) or int(max_layer) != max_layer or max_layer < 0:
        raise UserError(f"--max-layer must be a layer index >= 0, got {max_layer!r}.")
    if num_layers is not None and max_layer >= num_layers:
        raise UserError(f"--max-layer {max_layer} is beyond the model's last layer ({num_layers - 1}); give "
                        f"0..{num_layers - 1}, or leave it out for no layer budget.")
    return int(max_layer)


def select(scores: ChangeScores | np.ndarray, top_percent: float | None = None, top_n: int | None = None,
           per_layer: bool = False, hook_point: str | None = None, max_layer: int | None = None) -> NeuronSet:
    """The safety neurons: the highest change scores, top ``top_percent``% (default 5%) or ``top_n``.

    Global across layers by default; with ``per_layer`` the rule applies to every layer separately (top-n
    then means n per layer). ``scores`` is a ``contrast.ChangeScores`` or a [num_layers, width] array (then
    pass ``hook_point``). Ties are broken deterministically: lower layer, then lower index first.

    ``max_layer`` is a layer budget: only neurons in layers ``0..max_layer`` are chosen, so a guard or an
    extraction with this set stops after layer ``max_layer`` (early exit). The count stays that of the
    unconstrained rule (top ``top_percent``% of *all* neurons, or ``top_n``), drawn from the allowed layers.
    """
    top_percent, top_n = check_selection(top_percent, top_n)
    full = _score_matrix(scores)
    max_layer = check_max_layer(max_layer, full.shape[0])
    total_layers = full.shape[0]
    matrix = full if max_layer is None else full[:max_layer + 1]  # layer-major: flat indices stay valid
    layers, width = matrix.shape
    hook_point = hook_point or getattr(scores, "hook_point", None)
    if hook_point is None:
        raise UserError("Selecting from a bare score matrix needs the hook point it was measured at.")
    pool = width if per_layer else layers * width
    if top_n is not None:
        if top_n > pool:
            where = f"a layer has only {width}" if per_layer else f"there are only {pool}"
            raise UserError(f"--top-n {top_n} is more neurons than {where}; give at most {pool}.")
        k = top_n
    else:
        k = count_for_percent(top_percent, width if per_layer else total_layers * width)
        if k > pool:
            raise UserError(f"The top {top_percent:g}% is {k} neurons but layers 0..{max_layer} hold only {pool}; "
                            f"raise --max-layer or lower --top-percent.")
    if per_layer:
        picked = [layer * width + _ranking(matrix[layer])[:k] for layer in range(layers)]
        flat = np.concatenate(picked)
    else:
        flat = _ranking(matrix)[:k]
    chosen_layers, chosen_indices = np.divmod(flat, width)
    meta = getattr(scores, "meta", {}) or {}
    settings = {
        "rule": "top_n" if top_n is not None else "top_percent",
        "top_percent": top_percent,
        "top_n": top_n,
        "per_layer": bool(per_layer),
        "selected": int(len(flat)),
        "total_neurons": int(total_layers * width),
        "tie_break": TIE_BREAK,
        "positions": getattr(scores, "positions", None),
        "scores_sha256": scores.fingerprint() if hasattr(scores, "fingerprint") else None,
        "aligned": meta.get("aligned", {}),
        "prompts_sha256": meta.get("prompts_sha256"),
    }
    if max_layer is not None:
        settings["max_layer"] = max_layer
    model = dict(meta.get("base", {}))
    return NeuronSet(hook_point=hook_point, num_layers=total_layers, width=width, layers=chosen_layers,
                     indices=chosen_indices, scores=matrix[chosen_layers, chosen_indices], model=model,
                     settings=settings)


def check_matches(neuron_set: NeuronSet, scores: ChangeScores | np.ndarray) -> None:
    """A neuron set must come from scores of the same shape and hook point."""
    matrix = _score_matrix(scores)
    hook_point = getattr(scores, "hook_point", neuron_set.hook_point)
    if (neuron_set.num_layers, neuron_set.width) != matrix.shape or neuron_set.hook_point != hook_point:
        raise UserError(
            f"The neuron set ({neuron_set.hook_point}, {neuron_set.num_layers}x{neuron_set.width}) does not match "
            f"the change scores ({hook_point}, {matrix.shape[0]}x{matrix.shape[1]}). Use a set selected from "
            f"these scores (`safetyneurons neurons select`)."
        )


# ----------------------------------------------------------------------------------------- statistics
def gini(values: ArrayLike) -> float:
    """Gini coefficient of non-negative values: 0 = spread evenly, towards 1 = held by a few. 0 if all zero."""
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    total = v.sum()
    if v.size == 0 or total <= 0:
        return 0.0
    ranks = np.arange(1, v.size + 1)
    return float(((2 * ranks - v.size - 1) * v).sum() / (v.size * total))


def top_share(values: ArrayLike, percent: float) -> float | None:
    """Share of the total held by the top ``percent``% of values (None if the total is zero)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    total = v.sum()
    if total <= 0:
        return None
    k = count_for_percent(percent, v.size)
    return float(np.sort(v)[::-1][:k].sum() / total)


def neuron_stats(scores: ChangeScores | np.ndarray, neuron_set: NeuronSet | None = None) -> dict:
    """Sparsity statistics of the change scores (and of the selected set): JSON-ready dict."""
    matrix = _score_matrix(scores)
    if neuron_set is not None:
        check_matches(neuron_set, scores)
    layers, width = matrix.shape
    flat = matrix.ravel()
    total = float(flat.sum())
    out = {
        "format": "safetyneurons.neuron_stats/1",
        "hook_point": getattr(scores, "hook_point", neuron_set.hook_point if neuron_set else None),
        "positions": getattr(scores, "positions", None),
        "num_layers": layers,
        "width": width,
        "total_neurons": int(flat.size),
        "score": {"sum": total, "mean": float(flat.mean()), "median": float(np.median(flat)),
                  "max": float(flat.max()), "min": float(flat.min())},
        "gini": gini(flat),
        "top_share": {"top_1_percent": top_share(flat, 1.0), "top_5_percent": top_share(flat, 5.0)},
        "note": "top_share = share of the summed change score held by the top 1% / 5% of neurons; "
                "gini near 1 means the change is concentrated in few neurons (sparse).",
        "per_layer": [],
    }
    counts = neuron_set.per_layer_counts() if neuron_set is not None else np.zeros(layers, dtype=np.int64)
    for layer in range(layers):
        row = matrix[layer]
        out["per_layer"].append({"layer": layer, "mean_score": float(row.mean()), "max_score": float(row.max()),
                                 "share_of_total_score": float(row.sum() / total) if total > 0 else None,
                                 "selected": int(counts[layer])})
    if neuron_set is not None:
        chosen = float(neuron_set.scores.sum())
        out["selected"] = {
            "count": len(neuron_set),
            "fraction_of_neurons": len(neuron_set) / flat.size,
            "per_layer_count": [int(c) for c in counts],
            "share_of_total_score": chosen / total if total > 0 else None,
            "min_score": float(neuron_set.scores.min()),
            "settings": neuron_set.settings,
        }
    return out


# --------------------------------------------------------------------------------------------- plots
MAX_HEATMAP_COLUMNS = 2048



def heatmap_png(scores: ChangeScores | np.ndarray, neuron_set: NeuronSet | None = None,
                title: str | None = None) -> bytes:
    """PNG: change score of every neuron (rows = layers, columns = neuron index), selected neurons marked.

    Wider layers than ``MAX_HEATMAP_COLUMNS`` are shown max-pooled over groups of neighbouring neurons.
    """
    from matplotlib.figure import Figure

    matrix = _score_matrix(scores)
    layers, width = matrix.shape
    group = max(1, math.ceil(width / MAX_HEATMAP_COLUMNS))
    if group > 1:
        cols = math.ceil(width / group)
        padded = np.zeros((layers, cols * group))
        padded[:, :width] = matrix
        shown = padded.reshape(layers, cols, group).max(axis=2)
    else:
        shown = matrix
    from matplotlib.colors import LogNorm, Normalize

    # Change scores span orders of magnitude (late layers dominate): a log colour scale keeps the early
    # layers readable. Scores below 1e-4 x max share the lowest colour; all-zero scores stay linear.
    top = float(shown.max())
    positive = shown[shown > 0]
    if top > 0 and positive.size and top / float(positive.min()) > 100:
        norm, scale = LogNorm(vmin=max(float(np.percentile(positive, 1)), top * 1e-4), vmax=top, clip=True), "log"
    else:
        norm, scale = Normalize(vmin=0.0, vmax=top if top > 0 else 1.0), "linear"
    fig = Figure(figsize=(14, max(3.5, 0.18 * layers + 2)), dpi=150, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis", origin="lower", norm=norm,
                   extent=(-0.5, width - 0.5, -0.5, layers - 0.5))
    fig.colorbar(im, ax=ax, label=f"change score, RMS of base - aligned activation ({scale} scale)", pad=0.01)
    if neuron_set is not None:
        check_matches(neuron_set, scores)
        ax.scatter(neuron_set.indices, neuron_set.layers, s=6, marker="s", facecolors="none",
                   edgecolors="red", linewidths=0.5, label=f"safety neurons ({len(neuron_set)})")
        ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), fontsize=8, frameon=False, borderaxespad=0.2)
    hook = getattr(scores, "hook_point", neuron_set.hook_point if neuron_set else "")
    pooled = f", max over groups of {group} neurons" if group > 1 else ""
    ax.set_title(title or f"Change scores at {hook} ({layers} layers x {width} neurons{pooled})", loc="right")
    ax.set_xlabel("neuron index")
    ax.set_ylabel("layer")
    return figure_png(fig)


def layer_counts_png(neuron_set: NeuronSet, title: str | None = None) -> bytes:
    """PNG bar chart: how many safety neurons sit in each layer."""
    from matplotlib.figure import Figure

    counts = neuron_set.per_layer_counts()
    fig = Figure(figsize=(max(6, 0.3 * neuron_set.num_layers + 2), 4), dpi=150, layout="constrained")
    ax = fig.add_subplot()
    ax.bar(np.arange(neuron_set.num_layers), counts, color="tab:red")
    ax.set_xlabel("layer")
    ax.set_ylabel("safety neurons")
    ax.set_xlim(-0.7, neuron_set.num_layers - 0.3)
    ax.set_title(title or f"Safety neurons per layer ({len(neuron_set)} at {neuron_set.hook_point}, "
                          f"{neuron_set.width} neurons per layer)")
    return figure_png(fig)


REPORT_FILES = ("heatmap.png", "layer_counts.png", "stats.json")


def write_report(scores: ChangeScores | np.ndarray, neuron_set: NeuronSet, out_dir: str | Path) -> dict[str, Path]:
    """Write heatmap.png, layer_counts.png and stats.json into ``out_dir``.

    Everything is rendered in memory first and each file is written atomically, so an error leaves no
    partial report.
    """
    check_matches(neuron_set, scores)
    contents = {
        "heatmap.png": heatmap_png(scores, neuron_set),
        "layer_counts.png": layer_counts_png(neuron_set),
        "stats.json": dumps_json(neuron_stats(scores, neuron_set)).encode(),
    }
    out_dir = Path(out_dir)
    return {name: atomic_write_bytes(out_dir / name, data) for name, data in contents.items()}
