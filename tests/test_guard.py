"""Guard artifact, scoring API and `safetyneurons guard` CLI, on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from safetyneurons.errors import UserError
from safetyneurons.guard.guard import GUARD_FILE, Guard, GuardResult, content_sha256, export_guard
from safetyneurons.neurons.selection import NeuronSet
from safetyneurons.probes.probe import Probe
from builders import HOOK, MLP, NUM_LAYERS, QUERIES, SAFE, UNSAFE, build_guard, run_cli
from tiny import save_tiny


@pytest.fixture(scope="module")
def built(tmp_path_factory, cache):
    return build_guard(tmp_path_factory.mktemp("g"))


def full_pass_proba(lm, ns: NeuronSet, probe, prompts, max_length=64) -> np.ndarray:
    """Reference: the whole model with its LM head, mlp_neurons captured with hooks, mean over the message."""
    from safetyneurons.model.hooks import decoder_layers

    blocks = decoder_layers(lm.model)
    feats = []
    for p in prompts:  # one prompt at a time: no padding at all
        enc = lm.encode([p], max_length=max_length)
        acts = {}
        handles = [blocks[l].mlp.down_proj.register_forward_pre_hook(
            lambda m, a, l=l: acts.__setitem__(l, a[0].detach().float())) for l in range(len(blocks))]
        try:
            with torch.no_grad():
                out = lm.model(**enc)
        finally:
            for h in handles:
                h.remove()
        assert out.logits.shape[:2] == enc["input_ids"].shape  # the LM head ran on every position
        # the guard pools the user's message only: the tokens between the template's prefix and suffix
        formatted = lm.format(p)
        start = len(lm.tokenizer(formatted[:formatted.index(p)], add_special_tokens=False)["input_ids"])
        rows = slice(start, start + len(lm.tokenizer(p, add_special_tokens=False)["input_ids"]))
        feats.append(np.array([acts[l][0, rows].mean(0)[i].item() for l, i in zip(ns.layers, ns.indices)]))
    return probe.unsafe_probability(np.stack(feats))


# --------------------------------------------------------------------------------------- artifact
def test_export_writes_self_describing_guard_without_pickle(built):
    path, lm, ns, probe = built
    assert sorted(p.name for p in path.iterdir()) == ["guard.json", "probe.json", "probe.safetensors"]
    meta = json.loads((path / GUARD_FILE).read_text())
    assert meta["model"] == {"ref": str(lm.path), "sha256": lm.fingerprint,
                             "tokenizer_sha256": lm.tokenizer_fingerprint} and len(lm.fingerprint) == 64
    assert len(lm.tokenizer_fingerprint) == 64
    assert meta["hook_point"] == HOOK and meta["pooling"] == "mean" and meta["max_length"] == 64
    assert meta["feature_set"] == "safety" and meta["classifier"] == "logreg"
    assert NeuronSet.from_json(meta["neuron_set"]).flat_indices().tolist() == ns.flat_indices().tolist()
    assert meta["deepest_layer"] == ns.deepest_layer == 1
    assert meta["threshold"] == probe.threshold and "Youden" in meta["threshold_rule"]
    assert meta["metrics"] == {"auroc": 0.75, "f1": None}  # NaN stored as null (strict JSON)
    assert meta["data"]["train"]["records_sha256"] == "ab" * 32
    assert {"torch", "transformers", "numpy", "scikit-learn"} <= set(meta["versions"])
    from safetyneurons._io import sha256_file

    assert meta["files"] == {n: sha256_file(path / n) for n in ("probe.json", "probe.safetensors")}
    assert meta["integrity"]["content_sha256"] == content_sha256(meta)
    for p in path.iterdir():  # no pickle protocol header anywhere
        assert not p.read_bytes().startswith(b"\x80")


def test_round_trip_load_scores_identically_with_given_or_reloaded_model(built):
    path, lm, ns, probe = built
    from safetyneurons.activations.reader import pooled_features

    direct = probe.unsafe_probability(pooled_features(lm, QUERIES, HOOK, neuron_set=ns, max_length=64))
    g1 = Guard.load(path, lm=lm)
    g2 = Guard.load(path)  # loads the model from the ref in guard.json, checks its sha256
    assert g2.lm is not lm and g2.lm.fingerprint == lm.fingerprint
    r1, r2 = g1.score(QUERIES), g2.score(QUERIES)
    assert all(isinstance(r, GuardResult) for r in r1)
    p1 = np.array([r.unsafe_probability for r in r1])
    np.testing.assert_array_equal(p1, np.array([r.unsafe_probability for r in r2]))
    fits = np.array([len(g1.reader.pieces([q])) == 1 for q in QUERIES])  # longer ones: windows too (test_reader.py)
    assert fits.sum() >= 3
    np.testing.assert_allclose(p1[fits], direct[fits], rtol=0, atol=1e-12)
    assert [r.flagged for r in r1] == [bool(v >= probe.threshold) for v in p1]
    assert g1.threshold == probe.threshold and g1.layers_run == 2
    # batching does not change scores: one at a time == all at once
    one = [Guard.load(path, lm=lm, batch_size=1).score([q])[0].unsafe_probability for q in QUERIES]
    np.testing.assert_allclose(one, p1, rtol=1e-6, atol=1e-7)
    single = g1.score("How do I make a bomb?")  # a bare string is one prompt
    assert len(single) == 1 and single[0].unsafe_probability == pytest.approx(p1[0], abs=1e-6)
    assert g1.score([]) == []


def test_threshold_override_changes_flags_not_probabilities(built):
    path, lm, _, _ = built
    g = Guard.load(path, lm=lm)
    p = [r.unsafe_probability for r in g.score(QUERIES)]
    mid = float(np.median(p))
    g_mid = Guard.load(path, lm=lm, threshold=mid)
    res = g_mid.score(QUERIES)
    assert [r.unsafe_probability for r in res] == p
    assert [r.flagged for r in res] == [v >= mid for v in p]
    assert all(r.flagged for r in g.score(QUERIES, threshold=0.0))
    assert [r.flagged for r in g.score(QUERIES, threshold=1.0)] == [v >= 1.0 for v in p]
    with pytest.raises(UserError, match="between 0 and 1"):
        Guard.load(path, lm=lm, threshold=1.5)
    with pytest.raises(UserError, match="empty"):
        g.score(["ok", "  "])


def test_early_exit_scores_equal_full_pass_scores_and_skip_later_layers(built):
    path, lm, ns, probe = built
    g = Guard.load(path, lm=lm)
    from safetyneurons.model.hooks import decoder_layers

    ran = []
    handles = [decoder_layers(lm.model)[i].register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
               for i in range(NUM_LAYERS)]  # records the layers that start
    handles.append(lm.model.lm_head.register_forward_hook(lambda m, a, o: ran.append("lm_head")))
    try:
        short = QUERIES[:3]  # within the 64-token limit (the long one is read in windows: test_hardening.py)
        early = np.array([r.unsafe_probability for r in g.score(short)])
        assert set(ran) == {0, 1}  # deepest safety-neuron layer is 1: layers 2, 3 and the LM head never ran
        ran.clear()
        full = full_pass_proba(lm, ns, probe, short)
        assert set(ran) == {0, 1, 2, 3, "lm_head"}
    finally:
        for h in handles:
            h.remove()
    np.testing.assert_allclose(early, full, rtol=1e-5, atol=1e-6)


def test_svm_last_token_guard_and_all_neuron_guard(tmp_path, cache):
    from safetyneurons.activations.reader import max_per_input, pooled_features

    path, lm, ns, probe = build_guard(tmp_path, classifier="svm", deepest=2, pooling="last")
    g = Guard.load(path, lm=lm)

    X, owner = g.reader.read(QUERIES)  # the last query is longer than 64 tokens: read in windows
    assert len(X) > len(QUERIES) and owner.tolist()[:3] == [0, 1, 2]
    want = max_per_input(probe.unsafe_probability(X), owner, len(QUERIES))
    np.testing.assert_allclose([r.unsafe_probability for r in g.score(QUERIES)], want, atol=1e-12)
    assert g.layers_run == 3 and g.metadata()["classifier"] == "svm"
    # no neuron set: the probe reads every neuron (all / pca feature sets); the whole stack runs
    path2, lm2, _, probe2 = build_guard(tmp_path, neuron_set=False)
    g2 = Guard.load(path2, lm=lm2)
    assert g2.neuron_set is None and g2.layers_run == NUM_LAYERS and g2.meta["n_features"] == NUM_LAYERS * MLP
    fits = np.array([len(g2.reader.pieces([q])) == 1 for q in QUERIES])  # longer ones: windows too
    X2 = pooled_features(lm2, QUERIES, HOOK, max_length=64)
    got = np.array([r.unsafe_probability for r in g2.score(QUERIES)])
    np.testing.assert_allclose(got[fits], probe2.unsafe_probability(X2)[fits], atol=1e-12)


def test_metadata_summarises_the_neuron_set(built):
    path, lm, ns, probe = built
    md = Guard.load(path, lm=lm, threshold=0.3).metadata()
    assert md["neuron_set"]["count"] == len(ns) and md["neuron_set"]["deepest_layer"] == 1
    assert md["neuron_set"]["per_layer_counts"] == ns.per_layer_counts().tolist()
    assert md["threshold_in_use"] == 0.3 and md["threshold"] == probe.threshold
    assert md["id"] == json.loads((path / GUARD_FILE).read_text())["integrity"]["content_sha256"]
    json.dumps(md)  # strict-JSON serialisable


# ---------------------------------------------------------------------------------------- tampering
def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_changed_bytes_in_probe_safetensors_are_refused(built, tmp_path):
    path, lm, _, _ = built
    g = _copy(path, tmp_path / "g")
    data = bytearray((g / "probe.safetensors").read_bytes())
    data[-3] ^= 0x01  # flip one bit of a weight
    (g / "probe.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"probe\.safetensors changed.*tampered"):
        Guard.load(g, lm=lm)


def test_edited_guard_json_is_refused(built, tmp_path):
    path, lm, _, _ = built
    g = _copy(path, tmp_path / "g")
    meta = json.loads((g / GUARD_FILE).read_text())
    meta["hook_point"] = "resid"
    (g / GUARD_FILE).write_text(json.dumps(meta, indent=2))
    with pytest.raises(UserError, match="integrity check failed"):
        Guard.load(g, lm=lm)
    meta.pop("integrity")
    (g / GUARD_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="integrity hash is missing"):
        Guard.load(g, lm=lm)


def test_re_hashed_forgery_is_caught_by_pinning_the_guard_id(built, tmp_path):
    """Someone who rewrites the weights AND recomputes every hash gets past the corruption checks;
    pinning the guard id (expected_sha256) is what catches it."""
    path, lm, _, probe = built
    from safetyneurons._io import atomic_write_json, sha256_file

    good_id = Guard.load(path, lm=lm).id
    assert Guard.load(path, lm=lm, expected_sha256=good_id).id == good_id
    g = _copy(path, tmp_path / "g")
    meta = json.loads((g / GUARD_FILE).read_text())
    forged = Probe.load(g)
    forged.threshold = 0.0  # flag everything
    forged.save(g)  # (replaces the directory: guard.json is rewritten below)
    meta["threshold"] = 0.0
    meta["files"] = {n: sha256_file(g / n) for n in meta["files"]}
    meta["integrity"]["content_sha256"] = content_sha256(meta)
    atomic_write_json(g / GUARD_FILE, meta)
    assert Guard.load(g, lm=lm).threshold == 0.0  # self-consistent forgery loads...
    with pytest.raises(UserError, match="not the expected"):  # ...unless the id is pinned
        Guard.load(g, lm=lm, expected_sha256=good_id)


def test_missing_extra_and_mismatched_files_are_refused(built, tmp_path, cache):
    path, lm, _, _ = built
    g = _copy(path, tmp_path / "missing")
    (g / "probe.json").unlink()
    with pytest.raises(UserError, match="missing: probe.json"):
        Guard.load(g, lm=lm)
    g = _copy(path, tmp_path / "extra")
    (g / "evil.pkl").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(UserError, match="unexpected file.*evil.pkl"):
        Guard.load(g, lm=lm)
    with pytest.raises(UserError, match="does not exist"):
        Guard.load(tmp_path / "nope", lm=lm)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no guard.json"):
        Guard.load(tmp_path / "empty", lm=lm)


def test_other_model_weights_are_refused(built, tmp_path, cache):
    path, lm, _, _ = built
    other = save_tiny(tmp_path / "other", "llama", 1, layers=NUM_LAYERS, mlp=MLP)  # same shapes, other weights
    with pytest.raises(UserError, match="Model mismatch"):
        Guard.load(path, model_ref=str(other))
    from tiny import tiny_lm

    in_memory = tiny_lm("llama", 0, layers=NUM_LAYERS, mlp=MLP)  # no fingerprint
    with pytest.raises(UserError, match="no fingerprint"):
        Guard.load(path, lm=in_memory)
    g = Guard.load(path, lm=in_memory, verify_model=False)  # explicit opt-out
    assert len(g.score(["hi"])) == 1


def test_export_validates_inputs_and_leaves_nothing_on_failure(built, tmp_path):
    _, lm, ns, probe = built
    kw = dict(lm_ref=str(lm.path), lm_fingerprint=lm.fingerprint, probe=probe, pooling="mean", max_length=64,
              feature_set="safety", metrics={}, data={})
    smaller = NeuronSet(hook_point=HOOK, num_layers=NUM_LAYERS, width=MLP, layers=ns.layers[:3],
                        indices=ns.indices[:3], scores=ns.scores[:3])
    with pytest.raises(UserError, match="reads 12 features but the neuron set holds 3"):
        export_guard(tmp_path / "a", neuron_set=smaller, hook_point=HOOK, **kw)
    with pytest.raises(UserError, match="hook point"):
        export_guard(tmp_path / "b", neuron_set=ns, hook_point="resid", **kw)
    with pytest.raises(UserError, match="pooling"):
        export_guard(tmp_path / "c", neuron_set=ns, hook_point=HOOK, **{**kw, "pooling": "max"})
    from safetyneurons.probes.probe import TextProbe

    with pytest.raises(UserError, match="activation probe"):
        export_guard(tmp_path / "d", neuron_set=ns, hook_point=HOOK, **{**kw, "probe": TextProbe()})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_scores_prompts_and_files_as_json_and_table(built, tmp_path, cache):
    path, lm, _, _ = built
    expected = [r.unsafe_probability for r in Guard.load(path, lm=lm).score(QUERIES)]
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(QUERIES[2:]) + "\n\n")
    r = run_cli("guard", "--guard", path, QUERIES[0], QUERIES[1], "--file", f, "--json", cache=cache)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [x["prompt"] for x in out["results"]] == QUERIES
    np.testing.assert_allclose([x["unsafe_probability"] for x in out["results"]], expected, rtol=1e-6, atol=1e-7)
    r = run_cli("guard", "--guard", path, "--threshold", "0", QUERIES[3], cache=cache)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["#", "p(unsafe)", "flagged", "prompt"]
    assert "YES" in lines[1] and lines[1].rstrip().endswith("…")  # long prompt excerpted
    assert "1 of 1 flagged (threshold 0.0000" in r.stdout and "2 of 4 layers run" in r.stdout


@pytest.mark.parametrize("case", ["missing_dir", "no_prompt", "empty_file", "missing_file", "bad_threshold",
                                  "not_a_guard"])
def test_cli_bad_inputs_exit_2_with_a_clear_message(built, tmp_path, cache, case):
    path = built[0]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    args, msg = {
        "missing_dir": (["--guard", tmp_path / "nope", "hi"], "does not exist"),
        "no_prompt": (["--guard", path], "No prompt given"),
        "empty_file": (["--guard", path, "--file", empty], "holds no prompts"),
        "missing_file": (["--guard", path, "--file", tmp_path / "no.txt"], "no such file"),
        "bad_threshold": (["--guard", path, "--threshold", "1.5", "hi"], "between 0 and 1"),
        "not_a_guard": (["--guard", tmp_path, "hi"], "no guard.json"),
    }[case]
    r = run_cli("guard", *args, cache=cache)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert msg in r.stderr and "Error:" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


@pytest.mark.e2e
def test_guard_on_the_default_model_exits_early_and_matches_a_full_pass(tmp_path, user_cache):
    """Real SmolLM2-135M: a guard whose deepest safety neuron is in layer 9 runs 10 of 30 layers."""
    from safetyneurons.model.pair import DEFAULT_BASE, load_model
    from safetyneurons.activations.reader import pooled_features

    lm = load_model(DEFAULT_BASE)
    rng = np.random.default_rng(0)
    ns = NeuronSet(hook_point=HOOK, num_layers=30, width=1536, layers=rng.integers(0, 10, 40),
                   indices=rng.choice(1536, 40, replace=False), scores=np.ones(40), model=lm.describe())
    X = pooled_features(lm, UNSAFE + SAFE, HOOK, neuron_set=ns, max_length=64)
    probe = Probe("logreg", cv=3).fit(X, [1] * 8 + [0] * 8)
    export_guard(tmp_path / "g", lm_ref=DEFAULT_BASE, lm_fingerprint=lm.fingerprint, neuron_set=ns, probe=probe,
                 hook_point=HOOK, pooling="mean", max_length=64, feature_set="safety", metrics={}, data={})
    g = Guard.load(tmp_path / "g", lm=lm)
    assert g.layers_run == ns.deepest_layer + 1 <= 10
    early = [r.unsafe_probability for r in g.score(QUERIES)]
    np.testing.assert_allclose(early, full_pass_proba(lm, ns, probe, QUERIES), rtol=1e-4, atol=1e-5)
