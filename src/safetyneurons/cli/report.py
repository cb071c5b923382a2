"""`safetyneurons report`: regenerate docs/results.md and the README's headline tables from runs and benchmarks."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command("report")
@click.argument("run_dirs", nargs=-1, type=click.Path(path_type=Path), metavar="[RUN_DIR]...")
@click.option("--benchmarks", type=click.Path(path_type=Path), default=None,
              help="Folder of benchmark JSON, each rendered as a table. [default: docs/benchmarks when it exists]")
@click.option("--out", type=click.Path(path_type=Path), default=Path("docs/results.md"),
              show_default=True, help="The results file written.")
@click.option("--readme", type=click.Path(path_type=Path), default=None,
              help="README whose '<!-- generated:NAME -->' blocks are filled (probes, guard, causal, mixed_load, "
                   "readouts). [default: README.md when it exists]")
@click.option("--check", is_flag=True,
              help="Write nothing; exit 1 when regenerating would change the results file or the README blocks.")
def report(run_dirs, benchmarks, out, readme, check):
    """Regenerate docs/results.md and the README's headline tables from run directories and benchmark JSON.

    RUN_DIR: finished `safetyneurons run` directories [default: those of runs/default, runs/paper and
    runs/default-quick that exist]. Every table names the file it comes from, the code version, the machine
    and the command; the same files give the same bytes.
    """
    from safetyneurons.results.generate import generate
    from safetyneurons.results.sources import shown

    if readme is None and Path("README.md").is_file():
        readme = Path("README.md")
    changed = generate(run_dirs, benchmarks, out, readme, check=check)
    names = ", ".join(shown(p) for p in changed)
    if check:
        if changed:
            click.echo(f"Out of date: {names}; run `safetyneurons report` to regenerate.", err=True)
            sys.exit(1)
        click.echo("Up to date.")
    else:
        click.echo(f"Wrote {names}." if changed else "Unchanged.")
