"""The library's named choices, in one import-light module (no torch), so the CLI takes its options from here
without slowing ``--help``. Each owning module imports its own (``hooks.HOOK_POINTS``, ...)."""

from __future__ import annotations

#: Hook points (see :mod:`safetyneurons.model.hooks`).
HOOK_POINTS: dict[str, str] = {
    "mlp_out": "output of each layer's MLP block (width = hidden size)",
    "mlp_neurons": "MLP intermediate activations, the input of down_proj (width = MLP width)",
    "resid": "each decoder layer's output hidden state (width = hidden size)",
}
#: Token positions of the change score (see :mod:`safetyneurons.neurons.contrast`).
POSITIONS: dict[str, str] = {
    "content": "the tokens of the user's message only, never system-prompt or chat-template tokens",
    "prompt": "every prompt token (chat template included); padding never counts",
    "prompt_last": "the last prompt token of each prompt, where the answer starts",
    "completion": "the tokens one model of the pair (completion_from, default base) generates greedily, up to "
                  "and including the first EOS; both models read the same prompt + answer ids, prompt and "
                  "padding tokens do not count",
}
COMPLETION_FROM = ("base", "aligned")
PADDING_SIDES = ("right", "left")
#: Pooling of a prompt's activations into one feature vector (see :mod:`safetyneurons.activations.features`).
POOLINGS = ("mean", "last")
#: Storage dtypes of activation stores.
STORE_DTYPES = ("float16", "float32")
#: Dtypes and devices a model can be loaded with (see :func:`safetyneurons.model.pair.load_model`).
MODEL_DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda", "auto")
#: Probe classifiers (see :mod:`safetyneurons.probes.probe`).
CLASSIFIERS = ("svm", "logreg")
#: The guard's classifier per preset (see :mod:`safetyneurons.run_settings`): the RBF SVM, which the validation rule of
#: docs/guard_quality.md picks; the paper preset keeps the paper's logistic regression.
GUARD_CLASSIFIER: dict[str, str] = {"default": "svm", "paper": "logreg"}
#: The guard's default piece margin (see :mod:`safetyneurons.guard.words`): what a window or a sentence must beat a
#: whole message by, in the logit, to decide alone. None by default: a margin lets benign text around a request lower
#: the request's score, so padding hides a request near the threshold (docs/guard_quality.md, "Soundness first").
GUARD_PIECE_MARGIN = 0.0
#: A guard's sentence pieces hold at least this many words (see :func:`safetyneurons.data.compose.sentences`; a
#: shorter sentence is widened with its neighbours' words). 1: every sentence is read alone, so text around a request
#: written as its own sentence never changes how that sentence is read (docs/guard_quality.md, "Soundness first").
SENTENCE_MIN_WORDS = 1
#: The `run` flag that gives each guard setting whose default changed a recorded value (the pipeline's resume hint,
#: the reproduce command of generated results).
GUARD_RUN_FLAGS = {"guard_words": lambda v: "--guard-words" if v else "--no-guard-words",
                   "guard_classifier": lambda v: f"--guard-classifier {v}",
                   "guard_max_layer": lambda v: f"--guard-max-layer {'none' if v is None else v}",
                   "guard_piece_margin": lambda v: f"--guard-piece-margin {float(v)!r}",
                   "guard_sentence_min_words": lambda v: f"--guard-sentence-min-words {int(v)}"}
#: Feature sets probes are compared on (see :mod:`safetyneurons.probes.compare`): the safety neurons, all neurons and
#: their PCA, the neuron controls (layer-matched random, global random, magnitude-matched) and the baselines
#: without activations (text, length).
FEATURE_SETS = ("safety", "pca", "all", "random", "random_global", "magnitude", "text", "length")
#: Feature sets a guard can ship (activation probes of one fixed column set).
GUARD_FEATURE_SETS = ("safety", "pca", "all")
#: Which model's activations the probes of a run read.
FEATURES_FROM = ("base", "aligned")
#: How a guarded chat treats a flagged prompt (see :mod:`safetyneurons.guard.chat`).
GUARD_MODES = ("block", "monitor", "off")
#: File formats labelled prompts are read from, by file extension (see :mod:`safetyneurons.data.readers`).
FILE_FORMATS: dict[str, str] = {
    ".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl",
    ".parquet": "parquet", ".pq": "parquet", ".txt": "text", ".text": "text",
}
