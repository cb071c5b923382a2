"""The steps of `safetyneurons run` from data to safety neurons to stores, each callable on its own.

:func:`safetyneurons.pipeline.run` calls these functions in order, and so do the step-by-step commands
(`contrast`, `neurons select`, `extract`) and the Python example of docs/steps.md; the probes and the guard
follow in :mod:`safetyneurons.guard_steps`. So following the steps with `run`'s defaults gives the same safety
neurons and the same guard as `run` (tests/test_steps.py checks it byte for byte on a tiny pair).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from safetyneurons._io import atomic_write_text, sha256_file
from safetyneurons.data import splits as data
from safetyneurons.activations.store import extract
from safetyneurons.data.compose import SENTENCE_MIN_WORDS, augment_training
from safetyneurons.data.records import stratified_sample
from safetyneurons.errors import UserError
from safetyneurons.model.pair import DEFAULT_BASE, check_configs, check_symmetry, load_model
from safetyneurons.neurons.contrast import contrast
from safetyneurons.neurons.selection import check_max_layer
from safetyneurons.neurons.selection import write_report as write_neuron_report
from safetyneurons.probes.budget import check_guard_max_layer
from safetyneurons.probes.variants import compare_variants, selection_variants, variants_markdown
from safetyneurons.twin.build import ensure_default_twin

if TYPE_CHECKING:
    from safetyneurons.activations.store import Store
    from safetyneurons.model.pair import LoadedModel
    from safetyneurons.neurons.contrast import ChangeScores
    from safetyneurons.neurons.selection import NeuronSet
    from safetyneurons.run_settings import RunSettings

#: the parts of a labelled split by label: ``split:contrast`` is its harmful part, the prompts `run` contrasts
SPLIT_PARTS = {"harmful": 1, "benign": 0}


# ------------------------------------------------------------------------------------------------ data
def splits_dir(splits: str | Path | None, seed: int = 0) -> Path:
    """A splits directory, or the default splits of ``seed`` (built on first use) when None."""
    return Path(splits) if splits else data.default_splits_dir(seed=seed)


def check_splits(s: RunSettings) -> None:
    """Refuse a ``--splits`` directory the run cannot use, before anything is written: it lacks a file every run
    reads, or val.jsonl when the guard reads words (its thresholds are set on val read with the words). The default
    splits hold every file."""
    if not s.splits:
        return
    splits = Path(s.splits)
    missing = [n for n in ("contrast.jsonl", "train.jsonl", "test.jsonl") if not (splits / n).is_file()]
    if missing:
        raise UserError(f"--splits {splits} lacks {', '.join(missing)}; build it with `safetyneurons data build`.")
    if s.guard_words and not (splits / "val.jsonl").is_file():
        raise UserError(f"--splits {splits} lacks val.jsonl, which a guard with words needs (its thresholds are set "
                        f"on it, read with the words); build it with `safetyneurons data build`, or add "
                        f"--no-guard-words.")


def read_splits(s: RunSettings) -> tuple[Path, dict[str, list[dict]]]:
    """The splits directory and its records per split (stratified subsamples for a quick run)."""
    check_splits(s)
    splits = splits_dir(s.splits, s.seed)
    split_records = {name: data.read_records(splits / f"{name}.jsonl")
                     for name in ("contrast", "train", "val", "test", "heldout")
                     if (splits / f"{name}.jsonl").is_file()}
    if s.quick:
        split_records["train"] = stratified_sample(split_records["train"], s.quick_train, s.seed)
        split_records["test"] = stratified_sample(split_records["test"], s.quick_test, s.seed + 1)
        if "val" in split_records:
            split_records["val"] = stratified_sample(split_records["val"], s.quick_test, s.seed + 3)
        if "heldout" in split_records:
            split_records["heldout"] = stratified_sample(split_records["heldout"], s.quick_heldout, s.seed + 2)
    return splits, split_records


def split_file(splits: Path, name: str, used: int) -> dict:
    """Provenance of one split file as the guard records it: its sha256 and how many of its records were used."""
    return {"sha256": sha256_file(Path(splits) / f"{name}.jsonl"), "used": used}


def split_data_info(name: str, splits: Path, quick: bool = False) -> dict:
    """What a store extracted from a split records about its data (``data`` in its manifest)."""
    return {"split": name, "splits_dir": str(splits), "quick": quick}


def parse_split_ref(ref: str) -> tuple[str, str | None] | None:
    """``split:NAME`` -> (NAME, None), ``split:NAME:harmful|benign`` -> (NAME, part); None if not a split ref.
    ``split:contrast`` alone is its harmful part (what `run` contrasts): (``contrast``, ``harmful``)."""
    if not ref.startswith("split:"):
        return None
    name, _, part = ref[len("split:"):].partition(":")
    if name not in data.SPLIT_NAMES:
        raise UserError(f"{ref!r}: unknown split {name!r}; use split:{'|split:'.join(data.SPLIT_NAMES)}.")
    if part and part not in SPLIT_PARTS:
        raise UserError(f"{ref!r}: unknown part {part!r}; use split:{name}, split:{name}:harmful or "
                        f"split:{name}:benign.")
    return name, part or ("harmful" if name == "contrast" else None)


def split_part(records: Sequence[dict], part: str | None) -> list[dict]:
    """The records of one part (``harmful``/``benign``) of a split; all of them for None."""
    return list(records) if part is None else [r for r in records if int(r["label"]) == SPLIT_PARTS[part]]


# ------------------------------------------------------------------------------------------------ pair
def pair_refs(base: str | None, aligned: str | None, progress: bool = True) -> tuple[str, str]:
    """(base, aligned) model references; without ``aligned`` the default twin (built on first use)."""
    check_pair_refs(base, aligned)
    base_ref = base or DEFAULT_BASE
    if aligned:
        return base_ref, aligned
    return base_ref, str(ensure_default_twin(progress=progress))


def check_pair_refs(base: str | None, aligned: str | None) -> None:
    """Refuse a custom base without its aligned model (the default twin is the default base's only)."""
    if not aligned and base and base != DEFAULT_BASE:
        raise UserError("With a custom --base, give --aligned too (or build a twin for it with "
                        "`safetyneurons twin --base REF --out DIR` and pass --aligned DIR).")


def load_pair(s: RunSettings, base_ref: str, aligned_ref: str) -> tuple[LoadedModel, LoadedModel]:
    """The base/aligned pair, checked to be symmetric (configs before any weights) and to fit the layer budgets."""
    check_configs(base_ref, aligned_ref)  # shapes first, before any weights are read
    base = load_model(base_ref)
    aligned = load_model(aligned_ref)
    check_symmetry(base, aligned)
    check_max_layer(s.max_layer, base.info["num_layers"])
    check_guard_max_layer(s.guard_max_layer, base.info["num_layers"])
    return base, aligned


# ------------------------------------------------------------------------------------- safety neurons
def change_scores(s: RunSettings, base: LoadedModel, aligned: LoadedModel, records: Sequence[dict], out: Path,
                  progress: bool = True, splits: Path | None = None) -> tuple[ChangeScores, ChangeScores | None]:
    """Change scores on the contrast split's harmful prompts, and on its benign ones when there are any (for
    the harmful-minus-benign selection variant); saved into ``out`` and ``out/benign``."""
    options = dict(hook_point=s.hook_point, positions=s.positions, completion_from=s.completion_from,
                   max_new_tokens=s.max_new_tokens, batch_size=s.batch_size, max_length=s.max_length,
                   progress=progress)
    prompts = [r["prompt"] for r in split_part(records, "harmful")]
    if not prompts:
        raise UserError(f"The contrast split in {splits} has no harmful prompts.")
    scores = contrast(base, aligned, prompts, **options)
    scores.save(out)
    benign_prompts = [r["prompt"] for r in split_part(records, "benign")]
    benign_scores = None
    if benign_prompts:
        benign_scores = contrast(base, aligned, benign_prompts, **options)
        benign_scores.save(out / "benign")
    return scores, benign_scores


@dataclass
class Selection:
    """The safety neurons of the chosen selection variant, every variant's set, and their comparison."""

    neuron_set: NeuronSet
    sets: dict[str, NeuronSet]
    record: dict  # compare_variants + {"skipped": {variant: why}}


def safety_neurons(scores: ChangeScores, benign_scores: ChangeScores | None, selection: str = "rms",
                   top_percent: float = 5.0, max_layer: int | None = None) -> Selection:
    """The safety neurons under ``selection`` (:mod:`safetyneurons.probes.variants`), with every variant's set."""
    sets, skipped = selection_variants(scores, benign_scores, top_percent, max_layer)
    if selection not in sets:
        raise UserError(f"--selection {selection}: {skipped[selection]}")
    return Selection(sets[selection], sets, {**compare_variants(sets), "skipped": skipped})


def write_safety_neurons(out: Path, scores: ChangeScores, chosen: Selection) -> None:
    """``variants.md``, ``neuron_set.json`` and the neuron report (heatmap, layer counts, stats) into ``out``."""
    atomic_write_text(out / "variants.md", variants_markdown(chosen.record))
    chosen.neuron_set.save(out / "neuron_set.json")
    write_neuron_report(scores, chosen.neuron_set, out)


# --------------------------------------------------------------------------------------------- stores
def extract_split(lm: LoadedModel, records: Sequence[dict], out: Path, *, augment_seed: int | None = None,
                  sentence_min_words: int = SENTENCE_MIN_WORDS, **options) -> Store:
    """An activation store of ``records`` (:func:`safetyneurons.activations.store.extract` with ``options``); with
    ``augment_seed`` the records first get their benign windows, sentence pieces (of at least
    ``sentence_min_words`` words, as the guard reads them) and compositions (the training split's augmentation,
    :func:`safetyneurons.data.compose.augment_training`)."""
    if augment_seed is not None:
        records = augment_training(records, lm.tokenizer, augment_seed, sentence_min_words=sentence_min_words)
    return extract(lm, records, out, **options)


def store_split_records(store: Store) -> tuple[list[dict], dict | None]:
    """The records a store was extracted from, with every field (hazard labels too) when it came from a split
    file (its manifest's ``data`` names the split), else the store's own records; and that split file's
    provenance as the guard records it (None when the store did not come from a split)."""
    info = store.manifest.get("data") or {}
    split, where = info.get("split"), info.get("splits_dir")
    if not split or not where or info.get("quick") or not (Path(where) / f"{split}.jsonl").is_file():
        return store.records, None
    records = data.read_records(Path(where) / f"{split}.jsonl")
    return records, split_file(Path(where), split, len(records))
