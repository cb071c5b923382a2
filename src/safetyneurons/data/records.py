"""Labelled records: one type, one validator, one canonical JSONL form, one sha256, one seeded sampler.

A record is a JSON object ``{"id": str, "prompt": str, "label": 0 | 1}`` plus optional ``"source"``,
``"category"`` and ``"long"``; label 1 = unsafe (harmful), 0 = safe (benign). Every module that reads,
writes, hashes or samples records (data, twin, store, probe, pipeline, CLI) goes through this module.

Hash forms (:data:`HASH_FORMS`), each kept byte-for-byte as artifacts and caches were first keyed by them:

- ``file``: sha256 of the records' canonical JSONL with every field (what :func:`write_records` writes, so it
  equals the sha256 of a split file);
- ``store``: sha256 of the canonical JSONL of the fields an activation store keeps (:data:`STORE_FIELDS`,
  ``id`` as text, ``label`` as int): the store's ``records.jsonl`` and ``records_sha256``;
- ``training``: sha256 of the compact JSON list ``[[prompt, label], ...]`` (order-sensitive): the twin's
  ``data_sha256``, part of its cache key.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence, TypedDict

import numpy as np

from safetyneurons._io import atomic_write_bytes, check_parent_dirs, sha256_bytes, sha256_json
from safetyneurons.errors import UserError

#: The fields an activation store keeps of each record (``records.jsonl``).
STORE_FIELDS = ("id", "prompt", "label", "source", "category", "cluster")
HASH_FORMS = ("file", "store", "training")
HashForm = Literal["file", "store", "training"]


class Record(TypedDict, total=False):
    """A labelled prompt. ``id``, ``prompt`` and ``label`` are required once validated."""

    id: str
    prompt: str
    label: int
    source: str
    category: str
    long: bool


# ------------------------------------------------------------------------------------------ validate
def check_records(records: Iterable[dict], what: str = "data", *, need_ids: bool = True, unique_ids: bool = True,
                  need_both: bool = False) -> list[Record]:
    """Validate labelled records; returns copies with ``id`` as text and ``label`` as int (other fields kept).

    ``need_ids``: every record must have an ``id`` (else records without one get their position as id).
    ``unique_ids``: ids must not repeat. ``need_both``: both labels must occur. UserError otherwise, naming
    the record and what to fix.
    """
    records = list(records)
    if not records:
        raise UserError(f"{what}: the data is empty (no records). Give a split or JSONL file of "
                        f"{{\"id\": ..., \"prompt\": ..., \"label\": 0/1}} records.")
    out: list[Record] = []
    seen: set[str] = set()
    for k, r in enumerate(records):
        if not isinstance(r, dict):
            raise UserError(f"{what}: record {k + 1} is not an object; each record needs id, prompt and label.")
        if need_ids:
            missing = [f for f in ("id", "prompt", "label") if f not in r]
            if missing:
                raise UserError(f"{what}: record {k + 1} lacks {', '.join(missing)}; each record needs "
                                f"id, prompt and label (1 = unsafe, 0 = safe).")
        rid = str(r.get("id", k))
        prompt, label = r.get("prompt"), r.get("label")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"{what}: record {rid!r} has no non-empty 'prompt' string.")
        if label not in (0, 1) or isinstance(label, bool):
            raise UserError(f"{what}: record {rid!r} has label {label!r}; labels must be 1 (unsafe, harmful) "
                            f"or 0 (safe, benign).")
        if unique_ids:
            if rid in seen:
                raise UserError(f"{what}: duplicate record id {rid!r}; ids must be unique.")
            seen.add(rid)
        out.append({**r, "id": rid, "label": int(label)})
    if need_both:
        n_unsafe = sum(r["label"] for r in out)
        if n_unsafe in (0, len(out)):
            missing = "harmful (label 1)" if n_unsafe == 0 else "benign (label 0)"
            raise UserError(f"{what}: has no {missing} records; give both harmful and benign prompts.")
    return out


def labels(records: Sequence[dict]) -> np.ndarray:
    """The records' labels as int64 ``[n]``."""
    return np.array([int(r["label"]) for r in records], dtype=np.int64)


def prompts(records: Sequence[dict]) -> list[str]:
    return [r["prompt"] for r in records]


# ------------------------------------------------------------------------------------- serialise
# characters that str.splitlines() (and many JSONL readers) take for line ends and that json.dumps keeps as they
# are with ensure_ascii=False; escaped, so one record is one line for every reader
_LINE_ENDS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def jsonl(rows: Iterable[dict]) -> str:
    """The canonical JSONL form: one object a line, sorted keys, UTF-8 kept as is except the Unicode line and
    paragraph separators and NEL (escaped), a newline after each line."""
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True).translate(_LINE_ENDS) + "\n" for r in rows)


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSONL text: split on "\\n" only (a trailing "\\r" dropped), never on the other characters
    str.splitlines() breaks at, which may stand unescaped inside a JSON string."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def store_rows(records: Iterable[dict]) -> list[dict]:
    """Records reduced to :data:`STORE_FIELDS` (``id`` as text, ``label`` as int), as a store keeps them."""
    out = []
    for r in records:
        obj = {k: r[k] for k in STORE_FIELDS if k in r}
        obj["id"], obj["label"] = str(obj["id"]), int(obj["label"])
        out.append(obj)
    return out


def records_sha256(records: Iterable[dict], form: HashForm = "file") -> str:
    """sha256 of records in one of the :data:`HASH_FORMS` (see the module doc)."""
    if form == "file":
        return sha256_bytes(jsonl(records).encode("utf-8"))
    if form == "store":
        return sha256_bytes(jsonl(store_rows(records)).encode("utf-8"))
    if form == "training":
        return sha256_json([[r["prompt"], int(r["label"])] for r in records])
    raise ValueError(f"unknown records hash form {form!r}; one of {HASH_FORMS}")


def write_records(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Write records as canonical JSONL, atomically."""
    path = check_parent_dirs(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a file path ending in .jsonl.")
    return atomic_write_bytes(path, jsonl(records).encode("utf-8"))


# ---------------------------------------------------------------------------------------- sample
def stratified_sample(records: Sequence[dict], n: int, rng: np.random.Generator | int,
                      key: Callable[[dict], Any] = lambda r: r["label"],
                      quota: Literal["proportional", "fair"] = "proportional") -> list[dict]:
    """At most ``n`` records, drawn per stratum (``key``) with a seeded generator; original order kept.

    ``proportional``: each stratum keeps round(n * its share) records (the class ratio is kept).
    ``fair``: water-filling; strata smaller than the fair share are kept whole, the others share the rest
    equally (the cut is spread over sources). ``rng`` is a numpy Generator or a seed. Strata are visited in
    sorted order; same records, ``n`` and seed give the same sample.
    """
    if n >= len(records):
        return list(records)
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[key(r)].append(i)
    if quota == "proportional":
        take = {s: min(int(round(n * len(idx) / len(records))), len(idx)) for s, idx in groups.items()}
    elif quota == "fair":
        take = _fair_quota({s: len(idx) for s, idx in groups.items()}, n)
    else:
        raise ValueError(f"unknown quota {quota!r}")
    keep: list[int] = []
    for s in sorted(groups):
        idx = groups[s]
        if quota == "fair" and take[s] >= len(idx):
            keep.extend(idx)
        else:
            keep.extend(rng.choice(idx, size=take[s], replace=False).tolist())
    return [records[i] for i in sorted(keep)]


def _fair_quota(sizes: dict[Any, int], n: int) -> dict[Any, int]:
    quota: dict[Any, int] = {}
    left, remaining = n, sorted(sizes, key=lambda s: (sizes[s], s))
    while remaining:
        share = left // len(remaining)
        small = [s for s in remaining if sizes[s] <= share]
        if not small:
            extra = left - share * len(remaining)
            for j, s in enumerate(sorted(remaining)):
                quota[s] = share + (1 if j < extra else 0)
            break
        for s in small:
            quota[s] = sizes[s]
            left -= quota[s]
            remaining.remove(s)
    return quota


def hash_rank(record: dict) -> str:
    """A record's place in the fixed, unseeded order used for evaluation samples (sha256 of id and prompt)."""
    return hashlib.sha256(f"{record['id']}\n{record['prompt']}".encode()).hexdigest()


def first_by_hash(records: Sequence[dict], per_label: int, label_order: Sequence[int] = (1, 0)) -> list[dict]:
    """A fixed sample without a seed: the first ``per_label`` records of each label in :func:`hash_rank` order."""
    out: list[dict] = []
    for label in label_order:
        out.extend(sorted((r for r in records if r["label"] == label), key=hash_rank)[:per_label])
    return out
