"""Activation store: pooled activations of one model at one hook point, for every prompt of a labelled split.

Per prompt we keep one pooled vector per layer at a hook point (see :mod:`safetyneurons.hooks`):

- ``mean``: mean over the **content** tokens, the user's message only (never the system prompt or other
  chat-template tokens, see :mod:`safetyneurons.positions`; pads are masked out with ``torch.where``). The
  reference student project averaged over the whole formatted prompt; store format 1 did the same;
- ``last``: the last prompt token (the position right before generation starts), as in the paper.

Either all neurons at the hook point are kept (``[num_layers * width]``, layer-major: column
``layer * width + index``) or only the neurons of a :class:`~safetyneurons.neurons.NeuronSet` (columns in
the set's order, sorted by (layer, index)). With a neuron set the forward pass only hooks the layers
holding neurons and stops right after the deepest of them (early exit).

On disk a store is a directory::

    manifest.json              ids, labels, shapes, settings, model, neuron set, data hash, versions,
                               and the sha256 of every shard (checked on load)
    records.jsonl              the labelled records, in store row order (for text baselines and reports)
    shard-00000.safetensors    features [rows, d] (float16/float32) + labels [rows] + rows [rows]

Shards are cast, hashed and written on a background thread behind a bounded queue (memory stays bounded by
a few ``shard_size`` blocks; see :mod:`safetyneurons.shard_writer`), each atomically. Under ``torchrun`` every
rank writes its share of the shards and rank 0 the manifest (:mod:`safetyneurons.distributed`). A shard's
content depends only on its own records and the settings (prompts are sorted by length *within* a shard
for batching), so a rerun after a crash skips finished shards (verified by checksum) and produces a
byte-identical store. ``manifest.json`` is written last: a directory without it is an unfinished store.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ._io import (atomic_write_bytes, atomic_write_json, atomic_write_text, read_json, sha256_bytes, sha256_file,
                  sha256_json, versions)
from . import distributed
from .errors import UserError
# the neuron-set checks live in neurons.py; re-exported here for existing callers
from .neurons import NeuronSet, check_neuron_set_matches, neuron_set_fingerprints, neuron_set_key  # noqa: F401
from .shard_writer import HostBatch, ShardWriter, to_host

STORE_FORMAT = "safetyneurons.store/2"  # 2: mean pooling over the content tokens only
POOLINGS = ("mean", "last")
STORE_DTYPES = ("float16", "float32")
PROGRESS_FILE = ".extract-progress.json"
SHARD_PREFIX = "shard-"


# ------------------------------------------------------------------------------------------ helpers
def check_pooling(pooling: str) -> str:
    if pooling not in POOLINGS:
        raise UserError(f"Unknown pooling {pooling!r}. Choose one of: {', '.join(POOLINGS)} "
                        f"(mean over prompt tokens, or the last prompt token).")
    return pooling


def _layer_plan(lm, hook_point: str, neuron_set: NeuronSet | None):
    """(layers to hook, {layer: index tensor or None}, feature width d, num_layers, width)."""
    import torch

    from .hooks import check_hook_point, hook_width, num_layers

    check_hook_point(hook_point)
    n_layers, width = num_layers(lm.model), hook_width(lm.model, hook_point)
    if neuron_set is None:
        return list(range(n_layers)), {i: None for i in range(n_layers)}, n_layers * width, n_layers, width
    check_neuron_set_matches(neuron_set, hook_point=hook_point, num_layers=n_layers, width=width,
                             fingerprint=getattr(lm, "fingerprint", "") or "", what="model")
    device = lm.device
    by_layer = {l: torch.as_tensor(idx, dtype=torch.long, device=device) for l, idx in neuron_set.by_layer().items()}
    return sorted(by_layer), by_layer, len(neuron_set), n_layers, width


def _token_lengths(lm, prompts: Sequence[str], max_length: int | None) -> np.ndarray:
    tok = lm.tokenizer
    enc = tok([lm.format(p) for p in prompts], padding=False, truncation=max_length is not None,
              max_length=max_length, add_special_tokens=not lm.chat_template)
    return np.array([len(ids) for ids in enc["input_ids"]], dtype=np.int64)


def token_counts(lm, prompts: Sequence[str], max_length: int | None = 256) -> np.ndarray:
    """Tokens of each formatted, truncated prompt: the length baseline's feature (stores: ``n_tokens``)."""
    return _token_lengths(lm, list(prompts), max_length)


def _pool_batch(lm, batch: Sequence[str], hook_point: str, pooling: str, layers, index, max_length) -> HostBatch:
    """Pooled features of one batch, float32 ``[len(batch), d]``, column blocks in layer order, on their way
    to host memory (the device-to-host copy does not block on CUDA; see :mod:`safetyneurons.shard_writer`)."""
    import torch

    from .hooks import forward_with_hooks

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
        idx = index[layer]
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
                       layers=layers, early_exit=True)
    device = pieces[layers[0]].device  # layers may sit on several devices (device_map="auto")
    return to_host(torch.cat([pieces[l].to(device) for l in layers], dim=1))


def _pooled_batches(lm, prompts: Sequence[str], hook_point: str, pooling: str, layers, index, batch_size: int,
                    max_length: int | None, bar=None) -> list[tuple[np.ndarray, HostBatch]]:
    """``[(row indices, pooled batch)]`` covering ``prompts``; batches are formed over length-sorted prompts."""
    if not prompts:
        return []
    lengths = _token_lengths(lm, prompts, max_length)
    order = np.argsort(-lengths, kind="stable")  # longest first: peak memory shows up at once
    out = []
    for start in range(0, len(order), batch_size):
        sel = order[start:start + batch_size]
        out.append((sel, _pool_batch(lm, [prompts[i] for i in sel], hook_point, pooling, layers, index,
                                     max_length)))
        if bar is not None:
            bar.update(len(sel))
    return out


def _assemble(batches: list[tuple[np.ndarray, HostBatch]], n: int, d: int) -> np.ndarray:
    """float32 ``[n, d]`` from ``_pooled_batches`` output (waits for pending device-to-host copies)."""
    feats = np.empty((n, d), dtype=np.float32)
    for sel, batch in batches:
        feats[sel] = batch.numpy()
    return feats


def _check_run_args(batch_size: int, max_length: int | None) -> None:
    if int(batch_size) < 1:
        raise UserError(f"batch size must be >= 1 (got {batch_size}).")
    if max_length is not None and int(max_length) < 1:
        raise UserError(f"max length must be >= 1 token (got {max_length}).")


def _progress_bar(total: int, enabled: bool, desc: str, initial: int = 0):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="prompt", desc=desc, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


def pooled_features(lm, prompts: Sequence[str], hook_point: str, pooling: str = "mean",
                    neuron_set: NeuronSet | None = None, batch_size: int = 16, max_length: int | None = 256,
                    progress: bool = False) -> np.ndarray:
    """Pooled activations of ``prompts`` (in memory): float32 ``[len(prompts), d]``.

    ``d`` is ``num_layers * width`` (layer-major) without a neuron set, else ``len(neuron_set)`` with
    columns in the set's (layer, index) order. With a neuron set only its layers are hooked and the
    forward pass stops after its deepest layer. Prompts are batched by token length; rows come back in
    the given order.
    """
    check_pooling(pooling)
    _check_run_args(batch_size, max_length)
    prompts = list(prompts)
    if any(not isinstance(p, str) for p in prompts):
        raise UserError("Prompts must be strings.")
    layers, index, d, _, _ = _layer_plan(lm, hook_point, neuron_set)
    bar = _progress_bar(len(prompts), progress, "pooled activations")
    try:
        batches = _pooled_batches(lm, prompts, hook_point, pooling, layers, index, int(batch_size), max_length, bar)
        return _assemble(batches, len(prompts), d)
    finally:
        bar.close()


# --------------------------------------------------------------------------------------- records
def check_records(records: Iterable[dict], what: str = "data") -> list[dict]:
    """Validate labelled records (id, prompt, label 0/1); ids must be unique. UserError otherwise."""
    records = list(records)
    if not records:
        raise UserError(f"{what}: the split is empty (no records). Give a split or file with labelled prompts.")
    seen: set[str] = set()
    for k, r in enumerate(records):
        if not isinstance(r, dict):
            raise UserError(f"{what}: record {k} is not an object with id, prompt and label.")
        missing = [f for f in ("id", "prompt", "label") if f not in r]
        if missing:
            raise UserError(f"{what}: record {k} lacks {', '.join(missing)}; each record needs "
                            f"id, prompt and label (1 = unsafe, 0 = safe).")
        if not isinstance(r["prompt"], str) or not r["prompt"].strip():
            raise UserError(f"{what}: record {r['id']!r} has an empty or non-text prompt.")
        if r["label"] not in (0, 1) or isinstance(r["label"], bool):
            raise UserError(f"{what}: record {r['id']!r} has label {r['label']!r}; labels must be 0 (safe) "
                            f"or 1 (unsafe).")
        rid = str(r["id"])
        if rid in seen:
            raise UserError(f"{what}: duplicate record id {rid!r}; ids must be unique.")
        seen.add(rid)
    return records


def _records_jsonl(records: Sequence[dict]) -> str:
    keep = ("id", "prompt", "label", "source", "category", "cluster")
    lines = []
    for r in records:
        obj = {k: r[k] for k in keep if k in r}
        obj["id"] = str(obj["id"])
        obj["label"] = int(obj["label"])
        lines.append(json.dumps(obj, sort_keys=True, ensure_ascii=False))
    return "\n".join(lines) + "\n"


def records_sha256(records: Sequence[dict]) -> str:
    """sha256 of the records as the store keeps them (canonical JSONL)."""
    return sha256_bytes(_records_jsonl(records).encode("utf-8"))


# ------------------------------------------------------------------------------------------ store
@dataclass
class Store:
    """A loaded activation store. ``features`` [n, d] float32, ``labels`` [n] int64, ``ids`` [n]."""

    path: Path
    manifest: dict
    features: np.ndarray
    labels: np.ndarray
    ids: list[str]
    _records: list[dict] | None = field(default=None, repr=False)

    # -- properties from the manifest
    @property
    def hook_point(self) -> str:
        return self.manifest["hook_point"]

    @property
    def pooling(self) -> str:
        return self.manifest["pooling"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["model"].get("sha256", "") or ""

    @property
    def num_layers(self) -> int:
        return int(self.manifest["num_layers"])

    @property
    def width(self) -> int:
        return int(self.manifest["width"])

    @property
    def layout(self) -> str:
        """``all`` (every neuron at the hook point) or ``neuron_set``."""
        return self.manifest["layout"]

    @property
    def neuron_set(self) -> NeuronSet | None:
        ns = self.manifest.get("neuron_set")
        return None if ns is None else NeuronSet.from_json(ns, source=f"{self.path}/manifest.json")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def records(self) -> list[dict]:
        """The labelled records (with prompts) in row order."""
        if self._records is None:
            path = self.path / "records.jsonl"
            text = path.read_text(encoding="utf-8")
            want = self.manifest.get("records_sha256")
            if want and sha256_bytes(text.encode("utf-8")) != want:
                raise UserError(f"{path}: checksum mismatch (the file is corrupted or was edited). "
                                f"Re-run `safetyneurons extract` into this directory to rebuild it.")
            self._records = [json.loads(line) for line in text.splitlines() if line.strip()]
        return self._records

    @property
    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.records]

    # -- column selection
    def columns_for(self, neuron_set: NeuronSet) -> np.ndarray:
        """Column indices of ``neuron_set``'s neurons in this store (in the set's order).

        Works on an all-neurons store (any set at the same hook point and dims) and on a store extracted
        with a neuron set that contains every requested neuron. UserError otherwise.
        """
        check_neuron_set_matches(neuron_set, hook_point=self.hook_point, num_layers=self.num_layers,
                                 width=self.width, fingerprint=self.fingerprint, what=f"store {self.path}")
        want = neuron_set.flat_indices()
        if self.layout == "all":
            return want.astype(np.int64)
        have = self.neuron_set.flat_indices()
        pos = np.searchsorted(have, want)
        pos = np.clip(pos, 0, len(have) - 1)
        if not np.array_equal(have[pos], want):
            raise UserError(f"Store {self.path} holds only the {len(have)} neurons of the set it was extracted "
                            f"with, which lacks some requested neurons. Extract without --neurons to keep "
                            f"all neurons, or with the same neuron set.")
        return pos.astype(np.int64)

    def select(self, neuron_set: NeuronSet) -> np.ndarray:
        """Features of ``neuron_set``'s neurons: float32 [n, len(neuron_set)]."""
        return np.ascontiguousarray(self.features[:, self.columns_for(neuron_set)])

    # -- io
    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> "Store":
        """Load a store, verifying every shard's sha256 against the manifest (UserError on mismatch)."""
        from safetensors import SafetensorError
        from safetensors.numpy import load as st_load

        path = Path(path)
        if not path.is_dir():
            raise UserError(f"Store {path} does not exist (or is not a directory). Create it with "
                            f"`safetyneurons extract`.")
        mpath = path / "manifest.json"
        if not mpath.is_file():
            hint = (" It is an unfinished extraction: rerun the same `safetyneurons extract` command to resume."
                    if (path / PROGRESS_FILE).exists() else "")
            raise UserError(f"{path} is not an activation store (no manifest.json).{hint}")
        manifest = read_json(mpath)
        if isinstance(manifest, dict) and manifest.get("format") == "safetyneurons.store/1":
            raise UserError(f"{mpath}: an activation store of format 1, whose mean pooling also counted chat-template "
                            f"tokens; this version pools the user's message only. Re-run `safetyneurons extract`.")
        if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
            raise UserError(f"{mpath}: not a safetyneurons activation store (expected format {STORE_FORMAT}).")
        n, d = int(manifest["n"]), int(manifest["d"])
        features = np.empty((n, d), dtype=np.float32)
        labels = np.empty(n, dtype=np.int64)
        filled = np.zeros(n, dtype=bool)
        for shard in manifest["shards"]:
            spath = path / shard["file"]
            if not spath.is_file():
                raise UserError(f"Store {path}: shard {shard['file']} is missing. Rerun `safetyneurons extract` "
                                f"with the same options to rebuild it.")
            data = spath.read_bytes()
            if verify and sha256_bytes(data) != shard["sha256"]:
                raise UserError(f"Store {path}: shard {shard['file']} is corrupted (sha256 does not match the "
                                f"manifest). Rerun `safetyneurons extract` with the same options into this "
                                f"directory to rebuild it.")
            try:
                arrays = st_load(data)
            except (SafetensorError, ValueError) as e:
                raise UserError(f"Store {path}: shard {shard['file']} cannot be read ({e}). Rerun "
                                f"`safetyneurons extract` to rebuild it.") from None
            rows = arrays["rows"]
            features[rows] = arrays["features"].astype(np.float32)
            labels[rows] = arrays["labels"]
            filled[rows] = True
        if not filled.all():
            raise UserError(f"Store {path}: the shards do not cover all {n} rows. Rerun `safetyneurons extract`.")
        if not np.array_equal(labels, np.asarray(manifest["labels"], dtype=np.int64)):
            raise UserError(f"Store {path}: shard labels disagree with the manifest. Rerun `safetyneurons extract`.")
        return cls(path=path, manifest=manifest, features=features, labels=labels, ids=list(manifest["ids"]))


def _shard_name(i: int) -> str:
    return f"{SHARD_PREFIX}{i:05d}.safetensors"


def _shard_bytes(features: np.ndarray, labels: np.ndarray, rows: np.ndarray, dtype: str, plan_hash: str,
                 shard: int) -> bytes:
    from safetensors.numpy import save

    # one metadata key only: safetensors writes a multi-key metadata map in arbitrary order
    meta = {"safetyneurons": json.dumps({"format": STORE_FORMAT, "plan": plan_hash, "shard": shard},
                                        sort_keys=True)}
    return save({"features": np.ascontiguousarray(features.astype(dtype)),
                 "labels": np.ascontiguousarray(labels.astype(np.int64)),
                 "rows": np.ascontiguousarray(rows.astype(np.int64))}, metadata=meta)


def _clean_dir(out: Path) -> None:
    """Remove what an earlier, different extraction left in ``out`` (only files this module writes)."""
    for name in ("manifest.json", PROGRESS_FILE, "records.jsonl"):
        p = out / name
        if p.exists():
            p.unlink()
    for p in out.glob(f"{SHARD_PREFIX}*.safetensors"):
        p.unlink()


def check_store_out(out: Path) -> None:
    """``out`` must be a new directory, an empty one, or an (unfinished) activation store."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is an existing file; give a directory path.")
    if out.is_dir():
        ours = {"manifest.json", PROGRESS_FILE, "records.jsonl"}
        foreign = [p.name for p in out.iterdir()
                   if p.name not in ours and not (p.name.startswith(SHARD_PREFIX) and p.suffix == ".safetensors")
                   and not p.name.startswith(".")]
        if foreign:
            raise UserError(f"--out {out} already holds files that are not part of an activation store "
                            f"({', '.join(sorted(foreign)[:3])}...). Give a new or empty directory.")


def _prepare_out(out: Path, plan_hash: str, records_text: str, data_hash: str) -> dict[int, str]:
    """Resume: an identical finished store is kept; a matching unfinished one keeps its verified shards
    ({shard index: sha256}); anything else this module wrote is removed. Writes records.jsonl."""
    done: dict[int, str] = {}
    if out.is_dir():
        mpath, ppath = out / "manifest.json", out / PROGRESS_FILE
        old = None
        for p in (mpath, ppath):
            if p.is_file():
                try:
                    old = json.loads(p.read_text(encoding="utf-8"))
                    break
                except ValueError:
                    old = None
        if old is not None and old.get("plan_sha256") == plan_hash:
            for sh in old.get("shards", []):
                i = int(sh["index"])
                sp = out / sh["file"]
                if sp.is_file() and sha256_file(sp) == sh["sha256"]:
                    done[i] = sh["sha256"]
        else:
            _clean_dir(out)
        if mpath.exists():  # a store being redone must not look finished meanwhile
            mpath.unlink()
    out.mkdir(parents=True, exist_ok=True)
    rpath = out / "records.jsonl"
    if not rpath.is_file() or sha256_file(rpath) != data_hash:
        atomic_write_text(rpath, records_text)

    return done


def extract(lm, records: Sequence[dict], out_dir: str | os.PathLike, hook_point: str = "mlp_out",
            pooling: str = "mean", neuron_set: NeuronSet | None = None, shard_size: int = 256,
            dtype: str = "float16", batch_size: int = 16, max_length: int | None = 256, progress: bool = True,
            data_info: dict | None = None, writer_thread: bool = True) -> Store:
    """Extract pooled activations of ``lm`` over labelled ``records`` into a store at ``out_dir``.

    Resumable: rerunning with the same model, records and settings skips shards already written (each
    verified by its sha256) and yields a byte-identical store. Different settings start the store over.
    ``data_info`` (e.g. the split's path and file hash) is recorded in the manifest. Shards are cast, hashed
    and written on a background thread (``writer_thread=False``: in the caller; the bytes are the same).
    """
    from .hooks import check_hook_point

    check_hook_point(hook_point)
    check_pooling(pooling)
    _check_run_args(batch_size, max_length)
    if dtype not in STORE_DTYPES:
        raise UserError(f"Unknown store dtype {dtype!r}. Choose one of: {', '.join(STORE_DTYPES)}.")
    if int(shard_size) < 1:
        raise UserError(f"shard size must be >= 1 (got {shard_size}).")
    shard_size, batch_size = int(shard_size), int(batch_size)
    records = check_records(records)
    out = Path(out_dir)
    check_store_out(out)
    layers, index, d, n_layers, width = _layer_plan(lm, hook_point, neuron_set)

    n = len(records)
    prompts = [r["prompt"] for r in records]
    labels = np.array([int(r["label"]) for r in records], dtype=np.int64)
    records_text = _records_jsonl(records)
    data_hash = sha256_bytes(records_text.encode("utf-8"))
    settings = {"hook_point": hook_point, "pooling": pooling, "dtype": dtype, "shard_size": shard_size,
                "batch_size": batch_size, "max_length": max_length}
    model = lm.describe()
    plan = {"format": STORE_FORMAT, "settings": settings, "records_sha256": data_hash,
            "model_sha256": model.get("sha256", ""), "model_ref": model.get("ref"),
            "neurons_sha256": neuron_set_key(neuron_set) if neuron_set is not None else None,
            "n": n, "d": d}
    plan_hash = sha256_json(plan)
    bounds = [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]

    manifest = {
        "format": STORE_FORMAT,
        "n": n, "d": d,
        "layout": "all" if neuron_set is None else "neuron_set",
        "num_layers": n_layers, "width": width,
        **settings,
        "model": model,
        "neuron_set": neuron_set.to_json() if neuron_set is not None else None,
        "neurons_sha256": plan["neurons_sha256"],
        "data": {**(data_info or {}), "n": n, "n_unsafe": int(labels.sum()), "n_safe": int(n - labels.sum())},
        "records_sha256": data_hash,
        "ids": [str(r["id"]) for r in records],
        "n_tokens": token_counts(lm, prompts, max_length).tolist(),
        "labels": labels.tolist(),
        "plan_sha256": plan_hash,
        "versions": versions(),
        "shards": [],
    }

    # rank 0 (the only rank outside torchrun) prepares the directory; every rank learns what is done
    rank = distributed.world()[0]
    done = _prepare_out(out, plan_hash, records_text, data_hash) if rank == 0 else {}
    done = {int(i): h for i, h in distributed.broadcast(sorted(done.items()))}

    def save_progress():  # rank 0 only: ranks > 0 redo their shards after a crash
        if rank != 0:
            return
        atomic_write_json(out / PROGRESS_FILE, {
            "plan_sha256": plan_hash,
            "shards": [{"index": i, "file": _shard_name(i), "sha256": done[i]} for i in sorted(done)]})

    save_progress()
    todo = distributed.share([i for i in range(len(bounds)) if i not in done])  # under torchrun: this rank's
    skipped = sum(bounds[i][1] - bounds[i][0] for i in done)
    bar = _progress_bar(skipped + sum(bounds[i][1] - bounds[i][0] for i in todo), progress and rank == 0,
                        "extract", initial=skipped)
    if progress and done and rank == 0:
        print(f"Resuming: {len(done)} of {len(bounds)} shards already done and verified.", file=sys.stderr)
    def write_shard(i: int, batches) -> None:  # runs on the writer thread
        s, e = bounds[i]
        feats = _assemble(batches, e - s, d)
        if not np.isfinite(feats).all():
            raise UserError("The model produced NaN/inf activations; run it in float32 (--model-dtype float32).")
        if dtype == "float16" and np.abs(feats).max() > np.finfo(np.float16).max:
            raise UserError(f"Activations up to {np.abs(feats).max():.3g} overflow float16 storage; "
                            f"rerun with --dtype float32.")
        data = _shard_bytes(feats, labels[s:e], np.arange(s, e), dtype, plan_hash, i)
        atomic_write_bytes(out / _shard_name(i), data)
        done[i] = sha256_bytes(data)
        save_progress()

    try:
        # the forward passes run here; cast, hash and write happen on the writer thread
        with ShardWriter(max_pending=2, threaded=writer_thread) as writer:
            for i in todo:
                s, e = bounds[i]
                batches = _pooled_batches(lm, prompts[s:e], hook_point, pooling, layers, index, batch_size,
                                          max_length, bar)
                writer.submit(lambda i=i, batches=batches: write_shard(i, batches))
    finally:
        bar.close()

    for part in distributed.gather(sorted(done.items())):  # every rank's shards (no-op outside torchrun)
        done.update({int(i): h for i, h in part})
    if rank == 0:
        _finish_store(out, manifest, bounds, done)
    distributed.barrier()
    return Store.load(out)


def _finish_store(out: Path, manifest: dict, bounds, done: dict[int, str]) -> None:
    manifest["shards"] = [{"index": i, "file": _shard_name(i), "rows": [s, e], "sha256": done[i]}
                          for i, (s, e) in enumerate(bounds)]
    # leftover shards from a larger earlier plan would be confusing: drop them
    keep = {_shard_name(i) for i in range(len(bounds))}
    for p in out.glob(f"{SHARD_PREFIX}*.safetensors"):
        if p.name not in keep:
            p.unlink()
    atomic_write_json(out / "manifest.json", manifest)
    (out / PROGRESS_FILE).unlink(missing_ok=True)


def check_compatible(a: Store, b: Store, what_a: str = "train store", what_b: str = "test store") -> None:
    """Two stores can be used together (same model weights, hook point, pooling, layout, columns)."""
    for key, label in (("hook_point", "hook point"), ("pooling", "pooling"), ("layout", "layout"),
                       ("num_layers", "number of layers"), ("width", "width"), ("d", "number of features"),
                       ("neurons_sha256", "neuron set")):
        if a.manifest.get(key) != b.manifest.get(key):
            raise UserError(f"The {what_a} ({a.path}) and the {what_b} ({b.path}) differ in {label}: "
                            f"{a.manifest.get(key)!r} vs {b.manifest.get(key)!r}. Extract both with the same "
                            f"model and options.")
    if a.fingerprint and b.fingerprint and a.fingerprint != b.fingerprint:
        raise UserError(f"The {what_a} ({a.path}) and the {what_b} ({b.path}) come from different model weights "
                        f"({a.fingerprint[:12]}... vs {b.fingerprint[:12]}...). Extract both with the same model.")


def describe_store(store: Store) -> dict[str, Any]:
    """Short provenance record of a store (for reports and guards)."""
    m = store.manifest
    return {"path": str(store.path), "n": m["n"], "d": m["d"], "layout": m["layout"], "hook_point": m["hook_point"],
            "pooling": m["pooling"], "max_length": m["max_length"], "records_sha256": m["records_sha256"],
            "data": m.get("data", {}), "model": {k: m["model"].get(k) for k in ("ref", "sha256")},
            "manifest_sha256": sha256_file(store.path / "manifest.json")}
