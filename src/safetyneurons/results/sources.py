"""The files results are generated from: run directories (``run.json``, ``probes/report.json``, ``guard/guard.json``,
the twin's ``twin.json``) and benchmark JSON (``docs/benchmarks/<name>.json``), each with where it came from.

Any file that is missing, not JSON or not shaped as this version writes it is a one-line UserError naming it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from safetyneurons._io import read_json
from safetyneurons.constants import GUARD_CLASSIFIER, GUARD_PIECE_MARGIN, GUARD_RUN_FLAGS, SENTENCE_MIN_WORDS
from safetyneurons.errors import UserError
from safetyneurons.results.machine import NOT_RECORDED, describe_machine

DEFAULT_RUNS = ("runs/default", "runs/paper", "runs/default-quick")
BENCHMARK_KEYS = ("title", "columns", "rows", "command")


def shown(path: Path) -> str:
    """A path as results show it: relative to the working directory when inside it, ``~`` for the home."""
    path = Path(os.path.normpath(path))
    if path.is_absolute():
        for base, prefix in ((Path.cwd(), ""), (Path.home(), "~/")):
            with contextlib.suppress(ValueError):
                return prefix + path.relative_to(base).as_posix()
    return path.as_posix()


@contextlib.contextmanager
def reading(path: Path, fix: str) -> Iterator[None]:
    """Turns a missing key or a wrongly typed value met while reading ``path`` into a one-line UserError."""
    try:
        yield
    except (KeyError, TypeError, IndexError, ValueError, AttributeError) as e:
        what = f"missing {e.args[0]!r}" if isinstance(e, KeyError) and e.args else type(e).__name__
        raise UserError(f"{shown(path)}: not shaped as this version writes it ({what}); {fix}") from None


def _dict_json(path: Path, fix: str) -> dict:
    if not path.is_file():
        raise UserError(f"{shown(path)}: not found; {fix}")
    data = read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{shown(path)}: not a JSON object; {fix}")
    return data


@dataclass
class RunSource:
    """One finished run directory and what its figures need."""

    dir: Path
    run: dict  # run.json
    report: dict  # probes/report.json
    guard: dict | None  # guard/guard.json
    twin: dict | None  # the aligned twin's twin.json, when the run's aligned model is a built twin
    twin_path: Path | None

    @property
    def code(self) -> str:
        return str(self.run.get("code_version") or NOT_RECORDED)

    @property
    def machine(self) -> str:
        return describe_machine(self.run.get("machine"))

    @property
    def guard_id(self) -> str | None:
        if not self.guard:
            return None
        with reading(self.dir / "guard" / "guard.json", "export the guard again (`safetyneurons run`)."):
            return str(self.guard["integrity"]["content_sha256"])[:12]

    @property
    def command(self) -> str:
        """The `safetyneurons run` command line that names this run (its full settings: settings.json)."""
        s = self.run.get("settings") or {}
        flags = "".join(f" {flag}" for flag, on in (("--paper", s.get("preset") == "paper"),
                                                    ("--quick", s.get("quick")), ("--patch", s.get("patch"))) if on)
        # each guard setting that differs from `run`'s default (values of runs written before a setting existed)
        recorded = {"guard_words": s.get("guard_words", False), "guard_classifier": s.get("guard_classifier", "logreg"),
                    "guard_max_layer": s.get("guard_max_layer", "auto"),
                    "guard_piece_margin": s.get("guard_piece_margin", 0.0),
                    "guard_sentence_min_words": s.get("guard_sentence_min_words", 8)}
        default = {"guard_words": True, "guard_classifier": GUARD_CLASSIFIER.get(s.get("preset", "default")),
                   "guard_max_layer": None, "guard_piece_margin": GUARD_PIECE_MARGIN,
                   "guard_sentence_min_words": SENTENCE_MIN_WORDS}
        flags += "".join(f" {GUARD_RUN_FLAGS[k](v)}" for k, v in recorded.items() if v != default[k])
        inputs = "".join(f" --{k} {shown(Path(s[k])) if k == 'splits' else s[k]}" for k in ("base", "aligned", "splits")
                         if s.get(k))
        default_name = f"{s.get('preset', 'default')}{'-quick' if s.get('quick') else ''}"
        out = "" if self.dir.name == default_name else f" --out {shown(self.dir)}"
        return f"safetyneurons run{flags}{inputs}{out}"

    def file(self, name: str) -> str:
        return shown(self.dir / name)


def load_run(run_dir: str | os.PathLike) -> RunSource:
    """A finished run directory (UserError naming the file when one is missing or malformed)."""
    d = Path(run_dir)
    fix = "give the directory of a finished `safetyneurons run`."
    if not d.is_dir():
        raise UserError(f"{shown(d)}: not a directory; {fix}")
    run = _dict_json(d / "run.json", fix)
    report = _dict_json(d / "probes" / "report.json", fix)
    guard = _dict_json(d / "guard" / "guard.json", fix) if (d / "guard" / "guard.json").exists() else None
    twin, twin_path = None, None
    with reading(d / "run.json", fix):
        aligned = (run.get("pair") or {}).get("aligned") or {}
        if aligned.get("path") and (Path(aligned["path"]) / "twin.json").is_file():
            twin_path = Path(aligned["path"]) / "twin.json"
            twin = _dict_json(twin_path, "rebuild the twin (`safetyneurons twin`).")
    return RunSource(d, run, report, guard, twin, twin_path)


@dataclass
class BenchmarkSource:
    """One benchmark's JSON (docs/benchmarks/<name>.json)."""

    path: Path
    data: dict

    @property
    def name(self) -> str:
        return str(self.data.get("benchmark") or self.path.stem)

    @property
    def code(self) -> str:
        return str(self.data.get("code_version") or NOT_RECORDED)

    @property
    def machine(self) -> str:
        return describe_machine(self.data.get("machine"))

    @property
    def guard_id(self) -> str | None:
        artifact = self.data.get("artifact") or {}
        gid = artifact.get("guard_id") if isinstance(artifact, dict) else None
        return str(gid)[:12] if gid else None

    @property
    def artifact_path(self) -> str | None:
        artifact = self.data.get("artifact") or {}
        return str(artifact["path"]) if isinstance(artifact, dict) and artifact.get("path") else None


def _table(t: dict) -> bool:
    """``{"columns": [...], "rows": [[...], ...]}`` with as many cells in each row as columns."""
    return isinstance(t.get("columns"), list) and isinstance(t.get("rows"), list) and \
        all(isinstance(r, list) and len(r) == len(t["columns"]) for r in t["rows"])


def load_benchmark(path: str | os.PathLike) -> BenchmarkSource:
    """A benchmark JSON file, checked against the schema (title, columns, rows of as many cells, command)."""
    path = Path(path)
    fix = "rewrite it with its benchmark script (fields: title, columns, rows, notes, command, code_version, machine)."
    data = _dict_json(path, fix)
    missing = [k for k in BENCHMARK_KEYS if k not in data]
    if missing:
        raise UserError(f"{shown(path)}: no {', '.join(missing)}; {fix}")
    cols, rows, notes = data["columns"], data["rows"], data.get("notes", [])
    if not isinstance(cols, list) or not isinstance(rows, list) or not isinstance(notes, list):
        raise UserError(f"{shown(path)}: columns, rows and notes must be lists; {fix}")
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != len(cols):
            raise UserError(f"{shown(path)}: row {i} does not have {len(cols)} cells (one per column); {fix}")
    # optional: the few columns and rows the README shows (results.md shows all), and small tables after them
    short = data.get("readme")
    if short is not None and not (isinstance(short, dict) and _table(short)
                                  and all(isinstance(t, dict) and isinstance(t.get("title"), str) and _table(t)
                                          for t in short.get("tables", []))):
        raise UserError(f"{shown(path)}: 'readme' must hold columns and rows of as many cells (and its 'tables' "
                        f"a title each); {fix}")
    return BenchmarkSource(path, data)


def load_benchmarks(directory: str | os.PathLike) -> list[BenchmarkSource]:
    """Every ``*.json`` in ``directory``, by file name."""
    return [load_benchmark(p) for p in sorted(Path(directory).glob("*.json"))]


def default_runs() -> list[Path]:
    """The default run directories (``runs/default``, ``runs/paper``, ``runs/default-quick``) that hold a finished
    run (a ``run.json``; a run still in progress has none yet)."""
    return [Path(r) for r in DEFAULT_RUNS if (Path(r) / "run.json").is_file()]
