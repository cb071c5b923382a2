"""`safetyneurons extract`, `train` and `evaluate`: activation stores and safety-neuron probes."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from safetyneurons import distributed
from safetyneurons._io import atomic_dir, check_out_dir, sha256_file
from safetyneurons.constants import (CLASSIFIERS, DEVICES, FEATURE_SETS, GUARD_CLASSIFIER, GUARD_FEATURE_SETS,
                                     GUARD_PIECE_MARGIN, HOOK_POINTS, MODEL_DTYPES, POOLINGS, STORE_DTYPES)
from safetyneurons.checks import check_piece_margin
from safetyneurons.data.splits import read_records
from safetyneurons.errors import UserError
from safetyneurons.guard_steps import SAVED_PROBES, Inputs, train_and_guard
from safetyneurons.probes.budget import AUTO, check_guard_max_layer
from safetyneurons.probes.variants import VARIANTS
from safetyneurons.run_settings import RunSettings
from safetyneurons.probes.evaluate import evaluate_probe, probe_features
from safetyneurons.neurons.selection import NeuronSet
from safetyneurons.model.pair import DEFAULT_BASE, load_model
from safetyneurons.probes.probe import TextProbe, load_probe, parse_list
from safetyneurons.data.records import check_records
from safetyneurons.probes.report import (controls_section, evaluation_label, evaluation_report, reference_printout, results_table,
                      write_evaluation)
from safetyneurons.activations.store import Store, check_store_out, describe_store
from safetyneurons.neurons.contrast import ChangeScores
from safetyneurons.steps import (extract_split, parse_split_ref, safety_neurons, split_data_info, split_part,
                                 splits_dir, store_split_records)


def read_labelled(arg: str, splits: str | None = None) -> tuple[list[dict], dict]:
    """Records of a split (``split:NAME`` from ``splits``, default: the default splits; what a store records
    about it is what `run`'s store records), file or named dataset (via safetyneurons.data.splits), plus
    provenance."""
    split = parse_split_ref(str(arg))
    if split is not None:
        name, part = split
        where = splits_dir(splits)
        records = split_part(read_records(where / f"{name}.jsonl"), part)
        if part is None:
            return records, split_data_info(name, where)
        arg = where / f"{name}.jsonl"
    else:
        records = read_records(arg)
    info = {"source": str(arg)} if split is None else {"source": str(arg), "part": split[1]}
    path = Path(arg).expanduser()
    if path.is_file():
        info["file_sha256"] = sha256_file(path)
    return records, info


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise UserError(f"--{name} must be >= 1 (got {value}).")
    return value


@click.command("extract")
@click.option("--model", "model_ref", default=None, metavar="REF",
              help="Model whose activations are stored (default: the default base model).")
@click.option("--data", required=True, metavar="SPLIT_OR_FILE",
              help="Labelled split (split:train, split:val, split:test, split:heldout...), JSONL file or named "
                   "dataset.")
@click.option("--splits", type=click.Path(file_okay=False), default=None,
              help="Splits directory that split:NAME is read from (from `safetyneurons data build`). "
                   "[default: the default splits, as `run` uses]")
@click.option("--augment", is_flag=True,
              help="Add the records' benign 32-token windows and harmful-in-benign / benign+benign compositions "
                   "(safetyneurons.data.compose), as `run` does for the training split (only there).")
@click.option("--seed", default=0, show_default=True, help="Seed of --augment's compositions (`run --seed`).")
@click.option("--hook-point", type=click.Choice(tuple(HOOK_POINTS)), default=None,
              help="Where to read activations (default: the neuron set's hook point, else mlp_out).")
@click.option("--pooling", type=click.Choice(POOLINGS), default="mean", show_default=True,
              help="mean over prompt tokens (reference project) or last prompt token (paper).")
@click.option("--neurons", "neurons_file", type=click.Path(dir_okay=False), default=None,
              help="Neuron set JSON: keep only its neurons (with early exit). Default: keep all neurons.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Store directory (resumable): manifest.json, records.jsonl and shard-NNNNN.safetensors.")
@click.option("--dtype", type=click.Choice(STORE_DTYPES), default="float16", show_default=True,
              help="Storage dtype of the features.")
@click.option("--shard-size", default=256, show_default=True, help="Prompts per shard.")
@click.option("--batch-size", default=16, show_default=True, help="Prompts per forward pass.")
@click.option("--max-length", default=256, show_default=True,
              help="Token limit; a longer prompt keeps its first part that fits with the chat template.")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True)
@click.option("--model-dtype", type=click.Choice(MODEL_DTYPES), default="float32",
              show_default=True, help="Dtype the model runs in.")
def extract(model_ref, data, splits, augment, seed, hook_point, pooling, neurons_file, out, dtype, shard_size,
            batch_size, max_length, device, model_dtype):
    """Cache pooled activations of a model over a labelled split (safetensors shards + manifest).

    Rerunning the same command after an interruption resumes from the last finished shard.
    """
    for name, v in (("shard-size", shard_size), ("batch-size", batch_size), ("max-length", max_length)):
        _positive(name, v)
    ns = NeuronSet.load(neurons_file) if neurons_file else None
    if ns is not None and hook_point and hook_point != ns.hook_point:
        raise UserError(f"--hook-point {hook_point} differs from the neuron set's hook point {ns.hook_point}; "
                        f"leave --hook-point out or use a neuron set found at {hook_point}.")
    hook_point = hook_point or (ns.hook_point if ns is not None else "mlp_out")
    check_store_out(Path(out))
    records, info = read_labelled(data, splits)
    check_records(records, what=f"--data {data}")
    distributed.init_from_env(device)  # under torchrun: each rank writes its share of the shards
    lm = load_model(model_ref or DEFAULT_BASE, dtype=model_dtype, device=device)
    store = extract_split(lm, records, out, augment_seed=seed if augment else None, hook_point=hook_point,
                          pooling=pooling, neuron_set=ns, shard_size=shard_size, dtype=dtype, batch_size=batch_size,
                          max_length=max_length, progress=True, data_info=info)
    m = store.manifest
    if distributed.is_main():
        click.echo(f"Wrote store {out}: {m['n']} prompts x {m['d']} features ({m['layout']}, {hook_point}, "
                   f"{pooling} pooling, {dtype}) in {len(m['shards'])} shard(s).")


@click.command("train")
@click.option("--train", "train_dir", required=True, type=click.Path(), help="Store of the training split.")
@click.option("--test", "test_dir", required=True, type=click.Path(), help="Store of the test split.")
@click.option("--val", "val_dir", type=click.Path(), default=None,
              help="Store of the validation split: every probe's threshold is set on it for --target-fpr, the "
                   "guard's operating points too (read as the guard reads), and the guard's layer budget is chosen "
                   "on it (default: the Youden point of cross-validated training probabilities, no budget).")
@click.option("--heldout", "heldout_dir", type=click.Path(), default=None,
              help="Store of the held-out sources: every probe scored on it, with the over-refusal table.")
@click.option("--scores", "scores_dir", type=click.Path(), default=None,
              help="`contrast` output on the harmful prompts: the safety neurons are selected from it as `run` "
                   "does (--selection, --top-percent, --max-layer), every selection variant gets its probe, and "
                   "the guard's layer budget reselects from it.")
@click.option("--benign-scores", "benign_dir", type=click.Path(), default=None,
              help="`contrast` output on the benign prompts (split:contrast:benign), for the harmful-minus-benign "
                   "variant.")
@click.option("--neurons", "neurons_file", type=click.Path(dir_okay=False), default=None,
              help="Safety neuron set JSON (default: the one --scores selects, else the one the stores were "
                   "extracted with).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output directory: report.json, report.md, ROC/PR curves (roc_<classifier>.png, "
                   "pr_<classifier>.png) and the saved probes (probes/).")
@click.option("--classifiers", default=",".join(CLASSIFIERS), show_default=True,
              help=f"Comma list of: {', '.join(CLASSIFIERS)}.")
@click.option("--feature-sets", default=",".join(FEATURE_SETS), show_default=True,
              help=f"Comma list of: {', '.join(FEATURE_SETS)} (random: layer-matched).")
@click.option("--random-draws", default=20, show_default=True,
              help="Seeded draws of each random neuron control (random, random_global).")
@click.option("--seed", default=0, show_default=True)
@click.option("--bootstrap", "n_boot", default=1000, show_default=True, help="Bootstrap resamples for CIs (0: none).")
@click.option("--cv", default=5, show_default=True, help="CV folds on the training split (calibration, threshold).")
@click.option("--control-cv", default=None, type=int,
              help="CV folds for the random draws [default: --cv, the safety probe's protocol; 0: one fit per draw, "
                   "about 3x faster, but another calibration, so not comparable: exploration only].")
@click.option("--save-probes", default=",".join(SAVED_PROBES), show_default=True,
              help="Feature sets whose probes are saved under OUT/probes (random controls: draw 1).")
@click.option("--export-guard", "guard_dir", type=click.Path(file_okay=False), default=None,
              help="Also export a guard from the probe below into this directory.")
@click.option("--guard-feature-set", type=click.Choice(GUARD_FEATURE_SETS), default="safety",
              show_default=True, help="Which probe --export-guard ships.")
@click.option("--guard-classifier", type=click.Choice(CLASSIFIERS), default=None,
              help="Classifier of the guard [default: svm, as `run`; the first of --classifiers without it].")
@click.option("--guard-max-layer", default="none", show_default=True, metavar="auto|none|L",
              help="The guard's layer budget, as `run --guard-max-layer` (needs --scores; auto also --val).")
@click.option("--guard-words", is_flag=True,
              help="The guard also reads the words of every piece, as `run` does by default (needs --val: its "
                   "thresholds are set on validation scored that way).")
@click.option("--guard-piece-margin", type=float, default=GUARD_PIECE_MARGIN, show_default=True, metavar="LOGIT",
              help="What a window or a sentence must beat the whole message by, in the logit, to flag it alone, as "
                   "`run --guard-piece-margin` (needs --val and --export-guard).")
@click.option("--selection", type=click.Choice(list(VARIANTS)), default="rms", show_default=True,
              help="With --scores: the selection variant of the safety neurons.")
@click.option("--top-percent", type=float, default=5.0, show_default=True,
              help="With --scores: share of all neurons kept as safety neurons.")
@click.option("--max-layer", type=int, default=None,
              help="With --scores: layer budget of the safety neurons. [default: no budget]")
@click.option("--target-fpr", type=float, default=0.05, show_default=True,
              help="With --val: the false-positive rate on its benign prompts that the thresholds give.")
@click.option("--category-min-examples", default=20, show_default=True,
              help="A hazard needs this many labelled harmful training prompts for a category head.")
@click.option("--batch-size", default=16, show_default=True,
              help="Prompts per forward pass when the guard reads the validation and held-out prompts.")
def train(train_dir, test_dir, val_dir, heldout_dir, scores_dir, benign_dir, neurons_file, out, classifiers,
          feature_sets, random_draws, seed, n_boot, cv, control_cv, save_probes, guard_dir, guard_feature_set,
          guard_classifier, guard_max_layer, guard_words, guard_piece_margin, selection, top_percent, max_layer,
          target_fpr, category_min_examples, batch_size):
    """Train probes on safety neurons and controls, and report test metrics (report.json/.md, curves).

    With --val, --heldout and --scores it takes every step `run` takes after its stores (thresholds, layer
    budget, held-out benchmark, category heads, guard)."""
    check_out_dir(out)
    if n_boot < 0 or cv < 0:
        raise UserError("--bootstrap and --cv must be >= 0.")
    clfs = parse_list(classifiers, CLASSIFIERS, "classifier")
    sets = parse_list(feature_sets, FEATURE_SETS, "feature set")
    keep = parse_list(save_probes, FEATURE_SETS, "feature set to save") if save_probes.strip() else []
    default = GUARD_CLASSIFIER["default"]
    guard_classifier = guard_classifier or (default if default in clfs else clfs[0])
    if guard_dir and (guard_classifier not in clfs or guard_feature_set not in sets):
        raise UserError(f"--export-guard ships the {guard_feature_set}/{guard_classifier} probe, which is not "
                        f"trained: add it to --feature-sets and --classifiers.")
    if not 0.0 <= target_fpr < 1.0:
        raise UserError(f"--target-fpr must be in [0, 1), got {target_fpr}.")
    guard_max_layer = check_guard_max_layer(guard_max_layer)
    if guard_words and (val_dir is None or guard_dir is None):
        raise UserError("--guard-words needs --val (the thresholds are set on validation read with the words) and "
                        "--export-guard DIR.")
    if check_piece_margin(guard_piece_margin) and (val_dir is None or guard_dir is None):
        raise UserError("--guard-piece-margin needs --val (the thresholds are set on validation scored with it) and "
                        "--export-guard DIR.")
    if scores_dir is None and guard_max_layer not in (None, AUTO):
        raise UserError("--guard-max-layer L reselects the safety neurons from change scores: give --scores.")
    s = RunSettings(classifiers=clfs, feature_sets=sets, random_draws=random_draws, seed=seed, n_boot=n_boot,
                    target_fpr=target_fpr, guard_classifier=guard_classifier, guard_max_layer=guard_max_layer,
                    guard_words=guard_words, guard_piece_margin=guard_piece_margin, selection=selection,
                    top_percent=top_percent, max_layer=max_layer,
                    batch_size=batch_size, category_min_examples=category_min_examples)
    inputs = _training_inputs(s, train_dir, test_dir, val_dir, heldout_dir, scores_dir, benign_dir, neurons_file)
    with atomic_dir(out) as tmp:
        _, report = train_and_guard(s, inputs, tmp, Path(guard_dir) if guard_dir else None, cv=cv,
                                    control_cv=control_cv, save_probes=keep, guard_feature_set=guard_feature_set)
    for r in report["results"]:
        if r["feature_set"] in ("safety", "text", "length"):
            click.echo(reference_printout(f"{r['feature_set']} / {r['classifier']}", r["metrics"]))
    click.echo(results_table(report["results"]))
    click.echo(controls_section(report))
    click.echo(f"Report: {Path(out) / 'report.md'}")
    if guard_dir:
        click.echo(f"Guard exported to {guard_dir} ({guard_feature_set} / {guard_classifier}).")


def _training_inputs(s, train_dir, test_dir, val_dir, heldout_dir, scores_dir, benign_dir, neurons_file) -> Inputs:
    """The stores, their split records (hazard labels, the validation prompts), the safety neurons (selected from
    --scores as `run` selects them, or --neurons), and the model the stores were read from (loaded on use)."""
    dirs = {"train": train_dir, "val": val_dir, "test": test_dir, "heldout": heldout_dir}
    stores = {name: Store.load(d) for name, d in dirs.items() if d}
    records, files = {}, {}
    for name, store in stores.items():
        records[name], files[name] = store_split_records(store)
        files[name] = files[name] or describe_store(store)
    scores = ChangeScores.load(scores_dir) if scores_dir else None
    benign = ChangeScores.load(benign_dir) if benign_dir else None
    ns = NeuronSet.load(neurons_file) if neurons_file else None
    chosen = safety_neurons(scores, benign, s.selection, s.top_percent, s.max_layer) if scores else None
    if chosen is not None:
        if ns is not None and not np.array_equal(ns.flat_indices(), chosen.neuron_set.flat_indices()):
            raise UserError(f"--neurons {neurons_file} is not the set --scores selects (--selection {s.selection}, "
                            f"--top-percent {s.top_percent:g}); leave --neurons out or give matching options.")
        ns = chosen.neuron_set

    def store_model():
        spec = stores["train"].spec
        return load_model(spec.model["ref"], expected={"sha256": spec.fingerprint} if spec.fingerprint else None)

    return Inputs(stores, records, ns, store_model, chosen, scores, benign, files)


@click.command("evaluate")
@click.option("--probe", "probe_dir", required=True, type=click.Path(), help="Saved probe directory.")
@click.option("--data", required=True, metavar="FILE_OR_NAME",
              help="Labelled file, split or named dataset (e.g. heldout), or an activation store directory.")
@click.option("--model", "model_ref", default=None, metavar="REF",
              help="Model to read activations from (default: the one the probe was trained on).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output directory: report.json, report.md, roc.png, pr.png and predictions.jsonl.")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--bootstrap", "n_boot", default=1000, show_default=True, help="Bootstrap resamples for the AUROC CI.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True)
def evaluate(probe_dir, data, model_ref, out, batch_size, n_boot, seed, device):
    """Score a trained probe on any labelled data (e.g. the held-out sources) and write a report."""
    check_out_dir(out)
    _positive("batch-size", batch_size)
    if n_boot < 0:
        raise UserError("--bootstrap must be >= 0.")
    probe = load_probe(probe_dir)
    meta = probe.meta
    features = None
    lm = None
    data_path = Path(data).expanduser()
    if data_path.is_dir() and (data_path / "manifest.json").is_file():
        store = Store.load(data_path)
        records, info = store.records, {"source": str(data_path), "store": True,
                                        "records_sha256": store.manifest["records_sha256"]}
        if not isinstance(probe, TextProbe):
            features = probe_features(probe, store=store)
    else:
        records, info = read_labelled(data)
    records = check_records(records, what=f"--data {data}")
    if not isinstance(probe, TextProbe) and features is None:
        ref = model_ref or (meta.get("model") or {}).get("ref")
        if not ref:
            raise UserError("The probe does not record its model; pass --model REF.")
        lm = load_model(ref, device=device, chat_template=(meta.get("model") or {}).get("chat_template"))
    res = evaluate_probe(probe, records, lm=lm, features=features, n_boot=n_boot, seed=seed, batch_size=batch_size)
    report = evaluation_report(probe, probe_dir, records, res, info, lm)
    with atomic_dir(out) as tmp:
        write_evaluation(tmp, report, records, res)
    m = res["metrics"]
    click.echo(reference_printout(evaluation_label(report), m))
    ci = m["auroc_ci"]
    click.echo(f"accuracy {m['accuracy']:.4f}  F1 {m['f1']:.4f}  AUROC {m['auroc']:.4f}"
               + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci[0] is not None else "")
               + f"  AUPRC {m['auprc']:.4f}  TPR@1%FPR {m['tpr_at_1pct_fpr']:.4f}")
    click.echo(f"Report: {Path(out) / 'report.md'}")


@click.command("readouts")
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False),
              help="Run directory (its guard/, settings.json): the model, safety neurons and splits compared.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output directory: readouts.json, readouts.md and the per-text activation cache (cache/).")
@click.option("--splits", type=click.Path(file_okay=False), default=None,
              help="Splits directory (default: the run's, i.e. the library's default splits for its seed).")
@click.option("--compose", "n_compose", default=10, show_default=True,
              help="Harmful prompts per composition cell (position x length), validation and held-out.")
@click.option("--rephrase", "n_rephrase", default=150, show_default=True,
              help="Held-out prompts rewritten by every rephrasing rule.")
@click.option("--random-draws", default=2, show_default=True, help="Random layer-matched control draws.")
@click.option("--batch-size", default=16, show_default=True, help="Texts per forward pass.")
@click.option("--seed", default=0, show_default=True)
@click.option("--benchmark-json", type=click.Path(dir_okay=False), default=None,
              help="Also write the table as a benchmark JSON (e.g. docs/benchmarks/readouts.json) and its .md.")
def readouts(run_dir, out, splits, n_compose, n_rephrase, random_draws, batch_size, seed, benchmark_json):
    """Measure the guard's readout variants side by side and pick one by the pre-registered rule."""
    import shlex
    import sys

    from safetyneurons.probes.readout_report import choice_notes, write_benchmark
    from safetyneurons.probes.readouts import compare_readouts

    for name, value in (("compose", n_compose), ("rephrase", n_rephrase), ("batch-size", batch_size)):
        _positive(name, value)
    if random_draws < 0:
        raise UserError(f"--random-draws must be >= 0 (got {random_draws}).")
    if not (Path(run_dir) / "guard").is_dir():
        raise UserError(f"--run {run_dir} holds no guard/; give a run directory made by `safetyneurons run`.")
    report = compare_readouts(run_dir, out, splits=splits, n_compose=n_compose, n_rephrase=n_rephrase,
                              random_draws=random_draws, batch_size=batch_size, seed=seed)
    if benchmark_json:
        write_benchmark(report, Path(benchmark_json), "safetyneurons " + shlex.join(sys.argv[1:]))
    click.echo(f"chosen: {report['choice']['chosen']} ({report['choice']['reason']}); see {Path(out) / 'readouts.md'}")
    for note in choice_notes(report):
        click.echo(note)
