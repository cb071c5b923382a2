"""Build a safety-aligned twin of a base model by a LoRA refusal fine-tune.

Activation contrasting (Chen et al. 2025) needs a base model and an aligned model of the same
architecture. The published pairs cannot be downloaded offline and the default base
(SmolLM2-135M-Instruct) refuses almost nothing, so we build its aligned twin the way the paper built
its pairs: by fine-tuning the base on safety data.

Recipe (one function each, composed by :func:`build_twin`):

1. training examples from the ``twin`` split only: harmful prompts get a refusal chosen
   deterministically per prompt from :data:`REFUSALS`; benign prompts get the base model's own greedy
   reply (self-distillation, so helpfulness is kept), used only when the judge calls it an answer;
2. chat template applied, reply + end-of-turn token appended, loss on the reply tokens only;
3. LoRA (``peft``) on every linear projection of each decoder layer's attention and MLP blocks
   (q/k/v/o and gate/up/down for Llama, Mistral, Qwen2, Qwen3, Gemma3), seeded AdamW on
   class-balanced batches;
4. the adapter is merged into the weights and saved as a normal Hugging Face model directory, with the
   adapter alone and ``twin.json`` (provenance, loss curve, evaluation) beside it;
5. evaluation on held-out prompts with the phrase-matching judge (:mod:`safetyneurons.model.judge`):
   refusal rate on harmful prompts and answer rate on benign prompts, for base and twin.

Twins are cached under ``<cache>/twins/<name>``; the name derives from the base model's fingerprint,
the training data hash and the settings, so the same inputs reuse the twin instantly.

Modules: :mod:`~safetyneurons.model.twin_settings` (recipe constants, :class:`TwinSettings`),
:mod:`~safetyneurons.twin.data` (training examples), :mod:`~safetyneurons.twin.train` (LoRA),
:mod:`~safetyneurons.twin.evaluate` (refusal evaluation), :mod:`~safetyneurons.model.twin_cache` (names, keys,
``twin:`` refs; a leaf module that :mod:`safetyneurons.model.pair` imports) and :mod:`~safetyneurons.twin.build`.

Importing this package loads only the leaf modules (settings, cache); the names of the others are
loaded on first use (PEP 562), because :mod:`~safetyneurons.twin.build` imports :mod:`safetyneurons.model.pair`,
which imports :mod:`~safetyneurons.model.twin_cache`.
"""

from __future__ import annotations

import importlib
from typing import Any

from safetyneurons.model.twin_cache import (check_twin_out, default_twin_data, load_info, resolve_twin_ref, twin_key, twin_name,
                    twins_dir)
from safetyneurons.model.twin_settings import DEFAULT_EVAL_PER_CLASS, DEFAULT_REFS, FORMAT, RECIPE_VERSION, REFUSALS, TwinSettings

_LAZY = {
    "build_twin": "build", "ensure_default_twin": "build",
    "build_examples": "data", "data_sha256": "data", "default_eval_records": "data", "generate_replies": "data",
    "read_labelled": "data", "split_twin_records": "data", "default_twin_records": "data", "refusal_for": "data", "sample_eval": "data", "check_twin_records": "data",
    "collate": "data", "encode_example": "data", "prompt_length": "data",
    "train_lora": "train", "lora_targets": "train", "balanced_batches": "train", "reply_loss": "train",
    "evaluate_refusals": "evaluate", "format_table": "evaluate", "summarise": "evaluate",
}

__all__ = ["DEFAULT_EVAL_PER_CLASS", "DEFAULT_REFS", "FORMAT", "RECIPE_VERSION", "REFUSALS", "TwinSettings", "check_twin_out",
           "default_twin_data", "load_info", "resolve_twin_ref", "twin_key", "twin_name", "twins_dir", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
