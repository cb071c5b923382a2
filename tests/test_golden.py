"""Artifacts of a tiny end-to-end run stay byte-identical: stores, neuron sets, probes, guard, reports.

The run and the hashing live in tests/golden_run.py; the expected hashes in tests/golden/tiny_run.json. When an
artifact change is *intended* (a new field, a new token mask...), regenerate the golden file with one line from
the repository root and commit it with the change:

    PYTHONPATH=src python tests/golden_run.py --write

Excluded from the comparison (machine-dependent, not code-dependent): ``versions`` objects, run.json's
``timings_s``, report.json's ``manifest_sha256``, guard.json's ``files`` and ``integrity`` (hashes over files
that hold ``versions``; those files are compared themselves), and PNG plots. Floating-point results depend on
the library versions and CPU; when the environment differs from the recorded one and the hashes disagree, the
test skips with the differences instead of failing (regenerate on the reference machine).
"""

from __future__ import annotations

import json

import pytest

from golden_run import GOLDEN, environment, run_tiny


def test_tiny_run_artifacts_are_byte_identical(tmp_path):
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    got = run_tiny(tmp_path)
    want = golden["files"]
    assert set(got) == set(want), f"artifact files changed: added {sorted(set(got) - set(want))}, " \
                                  f"removed {sorted(set(want) - set(got))}"
    changed = sorted(k for k in want if got[k] != want[k])
    if changed and environment() != golden["environment"]:
        pytest.skip(f"environment differs from the golden one ({golden['environment']}); changed: {changed}")
    assert not changed, f"artifacts changed: {changed}. If intended, regenerate: {golden['regenerate']}"
