"""Twin cache: names and keys of cached twins, ``twin.json``, and resolving ``twin:`` model references.

A leaf module (it loads no model and imports neither :mod:`safetyneurons.model.pair` nor the trainer), so
:func:`safetyneurons.model.pair.resolve_ref` can resolve ``twin`` / ``twin:NAME`` through it.
"""

from __future__ import annotations

from pathlib import Path

from safetyneurons.data import splits as data
from safetyneurons._io import cache_dir, check_out_dir, model_fingerprint, read_json, sha256_file, sha256_json
from safetyneurons.errors import UserError
from safetyneurons.model.twin_settings import DEFAULT_REFS, FORMAT, RECIPE_VERSION, REFUSALS, TwinSettings


def twins_dir() -> Path:
    d = cache_dir() / "twins"
    d.mkdir(parents=True, exist_ok=True)
    return d


def twin_key(base_sha256: str, train_sha256: str, settings: TwinSettings) -> str:
    return sha256_json({"format": FORMAT, "recipe": RECIPE_VERSION, "base_sha256": base_sha256,
                        "data_sha256": train_sha256, "settings": settings.key_dict(),
                        "refusals": list(REFUSALS)})


def twin_name(base_sha256: str, train_sha256: str, settings: TwinSettings) -> str:
    """Cache directory name: base fingerprint + key over data hash and settings."""
    return f"twin-{base_sha256[:12]}-{twin_key(base_sha256, train_sha256, settings)[:16]}"


def read_info(path: Path) -> dict | None:
    try:
        info = read_json(path / "twin.json")
    except UserError:
        return None
    return info if isinstance(info, dict) and info.get("format") == FORMAT else None


def check_twin_out(out: str | Path) -> Path:
    """An --out directory must be new, empty, or a previous twin (which is replaced)."""
    return check_out_dir(Path(out).expanduser(), lambda d: (d / "twin.json").is_file(),
                         "is a non-empty directory that is not a twin; give a new or empty directory (or a previous "
                         "twin directory to replace).")


def load_info(path: str | Path) -> dict:
    """The ``twin.json`` of a twin directory."""
    info = read_info(Path(path))
    if info is None:
        raise UserError(f"{path} is not a twin directory (no valid twin.json).")
    return dict(info, path=str(Path(path).resolve()))  # where it is now (a twin directory may be moved)



def default_pointer() -> Path:
    """The record of the default twin (``twin:default``)."""
    return twins_dir() / "default.json"


def default_twin_data() -> Path:
    """The ``twin`` split of the default data (built once into the cache by the data module)."""
    return Path(data.default_splits_dir()) / "twin.jsonl"


def resolve_twin_ref(ref: str) -> Path:
    """``twin`` / ``twin:default`` -> the cached default twin; ``twin:NAME`` -> ``<cache>/twins/NAME``.

    Fast: reads the default pointer and checks that the base weights, the default twin split and the
    default settings still match; loads no model.
    """
    ref = str(ref).strip()
    if ref not in DEFAULT_REFS:
        name = ref.split(":", 1)[1]
        path = twins_dir() / name
        if name and "/" not in name and read_info(path) is not None:
            return path
        have = sorted(p.name for p in twins_dir().iterdir() if (p / "twin.json").is_file())
        raise UserError(f"No twin named {name!r} in {twins_dir()}. Available: {', '.join(have) or 'none'}. "
                        f"Build one with `safetyneurons twin`, or pass a model directory instead.")

    how = ("Run `safetyneurons twin` to build it (about 10-15 minutes on a 2-core CPU), "
           "or pass --aligned PATH to use another aligned model.")
    pointer = default_pointer()
    if not pointer.is_file():
        raise UserError(f"The default aligned twin is not built yet (looked in {twins_dir()}). {how}")
    try:
        p = read_json(pointer)
        path = twins_dir() / p["name"]
        base_path = Path(p["base_path"])
        data_path = Path(p["data_path"])
    except (UserError, KeyError, TypeError):
        raise UserError(f"The default twin record {pointer} is damaged. {how}") from None
    if read_info(path) is None:
        raise UserError(f"The default aligned twin {path} is missing or incomplete. {how}")
    stale = None
    if not (base_path / "config.json").is_file() or model_fingerprint(base_path) != p.get("base_sha256"):
        stale = "the base model's weights changed"
    elif default_twin_data() != data_path or not data_path.is_file() \
            or sha256_file(data_path) != p.get("data_file_sha256"):
        stale = "the default twin data split changed"
    elif twin_name(p["base_sha256"], p.get("data_sha256", ""), TwinSettings()) != p["name"]:
        stale = "the default twin settings changed"
    if stale:
        raise UserError(f"The default aligned twin {path} is out of date ({stale}). {how}")
    return path
