"""Greedy generation: one batched generator with one stop-token rule.

Used by contrasting (``completion`` token positions: one model's answers, the base model's by default), by the twin
(self-distilled benign replies, refusal evaluation), and open to activation patching and guarded
generation: prompts are chat-formatted, left-padded (so every row's next token sits in the last column)
and decoded with Hugging Face ``generate`` (greedy, KV cache on).

Stop-token rule (:func:`stop_token_ids`): a reply ends at the first of the chat template's end-of-turn
token, the generation config's EOS id(s) and the tokenizer's EOS. The stop token is kept in
:attr:`Generation.new_ids` and left out of the decoded text.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
from transformers import GenerationConfig

from safetyneurons._io import progress_bar
from safetyneurons.checks import check_batch_size, check_max_length, check_positive_int
from safetyneurons.errors import UserError

if TYPE_CHECKING:
    from safetyneurons.model.pair import LoadedModel

_SENTINEL = "QZXSENTINELQZX"


def _template_end_of_turn(lm) -> int | None:
    """The special token that follows an assistant turn in `lm`'s chat template, if any."""
    if not lm.chat_template:
        return None
    tok = lm.tokenizer
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": _SENTINEL}], tokenize=False)
    except Exception:  # templates that refuse an assistant turn: no end-of-turn token from the template
        return None
    if _SENTINEL not in text:
        return None
    after = text.split(_SENTINEL, 1)[1]
    special = set(tok.all_special_ids)
    special |= {i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    return next((int(i) for i in tok(after, add_special_tokens=False)["input_ids"] if i in special), None)


def end_of_turn_id(lm: LoadedModel) -> int:
    """The token that closes an assistant turn in `lm`'s chat template (else the EOS token)."""
    eot = _template_end_of_turn(lm)
    if eot is not None:
        return eot
    if lm.tokenizer.eos_token_id is None:
        raise UserError(f"{lm.ref}: the tokenizer has no EOS token and no end-of-turn token in its chat "
                        f"template, so replies cannot be terminated. Use a model with a chat template.")
    return int(lm.tokenizer.eos_token_id)


def stop_token_ids(lm: LoadedModel) -> list[int]:
    """The ids that end a reply (sorted): end-of-turn token, generation-config EOS id(s), tokenizer EOS."""
    ids: set[int] = set()
    gen_eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    for value in (_template_end_of_turn(lm), gen_eos, lm.tokenizer.eos_token_id):
        if value is not None:
            ids.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return sorted(ids)


@dataclass
class Generation:
    """One greedy reply: the prompt's token ids (no padding), the new ids up to and including the first stop
    token, and whether a stop token closed the reply before ``max_new_tokens``."""

    prompt_ids: list[int]
    new_ids: list[int]
    stopped: bool

    @property
    def reply_ids(self) -> list[int]:
        """The new ids without the stop token."""
        return self.new_ids[:-1] if self.stopped else self.new_ids

    def text(self, lm: LoadedModel, prefix: str = "") -> str:
        """The decoded reply (special tokens skipped), after ``prefix`` when the reply was prefilled."""
        return (prefix + lm.tokenizer.decode(self.reply_ids, skip_special_tokens=True)).strip()


def _greedy_config(lm: LoadedModel, max_new_tokens: int) -> tuple[GenerationConfig, set[int]]:
    """Greedy decoding settings of ``lm`` (stop tokens as in :func:`stop_token_ids`) and its stop-token set."""
    max_new_tokens = check_positive_int(max_new_tokens, "max new tokens")
    stops = stop_token_ids(lm)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                              eos_token_id=stops or None, pad_token_id=pad)
    return config, set(stops)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode inside the block, in its earlier mode after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _replies(lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, config: GenerationConfig,
             stop_set: set[int]) -> list[Generation]:
    """One left-padded batch of prompt ids decoded greedily: a :class:`Generation` per row."""
    with torch.no_grad():
        gen = lm.model.generate(input_ids=input_ids.to(lm.device), attention_mask=attention_mask.to(lm.device),
                                generation_config=config)
    new = gen[:, input_ids.shape[1]:].cpu().tolist()
    out = []
    for ids, mask, answer in zip(input_ids, attention_mask, new):
        cut = next((k for k, t in enumerate(answer) if t in stop_set), None)
        out.append(Generation(ids[mask.bool()].tolist(), answer if cut is None else answer[:cut + 1], cut is not None))
    return out


def greedy_generate(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int, *, batch_size: int | None = None,
                    max_length: int | None = None, prefix: str = "", progress: bool = False,
                    desc: str = "generate") -> list[Generation]:
    """Greedy replies of ``lm`` to ``prompts`` (chat template applied), in the given order.

    Batches of ``batch_size`` prompts (default: all at once) are left-padded; ``max_length`` truncates the
    formatted prompt (in tokens); ``prefix`` prefills every reply (the model continues it; it is part of
    the prompt ids, not of the new ids).
    """
    config, stop_set = _greedy_config(lm, max_new_tokens)
    prompts = list(prompts)
    batch_size = max(1, len(prompts)) if batch_size is None else check_batch_size(batch_size)
    max_length = check_max_length(max_length)
    out: list[Generation] = []
    with _eval_mode(lm.model), progress_bar(len(prompts), desc, "prompt", progress) as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            enc = lm.encode(chunk, max_length=max_length, padding_side="left", suffix=prefix)
            out += _replies(lm, enc["input_ids"], enc["attention_mask"], config, stop_set)
            bar.update(len(chunk))
    return out


def generate_padded(lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    max_new_tokens: int) -> list[Generation]:
    """Greedy replies of ``lm`` to one batch of prompts already tokenised as it reads them (chat template
    applied) and left-padded, so that no prompt is tokenised again; otherwise as :func:`greedy_generate`."""
    config, stop_set = _greedy_config(lm, max_new_tokens)
    with _eval_mode(lm.model):
        return _replies(lm, input_ids, attention_mask, config, stop_set)
