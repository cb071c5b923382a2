"""Inference-time activation contrasting: a change score for every neuron of a base/aligned pair.

Chen et al. 2025 ("Finding Safety Neurons in Large Language Models", arXiv 2406.14144): run the same
prompts through the base model and its safety-aligned twin, and score each neuron (layer l, index i) at a
hook point by

    change score = sqrt( mean over the selected tokens of (a_base - a_aligned)^2 )

The neurons with the largest change scores are the safety neurons (see ``neurons.select``).

Token positions (which tokens count):

- ``content``      the tokens of the user's message only (default): never the system prompt, role markers or
                   generation prompt that the chat template adds (see :mod:`safetyneurons.model.positions`);
- ``prompt``       every token of the chat-formatted prompt, template included (opt-in, for comparison with
                   the reference project, which counted them);
- ``prompt_last``  only the last prompt token, where the answer starts;
- ``completion``   one model of the pair answers greedily (``max_new_tokens``), the **base** model by default
                   as in the paper (``completion_from``); both models then read the same prompt + answer
                   token ids and only the answer tokens count, up to and including the first EOS (anything
                   after it is padding).

Padding never counts. Scores are accumulated batch by batch as float64 sums of squared differences plus a
token count, so memory stays O(layers x width) whatever the number of prompts, and the result does not
depend on batch size, prompt order or padding side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from safetyneurons import distributed
from safetyneurons._io import atomic_write_json, progress_bar, read_json, save_tensors_atomic, sha256_bytes, sha256_json, versions
from safetyneurons.constants import COMPLETION_FROM, PADDING_SIDES, POSITIONS
from safetyneurons.errors import UserError
from safetyneurons.checks import check_batch_size, check_max_length, check_positive_int, check_prompts
from safetyneurons.model.generate import generate_padded, stop_token_ids
from safetyneurons.model.hooks import HOOK_POINTS, check_hook_point, forward_with_hooks, hook_width, num_layers, position_ids_from_mask
from safetyneurons.model.pair import LoadedModel, check_symmetry
from safetyneurons.model.tokens import PromptTokens, length_order, pad_sequences, tokenize_prompts

CHANGE_SCORES_FORMAT = "safetyneurons.change_scores/1"
SCORES_FILE = "scores.safetensors"
META_FILE = "contrast.json"

_EXTRAS = ("base_sum_sq", "prompt_ms_sum", "prompt_ms_sumsq")  # optional [L, W] sums, see ChangeScores


def check_positions(positions: str) -> str:
    if positions not in POSITIONS:
        raise UserError(f"Unknown token positions {positions!r}. Choose one of: {', '.join(POSITIONS)}.")
    return positions


def check_padding_side(padding_side: str) -> str:
    if padding_side not in PADDING_SIDES:
        raise UserError(f"padding side must be one of {', '.join(PADDING_SIDES)}, got {padding_side!r}.")
    return padding_side


# --------------------------------------------------------------------------------------- the result
@dataclass
class ChangeScores:
    """Change scores of every neuron at one hook point: ``scores[layer, index]``.

    ``sum_sq`` holds the float64 sums over tokens of (a_base - a_aligned)^2 and ``token_count`` the number
    of tokens summed, so two runs over disjoint prompt sets can be merged exactly (``merge``). For the
    selection variants (:mod:`safetyneurons.probes.variants`) a run also keeps ``base_sum_sq`` (sums of a_base^2 over
    the same tokens) and, with ``m_p`` a prompt's mean of (a_base - a_aligned)^2 over its tokens,
    ``prompt_ms_sum`` = sum of m_p and ``prompt_ms_sumsq`` = sum of m_p^2 over the ``prompt_n`` prompts with
    tokens. They are None for scores saved before they existed.
    """

    hook_point: str
    positions: str
    sum_sq: np.ndarray  # float64 [num_layers, width]
    token_count: int
    meta: dict = field(default_factory=dict)
    base_sum_sq: np.ndarray | None = None  # float64 [num_layers, width]
    prompt_ms_sum: np.ndarray | None = None
    prompt_ms_sumsq: np.ndarray | None = None
    prompt_n: int = 0

    def __post_init__(self):
        self.sum_sq = np.asarray(self.sum_sq, dtype=np.float64)
        if self.sum_sq.ndim != 2:
            raise UserError(f"Change scores must be a [num_layers, width] matrix, got shape {self.sum_sq.shape}.")
        self.token_count = int(self.token_count)
        for name in _EXTRAS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, np.asarray(value, dtype=np.float64).reshape(self.sum_sq.shape))
        self.prompt_n = int(self.prompt_n)

    @property
    def scores(self) -> np.ndarray:
        """float64 [num_layers, width]: sqrt(mean squared activation difference)."""
        if self.token_count <= 0:
            return np.zeros_like(self.sum_sq)
        return np.sqrt(self.sum_sq / self.token_count)

    @property
    def num_layers(self) -> int:
        return int(self.sum_sq.shape[0])

    @property
    def width(self) -> int:
        return int(self.sum_sq.shape[1])

    @property
    def model(self) -> dict:
        """The base model's description (what a neuron set found on these scores refers to)."""
        return dict(self.meta.get("base", {}))

    def fingerprint(self) -> str:
        """sha256 of the accumulated sums and token count (identifies these scores in provenance)."""
        data = np.ascontiguousarray(self.sum_sq).tobytes() + str(self.token_count).encode()
        return sha256_bytes(data)

    def merge(self, other: "ChangeScores") -> "ChangeScores":
        """Scores over the union of two disjoint prompt sets (same pair, hook point and positions)."""
        if (other.hook_point, other.positions, other.sum_sq.shape) != (self.hook_point, self.positions,
                                                                        self.sum_sq.shape):
            raise UserError("Cannot merge change scores of different hook points, positions or shapes.")
        meta = dict(self.meta)
        meta["prompt_count"] = self.meta.get("prompt_count", 0) + other.meta.get("prompt_count", 0)
        meta["token_count"] = self.token_count + other.token_count
        extras = {name: (None if getattr(self, name) is None or getattr(other, name) is None
                         else getattr(self, name) + getattr(other, name)) for name in _EXTRAS}
        return ChangeScores(self.hook_point, self.positions, self.sum_sq + other.sum_sq,
                            self.token_count + other.token_count, meta, prompt_n=self.prompt_n + other.prompt_n,
                            **extras)

    def save(self, out_dir: str | Path) -> Path:
        """Write ``scores.safetensors`` (scores float32, sum_sq float64, token_count) and ``contrast.json``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {
            "scores": torch.from_numpy(self.scores.astype(np.float32)),
            "sum_sq": torch.from_numpy(self.sum_sq.copy()),
            "token_count": torch.tensor([self.token_count], dtype=torch.int64),
            **{name: torch.from_numpy(getattr(self, name).copy()) for name in _EXTRAS
               if getattr(self, name) is not None},
        }
        if self.prompt_ms_sum is not None:
            tensors["prompt_n"] = torch.tensor([self.prompt_n], dtype=torch.int64)
        save_tensors_atomic(out_dir / SCORES_FILE, tensors,
                            metadata={"format": CHANGE_SCORES_FORMAT, "hook_point": self.hook_point,
                                      "positions": self.positions})
        meta = dict(self.meta)
        meta.update(format=CHANGE_SCORES_FORMAT, hook_point=self.hook_point, positions=self.positions,
                    num_layers=self.num_layers, width=self.width, token_count=self.token_count,
                    scores_sha256=self.fingerprint())
        atomic_write_json(out_dir / META_FILE, meta)
        return out_dir

    @classmethod
    def load(cls, directory: str | Path) -> "ChangeScores":
        """Read scores written by ``save`` (a ``contrast`` output directory)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise UserError(f"{directory}: no such directory. Give the --out directory of `safetyneurons contrast`.")
        tensor_path = directory / SCORES_FILE
        if not tensor_path.is_file() or not (directory / META_FILE).is_file():
            raise UserError(f"{directory} holds no change scores ({SCORES_FILE} and {META_FILE} expected). "
                            f"Give the --out directory of `safetyneurons contrast`.")
        meta = read_json(directory / META_FILE)
        if not isinstance(meta, dict) or meta.get("format") != CHANGE_SCORES_FORMAT:
            raise UserError(f"{directory / META_FILE}: not a safetyneurons contrast record "
                            f"(expected format {CHANGE_SCORES_FORMAT}).")
        try:
            tensors = load_file(str(tensor_path))
            sum_sq, count = tensors["sum_sq"], tensors["token_count"]
        except (SafetensorError, KeyError, OSError) as e:
            raise UserError(f"{tensor_path}: unreadable or incomplete change scores ({e}). "
                            f"Re-run `safetyneurons contrast`.") from None
        if meta.get("hook_point") not in HOOK_POINTS or meta.get("positions") not in POSITIONS or sum_sq.ndim != 2:
            raise UserError(f"{directory}: damaged change scores (hook point, positions or shape). "
                            f"Re-run `safetyneurons contrast`.")
        extras = {name: tensors[name].double().numpy() for name in _EXTRAS
                  if name in tensors and tuple(tensors[name].shape) == tuple(sum_sq.shape)}
        prompt_n = int(tensors["prompt_n"].reshape(-1)[0]) if "prompt_n" in tensors else 0
        return cls(hook_point=meta["hook_point"], positions=meta["positions"], sum_sq=sum_sq.double().numpy(),
                   token_count=int(count.reshape(-1)[0]), meta=meta, prompt_n=prompt_n, **extras)


# ------------------------------------------------------------------------------------ token choice
def _select_prompt(attention_mask: torch.Tensor, positions: str) -> torch.Tensor:
    """Bool [batch, seq]: the prompt tokens that count (never padding)."""
    real = attention_mask.bool()
    if positions == "prompt":
        return real
    # prompt_last: the last real token of each row, whatever the padding side
    seq = attention_mask.shape[1]
    last = (real.long() * torch.arange(1, seq + 1)).argmax(dim=1)
    select = torch.zeros_like(real)
    select[torch.arange(len(last)), last] = True
    return select & real  # a row without tokens selects nothing


def _completion(generator: LoadedModel, prompt_ids: Sequence[Sequence[int]], pad_id: int, max_new_tokens: int,
                padding_side: str) -> dict:
    """Prompt + greedy answer of ``generator`` from prompt token ids, padded; ``select`` marks the answer tokens."""
    left_ids, left_mask = pad_sequences(prompt_ids, pad_id, "left")  # generation reads left-padded prompts
    gens = generate_padded(generator, left_ids, left_mask, max_new_tokens)
    ids, mask = pad_sequences([g.prompt_ids + g.new_ids for g in gens], pad_id, padding_side)
    starts = torch.tensor([len(g.prompt_ids) for g in gens]).unsqueeze(1)
    select = mask.bool() & (position_ids_from_mask(mask) >= starts)
    stopped = sum(g.stopped for g in gens)
    return {"input_ids": ids, "attention_mask": mask, "select": select, "stopped_at_eos": stopped}


def completion_batch(generator: LoadedModel, prompts: Sequence[str], max_length: int | None, max_new_tokens: int,
                     padding_side: str = "right") -> dict:
    """Prompt + greedy answer of ``generator`` (as :func:`safetyneurons.model.generate.greedy_generate`), padded;
    ``select`` marks the answer tokens only (up to and including the stop token).

    Returns ``{"input_ids", "attention_mask", "select", "stopped_at_eos"}``.
    """
    tokens = tokenize_prompts(generator, prompts, max_length)
    return _completion(generator, tokens.ids, tokens.pad_id, max_new_tokens, padding_side)


def _batch_tokens(tokens: PromptTokens, index: Sequence[int], positions: str, padding_side: str,
                  generator: LoadedModel, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(input ids, attention mask, tokens that count, answers stopped at a stop token) of one batch of prompts."""
    if positions == "completion":
        cb = _completion(generator, [tokens.ids[i] for i in index], tokens.pad_id, max_new_tokens, padding_side)
        return cb["input_ids"], cb["attention_mask"], cb["select"], cb["stopped_at_eos"]
    enc = tokens.batch(index, padding_side)
    mask = enc["attention_mask"]
    select = enc["content_mask"] if positions == "content" else _select_prompt(mask, positions)
    return enc["input_ids"], mask, select, 0


# ----------------------------------------------------------------------------------- accumulation
def _accumulate(base: LoadedModel, aligned: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                select: torch.Tensor, hook_point: str, sum_sq: torch.Tensor,
                extra: dict[str, torch.Tensor] | None = None) -> int:
    """Add sum over selected tokens of (a_base - a_aligned)^2 into ``sum_sq`` [L, W]; return the token count.

    With ``extra`` (float64 [L, W] tensors ``base_sum_sq``, ``prompt_ms_sum``, ``prompt_ms_sumsq``), also add
    the base activations' squares and each prompt's mean squared change m_p and m_p^2 (see ChangeScores).
    """
    n_tokens = int(select.sum())
    if n_tokens == 0:
        return 0
    layers = sum_sq.shape[0]
    per_prompt = select.sum(1)  # tokens of each prompt that count
    has = per_prompt > 0
    prompt_of = select.reshape(-1).nonzero().squeeze(1) // select.shape[1]  # prompt row of each counted token
    kept: dict[int, torch.Tensor] = {}
    # flat positions of the tokens that count, computed once per batch (index_select avoids re-deriving a
    # boolean mask's nonzero entries, a device sync on GPU, at every layer)
    rows = {select.device: select.reshape(-1).nonzero().squeeze(1)}

    def gather(act: torch.Tensor) -> torch.Tensor:  # [batch, seq, W] -> [n_tokens, W]
        if act.device not in rows:  # layers may sit on several devices (device_map="auto")
            rows[act.device] = next(iter(rows.values())).to(act.device)
        return act.reshape(-1, act.shape[-1]).index_select(0, rows[act.device])

    def keep(layer: int, act: torch.Tensor) -> None:
        kept[layer] = gather(act)
        if extra is not None:
            extra["base_sum_sq"][layer] += torch.sum(kept[layer].float().square(), dim=0,
                                                     dtype=torch.float64).to(sum_sq.device)

    forward_with_hooks(base.model, input_ids, attention_mask, hook_point, keep)
    if len(kept) != layers:
        raise RuntimeError(f"hook captured {len(kept)} of {layers} layers in the base model")
    seen = []

    def add(layer: int, act: torch.Tensor) -> None:
        a_aligned = gather(act).float()
        diff = kept.pop(layer).to(a_aligned.device).float().sub_(a_aligned)  # float32: exact for close values
        # squares summed in float64, so long prompt sets do not lose precision
        sq = diff.square_()
        sum_sq[layer] += torch.sum(sq, dim=0, dtype=torch.float64).to(sum_sq.device)
        if extra is not None:
            by_prompt = torch.zeros(select.shape[0], sq.shape[1], dtype=torch.float64, device=sq.device)
            by_prompt.index_add_(0, prompt_of.to(sq.device), sq.double())
            m = (by_prompt[has.to(sq.device)] / per_prompt[has].to(sq.device, torch.float64).unsqueeze(1))
            extra["prompt_ms_sum"][layer] += m.sum(0).to(sum_sq.device)
            extra["prompt_ms_sumsq"][layer] += m.square().sum(0).to(sum_sq.device)
        seen.append(layer)

    forward_with_hooks(aligned.model, input_ids, attention_mask, hook_point, add)
    if len(seen) != layers:
        raise RuntimeError(f"hook captured {len(seen)} of {layers} layers in the aligned model")
    return n_tokens


def _check_same_tokens(base: LoadedModel, aligned: LoadedModel) -> None:
    """Both models read the aligned model's token ids, so their vocabularies must agree."""
    if base.tokenizer.get_vocab() != aligned.tokenizer.get_vocab():
        raise UserError(
            f"The models are not a symmetric pair: the tokenizers of base {base.ref} and aligned {aligned.ref} "
            f"map tokens to different ids. Contrasting needs two checkpoints that share a tokenizer."
        )


def _check_arguments(hook_point: str, positions: str, completion_from: str, batch_size, max_length,
                     max_new_tokens, padding_side: str) -> tuple[int, int | None]:
    """Refuse bad settings with a UserError; returns (batch size, max length) as numbers."""
    check_hook_point(hook_point)
    check_positions(positions)
    batch_size, max_length = check_batch_size(batch_size), check_max_length(max_length)
    if positions == "completion":
        check_positive_int(max_new_tokens, "max new tokens")
    if completion_from not in COMPLETION_FROM:
        raise UserError(f"completion from must be one of {', '.join(COMPLETION_FROM)}, got {completion_from!r}.")
    check_padding_side(padding_side)
    return batch_size, max_length


def _pair_shape(base: LoadedModel, aligned: LoadedModel, hook_point: str) -> tuple[int, int]:
    """(layers, width) of the hook point, the same in both models (else a UserError: not a symmetric pair)."""
    check_symmetry(base, aligned)
    _check_same_tokens(base, aligned)
    layers, width = num_layers(base.model), hook_width(base.model, hook_point)
    if (layers, width) != (num_layers(aligned.model), hook_width(aligned.model, hook_point)):
        raise UserError(f"The models are not a symmetric pair at hook point {hook_point}: base has "
                        f"{layers}x{width} neurons, aligned {num_layers(aligned.model)}x"
                        f"{hook_width(aligned.model, hook_point)}.")
    return layers, width


@dataclass
class _Sums:
    """Change-score sums over all batches (all ranks): ``total`` [1 + extras, L, W] and the counts."""

    total: torch.Tensor
    token_count: int
    stopped_at_eos: int
    prompt_n: int


def _contrast_batches(base: LoadedModel, aligned: LoadedModel, generator: LoadedModel, tokens: PromptTokens,
                      hook_point: str, positions: str, batch_size: int, max_new_tokens: int, padding_side: str,
                      shape: tuple[int, int], progress: bool) -> _Sums:
    """Add up the change-score sums batch by batch, longest prompts first.

    Under torchrun every rank takes every world-th batch; the batch sums of all ranks are added in batch order
    (OrderedSum: the same running sum as one process makes), one round of world batches at a time.
    """
    order = length_order(tokens.lengths)
    all_starts = list(range(0, len(order), batch_size))
    starts = distributed.share(all_starts)
    ordered = distributed.OrderedSum(torch.zeros(1 + len(_EXTRAS), *shape, dtype=torch.float64, device=aligned.device))
    counts = [0, 0, 0]  # tokens, answers stopped at a stop token, prompts with tokens
    mine = sum(len(order[s:s + batch_size]) for s in starts)
    bar = progress_bar(mine, f"contrast {hook_point}/{positions}", "prompt", progress and distributed.is_main())
    try:
        for j in range(distributed.OrderedSum.rounds(len(all_starts))):
            if j >= len(starts):  # this rank has no batch in the last round
                ordered.add(None)
                continue
            index = order[starts[j]:starts[j] + batch_size]
            ids, mask, select, stopped = _batch_tokens(tokens, index, positions, padding_side, generator,
                                                       max_new_tokens)
            part = torch.zeros_like(ordered.total)  # this batch's sums: [change, *extras, L, W]
            counts[0] += _accumulate(base, aligned, ids, mask, select, hook_point, part[0],
                                     dict(zip(_EXTRAS, part[1:])))
            ordered.add(part)
            counts[1] += stopped
            counts[2] += int((select.sum(1) > 0).sum())
            bar.update(len(index))
            bar.set_postfix(tokens=counts[0], refresh=False)
    finally:
        bar.close()
    totals = torch.tensor(counts, dtype=torch.float64, device=ordered.total.device)
    distributed.all_reduce_sum(totals)
    return _Sums(ordered.total, int(totals[0]), int(totals[1]), int(totals[2]))


def _contrast_meta(base: LoadedModel, aligned: LoadedModel, generator: LoadedModel, prompts: list[str],
                   sums: _Sums, settings: dict, shape: tuple[int, int]) -> dict:
    """The provenance of a contrast run (method, pair, token positions, prompts, settings, versions)."""
    hook_point, positions, completion_from = settings["hook_point"], settings["positions"], settings["completion_from"]
    completion = positions == "completion"
    meta = {
        "format": CHANGE_SCORES_FORMAT,
        "method": "inference-time activation contrasting (Chen et al. 2025, arXiv 2406.14144)",
        "change_score": "sqrt(mean over selected tokens of (a_base - a_aligned)^2)",
        "base": base.describe(),
        "aligned": aligned.describe(),
        "tokenized_with": completion_from if completion else "aligned",
        "completion_from": completion_from if completion else None,
        "hook_point": hook_point,
        "hook_point_doc": HOOK_POINTS[hook_point],
        "positions": positions,
        "positions_doc": POSITIONS[positions],
        "num_layers": shape[0],
        "width": shape[1],
        "prompt_count": len(prompts),
        "prompts_sha256": sha256_json(prompts),
        "token_count": sums.token_count,
        "batch_size": settings["batch_size"],
        "max_length": settings["max_length"],
        "max_new_tokens": settings["max_new_tokens"] if completion else None,
        "padding_side": settings["padding_side"],
        "dtype": str(next(base.model.parameters()).dtype).replace("torch.", ""),
        "device": str(aligned.device),
        "versions": versions(),
    }
    if distributed.world()[1] > 1:
        meta["data_parallel_ranks"] = distributed.world()[1]
    if completion:
        meta["generation"] = {"model": completion_from, "decoding": "greedy",
                              "eos_token_ids": stop_token_ids(generator), "answers_stopped_at_eos": sums.stopped_at_eos,
                              "mean_answer_tokens": sums.token_count / len(prompts)}
    return meta


def contrast(
    base: LoadedModel,
    aligned: LoadedModel,
    prompts: Sequence[str],
    hook_point: str = "mlp_out",
    positions: str = "content",
    completion_from: str = "base",
    batch_size: int = 8,
    max_length: int | None = 256,
    max_new_tokens: int = 32,
    padding_side: str = "right",
    progress: bool = True,
) -> ChangeScores:
    """Change score of every neuron at ``hook_point`` between ``base`` and ``aligned`` over ``prompts``.

    Prompts are formatted and tokenized once by the aligned model (its chat template when on) and both models
    read the same token ids. ``max_length`` truncates prompts (in tokens); ``max_new_tokens`` bounds the
    answer for ``positions="completion"``, generated by ``completion_from`` (``base``, the paper's choice, or
    ``aligned``), which then also tokenizes the prompts. A bare string is one prompt. Raises UserError on bad
    input or a mismatched pair.
    """
    batch_size, max_length = _check_arguments(hook_point, positions, completion_from, batch_size, max_length,
                                              max_new_tokens, padding_side)
    prompts = check_prompts(prompts, allow_empty_list=False)
    shape = _pair_shape(base, aligned, hook_point)
    generator = base if completion_from == "base" else aligned
    reader = generator if positions == "completion" else aligned  # the model whose tokens both models read
    tokens = tokenize_prompts(reader, prompts, max_length, content=positions == "content")
    sums = _contrast_batches(base, aligned, generator, tokens, hook_point, positions, batch_size, max_new_tokens,
                             padding_side, shape, progress)
    if sums.token_count == 0:
        raise UserError("No tokens were selected from the prompts, so no change score can be computed. "
                        "Check that the prompts are not empty after tokenization.")
    settings = dict(hook_point=hook_point, positions=positions, completion_from=completion_from,
                    batch_size=batch_size, max_length=max_length, max_new_tokens=max_new_tokens,
                    padding_side=padding_side)
    meta = _contrast_meta(base, aligned, generator, prompts, sums, settings, shape)
    sum_sq, *rest = sums.total
    result = ChangeScores(hook_point, positions, sum_sq.cpu().numpy(), sums.token_count, meta, prompt_n=sums.prompt_n,
                          **{name: t.cpu().numpy() for name, t in zip(_EXTRAS, rest)})
    if not math.isfinite(float(result.sum_sq.sum())):
        raise UserError("The change scores are not finite (NaN/inf activations). Try --dtype float32.")
    return result
