"""Artifacts of a tiny end-to-end run keep their contents: stores, neuron sets, probes, guard, reports.

The run lives in tests/golden_run.py, the snapshots and their comparison in tests/golden_compare.py, the expected
contents in tests/golden/tiny_run.json. When an artifact change is *intended* (a new field, a new token mask...),
regenerate the golden file with one line from the repository root and commit it with the change:

    PYTHONPATH=src python tests/golden_run.py --write

What is compared, and how (details and the measured numbers behind the tolerances: tests/golden_compare.py):

* the set of artifact files (PNG plots, the run's README.md and probes/report.md left out);
* JSON files as parsed JSON, without the machine-dependent keys: ``versions`` objects, run.json's ``timings_s``,
  report.json's ``manifest_sha256``, guard.json's ``files`` and ``integrity`` (hashes over files that hold
  ``versions``; those files are compared themselves);
* safetensors files by their metadata (as JSON) and every tensor (name, dtype, shape, values);
* other files (the stores' records.jsonl, contrast/variants.md) by their exact text.

Keys, strings, integers, booleans, nulls, list lengths, tensor names, dtypes and shapes, integer tensors (labels,
rows), neuron indices, ids, counts and confusion matrices must match exactly. Floats match within a tolerance:
relative 1e-4 (plus 1e-5 of the tensor's largest magnitude) for activations and what is summed from them
(store/, contrast/), relative 5e-3 for fitted probes and what derives from them (probes/, guard/, report.json,
run.json): the solvers stop at a tolerance, so their output moves with the last bits of their input across CPUs
(BLAS kernels). sha256 digests over floating-point data must be digests, not equal ones. The test never skips:
the golden environment is shown for information when it fails.
"""

from __future__ import annotations

import json

from golden_compare import ACTIVATIONS, FITTED, compare_files, compare_values, dumps, snapshot, tolerance_for
from golden_run import REGENERATE, environment, load_golden, run_tiny


def test_tiny_run_artifacts_match_golden(tmp_path):
    golden = load_golden()
    problems = compare_files(golden["files"], run_tiny(tmp_path))
    if problems:
        recorded = golden.get("environment (for information; not compared)", {})
        here = environment()
        env = {k: (recorded.get(k), here.get(k)) for k in sorted(set(recorded) | set(here))
               if recorded.get(k) != here.get(k)}
        raise AssertionError(
            f"{len(problems)} difference(s) from tests/golden/tiny_run.json (want = golden, got = this run):\n  "
            + "\n  ".join(problems)
            + f"\nEnvironment differences (golden, here): {json.dumps(env) if env else 'none'}"
            + f"\nIf the change is intended, regenerate: {REGENERATE}")


# ------------------------------------------------- the comparison can fail (small objects, no pipeline run)

DIGEST_A, DIGEST_B = "a" * 64, "b" * 64


def _files() -> dict:
    """A miniature golden map: a store shard, a store manifest, a probe file, a report, a text file."""
    return {
        "store/train/shard-00000.safetensors": {"kind": "safetensors", "metadata": {
            "safetyneurons": {"format": "safetyneurons.store/2", "plan": DIGEST_A, "shard": 0}}, "tensors": {
            "features": {"dtype": "float32", "shape": [2, 3], "values": [[1e-3, -2e-4, 5e-8], [0.0, 3e-4, 1e-3]]},
            "labels": {"dtype": "int64", "shape": [2], "values": [1, 0]}}},
        "store/train/manifest.json": {"kind": "json", "content": {
            "format": "safetyneurons.store/2", "ids": ["h:0", "s:0"], "labels": [1, 0], "plan_sha256": DIGEST_A,
            "shards": [{"file": "shard-00000.safetensors", "sha256": DIGEST_A}], "records_sha256": DIGEST_B}},
        "probes/report.json": {"kind": "json", "content": {"results": [
            {"feature_set": "safety", "threshold": 0.12970788, "platt": [2.6159, -0.0987],
             "metrics": {"accuracy": 1.0, "confusion_matrix": [[10, 0], [0, 10]]}}],
            "neurons": {"indices": [[1, 3], [1, 17]]}}},
        "store/train/records.jsonl": {"kind": "text", "text": '{"id": "h:0"}\n{"id": "s:0"}\n'},
    }


def _check(mutate) -> list[str]:
    want, got = _files(), _files()
    mutate(got)
    return compare_files(want, got)


def test_identical_snapshots_match():
    assert compare_files(_files(), _files()) == []
    # and after a trip through the golden file's own format
    assert compare_files(json.loads(dumps(_files())), _files()) == []


def _features(f):
    return f["store/train/shard-00000.safetensors"]["tensors"]["features"]["values"]


def test_tensor_value_beyond_tolerance_is_named():
    problems = _check(lambda f: _features(f)[1].__setitem__(1, 3.003e-4))  # 1e-3 relative: 10x rtol
    assert len(problems) == 2, problems
    assert problems[0].startswith("store/train/shard-00000.safetensors: tensor 'features': 1 of 6 values")
    assert "tensor 'features'[1, 1]: want 0.0003, got 0.0003003" in problems[1]


def test_tensor_value_within_cross_cpu_noise_passes():
    def noise(f):
        v = _features(f)
        v[0][0] *= 1 + 2e-7             # a few float32 ulps
        v[0][2] += 5e-10                # a near-zero element: covered by the scale term (1e-5 x 1e-3)
    assert _check(noise) == []


def test_tensor_near_zero_element_beyond_scale_term_fails():
    problems = _check(lambda f: _features(f)[0].__setitem__(2, 5e-8 + 1e-7))
    assert any("tensor 'features'[0, 2]" in p for p in problems), problems


def test_integer_tensor_dtype_and_shape_are_exact():
    def flip_label(f):
        f["store/train/shard-00000.safetensors"]["tensors"]["labels"]["values"][1] = 1
    assert any("tensor 'labels'[1]: want 0, got 1" in p for p in _check(flip_label))

    def to_float64(f):
        f["store/train/shard-00000.safetensors"]["tensors"]["features"]["dtype"] = "float64"
    assert any("tensor 'features': want float32 [2, 3], got float64 [2, 3]" in p for p in _check(to_float64))

    def drop_row(f):
        t = f["store/train/shard-00000.safetensors"]["tensors"]["features"]
        t["shape"], t["values"] = [1, 3], t["values"][:1]
    assert any("want float32 [2, 3], got float32 [1, 3]" in p for p in _check(drop_row))

    def drop_tensor(f):
        del f["store/train/shard-00000.safetensors"]["tensors"]["labels"]
    assert any("tensor 'labels' missing" in p for p in _check(drop_tensor))


def test_metadata_string_change_is_named():
    def rename(f):
        f["store/train/shard-00000.safetensors"]["metadata"]["safetyneurons"]["format"] = "safetyneurons.x/2"
    (problem,) = _check(rename)
    assert problem == ("store/train/shard-00000.safetensors: metadata $.safetyneurons.format: "
                       "want 'safetyneurons.store/2', got 'safetyneurons.x/2'")


def test_json_string_change_is_named():
    (problem,) = _check(lambda f: f["store/train/manifest.json"]["content"]["ids"].__setitem__(1, "s:1"))
    assert problem == "store/train/manifest.json: $.ids[1]: want 's:0', got 's:1'"


def test_dropped_and_added_keys_are_named():
    def drop(f):
        del f["probes/report.json"]["content"]["results"][0]["platt"]
    (problem,) = _check(drop)
    assert problem.startswith("probes/report.json: $.results[0]: key 'platt' missing (want [2.6159, -0.0987]")

    (problem,) = _check(lambda f: f["probes/report.json"]["content"].__setitem__("extra", 1))
    assert problem == "probes/report.json: $: unexpected key 'extra' (got 1)"


def test_integers_neuron_indices_and_counts_are_exact():
    (problem,) = _check(lambda f: f["probes/report.json"]["content"]["neurons"]["indices"][1].__setitem__(1, 18))
    assert problem == "probes/report.json: $.neurons.indices[1][1]: want 17, got 18"

    def one_sample_flips(f):
        m = f["probes/report.json"]["content"]["results"][0]["metrics"]
        m["confusion_matrix"] = [[9, 1], [0, 10]]
        m["accuracy"] = 0.95
    problems = _check(one_sample_flips)
    assert "probes/report.json: $.results[0].metrics.accuracy: want 1.0, got 0.95" in problems[0]
    assert problems[1:] == ["probes/report.json: $.results[0].metrics.confusion_matrix[0][0]: want 10, got 9",
                            "probes/report.json: $.results[0].metrics.confusion_matrix[0][1]: want 0, got 1"]

    (problem,) = _check(lambda f: f["store/train/manifest.json"]["content"]["labels"].__setitem__(0, 1.0))
    assert problem == "store/train/manifest.json: $.labels[0]: want integer 1, got float 1.0"


def test_json_floats_use_the_files_tolerance():
    def nudge(rel):
        def mutate(f):
            f["probes/report.json"]["content"]["results"][0]["threshold"] = 0.12970788 * (1 + rel)
        return mutate
    assert _check(nudge(5e-4)) == []   # a libsvm-sized move (measured: up to 5.8e-4)
    (problem,) = _check(nudge(2e-2))
    assert problem.startswith("probes/report.json: $.results[0].threshold: want 0.12970788, got 0.1323")
    assert "> tolerance" in problem
    assert tolerance_for("store/val/manifest.json") is ACTIVATIONS and tolerance_for("run.json") is FITTED
    assert compare_values(1.0, 1.0 + 5e-4, ACTIVATIONS) != []   # activations are held 50x tighter


def test_float_digests_must_be_digests_other_digests_exact():
    def new_float_digests(f):
        c = f["store/train/manifest.json"]["content"]
        c["plan_sha256"], c["shards"][0]["sha256"] = DIGEST_B, DIGEST_B
        f["store/train/shard-00000.safetensors"]["metadata"]["safetyneurons"]["plan"] = DIGEST_B
    assert _check(new_float_digests) == []

    (problem,) = _check(lambda f: f["store/train/manifest.json"]["content"].__setitem__("plan_sha256", "n/a"))
    assert problem == "store/train/manifest.json: $.plan_sha256: want a sha256 digest, got 'n/a'"

    (problem,) = _check(lambda f: f["store/train/manifest.json"]["content"].__setitem__("records_sha256", DIGEST_A))
    assert problem.startswith("store/train/manifest.json: $.records_sha256: want 'bbbb")


def test_list_length_text_and_file_set_changes_are_named():
    (problem,) = _check(lambda f: f["store/train/manifest.json"]["content"]["ids"].append("h:1"))
    assert problem == "store/train/manifest.json: $.ids: want 2 items, got 3"

    def edit_text(f):
        f["store/train/records.jsonl"]["text"] = '{"id": "h:0"}\n{"id": "s:9"}\n'
    (problem,) = _check(edit_text)
    assert problem == ("store/train/records.jsonl: first difference on line 2: want '{\"id\": \"s:0\"}', "
                       "got '{\"id\": \"s:9\"}'")

    def move(f):
        f["probes/report2.json"] = f.pop("probes/report.json")
    assert _check(move) == ["probes/report.json: missing (in the golden file, not written by the run)",
                            "probes/report2.json: new file (written by the run, not in the golden file)"]


def test_many_differences_are_truncated_per_file():
    def scramble(f):
        c = f["store/train/manifest.json"]["content"]
        c.update(ids=["x", "y"], labels=[0, 1], format="z", records_sha256=DIGEST_A)  # 6 differences
    problems = _check(scramble)
    assert len(problems) == 6 and problems[-1] == "store/train/manifest.json: ... and 1 more differences"


def test_snapshot_of_real_files_detects_a_perturbed_tensor(tmp_path):
    import torch
    from safetensors.torch import save_file

    x = torch.linspace(-1, 1, 12, dtype=torch.float32).reshape(3, 4)
    meta = {"safetyneurons": json.dumps({"format": "safetyneurons.probe/2"})}
    save_file({"coef": x, "rows": torch.arange(3)}, tmp_path / "probe.safetensors", metadata=meta)
    (tmp_path / "probe.json").write_text(json.dumps({"format": "safetyneurons.probe/2", "threshold": 0.5,
                                                     "versions": {"torch": "1"}}))
    name = "probes/probes/p/probe.safetensors"
    want = {name: snapshot(tmp_path / "probe.safetensors"), "guard/probe.json": snapshot(tmp_path / "probe.json")}
    want = json.loads(dumps(want))
    assert "versions" not in want["guard/probe.json"]["content"]
    assert want[name]["tensors"]["coef"]["values"][0][1] == float(str(x[0, 1].numpy()))  # shortest float32 form

    y = x.clone()
    y[2, 3] = 1.01
    save_file({"coef": y, "rows": torch.arange(3)}, tmp_path / "probe.safetensors", metadata=meta)
    (tmp_path / "probe.json").write_text(json.dumps({"format": "safetyneurons.probe/2", "threshold": 0.5,
                                                     "versions": {"torch": "2"}}))  # versions: not compared
    got = {name: snapshot(tmp_path / "probe.safetensors"), "guard/probe.json": snapshot(tmp_path / "probe.json")}
    problems = compare_files(want, got)
    assert problems[0].startswith(f"{name}: tensor 'coef': 1 of 12 values out of tolerance")
    assert problems[1].startswith(f"{name}: tensor 'coef'[2, 3]: want 1.0, got 1.01 (tolerance 0.0051)")
    assert len(problems) == 2
