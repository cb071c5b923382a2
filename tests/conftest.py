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
