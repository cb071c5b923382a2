"""Dynamic activation patching: do the safety neurons *cause* the aligned model's behaviour?

Chen et al. 2025 (arXiv 2406.14144, section 4): while one model (the *receiver*) generates, the activations
of a neuron set at its hook point are replaced, at every step, by the values the other model (the *donor*)
has at the same positions on the same prefix. Both models run in lockstep with greedy decoding and their own
KV caches; the receiver picks the next token, which both then read. The prompt (prefill) is patched too.

Directions:

- ``sufficiency``: base <- aligned. Does the base model turn safe when its safety neurons carry the
  aligned model's values?
- ``necessity``: aligned <- base. Does the aligned model stop refusing when its safety neurons carry the
  base model's values?

Patches (a :class:`Patch` per row group; many are batched together as extra batch rows):

- ``donor``: the dynamic patch above (the safety set, or a random control set of the same per-layer counts);
- ``mean``: the neurons are set to the base model's mean activation over the patch prompts' tokens;
- ``zero``: the neurons are set to zero (ablation);
- ``none``: no patch (the receiver's own greedy generation).

Measures (:mod:`safetyneurons.causal.causal`): refusal rate on harmful prompts and answer rate on benign prompts by the
project's phrase judge (:mod:`safetyneurons.model.judge`, a heuristic); the causal effect
``(patched - receiver) / (donor - receiver)`` of each (for sufficiency: ``(patched - base) / (aligned - base)``);
and the perplexity of the patched receiver on benign reference text (an alignment-tax proxy).
The experiment over k and control sets and its outputs are there too.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from safetyneurons.checks import check_batch_size, check_max_length, check_positive_int, check_prompts
from safetyneurons.model.tokens import length_order, pad_sequences, tokenize_prompts
from safetyneurons.neurons.contrast import check_padding_side
from safetyneurons.errors import UserError
from safetyneurons.model.generate import stop_token_ids
from safetyneurons.model.hooks import (attached_hooks, attached_input_hooks, cache_argument, check_hook_point,
                                       empty_kv_cache, hook_width, num_layers,
                                       position_ids_from_mask)
from safetyneurons.neurons.selection import NeuronSet
from safetyneurons.model.pair import LoadedModel
from safetyneurons.causal.sets import check_neuron_set

PATCH_FORMAT = "safetyneurons.patch/2"  # /2: matched controls, refusal score, paired tests
DIRECTIONS: dict[str, str] = {
    "sufficiency": "base <- aligned: the base model generates; its neurons get the aligned model's activations",
    "necessity": "aligned <- base: the aligned model generates; its neurons get the base model's activations",
}
SOURCES: dict[str, str] = {
    "donor": "the donor model's activation at the same position on the same prefix (dynamic patching)",
    "mean": "the base model's mean activation over the patch prompts' tokens (mean patching)",
    "zero": "zero (ablation)",
    "none": "no patch",
    "ablate": "directional ablation: x - (x . u) u at the hook point of every listed layer (a refusal direction u)",
    "add": "activation addition: x + r at the hook point of the listed layers (a refusal direction r)",
}
DIRECTION_SOURCES = ("ablate", "add")  # patches of a direction in the residual stream (hook point resid)
DEFAULT_K: tuple[float, ...] = (5.0,)
SWEEP_K: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 10.0)


@dataclass(frozen=True, eq=False)
class Patch:
    """One way of patching the receiver: ``source`` (see :data:`SOURCES`) at ``neurons``, or, for a direction
    source, ``vector`` (float [width]) at ``layers``."""

    name: str
    source: str = "donor"
    neurons: NeuronSet | None = None
    vector: torch.Tensor | None = None
    layers: tuple[int, ...] = ()

    def __post_init__(self):
        if self.source not in SOURCES:
            raise UserError(f"Unknown patch source {self.source!r}; choose one of {', '.join(SOURCES)}.")
        direction = self.source in DIRECTION_SOURCES
        if (self.neurons is None) != (self.source == "none" or direction):
            raise UserError(f"Patch {self.name!r}: source {self.source!r} needs a neuron set exactly when it patches.")
        if direction != (self.vector is not None and len(self.layers) > 0):
            raise UserError(f"Patch {self.name!r}: a direction (vector and layers) goes with sources "
                            f"{', '.join(DIRECTION_SOURCES)} only, and they need one.")


# ---------------------------------------------------------------------------------------- plumbing
#: Finished rows leave the batch once they are this share of it (see _generate_batch).
COMPACT = 0.25


def _last_real(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, whatever the padding side."""
    seq = mask.shape[1]
    return (mask.long() * torch.arange(1, seq + 1, device=mask.device)).argmax(dim=1)


class _Rows:
    """The receiver rows of one batch: row ``g`` is patch ``g // n_prompts`` applied to prompt ``g % n_prompts``.

    Rows whose token prefixes are equal form a *branch*. Below the shallowest patched layer (``first``) the
    receiver computes each branch once; a pre-hook copies it out to the rows there. The donor, which is
    never patched, runs per branch only. :attr:`alive` holds the rows still generating and :attr:`branch`
    each one's branch.
    """

    def __init__(self, patches: Sequence[Patch], n_prompts: int, layers: int, width: int,
                 mean: torch.Tensor | None, device, dtype):
        total = len(patches) * n_prompts
        self.prompt_of = torch.arange(total, device=device) % n_prompts
        self.is_donor = torch.tensor([p.source == "donor" for p in patches for _ in range(n_prompts)], device=device)
        self.masks: dict[int, torch.Tensor] = {}
        self.consts: dict[int, torch.Tensor] = {}
        if any(p.source == "mean" for p in patches) and mean is None:
            raise UserError("Mean patching needs the base model's mean activation (see mean_activation).")
        for p_i, patch in enumerate(patches):
            if patch.neurons is None:
                continue
            rows = slice(p_i * n_prompts, (p_i + 1) * n_prompts)
            for layer, idx in patch.neurons.by_layer().items():
                if layer not in self.masks:
                    self.masks[layer] = torch.zeros(total, width, dtype=torch.bool, device=device)
                    self.consts[layer] = torch.zeros(total, width, dtype=dtype, device=device)
                self.masks[layer][rows, torch.as_tensor(idx, device=device)] = True
                if patch.source == "mean":
                    self.consts[layer][rows] = mean[layer].to(device=device, dtype=dtype)
        self.shifts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (per-row addition, ablation)
        for p_i, patch in enumerate(patches):
            if patch.vector is None:
                continue
            rows = slice(p_i * n_prompts, (p_i + 1) * n_prompts)
            vector = patch.vector.to(device=device, dtype=torch.float32)
            for layer in patch.layers:
                add, unit = self.shifts.setdefault(layer, (torch.zeros(total, width, device=device),
                                                           torch.zeros(total, width, device=device)))
                if patch.source == "add":
                    add[rows] = vector
                else:
                    unit[rows] = vector / vector.norm().clamp_min(1e-12)
        self.layers = sorted(set(self.masks) | set(self.shifts))  # the layers some row patches
        self.first = min(self.layers) if self.layers else layers  # rows share every layer below it
        self.alive = torch.arange(total, device=device)
        self.branch = self.prompt_of.clone()
        self.donor_values: dict[int, torch.Tensor] = {}  # layer -> [n_branches, seq, width]

    def rows_of(self, out: torch.Tensor) -> torch.Tensor:
        """Per-row tensor from a forward's output (per row when the batch was expanded, else per branch)."""
        return out if self.layers else out[self.branch]

    def patch(self, layer: int, act: torch.Tensor) -> torch.Tensor | None:
        """The receiver's activation at the hook point of ``layer`` with each row's patched neurons replaced
        (donor value, mean or zero) and its direction added or ablated; None when no live row patches it."""
        new = self._replace(layer, act) if layer in self.masks else None
        if layer not in self.shifts:
            return new
        act = act if new is None else new
        add, unit = (t[self.alive] for t in self.shifts[layer])
        x = act.float() + add.unsqueeze(1)
        x = x - (x @ unit.unsqueeze(-1)) * unit.unsqueeze(1)  # rows without ablation have unit = 0
        return x.to(act.dtype)

    def _replace(self, layer: int, act: torch.Tensor) -> torch.Tensor | None:
        mask = self.masks[layer][self.alive]
        if not bool(mask.any()):
            return None
        values = self.consts[layer][self.alive].to(act.dtype).unsqueeze(1).expand_as(act)
        donor = self.donor_values.get(layer)
        if donor is not None:
            values = torch.where(self.is_donor[self.alive][:, None, None], donor[self.branch].to(act.dtype), values)
        return torch.where(mask.unsqueeze(1), values, act)

    def expand(self, layer: int, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Inputs of a decoder layer at or above ``first``: per-branch inputs become per-row inputs."""
        def index(value, n: int):
            if torch.is_tensor(value):
                return value[self.branch] if value.dim() >= 2 and value.shape[0] == n and n > 1 else value
            if isinstance(value, (tuple, list)):
                return type(value)(index(v, n) for v in value)
            if isinstance(value, dict):
                return {k: index(v, n) for k, v in value.items()}
            return value

        n = int(self.branch.max()) + 1 if self.branch.numel() else 0
        if layer == self.first:
            if args:
                args = (args[0][self.branch], *args[1:])
            else:
                kwargs["hidden_states"] = kwargs["hidden_states"][self.branch]
        return args, {k: index(v, n) for k, v in kwargs.items()}

    def advance(self, token: torch.Tensor, done: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Drop finished rows and split branches by the tokens just picked.

        Returns (rows kept, parent branch of each new branch, each new branch's token).
        """
        keep = (~done).nonzero().squeeze(1)
        self.alive, token, branch = self.alive[keep], token[keep], self.branch[keep]
        vocab = int(token.max()) + 1 if token.numel() else 1
        unique, self.branch = torch.unique(branch * vocab + token, return_inverse=True)
        return keep, unique // vocab, unique % vocab


def _forward(lm: LoadedModel, ids, mask, cache=None):
    """Decoder stack on ``ids`` (explicit positions from ``mask``); returns the final hidden states."""
    body = lm.model.get_decoder() if hasattr(lm.model, "get_decoder") else lm.model
    kwargs = {"use_cache": cache is not None}
    if cache is not None:
        kwargs[cache_argument(body)] = cache
    positions = position_ids_from_mask(mask)[:, -ids.shape[1]:]
    out = body(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
    return out.last_hidden_state


def _logits(lm: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
    """LM head on hidden states (with the config's final logit soft-capping, as the model's own head)."""
    logits = lm.model.get_output_embeddings()(hidden).float()
    cap = getattr(lm.model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


class _Hooked:
    """Context: receiver hooks that share branches and patch rows, donor hooks that capture; always removed.

    The hooks are :mod:`safetyneurons.model.hooks`' own: layer-input hooks from the shallowest patched layer
    up (branches become rows), and hook-point hooks at every patched layer (the receiver's replace the
    activation, the donor's capture it)."""

    def __init__(self, receiver: LoadedModel, donor: LoadedModel | None, rows: _Rows, hook_point: str):
        self.receiver, self.donor, self.rows, self.hook_point = receiver, donor, rows, hook_point
        self.uses_donor = donor is not None and bool(rows.is_donor.any())
        self.captured: dict[int, torch.Tensor] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "_Hooked":
        with contextlib.ExitStack() as stack:  # a hook that fails to attach removes those attached before it
            model, layers = self.receiver.model, num_layers(self.receiver.model)
            if self.rows.first < layers:
                stack.enter_context(attached_input_hooks(model, self.rows.expand, range(self.rows.first, layers)))
            if self.rows.layers:
                stack.enter_context(attached_hooks(model, self.hook_point, self.rows.patch, self.rows.layers))
                if self.uses_donor:
                    stack.enter_context(attached_hooks(self.donor.model, self.hook_point, self._keep,
                                                       list(self.rows.masks)))
            self._stack = stack.pop_all()
        return self

    def _keep(self, layer: int, act: torch.Tensor) -> None:
        self.captured[layer] = act.detach()

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def step(self, ids, mask, cache_r=None, cache_d=None) -> torch.Tensor:
        """One forward of both models on the branches' ``ids``; returns the receiver's hidden states per row."""
        if self.uses_donor:
            self.captured = {}
            _forward(self.donor, ids, mask, cache_d)
            self.rows.donor_values = self.captured
        return self.rows.rows_of(_forward(self.receiver, ids, mask, cache_r))


# -------------------------------------------------------------------------------------- generation
def _select(cache, first: int, branches: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """Keep cache entries: ``branches`` in layers below ``first`` (all layers when ``rows`` is None), else ``rows``.

    An index that keeps every entry in place (no split, nothing finished) copies nothing.
    """
    def moves(index: torch.Tensor, size: int) -> bool:
        return index.numel() != size or not bool((index == torch.arange(size, device=index.device)).all())

    for i, layer in enumerate(cache.layers):
        index = branches if rows is None or i < first else rows
        keys = getattr(layer, "keys", None)
        if not torch.is_tensor(keys) or keys.numel() == 0 or moves(index, keys.shape[0]):
            layer.batch_select_indices(index)


def shared_prefix(lm: LoadedModel, prompts: Sequence[str], max_length: int | None) -> int:
    """Length of the token prefix that every formatted prompt shares (the chat template's system prompt and
    user header, say), at most each prompt's length - 1 so that every prompt keeps a token of its own."""
    return _shared_prefix_length(tokenize_prompts(lm, prompts, max_length).ids)


def _shared_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """:func:`shared_prefix` of prompts already tokenised (token ids without padding)."""
    prefix: list[int] | None = None
    shortest = None
    for real in rows:
        shortest = len(real) if shortest is None else min(shortest, len(real))
        if prefix is None:
            prefix = list(real)
        else:
            n = next((i for i, (a, b) in enumerate(zip(prefix, real)) if a != b), min(len(prefix), len(real)))
            prefix = prefix[:n]
    return max(0, min(len(prefix or []), (shortest or 1) - 1))


def _split_prefix(ids: torch.Tensor, mask: torch.Tensor, prefix: int, padding_side: str, pad_id: int):
    """(the shared prefix ``[1, prefix]``, each row's remaining tokens ``[n, S]`` and their mask, padded)."""
    rows = [row[m.bool()] for row, m in zip(ids, mask)]
    head = rows[0][:prefix].unsqueeze(0)
    tails = [r[prefix:] for r in rows]
    width = max(len(t) for t in tails)
    out = ids.new_full((len(tails), width), pad_id)
    out_mask = mask.new_zeros((len(tails), width))
    for i, t in enumerate(tails):
        cols = slice(width - len(t), width) if padding_side == "left" else slice(0, len(t))
        out[i, cols], out_mask[i, cols] = t, 1
    return head, out, out_mask


@torch.no_grad()
def _generate_batch(receiver, donor, patches, enc, hook_point, max_new_tokens, stops, mean, bar,
                    prefix: int = 0, padding_side: str = "left", settled=None,
                    first_step=None) -> tuple[list[list[int]], list[float] | None]:
    n_prompts = enc["input_ids"].shape[0]
    device = receiver.device
    dims = (num_layers(receiver.model), hook_width(receiver.model, hook_point))
    dtype = next(receiver.model.parameters()).dtype
    rows = _Rows(patches, n_prompts, *dims, mean, device, dtype)
    out: list[list[int]] = [[] for _ in range(len(patches) * n_prompts)]
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    cache_r = empty_kv_cache(receiver.model)
    cache_d = empty_kv_cache(donor.model) if donor is not None else None
    stop_set = torch.tensor(sorted(stops), device=device)
    if prefix > 0:
        # The shared prefix is the same for every prompt, so each patch computes it once (one row per patch,
        # one branch); the caches are then copied out to the rows.
        pad_id = receiver.tokenizer.pad_token_id if receiver.tokenizer.pad_token_id is not None else 0
        head, ids, tail_mask = _split_prefix(ids, mask, prefix, padding_side, pad_id)
        head_rows = _Rows(patches, 1, *dims, mean, device, dtype)
        with _Hooked(receiver, donor, head_rows, hook_point) as hooked:
            hooked.step(head, torch.ones_like(head), cache_r, cache_d)
            uses_donor = hooked.uses_donor
        zeros = torch.zeros(n_prompts, dtype=torch.long, device=device)
        _select(cache_r, rows.first, zeros, torch.arange(len(patches) * n_prompts, device=device) // n_prompts)
        if uses_donor:
            _select(cache_d, rows.first, zeros)
        mask = torch.cat([tail_mask.new_ones(n_prompts, prefix), tail_mask], dim=1)
    else:
        tail_mask = mask
    with _Hooked(receiver, donor, rows, hook_point) as hooked:
        hidden = hooked.step(ids, mask, cache_r, cache_d)
        last = hidden[torch.arange(hidden.shape[0], device=device), _last_real(tail_mask)[rows.branch]]
        # Rows that have finished stay in the batch (their further tokens are dropped) until they are at least
        # COMPACT of it: removing rows copies every patched layer's KV cache, so it is done in bulk.
        finished = torch.zeros(rows.alive.numel(), dtype=torch.bool, device=device)
        first: list[float] | None = None
        for step in range(max_new_tokens):
            logits = _logits(receiver, last)
            if step == 0 and first_step is not None:  # every row is alive at the first answer position
                first = first_step(logits).float().cpu().tolist()
            token = logits.argmax(dim=-1)
            live = (~finished).tolist()
            for g, t, is_live in zip(rows.alive.tolist(), token.tolist(), live):
                if is_live:
                    out[g].append(t)
            done = finished | torch.isin(token, stop_set)
            if settled is not None:
                done |= torch.tensor([is_live and settled(out[g]) for g, is_live in zip(rows.alive.tolist(), live)],
                                     dtype=torch.bool, device=device)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            compact = float(done.float().mean()) >= COMPACT
            keep, parents, branch_tokens = rows.advance(token, done if compact else torch.zeros_like(done))
            finished = done[keep]
            _select(cache_r, rows.first, parents, keep)
            if hooked.uses_donor:
                _select(cache_d, rows.first, parents)
            mask = torch.cat([mask[parents], mask.new_ones(len(parents), 1)], dim=1)
            last = hooked.step(branch_tokens.unsqueeze(1), mask, cache_r, cache_d)[:, -1]
            if bar is not None:
                bar.set_postfix(step=step + 1, rows=int(rows.alive.numel()), branches=len(parents), refresh=False)
    return out, first


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="prompt", file=sys.stderr, disable=not progress, dynamic_ncols=True)


def generate_patched(receiver: LoadedModel, donor: LoadedModel | None, prompts: Sequence[str],
                     patches: Sequence[Patch], *, hook_point: str, max_new_tokens: int = 32, batch_size: int = 4,
                     padding_side: str = "left", max_length: int | None = 256, mean: torch.Tensor | None = None,
                     progress: bool = True, desc: str = "patch", share_prefix: bool = True,
                     settled: Callable[[list[int]], bool] | None = None,
                     first_step: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     first_out: dict[str, list[float]] | None = None) -> dict[str, list[list[int]]]:
    """Greedy generations of ``receiver`` under each patch: ``{patch name: [token ids per prompt]}``.

    Every patch of a prompt batch runs as extra batch rows (``batch_size`` prompts x ``len(patches)`` rows).
    The answer of each row ends with its first stop token (included) or after ``max_new_tokens``. Prompts
    are formatted and tokenized by the receiver; both models read the same ids. Hooks are removed on exit,
    also after an error. With ``share_prefix`` the token prefix that all prompts share (the chat template's
    system prompt, say: see :func:`shared_prefix`) is computed once per patch rather than once per row.
    ``settled(ids)``, when given, is asked after every step about each row's reply so far; a row it answers
    True for stops there (use it when the rest of the reply cannot change what is measured, as
    ``causal.refusal_settled`` does). Rows are independent, so stopping one never changes another.
    ``first_step(logits)``, when given, maps the first answer position's logits [rows, vocab] to one number per
    row; ``first_out`` then receives ``{patch name: [number per prompt]}`` (the refusal score, say).
    Direction patches (:data:`DIRECTION_SOURCES`) need ``hook_point="resid"``.
    """
    check_hook_point(hook_point)
    batch_size, max_length = check_batch_size(batch_size), check_max_length(max_length)
    check_padding_side(padding_side)
    check_positive_int(max_new_tokens, "max new tokens")
    prompts = check_prompts(prompts, allow_empty_list=False)
    names = [p.name for p in patches]
    if not patches or len(set(names)) != len(names):
        raise UserError("Give at least one patch, each with its own name.")
    if any(p.source == "donor" for p in patches) and donor is None:
        raise UserError("Dynamic patching (source 'donor') needs a donor model.")
    if any(p.source in DIRECTION_SOURCES for p in patches) and hook_point != "resid":
        raise UserError("A direction patch (ablate / add) acts on the residual stream: use hook point resid.")
    for p in patches:
        if p.neurons is not None:
            check_neuron_set(p.neurons, receiver, hook_point, same_weights=False)  # the receiver may be either model
    stops = stop_token_ids(receiver)

    result: dict[str, list] = {n: [None] * len(prompts) for n in names}
    tokens = tokenize_prompts(receiver, prompts, max_length)  # once per prompt
    order = length_order(tokens.lengths)  # similar lengths batched together: less padding
    prefix = _shared_prefix_length(tokens.ids) if share_prefix else 0
    bar = _bar(len(prompts), desc, progress)
    try:
        for start in range(0, len(prompts), batch_size):
            index = order[start:start + batch_size]
            enc = tokens.batch(index, padding_side)
            out, first = _generate_batch(receiver, donor, patches, enc, hook_point, max_new_tokens, stops, mean,
                                         bar, prefix, padding_side, settled, first_step)
            for p_i, name in enumerate(names):
                for j, i in enumerate(index):
                    result[name][i] = out[p_i * len(index) + j]
                    if first is not None and first_out is not None:
                        first_out.setdefault(name, [float("nan")] * len(prompts))[i] = first[p_i * len(index) + j]
            bar.update(len(index))
    finally:
        bar.close()
    return result


def decode_reply(lm: LoadedModel, ids: Sequence[int], stops: Sequence[int] | None = None) -> str:
    """The reply text of generated ids, cut at the first stop token."""
    stops = set(stop_token_ids(lm) if stops is None else stops)
    cut = next((k for k, t in enumerate(ids) if t in stops), len(ids))
    return lm.tokenizer.decode(list(ids[:cut]), skip_special_tokens=True).strip()


# ------------------------------------------------------------------------------- other measurements
@torch.no_grad()
def perplexity_patched(receiver: LoadedModel, donor: LoadedModel | None, texts: Sequence[str],
                       patches: Sequence[Patch], *, hook_point: str, batch_size: int = 4, max_length: int = 256,
                       mean: torch.Tensor | None = None) -> dict[str, float]:
    """Perplexity of the patched receiver on plain ``texts`` (no chat template), per patch.

    The donor reads the same text (teacher forcing), so its activations are those on the same prefix. Texts
    are batched by token length (less padding), and the LM head runs only on the positions that are scored.
    """
    texts = check_prompts(texts, "Reference text", allow_empty_list=False)
    batch_size, max_length = check_batch_size(batch_size), check_max_length(max_length)
    tok = receiver.tokenizer
    device = receiver.device
    encoded = [tok(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    order = length_order([len(e) for e in encoded])
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    nll = {p.name: torch.zeros((), dtype=torch.float64) for p in patches}
    tokens = 0
    for start in range(0, len(order), batch_size):
        ids, mask = pad_sequences([encoded[i] for i in order[start:start + batch_size]], pad_id, "right")
        ids, mask = ids.to(device), mask.to(device)
        rows = _Rows(patches, ids.shape[0], num_layers(receiver.model), hook_width(receiver.model, hook_point),
                     mean, device, next(receiver.model.parameters()).dtype)
        with _Hooked(receiver, donor, rows, hook_point) as hooked:
            hidden = hooked.step(ids, mask)
        counted = (mask[:, 1:] * mask[:, :-1]).bool()  # a real token predicted from a real token
        target = ids[:, 1:][counted]
        tokens += int(counted.sum())
        for p_i, patch in enumerate(patches):
            h = hidden[p_i * ids.shape[0]:(p_i + 1) * ids.shape[0], :-1][counted]
            nll[patch.name] += torch.nn.functional.cross_entropy(_logits(receiver, h), target,
                                                                 reduction="sum").double().cpu()
    if tokens == 0:
        raise UserError("The reference texts hold no token pairs to score; give longer reference texts.")
    return {name: math.exp(float(v) / tokens) for name, v in nll.items()}
