"""`safetyneurons run`: the whole seed pipeline on the offline default (or your own pair and data)."""

from __future__ import annotations

import click

from safetyneurons.constants import (CLASSIFIERS, COMPLETION_FROM, FEATURES_FROM, GUARD_PIECE_MARGIN, HOOK_POINTS,
                                     POOLINGS, POSITIONS, SENTENCE_MIN_WORDS)


@click.command("run")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Directory for every result of the run (settings.json, contrast/, store/, probes/, guard/, "
                   "patch/ with --patch, run.json, README.md) "
                   "[default: runs/default, runs/paper with --paper, runs/<preset>-quick with --quick, and "
                   "runs/<preset>-<hash> when other settings change].")
@click.option("--force", is_flag=True,
              help="Replace a run with other settings in --out (kept until the new run has finished).")
@click.option("--quick", is_flag=True,
              help="Subsample train/test/held-out to a few hundred prompts (about 5 minutes once the twin is cached).")
@click.option("--paper", "paper", is_flag=True,
              help="Use the paper's setting (hook point mlp_neurons, change scores on completion tokens written by "
                   "the base model, last prompt token for the probes, a logistic-regression guard) instead of the "
                   "reference project's (mlp_out, content tokens, mean over the user's message, an SVM guard).")
@click.option("--hook-point", type=click.Choice(tuple(HOOK_POINTS)), default=None,
              help="Hook point for contrasting and probing [default: mlp_out, or mlp_neurons with --paper].")
@click.option("--pooling", type=click.Choice(POOLINGS), default=None,
              help="How a prompt's token activations are pooled for the probes [default: mean, or last with --paper].")
@click.option("--positions", type=click.Choice(tuple(POSITIONS)), default=None,
              help="Token positions whose activation change is scored [default: content, or completion with "
                   "--paper].")
@click.option("--completion-from", type=click.Choice(COMPLETION_FROM), default=None,
              help="Which model writes the answer for --positions completion [default: base, as in the paper].")
@click.option("--selection", type=click.Choice(["rms", "relative", "harmful_minus_benign"]), default=None,
              help="How the safety neurons are ranked: rms = the change score (the paper); relative = change / base "
                   "activation RMS; harmful_minus_benign = harmful change clearly above the benign one. Every "
                   "variant is reported side by side. [default: rms]")
@click.option("--top-percent", type=float, default=5.0, show_default=True,
              help="Share of all neurons kept as safety neurons, in (0, 100].")
@click.option("--max-layer", type=int, default=None,
              help="Layer budget: safety neurons only from layers 0..L (same count), so the guard stops after "
                   "layer L. [default: no budget]")
@click.option("--base", default=None, help="Base model reference [default: bundled SmolLM2-135M-Instruct].")
@click.option("--aligned", default=None,
              help="Aligned model reference [default: the default twin, built on first run and cached].")
@click.option("--splits", type=click.Path(file_okay=False), default=None,
              help="A splits directory from `safetyneurons data build` [default: the default mix].")
@click.option("--features-from", type=click.Choice(FEATURES_FROM), default="base", show_default=True,
              help="Which model's activations the probes read (the reference project used the base model).")
@click.option("--guard-classifier", type=click.Choice(CLASSIFIERS), default=None,
              help="Classifier of the exported guard (always on the safety neurons) [default: svm, which the "
                   "validation rule of docs/guard_quality.md picks; logreg with --paper, the paper's probe].")
@click.option("--guard-max-layer", default="none", show_default=True, metavar="auto|none|L",
              help="The guard's layer budget (it stops after that layer): none = the safety set as it is, the "
                   "guard stops after its deepest safety neuron; auto = the smallest budget whose validation AUROC "
                   "is within 0.005 of the best budget's (safetyneurons.probes.budget), a cheaper guard; or a layer "
                   "index.")
@click.option("--guard-words/--no-guard-words", default=True, show_default=True,
              help="The guard also reads the words of every piece: a TF-IDF logit summed with the safety-neuron "
                   "probe's (docs/guard.md); the validation rule of docs/guard_quality.md picks it. "
                   "--no-guard-words ships the neurons alone.")
@click.option("--guard-piece-margin", type=float, default=GUARD_PIECE_MARGIN, show_default=True, metavar="LOGIT",
              help="What a window or a sentence of a message must beat the whole message by, in the logit, to flag "
                   "it alone; the thresholds are set with it. Above 0 the guard flags fewer long benign prompts, "
                   "but benign text around a request lowers its score by up to that much (docs/guard_quality.md).")
@click.option("--guard-sentence-min-words", type=int, default=SENTENCE_MIN_WORDS, show_default=True, metavar="N",
              help="The guard reads each sentence of a message of several as its own piece, widened with its "
                   "neighbours' words to at least N words; 1 reads every sentence alone, so text around a request "
                   "never changes how its sentence is read. The training split's sentence pieces are cut the same "
                   "way.")
@click.option("--random-draws", type=int, default=20, show_default=True,
              help="Seeded draws of each random neuron control (layer-matched and global).")
@click.option("--bootstrap", "n_boot", type=int, default=1000, show_default=True,
              help="Bootstrap resamples for the confidence intervals.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Prompts per forward pass.")
@click.option("--max-length", type=int, default=256, show_default=True, help="Token limit per prompt.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for data splits, draws and bootstraps.")
@click.option("--target-fpr", type=float, default=0.05, show_default=True,
              help="Every probe's threshold (the guard's too) gives this false-positive rate on the benign prompts "
                   "of the validation split.")
@click.option("--no-augment", is_flag=True,
              help="Train on the training split as it is, without its benign 32-token windows and harmful-in-benign "
                   "compositions (safetyneurons.data.compose).")
@click.option("--patch", "patch", is_flag=True,
              help="Add the causal validation: dynamic activation patching of the run's safety neurons against 5 "
                   "layer-matched and 5 change-matched random sets, the refusal direction and mean/zero "
                   "baselines, on 200 + 100 test prompts (20 + 20 with --quick), written to <out>/patch.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
def run(out, force, quick, paper, hook_point, pooling, positions, completion_from, selection, top_percent, max_layer,
        base, aligned, splits, features_from, guard_classifier, guard_max_layer, guard_words, guard_piece_margin,
        guard_sentence_min_words, random_draws, n_boot, batch_size,
        max_length, seed, target_fpr, no_augment, patch, no_progress):
    """Run the whole pipeline: data, twin, contrast, safety neurons, heatmap, activations, probes with
    controls (random layer-matched and global neurons, largest-magnitude neurons, PCA, all features, text-only,
    length-only), held-out benchmark, guard."""
    from safetyneurons.pipeline import RunSettings, controls_markdown  # the library (torch) only when it runs
    from safetyneurons.pipeline import run as run_pipeline
    from safetyneurons.probes.overrefusal import render_overrefusal
    from safetyneurons.probes.report import results_table

    settings = RunSettings.for_preset("paper" if paper else "default", out=out, quick=quick, hook_point=hook_point,
                                      pooling=pooling, positions=positions, completion_from=completion_from,
                                      selection=selection,
                                      top_percent=top_percent, max_layer=max_layer, base=base,
                                      aligned=aligned, splits=splits, features_from=features_from,
                                      guard_classifier=guard_classifier, guard_max_layer=guard_max_layer,
                                      guard_words=guard_words, guard_piece_margin=guard_piece_margin,
                                      guard_sentence_min_words=guard_sentence_min_words,
                                      random_draws=random_draws, n_boot=n_boot,
                                      batch_size=batch_size, max_length=max_length, seed=seed, target_fpr=target_fpr,
                                      patch=patch, augment=False if no_augment else None)
    summary = run_pipeline(settings, progress=not no_progress, force=force,
                           started=lambda out: click.echo(f"Run directory: {out}", err=True))
    click.echo("\nTest split:\n" + results_table(summary["results"]) + "\n" + controls_markdown(summary, "test"))
    if summary.get("heldout"):
        click.echo("Held-out benchmark:\n" + results_table(summary["heldout"]) + "\n"
                   + controls_markdown(summary, "heldout"))
    if summary.get("overrefusal"):
        click.echo(render_overrefusal(summary["overrefusal"], "Over-refusal and recall (held-out sources)"))
    if summary.get("patch"):
        click.echo("Causal validation (dynamic activation patching):\n" + "\n".join(summary["patch"]["summary"]))
    click.echo(f"Report: {summary['report']}")
    click.echo(f"Guard:  {settings.out_dir}/guard  (try: safetyneurons guard --guard {settings.out_dir}/guard "
               f"\"your prompt\")")
