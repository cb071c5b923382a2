"""The suite's own guards (tests/conftest.py), run on small inner test sessions (pytester, one subprocess each):

- a test that changes the files of a module- or session-scoped fixture fails (it must work on its own copy);
- a test session that changes the user's cache (the default model, its twin) fails;
- with ``SAFETYNEURONS_REQUIRE_E2E=1`` (CI) an end-to-end test on the real pair that would skip fails instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()

SHARED = '''
import pytest

@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shared")
    (d / "tokenizer_config.json").write_text('{"chat_template": "a"}')
    return d

def test_reads_it(shared_dir):
    assert (shared_dir / "tokenizer_config.json").read_text().startswith("{")

def test_edits_it_in_place(shared_dir):
    (shared_dir / "tokenizer_config.json").write_text('{"chat_template": "b"}')

def test_adds_a_file_to_it(shared_dir):
    (shared_dir / "extra.json").write_text("{}")

def test_edits_its_own_copy(shared_dir, tmp_path):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(shared_dir, copy)
    (copy / "tokenizer_config.json").write_text('{"chat_template": "c"}')

def test_cache_may_grow_but_never_change(cache):
    (cache / "models").mkdir(exist_ok=True)
    (cache / "models" / "m.json").write_text("1")

def test_cache_entry_is_rewritten(cache):
    (cache / "models" / "m.json").write_text("2")
'''

E2E = '''
import pytest

@pytest.mark.e2e
def test_marked_e2e_skips():
    pytest.skip("nothing to run on")

def test_names_the_default_twin():
    pytest.skip("default twin not built: run `safetyneurons twin`")

@pytest.mark.skipif(True, reason="no real default guard: build runs/default/guard")
def test_skipif_default_guard():
    pass

def test_unrelated_skip():
    pytest.skip("needs FIFOs")
'''


@pytest.fixture
def inner(pytester, tmp_path, monkeypatch):
    """An inner test directory with this suite's conftest and an empty user cache of its own."""
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nmarkers =\n    e2e: end-to-end tests on the real default model\n")
    monkeypatch.setenv("SAFETYNEURONS_CACHE", str(tmp_path / "user-cache"))
    monkeypatch.delenv("SAFETYNEURONS_REQUIRE_E2E", raising=False)
    return pytester


def test_a_test_that_changes_a_shared_fixture_fails(inner):
    inner.makepyfile(test_shared=SHARED)
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "-rf")
    outcomes = result.parseoutcomes()
    out = result.stdout.str()
    assert outcomes == {"passed": 3, "failed": 3}, out
    assert "FAILED test_shared.py::test_edits_it_in_place" in out and "shared_dir: changed " in out
    assert "FAILED test_shared.py::test_adds_a_file_to_it" in out and "shared_dir: added " in out
    assert "FAILED test_shared.py::test_cache_entry_is_rewritten" in out and "cache: changed " in out


def test_a_session_that_changes_the_user_cache_fails(inner, tmp_path):
    model = tmp_path / "user-cache" / "models" / "default"
    model.mkdir(parents=True)
    (model / "chat_template.jinja").write_text("{{ messages }}")
    inner.makepyfile(test_user=f'''
def test_changes_the_default_model():
    open({str(model / "chat_template.jinja")!r}, "w").write("changed")
''')
    result = inner.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret != 0 and result.parseoutcomes().get("errors") == 1, result.stdout.str()
    assert "changed the user's safetyneurons cache" in result.stdout.str()


@pytest.mark.parametrize("required", [False, True])
def test_a_skipped_end_to_end_test_fails_when_e2e_is_required(inner, monkeypatch, required):
    inner.makepyfile(test_e2e=E2E)
    if required:
        monkeypatch.setenv("SAFETYNEURONS_REQUIRE_E2E", "1")
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "-rfE")
    outcomes = result.parseoutcomes()
    if not required:
        assert outcomes == {"skipped": 4}, result.stdout.str()
        return
    assert outcomes.get("skipped") == 1 and outcomes.get("failed", 0) + outcomes.get("errors", 0) == 3, outcomes
    out = result.stdout.str()
    for name in ("test_marked_e2e_skips", "test_names_the_default_twin", "test_skipif_default_guard"):
        assert f"test_e2e.py::{name}" in out and "SAFETYNEURONS_REQUIRE_E2E=1" in out
    assert "test_unrelated_skip" not in out.split("short test summary")[-1]
