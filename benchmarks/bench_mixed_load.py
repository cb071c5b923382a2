"""Mixed load on the guard service (issue 22): does chat traffic hurt moderation beyond its fair share?

Serves a guard with guarded chat (``create_service(guard, chat=GuardedChat(guard))``, the service's default
limits) in a subprocess on a free loopback port and runs two phases of ``--seconds`` each:

1. **moderation only**: ``--clients`` (32) concurrent moderation clients, one input per request, a share
   ``--bad-share`` (5%) of them bad inputs (lone surrogates, deep JSON, wrong types, too many inputs);
2. **moderation + chat**: the same, plus ``--chat-clients`` (5) clients that send long chat prompts
   (``--chat-chars`` characters, streaming) and disconnect after a random 0.2-1.5 s, over and over.

For the **valid** moderation requests it measures errors (anything but a 200 with one result), p50/p99 latency
and requests/s in each phase, and prints the p99 ratio (with chat / without). It also counts the bad inputs
answered with anything but a 4xx JSON error (goal 0), the chat answers by status, and the server process's
memory (peak resident set, ``VmHWM``, and the largest ``VmRSS`` sampled in each phase). It writes
``mixed_load.json`` (the project's benchmark schema: the table's rows, with the whole report under ``details``)
and ``mixed_load.md`` to ``--out`` (default ``docs/benchmarks``).

Guards: ``--guard DIR`` (default: ``runs/default/guard`` when present) or ``--throwaway tiny`` (a throwaway guard
on a tiny random model, for a smoke check; its context is 256 tokens, so its chat prompts are short).

    python benchmarks/bench_mixed_load.py --throwaway tiny --seconds 10 --out /tmp/mixed
    python benchmarks/bench_mixed_load.py --guard runs/default/guard --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_guard import PROMPTS, build_throwaway, free_port, wait_until_healthy  # noqa: E402  (shared)

_DEEP = 5_000
BAD_BODIES = [  # what a careless or hostile client sends; each must get a 4xx JSON error
    b'{"input": "\\ud800 lone surrogate"}', b'{"input": ["ok", "\\udfff"]}', b"[" * _DEEP + b"]" * _DEEP,
    b'{"input": ' + b"[" * _DEEP + b"]" * _DEEP + b"}", b'{"input": "unterminated', b'{"input": 42}',
    b'{"input": []}', b'{"text": "no input"}', json.dumps({"input": ["hi"] * 65}).encode(),
    json.dumps({"input": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}).encode(),
]
CHAT_FILLER = ("Please read the following notes about our garden carefully before you answer. We planted "
               "tomatoes, basil and beans along the south fence, and the soil there dries out quickly in July. ")


def pct(xs, q) -> float | None:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if xs else None


# ------------------------------------------------------------------------------------------ server
def serve(guard_dir: str, port: int, ready_file: str, device: str, slice_tokens: str) -> None:
    """The server process: the guard with guarded chat, default service limits (``slice_tokens``: 0 for the
    default), on 127.0.0.1:port."""
    import torch

    from safetyneurons.guard.chat import GuardedChat
    from safetyneurons.guard.guard import Guard
    from safetyneurons.results.machine import machine_info
    from safetyneurons.serve.routes import create_service
    from safetyneurons.serve.server import bind_socket, run_server

    guard = Guard.load(guard_dir, device=device)
    chat = GuardedChat(guard, mode="block")
    limits = {"slice_tokens": int(slice_tokens)} if int(slice_tokens) else {}
    app = create_service(guard, chat=chat, max_tokens=256, **limits)
    add_turn_profile(app)
    sock = bind_socket("127.0.0.1", port)
    Path(ready_file).write_text(json.dumps({"context_length": chat.context_length, "guard": guard.name,
                                            "guard_id": guard.id, "layers_run": guard.layers_run,
                                            "num_layers": int(guard.lm.info["num_layers"]),
                                            "threads": torch.get_num_threads(), "machine": machine_info(),
                                            "settings": app.state.settings.public()}))
    run_server(app, sock, log_level="warning")


TURN_KINDS = {"score": "moderation batch", "encode_for": "chat tokenising", "timed": "chat guard slice",
              "next": "chat prefill chunk", "decode_turn": "chat decoding", "pieces": "long input: pieces",
              "read": "long input: slice"}


def add_turn_profile(app) -> None:
    """Times every worker turn by kind (moderation batches, each kind of chat turn) and serves the figures at
    ``GET /bench/turns`` (then starts counting afresh): where a moderation request waits is the turns it waits
    behind."""
    batcher, turns = app.state.batcher, {}

    def timed_turn(kind: str, fn):
        def run(*args):
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                turns.setdefault(kind, []).append(time.perf_counter() - t0)
        return run

    batcher.score_fn = timed_turn("moderation batch", batcher.score_fn)
    inner = batcher.call

    async def call(fn, *args, client="", cost=1):
        kind = TURN_KINDS.get(getattr(fn, "__name__", ""), getattr(fn, "__name__", "call"))
        return await inner(timed_turn(kind, fn), *args, client=client, cost=cost)

    batcher.call = call

    @app.get("/bench/turns")
    async def bench_turns():
        out = {k: {"n": len(v), "total_s": round(sum(v), 2), "p50_ms": round(1000 * pct(v, 50), 1),
                   "p99_ms": round(1000 * pct(v, 99), 1), "max_ms": round(1000 * max(v), 1)}
               for k, v in turns.items()}
        turns.clear()
        return out


def start_server(guard_dir: Path, device: str, threads: int | None, slice_tokens: int | None,
                 log) -> tuple[subprocess.Popen, str, dict]:
    port = free_port()
    ready = Path(tempfile.mkdtemp()) / "ready.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, __file__, "--_serve", str(guard_dir), str(port), str(ready), device, str(slice_tokens or 0)]
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(proc, url, log, 600, ready=ready)
    return proc, url, json.loads(ready.read_text())


class MemorySampler:
    """Samples the server's resident memory (VmRSS) every ``every_s``; ``peak_kb`` is the kernel's VmHWM."""

    def __init__(self, pid: int, every_s: float = 0.5):
        self.pid, self.every_s, self.max_rss_kb = pid, every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _status(self) -> dict:
        try:
            lines = Path(f"/proc/{self.pid}/status").read_text().splitlines()
        except OSError:
            return {}
        return {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in lines)
                if k in ("VmRSS", "VmHWM") and v.split()}

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.max_rss_kb = max(self.max_rss_kb, self._status().get("VmRSS", 0))

    def __enter__(self):
        self.max_rss_kb = self._status().get("VmRSS", 0)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak_kb(self) -> int:
        return self._status().get("VmHWM", 0)


# ------------------------------------------------------------------------------------------ clients
async def moderation_client(client, k: int, deadline: float, bad_share: float, out: dict) -> None:
    rnd = random.Random(k)
    while time.perf_counter() < deadline:
        if rnd.random() < bad_share:
            try:
                r = await client.post("/v1/moderations", content=rnd.choice(BAD_BODIES),
                                      headers={"Content-Type": "application/json"})
                out["bad"] += 1
                out["bad_wrong"] += not (400 <= r.status_code < 500 and set(r.json()) == {"error"})
            except Exception:  # noqa: BLE001 - a bad input must never break the connection
                out["bad_wrong"] += 1
            continue
        t0 = time.perf_counter()
        try:
            r = await client.post("/v1/moderations", json={"input": rnd.choice(PROMPTS)})
            ok = r.status_code == 200 and len(r.json()["results"]) == 1
            out["statuses"][r.status_code] = out["statuses"].get(r.status_code, 0) + 1
        except Exception as e:  # noqa: BLE001 - counted as errors
            ok = False
            out["statuses"][type(e).__name__] = out["statuses"].get(type(e).__name__, 0) + 1
        if ok:
            out["lat"].append((time.perf_counter() - t0) * 1000.0)
        else:
            out["errors"] += 1


def peer(group: int, k: int):
    """An HTTP transport whose connections come from 127.0.<group>.<k+1>: each client its own peer address, so
    its own fair share (on one address, all clients would share one)."""
    import httpx

    return httpx.AsyncHTTPTransport(local_address=f"127.0.{group}.{k % 250 + 1}")


async def chat_client(url: str, k: int, deadline: float, prompt: str, max_tokens: int, out: dict) -> None:
    """Long streaming chat prompts, each dropped after a random 0.2-1.5 s (a new connection each time)."""
    import httpx

    rnd = random.Random(1000 + k)
    body = {"model": "any", "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": f"[{k}] {prompt} Now summarise the notes."}]}
    while time.perf_counter() < deadline:
        async with httpx.AsyncClient(base_url=url, timeout=60, transport=peer(2, k)) as client:
            try:
                async with asyncio.timeout(rnd.uniform(0.2, 1.5)):
                    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                        out["chat_statuses"][r.status_code] = out["chat_statuses"].get(r.status_code, 0) + 1
                        async for _ in r.aiter_lines():
                            pass
                out["chat_finished"] += 1
            except TimeoutError:
                out["chat_dropped"] += 1  # the client went away mid-request
            except Exception as e:  # noqa: BLE001 - counted
                out["chat_statuses"][type(e).__name__] = out["chat_statuses"].get(type(e).__name__, 0) + 1


async def drive(url: str, args, chat_prompt: str | None) -> dict:
    import httpx

    out = {"lat": [], "errors": 0, "statuses": {}, "bad": 0, "bad_wrong": 0, "chat_statuses": {},
           "chat_finished": 0, "chat_dropped": 0}
    deadline = time.perf_counter() + args.seconds
    clients = [httpx.AsyncClient(base_url=url, timeout=120, transport=peer(1, k)) for k in range(args.clients)]
    try:
        jobs = [moderation_client(c, k, deadline, args.bad_share, out) for k, c in enumerate(clients)]
        if chat_prompt is not None:
            jobs += [chat_client(url, k, deadline, chat_prompt, args.chat_max_tokens, out)
                     for k in range(args.chat_clients)]
        await clients[0].get("/bench/turns")  # count this phase's turns only
        t0 = time.perf_counter()
        await asyncio.gather(*jobs)
        wall = time.perf_counter() - t0
        health = (await clients[0].get("/healthz")).json()
        turns = (await clients[0].get("/bench/turns")).json()
    finally:
        for c in clients:
            await c.aclose()
    lat = out.pop("lat")
    return {**out, "requests": len(lat), "wall_s": wall, "rps": len(lat) / wall, "p50_ms": pct(lat, 50),
            "p99_ms": pct(lat, 99), "max_ms": max(lat) if lat else None, "health_after": health, "turns": turns}


def run_phase(url: str, pid: int, args, chat_prompt: str | None) -> dict:
    with MemorySampler(pid) as mem:
        res = asyncio.run(drive(url, args, chat_prompt))
    res["max_rss_mb"] = mem.max_rss_kb / 1024
    res["peak_rss_mb"] = mem.peak_kb / 1024
    return res


# ---------------------------------------------------------------------------------------------- report
COLUMNS = ["measure", "moderation only", "with chat clients"]


def table_rows(report: dict) -> list[list]:
    a, b = report["moderation_only"], report["with_chat"]

    def f(v, nd=1):
        return None if v is None else round(float(v), nd)

    rows = [["valid moderation requests", a["requests"], b["requests"]],
            ["errors (valid requests)", a["errors"], b["errors"]],
            ["requests/s", f(a["rps"]), f(b["rps"])], ["p50 latency (ms)", f(a["p50_ms"]), f(b["p50_ms"])],
            ["p99 latency (ms)", f(a["p99_ms"]), f(b["p99_ms"])],
            ["p99 ratio (with chat / without)", None, f(report["p99_ratio"], 2)],
            ["bad inputs sent", a["bad"], b["bad"]],
            ["bad inputs not answered with a 4xx JSON error", a["bad_wrong"], b["bad_wrong"]],
            ["chat requests finished / dropped by the client", None, f"{b['chat_finished']} / {b['chat_dropped']}"],
            ["chat answers by status", None, json.dumps(b["chat_statuses"], sort_keys=True)],
            ["server RSS, max sampled (MB)", f(a["max_rss_mb"]), f(b["max_rss_mb"])],
            ["server RSS, peak so far (MB)", f(a["peak_rss_mb"]), f(b["peak_rss_mb"])],
            ["worker turns: moderation batches / calls", f"{a['batches']} / {a['calls']}",
             f"{b['batches']} / {b['calls']}"]]
    for kind in sorted(set(a["turns"]) | set(b["turns"])):
        def t(phase):
            x = phase["turns"].get(kind)
            if x is None:
                return None
            return f"{x['n']} turns, p50 {x['p50_ms']:.0f} / p99 {x['p99_ms']:.0f} / max {x['max_ms']:.0f} ms"
        rows.append([f"worker turns: {kind}", t(a), t(b)])
    return rows


README_MEASURES = ("valid moderation requests", "errors (valid requests)", "p99 latency (ms)",
                   "p99 ratio (with chat / without)", "bad inputs not answered with a 4xx JSON error",
                   "server RSS, max sampled (MB)")


def readme_table(rows: list[list]) -> dict:
    """The README's short table: requests, errors, p99 and its ratio, bad-input answers, memory."""
    return {"columns": COLUMNS, "rows": [r for r in rows if r[0] in README_MEASURES]}


def notes(report: dict) -> list[str]:
    ratio = report["p99_ratio"]
    verdict = "met" if ratio is not None and ratio <= 2.0 else "not met"
    st = report["settings"]
    return [f"{report['source']}: {report['clients']} moderation clients (one input a request, each from its own "
            f"peer address), {report['seconds']:g} s a phase, {report['bad_share']:.0%} bad inputs.",
            f"Chat phase: {report['chat_clients']} streaming clients sending {report['chat_chars']}-character "
            f"prompts and dropping each request after a random 0.2-1.5 s.",
            f"Goal: p99 of valid moderation requests with chat within 2x of moderation alone: {verdict} "
            f"({'n/a' if ratio is None else f'{ratio:.2f}x'}).",
            f"Service settings: slice_tokens {st.get('slice_tokens')}, max_batch_tokens {st['max_batch_tokens']}, "
            f"max_batch_size {st['max_batch_size']}, max_wait_ms {st['max_wait_ms']:g}; the guard runs "
            f"{report['layers_run']} of the model's {report['num_layers']} layers.",
            f"Load average at the start: {report['load_average']}; server tracebacks in the log: "
            f"{report['server_tracebacks']}."]


def markdown(bench: dict) -> str:
    from safetyneurons.results.machine import describe_machine
    from safetyneurons.results.tables import cell, markdown_table

    lines = [f"# {bench['title']}", "", f"`{bench['command']}` (code {bench['code_version']}, {bench['date']}, "
             f"{describe_machine(bench['machine'])})", ""]
    lines += markdown_table(bench["columns"], [[cell(v) for v in row] for row in bench["rows"]],
                            [False] + [True] * (len(bench["columns"]) - 1))
    return "\n".join(lines + [""] + [f"- {n}" for n in bench["notes"]]) + "\n"


def benchmark_json(report: dict, guard_id: str | None, guard_path: str, machine: dict) -> dict:
    """The report in the project's benchmark schema (docs/benchmarks), the whole report under ``details``."""
    import datetime

    from safetyneurons.results.machine import code_version

    command = " ".join(["python", "benchmarks/bench_mixed_load.py", *sys.argv[1:]])
    return {"benchmark": "mixed_load", "title": "Moderation latency beside guarded-chat traffic (issue 22)",
            "command": command, "code_version": code_version(), "machine": machine,  # the server's machine
            "artifact": {"guard_id": guard_id, "path": guard_path},
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "columns": COLUMNS, "rows": table_rows(report), "readme": readme_table(table_rows(report)),
            "notes": notes(report), "details": report}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--guard", default=str(ROOT / "runs" / "default" / "guard"), help="Guard directory.")
    ap.add_argument("--throwaway", choices=("tiny",), default=None, help="Build a throwaway tiny guard instead.")
    ap.add_argument("--seconds", type=float, default=60.0, help="Length of each phase.")
    ap.add_argument("--clients", type=int, default=32, help="Concurrent moderation clients.")
    ap.add_argument("--chat-clients", type=int, default=5, help="Chat clients in the second phase.")
    ap.add_argument("--chat-chars", type=int, default=None,
                    help="Characters per chat prompt (default: 0.8 x the model's context in tokens, at most 6000).")
    ap.add_argument("--chat-max-tokens", type=int, default=64)
    ap.add_argument("--bad-share", type=float, default=0.05)
    ap.add_argument("--slice-tokens", type=int, default=None, help="The service's slice_tokens (default: its own).")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="Server's torch threads (OMP_NUM_THREADS).")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"), metavar="DIR",
                    help="Write mixed_load.json and mixed_load.md here.")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    if args.throwaway or not (Path(args.guard) / "guard.json").is_file():
        if not args.throwaway:
            print(f"No guard at {args.guard}; using a throwaway tiny guard.", file=sys.stderr)
        guard_dir = build_throwaway("tiny", Path(tmp.name), 1, 40, "mlp_neurons")
        source, shown = "throwaway tiny guard (random 4-layer model, deepest layer 1)", "throwaway tiny guard"
    else:
        guard_dir = Path(args.guard)
        inside = guard_dir.resolve().is_relative_to(ROOT)
        shown = os.path.relpath(guard_dir.resolve(), ROOT) if inside else str(guard_dir)
        source = f"guard {shown}"
    log = tempfile.TemporaryFile(mode="w+")
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    proc, url, info = start_server(guard_dir, args.device, args.threads, args.slice_tokens, log)
    try:
        chars = args.chat_chars or int(min(6000, info["context_length"] * 0.8))
        prompt = (CHAT_FILLER * (chars // len(CHAT_FILLER) + 1))[:chars]
        without = run_phase(url, proc.pid, args, None)
        with_chat = run_phase(url, proc.pid, args, prompt)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    log.seek(0)
    server_log = log.read()
    ratio = with_chat["p99_ms"] / without["p99_ms"] if with_chat["p99_ms"] and without["p99_ms"] else None
    for phase in (without, with_chat):  # worker turns in the phase, from /healthz after it
        done = phase["health_after"]["batcher"]
        phase["batches"], phase["calls"] = done["batches"], done["calls"]
    with_chat["batches"] -= without["batches"]
    with_chat["calls"] -= without["calls"]
    report = {"source": source, "guard": info["guard"], "layers_run": info["layers_run"],
              "num_layers": info["num_layers"], "seconds": args.seconds,
              "clients": args.clients, "chat_clients": args.chat_clients, "chat_chars": chars,
              "bad_share": args.bad_share, "load_average": load, "settings": info["settings"],
              "moderation_only": without, "with_chat": with_chat, "p99_ratio": ratio,
              "server_tracebacks": server_log.count("Traceback")}
    bench = benchmark_json(report, None if args.throwaway else info["guard_id"], shown, info["machine"])
    md = markdown(bench)
    print(md)
    from safetyneurons._io import atomic_write_json, atomic_write_text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "mixed_load.json", json.loads(json.dumps(bench, default=str)))
    atomic_write_text(out / "mixed_load.md", md)
    print(f"wrote {out / 'mixed_load.json'} and {out / 'mixed_load.md'}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_serve":
        serve(*sys.argv[2:7])
    else:
        main()
