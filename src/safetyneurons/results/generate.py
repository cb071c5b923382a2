"""`safetyneurons report`: docs/results.md and the README's headline tables, generated from run directories' JSON
and benchmark JSON. Nothing is typed by hand and nothing depends on the clock, so the same files give the same
bytes, and a figure its run no longer supports disappears at the next generation.

README blocks sit between a line ``<!-- generated:NAME -->`` and a line ``<!-- /generated:NAME -->``; only
what lies between them is replaced. NAME is one of :data:`BLOCKS`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Sequence

from safetyneurons._io import atomic_write_text
from safetyneurons.errors import UserError
from safetyneurons.results.sources import (BenchmarkSource, RunSource, default_runs, load_benchmarks, load_run,
                                           reading, shown)
from safetyneurons.results.tables import (benchmark_source, benchmark_table, budget_line, calibration_table,
                                          ci, controls_table, headline_probes, heldout_table, markdown_table, num, pct,
                                          probe_label, probe_table, run_source, source_line, twin_table)
from safetyneurons.results.machine import NOT_RECORDED, describe_machine

BLOCKS = ("probes", "guard", "causal", "mixed_load", "readouts")
# the benchmark behind each benchmark block, and the command that writes it (named while it is missing)
BENCHMARK_BLOCKS = {"causal": "safetyneurons patch", "mixed_load": "python benchmarks/bench_mixed_load.py",
                    "readouts": None}
HEADLINE_SETS = ("safety", "random", "all", "text")
_OPEN = re.compile(r"^<!-- generated:(\S+) -->$")
_CLOSE = re.compile(r"^<!-- /generated:(\S+) -->$")
RUN_FIX = "run `safetyneurons run` again to rewrite it."


def report_command(runs: Sequence[Path], benchmarks: Path | None) -> str:
    """The command line that regenerates from these inputs."""
    parts = ["safetyneurons report", *(shown(r) for r in runs)]
    if benchmarks is not None:
        parts += ["--benchmarks", shown(benchmarks)]
    return " ".join(parts)


def _ref(model: dict | None) -> str:
    ref = str((model or {}).get("ref") or "n/a")
    return shown(Path(ref)) if ref.startswith("/") else ref


def run_section(run: RunSource) -> list[str]:
    """A run's section of results.md: probes against controls, the guard, the twin."""
    pair = (run.run.get("pair") or {})
    lines = [f"## Run `{shown(run.dir)}`", "", f"- command: `{run.command}` (all settings: `{run.file('settings.json')}`)",
             f"- code {run.code}; {run.machine}",
             f"- base `{_ref(pair.get('base'))}`, aligned `{_ref(pair.get('aligned'))}`",
             f"- guard {run.guard_id or 'none'}", ""]
    report_file = run.dir / "probes" / "report.json"
    with reading(report_file, RUN_FIX):
        lines += ["### Safety neurons against controls, as probes", ""] + probe_table(run.report)
        lines += ["", run_source(run, "probes/report.json"), ""] + controls_table(run.report)
        lines += ["", run_source(run, "probes/report.json"), "", "### The guard", ""]
    lines += guard_section(run) + ["", "### The twin", ""]
    if run.twin is None:
        lines += ["Twin: not recorded (the run's aligned model has no `twin.json`).", ""]
        return lines
    with reading(run.twin_path, "rebuild the twin (`safetyneurons twin`)."):
        lines += twin_table(run.twin)
    lines += ["", source_line(shown(run.twin_path), str(run.twin.get("code_version") or NOT_RECORDED),
                              describe_machine(run.twin.get("machine")), None, "safetyneurons twin"), ""]
    return lines


def words_clause(run: RunSource) -> str:
    """Whether the run's guard also reads each piece's words (guard.json ``words``), and its piece margin."""
    g = run.guard or {}
    words = ("it also reads each piece's words (a TF-IDF logit summed with the probe's)" if g.get("words")
             else "it reads no words (neurons only)")
    m = g.get("piece_margin") or 0.0
    return words + (f"; a window or sentence counts {m:g} lower in the logit than the whole message" if m else "")


def probe_clause(run: RunSource) -> str:
    """Which classifier reads the guard's neurons (guard.json ``classifier``)."""
    c = (run.guard or {}).get("classifier")
    return f"its probe is {PROBE_NAMES.get(c, c)}" if c else "its probe is not recorded"


PROBE_NAMES = {"svm": "an RBF SVM", "logreg": "logistic regression"}


def guard_section(run: RunSource) -> list[str]:
    """The guard's tables: its layer budget, its operating points on validation, and the held-out flag rates and
    recall of the guard as served next to every probe and the baselines."""
    clause = probe_clause(run)
    lines = [f"{budget_line(run.report)} {clause[:1].upper()}{clause[1:]}; {words_clause(run)}.", ""]
    with reading(run.dir / "probes" / "report.json", RUN_FIX):
        if run.report.get("guard_calibration"):
            lines += ["Thresholds on the validation split (read as the guard reads):", ""]
            lines += calibration_table(run.report["guard_calibration"]) + [""]
        if run.report.get("overrefusal"):
            lines += ["Held-out sources (never trained on; each probe at its threshold set on validation; the guard "
                      "as served reads each prompt as guard.json's reading says, its most unsafe piece):", ""]
            lines += heldout_table(run.report["overrefusal"]) + [""]
    return lines + [run_source(run, "probes/report.json")]


def benchmark_section(benchmarks: Sequence[BenchmarkSource], directory: Path | None) -> list[str]:
    lines = ["## Benchmarks", ""]
    if not benchmarks:
        where = f"`{shown(directory)}`" if directory is not None else "the benchmarks directory"
        return lines + [f"No benchmark JSON in {where}.", ""]
    for b in benchmarks:
        with reading(b.path, "rewrite it with its benchmark script."):
            lines += [f"### {b.data['title']}", ""] + benchmark_table(b) + ["", benchmark_source(b), ""]
    return lines


def render_results(runs: Sequence[RunSource], benchmarks: Sequence[BenchmarkSource], command: str,
                   directory: Path | None = None) -> str:
    """The whole docs/results.md."""
    lines = ["# Results", "",
             f"Generated by `{command}` from the JSON files named under each table. Do not edit by hand: run the "
             f"command again (with `--check`, it only says whether this file and the README's tables are up to "
             f"date).", ""]
    for run in runs:
        lines += run_section(run)
    lines += benchmark_section(benchmarks, directory)
    return "\n".join(lines).rstrip("\n") + "\n"


def _readme_source(file: str, code: str, machine: str) -> str:
    return f"Source: {file}, code {code}, {machine}"


def _probes_block(run: RunSource) -> list[str]:
    report = run.report
    held = {(r["feature_set"], r["classifier"]): r["metrics"] for r in (report.get("heldout") or {}).get("results", [])}
    rows = []
    for r in sorted((r for r in report["results"] if r["feature_set"] in HEADLINE_SETS),
                    key=lambda r: HEADLINE_SETS.index(r["feature_set"])):
        h = held.get((r["feature_set"], r["classifier"]), {})
        rows.append([probe_label(r), r["classifier"],
                     num(r["metrics"]["auroc"]) + ci(r["metrics"].get("auroc_ci")),
                     num(h.get("auroc")) + ci(h.get("auroc_ci"))])
    vs = (report.get("safety_vs_controls") or {}).get("random", {})
    vs_held = ((report.get("heldout") or {}).get("safety_vs_controls") or {}).get("random", {})
    for clf, d in vs.items():
        h = vs_held.get(clf)
        rows.append(["safety − random layer-matched", clf, f"{d['diff']:+.3f}{ci(d.get('ci'), sign='+')}",
                     f"{h['diff']:+.3f}{ci(h.get('ci'), sign='+')}" if h else "n/a"])
    return markdown_table(["feature set", "classifier", "test AUROC [95% CI]", "held-out AUROC [95% CI]"], rows,
                          [False, False, True, True])


def _guard_block(run: RunSource) -> list[str]:
    over = run.report["overrefusal"]
    points = ((run.report.get("guard_calibration") or {}).get("operating_points") or {})
    rules = "; ".join(f"{name}: {pct(p['target_fpr'])} false positives on validation" for name, p in sorted(points.items()))
    return [f"Guard {run.guard_id or 'n/a'}: {budget_line(run.report, short=True)}; {probe_clause(run)}; "
            f"{words_clause(run)}."
            + (f" Thresholds: {rules}." if rules else ""), ""] + heldout_table(over, headline_probes(over), short=True)


def _run_block(runs: Sequence[RunSource], build: Callable[[RunSource], list[str]]) -> str:
    if not runs:
        return "no run yet: safetyneurons run"
    run = runs[0]
    with reading(run.dir / "probes" / "report.json", RUN_FIX):
        lines = build(run)
    return "\n".join(lines + ["", _readme_source(run.file("probes/report.json"), run.code, run.machine)])


def _benchmark_block(name: str, benchmarks: Sequence[BenchmarkSource], directory: Path | None,
                     run_guard: str | None = None) -> str:
    """A benchmark's README table. One that measured a guard names it, and says so when it is not the guard of the
    README's run (``run_guard``), so a figure of an older guard is visibly old."""
    found = [b for b in benchmarks if b.path.stem == name]
    if not found:
        where = shown(directory / f"{name}.json") if directory is not None else f"{name}.json"
        command = BENCHMARK_BLOCKS[name]
        return f"no {name.replace('_', ' ')} run yet: {command or where + ' not found'}"
    b = found[0]
    with reading(b.path, "rewrite it with its benchmark script."):
        lines = [f"{b.data['title']}", ""] + benchmark_table(b, short=True)
    source = _readme_source(shown(b.path), b.code, b.machine)
    if b.guard_id:
        source += f", guard {b.guard_id}"
        if run_guard and run_guard != b.guard_id:  # both are 12-character ids
            source += (f" (not the guard {run_guard} of the run above: `{b.data['command']}` measures it "
                       f"again)")
    return "\n".join(lines + ["", source])


def readme_blocks(runs: Sequence[RunSource], benchmarks: Sequence[BenchmarkSource],
                  directory: Path | None) -> dict[str, str]:
    """The content of each README block (NAME -> markdown, ending with its Source line)."""
    blocks = {"probes": _run_block(runs, _probes_block), "guard": _run_block(runs, _guard_block)}
    run_guard = runs[0].guard_id if runs else None
    for name in BENCHMARK_BLOCKS:
        blocks[name] = _benchmark_block(name, benchmarks, directory, run_guard)
    return blocks


def fill_readme(text: str, blocks: dict[str, str], where: str) -> str:
    """``text`` with the content of each generated block replaced; every other line kept as it is."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        opened = _OPEN.match(line.strip())
        if _CLOSE.match(line.strip()):
            raise UserError(f"{where}: line {i + 1} closes a generated block that was not opened; remove it.")
        if not opened:
            i += 1
            continue
        name = opened.group(1)
        if name not in blocks:
            raise UserError(f"{where}: line {i + 1}: unknown generated block {name!r}; use one of "
                            f"{', '.join(BLOCKS)}.")
        end = next((j for j in range(i + 1, len(lines))
                    if _CLOSE.match(lines[j].strip()) or _OPEN.match(lines[j].strip())), None)
        close = _CLOSE.match(lines[end].strip()) if end is not None else None
        if close is None or close.group(1) != name:
            raise UserError(f"{where}: line {i + 1}: block {name!r} has no closing line "
                            f"'<!-- /generated:{name} -->' before the next block; add it.")
        newline = "\r\n" if line.endswith("\r\n") else "\n"
        out.append(newline.join(blocks[name].split("\n")) + newline)
        out.append(lines[end])
        i = end + 1
    return "".join(out)


def generate(run_dirs: Sequence[str | os.PathLike] = (), benchmarks: str | os.PathLike | None = None,
             out: str | os.PathLike | None = "docs/results.md", readme: str | os.PathLike | None = None,
             check: bool = False) -> list[Path]:
    """Regenerate ``out`` (results.md) and the generated blocks of ``readme``; returns the files whose content
    changes (with ``check``, nothing is written). ``run_dirs`` empty: the default runs that exist;
    ``benchmarks`` None: docs/benchmarks when it exists."""
    dirs = [Path(d) for d in run_dirs] or default_runs()
    if not dirs:
        raise UserError("No run directory given and none of runs/default, runs/paper, runs/default-quick exists; "
                        "run `safetyneurons run` first or name a run directory.")
    bench_dir = Path(benchmarks) if benchmarks is not None else Path("docs/benchmarks")
    if benchmarks is not None and not bench_dir.is_dir():
        raise UserError(f"--benchmarks {shown(bench_dir)}: not a directory; give the folder of benchmark JSON.")
    bench_dir_used = bench_dir if bench_dir.is_dir() else None
    for option, path in (("--out", out), ("--readme", readme)):
        if path is not None and (Path(path).is_symlink() or (Path(path).exists() and not Path(path).is_file())):
            raise UserError(f"{option} {shown(Path(path))}: not a regular file; give a file path to write.")
    runs = [load_run(d) for d in dirs]
    benches = load_benchmarks(bench_dir) if bench_dir_used else []
    new: dict[Path, str] = {}
    if out is not None:
        new[Path(out)] = render_results(runs, benches, report_command(dirs, bench_dir_used), bench_dir_used)
    if readme is not None:
        path = Path(readme)
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--readme {shown(path)}: cannot be read as UTF-8 text ({e}); give the README file.") \
                from None
        new[path] = fill_readme(text, readme_blocks(runs, benches, bench_dir_used), shown(path))
    changed = [p for p, text in new.items() if not p.is_file() or p.read_bytes() != text.encode("utf-8")]
    if not check:
        for p in changed:
            atomic_write_text(p, new[p])
    return changed
