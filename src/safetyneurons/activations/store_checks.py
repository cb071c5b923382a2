"""Integrity of activation stores on disk: what :mod:`safetyneurons.activations.store` trusts only after checking.

- Manifest and progress files are validated before use: shard names must be plain ``shard-NNNNN.safetensors``
  names (no paths: an absolute or ``..`` name is refused, never followed), row indices must lie inside the
  store and cover it exactly once, and a damaged file is a one-line error (exit 2), never a traceback.
- Temporary files that a killed writer left behind (``.NAME.XXXX.tmp`` from the atomic writes) are
  removed when an extraction resumes.
- One writer at a time: an extraction holds ``.extract.lock`` in the store directory (an OS file lock,
  released when the process ends, even by ``kill -9``; the file is removed when the extraction ends); a
  second one is refused at once.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from safetyneurons.errors import UserError

SHARD_NAME = re.compile(r"shard-\d{5}\.safetensors")
LOCK_FILE = ".extract.lock"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TMP = re.compile(r"\.(manifest\.json|records\.jsonl|\.extract-progress\.json|shard-\d{5}\.safetensors)\..+\.tmp")


def check_shard_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
        raise UserError(f"{where}: invalid shard name {str(name)[:80]!r} (expected shard-NNNNN.safetensors); the "
                        f"file is damaged or was edited. Rerun `safetyneurons extract` into a new directory.")
    return name


def _shard_entries(shards, where: str, need_rows: bool) -> list[dict]:
    if not isinstance(shards, list):
        raise UserError(f"{where}: 'shards' is not a list; the file is damaged.")
    out = []
    for sh in shards:
        if not isinstance(sh, dict) or not isinstance(sh.get("sha256"), str) or not _SHA256.fullmatch(sh["sha256"]):
            raise UserError(f"{where}: a shard entry is malformed (needs file and sha256); the file is damaged.")
        check_shard_name(sh.get("file"), where)
        if "index" in sh and (isinstance(sh["index"], bool) or not isinstance(sh["index"], int) or sh["index"] < 0):
            raise UserError(f"{where}: a shard entry has an invalid index; the file is damaged.")
        if need_rows:
            rows = sh.get("rows")
            if (not isinstance(rows, list) or len(rows) != 2 or not all(isinstance(v, int) for v in rows)):
                raise UserError(f"{where}: shard {sh['file']} has no valid row range; the file is damaged.")
        out.append(sh)
    return out


def validate_manifest(manifest: dict, where: str) -> tuple[int, int, list[dict]]:
    """(n, d, shard entries) of a store manifest, after checking its shape; UserError when damaged."""
    try:
        n, d = manifest["n"], manifest["d"]
        ids, labels = manifest["ids"], manifest["labels"]
        for key in ("hook_point", "pooling", "layout", "num_layers", "width", "model"):
            manifest[key]
    except (KeyError, TypeError):
        raise UserError(f"{where}: the manifest is missing fields; the store is damaged. Rerun "
                        f"`safetyneurons extract` into this directory to rebuild it.") from None
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in (n, d)):
        raise UserError(f"{where}: n and d must be whole numbers >= 0; the store is damaged.")
    if not isinstance(ids, list) or not isinstance(labels, list) or len(ids) != n or len(labels) != n:
        raise UserError(f"{where}: ids/labels do not have n = {n} entries; the store is damaged.")
    if not isinstance(manifest["model"], dict):
        raise UserError(f"{where}: the model record is malformed; the store is damaged.")
    return n, d, _shard_entries(manifest.get("shards"), where, need_rows=True)


def check_rows(rows: np.ndarray, n: int, filled: np.ndarray, shard: str, where: str) -> np.ndarray:
    """A shard's row indices: integers inside [0, n), each row written by exactly one shard."""
    rows = np.asarray(rows)
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
        raise UserError(f"{where}: shard {shard} has malformed row indices; rebuild the store.")
    if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= n):
        raise UserError(f"{where}: shard {shard} refers to rows outside the store (0..{n - 1}); rebuild the store.")
    if len(np.unique(rows)) != len(rows) or bool(filled[rows].any()):
        raise UserError(f"{where}: shard {shard} repeats rows another shard holds; rebuild the store.")
    return rows.astype(np.int64)


def read_resume_state(path: Path) -> dict | None:
    """The progress (or finished manifest) of an earlier extraction, validated; None when absent.
    A damaged file is a UserError telling how to recover (its shards cannot be trusted)."""
    from safetyneurons._io import read_json

    if not path.is_file():
        return None
    hint = f"Delete {path} (the extraction then starts over) or give a new --out directory."
    try:
        state = read_json(path)
    except UserError as e:
        raise UserError(f"{e} {hint}") from None
    if not isinstance(state, dict) or not isinstance(state.get("plan_sha256", ""), str):
        raise UserError(f"{path}: damaged (not an extraction record). {hint}")
    try:
        entries = _shard_entries(state.get("shards", []), str(path), need_rows=False)
    except UserError as e:
        raise UserError(f"{e} {hint}") from None
    if any("index" not in sh for sh in entries):
        raise UserError(f"{path}: a shard entry has no index. {hint}")
    return state


def remove_stale_tmp(out: Path) -> list[str]:
    """Delete temporary files a killed writer left in ``out`` (only names this package's atomic writes use)."""
    removed = []
    for p in Path(out).iterdir():
        if p.is_file() and _TMP.fullmatch(p.name):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p.name)
    return removed


@contextlib.contextmanager
def writer_lock(out: Path) -> Iterator[None]:
    """Hold the store directory's writer lock; a second writer gets a UserError instead of waiting."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(Path(out) / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(f"Another `safetyneurons extract` is writing into {out} right now; wait for it to finish, "
                        f"or give a different --out.") from None
    try:
        yield
    finally:
        lock.release()
        # no lock file is left among the store's files; a writer that opened it just before this removal still
        # holds a valid lock on the old file, only a third concurrent writer could then slip in
        with contextlib.suppress(OSError):
            (Path(out) / LOCK_FILE).unlink()
