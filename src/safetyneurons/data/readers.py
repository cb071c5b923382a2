"""Reading labelled prompts from user files: CSV, TSV, JSON, JSONL, Parquet, plain text, and hub datasets.

Columns are auto-detected (:data:`PROMPT_COLUMNS`, :data:`LABEL_COLUMNS`) unless named; labels are normalised to
0/1 (:func:`normalise_label`). :func:`safetyneurons.data.splits.read_records` is the entry point.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from safetyneurons._io import parse_json
from safetyneurons.constants import FILE_FORMATS as FORMATS
from safetyneurons.data.datasets import normalise_text
from safetyneurons.data.records import jsonl_lines
from safetyneurons.errors import UserError

PROMPT_COLUMNS = ("prompt", "text", "content", "instruction", "goal", "question", "query", "forbidden_prompt")
LABEL_COLUMNS = ("label",)

_LABEL_WORDS = {
    "0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1,
    "safe": 0, "unsafe": 1, "benign": 0, "harmful": 1,
}
LABEL_VOCABULARY = "0/1, true/false, safe/unsafe or benign/harmful"


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


def detect_format(path: Path, fmt: str | None) -> str:
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


def rows_from_file(path: Path, fmt: str) -> list[Any]:
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
        data = parse_json(text, str(path))  # depth and lone surrogates checked too
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON array of objects (one per prompt), got a "
                            f"{type(data).__name__}. For one object per line use a .jsonl file.")
        return data
    if fmt == "jsonl":
        rows = []
        for lineno, line in enumerate(jsonl_lines(text), 1):
            if not line.strip():
                continue
            rows.append(parse_json(line, f"{path} line {lineno}"))
        return rows
    assert fmt == "text", fmt
    # one prompt a line, lines split on "\n" only (as `guard` reads a file): a U+2028 inside a prompt stays in it
    return [line for line in jsonl_lines(text) if line.strip()]


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


def records_from_rows(rows: list[Any], where: str, stem: str, prompt_col: str | None, label_col: str | None,
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
            rec["hazard"] = str(row["hazard"])  # hazard category (safetyneurons.data.taxonomy)
        if "family" in columns and pcol != "family" and row.get("family") not in (None, ""):
            rec["family"] = str(row["family"])  # the template family of our own prompts (data.templates)
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


def records_from_hub(ref: str, prompt_col: str | None, label_col: str | None, label: Any,
                     need_label: bool) -> list[dict]:
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
        ds = _hub_dataset(hf_datasets, name, split or "train")
    except Exception as e:  # network, auth, unknown name: all fixable by the user
        raise UserError(f"{ref}: could not load from the Hugging Face hub ({type(e).__name__}: {e}). "
                        f"Check the name and your network, or save the data as a file and pass that.") from None
    stem = name.replace("/", "_")
    return records_from_rows(ds.to_list(), ref, stem, prompt_col, label_col, label, need_label)


def _hub_dataset(hf_datasets, name: str, split: str):
    """A hub dataset, never running code shipped with it (older `datasets` versions ran loading scripts)."""
    import inspect

    kwargs = {"split": split}
    if "trust_remote_code" in inspect.signature(hf_datasets.load_dataset).parameters:
        kwargs["trust_remote_code"] = False
    return hf_datasets.load_dataset(name, **kwargs)
