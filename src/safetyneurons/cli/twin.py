"""`safetyneurons twin`: build the safety-aligned twin of a base model (LoRA refusal fine-tune)."""

from __future__ import annotations

import click

from safetyneurons import twin as tw
from safetyneurons.errors import UserError
from safetyneurons.model.pair import DEFAULT_BASE
from safetyneurons.twin import DEFAULT_EVAL_PER_CLASS, TwinSettings

_D = TwinSettings()
_DEFAULTS = {"steps": _D.steps, "lr": _D.lr, "rank": _D.rank, "alpha": _D.alpha, "batch_size": _D.batch_size,
             "max_length": _D.max_length, "max_new_tokens": _D.max_new_tokens,
             "eval_max_new_tokens": _D.eval_max_new_tokens, "seed": _D.seed}


@click.command("twin")
@click.option("--base", default=None, metavar="REF",
              help="Base model reference (default: the offline SmolLM2-135M-Instruct).")
@click.option("--data", "data_path", default=None, metavar="SPLIT_JSONL",
              help="Labelled twin-training records (default: the `twin` split of the default data).")
@click.option("--eval-data", "eval_path", default=None, metavar="FILE",
              help="Held-out labelled prompts for the before/after table (default: the prompts of the default "
                   "`twin` split held back from training, --eval-size per class; never the `test` split).")
@click.option("--eval-size", type=int, default=DEFAULT_EVAL_PER_CLASS, show_default=True,
              help="Prompts per class sampled (deterministically) from the evaluation data.")
@click.option("--steps", type=int, default=_DEFAULTS["steps"], show_default=True, help="LoRA optimizer steps.")
@click.option("--lr", type=float, default=_DEFAULTS["lr"], show_default=True, help="Peak learning rate.")
@click.option("--rank", type=int, default=_DEFAULTS["rank"], show_default=True, help="LoRA rank r.")
@click.option("--alpha", type=float, default=_DEFAULTS["alpha"], show_default=True, help="LoRA alpha.")
@click.option("--batch-size", type=int, default=_DEFAULTS["batch_size"], show_default=True)
@click.option("--max-length", type=int, default=_DEFAULTS["max_length"], show_default=True,
              help="Tokens per training example (prompt + reply).")
@click.option("--max-new-tokens", type=int, default=_DEFAULTS["max_new_tokens"], show_default=True,
              help="Length of the base model's self-distilled replies to benign prompts.")
@click.option("--benign-share", type=float, default=_D.benign_share, show_default=True,
              help="Fraction of each training batch drawn from benign examples.")
@click.option("--helpful-prefix", default=_D.helpful_prefix, show_default=True, metavar="TEXT",
              help="Re-ask benign training prompts the base declined with its reply prefilled by TEXT "
                   "(e.g. 'Sure, here'); empty: leave them out.")
@click.option("--eval-max-new-tokens", type=int, default=_DEFAULTS["eval_max_new_tokens"], show_default=True,
              help="Reply length generated for the refusal evaluation.")
@click.option("--seed", type=int, default=_DEFAULTS["seed"], show_default=True)
@click.option("--out", default=None, metavar="DIR",
              help="Write the twin here instead of the cache (<cache>/twins/<name>): a model directory (merged "
                   "weights and tokenizer) with adapter/, twin.json, train_examples.jsonl and eval_replies.jsonl.")
@click.option("--force", is_flag=True, help="Rebuild even if a twin with the same inputs exists.")
@click.option("--threads", type=int, default=None,
              help="CPU threads for torch (default: torch's choice). Results are reproducible for a fixed count.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def twin(base, data_path, eval_path, eval_size, steps, lr, rank, alpha, batch_size, max_length, max_new_tokens,
         benign_share, helpful_prefix, eval_max_new_tokens, seed, out, force, threads, quiet):
    """Build the safety-aligned twin of a base model by a LoRA refusal fine-tune, and print a
    before/after refusal table.

    Harmful prompts of the twin split are taught a refusal; benign ones the base model's own reply.
    The adapter is merged and saved as a normal model directory. Without options this builds (or
    reuses) the default twin, usable everywhere as `twin:default`.
    """
    if eval_size < 1:
        raise UserError(f"--eval-size must be >= 1; got {eval_size}.")
    settings = tw.TwinSettings(rank=rank, alpha=alpha, lr=lr, steps=steps, batch_size=batch_size,
                               max_length=max_length, max_new_tokens=max_new_tokens, benign_share=benign_share,
                               helpful_prefix=helpful_prefix,
                               eval_max_new_tokens=eval_max_new_tokens, seed=seed).validate()
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be >= 1; got {threads}.")
        import torch

        torch.set_num_threads(threads)
    if out is not None:
        tw.check_twin_out(out)
    evals = None
    if eval_path is not None:
        evals = tw.sample_eval(tw.read_labelled(eval_path, f"--eval-data {eval_path}", need_both=False), eval_size)
    is_default = ((base is None or base == DEFAULT_BASE) and data_path is None and out is None
                  and settings.key_dict() == tw.TwinSettings().key_dict())
    if is_default:
        if evals is None and eval_size != tw.DEFAULT_EVAL_PER_CLASS:
            evals = tw.default_eval_records(eval_size)
        path = tw.ensure_default_twin(progress=not quiet, force=force, eval_records=evals, settings=settings)
    else:
        if data_path is None:  # the default twin split, less the prompts held back to judge the twin
            data_path = str(tw.default_twin_data())
            records = tw.default_twin_records()[0]
        else:
            records = tw.read_labelled(data_path, f"--data {data_path}")
        if evals is None:
            evals = tw.default_eval_records(eval_size)
        path = tw.build_twin(base or DEFAULT_BASE, records, evals, settings, out=out, force=force,
                             progress=not quiet, data_source=str(data_path))
    click.echo(tw.format_table(tw.load_info(path)))
