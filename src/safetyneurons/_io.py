"""Small shared helpers: atomic writes, hashing, cache location, provenance."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import shutil
import stat
import sys
import tempfile
import uuid
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator

import numpy as np

from safetyneurons.checks import MAX_JSON_DEPTH
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


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a socket" if stat.S_ISSOCK(mode) else "not a regular file"


def open_regular_file(path: str | os.PathLike, within: str | os.PathLike | None = None) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file, else a one-line UserError.

    A FIFO, device, socket or directory is refused before it is read (reading one blocks or never ends; a
    FIFO is opened non-blocking, so even a swapped-in one cannot hang the open). A symlink is followed only
    to a regular file, and with ``within`` only to one inside that directory."""
    path = Path(path)
    try:
        real = path.resolve(strict=True)
        st = os.stat(real)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found.") from None
    except (OSError, RuntimeError) as e:
        raise UserError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e}).") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path}: {_file_kind(st.st_mode)}, not a regular file; replace it with the real file.")
    if within is not None:
        root = Path(within).resolve()
        if root not in real.parents:
            raise UserError(f"{path}: a link to {real}, outside {root}; put the file itself in the directory.")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror}).") from None
    now = os.fstat(fd)
    if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise UserError(f"{path}: it was replaced while being opened; try again.")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20, *, within: str | os.PathLike | None = None) -> str:
    """sha256 of a regular file's content; anything else (FIFO, device, a link out of ``within``) is a
    one-line UserError, see :func:`open_regular_file`."""
    h = hashlib.sha256()
    with open_regular_file(path, within) as f:
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
    fsync_dir(path.parent)  # the rename itself survives a crash
    return path


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory, so the renames and new entries in it are on disk (a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Deterministic JSON (sorted keys, 2-space indent, trailing newline), written atomically."""
    return atomic_write_text(path, dumps_json(obj))


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


def too_many_digits() -> str:
    """Why a JSON text with a huge integer literal is refused (json.loads raises ValueError past Python's
    int-string conversion limit, ``sys.get_int_max_str_digits()``)."""
    return f"it holds an integer with more than {sys.get_int_max_str_digits()} digits; write such a number as a string"


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
    except ValueError:  # the only other ValueError json.loads raises: Python's int-string conversion limit
        raise UserError(f"{where}: refused: {too_many_digits()}.") from None
    problem = json_problem(obj, max_depth)
    if problem:
        raise UserError(f"{where}: refused: {problem}.")
    return obj


def read_json(path: str | os.PathLike, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Read a JSON file; any malformed content (see :func:`parse_json`) is a one-line UserError."""
    from safetyneurons.errors import UserError

    path = Path(path)
    try:
        with open_regular_file(path) as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror}).") from None
    return parse_json(data, str(path), max_depth)


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
    """Save a dict of torch tensors as safetensors, atomically; the same tensors and metadata give the same bytes
    (the header's keys sorted: safetensors writes its metadata in hash-map order, which varies between runs)."""
    from safetensors.torch import save

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    return atomic_write_bytes(path, canonical_safetensors(save(tensors, metadata=metadata)))


def canonical_safetensors(data: bytes) -> bytes:
    """safetensors bytes with the header's JSON keys sorted (the tensors' bytes and offsets are unchanged)."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(header).to_bytes(8, "little") + header + data[8 + n:]


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Build a directory in a temp sibling; put it at `final` only if the block succeeds.

    An exception (or kill) leaves no half-written `final`. An existing `final` is replaced so that `final`
    always holds the complete old or the complete new directory (:func:`swap_dir`); the new files and the
    renames are fsynced first, so a power cut cannot leave a renamed directory of empty files.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        fsync_tree(tmp)
        swap_dir(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def fsync_tree(root: Path) -> None:
    """fsync every regular file and directory under ``root`` (symlinks are not followed)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if stat.S_ISREG(os.lstat(p).st_mode):
                fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(dirpath)


def swap_dir(new: Path, final: Path) -> None:
    """Move the directory ``new`` to ``final`` (a sibling), replacing an existing ``final``.

    On Linux the two are exchanged in one atomic step (``renameat2(RENAME_EXCHANGE)``), so at every
    point ``final`` is the complete old or the complete new directory, even across a crash. Elsewhere
    (or on a file system without it) the old one is renamed to a hidden backup, the new one into place,
    and the backup is restored if that fails; only a crash between those two renames leaves ``final``
    missing, with the old one in ``.NAME.old-*`` next to it."""
    if not os.path.lexists(final):
        os.rename(new, final)
    elif rename_exchange(new, final):
        _remove(new)  # it now holds the old directory
    else:
        backup = final.with_name(f".{final.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.rename(final, backup)
        try:
            os.rename(new, final)
        except BaseException:
            os.rename(backup, final)
            raise
        _remove(backup)
    fsync_dir(final.parent)


def rename_exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Atomically exchange the paths ``a`` and ``b`` (Linux ``renameat2`` with ``RENAME_EXCHANGE``).
    False where that is not available (other systems, old C libraries, file systems without it)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange_flag = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange_flag) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def _remove(path: Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


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


def is_weights_file(name: str) -> bool:
    """Whether a file of a model directory decides which weights load: the config, the weight files and
    their shard indexes (``model.safetensors.index.json``: a shard dropped from it would load as random
    weights), and a PEFT adapter's config."""
    return (name.endswith((".safetensors", ".bin", ".index.json"))
            or name in ("config.json", "adapter_config.json"))


def model_fingerprint(path: Path) -> str:
    """sha256 over the directory's config, weight and shard-index files (:func:`is_weights_file`; the hash
    is cached, keyed on each file's path, inode, size, mtime and ctime, so reloads are cheap and any rewrite
    recomputes it). A FIFO, device or other non-regular file among them is a UserError, not a hang."""
    path = Path(path).resolve()
    files = sorted(p for p in path.iterdir() if is_weights_file(p.name))
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


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes, without the version-dependent ``Software`` tag (reproducible files)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
