"""Activation store: pooled activations of one model at one hook point, for every prompt of a labelled split.

Per prompt we keep the feature vector :mod:`safetyneurons.activations.features` defines: one pooled value per neuron at a
hook point, ``mean`` over the **content** tokens (the user's message only, never the system prompt or other
chat-template tokens; store format 1 averaged over the whole formatted prompt) or the ``last`` prompt token, for
every neuron at the hook point or only a neuron set's (early exit after its deepest layer). The manifest records
the :class:`~safetyneurons.activations.features.FeatureSpec` it was extracted with.

On disk a store is a directory::

    manifest.json              ids, labels, shapes, settings, model, neuron set, data hash, versions,
                               and the sha256 of every shard (checked on load)
    records.jsonl              the labelled records, in store row order (for text baselines and reports)
    shard-00000.safetensors    features [rows, d] (float16/float32) + labels [rows] + rows [rows]

Shards are cast, hashed and written on a background thread behind a bounded queue (memory stays bounded by
a few ``shard_size`` blocks; see :mod:`safetyneurons.activations.writer`), each atomically. Under ``torchrun`` every
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
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from safetyneurons import distributed
from safetyneurons._io import (atomic_write_bytes, atomic_write_json, atomic_write_text, check_out_dir, parse_json, progress_bar,
                  read_json, sha256_bytes, sha256_file, sha256_json, versions)
from safetyneurons.constants import STORE_DTYPES
from safetyneurons.errors import UserError
from safetyneurons.activations.features import FeatureSpec
from safetyneurons.activations.reader import ActivationReader, Piece, assemble
from safetyneurons.checks import check_positive_int
from safetyneurons.neurons.selection import NeuronSet, check_neuron_set_matches, neuron_set_key
from safetyneurons.data.records import check_records, jsonl, jsonl_lines, store_rows
from safetyneurons.activations.writer import ShardWriter
from safetyneurons.activations.store_checks import check_rows, read_resume_state, remove_stale_tmp, validate_manifest, writer_lock

if TYPE_CHECKING:
    from safetyneurons.model.pair import LoadedModel

STORE_FORMAT = "safetyneurons.store/2"  # 2: mean pooling over the content tokens only
PROGRESS_FILE = ".extract-progress.json"
SHARD_PREFIX = "shard-"


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

    @property
    def spec(self) -> FeatureSpec:
        """How the features were extracted (hook point, pooling, max length, neuron set, model)."""
        return FeatureSpec.from_meta(self.manifest, source=f"{self.path}/manifest.json")

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
            self._records = [parse_json(line, f"{path} line {k}") for k, line in enumerate(jsonl_lines(text), 1)
                             if line.strip()]
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

    def check_spec(self, spec: FeatureSpec) -> None:
        """The store must have been extracted the way ``spec`` reads (hook point, pooling, max length, model
        weights); UserError otherwise."""
        differ = [(k, self.manifest.get(k), getattr(spec, k)) for k in ("hook_point", "pooling", "max_length")
                  if self.manifest.get(k) != getattr(spec, k)]
        if differ:
            key, have, want = differ[0]
            raise UserError(f"Store {self.path} has {key} {have!r} but the probe was trained with {want!r}. "
                            f"Extract the data with the probe's settings, or pass a labelled file instead of a store.")
        if spec.fingerprint and self.fingerprint and spec.fingerprint != self.fingerprint:
            raise UserError(f"Store {self.path} comes from model {self.fingerprint[:12]}... but the probe was "
                            f"trained on {spec.fingerprint[:12]}.... Extract the data with the probe's model.")

    def read(self, spec: FeatureSpec) -> np.ndarray:
        """The columns ``spec`` reads, from a store extracted the same way (:meth:`check_spec`)."""
        self.check_spec(spec)
        if spec.neuron_set is not None:
            return self.select(spec.neuron_set)
        if self.layout != "all":
            raise UserError(f"The probe reads all neurons but store {self.path} holds only a neuron set's. "
                            f"Extract without --neurons.")
        return self.features

    def length_features(self) -> np.ndarray:
        """The length baseline's only feature: each prompt's token count, as float64 [n, 1]."""
        counts = self.manifest.get("n_tokens")
        if counts is None or len(counts) != len(self):
            raise UserError(f"Store {self.path} has no token counts (extracted by an older version). Re-run the "
                            f"same `safetyneurons extract` into it (finished shards are reused), or drop `length` "
                            f"from --feature-sets.")
        return np.asarray(counts, dtype=np.float64).reshape(-1, 1)

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
        n, d, shards = validate_manifest(manifest, str(mpath))  # shard names, fields and types checked
        features = np.empty((n, d), dtype=np.float32)
        labels = np.empty(n, dtype=np.int64)
        filled = np.zeros(n, dtype=bool)
        for shard in shards:
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
            if set(arrays) != {"features", "labels", "rows"} or arrays["features"].shape != (len(arrays["rows"]), d) \
                    or arrays["labels"].shape != arrays["rows"].shape:
                raise UserError(f"Store {path}: shard {shard['file']} has unexpected arrays or shapes. Rerun "
                                f"`safetyneurons extract` to rebuild it.")
            rows = check_rows(arrays["rows"], n, filled, shard["file"], f"Store {path}")
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
    check_out_dir(out, lambda d: all(_ours(p.name) for p in d.iterdir()),
                  "already holds files that are not part of an activation store. Give a new or empty directory.")


def _ours(name: str) -> bool:
    """A file an extraction writes (hidden files are ignored)."""
    return name in ("manifest.json", PROGRESS_FILE, "records.jsonl") or name.startswith(".") or \
        (name.startswith(SHARD_PREFIX) and name.endswith(".safetensors"))


def _prepare_out(out: Path, plan_hash: str, records_text: str, data_hash: str) -> dict[int, str]:
    """Resume: an identical finished store is kept; a matching unfinished one keeps its verified shards
    ({shard index: sha256}); anything else this module wrote is removed. Writes records.jsonl."""
    done: dict[int, str] = {}
    if out.is_dir():
        remove_stale_tmp(out)  # what a killed writer left
        mpath, ppath = out / "manifest.json", out / PROGRESS_FILE
        old = read_resume_state(mpath) or read_resume_state(ppath)  # validated; damaged: exit 2
        if old is not None and old.get("plan_sha256") == plan_hash:
            for sh in old.get("shards", []):
                sp = out / sh["file"]  # a plain shard-NNNNN name (checked)
                if sp.is_file() and sha256_file(sp) == sh["sha256"]:
                    done[sh["index"]] = sh["sha256"]
        else:
            _clean_dir(out)
        if mpath.exists():  # a store being redone must not look finished meanwhile
            mpath.unlink()
    out.mkdir(parents=True, exist_ok=True)
    rpath = out / "records.jsonl"
    if not rpath.is_file() or sha256_file(rpath) != data_hash:
        atomic_write_text(rpath, records_text)

    return done


@dataclass(frozen=True)
class _Extraction:
    """One extraction's inputs, shared by every rank's writing loop."""

    out: Path
    reader: ActivationReader
    pieces: list[Piece]
    labels: np.ndarray
    records_text: str
    data_hash: str
    plan_hash: str
    bounds: list[tuple[int, int]]
    manifest: dict
    dtype: str
    progress: bool
    writer_thread: bool


def extract(lm: LoadedModel, records: Sequence[dict], out_dir: str | os.PathLike, hook_point: str = "mlp_out",
            pooling: str = "mean", neuron_set: NeuronSet | None = None, shard_size: int = 256,
            dtype: str = "float16", batch_size: int = 16, max_length: int | None = 256, progress: bool = True,
            data_info: dict | None = None, writer_thread: bool = True) -> Store:
    """Extract pooled activations of ``lm`` over labelled ``records`` into a store at ``out_dir``.

    Features are read by the activation reader (:class:`~safetyneurons.activations.reader.ActivationReader`),
    one vector per prompt. Resumable: rerunning with the same model, records and settings skips shards already
    written (each verified by its sha256) and yields a byte-identical store. Different settings start the store
    over. ``data_info`` (e.g. the split's path and file hash) is recorded in the manifest. Shards are cast, hashed
    and written on a background thread (``writer_thread=False``: in the caller; the bytes are the same).
    """
    if dtype not in STORE_DTYPES:
        raise UserError(f"Unknown store dtype {dtype!r}. Choose one of: {', '.join(STORE_DTYPES)}.")
    shard_size = check_positive_int(shard_size, "shard size")
    records = check_records(records)
    out = Path(out_dir)
    check_store_out(out)
    spec = FeatureSpec(hook_point, pooling, max_length, neuron_set, model=lm.describe())
    reader = ActivationReader(lm, spec, batch_size=batch_size)
    pieces = reader.pieces([r["prompt"] for r in records])  # one per prompt: each tokenised once, here
    job = _plan_extraction(out, reader, pieces, records, shard_size, dtype, data_info, progress, writer_thread)
    rank = distributed.world()[0]
    if rank == 0:  # rank 0 (the only rank outside torchrun) holds the writer lock: one extraction at a time
        out.mkdir(parents=True, exist_ok=True)
        with writer_lock(out):
            return _write_store(job, rank)
    return _write_store(job, rank)


def _plan_extraction(out: Path, reader: ActivationReader, pieces: list[Piece], records: list[dict], shard_size: int,
                     dtype: str, data_info: dict | None, progress: bool, writer_thread: bool) -> _Extraction:
    spec, plan = reader.spec, reader.plan
    n = len(records)
    labels = np.array([int(r["label"]) for r in records], dtype=np.int64)
    records_text = jsonl(store_rows(records))  # records_sha256(records, form="store")
    data_hash = sha256_bytes(records_text.encode("utf-8"))
    settings = {"hook_point": spec.hook_point, "pooling": spec.pooling, "dtype": dtype, "shard_size": shard_size,
                "batch_size": reader.batch_size, "max_length": spec.max_length}
    model = spec.model
    key = {"format": STORE_FORMAT, "settings": settings, "records_sha256": data_hash,
           "model_sha256": model.get("sha256", ""), "model_ref": model.get("ref"),
           "neurons_sha256": neuron_set_key(spec.neuron_set) if spec.neuron_set is not None else None,
           "n": n, "d": plan.d}
    plan_hash = sha256_json(key)
    manifest = {
        "format": STORE_FORMAT, "n": n, "d": plan.d,
        "layout": "all" if spec.neuron_set is None else "neuron_set",
        "num_layers": plan.num_layers, "width": plan.width,
        **settings,
        **spec.fields(),
        "neurons_sha256": key["neurons_sha256"],
        "data": {**(data_info or {}), "n": n, "n_unsafe": int(labels.sum()), "n_safe": int(n - labels.sum())},
        "records_sha256": data_hash,
        "ids": [str(r["id"]) for r in records],
        "n_tokens": [len(p.ids) for p in pieces],
        "labels": labels.tolist(),
        "plan_sha256": plan_hash,
        "versions": versions(),
        "shards": [],
    }
    bounds = [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]
    return _Extraction(out, reader, pieces, labels, records_text, data_hash, plan_hash, bounds, manifest, dtype,
                       progress, writer_thread)


def _write_store(job: _Extraction, rank: int) -> Store:
    out, bounds, d = job.out, job.bounds, job.reader.plan.d
    # rank 0 prepares the directory; every rank learns what is done
    done = _prepare_out(out, job.plan_hash, job.records_text, job.data_hash) if rank == 0 else {}
    done = {int(i): h for i, h in distributed.broadcast(sorted(done.items()))}

    def save_progress():  # rank 0 only: ranks > 0 redo their shards after a crash
        if rank == 0:
            atomic_write_json(out / PROGRESS_FILE, {
                "plan_sha256": job.plan_hash,
                "shards": [{"index": i, "file": _shard_name(i), "sha256": done[i]} for i in sorted(done)]})

    save_progress()
    todo = distributed.share([i for i in range(len(bounds)) if i not in done])  # under torchrun: this rank's
    skipped = sum(bounds[i][1] - bounds[i][0] for i in done)
    bar = progress_bar(skipped + sum(bounds[i][1] - bounds[i][0] for i in todo), "extract", "prompt",
                       job.progress and rank == 0, initial=skipped, smoothing=0.1)
    if job.progress and done and rank == 0:
        print(f"Resuming: {len(done)} of {len(bounds)} shards already done and verified.", file=sys.stderr)

    def write_shard(i: int, batches) -> None:  # runs on the writer thread
        s, e = bounds[i]
        data = _shard_bytes(_checked(assemble(batches, e - s, d), job.dtype), job.labels[s:e], np.arange(s, e),
                            job.dtype, job.plan_hash, i)
        atomic_write_bytes(out / _shard_name(i), data)
        done[i] = sha256_bytes(data)
        save_progress()

    try:
        # the forward passes run here; cast, hash and write happen on the writer thread
        with ShardWriter(max_pending=2, threaded=job.writer_thread) as writer:
            for i in todo:
                s, e = bounds[i]
                batches = job.reader.batches(job.pieces[s:e], bar)
                writer.submit(lambda i=i, batches=batches: write_shard(i, batches))
    finally:
        bar.close()

    for part in distributed.gather(sorted(done.items())):  # every rank's shards (no-op outside torchrun)
        done.update({int(i): h for i, h in part})
    if rank == 0:
        _finish_store(out, job.manifest, bounds, done)
    distributed.barrier()
    return Store.load(out)


def _checked(feats: np.ndarray, dtype: str) -> np.ndarray:
    if not np.isfinite(feats).all():
        raise UserError("The model produced NaN/inf activations; run it in float32 (--model-dtype float32).")
    if dtype == "float16" and np.abs(feats).max() > np.finfo(np.float16).max:
        raise UserError(f"Activations up to {np.abs(feats).max():.3g} overflow float16 storage; "
                        f"rerun with --dtype float32.")
    return feats


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
