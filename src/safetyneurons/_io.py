"""Small shared helpers: atomic writes, hashing, cache location, provenance."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .errors import UserError


def cache_dir() -> Path:
    """Where wheels, converted models and twins are cached: $SAFETYNEURONS_CACHE or ~/.cache/safetyneurons."""
    env = os.environ.get("SAFETYNEURONS_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "safetyneurons"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-serialisable object in canonical form (sorted keys, no whitespace)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temp file in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Deterministic JSON (sorted keys, 2-space indent, trailing newline), written atomically."""
    return atomic_write_text(path, dumps_json(obj))


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}).") from None


def save_tensors_atomic(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Save a dict of torch tensors as safetensors, atomically."""
    from safetensors.torch import save

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    return atomic_write_bytes(path, save(tensors, metadata=metadata))


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Build a directory in a temp sibling; rename it to `final` only if the block succeeds.

    An exception (or kill) leaves no half-written `final`. An existing `final` is replaced.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def versions() -> dict[str, str]:
    """Versions of the libraries that shape results, for provenance records."""
    out = {"python": platform.python_version()}
    for pkg in ("safetyneurons", "torch", "transformers", "numpy", "scikit-learn", "safetensors", "peft", "gguf"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def check_out_dir(out: str | os.PathLike, replaceable: Callable[[Path], bool] | None = None,
                  refuse: str = "is a non-empty directory of other files; give a new or empty directory.") -> Path:
    """An output directory must not be an existing file. With ``replaceable``, a non-empty directory must pass it
    (an earlier output of the same command, which is then replaced or resumed); else UserError
    ``--out DIR <refuse>``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is an existing file; give a directory path.")
    if replaceable is not None and out.is_dir() and any(out.iterdir()) and not replaceable(out):
        raise UserError(f"--out {out} {refuse}")
    return out


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True, **kw: Any):
    """The one progress bar (tqdm on stderr, width following the terminal); ``enabled=False`` shows nothing."""
    from tqdm.auto import tqdm

    kw.setdefault("dynamic_ncols", True)
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, **kw)


def json_safe(obj: Any) -> Any:
    """Replace NaN/inf by None and numpy scalars/arrays by Python ones, so the result is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if np.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    return obj


def model_fingerprint(path: Path) -> str:
    """sha256 over the directory's config and weight files (cached by size+mtime so reloads are cheap)."""
    path = Path(path).resolve()
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
    key = sha256_bytes(json.dumps([[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]).encode())
    index_path = cache_dir() / "fingerprints.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    digest = sha256_bytes("".join(f"{p.name}:{sha256_file(p)}\n" for p in files).encode())
    index[key] = digest
    try:
        atomic_write_json(index_path, index)
    except OSError:
        pass
    return digest
