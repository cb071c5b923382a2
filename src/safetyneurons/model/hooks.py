"""Hook points, resolved by module role, and a forward pass that captures them (with early exit).

This module is the one home for hooking a model and for the pieces of transformers' forward API that
hooked passes need: :func:`attach` / :func:`attached_hooks` (a callback at a hook point, which may replace
the activation), :func:`attached_input_hooks` (a callback on a decoder layer's inputs), :class:`EarlyExit`
(raised by a callback to stop a forward pass once the layers it needs have run), and the KV cache helpers
:func:`cache_argument`, :func:`kv_cache` and :func:`empty_kv_cache`.

Hook points (per decoder layer):
- ``mlp_out``     output of the layer's MLP block (what the reference student project hooked);
- ``mlp_neurons`` the MLP's intermediate activations, i.e. the input of ``down_proj`` (the paper's neurons);
- ``resid``       the decoder layer's output hidden state (the residual stream after the layer).

Works for decoder-only models whose layers have an ``mlp`` with a ``down_proj`` (Llama, Mistral, Qwen2,
Qwen3, Gemma3 and most of their relatives).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from safetyneurons.constants import HOOK_POINTS
from safetyneurons.errors import UserError


_LAYER_PATHS = ("model.layers", "model.language_model.layers", "language_model.model.layers", "layers",
                "transformer.h", "gpt_neox.layers")


def check_hook_point(hook_point: str) -> str:
    if hook_point not in HOOK_POINTS:
        raise UserError(f"Unknown hook point {hook_point!r}. Choose one of: {', '.join(HOOK_POINTS)}.")
    return hook_point


def _get(obj: nn.Module, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers, each with ``mlp.down_proj``. Clear error otherwise."""
    for path in _LAYER_PATHS:
        layers = _get(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            first = layers[0]
            mlp = getattr(first, "mlp", None)
            if mlp is not None and isinstance(getattr(mlp, "down_proj", None), nn.Linear):
                return layers
            found = ", ".join(n for n, _ in first.named_children())
            mlp_found = ", ".join(n for n, _ in mlp.named_children()) if mlp is not None else "none"
            raise UserError(
                f"Unsupported architecture {type(model).__name__}: its decoder layers ({path}) have modules "
                f"[{found}] and MLP modules [{mlp_found}], but safetyneurons needs an `mlp` with a `down_proj` "
                f"linear layer (Llama, Mistral, Qwen2, Qwen3, Gemma3 style)."
            )
    top = ", ".join(n for n, _ in model.named_children())
    raise UserError(
        f"Unsupported architecture {type(model).__name__}: no decoder layer list found (top-level modules: "
        f"[{top}]). Supported: Llama, Mistral, Qwen2, Qwen3, Gemma3 style models with model.layers[i].mlp.down_proj."
    )


def hook_width(model: nn.Module, hook_point: str) -> int:
    """Number of neurons per layer at a hook point."""
    check_hook_point(hook_point)
    down = decoder_layers(model)[0].mlp.down_proj
    return down.in_features if hook_point == "mlp_neurons" else down.out_features


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


class EarlyExit(Exception):
    """Raised by a hook callback to stop the forward pass: the layers after it and the LM head never run.

    The code that runs the pass catches it (:func:`forward_with_hooks` does; so does a guarded prefill)."""


# ------------------------------------------------------------------------------------------ KV cache
def cache_argument(model: nn.Module) -> str:
    """The name of the KV cache argument of ``model.forward``: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (earlier versions)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def kv_cache(output: Any) -> Any:
    """The KV cache object of a model output (``output.cache``, or ``output.past_key_values`` in earlier
    transformers versions); None when the pass kept no cache."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def empty_kv_cache(model: nn.Module) -> Any:
    """A new, empty dynamic KV cache for ``model`` (the config is passed where the transformers version takes it)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left and right padding give the same activations."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _check_layers(blocks: nn.ModuleList, layers: Sequence[int] | None) -> list[int]:
    wanted = sorted(set(range(len(blocks)) if layers is None else (int(i) for i in layers)))
    if not wanted:
        raise UserError("No layers requested for the hook point.")
    if wanted[0] < 0 or wanted[-1] >= len(blocks):
        raise UserError(f"Layer index out of range: the model has {len(blocks)} layers (0..{len(blocks) - 1}).")
    return wanted


def attach(blocks: nn.ModuleList, layer: int, hook_point: str,
           fn: Callable[[torch.Tensor], torch.Tensor | None]) -> torch.utils.hooks.RemovableHandle:
    """Register ``fn(activation)`` at ``hook_point`` of decoder layer ``layer``; return the hook's handle.

    ``activation`` is ``[batch, seq, width]``. When ``fn`` returns a tensor, it replaces the activation
    (the model computes on with it); ``None`` leaves it unchanged. The caller removes the handle.
    """
    if hook_point == "mlp_neurons":
        def pre(_mod, args):
            new = fn(args[0])
            return None if new is None else (new, *args[1:])
        return blocks[layer].mlp.down_proj.register_forward_pre_hook(pre)

    def post(_mod, _args, out):
        act = out[0] if isinstance(out, tuple) else out
        new = fn(act)
        if new is None:
            return None
        return (new, *out[1:]) if isinstance(out, tuple) else new
    target = blocks[layer].mlp if hook_point == "mlp_out" else blocks[layer]
    return target.register_forward_hook(post)


@contextlib.contextmanager
def _removed_on_exit(handles: list[torch.utils.hooks.RemovableHandle]) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def attached_hooks(model: nn.Module, hook_point: str,
                   callback: Callable[[int, torch.Tensor], torch.Tensor | None],
                   layers: Sequence[int] | None = None) -> Iterator[list[int]]:
    """Hooks that call ``callback(layer, activation)`` during any forward pass run inside the block.

    Yields the sorted list of hooked layers; the hooks are removed on exit (also on an exception, which
    the callback may raise to stop the forward pass, e.g. :class:`EarlyExit`). ``activation`` is as in
    :func:`forward_with_hooks`. As in :func:`attach`, a tensor returned by ``callback`` replaces the
    activation (activation patching) and ``None`` leaves it unchanged.
    """
    check_hook_point(hook_point)
    blocks = decoder_layers(model)
    wanted = _check_layers(blocks, layers)

    def make(i: int):
        def at_layer(t: torch.Tensor) -> torch.Tensor | None:
            return callback(i, t)

        return attach(blocks, i, hook_point, at_layer)

    handles: list[torch.utils.hooks.RemovableHandle] = []
    with _removed_on_exit(handles):
        for i in wanted:  # appended one by one: a failure half way still removes the hooks made
            handles.append(make(i))
        yield wanted


@contextlib.contextmanager
def attached_input_hooks(model: nn.Module, callback: Callable[[int, tuple, dict], tuple[tuple, dict]],
                         layers: Sequence[int]) -> Iterator[list[int]]:
    """Pre-hooks on the inputs of decoder layers: ``callback(layer, args, kwargs)`` returns the ``(args,
    kwargs)`` the layer runs on (hidden states, attention mask, position embeddings...). Yields the sorted
    hooked layers; the hooks are removed on exit, also on an exception."""
    blocks = decoder_layers(model)
    wanted = _check_layers(blocks, layers)

    def make(i: int):
        def before(_mod, args, kwargs):
            return callback(i, args, kwargs)

        return blocks[i].register_forward_pre_hook(before, with_kwargs=True)

    handles: list[torch.utils.hooks.RemovableHandle] = []
    with _removed_on_exit(handles):
        for i in wanted:  # appended one by one: a failure half way still removes the hooks made
            handles.append(make(i))
        yield wanted


@torch.no_grad()
def forward_with_hooks(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    hook_point: str,
    callback: Callable[[int, torch.Tensor], None],
    layers: Sequence[int] | None = None,
    early_exit: bool = True,
) -> None:
    """Run `model` and call ``callback(layer, activation)`` for each requested layer, in order.

    ``activation`` is the hook point's tensor ``[batch, seq, width]`` (model dtype, still on the model's
    device). Pad positions hold unspecified values: mask them with ``torch.where`` (not multiplication,
    which lets a NaN through). With ``early_exit`` the forward pass stops right after the deepest
    requested layer has been captured, so later layers and the LM head never run.
    """
    check_hook_point(hook_point)
    deepest = _check_layers(decoder_layers(model), layers)[-1]

    def emit(i: int, t: torch.Tensor) -> None:
        callback(i, t)
        if early_exit and i == deepest:
            raise EarlyExit

    device = next(model.parameters()).device
    try:
        with attached_hooks(model, hook_point, emit, layers):
            # the bare decoder stack (no LM head) when the model exposes it
            body = model.get_decoder() if hasattr(model, "get_decoder") else model
            body(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                position_ids=position_ids_from_mask(attention_mask).to(device),
                use_cache=False,
            )
    except EarlyExit:
        pass


def capture(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, hook_point: str,
            layers: Sequence[int] | None = None, early_exit: bool = True) -> dict[int, torch.Tensor]:
    """Convenience: ``{layer: activation [batch, seq, width]}`` as float32 on CPU."""
    out: dict[int, torch.Tensor] = {}

    def keep(i, t):
        out[i] = t.detach().float().cpu()

    forward_with_hooks(model, input_ids, attention_mask, hook_point, keep, layers=layers, early_exit=early_exit)
    return out
