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
