"""Content snapshots of run artifacts and their tolerant comparison (used by tests/golden_run.py and test_golden).

A *snapshot* is a JSON-able description of one artifact file's contents:

* ``.safetensors``: ``{"kind": "safetensors", "metadata": ..., "tensors": {name: {"dtype", "shape", "values"}}}``.
  Metadata values that hold JSON are parsed. Every tensor is stored in full (nested lists in the tensor's shape;
  float32 values in their shortest round-trip form), since the tiny run's tensors are small (<= 4096 elements;
  ``snapshot`` refuses larger ones so that a growing run does not silently bloat the golden file).
* ``.json``: ``{"kind": "json", "content": ...}``, the parsed JSON with the machine-dependent keys removed
  (``strip``).
* anything else (JSONL, Markdown): ``{"kind": "text", "text": ...}``, the exact text.

``compare_files`` compares two ``{relative path: snapshot}`` maps and returns readable differences (file, place,
want, got). What must match exactly: file names, keys, strings, integers, booleans, None, list lengths, tensor
names, dtypes and shapes, integer and boolean tensors (labels, row ids, counts), and therefore neuron indices,
labels, ids, confusion matrices and every other count. Floats (JSON numbers and float tensors) match within a
tolerance that depends on where the file comes from (``tolerance_for``), because BLAS / ATen kernels differ by
CPU (see ``ACTIVATIONS`` and ``FITTED`` for the numbers and why). A handful of sha256 digests hash floating-point
data (model weights, shard bytes, probe arrays, change scores); they are required to *be* sha256 digests but not
to be equal (``FLOAT_DIGESTS``); the data they cover is compared by content elsewhere (or, for the model weights,
is the test's input).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Machine-dependent, not code-dependent: library versions, wall-clock timings, report.json's manifest hashes (over
# manifests that hold ``versions``), and where a run ran (run.json's git commit and machine).
EXCLUDED_KEYS = ("versions", "timings_s", "manifest_sha256", "code_version", "machine")
# guard.json only, top level: hashes over probe.json (which holds ``versions``); the probe files are compared.
GUARD_EXCLUDED_KEYS = ("files", "integrity")

# Digests over floating-point data, by the tail of their key path ("#" = any list index). Their value depends on
# the last bit of every float they cover, so across CPUs they differ whenever any covered float differs by an ulp.
#   scores_sha256: contrast/scores.safetensors          arrays_sha256: a probe's tensors
#   plan_sha256 / shard metadata "plan": a store plan, which holds the model's sha256
#   shards[#].sha256: a store shard file                 model / base / aligned .sha256: the tiny models' weights
#   (tests/tiny.py draws them with torch's normal_, whose kernel differs by CPU capability: ATEN_CPU_CAPABILITY=
#   default changes them)                                neuron_set.sha256: neuron_set.json (holds the digests above)
# Digests over text (records_sha256, prompts_sha256, tokenizer_sha256, data.<split>.sha256) stay exact.
FLOAT_DIGESTS = (("scores_sha256",), ("arrays_sha256",), ("plan_sha256",), ("plan",), ("shards", "#", "sha256"),
                 ("model", "sha256"), ("base", "sha256"), ("aligned", "sha256"), ("neuron_set", "sha256"))
_DIGEST = re.compile(r"[0-9a-f]{64}")

MAX_TENSOR_ELEMENTS = 8192  # the tiny run's largest tensor: store/train features, 50 x 96 = 4800 (training split + compositions)
MAX_SHOWN = 5  # differences listed per file (the rest are counted)


@dataclass(frozen=True)
class Tolerance:
    """``|got - want| <= atol + scale_atol * max|want over the tensor| + rtol * |want|`` (scale term: tensors only)."""

    rtol: float
    atol: float
    scale_atol: float

    def bound(self, want: float, scale: float = 0.0) -> float:
        return self.atol + self.scale_atol * scale + self.rtol * abs(want)


# Activations and what is summed from them (store/ and contrast/: float32 features, float64 change-score sums,
# JSON statistics of the scores). Forward passes in float32 through the tiny model; another GEMM kernel (another CPU)
# reorders the sums. Measured here between OpenBLAS / MKL / ATen kernel choices and thread counts (OMP_NUM_THREADS=1,
# OPENBLAS_CORETYPE=Haswell|Zen|Sandybridge, ATEN_CPU_CAPABILITY=avx2|default, MKL_ENABLE_INSTRUCTIONS=AVX2|SSE4_2):
# at most 5.8e-10 absolute on features whose largest magnitude is 1.1e-3 (5e-7 of the scale, a few float32 ulps),
# and at most 1.1e-6 relative on the float64 sums and JSON statistics. rtol 1e-4 is ~1000 float32 ulps; the scale
# term (1e-5 of the tensor's largest magnitude) covers elements near zero, whose relative error is meaningless
# (features range down to 5e-8). A real change (another layer, position mask, pooling) moves values by far more.
ACTIVATIONS = Tolerance(rtol=1e-4, atol=1e-9, scale_atol=1e-5)
# Fitted things and what is derived from them (probes/, guard/, report.json, run.json: probe weights, Platt
# parameters, calibrated thresholds). The solvers stop at a tolerance, not at an exact optimum: the SVM (libsvm,
# tol=1e-3) moved by up to 5.8e-4 relative (Platt intercept) and 4.9e-4 (a PCA+SVM threshold) under the same kernel
# changes; logistic regression (lbfgs) by ~1e-6. rtol 5e-3 leaves ~10x margin. The scale term covers near-zero
# support-vector coordinates and coefficients (up to 1.6e-6 absolute observed). Metrics computed from thresholded
# predictions (accuracy, recall, AUROC, CIs) are ratios of counts: one flipped sample moves them by >= 1/40 = 0.025,
# far outside this tolerance, so they effectively match exactly; the counts themselves (confusion matrices, n) are
# integers and match exactly. No flip was seen in any of the runs above, so exact counts are required.
FITTED = Tolerance(rtol=5e-3, atol=1e-6, scale_atol=1e-4)


def tolerance_for(name: str) -> Tolerance:
    """The float tolerance for an artifact, by its path relative to the run directory."""
    return ACTIVATIONS if name.startswith(("store/", "contrast/")) else FITTED


# --------------------------------------------------------------------------------------------------- snapshots


def strip(obj, guard: bool = False):
    """``obj`` without the machine-dependent keys (``EXCLUDED_KEYS`` anywhere, ``GUARD_EXCLUDED_KEYS`` at the top
    level of guard.json)."""
    if isinstance(obj, dict):
        drop = EXCLUDED_KEYS + (GUARD_EXCLUDED_KEYS if guard else ())
        return {k: strip(v) for k, v in obj.items() if k not in drop}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def _maybe_json(text: str):
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (dict, list)) else text


def tensor_snapshot(t) -> dict:
    """dtype, shape and the values of a torch tensor (floats: the shortest form that round-trips their dtype)."""
    import torch

    dtype = str(t.dtype).removeprefix("torch.")
    if t.numel() > MAX_TENSOR_ELEMENTS:
        raise ValueError(f"tensor of {t.numel()} elements (> {MAX_TENSOR_ELEMENTS}): too large to store in the "
                         "golden file; shrink the tiny run or store a summary instead")
    shape = list(t.shape)
    if t.is_floating_point():
        if t.dtype == torch.float64:
            flat = t.numpy().ravel().tolist()
        else:  # float32 / float16 / bfloat16: all exactly representable in float32; shortest float32 repr
            flat = [float(str(x)) for x in t.to(torch.float32).numpy().ravel()]
        values = np.asarray(flat, dtype=np.float64).reshape(shape).tolist()
    else:
        values = t.tolist()  # integers and booleans
    return {"dtype": dtype, "shape": shape, "values": values}


def snapshot(path: Path, name: str | None = None) -> dict:
    """The snapshot of one artifact file (see the module docstring)."""
    path = Path(path)
    name = name or path.name
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = {k: _maybe_json(v) for k, v in (f.metadata() or {}).items()}
            tensors = {k: tensor_snapshot(f.get_tensor(k)) for k in sorted(f.keys())}
        return {"kind": "safetensors", "metadata": metadata, "tensors": tensors}
    if path.suffix == ".json":
        content = strip(json.loads(path.read_text(encoding="utf-8")), guard=Path(name).name == "guard.json")
        return {"kind": "json", "content": content}
    return {"kind": "text", "text": path.read_text(encoding="utf-8")}


# -------------------------------------------------------------------------------------------------- comparison


def render(path: tuple) -> str:
    """A key path as ``$.a.b[3]`` (keys that are not identifiers are quoted: ``$["probe.json"]``)."""
    out = "$"
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", p):
            out += f".{p}"
        else:
            out += f"[{json.dumps(p)}]"
    return out


def _short(value, n: int = 80) -> str:
    text = json.dumps(value, sort_keys=True, allow_nan=True) if not isinstance(value, str) else repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def is_float_digest(path: tuple) -> bool:
    """Whether the string at ``path`` is a digest over floating-point data (``FLOAT_DIGESTS``)."""
    for pattern in FLOAT_DIGESTS:
        tail = path[-len(pattern):]
        if len(tail) == len(pattern) and all(
                (isinstance(t, int) if p == "#" else t == p) for p, t in zip(pattern, tail)):
            return True
    return False


def _kind(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "list"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def _floats_close(w: float, g: float, tol: Tolerance, scale: float = 0.0) -> bool:
    if math.isnan(w) or math.isnan(g):
        return math.isnan(w) and math.isnan(g)
    if math.isinf(w) or math.isinf(g):
        return w == g
    return abs(g - w) <= tol.bound(w, scale)


def _text_difference(w: str, g: str) -> str:
    """Where two strings first differ: the line for multi-line text, the position otherwise."""
    if "\n" in w or "\n" in g:
        wl, gl = w.split("\n"), g.split("\n")
        for i, (a, b) in enumerate(zip(wl, gl)):
            if a != b:
                return f"first difference on line {i + 1}: want {_short(a, 120)}, got {_short(b, 120)}"
        return f"want {len(wl)} lines, got {len(gl)} (first {min(len(wl), len(gl))} equal)"
    return f"want {_short(w)}, got {_short(g)}"


def compare_values(want, got, tol: Tolerance, path: tuple = ()) -> list[str]:
    """Differences between two parsed-JSON values, each ``"$.key.path: what"`` (all of them; callers truncate)."""
    where = render(path)
    kw, kg = _kind(want), _kind(got)
    if kw != kg:
        return [f"{where}: want {kw} {_short(want)}, got {kg} {_short(got)}"]
    if kw == "object":
        out = [f"{where}: key {k!r} missing (want {_short(want[k])})" for k in want if k not in got]
        out += [f"{where}: unexpected key {k!r} (got {_short(got[k])})" for k in got if k not in want]
        for k in want:
            if k in got:
                out += compare_values(want[k], got[k], tol, path + (k,))
        return out
    if kw == "list":
        out = []
        if len(want) != len(got):
            out.append(f"{where}: want {len(want)} items, got {len(got)}")
        for i, (w, g) in enumerate(zip(want, got)):
            out += compare_values(w, g, tol, path + (i,))
        return out
    if kw == "float":
        if not _floats_close(want, got, tol):
            return [f"{where}: want {want!r}, got {got!r} (|diff| {abs(got - want):.3g} > tolerance "
                    f"{tol.bound(want):.3g})"]
        return []
    if kw == "string" and want != got and _DIGEST.fullmatch(want) and is_float_digest(path):
        return [] if _DIGEST.fullmatch(got) else [f"{where}: want a sha256 digest, got {_short(got)}"]
    if want != got:
        return [f"{where}: {_text_difference(want, got)}" if kw == "string" else
                f"{where}: want {_short(want)}, got {_short(got)}"]
    return []


def compare_tensors(want: dict, got: dict, tol: Tolerance, name: str) -> list[str]:
    """Differences between two tensor snapshots: dtype and shape exactly, values exactly (integers, booleans) or
    within ``tol`` (floats); out-of-tolerance elements are counted and the first few named by index."""
    where = f"tensor {name!r}"
    if want["dtype"] != got["dtype"] or want["shape"] != got["shape"]:
        return [f"{where}: want {want['dtype']} {want['shape']}, got {got['dtype']} {got['shape']}"]
    shape = tuple(want["shape"])
    floating = want["dtype"].startswith(("float", "bfloat"))
    w = np.asarray(want["values"], dtype=np.float64 if floating else object).reshape(shape)
    g = np.asarray(got["values"], dtype=np.float64 if floating else object).reshape(shape)
    if floating:
        finite = np.isfinite(w)
        scale = float(np.max(np.abs(w[finite]))) if finite.any() else 0.0
        bound = tol.atol + tol.scale_atol * scale + tol.rtol * np.abs(np.where(finite, w, 0.0))
        with np.errstate(invalid="ignore"):
            ok = (np.abs(g - w) <= bound) | (np.isnan(w) & np.isnan(g)) | (np.isinf(w) & (w == g))
        bad = np.argwhere(~ok)
        if not len(bad):
            return []
        diff = np.abs(g - w)[~ok]
        head = (f"{where}: {len(bad)} of {w.size} values out of tolerance (max |diff| {np.nanmax(diff):.3g}; "
                f"tolerance {tol.rtol:g} relative + {tol.scale_atol:g} x max|want| {scale:.3g} + {tol.atol:g})")
        return [head] + [f"{where}{list(map(int, i))}: want {float(w[tuple(i)])!r}, got {float(g[tuple(i)])!r} "
                         f"(tolerance {float(bound[tuple(i)]):.3g})" for i in bad[:MAX_SHOWN]]
    bad = np.flatnonzero(w.reshape(-1) != g.reshape(-1))
    if not len(bad):
        return []
    return [f"{where}: {len(bad)} of {w.size} values differ"] + [
        f"{where}{list(map(int, np.unravel_index(i, shape)))}: want {w.reshape(-1)[i]!r}, got {g.reshape(-1)[i]!r}"
        for i in bad[:MAX_SHOWN]]


def compare_snapshots(want: dict, got: dict, tol: Tolerance) -> list[str]:
    """Differences between two snapshots of the same file."""
    if want.get("kind") != got.get("kind"):
        return [f"kind: want {want.get('kind')}, got {got.get('kind')}"]
    kind = want["kind"]
    if kind == "json":
        return compare_values(want["content"], got["content"], tol)
    if kind == "text":
        return [] if want["text"] == got["text"] else [_text_difference(want["text"], got["text"])]
    out = [f"metadata {d}" for d in compare_values(want["metadata"], got["metadata"], tol)]
    wt, gt = want["tensors"], got["tensors"]
    out += [f"tensor {k!r} missing" for k in wt if k not in gt]
    out += [f"unexpected tensor {k!r} ({gt[k]['dtype']} {gt[k]['shape']})" for k in gt if k not in wt]
    for k in wt:
        if k in gt:
            out += compare_tensors(wt[k], gt[k], tol, k)
    return out


def compare_files(want: dict, got: dict) -> list[str]:
    """Differences between two ``{relative path: snapshot}`` maps, each line ``"<file>: <place>: <what>"``; at most
    ``MAX_SHOWN`` per file (plus a count of the rest). Empty when they match."""
    out = [f"{n}: missing (in the golden file, not written by the run)" for n in sorted(set(want) - set(got))]
    out += [f"{n}: new file (written by the run, not in the golden file)" for n in sorted(set(got) - set(want))]
    for name in sorted(set(want) & set(got)):
        diffs = compare_snapshots(want[name], got[name], tolerance_for(name))
        out += [f"{name}: {d}" for d in diffs[:MAX_SHOWN]]
        if len(diffs) > MAX_SHOWN:
            out.append(f"{name}: ... and {len(diffs) - MAX_SHOWN} more differences")
    return out


# ------------------------------------------------------------------------------------------------ golden file


def dumps(obj, indent: int = 0) -> str:
    """JSON with one key per line and lists of scalars on one line (a tensor row per line): small and diffable."""
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in sorted(obj.items())]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(inner + dumps(v, indent + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False, allow_nan=True)
