"""`safetyneurons report`: docs/results.md and the README's blocks come from a run's JSON and benchmark JSON, the
same files give the same bytes, and a figure its files no longer hold does not survive a regeneration."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safetyneurons.results.generate import generate
from safetyneurons.results.machine import cpu_model

from builders import save_tiny_pair, templated_records, write_jsonl

README = ("# Title\n\nIntro kept as it is.\n\n<!-- generated:probes -->\nstale probes table\n"
          "<!-- /generated:probes -->\n\nA sentence between blocks.\n\n<!-- generated:guard -->\n"
          "<!-- /generated:guard -->\n<!-- generated:causal -->\nan old causal figure\n<!-- /generated:causal -->\n"
          "<!-- generated:mixed_load -->\n<!-- /generated:mixed_load -->\n\nClosing text.\n")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished `safetyneurons run` on a tiny pair (an "aligned" copy with one changed MLP)."""
    root = tmp_path_factory.mktemp("results")
    base, aligned = save_tiny_pair(root)
    splits = root / "splits"
    splits.mkdir()
    for name, n, offset in (("contrast", 10, 1000), ("train", 20, 0), ("test", 10, 100), ("val", 10, 300),
                            ("heldout", 8, 200)):
        recs = templated_records(n, offset, hazards=True)
        if name == "heldout":
            for r in recs[1::4]:
                r["source"] = "overrefusal"
        write_jsonl(splits / f"{name}.jsonl", recs)
    from safetyneurons.pipeline import RunSettings, run

    settings = RunSettings(out=str(root / "run"), base=str(base), aligned=str(aligned), splits=str(splits),
                           random_draws=2, n_boot=50, store_dtype="float32", batch_size=4, target_fpr=0.1,
                           category_min_examples=5, classifiers=["logreg"], guard_classifier="logreg")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFETYNEURONS_CACHE", str(root / "cache"))
        run(settings, progress=False)
    return root / "run"


@pytest.fixture
def work(tmp_path, tiny_run, monkeypatch):
    """A working directory with a copy of the run (runs/default), a README with blocks and a benchmark."""
    shutil.copytree(tiny_run, tmp_path / "runs" / "default", ignore=shutil.ignore_patterns("store"))
    (tmp_path / "README.md").write_text(README, encoding="utf-8")
    bench = tmp_path / "docs" / "benchmarks"
    bench.mkdir(parents=True)
    write_json(bench / "mixed_load.json", {
        "benchmark": "mixed_load", "title": "Mixed load on the guard", "command": "python benchmarks/bench_x.py",
        "code_version": "abc1234", "machine": {"cpu": "Test CPU 9000", "threads": 2, "gpu": None},
        "artifact": {"guard_id": "0123456789abcdef", "path": "runs/default/guard"}, "date": "2026-01-02",
        "columns": ["phase", "p99 ms", "errors"], "rows": [["moderation", 12.3456, 0], ["mixed", 1234.56, 0]],
        "notes": ["Two phases of 60 s."]})
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True), encoding="utf-8")


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "safetyneurons", "report", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def block(text: str, name: str) -> str:
    return re.search(rf"<!-- generated:{name} -->\n(.*?)<!-- /generated:{name} -->", text, re.S).group(1)


def test_a_run_records_its_machine_and_code_version(tiny_run):
    run = json.loads((tiny_run / "run.json").read_text())
    assert run["machine"]["cpu"] == cpu_model()
    assert run["machine"]["threads"] == torch.get_num_threads()
    assert run["machine"]["gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    assert re.fullmatch(r"[0-9a-f]{7,}(\+dirty)?|safetyneurons .+", run["code_version"])


def test_results_name_the_run_figures_file_code_and_machine(work):
    generate(readme="README.md")
    text = (work / "docs" / "results.md").read_text()
    report = json.loads((work / "runs/default/probes/report.json").read_text())
    run = json.loads((work / "runs/default/run.json").read_text())
    safety = next(r for r in report["results"] if r["feature_set"] == "safety")
    row = next(line for line in text.splitlines() if line.startswith("| safety neurons | logreg | "))
    assert f"{safety['metrics']['auroc']:.3f}" in row
    guard_id = json.loads((work / "runs/default/guard/guard.json").read_text())["integrity"]["content_sha256"][:12]
    machine = f"{cpu_model()}, {run['machine']['threads']} threads, no GPU" if not run["machine"]["gpu"] else None
    s = run["settings"]
    # this run's guard is logistic regression, not the default's SVM: the command says so
    command = (f"safetyneurons run --guard-classifier logreg --base {s['base']} --aligned {s['aligned']} "
               f"--splits {s['splits']}")
    source = (f"_Source: `runs/default/probes/report.json`; code {run['code_version']}; {machine}; guard {guard_id}; "
              f"command `{command}`._")
    assert source in text.splitlines()
    # the run's guard reads words (run's default), and both files say so
    assert "Its probe is logistic regression; it also reads each piece's words" in text
    assert "its probe is logistic regression; it also reads each piece's words" in (work / "README.md").read_text()
    for r in report["overrefusal"]["summary"]:  # the guard table: every probe of the held-out summary
        assert any(line.startswith(f"| {r['probe']} | {100 * r['flag_rate_ordinary_benign']:.1f}% | ")
                   for line in text.splitlines())
    assert "| mixed | 1234.6 | 0 |" in text and "| moderation | 12.35 | 0 |" in text
    assert ("_Source: `docs/benchmarks/mixed_load.json`; code abc1234; Test CPU 9000, 2 threads, no GPU; guard "
            "0123456789ab; command `python benchmarks/bench_x.py`; measured runs/default/guard; 2026-01-02._") in text


def test_regenerating_gives_the_same_bytes_and_a_deleted_file_comes_back(work):
    assert generate(readme="README.md")  # first time: both files change
    results, readme = (work / "docs/results.md").read_bytes(), (work / "README.md").read_bytes()
    assert generate(readme="README.md") == []
    assert (work / "docs/results.md").read_bytes() == results and (work / "README.md").read_bytes() == readme
    (work / "docs/results.md").unlink()
    assert generate(readme="README.md") == [Path("docs/results.md")]
    assert (work / "docs/results.md").read_bytes() == results
    assert cli("--check", cwd=work).returncode == 0


def test_a_figure_its_run_no_longer_holds_does_not_survive(work):
    generate(readme="README.md")
    path = work / "runs/default/probes/report.json"
    report = json.loads(path.read_text())
    strict = next(r for r in report["overrefusal"]["summary"] if r["probe"] == "guard as served (strict)")
    old = f"| guard as served (strict) | {100 * strict['flag_rate_ordinary_benign']:.1f}% |"
    assert old in block((work / "README.md").read_text(), "guard")
    strict["flag_rate_ordinary_benign"] = 0.987654 if strict["flag_rate_ordinary_benign"] != 0.987654 else 0.1
    write_json(path, report)
    check = cli("--check", cwd=work)
    assert check.returncode == 1 and "docs/results.md" in check.stderr and "README.md" in check.stderr
    generate(readme="README.md")
    new = f"| guard as served (strict) | {100 * strict['flag_rate_ordinary_benign']:.1f}% |"
    for text in ((work / "README.md").read_text(), (work / "docs/results.md").read_text()):
        assert new in text and old not in text


def test_readme_blocks_are_replaced_and_the_text_around_them_kept(work):
    generate(readme="README.md")
    text = (work / "README.md").read_text()
    outside = re.sub(r"(<!-- generated:\w+ -->\n).*?(<!-- /generated:\w+ -->)", r"\1\2", text, flags=re.S)
    assert outside == re.sub(r"(<!-- generated:\w+ -->\n).*?(<!-- /generated:\w+ -->)", r"\1\2", README, flags=re.S)
    run = json.loads((work / "runs/default/run.json").read_text())
    machine = f"{cpu_model()}, {run['machine']['threads']} threads, no GPU"
    for name in ("probes", "guard"):
        content = block(text, name)
        assert content.endswith(f"Source: runs/default/probes/report.json, code {run['code_version']}, {machine}\n")
    assert "stale probes table" not in text and "an old causal figure" not in text
    assert block(text, "causal") == "no causal run yet: safetyneurons patch\n"
    run_guard = json.loads((work / "runs/default/guard/guard.json").read_text())["integrity"]["content_sha256"][:12]
    assert block(text, "mixed_load").endswith(
        "Source: docs/benchmarks/mixed_load.json, code abc1234, Test CPU 9000, 2 threads, no GPU, guard 0123456789ab "
        f"(not the guard {run_guard} of the run above: `python benchmarks/bench_x.py` measures it again)\n")
    assert "| safety − random layer-matched | logreg |" in block(text, "probes")


def test_a_benchmark_of_the_runs_own_guard_names_it_without_a_warning(work):
    run_guard = json.loads((work / "runs/default/guard/guard.json").read_text())["integrity"]["content_sha256"]
    path = work / "docs/benchmarks/mixed_load.json"
    bench = json.loads(path.read_text())
    bench["artifact"]["guard_id"] = run_guard
    write_json(path, bench)
    generate(readme="README.md")
    assert block((work / "README.md").read_text(), "mixed_load").endswith(
        f"2 threads, no GPU, guard {run_guard[:12]}\n")


def test_a_benchmark_with_a_readme_subset_shows_it_in_the_readme_and_everything_in_results(work):
    path = work / "docs/benchmarks/mixed_load.json"
    bench = json.loads(path.read_text())
    bench["readme"] = {"columns": ["phase", "p99 ms"], "rows": [["mixed", 1234.56]]}
    write_json(path, bench)
    generate(readme="README.md")
    short, full = block((work / "README.md").read_text(), "mixed_load"), (work / "docs/results.md").read_text()
    assert "| phase | p99 ms |" in short and "| mixed | 1234.6 |" in short
    assert "moderation" not in short and "Two phases" not in short
    assert "moderation" in full and "errors" in full and "Two phases of 60 s." in full
    bench["readme"]["tables"] = [{"title": "By length:", "columns": ["measure", "1-16"], "rows": [["recall", "80%"]]}]
    write_json(path, bench)
    generate(readme="README.md")
    short = block((work / "README.md").read_text(), "mixed_load")
    assert "| mixed | 1234.6 |\n\nBy length:\n\n| measure | 1-16 |\n|---|---|\n| recall | 80% |" in short
    for bad in ({"columns": ["phase"], "rows": [["mixed", 1.0]]},
                {"columns": ["phase"], "rows": [["mixed"]], "tables": [{"columns": ["a"], "rows": [["b"]]}]}):
        bench["readme"] = bad
        write_json(path, bench)
        r = cli("runs/default", "--readme", "README.md", cwd=work)
        assert r.returncode == 2 and "'readme' must hold columns and rows" in r.stderr and not r.stdout


def test_a_run_without_machine_says_so(work):
    path = work / "runs/default/run.json"
    run = json.loads(path.read_text())
    del run["machine"], run["code_version"]
    write_json(path, run)
    generate(readme="README.md")
    assert "Source: runs/default/probes/report.json, code not recorded, machine: not recorded\n" in \
        block((work / "README.md").read_text(), "probes")


@pytest.mark.parametrize("damage, message", [
    (lambda w: (w / "runs/default/probes/report.json").write_text('{"results": ['), "not valid JSON"),
    (lambda w: write_json(w / "runs/default/probes/report.json", {"results": []}), "not shaped as this version"),
    (lambda w: (w / "runs/default/run.json").unlink(), "run.json: not found"),
    (lambda w: (w / "runs/default/run.json").unlink() or (w / "runs/default").rename(w / "elsewhere"),
     "none of runs/default, runs/paper, runs/default-quick"),
    (lambda w: write_json(w / "docs/benchmarks/bad.json", {"title": "t", "command": "c", "columns": ["a", "b"],
                                                           "rows": [[1]]}), "row 0 does not have 2 cells"),
    (lambda w: (w / "README.md").write_text("<!-- generated:nope -->\n<!-- /generated:nope -->\n"),
     "unknown generated block 'nope'"),
    (lambda w: (w / "README.md").write_text("<!-- generated:guard -->\nno end\n"), "has no closing line"),
    (lambda w: (w / "README.md").unlink() or (w / "README.md").symlink_to(w / "elsewhere.md"),
     "--readme README.md: not a regular file"),
    (lambda w: (w / "docs/results.md").mkdir(), "--out docs/results.md: not a regular file"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(work, damage, message):
    damage(work)
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    r = cli(*(["runs/default", "--readme", "README.md"] if (work / "runs/default").is_dir() else []), cwd=work)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr and "Traceback" not in r.stderr
    assert {p: p.read_bytes() for p in work.rglob("*") if p.is_file()} == before


def test_guard_table_script_prints_the_guard_section_of_results(work):
    generate(readme="README.md")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "guard_table.py"
    r = subprocess.run([sys.executable, str(script), "runs/default"], capture_output=True, text=True, cwd=work,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and r.stdout.strip() in (work / "docs/results.md").read_text()


def test_probe_clause_names_the_guards_classifier():
    from types import SimpleNamespace

    from safetyneurons.results.generate import probe_clause

    assert probe_clause(SimpleNamespace(guard={"classifier": "svm"})) == "its probe is an RBF SVM"
    assert probe_clause(SimpleNamespace(guard={"classifier": "logreg"})) == "its probe is logistic regression"
    assert probe_clause(SimpleNamespace(guard=None)) == "its probe is not recorded"


def test_guard_section_keeps_the_case_of_what_it_names(monkeypatch):
    from types import SimpleNamespace

    from safetyneurons.results import generate

    monkeypatch.setattr(generate, "reading", lambda *a: __import__("contextlib").nullcontext())
    run = SimpleNamespace(guard={"classifier": "svm", "words": {"combine": "x"}}, report={}, dir=Path("."),
                          file=lambda name: name)
    monkeypatch.setattr(generate, "run_source", lambda run, name: "source")
    first = generate.guard_section(run)[0]
    assert "Its probe is an RBF SVM; it also reads each piece's words (a TF-IDF logit" in first
    assert "lower in the logit" not in first  # a guard that records no piece margin has none
    run.guard["piece_margin"] = 0.5
    assert "; a window or sentence counts 0.5 lower in the logit than the whole message." in \
        generate.guard_section(run)[0]


def test_the_reproduce_command_names_a_layer_budget_and_reads_older_runs_as_auto():
    from safetyneurons.results.sources import RunSource

    def command(settings: dict) -> str:
        return RunSource(Path("runs/default"), {"settings": settings}, {}, None, None, None).command

    base = {"preset": "default", "guard_words": True, "guard_classifier": "svm", "guard_sentence_min_words": 1}
    assert command({**base, "guard_max_layer": None}) == "safetyneurons run"
    assert command({**base, "guard_max_layer": "auto"}) == "safetyneurons run --guard-max-layer auto"
    assert command({**base, "guard_max_layer": 7}) == "safetyneurons run --guard-max-layer 7"
    assert command(base) == "safetyneurons run --guard-max-layer auto"  # settings.json from before the option's default changed
    # the piece margin: none by default, as runs from before it (every piece alike)
    assert command({**base, "guard_max_layer": None, "guard_piece_margin": 0.0}) == "safetyneurons run"
    assert command({**base, "guard_max_layer": None, "guard_piece_margin": 1.5}) == \
        "safetyneurons run --guard-piece-margin 1.5"
    # sentence pieces: each sentence alone by default; runs from before the setting widened them to 8 words
    older = {k: v for k, v in base.items() if k != "guard_sentence_min_words"}
    assert command({**older, "guard_max_layer": None}) == "safetyneurons run --guard-sentence-min-words 8"
    paper = {"preset": "paper", "guard_words": True, "guard_classifier": "logreg", "guard_max_layer": None,
             "guard_sentence_min_words": 1}
    want = "safetyneurons run --paper --out runs/default"
    assert command({**paper, "guard_piece_margin": 0.0}) == command(paper) == want


def test_the_guard_line_says_where_a_guard_stops_with_and_without_a_layer_budget():
    from safetyneurons.results.tables import budget_line

    none = {"guard_budget": {"setting": None, "max_layer": None, "deepest_layer": 27, "neurons": 2304,
                             "rule": "no budget asked for"}}
    assert budget_line(none, short=True) == ("reads the run's 2304 safety neurons as selected (no layer budget), so "
                                             "the model stops after layer 27")
    assert "stops after layer 27, its deepest safety neuron (no layer budget: no budget asked for)" in budget_line(none)
    auto = {"guard_budget": {"setting": "auto", "max_layer": 8, "deepest_layer": 8, "neurons": 864, "rule": "r"}}
    assert budget_line(auto, short=True) == "reads 864 neurons in layers 0..8, so the model stops after layer 8"
    assert budget_line({}) == "The guard reads the run's safety neurons as selected."  # a run without a budget record
