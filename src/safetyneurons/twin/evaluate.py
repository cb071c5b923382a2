"""Refusal evaluation of base and twin on held-out prompts, and the before/after table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from safetyneurons.model.judge import REFUSAL_PHRASES, WINDOW, judge
from safetyneurons.twin.data import data_sha256, generate_replies
from safetyneurons.model.twin_settings import SAMPLES_PER_KIND, TwinSettings

if TYPE_CHECKING:
    from safetyneurons.model.pair import LoadedModel


def evaluate_refusals(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int = 40, batch_size: int = 16,
                      progress: bool = True, desc: str = "evaluate") -> list[dict]:
    """Greedy replies to `prompts`, each judged ``refusal`` / ``answer`` / ``empty`` by the phrase judge."""
    replies = generate_replies(lm, prompts, max_new_tokens, batch_size, progress, desc)
    return [{"prompt": p, "reply": text, "verdict": judge(text)} for p, (text, _) in zip(prompts, replies)]


def summarise(judged_harmful: list[dict], judged_benign: list[dict]) -> dict:
    """Refusal rate on harmful prompts, answer rate on benign prompts, and a few sample replies."""
    def rate(rows, verdict):
        return round(sum(r["verdict"] == verdict for r in rows) / len(rows), 4) if rows else None
    return {
        "n_harmful": len(judged_harmful), "n_benign": len(judged_benign),
        "refused_harmful": sum(r["verdict"] == "refusal" for r in judged_harmful),
        "answered_benign": sum(r["verdict"] == "answer" for r in judged_benign),
        "refusal_rate_harmful": rate(judged_harmful, "refusal"),
        "answer_rate_benign": rate(judged_benign, "answer"),
        "refusal_rate_benign": rate(judged_benign, "refusal"),
        "samples_harmful": judged_harmful[:SAMPLES_PER_KIND],
        "samples_benign": judged_benign[:SAMPLES_PER_KIND],
    }


def evaluate(lm: LoadedModel, eval_records: Sequence[dict], settings: TwinSettings, progress: bool,
             who: str) -> tuple[dict, list[dict]]:
    harmful = [r["prompt"] for r in eval_records if r["label"] == 1]
    benign = [r["prompt"] for r in eval_records if r["label"] == 0]
    rows = evaluate_refusals(lm, harmful + benign, settings.eval_max_new_tokens, settings.eval_batch_size,
                             progress, desc=f"evaluate {who}")
    for r, rec in zip(rows, [x for x in eval_records if x["label"] == 1] + [x for x in eval_records if x["label"] == 0]):
        r["id"] = rec["id"]
        r["label"] = rec["label"]
    return summarise(rows[:len(harmful)], rows[len(harmful):]), rows


def eval_block(eval_records: list[dict], base_summary: dict, twin_summary: dict, dropped: int) -> dict:
    return {
        "eval_data_sha256": data_sha256(eval_records),
        "n_harmful": sum(r["label"] for r in eval_records),
        "n_benign": sum(1 - r["label"] for r in eval_records),
        "dropped_seen_in_training": dropped,
        "judge": {"kind": "phrase match (heuristic)", "window_chars": WINDOW, "phrases": list(REFUSAL_PHRASES)},
        "base": base_summary,
        "twin": twin_summary,
    }


def _pct(k, n):
    return f"{k}/{n} ({100 * k / n:.1f}%)" if n else "n/a"


def format_table(info: dict) -> str:
    """The before/after table (and sample replies) from a ``twin.json`` dict."""
    ev = info["evaluation"]
    lines = [f"Twin: {info['path']}",
             (f"  ref: twin:{info['name']}" + ("  (also twin:default)" if info.get("default") else "")
              if info.get("in_cache") else f"  use it with --aligned {info['path']}"),
             f"Held-out evaluation ({ev['n_harmful']} harmful, {ev['n_benign']} benign prompts; "
             f"judge: refusal-phrase match, a heuristic)",
             f"  {'model':<6} {'refuses harmful':>18} {'answers benign':>18}"]
    for who in ("base", "twin"):
        s = ev[who]
        lines.append(f"  {who:<6} {_pct(s['refused_harmful'], s['n_harmful']):>18} "
                     f"{_pct(s['answered_benign'], s['n_benign']):>18}")
    for who in ("base", "twin"):
        lines.append(f"Sample {who} replies:")
        for kind in ("harmful", "benign"):
            for row in ev[who][f"samples_{kind}"]:
                reply = row["reply"].replace("\n", " ")
                reply = reply if len(reply) <= 110 else reply[:107] + "..."
                lines.append(f"  [{kind} -> {row['verdict']}] {row['prompt'][:60]!r}: {reply}")
    t = info.get("timing_s", {})
    if t:
        lines.append("Time: " + ", ".join(f"{k} {v:.0f}s" for k, v in t.items()))
    return "\n".join(lines)

