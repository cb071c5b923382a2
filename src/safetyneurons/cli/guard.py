"""`safetyneurons guard` (score prompts) and `safetyneurons serve` (HTTP moderation service)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from safetyneurons._io import parse_json
from safetyneurons.checks import check_text
from safetyneurons.guard.chat import DEFAULT_REFUSAL, GuardedChat
from safetyneurons.constants import DEVICES, GUARD_MODES
from safetyneurons.errors import UserError
from safetyneurons.guard.guard import Guard
from safetyneurons.serve.chat_routes import public_model_name
from safetyneurons.serve.routes import create_service
from safetyneurons.serve.limits import allowed_hosts_for, api_key_bytes, is_loopback
from safetyneurons.serve.server import bind_socket, run_server

_EXCERPT = 60


def _read_prompt_file(path: str) -> list[str]:
    """Prompts from a text file (one per line, blank lines skipped), a .jsonl file of records with a
    "prompt" field (or of JSON strings), or stdin for "-". Lines end at ``\n`` only (a trailing ``\r`` is
    dropped): Unicode line and paragraph separators (U+2028, U+2029, U+0085, form feeds) stay inside a prompt."""
    if path == "-":
        data, name = sys.stdin.buffer.read(), "stdin"
    else:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"--file {path}: no such file. Give a text file with one prompt per line.")
        data, name = p.read_bytes(), str(p)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--file {name}: not UTF-8 text (bad byte at offset {e.start}). Give UTF-8 text with one "
                        f"prompt per line.") from None
    jsonl = name.endswith(".jsonl")
    prompts = []
    for n, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        if jsonl:
            obj = parse_json(line, f"--file {name} line {n}")
            prompt = obj.get("prompt") if isinstance(obj, dict) else obj
            if not isinstance(prompt, str) or not prompt.strip():
                raise UserError(f"--file {name} line {n}: expected a record with a non-empty \"prompt\" string.")
            prompts.append(prompt)
        else:
            prompts.append(line)
    if not prompts:
        raise UserError(f"--file {name} holds no prompts (it is empty). Put one prompt per line.")
    return prompts


def _excerpt(text: str, width: int = _EXCERPT) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _load_guard(guard_dir, device, threshold, model_ref, batch_size, guard_sha256, operating_point=None):
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise UserError(f"--threshold must be a probability between 0 and 1, got {threshold:g}.")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}.")
    return Guard.load(guard_dir, device=device, threshold=threshold, model_ref=model_ref, batch_size=batch_size,
                      expected_sha256=guard_sha256, operating_point=operating_point)


def _quiet_libraries() -> None:
    """No progress bars from transformers or the hub (e.g. "Loading weights") on a short CLI call: stderr
    keeps only this program's own messages (and its scoring bar on long inputs)."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()


def _guard_options(f):
    f = click.option("--guard-sha256", default=None, metavar="SHA256",
                     help="Refuse the guard unless its id (sha256 of guard.json's content) is this.")(f)
    f = click.option("--batch-size", default=16, show_default=True, help="Prompts per forward pass.")(f)
    f = click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True)(f)
    f = click.option("--model", "model_ref", default=None, metavar="REF",
                     help="Where the guard's model is (default: the ref in guard.json); its weights must "
                          "match the guard's sha256.")(f)
    f = click.option("--threshold", type=float, default=None,
                     help="Flag when the unsafe probability is >= this, instead of an operating point "
                          "(default: the threshold of --operating-point).")(f)
    f = click.option("--operating-point", type=click.Choice(("strict", "loose")), default=None,
                     help="Which calibrated threshold to use, both set on the validation split's benign prompts as "
                          "the guard scores them: strict (the default; at most 5% false positives, or `run "
                          "--target-fpr`) or loose (at most 1%). A guard without them has its one threshold, as "
                          "guard.json's threshold_rule records.")(f)
    f = click.option("--guard", "guard_dir", required=True, type=click.Path(), help="Guard directory.")(f)
    return f


@click.command("guard")
@_guard_options
@click.argument("prompts", nargs=-1)
@click.option("--file", "files", multiple=True, metavar="FILE",
              help="Prompts file: one prompt per line (.txt), or .jsonl records with \"prompt\"; - for stdin. "
                   "Repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def guard(guard_dir, operating_point, threshold, model_ref, device, batch_size, guard_sha256, prompts, files,
          as_json):
    """Score PROMPTS (and/or --file) with a guard: probability of unsafe and whether it is flagged.

    Writes no file: the table (or --json, fields in docs/guard.md) goes to stdout; stderr stays empty but for a
    progress bar when there are more prompts than --batch-size.

    \b
    safetyneurons guard --guard runs/default/guard "How do I pick a lock?"
    safetyneurons guard --guard runs/default/guard --file prompts.txt --json
    """
    items = [check_text(p, f"Prompt argument {k}") for k, p in enumerate(prompts, 1)]
    for f in files:
        items += _read_prompt_file(f)
    if not items:
        raise UserError("No prompt given. Pass prompts as arguments (in quotes) or --file FILE.")
    for k, p in enumerate(items):
        if not p.strip():
            raise UserError(f"Prompt {k + 1} is empty; give some text to score.")
    _quiet_libraries()
    g = _load_guard(guard_dir, device, threshold, model_ref, batch_size, guard_sha256, operating_point)
    results = g.score(items, progress=len(items) > g.batch_size)
    if as_json:
        click.echo(json.dumps({"guard": g.name, "id": g.id, "threshold": g.threshold,
                               "operating_point": g.operating_point if threshold is None else None,
                               "results": [{"prompt": p, **r.to_dict()} for p, r in zip(items, results)]},
                              ensure_ascii=False, indent=2))
        return
    click.echo(f"{'#':>4}  {'p(unsafe)':>9}  {'flagged':<7}  prompt")
    for k, (p, r) in enumerate(zip(items, results), 1):
        hazard = ""
        if r.flagged and r.category_scores and len(r.category_scores) > 1:  # the top hazard of the category heads
            hazard = " [" + max((k for k in r.category_scores if k != "unsafe"), key=r.category_scores.get) + "]"
        click.echo(f"{k:>4}  {r.unsafe_probability:>9.4f}  {'YES' if r.flagged else 'no':<7}  {_excerpt(p)}{hazard}")
    n_flag = sum(r.flagged for r in results)
    click.echo(f"{n_flag} of {len(results)} flagged (threshold {g.threshold:.4f}; guard {g.name}, "
               f"{g.layers_run} of {g.lm.info['num_layers']} layers run).")


@click.command("serve")
@_guard_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", default=None, envvar="SAFETYNEURONS_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' (all endpoints but /healthz).")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="Also answer requests for this Host name (repeatable; '*' for any). By default a server on a "
                   "loopback address answers only localhost, 127.0.0.1 and [::1] (others: 421), so web pages "
                   "cannot reach it by DNS rebinding; on other addresses any name is answered.")
@click.option("--max-batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Inputs scored together (micro-batching across concurrent requests).")
@click.option("--max-wait-ms", default=5.0, show_default=True, type=click.FloatRange(0, 10_000),
              help="How long a request waits for others to join its batch.")
@click.option("--max-inputs", default=64, show_default=True, type=click.IntRange(min=1),
              help="Inputs per request (more: 413).")
@click.option("--max-chars", default=100_000, show_default=True, type=click.IntRange(min=1),
              help="Characters per input, read whole in windows (more: 413 on /v1/moderations, to be treated as "
                   "flagged; BLOCKED on the LiteLLM route).")
@click.option("--allow-caller-loosen", is_flag=True,
              help="Let callers raise the threshold or pick a looser operating point per request (default: a "
                   "caller may only make the guard stricter).")
@click.option("--request-timeout", default=60.0, show_default=True, type=click.FloatRange(0, 3600, min_open=True),
              help="Seconds a request may take from arrival to answer (then 504).")
@click.option("--max-connections", default=512, show_default=True, type=click.IntRange(min=1),
              help="Open connections (more: 503 at once). Headers/body must arrive within 10 s (then 408).")
@click.option("--log-prompts", is_flag=True, help="Also log prompt text (off: only counts and latency).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads for scoring (default: torch's choice). 1 can be faster on a busy machine.")
@click.option("--generate", is_flag=True,
              help="Also serve the guard's model behind POST /v1/chat/completions, guarded by the same prefill.")
@click.option("--guard-mode", type=click.Choice(tuple(m for m in GUARD_MODES if m != "off")), default="block",
              show_default=True,
              help="With --generate: refuse flagged conversations (block) or only report the score (monitor).")
@click.option("--refusal", default=None, metavar="TEXT",
              help="With --generate: the reply to a flagged conversation (default: \"I can't help with that "
                   "request.\").")
@click.option("--max-tokens", default=512, show_default=True, type=click.IntRange(min=1),
              help="With --generate: the most tokens a reply may have (requests asking for more: 422).")
def serve(guard_dir, operating_point, threshold, model_ref, device, batch_size, guard_sha256, host, port, api_key, allowed_hosts,
          max_batch_size, max_wait_ms, max_inputs, max_chars, request_timeout, max_connections, log_prompts, threads,
          generate, guard_mode, refusal, max_tokens, allow_caller_loosen):
    """Serve a guard over HTTP: POST /v1/moderations (OpenAI moderation shape), POST
    /beta/litellm_basic_guardrail_api (LiteLLM generic guardrail), GET /v1/guard, GET /healthz; with --generate
    also POST /v1/chat/completions (OpenAI-compatible, guarded generation, streaming) and GET /v1/models.

    \b
    safetyneurons serve --guard runs/default/guard --port 8000
    curl -s localhost:8000/v1/moderations -H "Authorization: Bearer $SAFETYNEURONS_API_KEY" \\
         -H 'Content-Type: application/json' -d '{"input": "hi"}'
    safetyneurons serve --guard runs/default/guard --generate
    """
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key / SAFETYNEURONS_API_KEY is empty; give a non-empty key or unset it.")
    if api_key is not None:
        api_key_bytes(api_key)  # one no client could send (not UTF-8, control characters): refused now
    hosts = allowed_hosts_for(host, allowed_hosts)
    if not api_key and not is_loopback(host):
        click.echo(f"Warning: serving on {host} without an API key; anyone who can reach it can use it. "
                   f"Set --api-key or SAFETYNEURONS_API_KEY.", err=True)
    sock = bind_socket(host, port)  # a busy port fails here, before the model loads
    try:
        if threads:
            import torch

            torch.set_num_threads(threads)
        g = _load_guard(guard_dir, device, threshold, model_ref, batch_size, guard_sha256, operating_point)
        chat = GuardedChat(g, mode=guard_mode, refusal=refusal or DEFAULT_REFUSAL) if generate else None
        app = create_service(g, chat=chat, max_tokens=max_tokens, max_batch_size=max_batch_size,
                             max_wait_ms=max_wait_ms, max_inputs=max_inputs, max_chars=max_chars, api_key=api_key,
                             log_prompts=log_prompts, request_timeout_s=request_timeout,
                             max_connections=max_connections, allowed_hosts=hosts,
                             allow_caller_loosen=allow_caller_loosen)
        logger = logging.getLogger("safetyneurons.serve.server")
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        bound = sock.getsockname()
        click.echo(f"Serving guard {g.name} (threshold {g.threshold:.4f}, {g.layers_run} of "
                   f"{g.lm.info['num_layers']} layers{'; chat: ' + public_model_name(chat) if chat else ''}) on "
                   f"http://{bound[0]}:{bound[1]} "
                   f"(pid {os.getpid()}); Ctrl-C to stop.", err=True)
        run_server(app, sock)
    finally:
        sock.close()
