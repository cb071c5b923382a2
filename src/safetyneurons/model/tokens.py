"""Prompts tokenised once, as a model reads them, and cut into padded batches (contrast and patching read these)."""

from __future__ import annotations


from dataclasses import dataclass
from typing import Sequence

import torch

from safetyneurons.model.pair import LoadedModel


# ----------------------------------------------------------------------------------- prompt tokens
@dataclass
class PromptTokens:
    """Prompts tokenised once, as a model reads them: ``ids[i]`` the token ids of prompt ``i`` (formatted, cut to
    the token limit, no padding) and, when asked for, ``content[i]`` (bool, same length) its content tokens, the
    user's message (see :mod:`safetyneurons.model.positions`). Batches are cut from these ids, so a prompt is
    never tokenised twice."""

    ids: list[list[int]]
    content: list[torch.Tensor] | None
    pad_id: int

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.ids]

    def batch(self, index: Sequence[int], padding_side: str) -> dict[str, torch.Tensor]:
        """The prompts ``index`` as one padded batch: ``input_ids``, ``attention_mask`` and, with content,
        ``content_mask`` (padding never counts as content)."""
        ids, mask = pad_sequences([self.ids[i] for i in index], self.pad_id, padding_side)
        out = {"input_ids": ids, "attention_mask": mask}
        if self.content is not None:
            content = torch.zeros(mask.shape, dtype=torch.bool)
            content[mask.bool()] = torch.cat([self.content[i] for i in index])  # row by row, in token order
            out["content_mask"] = content
        return out


def tokenize_prompts(lm: LoadedModel, prompts: Sequence[str], max_length: int | None,
                     content: bool = False) -> PromptTokens:
    """Tokenise every prompt once the way ``lm`` reads it (:meth:`LoadedModel.encode`: chat template, a prompt
    longer than ``max_length`` cut to its first part that fits); ``content`` also keeps the content tokens."""
    ids: list[list[int]] = []
    masks: list[torch.Tensor] = []
    for start in range(0, len(prompts), 512):
        enc = lm.encode(list(prompts[start:start + 512]), max_length=max_length, content_mask=content)
        for r, real in enumerate(enc["attention_mask"].bool()):
            ids.append(enc["input_ids"][r][real].tolist())
            if content:
                masks.append(enc["content_mask"][r][real])
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    return PromptTokens(ids, masks if content else None, pad_id)


def length_order(lengths: Sequence[int]) -> list[int]:
    """Indices by length, longest first (stable), so that batches hold prompts of similar length (less padding)."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id sequences as one batch padded with ``pad_id`` on ``side`` (``left`` or ``right``): (input ids,
    attention mask), both int64 ``[len(seqs), longest]``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[r, sl] = torch.tensor(list(s), dtype=torch.long)
        mask[r, sl] = 1
    return ids, mask
