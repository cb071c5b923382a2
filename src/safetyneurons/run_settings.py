"""The settings of a pipeline run (`safetyneurons run`): the presets, their checks, and which settings name a run."""

from __future__ import annotations


import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence


from safetyneurons.activations.features import check_pooling
from safetyneurons.checks import check_batch_size, check_piece_margin, check_positive_int
from safetyneurons.constants import FEATURES_FROM, GUARD_CLASSIFIER, GUARD_PIECE_MARGIN, SENTENCE_MIN_WORDS
from safetyneurons.errors import UserError
from safetyneurons.model.hooks import check_hook_point
from safetyneurons.neurons.contrast import check_positions
from safetyneurons.neurons.selection import check_max_layer, check_selection
from safetyneurons.probes.budget import AUTO, check_guard_max_layer
from safetyneurons.probes.variants import check_variant


# the reference student project's hook point and mean pooling, over the user's message only (docs/contrast.md)
REFERENCE = {"hook_point": "mlp_out", "positions": "content", "pooling": "mean", "completion_from": "base"}
# Chen et al. 2025 (arXiv 2406.14144): FFN neurons, change scores on completion tokens (token_type='completion')
# written by the not-yet-aligned (base) model and read by both, last-token features for the probes
# and their probe, logistic regression, as the guard's classifier
PAPER = {"hook_point": "mlp_neurons", "positions": "completion", "pooling": "last", "completion_from": "base",
         "guard_classifier": GUARD_CLASSIFIER["paper"]}
PRESETS: dict[str, dict] = {"default": REFERENCE, "paper": PAPER}  # name -> settings; each gets runs/<name>
RUNS_DIR = "runs"
SETTINGS_FILE = "settings.json"  # written first into a run directory: which settings own it
# settings that do not change what a run computes, so they never make two runs clash
_NOT_IDENTITY = ("out", "preset", "patch")  # --patch adds a step to the same run
# optional settings added later: left out of the identity while unset, so earlier runs keep theirs
# (name -> the value earlier runs had, which leaves it out; guard_words now defaults to True, so it is set)
_IDENTITY_IF_SET = {"max_layer": None, "guard_max_layer": AUTO, "guard_words": False, "guard_piece_margin": 0.0,
                    "guard_sentence_min_words": 8}


def setting_of(identity: dict, name: str) -> Any:
    """One setting's value in an identity; a setting left out of it has its leave-out value."""
    return identity.get(name, _IDENTITY_IF_SET.get(name))


def identity_of(settings: dict) -> dict:
    return {k: v for k, v in settings.items()
            if k not in _NOT_IDENTITY and not (k in _IDENTITY_IF_SET and v == _IDENTITY_IF_SET[k])}


@dataclass
class RunSettings:
    out: str | None = None  # None -> derived from the settings: runs/<preset>[-quick][-<hash of changes>]
    preset: str = "default"  # a name from PRESETS; fills hook point, positions and pooling in `for_preset`
    base: str | None = None  # None -> pair.DEFAULT_BASE
    aligned: str | None = None  # None -> the default twin, built on first run
    hook_point: str = REFERENCE["hook_point"]
    positions: str = REFERENCE["positions"]
    pooling: str = REFERENCE["pooling"]
    completion_from: str = REFERENCE["completion_from"]  # base | aligned: who answers for positions=completion
    selection: str = "rms"  # selection variant of the safety neurons (safetyneurons.probes.variants)
    max_new_tokens: int = 32  # longest answer for positions=completion
    top_percent: float = 5.0
    max_layer: int | None = None  # layer budget for the safety neurons (early exit); None: no budget
    features_from: str = "base"  # which model's activations the probes read: base | aligned
    classifiers: Sequence[str] = ("svm", "logreg")
    feature_sets: Sequence[str] = ("safety", "pca", "all", "random", "random_global", "magnitude", "text", "length")
    random_draws: int = 20  # per random control (layer-matched and global)
    # the RBF SVM: the pre-registered validation rule of docs/guard_quality.md picks it for the guard with words
    guard_classifier: str = GUARD_CLASSIFIER["default"]
    # the guard's layer budget (safetyneurons.probes.budget): None = no budget, the guard stops after its deepest
    # safety neuron (docs/guard_quality.md says why); auto = chosen on the validation split; L = layers 0..L
    guard_max_layer: str | int | None = None
    # the guard also reads each piece's text: a TF-IDF logit summed with the probe's (safetyneurons.guard.words);
    # on by default: the pre-registered validation rule of docs/guard_quality.md picks it
    guard_words: bool = True
    # what a window or sentence must beat a whole message by (in the logit) to decide alone (safetyneurons.guard.words)
    guard_piece_margin: float = GUARD_PIECE_MARGIN
    # the guard's sentence pieces hold at least this many words (1: each sentence alone; safetyneurons.data.compose);
    # the training split's sentence pieces are cut the same way
    guard_sentence_min_words: int = SENTENCE_MIN_WORDS
    quick: bool = False
    quick_train: int = 300  # --quick: prompts per split (stratified subsample)
    quick_test: int = 150
    quick_heldout: int = 150
    batch_size: int = 16
    max_length: int = 256
    store_dtype: str = "float16"
    seed: int = 0
    n_boot: int = 1000
    splits: str | None = None  # a splits dir from `safetyneurons data build`; None -> the default mix
    target_fpr: float = 0.05  # every probe's threshold: this false-positive rate on the val split's benign prompts
    augment: bool = True  # training split + its benign windows and compositions (safetyneurons.data.compose)
    category_min_examples: int = 20  # a hazard needs this many labelled harmful training prompts for a head
    patch: bool = False  # causal validation by dynamic activation patching (safetyneurons.causal.causal)

    @classmethod
    def for_preset(cls, preset: str = "default", **changes: Any) -> "RunSettings":
        """Settings of a named preset (``default``: the reference project's, ``paper``: Chen et al.'s), with
        ``changes`` on top; a change given as None keeps the preset's value."""
        if preset not in PRESETS:
            raise UserError(f"Unknown preset {preset!r}. Choose one of: {', '.join(PRESETS)}.")
        values = dict(PRESETS[preset], preset=preset)
        values.update({k: v for k, v in changes.items() if v is not None})
        return cls(**values)

    def identity(self) -> dict:
        """The settings that decide what a run computes (everything but where it is written)."""
        d = json.loads(json.dumps(asdict(self), default=list))
        return identity_of(d)

    def default_out(self) -> Path:
        """``runs/<preset>``; ``-quick`` for a quick run; ``-<8 hex>`` when other settings differ from the preset."""
        preset = RunSettings.for_preset(self.preset, quick=self.quick).identity()
        mine = self.identity()
        changed = {k: setting_of(mine, k) for k in sorted(set(preset) | set(mine))
                   if setting_of(preset, k) != setting_of(mine, k)}
        name = self.preset + ("-quick" if self.quick else "")
        if changed:
            name += "-" + hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8]
        return Path(RUNS_DIR) / name

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else self.default_out()

    def validate(self) -> "RunSettings":
        check_hook_point(self.hook_point)
        check_positions(self.positions)
        check_pooling(self.pooling)
        check_selection(self.top_percent, None)
        check_max_layer(self.max_layer)
        self.guard_max_layer = check_guard_max_layer(self.guard_max_layer)
        check_variant(self.selection)
        self.batch_size = check_batch_size(self.batch_size)
        self.max_length = check_positive_int(self.max_length, "max length (tokens)")
        self.max_new_tokens = check_positive_int(self.max_new_tokens, "max new tokens")
        if self.completion_from not in ("base", "aligned"):
            raise UserError(f"--completion-from must be base or aligned, got {self.completion_from!r}.")
        if self.features_from not in FEATURES_FROM:
            raise UserError(f"--features-from must be base or aligned, got {self.features_from!r}.")
        if self.guard_classifier not in self.classifiers:
            raise UserError(f"--guard-classifier {self.guard_classifier} must be one of the trained classifiers "
                            f"({', '.join(self.classifiers)}).")
        if "safety" not in self.feature_sets:
            raise UserError("The run needs the `safety` feature set (the guard is built from it).")
        if not isinstance(self.guard_words, bool):
            raise UserError(f"guard_words must be True or False, got {self.guard_words!r}.")
        self.guard_piece_margin = check_piece_margin(self.guard_piece_margin)
        self.guard_sentence_min_words = check_positive_int(self.guard_sentence_min_words, "--guard-sentence-min-words")
        if int(self.n_boot) < 0:
            raise UserError(f"--bootstrap must be >= 0, got {self.n_boot}.")
        if not 0.0 <= float(self.target_fpr) < 1.0:
            raise UserError(f"--target-fpr must be in [0, 1), got {self.target_fpr}.")
        if self.preset not in PRESETS:
            raise UserError(f"Unknown preset {self.preset!r}. Choose one of: {', '.join(PRESETS)}.")
        return self
