"""Dynamic activation patching cost on the default model, against plain greedy generation of the base model.

    python benchmarks/bench_patch.py [--per-class 8] [--random-sets 20] [--scores runs/default/contrast]
                                     [--directions sufficiency,necessity] [--threads 2]

Aligned model: the default twin (`twin:default`) when it has been built, else a copy of the base with every
weight perturbed by seeded Gaussian noise (1% of each tensor's std); the output says which. Neurons: the top 5%
of the change scores in --scores when given (e.g. runs/default/contrast), else 5% of the `mlp_out` neurons drawn
with the layer profile of the README's default run (most in the last layers).
Prompts: the first --per-class harmful and benign prompts of the default `test` split (fixed hash order).

Baseline (same run, same prompts): Hugging Face `generate`, greedy, 32 new tokens, batches of --batch-size,
for the base model. Then `causal.run_patch` with the default settings (both directions, 20 random sets, mean
and zero baselines, perplexity) on the same prompts. Prints both times, their ratio, the patch run's own
split (setup = both models' plain generations and perplexities; then each direction), and the time the
default slice (100 + 100 prompts) would take at the measured rate.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import numpy as np
import torch


def load_aligned(base, pair):
    from safetyneurons.errors import UserError

    try:
        return pair.load_model(pair.DEFAULT_ALIGNED), "default twin (twin:default)"
    except (UserError, ImportError) as e:
        print(f"[bench] default twin unavailable ({str(e)[:100]}...); using a perturbed copy of the base",
              file=sys.stderr)
    model = copy.deepcopy(base.model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.01 * p.float().std().to(p.dtype))
    return pair.from_objects(model, base.tokenizer, ref="perturbed-copy-of-base"), "copy of the base, 1% weight noise"


def neurons_for(base, scores_dir):
    from safetyneurons.neurons.contrast import ChangeScores
    from safetyneurons.model.hooks import hook_width, num_layers
    from safetyneurons.neurons.selection import select

    if scores_dir:
        return ChangeScores.load(scores_dir), f"change scores in {scores_dir}"
    layers, width = num_layers(base.model), hook_width(base.model, "mlp_out")
    rng = np.random.default_rng(0)
    profile = np.linspace(0.05, 1.0, layers) ** 6  # concentrated in the last layers, as in the default run
    scores = rng.random((layers, width)) * profile[:, None]
    return select(scores, top_percent=5, hook_point="mlp_out"), "synthetic 5% of mlp_out, late-layer profile"


@torch.no_grad()
def hf_generate(lm, prompts, batch_size, tokens):
    from transformers import GenerationConfig

    from safetyneurons.causal.patch import stop_token_ids

    config = GenerationConfig(do_sample=False, max_new_tokens=tokens, eos_token_id=stop_token_ids(lm),
                              pad_token_id=lm.tokenizer.pad_token_id)
    for start in range(0, len(prompts), batch_size):
        enc = lm.encode(prompts[start:start + batch_size], padding_side="left")
        lm.model.generate(**enc, generation_config=config)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=8)
    ap.add_argument("--random-sets", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--directions", default="sufficiency,necessity")
    ap.add_argument("--scores", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from safetyneurons.model import pair
    from safetyneurons.causal.causal import PatchSettings, load_prompts, run_patch

    base = pair.load_model(pair.DEFAULT_BASE)
    aligned, what = load_aligned(base, pair)
    neurons, where = neurons_for(base, args.scores)
    harmful, benign, _ = load_prompts("split:test", args.per_class)
    prompts = harmful + benign
    print(f"aligned: {what}; neurons: {where}; {len(harmful)} + {len(benign)} prompts; threads "
          f"{torch.get_num_threads()}")

    t0 = time.perf_counter()
    hf_generate(base, prompts, 16, 32)
    baseline = time.perf_counter() - t0
    settings = PatchSettings(random_sets=args.random_sets, per_class=args.per_class, batch_size=args.batch_size,
                             directions=args.directions)
    t0 = time.perf_counter()
    result = run_patch(base, aligned, neurons, harmful, benign, settings=settings, progress=False)
    patched = time.perf_counter() - t0
    print(f"baseline (HF generate, base model, 32 tokens): {baseline:.1f} s")
    print(f"patch run ({', '.join(settings.directions)}; {args.random_sets} random sets + mean + zero): "
          f"{patched:.1f} s = {patched / baseline:.1f}x the baseline; split: {result['timings']}")
    scale = 200 / len(prompts)
    print(f"default slice (100 + 100 prompts) at this rate: {patched * scale / 60:.1f} min")


if __name__ == "__main__":
    main()
