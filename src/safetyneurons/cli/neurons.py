"""`safetyneurons neurons select|plot`: pick safety neurons from change scores and plot where they sit."""

from __future__ import annotations

from pathlib import Path

import click

from safetyneurons.neurons import selection as lib
from safetyneurons._io import check_out_dir
from safetyneurons.neurons.contrast import ChangeScores
from safetyneurons.errors import UserError
from safetyneurons.probes.variants import VARIANTS


@click.group("neurons")
def neurons():
    """Select safety neurons from `contrast` change scores, and plot them."""


@neurons.command("select", context_settings={"show_default": True})
@click.option("--scores", "scores_dir", required=True, type=click.Path(path_type=Path),
              help="Output directory of `safetyneurons contrast` (scores.safetensors + contrast.json).")
@click.option("--top-percent", type=float, default=None,
              help="Select the top K% of neurons by change score, K in (0, 100]. [default: 5]")
@click.option("--top-n", type=int, default=None, help="Select the top N neurons instead of a percentage.")
@click.option("--per-layer", is_flag=True, help="Apply the rule within each layer instead of globally.")
@click.option("--max-layer", type=int, default=None,
              help="Layer budget: choose only neurons in layers 0..L (same count as without it), so extraction "
                   "and the guard stop after layer L (early exit). [default: no budget]")
@click.option("--selection", type=click.Choice(list(VARIANTS)), default="rms",
              help="How the safety neurons are ranked, as `safetyneurons run --selection`: rms = the change score "
                   "(the paper); relative = change / base activation RMS; harmful_minus_benign = harmful change "
                   "clearly above the benign one (needs --benign-scores).")
@click.option("--benign-scores", "benign_dir", type=click.Path(path_type=Path), default=None,
              help="`contrast` output on the benign prompts (--prompts split:contrast:benign): every selection "
                   "variant is then compared, as in `run`. [default: none]")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Neuron-set JSON file to write (format safetyneurons.neuron_set/1).")
def select(scores_dir, top_percent, top_n, per_layer, max_layer, selection, benign_dir, out):
    """Write the neurons with the highest change scores as a neuron set (ties: lower layer, lower index)."""
    from safetyneurons.steps import safety_neurons

    top_percent, top_n = lib.check_selection(top_percent, top_n)
    lib.check_max_layer(max_layer)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file path such as {out / 'neuron_set.json'}.")
    if (top_n is not None or per_layer) and (selection != "rms" or benign_dir is not None):
        raise UserError("--top-n and --per-layer select by the change score alone; leave out --selection and "
                        "--benign-scores with them.")
    scores = ChangeScores.load(scores_dir)
    if top_n is None and not per_layer:  # as `run` selects: every variant, the chosen one written
        chosen = safety_neurons(scores, ChangeScores.load(benign_dir) if benign_dir else None, selection,
                                top_percent, max_layer)
        neuron_set = chosen.neuron_set
        click.echo("Selection variants (neurons, deepest layer): " + ", ".join(
            f"{n} {v['count']} L{v['deepest_layer']}" for n, v in chosen.record["variants"].items()))
    else:
        neuron_set = lib.select(scores, top_percent=top_percent, top_n=top_n, per_layer=per_layer,
                                max_layer=max_layer)
    neuron_set.save(out)
    counts = neuron_set.per_layer_counts()
    busiest = int(counts.argmax())
    click.echo(f"Selected {len(neuron_set)} of {scores.num_layers * scores.width} neurons at {scores.hook_point} "
               f"(most in layer {busiest}: {int(counts[busiest])}; deepest layer {neuron_set.deepest_layer}). "
               f"Wrote {out}")


@neurons.command("plot")
@click.option("--scores", "scores_dir", required=True, type=click.Path(path_type=Path),
              help="Output directory of `safetyneurons contrast`.")
@click.option("--neurons", "neurons_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Neuron-set JSON to mark on the heatmap. [default: SCORES/neuron_set.json if present, "
                   "else the top 5%]")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write heatmap.png, layer_counts.png and stats.json into (created if needed; "
                   "other files in it are left alone).")
def plot(scores_dir, neurons_file, out):
    """Heatmap of change scores (layers x neurons, safety neurons marked), per-layer counts, sparsity stats."""
    check_out_dir(out)
    scores = ChangeScores.load(scores_dir)
    if neurons_file is not None:
        neuron_set = lib.NeuronSet.load(neurons_file)
    elif (Path(scores_dir) / "neuron_set.json").is_file():
        neuron_set = lib.NeuronSet.load(Path(scores_dir) / "neuron_set.json")
    else:
        neuron_set = lib.select(scores)
    written = lib.write_report(scores, neuron_set, out)
    click.echo(f"Wrote {', '.join(str(p) for p in written.values())}")
