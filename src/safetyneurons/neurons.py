"""Safety neurons: selection from change scores, the neuron-set file, sparsity statistics and plots."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ._io import atomic_write_json, read_json
from .errors import UserError

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
