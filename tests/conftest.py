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
