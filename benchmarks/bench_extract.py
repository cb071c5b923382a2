"""Activation extraction speed, memory and storage: ours vs a bare forward pass vs the reference approach.

All methods run on the same prompts with the same batch size and the same loaded model:

- ``bare``: the decoder stack only (no LM head, no hooks), over the same length-sorted batches we use;
- ``pooled``: ``safetyneurons.activations.store.pooled_features``, every neuron at the hook point, pooled in memory;
- ``ours_all``: ``safetyneurons.activations.store.extract``, every neuron at the hook point, float16 shards + manifest
  (cast, hash and write on the background writer thread);
- ``ours_set_all_layers``: ``extract`` with a neuron set spread over all layers (5% of each layer, seeded);
- ``ours_set_first_half``: ``extract`` with a neuron set in the first half of the layers (early exit after it);
- ``reference``: a re-implementation of the reference student project's approach: forward hooks on every
  layer's MLP keeping full ``[batch, tokens, hidden]`` tensors on CPU, the full causal-LM forward (LM head
  included), batches in input order, a mean over all tokens INCLUDING pads, and one CSV row per prompt with
  every layer's pooled vector. pandas is not installed, so the CSV is written with the stdlib ``csv`` module
  (``repr`` of each float, as ``DataFrame.to_csv`` writes them).

Timing: one process runs every method ``--repeats`` times round-robin after a warm-up pass, and keeps the
best time of each (on a shared machine, load drift then hits every method alike). Memory: each method runs
once more in its own process, which reports its peak RSS (``ru_maxrss``) and the RSS right after loading the
model. Bytes on disk: everything the method wrote (ours: shards + manifest.json + records.jsonl, the latter
holding the prompt texts) and, in brackets, the feature files only (shards, or the CSV).

Every method runs on ``--device`` in ``--dtype`` (the reference approach too: its full tensors then travel
device-to-host). GPU times are taken after ``torch.cuda.synchronize()``.

Usage (defaults: the default model, 32 prompts of the default test split, mlp_out, batch 16, CPU float32)::

    python benchmarks/bench_extract.py [--model REF] [--data split:test] [--limit 32] [--batch-size 16]
                                       [--hook-point mlp_out] [--repeats 3] [--methods bare,ours_all,...]
                                       [--device cpu|cuda] [--dtype float32|bfloat16|float16]
                                       [--random-config qwen3-4b [--layers N]]

The seed's scale on a GPU: ``--random-config qwen3-4b --device cuda --dtype bfloat16 --limit 512 --batch-size 32``
(a Qwen3-4B-shaped model from ``from_config``, no weights needed). On a CPU add ``--layers 2`` to smoke-test.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("bare", "pooled", "ours_all", "ours_set_all_layers", "ours_set_first_half", "reference")
sys.path.insert(0, str(Path(__file__).parent))
from _models import add_model_args, build_lm, describe, model_args, sync  # noqa: E402


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def synthetic_set(hook_point: str, n_layers: int, width: int, layers, share: float, seed: int):
    import numpy as np

    from safetyneurons.neurons.selection import NeuronSet

    rng = np.random.default_rng(seed)
    k = max(1, int(round(share * width)))
    ls, idx = [], []
    for l in layers:
        ls += [l] * k
        idx += sorted(rng.choice(width, size=k, replace=False).tolist())
    return NeuronSet(hook_point=hook_point, num_layers=n_layers, width=width, layers=ls, indices=idx,
                     scores=[0.0] * len(ls))


def run_method(method: str, lm, records: list[dict], tmp: Path, args) -> None:
    """Run one method once, writing whatever it stores under ``tmp``."""
    import numpy as np
    import torch

    from safetyneurons.model.hooks import decoder_layers, hook_width, num_layers, position_ids_from_mask
    from safetyneurons.activations.reader import pooled_features, token_counts
    from safetyneurons.activations.store import extract

    prompts = [r["prompt"] for r in records]
    n_layers, width = num_layers(lm.model), hook_width(lm.model, args.hook_point)
    if method == "bare":
        lengths = token_counts(lm, prompts, args.max_length)
        order = np.argsort(-lengths, kind="stable")
        body = lm.model.get_decoder()
        with torch.no_grad():
            for s in range(0, len(order), args.batch_size):
                enc = lm.encode([prompts[i] for i in order[s:s + args.batch_size]], max_length=args.max_length)
                body(input_ids=enc["input_ids"].to(lm.device), attention_mask=enc["attention_mask"].to(lm.device),
                     position_ids=position_ids_from_mask(enc["attention_mask"]).to(lm.device), use_cache=False)
    elif method == "pooled":
        pooled_features(lm, prompts, args.hook_point, "mean", batch_size=args.batch_size, max_length=args.max_length)
    elif method.startswith("ours"):
        ns = None
        if method != "ours_all":
            layers = range(n_layers) if method == "ours_set_all_layers" else range(n_layers // 2)
            ns = synthetic_set(args.hook_point, n_layers, width, layers, 0.05, seed=0)
        extract(lm, records, tmp / "store", hook_point=args.hook_point, pooling="mean", neuron_set=ns,
                shard_size=256, dtype="float16", batch_size=args.batch_size, max_length=args.max_length,
                progress=False)
    elif method == "reference":
        if args.hook_point != "mlp_out":
            raise SystemExit("the reference approach hooks the MLP output: use --hook-point mlp_out")
        blocks = decoder_layers(lm.model)
        with open(tmp / "activations.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", "label"] + [f"L{l}_{i}" for l in range(n_layers) for i in range(width)])
            for s in range(0, len(records), args.batch_size):
                batch = records[s:s + args.batch_size]
                kept: dict[int, torch.Tensor] = {}
                hooks = [blocks[l].mlp.register_forward_hook(
                    lambda _m, _a, out, l=l: kept.__setitem__(l, out.detach().cpu().clone()))
                    for l in range(n_layers)]
                try:
                    enc = lm.tokenizer([lm.format(r["prompt"]) for r in batch], return_tensors="pt", padding=True,
                                       truncation=True, max_length=args.max_length,
                                       add_special_tokens=not lm.chat_template)
                    with torch.no_grad():
                        lm.model(**{k: v.to(lm.device) for k, v in enc.items()})
                finally:
                    for h in hooks:
                        h.remove()
                pooled = torch.cat([kept[l].float().mean(dim=1) for l in range(n_layers)], dim=1)  # pads included
                for r, row in zip(batch, pooled.tolist()):
                    writer.writerow([r["id"], r["label"]] + row)
    else:
        raise SystemExit(f"unknown method {method}")
    sync(args.device)


def sizes(tmp: Path) -> tuple[int, int]:
    files = [p for p in tmp.rglob("*") if p.is_file()]
    return (sum(p.stat().st_size for p in files),
            sum(p.stat().st_size for p in files if p.suffix in (".safetensors", ".csv")))


def worker(args) -> dict:
    import torch

    from safetyneurons.model.pair import load_model

    records = json.loads(Path(args.records).read_text())
    lm = build_lm(args, [r["prompt"] for r in records])
    after_load = rss_mb()
    gpu = args.device == "cuda"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    methods = args.methods.split(",")
    if args.worker == "timing":
        tmp = Path(tempfile.mkdtemp(prefix="bench_extract_"))
        run_method("bare", lm, records[: args.batch_size], tmp, args)  # warm-up (allocator, kernels)
        shutil.rmtree(tmp, ignore_errors=True)
        times: dict[str, list[float]] = {m: [] for m in methods}
        for rep in range(args.repeats):
            for m in methods:
                tmp = Path(tempfile.mkdtemp(prefix="bench_extract_"))
                t0 = time.perf_counter()
                run_method(m, lm, records, tmp, args)
                times[m].append(time.perf_counter() - t0)
                shutil.rmtree(tmp, ignore_errors=True)
                print(f"  run {rep + 1}: {m:22s} {times[m][-1]:7.2f} s", file=sys.stderr, flush=True)
        return {"times": times, "threads": torch.get_num_threads(),
                "device_name": torch.cuda.get_device_name() if gpu else "cpu"}
    tmp = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    run_method(args.worker, lm, records, tmp, args)
    total, features = sizes(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_after_load_mb": after_load,
            "bytes_on_disk": total, "feature_bytes": features,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if gpu else None}


def spawn(args, worker_name: str, rec_path: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", worker_name, "--records", str(rec_path), "--model", args.model,
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--hook-point",
           args.hook_point, "--repeats", str(args.repeats), "--methods", args.methods, *model_args(args)]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode != 0:
        raise SystemExit(f"worker {worker_name} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model ref (default: safetyneurons.model.pair.DEFAULT_BASE)")
    ap.add_argument("--data", default="split:test", help="labelled split/file (default: split:test)")
    ap.add_argument("--limit", type=int, default=32, help="number of prompts (default 32)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--hook-point", default="mlp_out")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--no-memory", action="store_true", help="skip the per-method memory/storage processes")
    add_model_args(ap)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--records", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        from safetyneurons.model.pair import DEFAULT_BASE

        args.model = DEFAULT_BASE
    if args.worker:
        print(json.dumps(worker(args)))
        return

    from safetyneurons.data.splits import read_records
    from safetyneurons.model.pair import load_model

    records = [{k: r[k] for k in ("id", "prompt", "label")} for r in read_records(args.data)[: args.limit]]
    tmpdir = Path(tempfile.mkdtemp(prefix="bench_extract_records_"))
    rec_path = tmpdir / "records.json"
    rec_path.write_text(json.dumps(records))
    if not args.random_config:
        load_model(args.model)  # convert/cache once before measuring anything
    methods = args.methods.split(",")
    timing = spawn(args, "timing", rec_path)
    none = {"peak_rss_mb": float("nan"), "rss_after_load_mb": float("nan"), "bytes_on_disk": 0, "feature_bytes": 0,
            "peak_gpu_mb": float("nan")}
    mem = {m: none if args.no_memory else spawn(args, m, rec_path) for m in methods}
    shutil.rmtree(tmpdir, ignore_errors=True)

    n = len(records)
    best = {m: min(timing["times"][m]) for m in methods}
    print(f"\nmodel {describe(args)} on {timing['device_name']}\n{n} prompts from {args.data}, batch size {args.batch_size}, max length "
          f"{args.max_length}, hook point {args.hook_point}, torch threads {timing['threads']}, best of "
          f"{args.repeats} round-robin runs\n")
    print("| method | prompts/s | time vs bare forward | all runs (s) | peak RSS MiB (after load) | "
          "bytes on disk / prompt (features only) |")
    print("|---|---:|---:|---|---:|---:|")
    bare = best.get("bare")
    for m in methods:
        r = mem[m]
        ratio = f"{best[m] / bare:.2f}x" if bare else "n/a"
        runs = ", ".join(f"{t:.1f}" for t in timing["times"][m])
        per = f"{r['bytes_on_disk'] / n:,.0f} ({r['feature_bytes'] / n:,.0f})" if r["bytes_on_disk"] else "0"
        print(f"| {m} | {n / best[m]:.2f} | {ratio} | {runs} | {r['peak_rss_mb']:.0f} ({r['rss_after_load_mb']:.0f}) "
              f"| {per} |")
    if "reference" in methods and "ours_all" in methods and not args.no_memory:
        ref, ours = mem["reference"], mem["ours_all"]
        print(f"\nreference / ours_all: time {best['reference'] / best['ours_all']:.2f}x, storage "
              f"{ref['bytes_on_disk'] / max(ours['bytes_on_disk'], 1):.1f}x (features only "
              f"{ref['feature_bytes'] / max(ours['feature_bytes'], 1):.1f}x), peak RSS above load "
              f"{(ref['peak_rss_mb'] - ref['rss_after_load_mb']) / max(ours['peak_rss_mb'] - ours['rss_after_load_mb'], 1):.2f}x")
    if bare:
        names = {"pooled": "in-memory pooling (all neurons)", "ours_all": "extract to disk (all neurons)",
                 "ours_set_all_layers": "neuron set reaching the last layer", "ours_set_first_half":
                 "early exit (neuron set in the first half)", "reference": "reference approach"}
        print("\ntime vs a bare forward pass: " + ", ".join(f"{names.get(m, m)} {best[m] / bare:.2f}x"
                                                         for m in methods if m != "bare"))
    if "reference" in methods and "ours_all" in methods:
        print(f"extract to disk is {best['reference'] / best['ours_all']:.2f}x faster than the reference approach "
              f"(goal >= 5x on GPU); ours_all / bare forward {best['ours_all'] / bare:.3f}x (goal <= 1.10x)")
    if timing["device_name"] != "cpu":
        print("peak GPU memory MiB: " + ", ".join(f"{m} {mem[m]['peak_gpu_mb']:.0f}" for m in methods))


if __name__ == "__main__":
    main()
