"""The tiny end-to-end run whose artifacts the golden test compares by content (see tests/test_golden.py).

It builds a tiny random Qwen3 pair (tests/tiny.py), small in-test records, then runs the whole pipeline
(contrast -> neurons select -> extract stores -> train probes with controls -> held-out scoring -> guard export)
and takes a content snapshot of every artifact file (tests/golden_compare.py): the tensors of safetensors files,
the parsed JSON of JSON files (machine-dependent keys removed), the exact text of JSONL and Markdown files. Paths
are relative to a temporary working directory, so no absolute path enters an artifact. PNG plots, the run's
README.md and probes/report.md are not compared (plots render differently by matplotlib version; the two
Markdown files restate run.json / report.json with rounded numbers and digest prefixes, and README.md holds
wall-clock timings).

Regenerate the golden file after an *intended* artifact change (one line, from the repository root):

    PYTHONPATH=src python tests/golden_run.py --write

Without ``--write`` it compares a fresh run with the golden file and prints the differences (exit status 1 when
there are any), e.g. to try another BLAS kernel: ``OPENBLAS_CORETYPE=Zen PYTHONPATH=src python
tests/golden_run.py``. The golden file also records the environment it was written in, for information only.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from builders import templated_records, write_jsonl  # noqa: E402
from golden_compare import (EXCLUDED_KEYS, FLOAT_DIGESTS, GUARD_EXCLUDED_KEYS, compare_files,  # noqa: E402
                            dumps, snapshot)

GOLDEN = HERE / "golden" / "tiny_run.json"
REGENERATE = "PYTHONPATH=src python tests/golden_run.py --write"

def environment() -> dict:
    """Library versions, CPU and BLAS: what shapes floating-point results besides the code (for information)."""
    from safetyneurons._io import versions

    env = {k: v for k, v in versions().items() if k != "safetyneurons"}
    for pkg in ("scipy", "tokenizers"):
        try:
            from importlib import metadata

            env[pkg] = metadata.version(pkg)
        except Exception:  # pragma: no cover
            pass
    env["machine"] = platform.machine()
    try:
        env["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("model name"))
    except Exception:  # pragma: no cover - not Linux
        env["cpu"] = platform.processor()
    try:
        from threadpoolctl import threadpool_info

        env["blas"] = sorted({f"{i.get('internal_api')} {i.get('version')} {i.get('architecture', '')}".strip()
                              for i in threadpool_info() if i.get("user_api") == "blas"})
    except Exception:  # pragma: no cover
        pass
    try:
        import torch

        env["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover
        pass
    return env


def artifact_files(out: Path) -> list[Path]:
    """The compared artifacts of a run directory (PNG plots, README.md and report.md left out)."""
    return sorted(p for p in Path(out).rglob("*") if p.is_file() and p.suffix != ".png"
                  and p.name not in ("README.md", "report.md"))


def run_tiny(root: Path) -> dict[str, dict]:
    """Run the tiny pipeline inside ``root`` (made the working directory); the snapshot of every compared artifact,
    by path relative to the run directory."""
    import torch
    from safetensors.torch import load_file, save_file

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
        write_jsonl(splits / "contrast.jsonl", [r for r in templated_records(10, 1000) if r["label"] == 1])
        write_jsonl(splits / "train.jsonl", templated_records(20, 0))
        write_jsonl(splits / "val.jsonl", templated_records(8, 300))
        write_jsonl(splits / "test.jsonl", templated_records(10, 100))
        write_jsonl(splits / "heldout.jsonl", templated_records(8, 200))
        settings = RunSettings(out="run", base="base", aligned="aligned", splits="splits", random_draws=2,
                               n_boot=50, store_dtype="float32", batch_size=4)
        run(settings, progress=False)
        out = Path("run")
        return {p.relative_to(out).as_posix(): snapshot(p, p.relative_to(out).as_posix()) for p in artifact_files(out)}
    finally:
        os.chdir(old_cwd)
        if old_cache is None:
            os.environ.pop("SAFETYNEURONS_CACHE", None)
        else:
            os.environ["SAFETYNEURONS_CACHE"] = old_cache


def golden_document(files: dict[str, dict]) -> dict:
    return {"regenerate": REGENERATE, "environment (for information; not compared)": environment(),
            "compared": "content: see tests/golden_compare.py (tolerances, exact fields, float digests)",
            "excluded_keys": list(EXCLUDED_KEYS), "guard_excluded_keys": list(GUARD_EXCLUDED_KEYS),
            "float_digests": [".".join(p) for p in FLOAT_DIGESTS], "files": files}


def load_golden() -> dict:
    return json.loads(GOLDEN.read_text(encoding="utf-8"))


def main(argv: list[str]) -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        files = run_tiny(Path(tmp))
    if "--write" in argv:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(dumps(golden_document(files)) + "\n", encoding="utf-8")
        print(f"wrote {GOLDEN} ({len(files)} files, {GOLDEN.stat().st_size} bytes)")
        return 0
    problems = compare_files(load_golden()["files"], files)
    print("\n".join(problems) if problems else f"{len(files)} artifact files match {GOLDEN}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
