"""LoRA refusal fine-tune: reply-only loss, class-balanced batches, seeded AdamW."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

from safetyneurons._io import progress_bar
from safetyneurons.errors import UserError
from safetyneurons.model.generate import end_of_turn_id
from safetyneurons.model.hooks import decoder_layers
from safetyneurons.twin.data import collate, encode_example
from safetyneurons.model.twin_settings import TwinSettings

if TYPE_CHECKING:
    from peft import PeftModel

    from safetyneurons.model.pair import LoadedModel

_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")


def reply_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Next-token cross-entropy on labelled (reply) tokens: mean per example, then mean over the batch.

    Averaging per example first gives short refusals the same weight as long benign replies.
    """
    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device),
                   attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
    logits = logits[:, :-1].float()
    target = batch["labels"][:, 1:].to(device)
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                ignore_index=-100, reduction="none").view(target.shape)
    keep = target != -100
    per_token = torch.where(keep, per_token, torch.zeros_like(per_token))
    counts = keep.sum(1)
    has = counts > 0
    per_example = per_token.sum(1)[has] / counts[has]
    return per_example.mean()


# -------------------------------------------------------------------------------------------- LoRA
def lora_targets(model: nn.Module) -> list[str]:
    """Full names of every linear projection in each decoder layer's attention and MLP blocks."""
    layers = decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    targets: list[str] = []
    for layer in layers:
        attn = next((getattr(layer, a) for a in _ATTENTION_NAMES if isinstance(getattr(layer, a, None), nn.Module)),
                    None)
        if attn is None:
            found = ", ".join(n for n, _ in layer.named_children())
            raise UserError(f"Unsupported architecture {type(model).__name__}: a decoder layer has modules "
                            f"[{found}] but no attention block ({', '.join(_ATTENTION_NAMES)}).")
        for block in (attn, layer.mlp):
            prefix = names[id(block)]
            targets.extend(f"{prefix}.{n}" for n, m in block.named_modules() if isinstance(m, nn.Linear))
    return targets


def _lr_lambda(settings: TwinSettings):
    def f(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / (settings.warmup_steps + 1)
        span = max(1, settings.steps - settings.warmup_steps)
        return 1.0 - 0.9 * min(1.0, (step - settings.warmup_steps) / span)
    return f


def balanced_batches(labels: Sequence[int], batch_size: int, steps: int, seed: int,
                     benign_share: float = 0.5) -> list[list[int]]:
    """Indices for `steps` class-balanced batches.

    Over the run, a fraction `benign_share` of the slots is benign (0) and the rest harmful (1), spread
    evenly (0.5: the classes alternate). Each class is drawn from its own seeded shuffle, reshuffled once
    every item has been used.
    """
    gen = torch.Generator().manual_seed(seed)
    by_class = {c: [i for i, y in enumerate(labels) if y == c] for c in (1, 0)}
    orders: dict[int, list[int]] = {1: [], 0: []}
    batches = []
    for step in range(steps):
        batch = []
        for k in range(batch_size):
            i = step * batch_size + k
            c = 0 if math.floor((i + 1) * benign_share) > math.floor(i * benign_share) else 1
            if not by_class[c]:
                c = 1 - c
            if not orders[c]:
                orders[c] = [by_class[c][j] for j in torch.randperm(len(by_class[c]), generator=gen).tolist()]
            batch.append(orders[c].pop(0))
        batches.append(batch)
    return batches


def train_lora(lm: LoadedModel, examples: Sequence[dict], settings: TwinSettings,
               progress: bool = True) -> tuple[PeftModel, list[float], list[str]]:
    """Fit a LoRA adapter on `examples` (reply-only loss). Returns ``(peft_model, losses, targets)``."""
    torch.manual_seed(settings.seed)
    encoded = [encode_example(lm, e["prompt"], e["reply"], e["ends"], settings.max_length) for e in examples]
    targets = lora_targets(lm.model)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft calls a transformers API that is deprecated in v5
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(lm.model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(settings))
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else end_of_turn_id(lm)
    batches = balanced_batches([e["label"] for e in examples], settings.batch_size, settings.steps, settings.seed,
                               settings.benign_share)
    losses: list[float] = []
    model.train()
    with progress_bar(settings.steps, "LoRA fine-tune", "step", progress) as bar:
        for batch_idx in batches:
            loss = reply_loss(model, collate([encoded[i] for i in batch_idx], pad))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(round(float(loss.detach()), 5))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update(1)
    model.eval()
    return model, losses, targets

