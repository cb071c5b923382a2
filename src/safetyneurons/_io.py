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
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from safetyneurons.errors import UserError

if TYPE_CHECKING:
    from tqdm import tqdm


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


MAX_JSON_DEPTH = 64  # deeper nesting is refused: no file or request this package reads needs more


def json_problem(obj: Any, max_depth: int, check_strings: bool = True) -> str | None:
    """Why a parsed JSON value is refused (too deep, or a string that is not valid Unicode), or None."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str) and check_strings:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return "it holds a string that is not valid Unicode (a lone surrogate such as \\ud800)"
        elif isinstance(value, (dict, list)):
            if depth > max_depth:
                return f"it is nested deeper than {max_depth} levels"
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                if isinstance(k, str):
                    stack.append((k, depth))
                stack.append((v, depth + 1))
    return None


def parse_json(data: str | bytes, where: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse untrusted JSON text. UserError (one line naming ``where``) for bytes that are not UTF-8,
    invalid JSON, nesting deeper than ``max_depth`` and strings that cannot be encoded (lone surrogates)."""
    from safetyneurons.errors import UserError

    if isinstance(data, (bytes, bytearray)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{where}: not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8.") from None
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).") from None
    except RecursionError:
        raise UserError(f"{where}: refused: it is nested deeper than {max_depth} levels.") from None
    problem = json_problem(obj, max_depth)
    if problem:
        raise UserError(f"{where}: refused: {problem}.")
    return obj


def read_json(path: str | os.PathLike, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Read a JSON file; any malformed content (see :func:`parse_json`) is a one-line UserError."""
    from safetyneurons.errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found.")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror}).") from None
    return parse_json(data, str(path), max_depth)


def check_text(text: str, where: str) -> str:
    """``text`` must be encodable as UTF-8 (no lone surrogates, e.g. from undecodable argv bytes)."""
    from safetyneurons.errors import UserError

    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{where} is not valid UTF-8 text (character {e.start} is {text[e.start]!a}); "
                        f"give UTF-8 text.") from None
    return text


def check_parent_dirs(path: str | os.PathLike, what: str = "--out") -> Path:
    """Every existing ancestor of ``path`` must be a directory (else a one-line UserError, not an OSError)."""
    from safetyneurons.errors import UserError

    path = Path(path)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{what} {path}: {parent} is a file, not a directory; give a path under a directory.")
            break
    return path


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
    out = check_parent_dirs(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is an existing file; give a directory path.")
    if replaceable is not None and out.is_dir() and any(out.iterdir()) and not replaceable(out):
        raise UserError(f"--out {out} {refuse}")
    return out


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True, **kw: Any) -> tqdm:
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


# Files that decide what the model reads: the tokenizer and the chat template (covered by tokenizer_fingerprint)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


def _stat_key(files: list[Path]) -> str:
    """What the cached hash of ``files`` is keyed on: path, device, inode, size, mtime and *ctime*.

    mtime can be set back by anyone who can write the file (``touch -d``), so it alone cannot vouch for
    unchanged content; ctime cannot be set from user space and changes on every write, rename or chmod,
    and a replaced file gets a new inode. Any change to these recomputes the content hash.
    """
    rows = []
    for p in files:
        st = p.stat()
        rows.append([str(p), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns])
    return sha256_bytes(json.dumps(rows).encode())


def tokenizer_fingerprint(path: Path) -> str:
    """sha256 over the tokenizer and chat-template files of a model directory (always recomputed: small)."""
    path = Path(path).resolve()
    files = sorted(p for p in path.iterdir() if p.name in TOKENIZER_FILES or p.suffix == ".tiktoken")
    return sha256_bytes("".join(f"{p.name}:{sha256_file(p)}\n" for p in files).encode())


def model_fingerprint(path: Path) -> str:
    """sha256 over the directory's config and weight files (the hash is cached, keyed on each file's
    path, inode, size, mtime and ctime, so reloads are cheap and any rewrite recomputes it)."""
    path = Path(path).resolve()
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
    key = _stat_key(files)
    index_path = cache_dir() / "fingerprints.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError, RecursionError):
        index = {}
    if not isinstance(index, dict):
        index = {}
    if isinstance(index.get(key), str):
        return index[key]
    digest = sha256_bytes("".join(f"{p.name}:{sha256_file(p)}\n" for p in files).encode())
    index[key] = digest
    try:
        atomic_write_json(index_path, index)
    except OSError:
        pass
    return digest
