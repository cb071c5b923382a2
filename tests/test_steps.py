"""docs/steps.md reproduces `safetyneurons run`: its commands and its Python block, on a tiny pair, write the same
files as `run`, byte for byte.

The commands and the Python code are read from docs/steps.md (the blocks marked
``<!-- example: tested-by tests/test_steps.py -->``), so the page cannot drift from what is tested. The page names
the real default pair and data; here they mean the tiny ones (the mapping):

- ``safetyneurons twin`` is left out: the tiny "aligned" model (the base with one changed MLP) is the twin;
- ``contrast`` gets ``--base BASE --aligned ALIGNED``, ``extract`` gets ``--model BASE``, and both get
  ``--splits SPLITS`` (the tiny splits stand for the default ones that ``split:NAME`` names);
- ``train`` gets ``--random-draws 2 --bootstrap 50`` (fewer control draws and resamples, to keep the test short);
- ``runs/steps`` and ``runs/steps-python`` are the test's output directory;
- in the Python block, ``RunSettings()`` is ``RunSettings(base=BASE, aligned=ALIGNED, splits=SPLITS,
  random_draws=2, n_boot=50)``.

`run` itself runs as ``safetyneurons run --out OUT --base BASE --aligned ALIGNED --splits SPLITS --random-draws 2
--bootstrap 50``. Each of the three writes into the same directory in turn (moved aside after each), so the paths
that artifacts record (the stores' paths in probe metadata) are the same. What may differ, and why:

- files only `run` writes: ``run.json``, ``README.md``, ``settings.json`` (its own record), and for the commands
  ``contrast/variants.md`` (`neurons select` prints the comparison instead);
- ``contrast.json`` of the commands' change scores also records where the prompts came from
  (:data:`CLI_PROVENANCE`);
- ``probes/report.json``: the ``run`` entry (`run`'s settings and the pair's paths) only `run` writes.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from builders import save_tiny_pair, templated_records, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "steps.md"
MARKER = "<!-- example: tested-by tests/test_steps.py -->"
SIZES = ["--random-draws", "2", "--bootstrap", "50"]
RUN_ONLY = {"run.json", "README.md", "settings.json"}
CLI_PROVENANCE = {"prompts_source", "limit", "prompts_file_sha256"}  # contrast.json keys only the command writes


def doc_blocks() -> dict[str, str]:
    """The marked fenced blocks of docs/steps.md by language (one bash, one python)."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    blocks: dict[str, str] = {}
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        fence = re.match(r"```(\w+)", lines[i + 1])
        assert fence, f"docs/steps.md line {i + 2}: a fenced block must follow the marker"
        end = lines.index("```", i + 2)
        assert fence.group(1) not in blocks
        blocks[fence.group(1)] = "\n".join(lines[i + 2:end])
    assert set(blocks) == {"bash", "python"}, blocks.keys()
    return blocks


def doc_commands(bash: str) -> list[list[str]]:
    """The block's commands, one argument list each (continuation lines joined, comments dropped)."""
    text = bash.replace("\\\n", " ")
    commands = [shlex.split(line, comments=True) for line in text.splitlines()]
    commands = [c for c in commands if c]
    assert all(c[0] == "safetyneurons" for c in commands), commands
    return [c[1:] for c in commands]


def tiny_command(args: list[str], out: Path, base: Path, aligned: Path, splits: Path) -> list[str] | None:
    """A documented command with the tiny pair, splits, sizes and output directory (None: left out)."""
    args = [str(out) + a[len("runs/steps"):] if a.startswith("runs/steps/") else a for a in args]
    extra = {"twin": None,
             "contrast": ["--base", str(base), "--aligned", str(aligned), "--splits", str(splits)],
             "extract": ["--model", str(base), "--splits", str(splits)],
             "neurons": [], "train": SIZES}[args[0]]
    return None if extra is None else [*args, *extra]


def tiny_python(code: str, out: Path, base: Path, aligned: Path, splits: Path) -> str:
    settings = f"RunSettings(base={str(base)!r}, aligned={str(aligned)!r}, splits={str(splits)!r}, " \
               f"random_draws=2, n_boot=50)"
    assert code.count("RunSettings()") == 1 and code.count('Path("runs/steps-python")') == 1
    return code.replace("RunSettings()", settings).replace('Path("runs/steps-python")', f"Path({str(out)!r})")


def tiny_pair_and_splits(root: Path):
    """A tiny base, an "aligned" copy with one changed MLP, and splits whose training part labels 20 harmful
    prompts of each of two hazards (so the guard gets category heads at `run`'s default minimum)."""
    base, aligned = save_tiny_pair(root)
    splits = root / "splits"
    splits.mkdir()
    for name, n, offset in (("contrast", 10, 1000), ("train", 40, 0), ("val", 10, 300), ("test", 10, 100),
                            ("heldout", 8, 200)):
        write_jsonl(splits / f"{name}.jsonl", templated_records(n, offset, hazards=True))
    return base, aligned, splits


def invoke(args: list[str]) -> None:
    from click.testing import CliRunner

    from safetyneurons.cli import app

    res = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, (args, res.output)


def files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def three_ways(tmp_path_factory):
    """The files of `run`, of the documented commands and of the documented Python block, on one tiny pair."""
    root = tmp_path_factory.mktemp("steps")
    base, aligned, splits = tiny_pair_and_splits(root)
    out = root / "out"
    blocks = doc_blocks()
    got = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFETYNEURONS_CACHE", str(root / "cache"))
        mp.chdir(root)
        invoke(["run", "--out", out, "--base", base, "--aligned", aligned, "--splits", splits, *SIZES,
                "--no-progress"])
        got["run"] = files(out)
        shutil.move(out, root / "run")
        for args in doc_commands(blocks["bash"]):
            command = tiny_command(args, out, base, aligned, splits)
            if command is not None:
                invoke(command)
        got["commands"] = files(out)
        shutil.move(out, root / "commands")
        exec(compile(tiny_python(blocks["python"], out, base, aligned, splits), str(DOC), "exec"), {})
        got["python"] = files(out)
    return got


def differing(want: dict[str, bytes], got: dict[str, bytes]) -> set[str]:
    """Files of ``want`` that ``got`` lacks or holds with other bytes."""
    return {name for name, data in want.items() if got.get(name) != data}


def json_without(data: bytes, keys: set[str]) -> dict:
    obj = json.loads(data)
    assert isinstance(obj, dict)
    return {k: v for k, v in obj.items() if k not in keys}


def test_the_commands_write_runs_neurons_and_guard_byte_for_byte(three_ways):
    run, cmd = three_ways["run"], three_ways["commands"]
    for name in ("contrast/scores.safetensors", "contrast/benign/scores.safetensors", "contrast/neuron_set.json",
                 "guard/guard.json", "guard/probe.safetensors", "guard/probe.json", "guard/categories.safetensors"):
        assert name in run and cmd.get(name) == run[name], name
    guard = json.loads(run["guard/guard.json"])
    # what makes this run's guard: validation operating points, the SVM, category heads, the layer budget
    assert set(guard["calibration"]["operating_points"]) == {"strict", "loose"}
    assert guard["classifier"] == "svm" and guard["categories"]["names"]
    # no layer budget by default: the guard reads the safety set as it is and stops after its deepest neuron
    neurons = json.loads(run["contrast/neuron_set.json"])
    assert guard["layer_budget"]["setting"] is None and "curve" not in guard["layer_budget"]
    assert guard["deepest_layer"] == guard["layer_budget"]["deepest_layer"] == max(n["layer"] for n in neurons["neurons"])
    assert sorted(json.loads(run["contrast/neuron_set.json"])["settings"]["aligned"]) and \
        json.loads(run["contrast/neuron_set.json"])["settings"]["variant"] == "rms"


def test_the_commands_write_every_other_file_of_run_alike(three_ways):
    run, cmd = three_ways["run"], three_ways["commands"]
    run_files = {n: d for n, d in run.items() if n not in RUN_ONLY}
    diff = differing(run_files, cmd)
    assert diff == {"contrast/variants.md", "contrast/contrast.json", "contrast/benign/contrast.json",
                    "probes/report.json"}, sorted(diff)
    assert "contrast/variants.md" not in cmd
    for name in ("contrast/contrast.json", "contrast/benign/contrast.json"):
        assert json_without(cmd[name], CLI_PROVENANCE) == json.loads(run[name]), name
        assert set(json.loads(cmd[name])) - set(json.loads(run[name])) == CLI_PROVENANCE
    report = json.loads(run["probes/report.json"])
    assert json_without(cmd["probes/report.json"], set()) == json_without(run["probes/report.json"], {"run"})
    # the report holds every figure `run` reports: test, held-out, over-refusal, calibration, budget, heads
    assert {"results", "heldout", "overrefusal", "calibration", "guard_calibration", "guard_budget", "categories",
            "selection_variants"} <= set(report)
    assert any(n.startswith("store/train/shard-") for n in cmd)


def test_the_python_block_writes_runs_files(three_ways):
    run, py = three_ways["run"], three_ways["python"]
    diff = differing({n: d for n, d in run.items() if n not in RUN_ONLY}, py)
    assert diff == {"probes/report.json"}, sorted(diff)
    assert json.loads(py["probes/report.json"]) == json_without(run["probes/report.json"], {"run"})
    assert set(py) <= set(run)


def test_split_contrast_is_its_harmful_part_and_a_bad_part_exits_2(tmp_path, capsys):
    from safetyneurons.cli import main
    from safetyneurons.cli.contrast import load_prompt_set

    recs = templated_records(3, 0)
    write_jsonl(tmp_path / "contrast.jsonl", recs)
    harmful = [r["prompt"] for r in recs if r["label"] == 1]
    benign = [r["prompt"] for r in recs if r["label"] == 0]
    assert load_prompt_set("split:contrast", None, str(tmp_path))[0] == harmful
    assert load_prompt_set("split:contrast:harmful", None, str(tmp_path))[0] == harmful
    assert load_prompt_set("split:contrast:benign", None, str(tmp_path))[0] == benign
    assert load_prompt_set(None, None, str(tmp_path))[0] == harmful
    with pytest.raises(SystemExit) as e:
        main(["contrast", "--prompts", "split:contrast:kind", "--splits", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "split:contrast:benign" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
