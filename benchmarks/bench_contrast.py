"""Contrasting speed and memory on the default model, against a bare forward pass of both models.

    python benchmarks/bench_contrast.py [--n 100] [--batch-size 8] [--hook-point mlp_neurons] [--threads 1]

Aligned model: the default twin (`twin:default`) when it has been built, else a copy of the base with every
weight perturbed by seeded Gaussian noise (1% of each tensor's std); the output says which.
Prompts: the first N of the default `contrast` split.

Baseline (measured in the same run, same prompts, same length-sorted batches, same batch size): tokenize
each batch and run the decoder stack of both models with no hooks. Contrast: the same batches through
contrast's own per-batch path (tokenize, choose tokens, both forwards with hooks, gather, float64
accumulate). Each batch is timed bare, contrast, contrast, bare and the best of each pair is kept, so
load spikes from other processes on a shared machine hit both alike and mostly drop out; the ratio is
sum(contrast) / sum(bare) over batches. Then one
end-to-end `contrast.contrast` call is timed for prompts/s. Peak RSS is the process high-water mark
(ru_maxrss) after each stage.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import sys
import time

import torch


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def load_aligned(base, pair):
    from safetyneurons.errors import UserError

    try:
        return pair.load_model(pair.DEFAULT_ALIGNED), "default twin (twin:default)"
    except (UserError, ImportError) as e:
        print(f"[bench] default twin unavailable ({str(e)[:120]}...); using a perturbed copy of the base",
              file=sys.stderr)
    model = copy.deepcopy(base.model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.01 * p.float().std().to(p.dtype))
    return pair.from_objects(model, base.tokenizer, ref="perturbed-copy-of-base"), \
        "copy of the base with 1% Gaussian weight noise (default twin not built)"


@torch.no_grad()
def bare_forward(base, aligned, prompts, batch_size, max_length, order):
    """Tokenize and run both decoder stacks on the same batches as contrast, nothing captured."""
    from safetyneurons.hooks import position_ids_from_mask

    for start in range(0, len(order), batch_size):
        batch = [prompts[i] for i in order[start:start + batch_size]]
        enc = aligned.encode(batch, max_length=max_length, padding_side="right")
        pos = position_ids_from_mask(enc["attention_mask"])
        for lm in (base, aligned):
            lm.model.get_decoder()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                   position_ids=pos, use_cache=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="number of prompts")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--hook-point", default="mlp_neurons")
    ap.add_argument("--positions", default="prompt")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice); 1 is steadier on a shared machine")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from safetyneurons import data, pair
    from safetyneurons.contrast import _length_order, contrast

    prompts = [r["prompt"] for r in data.read_records(data.default_splits_dir() / "contrast.jsonl")
               if r["label"] == 1][: args.n]
    rss0 = peak_rss_mib()
    t0 = time.perf_counter()
    base = pair.load_model(pair.DEFAULT_BASE)
    aligned, which = load_aligned(base, pair)
    print(f"models loaded in {time.perf_counter() - t0:.1f}s; aligned = {which}")
    rss_loaded = peak_rss_mib()
    order = _length_order(aligned, prompts, args.max_length)
    n_tokens = sum(int(aligned.encode([p], max_length=args.max_length)["attention_mask"].sum()) for p in prompts)

    # warm-up (allocator, kernels) on one batch each
    bare_forward(base, aligned, prompts, args.batch_size, args.max_length, order[: args.batch_size])
    contrast(base, aligned, prompts[: args.batch_size], hook_point=args.hook_point, positions=args.positions,
             batch_size=args.batch_size, max_length=args.max_length, progress=False)

    from safetyneurons.contrast import _accumulate, _select_prompt
    from safetyneurons.hooks import hook_width

    sum_sq = torch.zeros(aligned.info["num_layers"], hook_width(base.model, args.hook_point), dtype=torch.float64)
    bare_times, contrast_times = [], []  # per batch: the best of two runs each, in A-B-B-A order
    batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    for idx in batches:
        def run_bare():
            bare_forward(base, aligned, prompts, args.batch_size, args.max_length, idx)

        def run_contrast():
            enc = aligned.encode([prompts[i] for i in idx], max_length=args.max_length, padding_side="right")
            select = _select_prompt(enc["attention_mask"], args.positions)
            _accumulate(base, aligned, enc["input_ids"], enc["attention_mask"], select, args.hook_point, sum_sq)

        runs = {"bare": [], "contrast": []}
        for name, fn in (("bare", run_bare), ("contrast", run_contrast), ("contrast", run_contrast),
                         ("bare", run_bare)):
            t = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t)
        bare_times.append(min(runs["bare"]))
        contrast_times.append(min(runs["contrast"]))
    rss_interleaved = peak_rss_mib()

    t = time.perf_counter()
    scores = contrast(base, aligned, prompts, hook_point=args.hook_point, positions=args.positions,
                      batch_size=args.batch_size, max_length=args.max_length, progress=False)
    t_end_to_end = time.perf_counter() - t
    rss_contrast = peak_rss_mib()

    tb, tc = sum(bare_times), sum(contrast_times)
    ratios = sorted(c / b for c, b in zip(contrast_times, bare_times))
    print(f"device: cpu, torch threads: {torch.get_num_threads()}, torch {torch.__version__}, "
          f"load average at end: {os.getloadavg()[0]:.1f}")
    print(f"prompts: {len(prompts)} ({n_tokens} tokens, chat template {aligned.chat_template}), batch size "
          f"{args.batch_size}, hook point {args.hook_point}, positions {args.positions}, "
          f"{scores.num_layers}x{scores.width} neurons, {scores.token_count} tokens contrasted")
    print(f"bare forward, both models: {tb:7.2f}s  {len(prompts) / tb:6.2f} prompts/s")
    print(f"contrast per-batch path  : {tc:7.2f}s  {len(prompts) / tc:6.2f} prompts/s")
    print(f"ratio contrast / bare: {tc / tb:.3f}x (sum of per-batch best times), median per-batch "
          f"{ratios[len(ratios) // 2]:.3f}x, range {ratios[0]:.2f}-{ratios[-1]:.2f}x (goal <= 1.15x)")
    print(f"contrast() end to end: {t_end_to_end:7.2f}s  {len(prompts) / t_end_to_end:6.2f} prompts/s "
          f"(includes the length-sorting pass; not interleaved, so exposed to load swings)")
    print(f"peak RSS MiB: start {rss0:.0f}, models loaded {rss_loaded:.0f}, after interleaved runs "
          f"{rss_interleaved:.0f}, after contrast() {rss_contrast:.0f}")


if __name__ == "__main__":
    main()
