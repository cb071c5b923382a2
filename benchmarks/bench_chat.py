"""Guarded generation overhead: time to first token (TTFT) with the guard on vs off, and a two-model contrast.

Three arms, timed on the same prompts in one run, interleaved (the order rotates per prompt) so all see the
same machine load. Each arm goes from the chat messages to the first token id:

- ``off``        the model alone: tokenize, prefill with a KV cache, pick the first token
                 (``GuardedChat(mode="off")``);
- ``guarded``    the same prefill with the guard reading the safety neurons on the way and its probe scoring
                 them (``GuardedChat(mode="monitor")``: the work of an unflagged prompt in ``block`` mode; a
                 flagged one stops earlier and is faster);
- ``two-model``  a Llama-Guard-style setup: a separate guard model (here a second copy of the same model, so
                 a guard no larger than the chat model, which favours this arm) reads the prompt in a full
                 forward pass and picks its verdict token, then the chat model prefills as in ``off``.

Prints p50/p95 per arm and the ratios to ``off``; the goal is guarded/off <= 1.03 (p50). ``--json FILE``
also writes the figures.

Guards (as in bench_guard.py):
    --guard DIR                 an exported guard (default: runs/default/guard, as `safetyneurons run` writes)
    --throwaway tiny            a throwaway guard on a tiny random model (quick self-check; its prefill is so
                                short that fixed costs dominate, so its ratio says little)
    --throwaway REF             a throwaway guard on model REF with random neurons in layers 0..--deepest-layer

    python benchmarks/bench_chat.py --throwaway tiny --repeats 3
    python benchmarks/bench_chat.py --guard runs/default/guard --repeats 10
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_guard import PROMPTS, build_throwaway, pct  # noqa: E402

GOAL = 1.03
GUARD_TEMPLATE = ("Task: check whether the user's message is unsafe. Answer 'safe' or 'unsafe'.\n\n"
                  "User: {prompt}\n\nVerdict:")


def bench(guard_dir: Path, prompts: list[str], repeats: int, device: str) -> dict:
    import torch

    from safetyneurons.guard.chat import GuardedChat, SamplingSettings, normalize_messages
    from safetyneurons.guard.guard import Guard
    from safetyneurons.model.pair import load_model

    g = Guard.load(guard_dir, device=device)
    off, guarded = GuardedChat(g, mode="off"), GuardedChat(g, mode="monitor")
    judge = load_model(g.meta["model"]["ref"], device=device)  # the separate guard model of the contrast
    greedy = SamplingSettings(temperature=0)

    def first_token(chat, messages):
        return chat.pick(chat.prefill(normalize_messages(messages)).logits, greedy)

    def run_off(messages):
        return first_token(off, messages)

    def run_guarded(messages):
        return first_token(guarded, messages)

    def run_two_model(messages):
        text = GUARD_TEMPLATE.format(prompt=messages[-1]["content"])
        enc = judge.encode([text])
        with torch.inference_mode():
            out = judge.model(**{k: v.to(judge.device) for k, v in enc.items()}, logits_to_keep=1)
        int(out.logits[0, -1].argmax())  # the verdict token (forces the pass to finish)
        return first_token(off, messages)

    arms = {"off": run_off, "guarded": run_guarded, "two-model": run_two_model}
    names = list(arms)
    times: dict[str, list[float]] = {n: [] for n in names}
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    for m in conversations[:3]:  # warm up every arm
        for fn in arms.values():
            fn(m)
    for r in range(repeats):
        for k, m in enumerate(conversations):
            shift = (r + k) % len(names)
            for n in names[shift:] + names[:shift]:
                t0 = time.perf_counter()
                arms[n](m)
                times[n].append((time.perf_counter() - t0) * 1000.0)
    res = {"guard": g.name, "model": g.meta["model"]["ref"], "device": device, "layers_run": g.layers_run,
           "num_layers": g.lm.info["num_layers"], "classifier": g.meta["classifier"], "prompts": len(prompts),
           "repeats": repeats, "n_timings": len(times["off"]),
           "guard_ms_p50": pct([guarded.prefill(normalize_messages(m)).guard_ms for m in conversations], 50)}
    for n in names:
        res[f"{n}_p50_ms"], res[f"{n}_p95_ms"] = pct(times[n], 50), pct(times[n], 95)
    res["ratio_guarded_p50"] = res["guarded_p50_ms"] / res["off_p50_ms"]
    res["ratio_guarded_p95"] = res["guarded_p95_ms"] / res["off_p95_ms"]
    res["ratio_two_model_p50"] = res["two-model_p50_ms"] / res["off_p50_ms"]
    res["goal"] = f"guarded/off p50 <= {GOAL}"
    res["goal_met"] = res["ratio_guarded_p50"] <= GOAL
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--guard", type=Path, default=None)
    ap.add_argument("--throwaway", default=None, metavar="tiny|REF")
    ap.add_argument("--deepest-layer", type=int, default=None)
    ap.add_argument("--count", type=int, default=864, help="neurons of a throwaway guard")
    ap.add_argument("--hook-point", default="mlp_out")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if a.throwaway:
            guard_dir = build_throwaway(a.throwaway, Path(tmp), a.deepest_layer, a.count, a.hook_point)
        else:
            guard_dir = a.guard or Path("runs/default/guard")
        res = bench(guard_dir, PROMPTS, a.repeats, a.device)
    print(f"guard {res['guard']} on {res['model']} ({res['device']}), {res['layers_run']} of {res['num_layers']} "
          f"layers hooked, {res['classifier']}; {res['n_timings']} timings per arm")
    print(f"{'arm':<10} {'TTFT p50 ms':>12} {'p95 ms':>9} {'x off (p50)':>12}")
    for n in ("off", "guarded", "two-model"):
        print(f"{n:<10} {res[f'{n}_p50_ms']:>12.2f} {res[f'{n}_p95_ms']:>9.2f} "
              f"{res[f'{n}_p50_ms'] / res['off_p50_ms']:>12.3f}")
    print(f"guard work inside the prefill (pool + probe), p50: {res['guard_ms_p50']:.3f} ms")
    print(f"overhead ratio guarded/off (p50) = {res['ratio_guarded_p50']:.3f} "
          f"({'meets' if res['goal_met'] else 'MISSES'} the goal <= {GOAL})")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
