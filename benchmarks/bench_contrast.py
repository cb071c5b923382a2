"""Contrasting speed and memory on the default model, against a bare forward pass of both models.

    python benchmarks/bench_contrast.py [--n 100] [--batch-size 8] [--hook-point mlp_neurons] [--threads 1]
                                        [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                                        [--random-config qwen3-4b [--layers N]]

``--random-config qwen3-4b`` contrasts a random Qwen3-4B-shaped model (``from_config``, no weights needed)
against a copy with 1% Gaussian weight noise; on a GPU: ``--device cuda --dtype bfloat16 --n 256 --batch-size 32``.

Aligned model: the default twin (`twin:default`) when it has been built, else a copy of the base with every
weight perturbed by seeded Gaussian noise (1% of each tensor's std); the output says which.
Prompts: the first N of the default `contrast` split.

Baseline (measured in the same run, same prompts, same length-sorted batches, same batch size): tokenize
each batch and run the decoder stack of both models with no hooks. Contrast: the same batches through
contrast's own per-batch path (tokenize, choose tokens, both forwards with hooks, gather, float64
accumulate). Each batch is timed bare, contrast, contrast, bare and the best of each pair is kept, so
load spikes from other processes on a shared machine hit both alike and mostly drop out; the ratio is
sum(contrast) / sum(bare) over batches. The reference approach (a re-implementation: both full causal-LM
forwards, LM head included, every layer's full hook tensor copied to the CPU, float32 squared differences
summed there over all tokens, pads included) runs on the same batches, timed the same way. Then one
end-to-end `contrast.contrast` call is timed for prompts/s. Peak RSS is the process high-water mark
(ru_maxrss) after each stage.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _models import add_model_args, build_lm, describe, perturbed_copy, sync  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def load_aligned(base, pair, args):
    from safetyneurons.errors import UserError

    try:
        return (pair.load_model(pair.DEFAULT_ALIGNED, dtype=args.dtype, device=args.device),
                "default twin (twin:default)")
    except (UserError, ImportError) as e:
        print(f"[bench] default twin unavailable ({str(e)[:120]}...); using a perturbed copy of the base",
              file=sys.stderr)
    return perturbed_copy(base), "copy of the base with 1% Gaussian weight noise (default twin not built)"


@torch.no_grad()
def bare_forward(base, aligned, prompts, batch_size, max_length, order):
    """Tokenize and run both decoder stacks on the same batches as contrast, nothing captured."""
    from safetyneurons.model.hooks import position_ids_from_mask

    for start in range(0, len(order), batch_size):
        batch = [prompts[i] for i in order[start:start + batch_size]]
        enc = aligned.encode(batch, max_length=max_length, padding_side="right")
        pos = position_ids_from_mask(enc["attention_mask"])
        for lm in (base, aligned):
            dev = lm.device
            lm.model.get_decoder()(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev),
                                   position_ids=pos.to(dev), use_cache=False)


@torch.no_grad()
def reference_contrast(base, aligned, prompts, idx, max_length, hook_point, sums: dict) -> None:
    """The reference approach on one batch: full tensors to the CPU, differences there, pads included."""
    from safetyneurons.model.hooks import attached_hooks

    batch = [prompts[i] for i in idx]
    enc = aligned.tokenizer([aligned.format(p) for p in batch], return_tensors="pt", padding=True,
                            truncation=True, max_length=max_length, add_special_tokens=not aligned.chat_template)
    acts = []
    for lm in (base, aligned):
        kept: dict[int, torch.Tensor] = {}
        with attached_hooks(lm.model, hook_point, lambda l, t: kept.__setitem__(l, t.detach().cpu().clone())):
            lm.model(**{k: v.to(lm.device) for k, v in enc.items()})
        acts.append(kept)
    for layer, a in acts[0].items():
        d = (a.float() - acts[1][layer].float()).reshape(-1, a.shape[-1])
        sums[layer] = sums.get(layer, 0) + d.square().sum(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="number of prompts")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--hook-point", default="mlp_neurons")
    ap.add_argument("--positions", default="prompt")
    add_model_args(ap)
    ap.add_argument("--no-reference", action="store_true", help="skip timing the reference approach")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice); 1 is steadier on a shared machine")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from safetyneurons.data import splits as data

    from safetyneurons.model import pair
    from safetyneurons.model.tokens import length_order, tokenize_prompts
    from safetyneurons.neurons.contrast import contrast

    prompts = [r["prompt"] for r in data.read_records(data.default_splits_dir() / "contrast.jsonl")
               if r["label"] == 1][: args.n]
    rss0 = peak_rss_mib()
    t0 = time.perf_counter()
    if args.random_config:
        base = build_lm(args, prompts)
        aligned, which = perturbed_copy(base), "copy of the random model with 1% Gaussian weight noise"
    else:
        base = pair.load_model(pair.DEFAULT_BASE, dtype=args.dtype, device=args.device)
        aligned, which = load_aligned(base, pair, args)
    print(f"models loaded in {time.perf_counter() - t0:.1f}s; aligned = {which}")
    rss_loaded = peak_rss_mib()
    order = length_order(tokenize_prompts(aligned, prompts, args.max_length).lengths)
    n_tokens = sum(int(aligned.encode([p], max_length=args.max_length)["attention_mask"].sum()) for p in prompts)

    # warm-up (allocator, kernels) on one batch each
    bare_forward(base, aligned, prompts, args.batch_size, args.max_length, order[: args.batch_size])
    contrast(base, aligned, prompts[: args.batch_size], hook_point=args.hook_point, positions=args.positions,
             batch_size=args.batch_size, max_length=args.max_length, progress=False)

    from safetyneurons.neurons.contrast import _accumulate, _select_prompt
    from safetyneurons.model.hooks import hook_width

    sum_sq = torch.zeros(aligned.info["num_layers"], hook_width(base.model, args.hook_point), dtype=torch.float64,
                         device=aligned.device)
    ref_sums: dict = {}
    bare_times, contrast_times, ref_times = [], [], []  # per batch: the best of two runs each, in A-B-B-A order
    batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    for idx in batches:
        def run_bare():
            bare_forward(base, aligned, prompts, args.batch_size, args.max_length, idx)

        def run_contrast():
            enc = aligned.encode([prompts[i] for i in idx], max_length=args.max_length, padding_side="right")
            select = _select_prompt(enc["attention_mask"], args.positions)
            _accumulate(base, aligned, enc["input_ids"], enc["attention_mask"], select, args.hook_point, sum_sq)

        def run_reference():
            reference_contrast(base, aligned, prompts, idx, args.max_length, args.hook_point, ref_sums)

        runs = {"bare": [], "contrast": [], "reference": []}
        plan = (("bare", run_bare), ("contrast", run_contrast), ("contrast", run_contrast), ("bare", run_bare))
        if not args.no_reference:
            plan += (("reference", run_reference),)
        for name, fn in plan:
            t = time.perf_counter()
            fn()
            sync(args.device)
            runs[name].append(time.perf_counter() - t)
        bare_times.append(min(runs["bare"]))
        contrast_times.append(min(runs["contrast"]))
        ref_times.append(min(runs["reference"], default=0.0))
    rss_interleaved = peak_rss_mib()

    t = time.perf_counter()
    scores = contrast(base, aligned, prompts, hook_point=args.hook_point, positions=args.positions,
                      batch_size=args.batch_size, max_length=args.max_length, progress=False)
    sync(args.device)
    t_end_to_end = time.perf_counter() - t
    rss_contrast = peak_rss_mib()

    tb, tc = sum(bare_times), sum(contrast_times)
    ratios = sorted(c / b for c, b in zip(contrast_times, bare_times))
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"model: {describe(args) if args.random_config else pair.DEFAULT_BASE + f' ({args.dtype})'}")
    print(f"device: {device}, torch threads: {torch.get_num_threads()}, torch {torch.__version__}, "
          f"load average at end: {os.getloadavg()[0]:.1f}")
    print(f"prompts: {len(prompts)} ({n_tokens} tokens, chat template {aligned.chat_template}), batch size "
          f"{args.batch_size}, hook point {args.hook_point}, positions {args.positions}, "
          f"{scores.num_layers}x{scores.width} neurons, {scores.token_count} tokens contrasted")
    print(f"bare forward, both models: {tb:7.2f}s  {len(prompts) / tb:6.2f} prompts/s")
    print(f"contrast per-batch path  : {tc:7.2f}s  {len(prompts) / tc:6.2f} prompts/s")
    print(f"ratio contrast / bare: {tc / tb:.3f}x (sum of per-batch best times), median per-batch "
          f"{ratios[len(ratios) // 2]:.3f}x, range {ratios[0]:.2f}-{ratios[-1]:.2f}x (goal <= 1.15x)")
    if not args.no_reference:
        tr = sum(ref_times)
        print(f"reference approach       : {tr:7.2f}s  {len(prompts) / tr:6.2f} prompts/s  ({tr / tb:.2f}x bare; "
              f"contrast is {tr / tc:.2f}x faster)")
    print(f"contrast() end to end: {t_end_to_end:7.2f}s  {len(prompts) / t_end_to_end:6.2f} prompts/s "
          f"(includes the length-sorting pass; not interleaved, so exposed to load swings)")
    print(f"peak RSS MiB: start {rss0:.0f}, models loaded {rss_loaded:.0f}, after interleaved runs "
          f"{rss_interleaved:.0f}, after contrast() {rss_contrast:.0f}")


if __name__ == "__main__":
    main()
