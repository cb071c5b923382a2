"""Build (or reuse) a twin: compose data, training and evaluation, and write the cached twin directory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from safetyneurons._io import atomic_dir, atomic_write_json, atomic_write_text, model_fingerprint, sha256_file, versions
from safetyneurons.errors import UserError
from safetyneurons.model.pair import DEFAULT_BASE, load_model, resolve_ref
from safetyneurons.data.records import jsonl
from safetyneurons.model.twin_cache import check_twin_out, default_pointer, default_twin_data, load_info, read_info, twin_key, twin_name, twins_dir
from safetyneurons.twin.data import (build_examples, check_twin_records, data_sha256, default_eval_records, default_twin_records,
                   prompt_length)
from safetyneurons.twin.evaluate import eval_block, evaluate
from safetyneurons.model.twin_settings import DEFAULT_EVAL_PER_CLASS, FORMAT, MIN_REPLY_TOKENS, RECIPE_VERSION, REFUSALS, TwinSettings
from safetyneurons.twin.train import train_lora


def _write_replies(directory: Path, base_rows: list[dict], twin_rows: list[dict]) -> None:
    atomic_write_text(directory / "eval_replies.jsonl",
                      jsonl([{"model": "base", **r} for r in base_rows] + [{"model": "twin", **r} for r in twin_rows]))


def _check_data(twin_records: Sequence[dict], eval_records: Sequence[dict] | None,
                data_source: str | None) -> tuple[list[dict], list[dict], int]:
    """(training records, evaluation records, evaluation prompts dropped because they are training prompts)."""
    records = check_twin_records(twin_records, data_source or "twin training data")
    train_prompts = {r["prompt"] for r in records}
    eval_all = check_twin_records(eval_records, "evaluation data", need_both=False) if eval_records else []
    evals = [r for r in eval_all if r["prompt"] not in train_prompts]
    if eval_all and not evals:
        raise UserError("Every evaluation prompt also appears in the twin training data; give held-out "
                        "prompts (e.g. the test split) with --eval-data.")
    return records, evals, len(eval_all) - len(evals)


def _self_distil(lm, records: list[dict], settings: TwinSettings, progress: bool,
                 data_source: str | None) -> tuple[list[dict], list[dict], int]:
    """Training examples of the prompts that fit with room for a reply (refusals for harmful prompts, the base
    model's own answers for benign ones): (every example, those used, prompts skipped as too long)."""
    fitting = [r for r in records if prompt_length(lm, r["prompt"]) <= settings.max_length - MIN_REPLY_TOKENS]
    check_twin_records(fitting, f"{data_source or 'twin training data'} (prompts that fit in --max-length "
                                f"{settings.max_length} with room for a reply)")
    examples = build_examples(lm, fitting, settings, progress)
    used = [e for e in examples if e["used"]]
    if not any(e["label"] == 0 for e in used):
        raise UserError("The base model declined every benign training prompt, so there is nothing to teach "
                        "helpfulness with; give benign prompts it answers (--data) or a longer "
                        "--max-new-tokens.")
    return examples, used, len(records) - len(fitting)


def _data_record(records: list[dict], examples: list[dict], used: list[dict], skipped: int, train_sha: str,
                 data_source: str | None) -> dict:
    """twin.json's ``data``: the training records and what became of them."""
    return {"source": data_source, "sha256": train_sha, "n": len(records),
            "n_harmful": sum(r["label"] for r in records),
            "n_benign": sum(1 - r["label"] for r in records),
            "skipped_long_prompts": skipped,
            "benign_replies_finished": sum(e["ends"] for e in examples if e["label"] == 0),
            "benign_unused_not_answers": sum(not e["used"] for e in examples),
            "benign_prefilled": sum(e["source"] == "prefilled" for e in examples),
            "trained_on": {"harmful": sum(e["label"] for e in used),
                           "benign": sum(1 - e["label"] for e in used)}}


def _recipe_record(settings: TwinSettings, targets: Sequence[str]) -> dict:
    """twin.json's ``recipe``: how the twin was trained."""
    return {"version": RECIPE_VERSION, "refusals": list(REFUSALS), "lora_targets": len(targets),
            "lora_target_roles": sorted({t.rsplit(".", 1)[-1] for t in targets}),
            "loss": "cross-entropy on reply tokens, mean per example then over the batch",
            "batches": "class-balanced (harmful/benign alternate), seeded shuffles per class",
            "benign_targets": "base model's greedy reply, kept only when the judge calls it an answer",
            "schedule": "AdamW, linear warmup then linear decay to 10%, grad-norm clip 1.0",
            "merge_scale": settings.alpha / settings.rank}


def build_twin(base_ref: str, twin_records: Sequence[dict], eval_records: Sequence[dict] | None = None,
               settings: TwinSettings | None = None, out: str | Path | None = None, force: bool = False,
               progress: bool = True, data_source: str | None = None) -> Path:
    """Build (or reuse) the aligned twin of `base_ref`; returns the twin's model directory.

    `twin_records` are labelled records (1 harmful, 0 benign) from the ``twin`` split. `eval_records` are
    held-out labelled prompts for the before/after evaluation (prompts also in `twin_records` are
    dropped). The twin goes to ``<cache>/twins/<name>`` unless `out` is given. With the same inputs an
    existing twin is reused (re-evaluated only when `eval_records` changed) unless `force`.
    """
    settings = (settings or TwinSettings()).validate()
    records, evals, dropped = _check_data(twin_records, eval_records, data_source)
    base_path = resolve_ref(base_ref)
    base_sha = model_fingerprint(base_path)
    train_sha = data_sha256(records)
    name = twin_name(base_sha, train_sha, settings)
    final = Path(out).expanduser() if out is not None else twins_dir() / name
    if out is not None:
        check_twin_out(final)
    key = twin_key(base_sha, train_sha, settings)

    info = read_info(final)
    if info is not None and info.get("key") == key and not force:
        if info["evaluation"]["eval_data_sha256"] != data_sha256(evals) and evals:
            _reevaluate(final, info, base_ref, evals, dropped, settings, progress)
        return final

    started = time.perf_counter()
    timing: dict[str, float] = {}
    with atomic_dir(final) as tmp:
        lm = load_model(base_ref)
        base_desc = lm.describe()
        t = time.perf_counter()
        base_summary, base_rows = evaluate(lm, evals, settings, progress, "base") if evals else (None, [])
        timing["evaluate_base"] = time.perf_counter() - t

        t = time.perf_counter()
        examples, used, skipped = _self_distil(lm, records, settings, progress, data_source)
        timing["self_distil"] = time.perf_counter() - t

        t = time.perf_counter()
        peft_model, losses, targets = train_lora(lm, used, settings, progress)
        timing["train"] = time.perf_counter() - t

        peft_model.save_pretrained(str(tmp / "adapter"))
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(str(tmp))
        lm.tokenizer.save_pretrained(str(tmp))
        lm.model = merged

        t = time.perf_counter()
        twin_summary, twin_rows = evaluate(lm, evals, settings, progress, "twin") if evals else (None, [])
        timing["evaluate_twin"] = time.perf_counter() - t
        timing["total"] = time.perf_counter() - started

        atomic_write_text(tmp / "train_examples.jsonl", jsonl(examples))
        if evals:
            _write_replies(tmp, base_rows, twin_rows)
        atomic_write_json(tmp / "twin.json", {
            "format": FORMAT,
            "name": final.name if out is None else name,
            "in_cache": out is None,
            "key": key,
            "path": str(final.resolve()),
            "base": {**base_desc, "ref": base_ref, "sha256": base_sha},
            "data": _data_record(records, examples, used, skipped, train_sha, data_source),
            "settings": settings.to_dict(),
            "recipe": _recipe_record(settings, targets),
            "loss_curve": losses,
            "evaluation": eval_block(evals, base_summary, twin_summary, dropped) if evals else None,
            "timing_s": {k: round(v, 1) for k, v in timing.items()},
            "versions": versions(),
        })
    return final


def _reevaluate(path: Path, info: dict, base_ref: str, evals: list[dict], dropped: int,
                settings: TwinSettings, progress: bool) -> None:
    """Evaluate an existing twin (and its base) on new held-out prompts and update twin.json."""
    base = load_model(base_ref)
    base_summary, base_rows = evaluate(base, evals, settings, progress, "base")
    del base
    twin = load_model(str(path))
    twin_summary, twin_rows = evaluate(twin, evals, settings, progress, "twin")
    info = dict(info, evaluation=eval_block(evals, base_summary, twin_summary, dropped))
    info["settings"] = dict(info["settings"], eval_max_new_tokens=settings.eval_max_new_tokens,
                            eval_batch_size=settings.eval_batch_size)
    _write_replies(path, base_rows, twin_rows)
    atomic_write_json(path / "twin.json", info)



def ensure_default_twin(progress: bool = True, force: bool = False,
                        eval_records: Sequence[dict] | None = None, settings: TwinSettings | None = None) -> Path:
    """Build (or reuse) the default twin: default base, default ``twin`` split, default settings.

    Also records it as ``twin:default``. `settings` may differ from the defaults only in evaluation-only
    fields (reply length and batch size of the evaluation).
    """
    settings = settings or TwinSettings()
    if settings.key_dict() != TwinSettings().key_dict():
        raise ValueError("ensure_default_twin: the default twin uses the default training settings; "
                         "call build_twin for other settings.")

    data_path = default_twin_data()
    records = default_twin_records()[0]
    # the held-back prompts in the same order as `safetyneurons twin` with other settings (the recipe pilots)
    # judges them, so a pilot and the default twin it becomes report the same evaluation
    evals = list(eval_records) if eval_records is not None else default_eval_records()
    path = build_twin(DEFAULT_BASE, records, evals, settings, force=force, progress=progress,
                      data_source=f"{data_path} minus {DEFAULT_EVAL_PER_CLASS} + {DEFAULT_EVAL_PER_CLASS} held back")
    base_path = resolve_ref(DEFAULT_BASE)
    atomic_write_json(default_pointer(), {
        "name": path.name, "base_ref": DEFAULT_BASE, "base_path": str(base_path),
        "base_sha256": model_fingerprint(base_path), "data_path": str(data_path),
        "data_file_sha256": sha256_file(data_path), "data_sha256": data_sha256(records),
    })
    info = load_info(path)
    if not info.get("default"):
        atomic_write_json(path / "twin.json", dict(info, default=True))
    return path

