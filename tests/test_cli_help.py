"""`safetyneurons --help` lists the commands from the table in safetyneurons.cli (no command module, no torch is
imported), and that table says exactly what the real commands would."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest

from safetyneurons.cli import COMMANDS, app


def test_table_short_help_is_each_commands_own():
    for name, (_, _, short) in COMMANDS.items():
        cmd = app.get_command(None, name)  # the real command (imports its module)
        assert cmd.name == name
        assert short == cmd.get_short_help_str(limit=10**6), f"COMMANDS[{name!r}] drifted from the command's help"


@pytest.mark.parametrize("width", [40, 80, 100, 200])
def test_listing_is_what_click_shows_for_the_real_commands(width):
    """The table-driven listing renders byte for byte like click's own listing of the imported commands."""
    ctx = click.Context(app, info_name="safetyneurons")

    def render(format_commands):
        formatter = click.HelpFormatter(width=width)
        format_commands(ctx, formatter)
        return formatter.getvalue()

    light = render(app.format_commands)
    real = render(lambda c, f: click.Group.format_commands(app, c, f))  # resolves every real command
    assert light == real and all(f"  {name}" in light for name in COMMANDS)


def test_group_help_imports_no_command_module_and_no_torch():
    code = ("import sys\n"
            "from safetyneurons.cli import main\n"
            "try:\n    main(['--help'])\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('safetyneurons.cli.') or m.split('.')[0] in "
            "('torch', 'transformers', 'sklearn', 'matplotlib'))\n"
            "print('LOADED', loaded)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    assert out.splitlines()[-1] == "LOADED []"
    listing = out.split("Commands:\n", 1)[1].splitlines()
    assert [line.split()[0] for line in listing if line.startswith("  ") and not line.startswith("   ")] == \
        list(COMMANDS)


# ----------------------------------------------- issue 25: each help says what the command does and writes
def _help(*command: str) -> str:
    from click.testing import CliRunner

    res = CliRunner().invoke(app, [*command, "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    return " ".join(res.output.split())  # one line: click wraps at the terminal width


def _all_commands() -> list[tuple[str, ...]]:
    out = []
    for name in COMMANDS:
        cmd = app.get_command(None, name)
        if isinstance(cmd, click.Group):
            out += [(name, sub) for sub in cmd.list_commands(None)]
        else:
            out.append((name,))
    return out


def _writes() -> dict[tuple[str, ...], list[str]]:
    """What each command writes, as the code names it."""
    from safetyneurons.data.splits import SPLIT_NAMES
    from safetyneurons.run_settings import SETTINGS_FILE

    contrast = ["scores.safetensors", "contrast.json", "neuron_set.json", "heatmap.png", "layer_counts.png",
                "stats.json"]
    return {
        ("data", "build"): ["/".join(SPLIT_NAMES) + ".jsonl", "manifest.json"],
        ("contrast",): contrast,
        ("neurons", "select"): ["neuron-set JSON file"],
        ("neurons", "plot"): ["heatmap.png", "layer_counts.png", "stats.json"],
        ("extract",): ["manifest.json", "records.jsonl", "shard-NNNNN.safetensors"],
        ("train",): ["report.json", "report.md", "roc_<classifier>.png", "pr_<classifier>.png", "probes/"],
        ("evaluate",): ["report.json", "report.md", "roc.png", "pr.png", "predictions.jsonl"],
        ("patch",): ["patch.json", "patch.png", "patch.md", "generations.jsonl"],
        ("twin",): ["twin.json", "adapter/", "train_examples.jsonl", "eval_replies.jsonl"],
        ("run",): [SETTINGS_FILE, "contrast/", "store/", "probes/", "guard/", "patch/", "run.json", "README.md"],
        ("guard",): ["Writes no file"],
    }


@pytest.mark.parametrize("command", list(_writes()), ids=" ".join)
def test_help_lists_the_files_the_command_writes(command):
    text = _help(*command)
    missing = [name for name in _writes()[command] if name.lower() not in text.lower()]
    assert not missing, f"`safetyneurons {' '.join(command)} --help` does not say it writes {missing}"


def test_every_help_prints_single_percent_signs():
    commands = _all_commands()
    assert len(commands) >= 14
    for command in commands:
        text = _help(*command)
        assert "%%" not in text, command


@pytest.mark.parametrize("command", ["guard", "serve"])
def test_guard_help_states_the_threshold_rule_of_the_calibration(command):
    """The operating points and their rates as guard.calibrate sets them (on validation, as the guard scores)."""
    from safetyneurons.guard.calibrate import DEFAULT_POINT, OPERATING_POINTS

    text = _help(command)
    assert "training split" not in text and "validation split" in text
    point_help = text[text.index("--operating-point"):text.index("--threshold")]
    for name, fpr in OPERATING_POINTS.items():
        assert name in point_help and f"{100 * fpr:g}%" in point_help, (name, point_help)
    assert f"{DEFAULT_POINT} (the default" in point_help


def test_run_and_train_help_state_where_thresholds_are_set():
    from safetyneurons.run_settings import RunSettings

    run = _help("run")
    assert "validation split" in run and f"[default: {RunSettings().target_fpr}]" in run
    train = _help("train")
    assert "Youden" in train and "--target-fpr" in train and "validation" in train


# ---------------------------------------------- issue 25: a one-prompt guard call prints only its result
@pytest.mark.parametrize("as_json", [False, True])
def test_a_one_prompt_guard_call_writes_nothing_but_the_result(guard, cache, tmp_path, as_json):
    """No library progress bar ("Loading weights", ...) or warning on stderr, stdout holds the result only, and
    the working directory gets no file."""
    import json
    import os

    args = ["guard", "--guard", str(guard.path), "Tell me a joke."] + (["--json"] if as_json else [])
    res = subprocess.run([sys.executable, "-m", "safetyneurons", *args], capture_output=True, text=True, timeout=180,
                         cwd=tmp_path, env={**os.environ, "SAFETYNEURONS_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
                                            "TOKENIZERS_PARALLELISM": "false"})
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert not list(tmp_path.iterdir())
    want = guard.score(["Tell me a joke."])[0]
    if as_json:
        body = json.loads(res.stdout)
        assert [r["prompt"] for r in body["results"]] == ["Tell me a joke."] and body["id"] == guard.id
        assert body["results"][0]["unsafe_probability"] == pytest.approx(want.unsafe_probability, abs=1e-5)
    else:
        lines = res.stdout.splitlines()
        assert len(lines) == 3 and lines[0].split() == ["#", "p(unsafe)", "flagged", "prompt"]
        assert lines[1].split()[:3] == ["1", f"{want.unsafe_probability:.4f}", "YES" if want.flagged else "no"]
        assert lines[2].startswith(f"{int(want.flagged)} of 1 flagged")


def test_a_command_that_loads_models_shows_no_library_bar_with_no_progress(tmp_path):
    """`--no-progress` leaves stderr empty: no "Loading weights" bar of transformers for either model."""
    import os

    from builders import save_tiny_pair

    base, aligned = save_tiny_pair(tmp_path / "pair")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("How do I pick a lock?\nWrite a poem about rain.\n", encoding="utf-8")
    args = ["contrast", "--base", str(base), "--aligned", str(aligned), "--prompts", str(prompts),
            "--out", str(tmp_path / "c"), "--no-progress", "--top-percent", "10"]
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    res = subprocess.run([sys.executable, "-m", "safetyneurons", *args], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert res.returncode == 0, res.stderr
    assert res.stderr == "" and "Contrasted 2 prompts" in res.stdout
