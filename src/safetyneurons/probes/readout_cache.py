"""Per-text activations for the readout comparison (:mod:`safetyneurons.probes.readouts`), read once per text.

Every text goes through the model once (the activation reader, :meth:`ActivationReader.read_token_rows`, whole,
without a token limit) with the neurons of every layer up to the guard's deepest safety neuron. From that pass a
:class:`TextSet` keeps, per text:

- ``pooled``: ``[n, 3, d]`` float32, for every neuron of those layers: the mean over the content tokens, the last
  content token, the mean over the post-instruction template tokens (end of message + generation prompt);
- ``rows``: the per-token rows of the content tokens for the columns ``token_cols`` (the safety neurons and the
  random layer-matched draws: what the token-level agreement probe reads), float16, with ``offsets``;
- ``windows`` (when asked): the mean over content tokens of each piece the guard reads beyond the whole message
  (its 32-token windows and, when the guard's ``reading`` says so, one piece per sentence; a separate pass per
  piece, re-templated, exactly as served), with ``window_owner``; a message the guard reads whole (within its
  token limit) takes its whole-message row from ``pooled``.

Sets are saved as safetensors under the cache directory, keyed by a hash of their texts and the columns, so a
rerun reads them back instead of running the model again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from safetyneurons._io import progress_bar, save_tensors_atomic
from safetyneurons.activations.features import FeatureSpec
from safetyneurons.activations.reader import ActivationReader, reading_options
from safetyneurons.neurons.selection import NeuronSet

if TYPE_CHECKING:
    from safetyneurons.model.pair import LoadedModel

MEAN, LAST, POST = 0, 1, 2  # readouts kept in ``TextSet.pooled``
CHUNK = 128  # pieces read per call (bounds host memory of the per-token rows)


def layer_block(neuron_set: NeuronSet, deepest: int | None = None) -> NeuronSet:
    """Every neuron of the layers 0..``deepest`` (default: the deepest of ``neuron_set``), columns layer-major:
    ``layer * width + index``."""
    deepest = int(neuron_set.layers.max()) if deepest is None else int(deepest)
    layers = np.repeat(np.arange(deepest + 1), neuron_set.width)
    indices = np.tile(np.arange(neuron_set.width), deepest + 1)
    return NeuronSet(neuron_set.hook_point, neuron_set.num_layers, neuron_set.width, layers, indices,
                     np.zeros(len(layers)), model=dict(neuron_set.model), settings={"control": "layer_block"})


def columns(block: NeuronSet, subset: NeuronSet) -> np.ndarray:
    """Column indices of ``subset``'s neurons inside ``block`` (a :func:`layer_block`)."""
    return (subset.layers * block.width + subset.indices).astype(np.int64)


@dataclass
class TextSet:
    """Readouts of a list of texts (see the module docstring)."""

    pooled: np.ndarray
    rows: np.ndarray
    offsets: np.ndarray
    content: np.ndarray
    windows: np.ndarray | None = None
    window_owner: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.content)

    def token_rows(self, i: int) -> np.ndarray:
        return self.rows[self.offsets[i]:self.offsets[i + 1]]

    def tensors(self) -> dict[str, np.ndarray]:
        out = {"pooled": self.pooled, "rows": self.rows, "offsets": self.offsets, "content": self.content}
        if self.windows is not None:
            out.update(windows=self.windows, window_owner=self.window_owner)
        return out


class ReadoutCache:
    """Reads :class:`TextSet` s with one model and one layer block; ``token_cols``: columns kept per token."""

    def __init__(self, lm: LoadedModel, block: NeuronSet, token_cols: np.ndarray, directory: str | Path,
                 guard_max_length: int | None, batch_size: int = 16, progress: bool = True,
                 reading: dict | None = None):
        self.lm, self.block = lm, block
        self.token_cols = np.asarray(token_cols, dtype=np.int64)
        self.dir = Path(directory)
        self.progress = progress
        spec = FeatureSpec(block.hook_point, "mean", None, block, model=lm.describe())
        self.reader = ActivationReader(lm, spec, batch_size=batch_size)
        served = FeatureSpec(block.hook_point, "mean", guard_max_length, block, model=lm.describe())
        # the pieces the guard reads, as its guard.json's ``reading`` says (windows, sentence pieces)
        self.reading = reading_options(reading)
        self.served = ActivationReader(lm, served, batch_size=batch_size, **self.reading)

    def key(self, name: str, texts: Sequence[str], windows: bool) -> Path:
        h = hashlib.sha256()
        for t in texts:
            h.update(t.encode("utf-8") + b"\0")
        h.update(self.token_cols.tobytes() + str((len(self.block), self.reader.plan.layers, windows,
                                                  self.served.room, sorted(self.reading.items()))).encode())
        return self.dir / f"{name}-{h.hexdigest()[:16]}.safetensors"

    def read(self, name: str, texts: Sequence[str], windows: bool = False) -> TextSet:
        """The readouts of ``texts`` (from the cache when this set was read before)."""
        from safetensors.numpy import load_file

        path = self.key(name, texts, windows)
        if path.is_file():
            t = load_file(str(path))
            return TextSet(t["pooled"], t["rows"], t["offsets"], t["content"], t.get("windows"),
                           t.get("window_owner"))
        out = self._single_pass(name, texts)
        if windows:
            out.windows, out.window_owner = self._windows(name, texts, out)
        import torch

        self.dir.mkdir(parents=True, exist_ok=True)
        save_tensors_atomic(path, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.tensors().items()})
        return out

    def _single_pass(self, name: str, texts: Sequence[str]) -> TextSet:
        pieces = self.reader.pieces(list(texts))
        n, d = len(pieces), len(self.block)
        pooled = np.zeros((n, 3, d), dtype=np.float32)
        rows, lengths = [], np.zeros(n, dtype=np.int64)
        content = np.asarray([p.end - p.start for p in pieces], dtype=np.int64)
        with progress_bar(n, f"{name}: one pass per text", "text", self.progress) as bar:
            for a in range(0, n, CHUNK):
                got = self.reader.read_token_rows(pieces[a:a + CHUNK])
                for j in range(len(got.content)):
                    r = got.rows[got.offsets[j]:got.offsets[j + 1]].astype(np.float32)
                    c = int(got.content[j])
                    pooled[a + j, MEAN] = r[:c].mean(0)
                    pooled[a + j, LAST] = r[c - 1]
                    pooled[a + j, POST] = r[c:].mean(0) if len(r) > c else r[c - 1]
                    rows.append(r[:c][:, self.token_cols].astype(np.float16))
                    lengths[a + j] = c
                bar.update(len(got.content))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        stacked = np.concatenate(rows) if rows else np.zeros((0, len(self.token_cols)), np.float16)
        return TextSet(pooled, stacked, offsets, content)

    def piece_texts(self, texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """The content of every piece the guard reads of ``texts`` (the rows of :attr:`TextSet.windows`, in their
        order), decoded from its tokens, and the text each belongs to: what a text-only scorer reads as served."""
        served = self.served.pieces(list(texts))
        return self.served.piece_texts(served), np.asarray([p.owner for p in served], dtype=np.int64)

    def whole_pieces(self, texts: Sequence[str]) -> np.ndarray:
        """Which of the pieces the guard reads of ``texts`` (the rows of :attr:`TextSet.windows`) is a whole
        message, bool ``[pieces]``; the others are its windows and sentences."""
        return np.asarray([p.whole for p in self.served.pieces(list(texts))], dtype=bool)

    def _windows(self, name: str, texts: Sequence[str], single: TextSet) -> tuple[np.ndarray, np.ndarray]:
        """Pieces the guard reads, as it reads them: whole-message pieces from ``single``, windows and sentence
        pieces read here."""
        served = self.served.pieces(list(texts))
        is_whole = np.asarray([p.whole for p in served], dtype=bool)
        wins = [p for p, w in zip(served, is_whole) if not w]
        feats = np.zeros((len(served), len(self.block)), dtype=np.float32)
        owner = np.asarray([p.owner for p in served], dtype=np.int64)
        feats[is_whole] = single.pooled[owner[is_whole], MEAN]
        if wins:
            with progress_bar(len(wins), f"{name}: windows and sentences", "piece", self.progress) as bar:
                out = np.zeros((len(wins), len(self.block)), dtype=np.float32)
                for a in range(0, len(wins), CHUNK):
                    out[a:a + CHUNK], _ = self.served.read_pieces(wins[a:a + CHUNK])
                    bar.update(len(wins[a:a + CHUNK]))
            feats[~is_whole] = out
        return feats, owner
