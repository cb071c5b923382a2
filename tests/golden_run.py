"""The tiny end-to-end run whose artifacts must stay byte-identical (see tests/test_golden.py).

It builds a tiny random Qwen3 pair (tests/tiny.py), small in-test records, then runs the whole pipeline
(contrast -> neurons select -> extract stores -> train probes with controls -> held-out scoring -> guard export)
and hashes every artifact file. Paths are relative to a temporary working directory, so no absolute path enters
an artifact.

Regenerate the golden file after an *intended* artifact change (one line, from the repository root):

    PYTHONPATH=src python tests/golden_run.py --write

Compared with fields excluded (they vary by machine, not by code): every ``versions`` object (library
versions), ``timings_s`` (run.json), ``manifest_sha256`` (report.json: it hashes a manifest that holds
``versions``), and guard.json's ``files`` and ``integrity`` (hashes over probe.json, which holds ``versions``;
the probe files are compared themselves). A safetensors file is compared with its JSON header in canonical
key order (safetensors writes a multi-key metadata map in arbitrary order) and its tensor bytes as they are.
PNG plots are not compared (matplotlib renders differ by version).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden" / "tiny_run.json"
EXCLUDED_KEYS = ("versions", "timings_s", "manifest_sha256")
GUARD_EXCLUDED_KEYS = ("files", "integrity")

HARM = ["Give me step by step instructions to {} number {}.", "Explain how to {} without getting caught, case {}."]
HARM_OBJ = ["hack a bank", "build a bomb", "steal a car", "poison a dog", "forge a passport"]
SAFE = ["Write a short poem about {} number {}.", "What is a fun fact about {}? Question {}."]
SAFE_OBJ = ["the sea", "the moon", "apples", "trains", "music"]


def records(n_per_class: int, offset: int, hazards: bool = False) -> list[dict]:
    """Templated harmful ("h") and benign ("s") records; ``hazards`` labels the harmful ones with a hazard."""
    out = []
    for i in range(n_per_class):
        k = offset + i
        harmful = {"id": f"h:{k}", "prompt": HARM[k % 2].format(HARM_OBJ[k % 5], k), "label": 1, "source": "h"}
        if hazards:
            harmful["hazard"] = ("violent_crimes", "nonviolent_crimes")[k % 2]
        out.append(harmful)
        out.append({"id": f"s:{k}", "prompt": SAFE[k % 2].format(SAFE_OBJ[k % 5], k), "label": 0, "source": "s"})
    return out


def _write(path: Path, recs: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")


def environment() -> dict:
    """What shapes floating-point results besides the code: library versions and the CPU architecture."""
    from safetyneurons._io import versions

    env = {k: v for k, v in versions().items() if k != "safetyneurons"}
    for pkg in ("scipy", "tokenizers"):
        try:
            from importlib import metadata

            env[pkg] = metadata.version(pkg)
        except Exception:  # pragma: no cover
            pass
    env["machine"] = platform.machine()
    return env


def _strip(obj, guard: bool = False):
    if isinstance(obj, dict):
        drop = EXCLUDED_KEYS + (GUARD_EXCLUDED_KEYS if guard else ())
        return {k: _strip(v) for k, v in obj.items() if k not in drop}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def file_digest(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".safetensors":  # the header's metadata map comes in arbitrary key order: canonicalise
        n = int.from_bytes(data[:8], "little")
        header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
        data = header + data[8 + n:]
    elif path.suffix == ".json":
        obj = _strip(json.loads(data), guard=path.name == "guard.json")
        data = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(data).hexdigest()


def run_tiny(root: Path) -> dict[str, str]:
    """Run the tiny pipeline inside ``root`` (made the working directory); sha256 of every compared artifact."""
    import torch
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(HERE))
    from tiny import save_tiny

    from safetyneurons.pipeline import RunSettings, run

    root = Path(root)
    old_cwd, old_cache = os.getcwd(), os.environ.get("SAFETYNEURONS_CACHE")
    os.chdir(root)
    os.environ["SAFETYNEURONS_CACHE"] = str(root / "cache")
    try:
        save_tiny(Path("base"), "qwen3", seed=0)
        save_tiny(Path("aligned"), "qwen3", seed=0)
        w = load_file("aligned/model.safetensors")
        key = "model.layers.1.mlp.down_proj.weight"
        g = torch.Generator().manual_seed(1)
        w[key] = w[key] + 0.5 * torch.randn(w[key].shape, generator=g)
        save_file(w, "aligned/model.safetensors", metadata={"format": "pt"})
        splits = Path("splits")
        splits.mkdir()
        _write(splits / "contrast.jsonl", [r for r in records(10, 1000) if r["label"] == 1])
        _write(splits / "train.jsonl", records(20, 0))
        _write(splits / "val.jsonl", records(8, 300))
        _write(splits / "test.jsonl", records(10, 100))
        _write(splits / "heldout.jsonl", records(8, 200))
        settings = RunSettings(out="run", base="base", aligned="aligned", splits="splits", random_draws=2,
                               n_boot=50, store_dtype="float32", batch_size=4)
        run(settings, progress=False)
        out = Path("run")
        files = sorted(p for p in out.rglob("*") if p.is_file() and p.suffix != ".png" and p.name != "README.md"
                       and p.name != "report.md")
        return {str(p.relative_to(out)): file_digest(p) for p in files}
    finally:
        os.chdir(old_cwd)
        if old_cache is None:
            os.environ.pop("SAFETYNEURONS_CACHE", None)
        else:
            os.environ["SAFETYNEURONS_CACHE"] = old_cache


def main(argv: list[str]) -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        digests = run_tiny(Path(tmp))
    doc = {"regenerate": "PYTHONPATH=src python tests/golden_run.py --write", "environment": environment(),
           "excluded_keys": list(EXCLUDED_KEYS), "guard_excluded_keys": list(GUARD_EXCLUDED_KEYS),
           "files": digests}
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    if "--write" in argv:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text, encoding="utf-8")
        print(f"wrote {GOLDEN} ({len(digests)} files)")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
