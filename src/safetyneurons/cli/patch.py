"""`safetyneurons patch`: causal validation of the safety neurons by dynamic activation patching."""

from __future__ import annotations

from pathlib import Path

import click

from safetyneurons.causal.causal import PatchSettings, load_neurons, load_prompts, run_patch
from safetyneurons.causal.report import summary_lines, write_outputs
from safetyneurons.data.splits import read_prompts
from safetyneurons.errors import UserError
from safetyneurons.model.pair import DEFAULT_BASE, load_pair
from safetyneurons.causal.patch import DIRECTIONS, SWEEP_K
from safetyneurons.causal.measures import fast_dtype
from safetyneurons.cli.contrast import check_replaceable_out

_SWEEP = ",".join(f"{k:g}" for k in SWEEP_K)  # 0.5,1,2,5,10


def parse_k(value: str) -> list[float]:
    items = [v.strip().rstrip("%") for v in str(value).split(",") if v.strip()]
    try:
        return [float(v) for v in items]
    except ValueError:
        raise UserError(f"--k must be percentages separated by commas (e.g. 5 or {_SWEEP}), got {value!r}.") from None


@click.command("patch", context_settings={"show_default": True})
@click.option("--scores", type=click.Path(path_type=Path), default=None,
              help="Change scores: the --out directory of `safetyneurons contrast` (or <run>/contrast). "
                   "With --neurons: the scores that set was chosen from, for the change-matched control. "
                   "[default: runs/default/contrast, unless --neurons is given]")
@click.option("--neurons", type=click.Path(path_type=Path), default=None,
              help="A neuron_set.json, patched as it is (k can be at most the set's own share); it has a "
                   "change-matched control only when --scores is given too.")
@click.option("--base", default=None, metavar="REF", help="Base model [default: the bundled SmolLM2-135M-Instruct].")
@click.option("--aligned", default="twin:default", metavar="REF", help="Safety-aligned twin of the base.")
@click.option("--data", "data_source", default="split:test", metavar="FILE|DATASET",
              help="Labelled held-out prompts (harmful = 1, benign = 0): a file, a dataset name or split:NAME.")
@click.option("--harmful", "n_harmful", type=int, default=200, help="Harmful prompts used (all, when fewer).")
@click.option("--benign", "n_benign", type=int, default=100, help="Benign prompts used (all, when fewer).")
@click.option("--per-class", type=int, default=None, help="Harmful and benign prompts (each): sets both counts.")
@click.option("--k", "k", default=None, metavar="PERCENTS",
              help=f"Top k% of neurons by change score, comma-separated, each in (0, 50] (sweep: {_SWEEP}). "
                   f"[default: 5, or the --neurons set's own share]")
@click.option("--sweep", is_flag=True, help=f"Shorthand for --k {_SWEEP}.")
@click.option("--random-sets", type=int, default=5, help="Layer-matched random control sets per k.")
@click.option("--change-sets", type=int, default=5,
              help="Change-matched random control sets per k (from --scores; 0: none).")
@click.option("--refusal-direction/--no-refusal-direction", default=True,
              help="Also the refusal-direction baseline (difference in means on --direction-data).")
@click.option("--direction-data", default="split:contrast", metavar="FILE|DATASET",
              help="Labelled prompts the refusal direction and its layer come from (never the test prompts).")
@click.option("--directions", default=",".join(DIRECTIONS),
              help="sufficiency (base <- aligned), necessity (aligned <- base), or both, comma-separated.")
@click.option("--baselines/--no-baselines", default=True, help="Also mean patching and zero ablation.")
@click.option("--reference", default=None, metavar="FILE",
              help="Plain reference texts (one per line, or any prompt file) for the perplexity "
                   "[default: the benign prompts].")
@click.option("--reference-texts", type=int, default=50, show_default=True,
              help="How many reference texts the perplexity reads (the first N).")
@click.option("--hook-point", type=click.Choice(("mlp_out", "mlp_neurons", "resid")), default=None,
              help="Expected hook point; must match the neuron set's [default: the set's own].")
@click.option("--max-new-tokens", type=int, default=32, help="Greedy tokens per reply.")
@click.option("--full-replies", is_flag=True,
              help="Generate every reply to --max-new-tokens; by default a reply stops once the judge finds a "
                   "refusal phrase in it (its verdict cannot change after that).")
@click.option("--batch-size", type=int, default=8, help="Prompts per batch (each carries one row per patched set).")
@click.option("--padding-side", type=click.Choice(("left", "right")), default="left",
              help="Padding side of the batches (the generations do not depend on it).")
@click.option("--max-length", type=int, default=256, help="Token limit per prompt.")
@click.option("--dtype", type=click.Choice(("auto", "float32", "bfloat16", "float16")), default="auto",
              help="Weights' dtype while generating. auto: bfloat16 where the device computes it natively (CUDA "
                   "with bf16, CPUs with AVX512-BF16/AMX; about half the time), else float32. Recorded in patch.json.")
@click.option("--device", type=click.Choice(("cpu", "cuda", "auto")), default="cpu")
@click.option("--seed", type=int, default=0, help="Seed of the random control sets.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/default/patch"),
              help="Output directory: patch.json, patch.png, patch.md, generations.jsonl (written atomically).")
@click.option("--progress/--no-progress", default=True, help="Show progress bars on stderr.")
def patch(scores, neurons, base, aligned, data_source, n_harmful, n_benign, per_class, k, sweep, random_sets,
          change_sets, refusal_direction, direction_data, directions, baselines, reference, reference_texts,
          hook_point, max_new_tokens, full_replies, batch_size, padding_side,
          max_length, dtype, device, seed, out, progress):
    """Do the safety neurons cause the aligned model's behaviour? Dynamic activation patching.

    Both models generate greedily in lockstep. At every step the receiving model's activations at the
    neurons are replaced by the other model's activations on the same prefix (base <- aligned:
    sufficiency; aligned <- base: necessity). The safety set (top k% by change score) is compared with
    layer-matched and change-matched random sets, the refusal direction, mean patching and zero ablation,
    by the phrase judge's refusal and answer rates, the refusal score at the first answer position, the
    degenerate-text share, perplexity on benign text, and a paired bootstrap over prompts and draws.

    \b
    Example (after `safetyneurons run`):
      safetyneurons patch --scores runs/default/contrast --out runs/default/patch
    """
    if sweep and k is not None:
        raise UserError("Give either --k or --sweep, not both.")
    ks = parse_k(_SWEEP if sweep else (k or "5"))
    if per_class is not None:
        n_harmful = n_benign = per_class
    settings = PatchSettings(k=ks, random_sets=random_sets, change_sets=change_sets, directions=directions,
                             baselines=baselines, refusal_direction=refusal_direction, harmful=n_harmful,
                             benign=n_benign, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             stop_at_refusal=not full_replies, reference_texts=reference_texts,
                             padding_side=padding_side, max_length=max_length, seed=seed).validate()
    out = check_replaceable_out(out, "patch.json")
    if scores is None and neurons is None:
        scores = Path("runs/default/contrast")
        if not scores.is_dir():
            raise UserError("No change scores at runs/default/contrast: run `safetyneurons run` first, or give "
                            "--scores DIR (a `safetyneurons contrast` output) or --neurons FILE.")
    # with both: the set as it is, its change-matched control from the scores
    change = load_neurons(scores=scores) if scores is not None and neurons is not None else None
    neuron_source = load_neurons(None if change is not None else scores, neurons)
    if neurons is not None and k is None and not sweep:  # the set as it is
        total = neuron_source.num_layers * neuron_source.width
        settings.k = PatchSettings(k=(100.0 * len(neuron_source) / total,)).validate().k
    if hook_point is not None and hook_point != neuron_source.hook_point:
        raise UserError(f"--hook-point {hook_point} does not match the neuron set's hook point "
                        f"{neuron_source.hook_point}. Use scores contrasted at {hook_point}.")
    harmful, benign, provenance = load_prompts(data_source, settings.harmful, settings.benign)
    direction_prompts = None
    if refusal_direction:
        dh, db, _ = load_prompts(direction_data, 10**9, 10**9)
        direction_prompts = (dh, db)
    texts = None
    if reference is not None:
        texts = read_prompts(reference)
    if dtype == "auto":
        dtype = fast_dtype(device)
    pair = load_pair(base or DEFAULT_BASE, aligned, dtype=dtype, device=device)
    result = run_patch(*pair, neuron_source, harmful, benign, reference=texts, settings=settings,
                       hook_point=hook_point, progress=progress, direction_prompts=direction_prompts,
                       change=change)
    result["data"]["prompts"] = provenance
    result["data"]["reference_source"] = reference or "the benign prompts"
    write_outputs(result, out)
    for line in summary_lines(result):
        click.echo(line)
    click.echo(f"Wrote {out}/patch.md, patch.json, patch.png, generations.jsonl "
               f"({result['timings']['total_s'] / 60:.1f} min)")
