import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """An empty, private safetyneurons cache for tests that must not touch the user's cache."""
    d = tmp_path / "cache"
    monkeypatch.setenv("SAFETYNEURONS_CACHE", str(d))
    return d


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private safetyneurons cache shared by one test module (module-scoped fixtures build guards in it).

    It replaces pytest's own ``cache`` fixture, which no test here uses."""
    d = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFETYNEURONS_CACHE", str(d))
        yield d


@pytest.fixture(scope="module")
def guard(tmp_path_factory, cache):
    """The tiny guard of ``builders.build_guard``, loaded (one per test module)."""
    from builders import build_guard
    from safetyneurons.guard.guard import Guard

    path, lm, _, _ = build_guard(tmp_path_factory.mktemp("g"))
    return Guard.load(path, lm=lm)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, cache):
    """The planted guard of ``builders.build_planted_guard``, loaded (one per test module)."""
    from builders import build_planted_guard
    from safetyneurons.guard.guard import Guard

    path, lm, _ = build_planted_guard(tmp_path_factory.mktemp("planted"))
    return Guard.load(path, lm=lm)


# ------------------------------------------------------------------ end-to-end tests on the real default pair
REQUIRE_E2E = "SAFETYNEURONS_REQUIRE_E2E"
# skip reasons that name the real pair (the skip sites of tests that need the default twin or guard)
REAL_PAIR_WORDS = ("default guard", "default twin", "default model", "default pair", "runs/default")
USER_CACHE = os.environ.get("SAFETYNEURONS_CACHE")  # the cache `safetyneurons run` used (None: ~/.cache/...)


def needs_real_pair(item, reason: str) -> bool:
    """Whether a skipped test is an end-to-end test on the real default pair (marked ``e2e``, or skipped for a
    reason that names the default twin, model, pair or guard)."""
    return item.get_closest_marker("e2e") is not None or any(w in reason.lower() for w in REAL_PAIR_WORDS)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """With ``SAFETYNEURONS_REQUIRE_E2E=1`` (CI, see .ci/run) an end-to-end test that would skip fails instead."""
    report = yield
    if report.skipped and os.environ.get(REQUIRE_E2E) == "1" and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if needs_real_pair(item, reason):
            report.outcome = "failed"
            report.longrepr = (f"{item.nodeid} would skip ({reason}), but {REQUIRE_E2E}=1 requires every end-to-end "
                               f"test on the real default pair to run: build the default twin (`safetyneurons twin`) "
                               f"and a guard (`safetyneurons run --quick`, then SAFETYNEURONS_DEFAULT_GUARD="
                               f"runs/default-quick/guard), as .ci/run does.")
    return report


@pytest.fixture
def user_cache(monkeypatch):
    """The safetyneurons cache of the session's environment (where `safetyneurons run` converted the default
    model its guard records), even inside a module whose ``cache`` fixture points elsewhere: a guard must be
    loaded with the very model files it was made with, not with a copy converted again in another cache."""
    if USER_CACHE is None:
        monkeypatch.delenv("SAFETYNEURONS_CACHE", raising=False)
    else:
        monkeypatch.setenv("SAFETYNEURONS_CACHE", USER_CACHE)
    from safetyneurons._io import cache_dir

    return cache_dir()


@pytest.fixture(scope="module")
def real_guard():
    """The real default guard (``$SAFETYNEURONS_DEFAULT_GUARD`` or ``runs/default/guard``), loaded with the model
    of the user's cache (see ``user_cache``), one per test module."""
    from builders import default_guard_path
    from safetyneurons.guard.guard import Guard

    path = default_guard_path()
    if path is None:
        pytest.skip("no real default guard: set SAFETYNEURONS_DEFAULT_GUARD or build runs/default/guard with "
                    "`safetyneurons run`")
    with pytest.MonkeyPatch.context() as mp:
        if USER_CACHE is None:
            mp.delenv("SAFETYNEURONS_CACHE", raising=False)
        else:
            mp.setenv("SAFETYNEURONS_CACHE", USER_CACHE)
        return Guard.load(path)


# ------------------------------------------------------------------ shared fixtures' files never change
# A module- or session-scoped fixture is shared by the tests of its scope; a test that changes its files (a
# model's tokenizer, a guard's guard.json, a store's shards) changes what later tests read. Each test must work on
# its own copy (shutil.copytree). The files of every shared fixture are recorded when it is set up and checked
# after each test that uses it; the user's cache is checked over the whole session.
HASHED_BYTES = 1 << 20  # files up to this size are compared by content; larger ones by size, inode and mtime
# caches (these fixtures, and a "cache" folder inside a fixture) fill up by design: new entries are fine, changed
# or removed ones are not
CACHES = {"cache", "tmp_cache"}
CACHE_INDEX = "fingerprints.json"  # the cache's index of weight hashes, rewritten when a model is first hashed
_SHARED: dict[tuple[str, int], tuple[list[Path], dict]] = {}


def _file_key(p: Path) -> tuple:
    import hashlib

    st = p.stat()
    if st.st_size > HASHED_BYTES:
        return st.st_size, st.st_ino, st.st_mtime_ns
    return st.st_size, hashlib.sha256(p.read_bytes()).hexdigest()


def snapshot(paths: list[Path], skip: tuple[str, ...] = ()) -> dict:
    """{file: key} of every regular file under ``paths`` (a symlink is recorded as its target)."""
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            if p.name not in skip and not any(part.startswith(".download-") for part in p.parts):
                try:
                    out[str(p)] = _file_key(p)
                except OSError:
                    continue
    return out


def snapshot_changes(before: dict, after: dict, additions: bool) -> list[str]:
    changed = [f"changed {p}" for p in before if p in after and after[p] != before[p]]
    removed = [f"removed {p}" for p in before if p not in after]
    added = [f"added {p}" for p in after if p not in before and "cache" not in Path(p).parts] if additions else []
    return changed + removed + added


def fixture_paths(value, depth: int = 0) -> list[Path]:
    """The files and directories a fixture value holds: paths, and the ``path`` of this package's objects
    (Guard, its model, Store), inside tuples, lists and dicts."""
    if depth > 3:
        return []
    if isinstance(value, (str, Path)):
        p = Path(value)
        if not p.is_absolute() and not isinstance(value, Path):
            return []
        try:
            p = p.resolve()
            exists = p.exists()
        except (OSError, ValueError):
            return []
        here = Path.cwd().resolve()
        return [p] if exists and p != here and p not in here.parents and p != Path.home() else []
    if isinstance(value, (tuple, list)):
        return [q for v in value[:64] for q in fixture_paths(v, depth + 1)]
    if isinstance(value, dict):
        return [q for v in list(value.values())[:64] for q in fixture_paths(v, depth + 1)]
    if type(value).__module__.startswith("safetyneurons."):
        out = []
        for attr in ("path", "lm"):
            if attr in getattr(value, "__dict__", {}) or attr in getattr(type(value), "__dataclass_fields__", {}):
                out += fixture_paths(getattr(value, attr), depth + 1)
        return out
    return []


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    value = yield
    if fixturedef.scope != "function":
        paths = sorted(set(fixture_paths(value)))
        if paths:
            key = (fixturedef.argname, id(fixturedef))
            _SHARED[key] = (paths, snapshot(paths, (CACHE_INDEX,)))
            fixturedef.addfinalizer(lambda: _SHARED.pop(key, None))
    return value


def check_shared_fixtures(item) -> None:
    """Fail ``item`` if it changed the files of a module- or session-scoped fixture it uses."""
    infos = getattr(item, "_fixtureinfo", None)
    problems = []
    for name in getattr(item, "fixturenames", ()):
        defs = infos.name2fixturedefs.get(name) if infos else None
        key = (name, id(defs[-1])) if defs else None
        if key not in _SHARED:
            continue
        paths, before = _SHARED[key]
        after = snapshot(paths, (CACHE_INDEX,))
        problems += [f"{name}: {c}" for c in snapshot_changes(before, after, additions=name not in CACHES)]
        _SHARED[key] = (paths, after)  # reported once, by the test that made the change
    if problems:
        pytest.fail(f"{item.nodeid} changed the files of a shared fixture; make the test work on its own copy "
                    f"(shutil.copytree to tmp_path): " + "; ".join(problems[:10]), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    try:
        return (yield)
    finally:
        check_shared_fixtures(item)


def _user_cache_dirs() -> list[Path]:
    root = Path(USER_CACHE).expanduser() if USER_CACHE else Path.home() / ".cache" / "safetyneurons"
    return [root / d for d in ("models", "twins", "extracted", "wheels") if (root / d).is_dir()]


@pytest.fixture(scope="session", autouse=True)
def user_cache_is_unchanged():
    """No test changes or removes what the user's cache holds (the default model, its twin, the wheels)."""
    dirs = _user_cache_dirs()
    before = snapshot(dirs)
    yield
    problems = snapshot_changes(before, snapshot(dirs), additions=False)
    if problems:
        pytest.fail("the test session changed the user's safetyneurons cache: " + "; ".join(problems[:10]),
                    pytrace=False)
