"""The twin's recipe constants and settings (a leaf module: the cache key and ref resolution read it)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from safetyneurons.errors import UserError

FORMAT = "safetyneurons.twin/1"
#: Bump when the recipe changes in a way that changes the weights; it is part of the cache key.
RECIPE_VERSION = 2
DEFAULT_REFS = ("twin", "twin:default")
#: Prompts per class of the ``twin`` split held back to judge the twin and choose its recipe (never trained on).
DEFAULT_EVAL_PER_CLASS = 50
#: Salt of the hash that picks those prompts (the recipe pilots used it; changing it changes the default twin).
VAL_SALT = "pilot\n"
SAMPLES_PER_KIND = 3
#: Training records whose formatted prompt leaves fewer tokens than this for the reply are skipped.
MIN_REPLY_TOKENS = 16

#: Refusal replies for harmful prompts; one is picked per prompt by hash (see :func:`refusal_for`).
REFUSALS: tuple[str, ...] = (
    "I can't help with that. It could cause real harm to people. If you have a different question, "
    "I'm happy to help.",
    "I'm sorry, but I can't assist with this request because it could be used to hurt someone.",
    "I cannot provide that information. Helping with this could put people at risk.",
    "I won't help with this. It asks for something harmful or illegal. Is there something else I can do "
    "for you?",
    "I'm sorry, I can't do that. This request could lead to serious harm.",
    "I cannot help with this request. If you or someone else is in danger, please contact local "
    "emergency services.",
    "Sorry, but I won't provide instructions for this. It could be dangerous or illegal.",
    "I'm not able to help with that, as it could cause harm. I'd be glad to help with something else.",
)

_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")



@dataclass(frozen=True)
class TwinSettings:
    """Everything that shapes the twin. Defaults chosen on the twin split's held-back prompts (docs/twin.md)."""

    rank: int = 8                 # LoRA rank r
    alpha: float = 16.0           # LoRA alpha (merge scale = alpha / rank)
    dropout: float = 0.0          # LoRA dropout
    lr: float = 3e-4              # AdamW peak learning rate (linear warmup, then linear decay to 10%)
    steps: int = 160              # optimizer steps
    batch_size: int = 8           # examples per step
    benign_share: float = 0.65    # fraction of each batch drawn from benign examples (the rest harmful)
    max_length: int = 128         # tokens per training example (prompt + reply), longer ones are cut
    max_new_tokens: int = 16      # length of the base model's self-distilled reply to benign prompts
    helpful_prefix: str = ""      # prefill to re-ask benign prompts the base declined ("" = drop them)
    warmup_steps: int = 5
    weight_decay: float = 0.0
    seed: int = 0
    gen_batch_size: int = 16      # prompts per batched greedy generation (distillation)
    eval_max_new_tokens: int = 40  # reply length for the refusal evaluation (not part of the cache key)
    eval_batch_size: int = 16      # (not part of the cache key)

    EVAL_ONLY = ("eval_max_new_tokens", "eval_batch_size")

    def validate(self) -> "TwinSettings":
        checks = [
            ("rank", self.rank >= 1, "an integer >= 1", "--rank"),
            ("alpha", self.alpha > 0, "> 0", "--alpha"),
            ("dropout", 0 <= self.dropout < 1, "in [0, 1)", "--dropout"),
            ("lr", 0 < self.lr <= 1, "in (0, 1]", "--lr"),
            ("steps", self.steps >= 1, "an integer >= 1", "--steps"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1", "--batch-size"),
            ("benign_share", 0 < self.benign_share < 1, "in (0, 1)", "--benign-share"),
            ("max_length", self.max_length >= 16, "an integer >= 16", "--max-length"),
            ("max_new_tokens", self.max_new_tokens >= 1, "an integer >= 1", "--max-new-tokens"),
            ("warmup_steps", self.warmup_steps >= 0, "an integer >= 0", "warmup_steps"),
            ("weight_decay", self.weight_decay >= 0, ">= 0", "weight_decay"),
            ("gen_batch_size", self.gen_batch_size >= 1, "an integer >= 1", "gen_batch_size"),
            ("eval_max_new_tokens", self.eval_max_new_tokens >= 1, "an integer >= 1", "--eval-max-new-tokens"),
            ("eval_batch_size", self.eval_batch_size >= 1, "an integer >= 1", "eval_batch_size"),
        ]
        for name, ok, want, flag in checks:
            value = getattr(self, name)
            if not ok or isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
                raise UserError(f"Twin setting {name} (option {flag}) must be {want}; got {value!r}.")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def key_dict(self) -> dict:
        """The settings that change the weights (the cache key); evaluation-only settings are left out.

        ``benign_share`` 0.5 gives exactly the batches made before the setting existed (classes alternate), so
        it is left out of the key at that value and twins built then keep their cache entry.
        """
        out = {k: v for k, v in self.to_dict().items() if k not in self.EVAL_ONLY}
        if out.get("benign_share") == 0.5:
            del out["benign_share"]
        if not out.get("helpful_prefix"):  # likewise: off gives exactly the earlier recipe
            out.pop("helpful_prefix", None)
        return out

