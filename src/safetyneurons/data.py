"""Labelled prompt data: named datasets, user files, cleaning, and the deterministic default splits.

A record is ``{"id": str, "prompt": str, "label": int, "source": str}`` plus optional ``"category"`` and
``"long"`` (true when the prompt is longer than ``max_chars``); label 1 = unsafe/harmful, 0 = safe/benign.
Records of the default splits also carry ``"cluster"``: their near-duplicate cluster (see
:mod:`safetyneurons.clusters`); a cluster lies whole in one split, and the bootstrap resamples clusters.

Entry points other modules use:

* :func:`build_splits` writes ``twin/contrast/train/test/heldout.jsonl`` + ``manifest.json`` into a directory;
* :func:`default_splits_dir` builds the default splits once into the cache and returns the directory;
* :func:`read_records` reads a split file, any user file (CSV, TSV, JSON, JSONL, Parquet, text), a named
  dataset (``advbench``...), ``split:NAME`` (a default split) or ``hf:ORG/NAME[:SPLIT]`` (needs ``datasets``);
* :func:`read_prompts` the same, prompts only, labels not needed.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from ._io import atomic_dir, atomic_write_bytes, atomic_write_json, cache_dir, check_out_dir, sha256_bytes
from ._io import sha256_file, sha256_json, versions
from .clusters import THRESHOLD as CLUSTER_THRESHOLD
from .clusters import assign_clusters, assign_splits
from .datasets import REGISTRY, TRAIN_ONLY, get_spec, list_datasets, load_dataset, normalise_text
from .errors import UserError
from .validation import add_train_only, carve_validation

__all__ = [
    "build_splits", "default_splits_dir", "read_records", "read_prompts", "list_datasets", "load_dataset",
    "clean", "records_sha256", "write_records", "near_key", "normalise_label", "SPLIT_NAMES",
    "DEFAULT_SETTINGS",
]

SPLITS_FORMAT = "safetyneurons.splits/1"
# Bump when the recipe changes in a way that changes the default split files (invalidates the cache).
RECIPE_VERSION = 3
SPLIT_NAMES = ("twin", "contrast", "train", "val", "test", "heldout")

DEFAULT_SETTINGS: dict[str, Any] = {
    "n_twin": 150,
    "n_contrast": 100,
    "n_contrast_benign": 100,
    "test_size": 0.2,
    "val_size": 0.15,
    "max_chars": 2000,
    "harmful": ["advbench", "donotanswer", "pasttense", "rhopairs_harmful", "templates_harmful"],
    "benign": ["bfcl", "helm", "rhopairs_benign", "templates_benign"],
    "heldout_harmful": ["harmbench", "strongreject"],
    "heldout_benign": ["mtbench", "ifbench", "overrefusal"],  # overrefusal: the held-out hard-negative source
}

PROMPT_COLUMNS = ("prompt", "text", "content", "instruction", "goal", "question", "query", "forbidden_prompt")
LABEL_COLUMNS = ("label",)
FORMATS = {
    ".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl",
    ".parquet": "parquet", ".pq": "parquet", ".txt": "text", ".text": "text",
}

_LABEL_WORDS = {
    "0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1,
    "safe": 0, "unsafe": 1, "benign": 0, "harmful": 1,
}
LABEL_VOCABULARY = "0/1, true/false, safe/unsafe or benign/harmful"


# ====================================================================== labels and text

def normalise_label(value: Any) -> int | None:
    """0/1, true/false, safe/unsafe, benign/harmful (case-insensitive) -> 0 or 1; None if not recognised."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return int(value) if value in (0, 1) else None
    if isinstance(value, str):
        return _LABEL_WORDS.get(value.strip().lower())
    if hasattr(value, "item"):  # numpy scalars
        return normalise_label(value.item())
    return None


def parse_label_arg(label: Any) -> int:
    """A label given on the command line / as an argument."""
    got = normalise_label(label)
    if got is None:
        raise UserError(f"Unknown label {label!r}; use {LABEL_VOCABULARY}.")
    return got


_NON_WORD = re.compile(r"[\W_]+")


def near_key(prompt: str) -> str:
    """Key for near-exact duplicate detection: NFKC, case-folded, punctuation and whitespace removed."""
    text = normalise_text(prompt).casefold()
    key = _NON_WORD.sub("", text)
    return key or text  # a prompt of punctuation/emoji only is compared as it is


# ====================================================================== serialisation

def _jsonl_bytes(records: Iterable[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode("utf-8")


def records_sha256(records: Iterable[dict]) -> str:
    """sha256 of the records in their JSONL file form (equals the sha256 of the file write_records writes)."""
    return sha256_bytes(_jsonl_bytes(records))


def write_records(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Write records as JSONL (sorted keys, UTF-8, one object a line), atomically."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a file path ending in .jsonl.")
    return atomic_write_bytes(path, _jsonl_bytes(records))


# ====================================================================== reading user files

def _detect_format(path: Path, fmt: str | None) -> str:
    if fmt:
        fmt = fmt.lower()
        if fmt not in set(FORMATS.values()):
            raise UserError(f"Unknown format {fmt!r}; use one of: {', '.join(sorted(set(FORMATS.values())))}.")
        return fmt
    got = FORMATS.get(path.suffix.lower())
    if got is None:
        raise UserError(
            f"{path}: cannot tell the format from the extension {path.suffix!r}. Use one of "
            f"{', '.join(FORMATS)}, or name the format (--format csv|tsv|json|jsonl|parquet|text).")
    return got


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8.") from None


def _rows_from_file(path: Path, fmt: str) -> list[Any]:
    """Rows of a user file: dicts (tabular formats) or strings (text lines, JSON strings)."""
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path}: not a readable Parquet file ({e}).") from None
    text = _read_text(path)
    if not text.strip():
        raise UserError(f"{path}: the file is empty; give a file with prompts.")
    if fmt in ("csv", "tsv"):
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="," if fmt == "csv" else "\t")
            rows = list(reader)
        except csv.Error as e:
            raise UserError(f"{path}: not valid {fmt.upper()} ({e}).") from None
        if reader.fieldnames is None or not rows:
            raise UserError(f"{path}: no data rows under the header line; give a file with prompts.")
        return rows
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON array of objects (one per prompt), got a "
                            f"{type(data).__name__}. For one object per line use a .jsonl file.")
        return data
    if fmt == "jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {lineno}: not valid JSON ({e.msg}, column {e.colno}); "
                                f"each line must be one JSON object.") from None
        return rows
    assert fmt == "text", fmt
    return [line for line in text.splitlines() if line.strip()]


def _pick_column(columns: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str,
                 where: str) -> str | None:
    if wanted is not None:
        if wanted in columns:
            return wanted
        raise UserError(f"{where}: no {what} column {wanted!r}; the columns are: {', '.join(map(str, columns))}.")
    lower = {str(c).lower(): c for c in columns}
    for cand in candidates:
        if cand in lower:
            return lower[cand]
    return None


def _cell_text(value: Any, where: str, column: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise UserError(f"{where}: the {column!r} value {str(value)[:60]!r} is not text.")


def _records_from_rows(rows: list[Any], where: str, stem: str, prompt_col: str | None, label_col: str | None,
                       label: Any, need_label: bool) -> list[dict]:
    if label is not None and label_col is not None:
        raise UserError("Give either a label column (--label-col) or one label for every prompt (--label), not both.")
    fixed = parse_label_arg(label) if label is not None else None
    if not rows:
        raise UserError(f"{where}: no records; give a file with prompts.")
    dict_rows = [r for r in rows if isinstance(r, dict)]
    str_rows = [r for r in rows if isinstance(r, str)]
    if len(dict_rows) + len(str_rows) != len(rows) or (dict_rows and str_rows):
        bad = next(r for r in rows if not isinstance(r, (dict, str)) or (dict_rows and str_rows and isinstance(r, str)))
        raise UserError(f"{where}: every row must be an object with a prompt field (or every row a string); "
                        f"found {type(bad).__name__} {str(bad)[:60]!r}.")
    if str_rows:  # plain prompts: text files, JSON arrays of strings
        if prompt_col is not None or label_col is not None:
            raise UserError(f"{where}: holds plain prompts without columns; drop --prompt-col/--label-col.")
        if fixed is None and need_label:
            raise UserError(f"{where}: plain prompts carry no label; give one for all of them with "
                            f"--label (harmful or benign).")
        return [_make_record(f"{stem}:{i}", text, fixed, stem, None, None) for i, text in enumerate(str_rows)]

    columns: list[str] = []
    for r in dict_rows:  # union of keys, in first-seen order (JSON objects may differ)
        columns.extend(k for k in r if k not in columns)
    pcol = _pick_column(columns, prompt_col, PROMPT_COLUMNS, "prompt", where)
    if pcol is None:
        raise UserError(f"{where}: no prompt column found (looked for {', '.join(PROMPT_COLUMNS)}); the columns "
                        f"are: {', '.join(map(str, columns))}. Name it with --prompt-col.")
    lcol = None
    if fixed is None:
        lcol = _pick_column(columns, label_col, LABEL_COLUMNS, "label", where)
        if lcol is None and need_label:
            raise UserError(f"{where}: no label column found (looked for {', '.join(LABEL_COLUMNS)}); the columns "
                            f"are: {', '.join(map(str, columns))}. Name it with --label-col, or give one label "
                            f"for every prompt with --label harmful|benign.")
    keep_id = "id" in columns and pcol != "id"
    keep_source = "source" in columns and pcol != "source"
    keep_category = "category" in columns and pcol != "category"
    keep_cluster = "cluster" in columns and pcol != "cluster"

    records, unknown = [], Counter()
    for i, row in enumerate(dict_rows):
        if lcol is not None:
            lab = normalise_label(row.get(lcol))
            if lab is None:
                unknown[repr(row.get(lcol))] += 1
        else:
            lab = fixed
        rid = row.get("id") if keep_id else None
        rid = str(rid) if rid not in (None, "") else f"{stem}:{i}"
        src = row.get("source") if keep_source else None
        src = str(src) if src not in (None, "") else stem
        cat = row.get("category") if keep_category else None
        rec = _make_record(rid, _cell_text(row.get(pcol), where, pcol), lab, src, cat if cat not in (None, "") else None,
                           row.get("long") if row.get("long") is True else None)
        if keep_cluster and row.get("cluster") not in (None, ""):
            rec["cluster"] = str(row["cluster"])  # near-duplicate cluster of the default splits
        if "hazard" in columns and pcol != "hazard" and row.get("hazard") not in (None, ""):
            rec["hazard"] = str(row["hazard"])  # hazard category (safetyneurons.taxonomy)
        records.append(rec)
    if unknown:
        shown = ", ".join(f"{v} ({n} rows)" for v, n in sorted(unknown.items())[:10])
        raise UserError(f"{where}: unknown label values in column {lcol!r}: {shown}. Labels must be "
                        f"{LABEL_VOCABULARY} (case-insensitive).")
    return records


def _make_record(rid: str, prompt: str, label: int | None, source: str, category: Any, long: Any) -> dict:
    rec: dict[str, Any] = {"id": rid, "prompt": normalise_text(prompt), "source": source}
    if label is not None:
        rec["label"] = label
    if category is not None:
        rec["category"] = str(category)
    if long:
        rec["long"] = True
    return rec


def _records_from_hub(ref: str, prompt_col, label_col, label, need_label) -> list[dict]:
    spec = ref[3:]
    name, _, split = spec.partition(":")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise UserError(f"{ref!r}: give a hub dataset as hf:ORG/NAME or hf:ORG/NAME:SPLIT.")
    try:
        import datasets as hf_datasets  # optional: pip install 'safetyneurons[hub]'
    except ImportError:
        raise UserError(f"{ref}: reading hub datasets needs the `datasets` library (pip install datasets) and "
                        f"network access; or save the data as CSV/JSONL and pass the file.") from None
    try:
        ds = hf_datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # network, auth, unknown name: all fixable by the user
        raise UserError(f"{ref}: could not load from the Hugging Face hub ({type(e).__name__}: {e}). "
                        f"Check the name and your network, or save the data as a file and pass that.") from None
    stem = name.replace("/", "_")
    return _records_from_rows(ds.to_list(), ref, stem, prompt_col, label_col, label, need_label)


def _resolve_split(ref: str) -> Path:
    name = ref.split(":", 1)[1]
    if name not in SPLIT_NAMES:
        raise UserError(f"{ref!r}: unknown split {name!r}; use split:{'|split:'.join(SPLIT_NAMES)}.")
    return default_splits_dir() / f"{name}.jsonl"


def _load_any(path_or_name: str | os.PathLike, prompt_col=None, label_col=None, label=None, fmt=None,
              need_label=True) -> list[dict]:
    ref = str(path_or_name)
    path = Path(ref).expanduser()
    if ref.startswith("split:") and not path.exists():
        path = _resolve_split(ref)
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a file (e.g. {path / 'train.jsonl'}) or a dataset name.")
    if path.is_file():
        fmt = _detect_format(path, fmt)
        return _records_from_rows(_rows_from_file(path, fmt), str(path), path.stem, prompt_col, label_col,
                                  label, need_label)
    if ref.startswith("hf:"):
        return _records_from_hub(ref, prompt_col, label_col, label, need_label)
    if ref.strip().lower() in REGISTRY:
        spec = get_spec(ref)
        if label is not None and parse_label_arg(label) != spec.label:
            raise UserError(f"{spec.name} is a {spec.label_name} dataset; its label cannot be changed with --label.")
        return load_dataset(ref)
    raise UserError(f"{ref}: no such file, and not a dataset name. Named datasets: {', '.join(REGISTRY)}; "
                    f"default splits: split:{'|split:'.join(SPLIT_NAMES)}; hub: hf:ORG/NAME.")


def read_records(path_or_name: str | os.PathLike, prompt_col: str | None = None, label_col: str | None = None,
                 label: Any = None, fmt: str | None = None) -> list[dict]:
    """Labelled records from a split JSONL, a user file, a named dataset, ``split:NAME`` or ``hf:ORG/NAME``.

    Columns are auto-detected (prompt/text/content/instruction/goal..., label) unless named; labels are
    normalised to 0/1 (unknown values are an error listing them); ``label`` gives one label to every prompt
    (plain-text files need it). Prompts are NFKC-normalised and trimmed; duplicates are kept (see :func:`clean`).
    """
    return _load_any(path_or_name, prompt_col, label_col, label, fmt, need_label=True)


def read_prompts(path_or_name: str | os.PathLike, prompt_col: str | None = None, fmt: str | None = None) -> list[str]:
    """Prompts only, from any source :func:`read_records` accepts; blank prompts are skipped, labels not needed."""
    records = _load_any(path_or_name, prompt_col, None, None, fmt, need_label=False)
    prompts = [r["prompt"] for r in records if r["prompt"]]
    if not prompts:
        raise UserError(f"{path_or_name}: no prompts (every line/row is blank); give a file with prompts.")
    return prompts


# ====================================================================== cleaning

def clean(records: Iterable[dict], max_chars: int = 2000) -> tuple[list[dict], dict]:
    """NFKC + trim; drop empty prompts, near-exact duplicates (first copy kept) and prompts labelled both ways
    (every copy dropped); flag prompts longer than ``max_chars`` with ``"long": true``.

    Returns ``(records, report)``; the report counts what was dropped and flagged. Input is not modified.
    """
    records = list(records)
    groups: dict[str, list[dict]] = {}
    empty = 0
    for rec in records:
        prompt = rec.get("prompt")
        if not isinstance(prompt, str):
            raise UserError(f"Record {rec.get('id')!r} has no text prompt.")
        if rec.get("label") not in (0, 1):
            raise UserError(f"Record {rec.get('id')!r} has label {rec.get('label')!r}; labels must be 0 or 1.")
        text = normalise_text(prompt)
        if not text:
            empty += 1
            continue
        rec = {**rec, "prompt": text}
        rec.pop("long", None)
        if len(text) > max_chars:
            rec["long"] = True
        groups.setdefault(near_key(text), []).append(rec)

    kept, conflicts, duplicates, conflict_records = [], [], 0, 0
    dropped_by_source: Counter = Counter()
    for group in groups.values():
        if len({r["label"] for r in group}) > 1:
            conflicts.append(group[0]["prompt"])
            conflict_records += len(group)
            dropped_by_source.update(r["source"] for r in group)
            continue
        kept.append(group[0])
        duplicates += len(group) - 1
        dropped_by_source.update(r["source"] for r in group[1:])

    ids = Counter(r["id"] for r in kept)
    repeated = [i for i, n in ids.items() if n > 1]
    if repeated:
        raise UserError(f"Record ids must be unique; repeated: {', '.join(map(repr, repeated[:5]))}"
                        f"{' ...' if len(repeated) > 5 else ''}. Fix or drop the id column.")
    report = {
        "input": len(records),
        "empty_dropped": empty,
        "duplicates_dropped": duplicates,
        "conflicting_prompts": len(conflicts),
        "conflicting_records_dropped": conflict_records,
        "conflict_examples": conflicts[:5],
        "dropped_by_source": dict(sorted(dropped_by_source.items())),
        "long_flagged": sum(1 for r in kept if r.get("long")),
        "max_chars": max_chars,
        "output": len(kept),
    }
    return kept, report


# ====================================================================== splits

def _counts(records: Sequence[dict]) -> dict:
    by_label = Counter(str(r["label"]) for r in records)
    by_source: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        by_source[r["source"]][str(r["label"])] += 1
    return {
        "count": len(records),
        "by_label": {k: by_label[k] for k in sorted(by_label)},
        "by_source": {s: dict(sorted(c.items())) for s, c in sorted(by_source.items())},
        "long": sum(1 for r in records if r.get("long")),
    }


def _downsample(records: list[dict], n: int, rng) -> list[dict]:
    """Keep n records, spreading the cut over sources: sources below the fair share are kept whole
    (water-filling), the rest are sampled with `rng`. Original order is preserved."""
    if n >= len(records):
        return list(records)
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_source[r["source"]].append(i)
    quota: dict[str, int] = {}
    left, remaining = n, sorted(by_source, key=lambda s: (len(by_source[s]), s))
    while remaining:
        share = left // len(remaining)
        small = [s for s in remaining if len(by_source[s]) <= share]
        if not small:
            extra = left - share * len(remaining)
            for j, s in enumerate(sorted(remaining)):
                quota[s] = share + (1 if j < extra else 0)
            break
        for s in small:
            quota[s] = len(by_source[s])
            left -= quota[s]
            remaining.remove(s)
    keep: list[int] = []
    for s in sorted(by_source):
        idx = by_source[s]
        keep.extend(idx if quota[s] >= len(idx) else rng.choice(idx, size=quota[s], replace=False).tolist())
    return [records[i] for i in sorted(keep)]


def _load_many(names: Sequence[str], bar) -> list[dict]:
    out = []
    for name in names:
        bar.set_postfix_str(name)
        out.extend(load_dataset(name))
        bar.update(1)
    return out


def _check_settings(n_twin: int, n_contrast: int, test_size: float, max_chars: int, n_contrast_benign: int = 0) -> None:
    if n_twin < 0 or n_contrast < 0 or n_contrast_benign < 0:
        raise UserError("--n-twin, --n-contrast and --n-contrast-benign must be 0 or more.")
    if not 0.0 < test_size < 1.0:
        raise UserError(f"--test-size must be between 0 and 1 (exclusive), got {test_size}.")
    if max_chars < 1:
        raise UserError("max_chars must be at least 1.")


def _check_out(out_dir: Path) -> None:
    check_out_dir(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        manifest = out_dir / "manifest.json"
        ok = False
        if manifest.is_file():
            with contextlib.suppress(ValueError, OSError):
                ok = json.loads(manifest.read_text(encoding="utf-8")).get("format") == SPLITS_FORMAT
        if not ok:
            raise UserError(f"--out {out_dir} exists and holds other files; give a new or empty directory "
                            f"(an earlier splits directory is replaced).")


def build_splits(out_dir: str | os.PathLike, seed: int = 0, n_twin: int = 150, n_contrast: int = 100,
                 test_size: float = 0.2, max_chars: int = 2000, n_contrast_benign: int = 100,
                 val_size: float | None = None, harmful: Sequence[str] | None = None,
                 benign: Sequence[str] | None = None, heldout_harmful: Sequence[str] | None = None,
                 heldout_benign: Sequence[str] | None = None, progress: bool = True) -> dict:
    """Build the deterministic splits into ``out_dir`` and return the manifest.

    Main mix = ``harmful`` + ``benign`` datasets, cleaned together (near-exact duplicates and prompts labelled
    both ways removed across classes), then balanced by downsampling the larger class so that train+test are
    balanced (benign = harmful - n_contrast + n_contrast_benign). Disjoint splits: ``twin`` (n_twin per
    class), ``contrast`` (n_contrast harmful + n_contrast_benign benign, for harmful-minus-benign selection),
    then ``train``/``test`` stratified by source and label, then ``val`` (``val_size`` of train,
    :func:`safetyneurons.validation.carve_validation`); sources of our own writing (``datasets.TRAIN_ONLY``)
    join train only. Near-duplicate clusters (word-set Jaccard >= 0.6, :mod:`safetyneurons.clusters`) are
    assigned whole to one split, and every record carries its ``cluster``.
    ``heldout`` = the held-out datasets, cleaned, minus anything that near-duplicates (same cluster as) any
    main-mix prompt. Same seed and settings -> byte-identical files. Sources and ``val_size`` left as None
    take :data:`DEFAULT_SETTINGS`.
    """
    import numpy as np
    from tqdm import tqdm

    out_dir = Path(out_dir).expanduser()
    _check_out(out_dir)
    _check_settings(n_twin, n_contrast, test_size, max_chars, n_contrast_benign)
    if int(seed) != seed or seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed}.")
    seed = int(seed)
    d = DEFAULT_SETTINGS
    val_size = d["val_size"] if val_size is None else val_size
    harmful, benign = d["harmful"] if harmful is None else harmful, d["benign"] if benign is None else benign
    heldout_harmful = d["heldout_harmful"] if heldout_harmful is None else heldout_harmful
    heldout_benign = d["heldout_benign"] if heldout_benign is None else heldout_benign
    groups = {"harmful": list(harmful), "benign": list(benign), "heldout_harmful": list(heldout_harmful),
              "heldout_benign": list(heldout_benign)}
    for key, names in groups.items():
        want = 1 if key in ("harmful", "heldout_harmful") else 0
        for name in names:
            spec = get_spec(name)
            if spec.label != want:
                raise UserError(f"{name} is a {spec.label_name} dataset; it cannot be used as {key.replace('_', ' ')}.")
        groups[key] = [get_spec(n).name for n in names]
    if not groups["harmful"] or not groups["benign"]:
        raise UserError("The main mix needs at least one harmful and one benign dataset.")
    main_names = groups["harmful"] + groups["benign"]
    held_names = groups["heldout_harmful"] + groups["heldout_benign"]
    if set(held_names) & TRAIN_ONLY:
        raise UserError(f"{', '.join(sorted(set(held_names) & TRAIN_ONLY))}: our own template sets may only "
                        f"be used for training, never held out.")
    if set(main_names) & set(held_names):
        raise UserError(f"A dataset cannot be in the main mix and held out: {sorted(set(main_names) & set(held_names))}.")

    with tqdm(total=len(main_names) + len(held_names), desc="loading datasets", unit="set",
              disable=not progress) as bar:
        main_raw = _load_many(main_names, bar)
        held_raw = _load_many(held_names, bar)

    main, main_report = clean(main_raw, max_chars)
    held, held_report = clean(held_raw, max_chars)
    clustered, cluster_report = assign_clusters(main + held, CLUSTER_THRESHOLD)
    main, held = clustered[:len(main)], clustered[len(main):]
    train_only = [r for r in main if r["source"] in TRAIN_ONLY]
    harm = [r for r in main if r["label"] == 1 and r["source"] not in TRAIN_ONLY]
    ben = [r for r in main if r["label"] == 0 and r["source"] not in TRAIN_ONLY]
    if len(harm) < n_twin + n_contrast + 4 or len(ben) < n_twin + n_contrast_benign + 4:
        raise UserError(
            f"Not enough prompts: the main mix has {len(harm)} harmful and {len(ben)} benign after cleaning, but "
            f"n_twin={n_twin} per class and n_contrast={n_contrast} harmful leave too few for train/test. "
            f"Lower --n-twin/--n-contrast.")

    rng = np.random.default_rng(seed)
    target_benign = len(harm) - n_contrast + n_contrast_benign
    if len(ben) > target_benign:
        ben = _downsample(ben, target_benign, rng)
    elif len(ben) < target_benign:
        harm = _downsample(harm, len(ben) + n_contrast - n_contrast_benign, rng)
    twin, contrast, train, test, cluster_report["assignment"] = assign_splits(
        harm + ben, rng, n_twin, n_contrast, n_contrast_benign, test_size)

    train, val = carve_validation(train, val_size, seed)
    train, train_only_dropped = add_train_only(train, [twin, contrast, val, test], train_only)

    main_clusters = {r["cluster"] for r in main}  # every cleaned main-mix prompt, sampled or not
    heldout = [r for r in held if r["cluster"] not in main_clusters]
    held_report["overlap_with_main_dropped"] = len(held) - len(heldout)
    held_report["overlap_by_source"] = dict(sorted(Counter(
        r["source"] for r in held if r["cluster"] in main_clusters).items()))

    splits = {"twin": twin, "contrast": contrast, "train": list(train), "val": val, "test": list(test),
              "heldout": heldout}
    settings = {"n_twin": n_twin, "n_contrast": n_contrast, "n_contrast_benign": n_contrast_benign,
                "test_size": test_size, "val_size": val_size, "max_chars": max_chars,
                "cluster_threshold": CLUSTER_THRESHOLD, **groups}
    used = main_names + held_names
    manifest = {
        "format": SPLITS_FORMAT,
        "recipe_version": RECIPE_VERSION,
        "seed": seed,
        "settings": settings,
        "label_meaning": {"0": "benign (safe)", "1": "harmful (unsafe)"},
        "splits": {},
        "sources": {n: {**get_spec(n).describe(), "parsed": sum(1 for r in main_raw + held_raw if r["source"] == n)}
                    for n in used},
        "cleaning": {"main": main_report, "heldout": held_report},
        "clusters": cluster_report,
        "balance": {"main_after_cleaning": {"harmful": sum(r["label"] == 1 for r in main),
                                            "benign": sum(r["label"] == 0 for r in main)},
                    "main_used": {"harmful": len(harm), "benign": len(ben)},
                    "rule": "benign = harmful - n_contrast + n_contrast_benign so that train and test are balanced; "
                            "the larger class is downsampled, spread over its sources (seeded)",
                    "train_only": {"sources": sorted(set(groups["harmful"] + groups["benign"]) & TRAIN_ONLY),
                                   "records": len(train_only), "dropped_as_near_duplicates": train_only_dropped,
                                   "rule": "our own template sets join the training split only"}},
        "versions": versions(),
    }
    with atomic_dir(out_dir) as tmp:
        for name in SPLIT_NAMES:
            recs = splits[name]
            write_records(tmp / f"{name}.jsonl", recs)
            manifest["splits"][name] = {"file": f"{name}.jsonl", "sha256": sha256_file(tmp / f"{name}.jsonl"),
                                        **_counts(recs)}
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest


def verify_splits(out_dir: str | os.PathLike) -> dict | None:
    """The manifest if every split file matches its recorded sha256, else None."""
    out_dir = Path(out_dir)
    try:
        manifest = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
        for name, entry in manifest["splits"].items():
            if sha256_file(out_dir / entry["file"]) != entry["sha256"]:
                return None
        return manifest if manifest.get("format") == SPLITS_FORMAT else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def default_splits_dir(seed: int = 0) -> Path:
    """The default splits for `seed`, built once into ``<cache>/data/default-seed{seed}-<settings hash>``."""
    settings = {**DEFAULT_SETTINGS, "recipe_version": RECIPE_VERSION, "seed": int(seed)}
    final = cache_dir() / "data" / f"default-seed{int(seed)}-{sha256_json(settings)[:12]}"
    if verify_splits(final) is not None:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    lock_path = final.parent / f".{final.name}.lock"
    with open(lock_path, "a+b") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # several processes may ask at once
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        if verify_splits(final) is None:
            if final.exists():
                import shutil

                shutil.rmtree(final)  # a damaged cache entry (we own this directory)
            s = DEFAULT_SETTINGS
            build_splits(final, seed=int(seed), n_twin=s["n_twin"], n_contrast=s["n_contrast"],
                         n_contrast_benign=s["n_contrast_benign"], val_size=s["val_size"],
                         test_size=s["test_size"], max_chars=s["max_chars"], harmful=s["harmful"],
                         benign=s["benign"], heldout_harmful=s["heldout_harmful"],
                         heldout_benign=s["heldout_benign"])
    return final
