"""The refusal-direction baseline (Arditi et al. 2024, "Refusal in Language Models Is Mediated by a Single
Direction"), beside neuron patching.

- **Direction.** At each layer, the difference in means of the aligned model's residual stream (``resid``: the
  decoder layer's output) at the last prompt token (the end of the chat template's assistant header, the first
  answer position) between harmful and benign prompts of the *contrast* split: r_l = mean_harmful - mean_benign.
- **Layer** (:data:`LAYER_RULE`): the contrast prompts are split in two halves by position (even / odd of each
  class); for every layer up to :data:`MAX_DEPTH` of the depth, the direction of one half is scored by how well
  it separates the other half's harmful from benign projections (Cohen's d, both ways averaged); the layer with
  the largest d wins. No test prompt is read.
- **Necessity** (aligned model): directional ablation, x <- x - (x . u) u with u = r / |r|, on the output of every
  decoder layer at every position, prompt and reply.
- **Sufficiency** (base model): activation addition, x <- x + r at the chosen layer's output, every position.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from safetyneurons.checks import check_batch_size, check_prompts
from safetyneurons.errors import UserError
from safetyneurons.model.hooks import forward_with_hooks, num_layers
from safetyneurons.model.pair import LoadedModel

MAX_DEPTH = 0.8  # layers past this share of the depth are not candidates (Arditi et al. leave the last ones out)
LAYER_RULE = (f"the layer (of the first {int(100 * MAX_DEPTH)}% of the depth) whose difference-in-means direction "
              f"from one half of the contrast split best separates the other half's harmful from benign prompts "
              f"(Cohen's d of the projections, both halves averaged)")


@torch.no_grad()
def last_token_resid(lm: LoadedModel, prompts: Sequence[str], batch_size: int = 8,
                     max_length: int | None = 256) -> np.ndarray:
    """float64 [prompts, layers, hidden]: each decoder layer's output at the last prompt token."""
    prompts = check_prompts(prompts, allow_empty_list=False)
    batch_size = check_batch_size(batch_size)
    out = []
    for start in range(0, len(prompts), batch_size):
        enc = lm.encode(prompts[start:start + batch_size], max_length=max_length, padding_side="left")
        rows: dict[int, torch.Tensor] = {}

        def keep(layer, act):
            rows[layer] = act[:, -1].double().cpu()

        forward_with_hooks(lm.model, enc["input_ids"], enc["attention_mask"], "resid", keep, early_exit=False)
        out.append(torch.stack([rows[layer] for layer in sorted(rows)], dim=1))
    return torch.cat(out).numpy()


def _cohens_d(direction: np.ndarray, harmful: np.ndarray, benign: np.ndarray) -> float:
    u = direction / max(np.linalg.norm(direction), 1e-12)
    ph, pb = harmful @ u, benign @ u
    pooled = np.sqrt((ph.var(ddof=1) + pb.var(ddof=1)) / 2) if min(len(ph), len(pb)) > 1 else 0.0
    return float((ph.mean() - pb.mean()) / pooled) if pooled > 0 else 0.0


def choose_layer(harmful: np.ndarray, benign: np.ndarray) -> tuple[int, list[float]]:
    """(layer, d per candidate layer) by :data:`LAYER_RULE`, from [prompts, layers, hidden] activations."""
    if min(len(harmful), len(benign)) < 4:
        raise UserError(f"The refusal direction needs at least 4 harmful and 4 benign contrast prompts, got "
                        f"{len(harmful)} and {len(benign)}.")
    layers = harmful.shape[1]
    candidates = max(1, int(np.floor(MAX_DEPTH * layers)))
    scores = []
    for layer in range(candidates):
        h, b = harmful[:, layer], benign[:, layer]
        d_ab = _cohens_d(h[0::2].mean(0) - b[0::2].mean(0), h[1::2], b[1::2])
        d_ba = _cohens_d(h[1::2].mean(0) - b[1::2].mean(0), h[0::2], b[0::2])
        scores.append((d_ab + d_ba) / 2)
    return int(np.argmax(scores)), scores


def refusal_direction(aligned: LoadedModel, harmful: Sequence[str], benign: Sequence[str], batch_size: int = 8,
                      max_length: int | None = 256) -> dict:
    """The direction, its layer and the record of both: ``{"layer", "vector" (torch float32 [hidden]),
    "norm", "layer_scores", "rule", "n_harmful", "n_benign"}``."""
    h = last_token_resid(aligned, harmful, batch_size, max_length)
    b = last_token_resid(aligned, benign, batch_size, max_length)
    layer, scores = choose_layer(h, b)
    vector = h[:, layer].mean(0) - b[:, layer].mean(0)
    return {"layer": layer, "vector": torch.tensor(vector, dtype=torch.float32), "norm": float(np.linalg.norm(vector)),
            "layer_scores": [round(s, 4) for s in scores], "rule": LAYER_RULE, "n_harmful": len(harmful),
            "n_benign": len(benign), "num_layers": num_layers(aligned.model)}
