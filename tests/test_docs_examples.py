"""Every fenced code block of README.md and docs/*.md is run here against tiny artefacts, or says why not.

A block is either
- an **output** block (language ``text``): shown, never run;
- **run**, in document order, one test per file, in a scratch project directory (the mapping below):
  ``bash``/``sh``/``console`` lines through the CLI in-process (click's runner), ``curl`` lines parsed and sent
  with httpx to the service a ``serve`` line started, ``python`` blocks exec'd in one namespace per document (the
  ``openai`` client pointed at that service), ``yaml``/``json`` blocks parsed;
- or marked by an HTML comment on the line above it (blank lines between are allowed):
  ``<!-- example: not-run: REASON -->`` (the whole default run, GPUs, pip, a 25-minute build...) or
  ``<!-- example: tested-by tests/FILE.py -->`` (FILE exists and has a test that names the document).

An unmarked block that holds a line this file cannot run fails the test, so the docs cannot gain an untested
example. The mapping (what the documents' names mean here):

- the scratch directory is the working directory; ``runs/default/guard`` in it is a tiny guard
  (``builders.build_guard``: a 4-layer random llama, a probe on 16 prompts; its ``strict`` and ``loose`` operating
  points set on those prompts as ``run`` sets them), ``prompts.txt`` / ``prompts.jsonl``
  hold two prompts, ``llama-base`` / ``llama-chat`` are a tiny pair, ``harmful.txt`` four prompts, ``mine.csv``
  and ``odd.parquet`` (columns ``utterance``, ``is_bad``) 16 labelled prompts;
- ``safetyneurons`` and ``.venv/bin/safetyneurons`` are ``safetyneurons.cli.main``; ``cat FILE | CMD`` feeds FILE
  to CMD's stdin; ``export K=V`` sets K for the later lines and blocks of the document, ``$K`` expands it;
- ``serve ... &`` serves the app the command builds on a free loopback port (uvicorn in a thread), and
  ``localhost:8000`` / ``127.0.0.1:8000`` in later ``curl`` lines and Python blocks of the document mean that port;
  a Python block that names port 8000 before any ``serve`` line gets ``serve --guard runs/default/guard
  --generate`` with the API key ``change-me``;
- CLI commands that run here: ``guard``, ``serve``, ``contrast`` on an explicit ``--base``/``--aligned`` pair,
  ``neurons select|plot``, ``data list|import`` and any ``--help``; anything else needs a marker;
- a YAML block whose first line names a file (``# ... (examples/x.yaml)``) must say what that file says.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shlex
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from builders import HOOK, SAFE, UNSAFE, build_guard, write_jsonl
from tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
MARKER = re.compile(r"<!--\s*example:\s*(not-run|tested-by)\s*:?\s*(.*?)\s*-->")
OUTPUT = {"text", "output"}
SHELL = {"bash", "sh", "shell", "console"}
PORT = 8000
CLI = {"safetyneurons", ".venv/bin/safetyneurons"}


@dataclass
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: tuple[str, str] | None

    def where(self) -> str:
        doc = self.doc.relative_to(ROOT) if self.doc.is_relative_to(ROOT) else self.doc
        return f"{doc}:{self.line}"


def blocks(doc: Path) -> list[Block]:
    """The fenced blocks of a markdown file, each with the example marker above it (if any)."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(2), m.group(3).lower(), i
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(m.group(1)):] if lines[i].startswith(m.group(1)) else lines[i])
            i += 1
        i += 1
        above = start - 1
        while above >= 0 and not lines[above].strip():
            above -= 1
        mark = MARKER.search(lines[above]) if above >= 0 else None
        out.append(Block(doc, start + 1, lang, "\n".join(body) + "\n",
                         (mark.group(1), mark.group(2)) if mark else None))
    return out


# ------------------------------------------------------------------------------------------- the scratch project
@pytest.fixture(scope="module")
def project(tmp_path_factory, cache):
    """The scratch project directory of the mapping above."""
    root = tmp_path_factory.mktemp("project")
    calibrated_guard(tmp_path_factory.mktemp("tiny-guard"), root / "runs" / "default" / "guard")
    (root / "prompts.txt").write_text(f"{UNSAFE[0]}\n{SAFE[0]}\n", encoding="utf-8")
    write_jsonl(root / "prompts.jsonl", [{"prompt": UNSAFE[0]}, {"prompt": SAFE[0]}])
    save_tiny(root / "llama-base", "llama", 0)
    save_tiny(root / "llama-chat", "llama", 1)
    (root / "harmful.txt").write_text("\n".join(UNSAFE[:4]) + "\n", encoding="utf-8")
    (root / "mine.csv").write_text("prompt,label\n" + "".join(f"{u},1\n{s},0\n" for u, s in zip(UNSAFE, SAFE)),
                                   encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"utterance": UNSAFE + SAFE, "is_bad": [1] * len(UNSAFE) + [0] * len(SAFE)}),
                   root / "odd.parquet")
    return root


def calibrated_guard(work: Path, out: Path) -> Path:
    """``builders.build_guard``'s tiny guard with both operating points (``strict``, ``loose``), set as ``run``
    sets them: on labelled prompts read as the guard reads them."""
    from safetyneurons.activations.features import FeatureSpec
    from safetyneurons.guard.artifact import export_guard
    from safetyneurons.guard.calibrate import calibrate_guard, guard_probe

    _, lm, ns, probe = build_guard(work)
    spec = FeatureSpec(hook_point=HOOK, max_length=64, neuron_set=ns, model=lm.describe())
    val = [{"prompt": p, "label": 1, "source": "h"} for p in UNSAFE] + \
          [{"prompt": p, "label": 0, "source": "s"} for p in SAFE]
    calibration = calibrate_guard(lm, spec, probe, val)
    return export_guard(out, lm_ref=str(work / "model"), lm_fingerprint=lm.fingerprint,
                        lm_tokenizer_fingerprint=lm.tokenizer_fingerprint, neuron_set=ns,
                        probe=guard_probe(probe, calibration), hook_point=HOOK, pooling="mean", max_length=64,
                        feature_set="safety", metrics={}, data={}, calibration=calibration)


@dataclass
class Session:
    """What the lines and blocks of one document share: the environment and the servers started."""
    root: Path
    env: dict = field(default_factory=dict)
    namespace: dict = field(default_factory=lambda: {"__name__": "__doc_example__"})
    servers: list = field(default_factory=list)

    @property
    def url(self) -> str | None:
        return self.servers[-1].url if self.servers else None

    def close(self):
        for s in self.servers:
            s.stop()


class Background:
    """A server the CLI built, served on its own (dup'ed) socket in a thread."""

    def __init__(self, app, sock):
        import uvicorn

        from safetyneurons.serve.server import uvicorn_config

        self.sock = sock.dup()  # the CLI closes its socket when `serve` returns
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn_config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        for _ in range(1500):
            if self.server.started:
                return
            assert self.thread.is_alive(), "uvicorn did not start"
            threading.Event().wait(0.02)
        raise AssertionError("uvicorn did not start within 30 s")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


# ------------------------------------------------------------------------------------------------- shell lines
def shell_lines(block: Block) -> list[str]:
    """Commands of a shell block: continuation lines joined, comments and blank lines dropped; for ``console``
    only the lines after a ``$`` prompt."""
    raw = block.code.splitlines()
    if block.lang == "console":
        raw = [l.strip()[2:] for l in raw if l.strip().startswith("$ ")]
    out, cur = [], ""
    for l in raw:
        if l.rstrip().endswith("\\"):
            cur += l.rstrip()[:-1] + " "
            continue
        cur += l
        try:
            shlex.split(cur, comments=True)
        except ValueError:  # a quoted argument that goes on over the next line
            cur += "\n"
            continue
        if cur.strip() and not cur.strip().startswith("#"):
            out.append(cur.strip())
        cur = ""
    assert not cur.strip(), f"{block.where()}: unclosed quote or continuation at the end of the block"
    return out


def expand(line: str, env: dict) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), line)


def runnable_cli(args: list[str]) -> bool:
    if "--help" in args or "-h" in args:
        return True
    head = args[0] if args else ""
    if head in ("guard", "serve"):
        return True
    if head == "contrast":
        return "--base" in args and "--aligned" in args
    sub = args[1] if len(args) > 1 else ""
    return (head, sub) in {("neurons", "select"), ("neurons", "plot"), ("data", "list"), ("data", "import")}


def run_cli(session: Session, args: list[str], stdin: str | None, monkeypatch, where: str):
    from click.testing import CliRunner

    import safetyneurons.cli.guard as cli_guard
    from safetyneurons.cli import app
    from safetyneurons.serve.server import bind_socket

    started = {}

    def fake_bind(host, port):  # port 8000 of the documents is any free port here
        return bind_socket(host, 0)

    def fake_run(app, sock, log_level="info"):
        started["server"] = Background(app, sock)

    logger = logging.getLogger("safetyneurons.serve.server")  # `serve` would log to the runner's closed stderr
    monkeypatch.setattr(logger, "handlers", [logging.NullHandler()])
    monkeypatch.setattr(logger, "propagate", logger.propagate)
    monkeypatch.setattr(logger, "level", logger.level)
    monkeypatch.setattr(cli_guard, "bind_socket", fake_bind)
    monkeypatch.setattr(cli_guard, "run_server", fake_run)
    res = CliRunner().invoke(app, args, input=stdin, env=session.env, prog_name="safetyneurons")
    assert res.exit_code == 0, f"{where}: `safetyneurons {shlex.join(args)}` exited {res.exit_code}:\n" \
                               f"{res.output}\n{res.exception!r}"
    if "server" in started:
        session.servers.append(started["server"])
    if args[0] == "guard" and "--json" in args:
        out = json.loads(res.stdout)
        assert out["results"] and all(isinstance(r["flagged"], bool) for r in out["results"]), out
    return res


def local_url(url: str, session: Session, where: str) -> str:
    if not url.startswith("http"):
        url = "http://" + url
    for host in (f"localhost:{PORT}", f"127.0.0.1:{PORT}"):
        if f"//{host}" in url:
            assert session.url, f"{where}: {url} but no `serve` line started a server before it"
            return url.replace(f"http://{host}", session.url)
    raise AssertionError(f"{where}: curl to {url}, not the served guard (localhost:{PORT})")


def run_curl(session: Session, args: list[str], where: str) -> httpx.Response:
    url, headers, data, method, i = None, {}, None, None, 1
    while i < len(args):
        a = args[i]
        if a in ("-H", "--header"):
            k, _, v = args[i + 1].partition(":")
            headers[k.strip()] = v.strip()
            i += 2
        elif a in ("-d", "--data", "--data-raw"):
            data, i = args[i + 1], i + 2
        elif a in ("-X", "--request"):
            method, i = args[i + 1], i + 2
        elif re.fullmatch(r"-[sSNfLv]+|--silent|--no-buffer|--fail", a):
            i += 1
        elif a.startswith("-"):
            raise AssertionError(f"{where}: curl option {a} is not understood by this test")
        else:
            url, i = a, i + 1
    url = local_url(url, session, where)
    r = httpx.request(method or ("POST" if data is not None else "GET"), url, headers=headers,
                      content=data.encode() if data is not None else None, timeout=120)
    assert r.status_code < 400, f"{where}: curl {url} answered {r.status_code}: {r.text[:300]}"
    check_shape(url, data, r, where)
    return r


def check_shape(url: str, data: str | None, r: httpx.Response, where: str) -> None:
    """The documented answer's shape for each endpoint."""
    path = httpx.URL(url).path
    if path == "/v1/chat/completions" and json.loads(data or "{}").get("stream"):
        events = [l[6:] for l in r.text.splitlines() if l.startswith("data: ")]
        assert events and events[-1] == "[DONE]", f"{where}: stream did not end with [DONE]"
        assert all("choices" in json.loads(e) for e in events[:-1]), where
        return
    body = r.json()
    if path == "/v1/moderations":
        n = len(json.loads(data)["input"]) if isinstance(json.loads(data)["input"], list) else 1
        res = body["results"]
        assert len(res) in (1, n), f"{where}: {len(res)} results"
        for x in res:
            assert isinstance(x["flagged"], bool), where
            assert all(isinstance(v, bool) for v in x["categories"].values()), where
            assert all(isinstance(v, float) for v in x["category_scores"].values()), where
    elif path == "/v1/chat/completions":
        c = body["choices"][0]
        assert isinstance(c["message"]["content"], str), where
        assert c["finish_reason"] in ("stop", "length", "content_filter"), where
        assert isinstance(body["safetyneurons"]["flagged"], bool), where
    elif path == "/healthz":
        assert body["status"] == "ok", where
    elif path == "/v1/guard":
        assert body["id"], where
    elif path.startswith("/beta/litellm"):
        assert body["action"] in ("BLOCKED", "NONE"), where


def run_shell(session: Session, block: Block, monkeypatch):
    for line in shell_lines(block):
        where = f"{block.where()} `{line[:60]}`"
        line = expand(line, session.env)
        stdin = None
        m = re.match(r"cat\s+(\S+)\s*\|\s*(.*)$", line)
        if m:
            stdin, line = (session.root / m.group(1)).read_text(encoding="utf-8"), m.group(2)
        args = shlex.split(line, comments=True)
        if args and args[-1] == "&":
            args = args[:-1]
        assert "|" not in args and ";" not in args and "&&" not in args, \
            f"{where}: a pipeline this test does not run; mark the block not-run or tested-by"
        if args[0] == "export":
            k, _, v = args[1].partition("=")
            session.env[k] = v
        elif args[0] in CLI and runnable_cli(args[1:]):
            run_cli(session, args[1:], stdin, monkeypatch, where)
        elif args[0] == "curl":
            run_curl(session, args, where)
        else:
            raise AssertionError(f"{where}: this test cannot run this line; make it a command it runs (see "
                                 f"tests/test_docs_examples.py) or mark the block <!-- example: not-run: WHY --> "
                                 f"or <!-- example: tested-by tests/FILE.py -->")


def run_python(session: Session, block: Block, monkeypatch):
    code = block.code
    if re.search(rf"(localhost|127\.0\.0\.1):{PORT}", code):
        if not session.url:
            session.env.setdefault("SAFETYNEURONS_API_KEY", "change-me")
            run_cli(session, ["serve", "--guard", "runs/default/guard", "--generate"], None, monkeypatch,
                    block.where())
        netloc = session.url.split("//")[1]
        code = re.sub(rf"(localhost|127\.0\.0\.1):{PORT}", netloc, code)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, block.where(), "exec"), session.namespace)
    if "print(" in code:
        assert out.getvalue().strip(), f"{block.where()}: printed nothing"


def check_yaml(block: Block) -> None:
    data = yaml.safe_load(block.code)
    assert data is not None, f"{block.where()}: empty YAML"
    named = re.search(r"\((\S+\.ya?ml)\)", block.code.splitlines()[0])
    if named:
        assert data == yaml.safe_load((ROOT / named.group(1)).read_text(encoding="utf-8")), \
            f"{block.where()}: the block differs from {named.group(1)}, which it names"


def check_marker(block: Block) -> None:
    kind, arg = block.marker
    if kind == "not-run":
        assert arg.strip(), f"{block.where()}: <!-- example: not-run: REASON --> needs a reason"
        return
    path = ROOT / arg.strip()
    assert path.is_file() and path.suffix == ".py", f"{block.where()}: tested-by {arg}: no such test file"
    text = path.read_text(encoding="utf-8")
    doc = str(block.doc.relative_to(ROOT) if block.doc.is_relative_to(ROOT) else block.doc.name)
    assert "def test_" in text and doc in text, f"{block.where()}: {arg} has no test that names {doc}"


def own_copy(project: Path, tmp_path: Path) -> Path:
    """A test's own copy of the scratch project (the examples write files into it)."""
    root = tmp_path / "project"
    shutil.copytree(project, root)
    return root


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_every_example_runs_or_says_why_not(doc, project, tmp_path, monkeypatch):
    root = own_copy(project, tmp_path)
    monkeypatch.chdir(root)
    monkeypatch.delenv("SAFETYNEURONS_API_KEY", raising=False)
    session = Session(root)
    try:
        for block in blocks(doc):
            if block.marker:
                check_marker(block)
            elif block.lang in OUTPUT:
                continue
            elif not block.lang:
                raise AssertionError(f"{block.where()}: a code block without a language; use ```text for "
                                     f"output and diagrams, or the language of the example")
            elif block.lang in SHELL:
                run_shell(session, block, monkeypatch)
            elif block.lang == "python":
                run_python(session, block, monkeypatch)
            elif block.lang == "yaml":
                check_yaml(block)
            elif block.lang == "json":
                json.loads(block.code)
            else:
                raise AssertionError(f"{block.where()}: no runner for ```{block.lang}; mark the block")
    finally:
        session.close()


# ----------------------------------------------------------------------------------- the checker checks itself
def test_an_unmarked_unrunnable_block_fails(tmp_path, project, monkeypatch):
    doc = tmp_path / "x.md"
    doc.write_text("```bash\npip install something\n```\n\n<!-- example: not-run: installs -->\n\n```bash\n"
                   "pip install something\n```\n\n```\nbare\n```\n", encoding="utf-8")
    got = blocks(doc)
    assert [b.marker for b in got] == [None, ("not-run", "installs"), None]
    assert [b.lang for b in got] == ["bash", "bash", ""]
    root = own_copy(project, tmp_path)
    session = Session(root)
    monkeypatch.chdir(root)
    with pytest.raises(AssertionError, match="cannot run this line"):
        run_shell(session, got[0], monkeypatch)
    check_marker(got[1])
    bad = Block(doc, 1, "bash", "", ("tested-by", "tests/test_io.py"))
    with pytest.raises(AssertionError, match="has no test that names"):
        check_marker(bad)


def test_a_curl_example_that_fails_fails(project, tmp_path, monkeypatch):
    """A moderation curl without the Authorization header, against a server with a key, is a 401: caught."""
    root = own_copy(project, tmp_path)
    monkeypatch.chdir(root)
    session = Session(root, env={"SAFETYNEURONS_API_KEY": "change-me"})
    try:
        run_shell(session, Block(ROOT / "README.md", 1, "bash",
                                 "safetyneurons serve --guard runs/default/guard --port 8000 &\n", None), monkeypatch)
        ok = ("curl -s localhost:8000/v1/moderations -H \"Authorization: Bearer $SAFETYNEURONS_API_KEY\" "
              "-H 'Content-Type: application/json' -d '{\"input\": [\"hi\", \"How do I make a bomb at home?\"]}'\n")
        run_shell(session, Block(ROOT / "README.md", 2, "bash", ok, None), monkeypatch)
        bad = "curl -s localhost:8000/v1/moderations -H 'Content-Type: application/json' -d '{\"input\": \"hi\"}'\n"
        with pytest.raises(AssertionError, match="answered 401"):
            run_shell(session, Block(ROOT / "README.md", 3, "bash", bad, None), monkeypatch)
        with pytest.raises(Exception):  # the openai client raises on the 401 of a wrong key
            run_python(session, Block(ROOT / "README.md", 4, "python",
                                      "from openai import OpenAI\nOpenAI(base_url='http://localhost:8000/v1', "
                                      "api_key='wrong', max_retries=0).moderations.create(input='hi')\n", None),
                       monkeypatch)
    finally:
        session.close()


def test_the_readme_stays_a_five_minute_read():
    """README.md: at most 200 lines, its results only inside the blocks `safetyneurons report` fills."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200, "README.md is over 200 lines; move detail into docs/"
    for name in ("probes", "causal", "guard", "readouts", "mixed_load"):
        assert text.count(f"<!-- generated:{name} -->") == 1 and text.count(f"<!-- /generated:{name} -->") == 1, name
