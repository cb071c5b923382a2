"""Features: what a probe reads (:class:`FeatureSpec`) and live extraction of pooled activations.

A feature vector of a prompt is one pooled value per neuron at a hook point (see :mod:`safetyneurons.model.hooks`):

- ``mean``: mean over the prompt's tokens (the chat-formatted prompt; pads are masked out with
  ``torch.where``), as in the reference student project;
- ``last``: the last prompt token (the position right before generation starts), as in the paper.

Either all neurons at the hook point (``[num_layers * width]``, layer-major: column ``layer * width +
index``) or only the neurons of a :class:`~safetyneurons.neurons.selection.NeuronSet` (columns in the set's order,
sorted by (layer, index)). With a neuron set the forward pass only hooks the layers holding neurons and
stops right after the deepest of them (early exit).

The same :class:`FeatureSpec` (hook point, pooling, token positions, max length, neuron set, model
fingerprint) is written into a store's ``manifest.json``, a probe's ``meta`` and a guard's ``guard.json``
(as their top-level ``hook_point``, ``pooling``, ``max_length``, ``neuron_set`` and ``model`` fields), and
:func:`probe_features` rebuilds a saved probe's input from it, live or from a store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence

import numpy as np

from safetyneurons._io import progress_bar
from safetyneurons.constants import POOLINGS
from safetyneurons.errors import UserError
from safetyneurons.model.hooks import check_hook_point, forward_with_hooks, hook_width, num_layers
from safetyneurons.neurons.selection import NeuronSet, check_neuron_set_matches
from safetyneurons.activations.writer import HostBatch, to_host

if TYPE_CHECKING:
    from tqdm import tqdm

    from safetyneurons.model.pair import LoadedModel
    from safetyneurons.probes.probe import Probe
    from safetyneurons.activations.store import Store

#: Token positions pooled over; only ``prompt`` (the whole chat-formatted prompt) so far.
FEATURE_POSITIONS = ("prompt",)
#: The model fields a probe's metadata keeps.
PROBE_MODEL_KEYS = ("ref", "sha256", "chat_template", "architecture")


def check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise UserError(f"Unknown pooling {pooling!r}. Choose one of: {', '.join(POOLINGS)} "
                        f"(mean over prompt tokens, or the last prompt token).")
    return pooling


def check_run_args(batch_size: int, max_length: int | None) -> None:
    if int(batch_size) < 1:
        raise UserError(f"batch size must be >= 1 (got {batch_size}).")
    if max_length is not None and int(max_length) < 1:
        raise UserError(f"max length must be >= 1 token (got {max_length}).")


# ------------------------------------------------------------------------------------------- the spec
@dataclass(frozen=True, eq=False)
class FeatureSpec:
    """What a probe reads: pooled activations at ``hook_point`` over ``positions``, truncated to ``max_length``
    tokens, of the neurons in ``neuron_set`` (None: every neuron, layer-major) of the model ``model``
    (a description with at least ``ref`` and ``sha256``, its weights' fingerprint)."""

    hook_point: str
    pooling: str = "mean"
    max_length: int | None = 256
    neuron_set: NeuronSet | None = None
    model: dict = field(default_factory=dict)
    positions: str = "prompt"

    def __post_init__(self):
        check_hook_point(self.hook_point)
        check_pooling(self.pooling)
        if self.positions not in FEATURE_POSITIONS:
            raise UserError(f"Unknown feature token positions {self.positions!r}. Choose one of: "
                            f"{', '.join(FEATURE_POSITIONS)}.")

    @property
    def fingerprint(self) -> str:
        """sha256 of the model weights the features come from ('' when unknown)."""
        return (self.model or {}).get("sha256") or ""

    @classmethod
    def from_meta(cls, meta: dict, source: str = "metadata", neuron_set: NeuronSet | None = None) -> "FeatureSpec":
        """The spec a store manifest, probe meta or guard.json records (``neuron_set`` overrides its own)."""
        try:
            ns = neuron_set
            if ns is None and meta.get("neuron_set"):
                ns = NeuronSet.from_json(meta["neuron_set"], source=f"{source} (neuron set)")
            return cls(hook_point=meta["hook_point"], pooling=meta["pooling"], max_length=meta["max_length"],
                       neuron_set=ns, model=dict(meta.get("model") or {}),
                       positions=meta.get("positions", "prompt"))
        except (KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{source}: malformed feature settings ({type(e).__name__}: {e}).") from None

    def fields(self, model_keys: Sequence[str] | None = None) -> dict[str, Any]:
        """The spec as the top-level fields of a manifest / probe meta / guard.json. ``model_keys`` picks the
        model fields kept (None: all). ``positions`` is written only when not the default, so files written
        before it existed keep their bytes."""
        model = dict(self.model) if model_keys is None else {k: self.model.get(k) for k in model_keys}
        out = {"hook_point": self.hook_point, "pooling": self.pooling, "max_length": self.max_length,
               "neuron_set": self.neuron_set.to_json() if self.neuron_set is not None else None, "model": model}
        if self.positions != "prompt":
            out["positions"] = self.positions
        return out

    def extract(self, lm: LoadedModel, prompts: Sequence[str], batch_size: int = 16,
                progress: bool = False) -> np.ndarray:
        """Live features of ``prompts`` with ``lm``: float32 ``[n, d]`` (see :func:`pooled_features`)."""
        return pooled_features(lm, prompts, self.hook_point, pooling=self.pooling, neuron_set=self.neuron_set,
                               batch_size=batch_size, max_length=self.max_length, progress=progress)

    def check_store(self, store: Store) -> None:
        """An activation store must have been extracted the way this spec reads (hook point, pooling, max length,
        model weights); UserError otherwise."""
        differ = [(k, store.manifest.get(k), getattr(self, k)) for k in ("hook_point", "pooling", "max_length")
                  if store.manifest.get(k) != getattr(self, k)]
        if differ:
            key, have, want = differ[0]
            raise UserError(f"Store {store.path} has {key} {have!r} but the probe was trained with {want!r}. "
                            f"Extract the data with the probe's settings, or pass a labelled file instead of a store.")
        if self.fingerprint and store.fingerprint and self.fingerprint != store.fingerprint:
            raise UserError(f"Store {store.path} comes from model {store.fingerprint[:12]}... but the probe was "
                            f"trained on {self.fingerprint[:12]}.... Extract the data with the probe's model.")

    def from_store(self, store: Store) -> np.ndarray:
        """The spec's columns of an activation store, which must have been extracted the same way."""
        self.check_store(store)
        if self.neuron_set is not None:
            return store.select(self.neuron_set)
        if store.layout != "all":
            raise UserError(f"The probe reads all neurons but store {store.path} holds only a neuron set's. "
                            f"Extract without --neurons.")
        return store.features


def probe_features(probe: Probe, *, lm: LoadedModel | None = None, prompts: Sequence[str] | None = None,
                   store: Store | None = None, batch_size: int = 16, progress: bool = False) -> np.ndarray:
    """A saved activation probe's input features, rebuilt from its metadata: live from ``lm`` and
    ``prompts``, or read from an activation ``store``."""
    spec = FeatureSpec.from_meta(probe.meta, source="probe metadata")
    length = probe.meta.get("feature_set") == "length"  # the length baseline reads only the token count
    if store is not None:
        spec.check_store(store)
        return length_features(store) if length else spec.from_store(store)
    if lm is None or prompts is None:
        raise UserError("Rebuilding a probe's features needs the model and the prompts (or a store).")
    if length:
        return token_counts(lm, prompts, spec.max_length).astype(np.float64).reshape(-1, 1)
    return spec.extract(lm, prompts, batch_size=batch_size, progress=progress)


def length_features(store: Store) -> np.ndarray:
    """The length baseline's only feature: each prompt's token count, as float64 [n, 1]."""
    counts = store.manifest.get("n_tokens")
    if counts is None or len(counts) != len(store):
        raise UserError(f"Store {store.path} has no token counts (extracted by an older version). Re-run the same "
                        f"`safetyneurons extract` into it (finished shards are reused), or drop `length` from "
                        f"--feature-sets.")
    return np.asarray(counts, dtype=np.float64).reshape(-1, 1)


# ----------------------------------------------------------------------------------------- extraction
class LayerPlan(NamedTuple):
    """Which layers to hook and which of their neurons to keep; ``d`` is the feature width."""

    layers: list[int]
    index: dict[int, Any]  # layer -> index tensor, or None for every neuron
    d: int
    num_layers: int
    width: int


def plan_layers(lm: LoadedModel, hook_point: str, neuron_set: NeuronSet | None) -> LayerPlan:
    import torch

    check_hook_point(hook_point)
    n_layers, width = num_layers(lm.model), hook_width(lm.model, hook_point)
    if neuron_set is None:
        return LayerPlan(list(range(n_layers)), {i: None for i in range(n_layers)}, n_layers * width, n_layers, width)
    check_neuron_set_matches(neuron_set, hook_point=hook_point, num_layers=n_layers, width=width,
                             fingerprint=getattr(lm, "fingerprint", "") or "", what="model")
    device = lm.device
    by_layer = {l: torch.as_tensor(idx, dtype=torch.long, device=device) for l, idx in neuron_set.by_layer().items()}
    return LayerPlan(sorted(by_layer), by_layer, len(neuron_set), n_layers, width)


def _token_lengths(lm, prompts: Sequence[str], max_length: int | None) -> np.ndarray:
    tok = lm.tokenizer
    enc = tok([lm.format(p) for p in prompts], padding=False, truncation=max_length is not None,
              max_length=max_length, add_special_tokens=not lm.chat_template)
    return np.array([len(ids) for ids in enc["input_ids"]], dtype=np.int64)


def token_counts(lm: LoadedModel, prompts: Sequence[str], max_length: int | None = 256) -> np.ndarray:
    """Tokens of each formatted, truncated prompt: the length baseline's feature (stores: ``n_tokens``)."""
    return _token_lengths(lm, list(prompts), max_length)


def _pool_batch(lm, batch: Sequence[str], hook_point: str, pooling: str, plan: LayerPlan, max_length) -> HostBatch:
    """Pooled features of one batch, float32 ``[len(batch), d]``, column blocks in layer order, on their way
    to host memory (the device-to-host copy does not block on CUDA; see :mod:`safetyneurons.activations.writer`)."""
    import torch

    enc = lm.encode(batch, max_length=max_length, padding_side="right", content_mask=pooling == "mean")
    if int(enc["attention_mask"].sum(1).min()) == 0:  # checked on the CPU copy: no device sync
        raise UserError("A prompt encodes to zero tokens; remove empty prompts from the data.")
    if pooling == "mean" and int(enc["content_mask"].sum(1).min()) == 0:
        raise UserError(f"A prompt keeps none of its own tokens within --max-length {max_length} (the chat "
                        f"template fills it); raise --max-length.")
    real = enc["attention_mask"].to(lm.device).bool()
    mask = enc["content_mask"].to(lm.device) if pooling == "mean" else real  # the tokens the mean runs over
    counts = mask.sum(1, keepdim=True).float()  # [b, 1]
    last = real.sum(1) - 1  # right padding: index of the last real token (the end of the generation prompt)
    rows = torch.arange(mask.shape[0], device=mask.device)
    pieces: dict[int, torch.Tensor] = {}

    def callback(layer: int, t: torch.Tensor) -> None:
        idx = plan.index[layer]
        if idx is not None:
            t = t.index_select(-1, idx.to(t.device))  # only this layer's neurons, before any pooling work
        if pooling == "mean":
            m = mask.to(t.device)
            masked = torch.where(m.unsqueeze(-1), t, torch.zeros((), dtype=t.dtype, device=t.device))
            pooled = masked.float().sum(1) / counts.to(t.device)
        else:
            pooled = t[rows.to(t.device), last.to(t.device)].float()
        pieces[layer] = pooled

    forward_with_hooks(lm.model, enc["input_ids"], enc["attention_mask"], hook_point, callback,
                       layers=plan.layers, early_exit=True)
    device = pieces[plan.layers[0]].device  # layers may sit on several devices (device_map="auto")
    return to_host(torch.cat([pieces[l].to(device) for l in plan.layers], dim=1))


def pooled_batches(lm: LoadedModel, prompts: Sequence[str], hook_point: str, pooling: str, plan: LayerPlan,
                   batch_size: int, max_length: int | None,
                   bar: tqdm | None = None) -> list[tuple[np.ndarray, HostBatch]]:
    """``[(row indices, pooled batch)]`` covering ``prompts``; batches are formed over length-sorted prompts."""
    if not prompts:
        return []
    lengths = _token_lengths(lm, prompts, max_length)
    order = np.argsort(-lengths, kind="stable")  # longest first: peak memory shows up at once
    out = []
    for start in range(0, len(order), batch_size):
        sel = order[start:start + batch_size]
        out.append((sel, _pool_batch(lm, [prompts[i] for i in sel], hook_point, pooling, plan, max_length)))
        if bar is not None:
            bar.update(len(sel))
    return out


def assemble(batches: list[tuple[np.ndarray, HostBatch]], n: int, d: int) -> np.ndarray:
    """float32 ``[n, d]`` from :func:`pooled_batches` output (waits for pending device-to-host copies)."""
    feats = np.empty((n, d), dtype=np.float32)
    for sel, batch in batches:
        feats[sel] = batch.numpy()
    return feats


def pooled_features(lm: LoadedModel, prompts: Sequence[str], hook_point: str, pooling: str = "mean",
                    neuron_set: NeuronSet | None = None, batch_size: int = 16, max_length: int | None = 256,
                    progress: bool = False) -> np.ndarray:
    """Pooled activations of ``prompts`` (in memory): float32 ``[len(prompts), d]``.

    ``d`` is ``num_layers * width`` (layer-major) without a neuron set, else ``len(neuron_set)`` with
    columns in the set's (layer, index) order. With a neuron set only its layers are hooked and the
    forward pass stops after its deepest layer. Prompts are batched by token length; rows come back in
    the given order.
    """
    check_pooling(pooling)
    check_run_args(batch_size, max_length)
    prompts = list(prompts)
    if any(not isinstance(p, str) for p in prompts):
        raise UserError("Prompts must be strings.")
    plan = plan_layers(lm, hook_point, neuron_set)
    with progress_bar(len(prompts), "pooled activations", "prompt", progress, smoothing=0.1) as bar:
        return assemble(pooled_batches(lm, prompts, hook_point, pooling, plan, int(batch_size), max_length, bar),
                        len(prompts), plan.d)
