"""A saved probe on new data: its features rebuilt from its metadata (live or from a store), and its metrics."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from safetyneurons.activations.features import FeatureSpec
from safetyneurons.activations.reader import ActivationReader, token_counts
from safetyneurons.data.records import check_records
from safetyneurons.data.records import labels as record_labels
from safetyneurons.errors import UserError
from safetyneurons.probes.metrics import binary_metrics
from safetyneurons.probes.probe import Probe, TextProbe

if TYPE_CHECKING:
    from safetyneurons.activations.store import Store
    from safetyneurons.model.pair import LoadedModel


# -------------------------------------------------------------------------------------- evaluation
def check_probe_model(probe: Probe, lm: LoadedModel) -> None:
    """The model must be the one whose activations the probe was trained on (when both hashes are known)."""
    want = (probe.meta.get("model") or {}).get("sha256") or ""
    have = getattr(lm, "fingerprint", "") or ""
    if want and have and want != have:
        raise UserError(f"The probe was trained on activations of model {probe.meta['model'].get('ref')} "
                        f"(sha256 {want[:12]}...) but --model {lm.ref} has sha256 {have[:12]}.... Evaluate with "
                        f"the probe's model (leave --model out to use it).")


def probe_features(probe: Probe, *, lm: LoadedModel | None = None, prompts: Sequence[str] | None = None,
                   store: Store | None = None, batch_size: int = 16, progress: bool = False) -> np.ndarray:
    """A saved activation probe's input features, rebuilt from its metadata (:class:`FeatureSpec`): read live
    from ``lm`` and ``prompts`` by the activation reader, or from an activation ``store``."""
    spec = FeatureSpec.from_meta(probe.meta, source="probe metadata")
    length = probe.meta.get("feature_set") == "length"  # the length baseline reads only the token count
    if store is not None:
        store.check_spec(spec)
        return store.length_features() if length else store.read(spec)
    if lm is None or prompts is None:
        raise UserError("Rebuilding a probe's features needs the model and the prompts (or a store).")
    if length:
        return token_counts(lm, prompts, spec.max_length).astype(np.float64).reshape(-1, 1)
    return ActivationReader(lm, spec, batch_size=batch_size).features(prompts, progress=progress)


def evaluate_probe(probe: Probe | TextProbe, records: Sequence[dict], *, lm: LoadedModel | None = None,
                   features: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0, batch_size: int = 16,
                   progress: bool = True) -> dict:
    """Score a probe on labelled records. Activation probes need ``lm`` (or precomputed ``features``).

    Returns {"metrics", "proba", "pred", "labels"}; ``metrics`` as in :func:`metrics.binary_metrics`.
    """
    records = check_records(records)
    y = record_labels(records)
    prompts = [r["prompt"] for r in records]
    if isinstance(probe, TextProbe):
        inputs = prompts
    elif features is not None:
        inputs = features
    else:
        if lm is None:
            raise UserError("Evaluating an activation probe needs the model (or precomputed features).")
        check_probe_model(probe, lm)
        inputs = probe_features(probe, lm=lm, prompts=prompts, batch_size=batch_size, progress=progress)
    proba = probe.unsafe_probability(inputs)
    pred = (proba >= probe.threshold).astype(np.int64)
    return {"metrics": binary_metrics(y, proba, pred, n_boot=n_boot, seed=seed), "proba": proba, "pred": pred,
            "labels": y}
