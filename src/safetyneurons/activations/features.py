"""What a probe reads: :class:`FeatureSpec` (a leaf: it describes, it reads nothing).

A feature vector of a prompt is one pooled value per neuron at a hook point (see :mod:`safetyneurons.model.hooks`):

- ``mean``: mean over the content tokens of the chat-formatted prompt (the message's own text, never the
  template's; see :mod:`safetyneurons.model.positions`);
- ``last``: the last prompt token (the position right before generation starts), as in the paper.

Either all neurons at the hook point (``[num_layers * width]``, layer-major: column ``layer * width + index``)
or only the neurons of a :class:`~safetyneurons.neurons.selection.NeuronSet` (columns in the set's order, sorted
by (layer, index)).

The same :class:`FeatureSpec` (hook point, pooling, token positions, max length, neuron set, model fingerprint)
is written into a store's ``manifest.json``, a probe's ``meta`` and a guard's ``guard.json`` (as their top-level
``hook_point``, ``pooling``, ``max_length``, ``neuron_set`` and ``model`` fields). The activation reader
(:mod:`safetyneurons.activations.reader`) reads features as a spec says; a store reads its columns with
:meth:`Store.read(spec) <safetyneurons.activations.store.Store.read>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from safetyneurons.checks import check_max_length
from safetyneurons.constants import HOOK_POINTS, POOLINGS
from safetyneurons.errors import UserError
from safetyneurons.neurons.selection import NeuronSet

#: Token positions pooled over; only ``prompt`` (the whole chat-formatted prompt) so far.
FEATURE_POSITIONS = ("prompt",)
#: The model fields a probe's metadata keeps.
PROBE_MODEL_KEYS = ("ref", "sha256", "chat_template", "architecture")


def check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise UserError(f"Unknown pooling {pooling!r}. Choose one of: {', '.join(POOLINGS)} "
                        f"(mean over prompt tokens, or the last prompt token).")
    return pooling



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
        if self.hook_point not in HOOK_POINTS:
            raise UserError(f"Unknown hook point {self.hook_point!r}. Choose one of: {', '.join(HOOK_POINTS)}.")
        check_pooling(self.pooling)
        check_max_length(self.max_length)
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
        ns = neuron_set
        if ns is None and isinstance(meta, dict) and meta.get("neuron_set"):
            ns = NeuronSet.from_json(meta["neuron_set"], source=f"{source} (neuron set)")
        try:
            return cls(hook_point=meta["hook_point"], pooling=meta["pooling"], max_length=meta["max_length"],
                       neuron_set=ns, model=dict(meta.get("model") or {}),
                       positions=meta.get("positions", "prompt"))
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise UserError(f"{source}: malformed feature settings ({type(e).__name__}: {e}).") from None
        except UserError as e:
            raise UserError(f"{source}: {e}") from None

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
