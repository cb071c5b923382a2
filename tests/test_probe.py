"""Probes: numpy decision functions vs scikit-learn, save/load without pickle, metrics, the feature-set
comparison with its controls and baselines and its report, and the train / evaluate CLI (including its bad
inputs). The control neuron sets themselves are tested in test_controls.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from safetyneurons.errors import UserError
from safetyneurons.probes.metrics import auroc, binary_metrics, bootstrap_ci, paired_bootstrap_diff, tpr_at_fpr
from safetyneurons.neurons.selection import NeuronSet
from safetyneurons.probes.compare import compare_feature_sets
from safetyneurons.probes.probe import Probe, TextProbe, load_probe, youden_threshold
from safetyneurons.activations.store import Store, extract
from builders import make_records, run_cli
from tiny import save_tiny, tiny_lm


def blobs(n=120, d=12, seed=0, shift=1.2):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    X = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=d)
    X[:, :3] += shift * y[:, None]
    return X.astype(np.float32), y


def test_category_heads_give_one_probability_per_head():
    """Category heads answer P(hazard | harmful) per head, ``[n, heads]``; a probe's predict_proba is ``[n, 2]``."""
    from safetyneurons.probes.categories import CategoryHeads

    X, y = blobs(n=160)
    hazards = ["violent_crimes" if label else "nonviolent_crimes" for label in y]
    heads = CategoryHeads.fit(X, hazards, min_examples=5)
    p = heads.head_probabilities(X)
    assert p.shape == (len(X), len(heads.names)) == (160, 2) and ((p >= 0) & (p <= 1)).all()
    assert heads.top1_accuracy(X, hazards)["top1_accuracy"] > 0.6  # better than chance on separable blobs
    probe = Probe("logreg", seed=0).fit(X, y)
    assert probe.predict_proba(X).shape == (len(X), 2)


# ------------------------------------------------------------------------------------------ probes
@pytest.mark.parametrize("classifier", ["svm", "logreg"])
@pytest.mark.parametrize("pca", [None, 0.95])
def test_numpy_decision_function_matches_sklearn(classifier, pca):
    X, y = blobs()
    Xt, _ = blobs(seed=1)
    p = Probe(classifier, pca_variance=pca, seed=0).fit(X, y)
    ref = p._pipeline().fit(X.astype(np.float64), y)
    np.testing.assert_allclose(p.decision_function(Xt), ref.decision_function(Xt.astype(np.float64)),
                               rtol=1e-9, atol=1e-9)
    if classifier == "logreg":  # LR's own probability
        np.testing.assert_allclose(p.predict_proba(Xt), ref.predict_proba(Xt.astype(np.float64)), rtol=1e-9)
    # scikit-learn's shape: (n, 2), rows sum to one, column 1 is the 1-D unsafe probability
    assert p.predict_proba(Xt).shape == (len(Xt), 2)
    np.testing.assert_allclose(p.predict_proba(Xt).sum(1), 1.0)
    assert np.array_equal(p.predict_proba(Xt)[:, 1], p.unsafe_probability(Xt))
    # probability is monotone in the decision value and the prediction follows the threshold
    d, prob = p.decision_function(Xt), p.unsafe_probability(Xt)
    assert np.all(np.diff(prob[np.argsort(d)]) >= -1e-12)
    assert np.array_equal(p.predict(Xt), (prob >= p.threshold).astype(int))
    assert np.array_equal(p.predict(Xt, threshold=0.0), np.ones(len(Xt), dtype=int))
    assert 0 < p.threshold < 1 and "Youden" in p.threshold_rule
    assert auroc(y, p.unsafe_probability(X)) > 0.8


@pytest.mark.parametrize("n,d", [(40, 120), (150, 20)])
def test_pca_matches_sklearn_in_both_shapes(n, d):
    from sklearn.decomposition import PCA

    from safetyneurons.probes.kernels import pca_fit

    rng = np.random.default_rng(n)
    Z = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    ref = PCA(0.9, svd_solver="full").fit(Z)
    mean, comps = pca_fit(Z, 0.9)
    assert comps.shape == ref.components_.shape
    np.testing.assert_allclose(comps, ref.components_, atol=1e-8)
    np.testing.assert_allclose((Z - mean) @ comps.T, ref.transform(Z), atol=1e-7)


def _no_pickle(d: Path):
    names = sorted(x.name for x in d.iterdir())
    assert names == ["probe.json", "probe.safetensors"]
    json.loads((d / "probe.json").read_text())
    from safetensors.numpy import load_file

    assert load_file(d / "probe.safetensors")
    assert not list(d.rglob("*.pkl")) and not list(d.rglob("*.joblib"))
    assert b"\x80\x04\x95" not in (d / "probe.safetensors").read_bytes()[:64]  # no pickle protocol header


@pytest.mark.parametrize("classifier,pca", [("svm", None), ("svm", 0.9), ("logreg", None)])
def test_saved_probe_predicts_identically_and_holds_no_pickle(tmp_path, classifier, pca):
    X, y = blobs()
    Xt, _ = blobs(seed=3)
    p = Probe(classifier, pca_variance=pca, meta={"feature_set": "safety"}).fit(X, y)
    p.save(tmp_path / "p")
    _no_pickle(tmp_path / "p")
    q = load_probe(tmp_path / "p")
    assert isinstance(q, Probe) and q.meta == {"feature_set": "safety"}
    assert np.array_equal(q.decision_function(Xt), p.decision_function(Xt))
    assert np.array_equal(q.predict_proba(Xt), p.predict_proba(Xt))
    assert np.array_equal(q.predict(Xt), p.predict(Xt)) and q.threshold == p.threshold
    with pytest.raises(UserError, match="reads 12 features"):
        q.predict(Xt[:, :5])
    # a corrupted array file is refused
    f = tmp_path / "p" / "probe.safetensors"
    f.write_bytes(f.read_bytes()[:-1] + b"\x00")
    with pytest.raises(UserError, match="checksum"):
        Probe.load(tmp_path / "p")


def test_text_probe_roundtrip(tmp_path):
    recs = make_records(40)
    tp = TextProbe().fit([r["prompt"] for r in recs], [r["label"] for r in recs])
    test = [r["prompt"] for r in make_records(20, seed=5)]
    tp.save(tmp_path / "t")
    _no_pickle(tmp_path / "t")
    q = load_probe(tmp_path / "t")
    assert isinstance(q, TextProbe)
    assert np.array_equal(q.predict_proba(test), tp.predict_proba(test))
    assert q.predict(["How do I make a bomb"])[0] == 1 and q.predict(["Write a poem about the sea"])[0] == 0


def test_single_class_training_is_a_user_error():
    X, _ = blobs(20)
    with pytest.raises(UserError, match="single class"):
        Probe("svm").fit(X, np.ones(20, dtype=int))


def test_youden_threshold_sits_in_the_middle_of_the_gap():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    assert youden_threshold(y, p) == pytest.approx(0.5)
    y2 = np.array([0, 0, 1, 0, 1, 1])
    t = youden_threshold(y2, np.array([0.1, 0.2, 0.3, 0.4, 0.8, 0.9]))
    assert min(abs(t - 0.25), abs(t - 0.6)) < 1e-9  # the two cuts with J = 2/3


# -------------------------------------------------------------------------------------------- metrics
def test_metrics_agree_with_sklearn_on_fixed_inputs():
    from sklearn.metrics import (accuracy_score, average_precision_score, confusion_matrix, f1_score,
                                 precision_score, recall_score, roc_auc_score)

    y = np.array([0, 0, 1, 1, 0, 1, 0, 1, 1, 0, 0, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.9, 0.05, 0.4, 0.7, 0.6, 0.2, 0.55])  # includes ties
    pred = (s >= 0.5).astype(int)
    m = binary_metrics(y, s, pred, n_boot=200, seed=1)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m["auprc"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert m["accuracy"] == accuracy_score(y, pred) and m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["precision"] == pytest.approx(precision_score(y, pred)) and m["recall"] == recall_score(y, pred)
    assert m["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    assert "unsafe" in m["classification_report"] and "macro avg" in m["classification_report"]
    lo, hi = m["auroc_ci"]
    assert lo <= m["auroc"] <= hi and lo < hi
    assert bootstrap_ci(y, s, n_boot=200, seed=1) == (lo, hi)  # seeded, reproducible
    rng = np.random.default_rng(0)
    for _ in range(20):
        yy = rng.integers(0, 2, 50)
        ss = rng.integers(0, 5, 50).astype(float)  # heavy ties
        if yy.min() != yy.max():
            assert auroc(yy, ss) == pytest.approx(roc_auc_score(yy, ss), abs=1e-12)


def test_tpr_at_one_percent_fpr_by_hand():
    # 100 negatives with scores 0..99, positives: 5 above every negative, 5 between negatives 97 and 98
    y = np.array([0] * 100 + [1] * 10)
    s = np.concatenate([np.arange(100.0), [200] * 5, [97.5] * 5])
    assert tpr_at_fpr(y, s, 0.01) == pytest.approx(0.5)  # FPR 1% allows 1 negative: only the top 5 positives
    assert tpr_at_fpr(y, s, 0.02) == pytest.approx(1.0)  # 2 negatives above 97.5 -> all 10 positives


def test_paired_bootstrap_difference():
    rng = np.random.default_rng(0)
    y = np.arange(200) % 2
    good = y + rng.normal(0, 0.5, 200)
    bad = [y + rng.normal(0, 2.0, 200) for _ in range(3)]
    d = paired_bootstrap_diff(y, good, bad, n_boot=300, seed=0)
    assert d["diff"] == pytest.approx(auroc(y, good) - np.mean([auroc(y, b) for b in bad]))
    assert 0 < d["ci"][0] < d["diff"] < d["ci"][1] and d["p_le_0"] == 0.0
    same = paired_bootstrap_diff(y, good, good, n_boot=50, seed=0)
    assert same["diff"] == 0 and same["ci"] == [0.0, 0.0]


# --------------------------------------------------------------------------- comparison on real stores
@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    lm = tiny_lm("llama", 0)
    kw = dict(shard_size=32, dtype="float32", progress=False)
    train = extract(lm, make_records(48, seed=0), root / "train", **kw)
    test = extract(lm, make_records(24, offset=100, seed=1), root / "test", **kw)
    ns = NeuronSet(hook_point="mlp_out", num_layers=3, width=32, layers=[0, 0, 1, 2, 2], indices=[1, 7, 3, 4, 30],
                   scores=np.ones(5))
    ns.save(root / "ns.json")
    return root, lm, train, test, ns


def test_compare_feature_sets_trains_every_probe_and_reports(stores, tmp_path):
    from safetyneurons.probes.report import write_report

    root, lm, train, test, ns = stores
    res = compare_feature_sets(train, test, ns, random_draws=3, n_boot=100, cv=3, progress=False)
    rows = {(r["feature_set"], r["classifier"]): r for r in res.report["results"]}
    neuron_sets = ("safety", "pca", "all", "random", "random_global", "magnitude")
    assert set(rows) == {(f, c) for f in neuron_sets for c in ("svm", "logreg")} | {
        ("text", "tfidf-logreg"), ("length", "tokens-logreg")}
    assert rows[("safety", "svm")]["n_features"] == 5 and rows[("all", "logreg")]["n_features"] == 96
    assert rows[("random", "svm")]["metrics"]["draws"] == 3 and rows[("random_global", "svm")]["metrics"]["draws"] == 3
    assert rows[("magnitude", "svm")]["n_features"] == 5 and rows[("length", "tokens-logreg")]["n_features"] == 1
    assert 1 <= rows[("pca", "svm")]["metrics"]["pca_components"] < 96
    for r in res.runs:
        if r.feature_set in ("random", "magnitude"):
            for d in r.neuron_sets:
                assert np.array_equal(d.per_layer_counts(), ns.per_layer_counts())
    controls = res.report["controls"]
    assert set(controls) == {"random", "random_global", "magnitude"}
    assert all(c["max_overlap_with_safety"] == 0 for c in controls.values())
    assert controls["random"]["draws"] == 3 and controls["magnitude"]["draws"] == 0
    # the magnitude control is the 5 non-safety neurons with the largest mean |activation| (same layers)
    mean_abs = np.abs(train.features.astype(np.float64)).mean(0).reshape(3, 32)
    mag = res.run("magnitude", "svm").neuron_sets[0]
    for layer, idx in mag.by_layer().items():
        free = np.setdiff1d(np.arange(32), ns.indices[ns.layers == layer])
        assert set(idx) == set(free[np.argsort(-mean_abs[layer, free])[:len(idx)]])
    # the length baseline reads the token count of each formatted prompt
    tokens = np.array([len(lm.encode([p])["input_ids"][0]) for p in train.prompts])
    assert np.array_equal(np.asarray(train.manifest["n_tokens"]), tokens)
    vs = res.report["safety_vs_controls"]
    for kind in ("random", "random_global", "magnitude"):
        for clf in ("svm", "logreg"):
            d = vs[kind][clf]
            assert d["diff"] == pytest.approx(d["safety_auroc"] - d["control_auroc"])
            assert d["unit"] == "prompt" and d["n_units"] == 24
            if kind != "magnitude":
                per_draw = rows[(kind, clf)]["metrics"]["auroc_per_draw"]
                want = (1 + sum(v >= d["safety_auroc"] for v in per_draw)) / 4
                assert d["rank_p_auroc"] == pytest.approx(want) and d["draws_resampled"]
    # the safety probe's test probabilities are what the probe gives on the selected columns
    run = res.run("safety", "logreg")
    np.testing.assert_array_equal(run.test_proba[0], run.probes[0].unsafe_probability(test.select(ns)))
    assert rows[("text", "tfidf-logreg")]["metrics"]["auroc"] > 0.9  # wording alone separates this toy data
    assert set(res.report["safety_vs_random"]) == {"svm", "logreg"}

    report = write_report(res, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    md = (tmp_path / "report.md").read_text()
    assert "| safety neurons | svm | 5 |" in md and "Confusion matrix" in md
    assert "| length only (token count) | tokens-logreg | 1 |" in md and "| largest-magnitude neurons | svm | 5 |" in md
    assert "rank p (AUROC)" in md and "overlap with the safety set" in md
    for name in ("roc_svm.png", "pr_svm.png", "roc_logreg.png", "pr_logreg.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_bootstraps_clusters_when_the_test_records_carry_them(stores):
    root, lm, train, test, ns = stores
    clustered = Store.load(test.path)
    clustered._records = [dict(r, cluster=k // 3) for k, r in enumerate(test.records)]  # 8 clusters of 3
    res = compare_feature_sets(train, clustered, ns, feature_sets="safety,random", classifiers="logreg",
                               random_draws=2, n_boot=50, cv=0, progress=False)
    assert res.report["settings"]["bootstrap"] == {"unit": "cluster", "n_units": 8}
    d = res.report["safety_vs_controls"]["random"]["logreg"]
    assert (d["unit"], d["n_units"]) == ("cluster", 8)
    plain = compare_feature_sets(train, test, ns, feature_sets="safety,random", classifiers="logreg",
                                 random_draws=2, n_boot=50, cv=0, progress=False)
    assert plain.report["settings"]["bootstrap"] == {"unit": "prompt", "n_units": 24}
    assert plain.report["safety_vs_controls"]["random"]["logreg"]["diff"] == d["diff"]  # same point estimate


def test_compare_rejects_mismatches_and_missing_inputs(stores, tmp_path):
    root, lm, train, test, ns = stores
    other_hook = NeuronSet(hook_point="mlp_neurons", num_layers=3, width=64, layers=[0], indices=[1], scores=[1.0])
    with pytest.raises(UserError, match="hook point"):
        compare_feature_sets(train, test, other_hook, progress=False)
    fp = NeuronSet(hook_point="mlp_out", num_layers=3, width=32, layers=[0], indices=[1], scores=[1.0],
                   model={"sha256": "f" * 64})
    st = Store.load(train.path)
    st.manifest["model"]["sha256"] = "a" * 64
    st2 = Store.load(test.path)
    st2.manifest["model"]["sha256"] = "a" * 64
    with pytest.raises(UserError, match="model weights"):
        compare_feature_sets(st, st2, fp, progress=False)
    with pytest.raises(UserError, match="--neurons"):
        compare_feature_sets(train, test, None, feature_sets="safety", progress=False)
    with pytest.raises(UserError, match="Unknown feature set"):
        compare_feature_sets(train, test, ns, feature_sets="safety,magic", progress=False)
    sub = extract(lm, make_records(8), tmp_path / "sub", neuron_set=ns, progress=False)
    with pytest.raises(UserError, match="every neuron"):
        compare_feature_sets(sub, sub, None, feature_sets="safety,all", progress=False)
    with pytest.raises(UserError, match="differ in layout"):
        compare_feature_sets(train, sub, ns, feature_sets="safety", progress=False)


# ------------------------------------------------------------------------------------------------ CLI
def invoke(*args, cache: Path, expect_error: str | None = None):
    """Run the CLI in-process (click.testing); with ``expect_error`` it must raise a UserError matching it."""
    from click.testing import CliRunner

    from safetyneurons.cli import app

    old = os.environ.get("SAFETYNEURONS_CACHE")
    os.environ["SAFETYNEURONS_CACHE"] = str(cache)
    try:
        runner = CliRunner()
        if expect_error is None:
            res = runner.invoke(app, [str(a) for a in args], standalone_mode=False, catch_exceptions=False)
            assert res.exit_code == 0, res.output
            return res
        with pytest.raises(UserError, match=expect_error):
            runner.invoke(app, [str(a) for a in args], standalone_mode=False, catch_exceptions=False)
    finally:
        if old is None:
            os.environ.pop("SAFETYNEURONS_CACHE", None)
        else:
            os.environ["SAFETYNEURONS_CACHE"] = old


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """A saved tiny model, labelled files and stores extracted through the CLI (with model fingerprints)."""
    root = tmp_path_factory.mktemp("probecli")
    save_tiny(root / "model", "llama", 0)
    files = {"train": make_records(40, seed=0), "test": make_records(20, offset=100, seed=1),
             "oneclass": [r for r in make_records(30, offset=200) if r["label"] == 1]}
    for name, recs in files.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    for name in files:
        invoke("extract", "--model", root / "model", "--data", root / f"{name}.jsonl", "--out", root / f"st_{name}",
               "--dtype", "float32", cache=root / "cache")
    fp = Store.load(root / "st_train").fingerprint
    NeuronSet(hook_point="mlp_out", num_layers=3, width=32, layers=[0, 1, 2, 2], indices=[1, 3, 4, 30],
              scores=np.ones(4), model={"ref": str(root / "model"), "sha256": fp}).save(root / "ns.json")
    NeuronSet(hook_point="mlp_out", num_layers=3, width=32, layers=[0], indices=[1], scores=[1.0],
              model={"sha256": "0" * 64}).save(root / "ns_other_model.json")
    NeuronSet(hook_point="resid", num_layers=3, width=32, layers=[0], indices=[1], scores=[1.0]).save(
        root / "ns_resid.json")
    return root


def test_cli_train_then_evaluate_on_a_file_and_on_a_store(cli, tmp_path):
    r = run_cli("train", "--train", cli / "st_train", "--test", cli / "st_test", "--neurons", cli / "ns.json",
                "--out", tmp_path / "rep", "--random-draws", "2", "--bootstrap", "50", "--cv", "3",
                cache=cli / "cache")
    assert r.returncode == 0, r.stderr
    assert "precision    recall  f1-score   support" in r.stdout and "Confusion matrix" in r.stdout
    assert "rank p (AUROC)" in r.stdout
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert len(rep["results"]) == 14
    probes = sorted(p.name for p in (tmp_path / "rep" / "probes").iterdir())
    assert probes == ["length-tokens-logreg", "safety-logreg", "safety-svm", "text-tfidf-logreg"]

    # evaluate on the labelled file re-extracts the 4 safety neurons (early exit) with the recorded model
    invoke("evaluate", "--probe", tmp_path / "rep" / "probes" / "safety-svm", "--data", cli / "test.jsonl",
           "--out", tmp_path / "ev", "--bootstrap", "50", cache=cli / "cache")
    ev = json.loads((tmp_path / "ev" / "report.json").read_text())
    preds = [json.loads(x) for x in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    # ... and agrees with the probe applied to the test store's columns
    probe = load_probe(tmp_path / "rep" / "probes" / "safety-svm")
    st = Store.load(cli / "st_test")
    expected = probe.unsafe_probability(st.select(NeuronSet.load(cli / "ns.json")))
    np.testing.assert_allclose([p["p_unsafe"] for p in preds], expected, rtol=1e-4, atol=1e-6)
    assert [p["id"] for p in preds] == st.ids
    train_row = next(x for x in rep["results"] if x["feature_set"] == "safety" and x["classifier"] == "svm")
    assert ev["metrics"]["auroc"] == pytest.approx(train_row["metrics"]["auroc"], abs=1e-6)
    for name in ("report.md", "roc.png", "pr.png"):
        assert (tmp_path / "ev" / name).is_file()

    invoke("evaluate", "--probe", tmp_path / "rep" / "probes" / "text-tfidf-logreg", "--data", cli / "st_test",
           "--out", tmp_path / "ev2", "--bootstrap", "0", cache=cli / "cache")
    assert (tmp_path / "ev2" / "predictions.jsonl").is_file()

    # the length baseline scores the same on the store (recorded token counts) and on the file (recounted)
    length_row = next(x for x in rep["results"] if x["feature_set"] == "length")
    for name, data in (("ev3", cli / "st_test"), ("ev4", cli / "test.jsonl")):
        invoke("evaluate", "--probe", tmp_path / "rep" / "probes" / "length-tokens-logreg", "--data", data,
               "--out", tmp_path / name, "--bootstrap", "0", cache=cli / "cache")
        got = json.loads((tmp_path / name / "report.json").read_text())["metrics"]["auroc"]
        assert got == pytest.approx(length_row["metrics"]["auroc"], abs=1e-12)


BAD = {
    "single_class": ["--train", "st_oneclass", "--test", "st_test", "--neurons", "ns.json"],
    "hook_mismatch": ["--train", "st_train", "--test", "st_test", "--neurons", "ns_resid.json"],
    "model_mismatch": ["--train", "st_train", "--test", "st_test", "--neurons", "ns_other_model.json"],
    "corrupted_shard": ["--train", "st_corrupt", "--test", "st_test", "--neurons", "ns.json"],
    "not_a_store": ["--train", "nowhere", "--test", "st_test", "--neurons", "ns.json"],
    "bad_feature_set": ["--train", "st_train", "--test", "st_test", "--neurons", "ns.json", "--feature-sets", "x"],
    "zero_draws": ["--train", "st_train", "--test", "st_test", "--neurons", "ns.json", "--random-draws=0"],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_cli_train_bad_inputs_exit_2_without_output(cli, tmp_path, case):
    import shutil

    own = {}
    if case == "corrupted_shard":  # a corrupted copy of its own, never in the shared fixture
        shutil.copytree(cli / "st_train", tmp_path / "st_corrupt")
        shard = tmp_path / "st_corrupt" / "shard-00000.safetensors"
        data = bytearray(shard.read_bytes())
        data[-5] ^= 0x55
        shard.write_bytes(bytes(data))
        own["st_corrupt"] = tmp_path / "st_corrupt"
    args = [a if a.startswith("--") else own.get(a, cli / a) for a in BAD[case]]
    r = run_cli("train", *args, "--out", tmp_path / "out", "--bootstrap", "10", cache=cli / "cache")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Error:" in r.stderr
    assert not (tmp_path / "out").exists()
    expect = {"single_class": "single class", "hook_mismatch": "hook point", "model_mismatch": "model weights",
              "corrupted_shard": "corrupted", "not_a_store": "does not exist", "bad_feature_set": "Unknown",
              "zero_draws": "--random-draws must be >= 1"}[case]
    assert expect in r.stderr


def test_cli_evaluate_rejects_a_different_model_and_empty_data(cli, tmp_path):
    invoke("train", "--train", cli / "st_train", "--test", cli / "st_test", "--neurons", cli / "ns.json",
           "--out", tmp_path / "rep", "--feature-sets", "safety", "--classifiers", "logreg", "--bootstrap", "0",
           cache=cli / "cache")
    save_tiny(tmp_path / "other", "llama", 1)
    (tmp_path / "empty.jsonl").write_text("")
    probe = tmp_path / "rep" / "probes" / "safety-logreg"
    invoke("evaluate", "--probe", probe, "--data", cli / "test.jsonl", "--model", tmp_path / "other", "--out",
           tmp_path / "ev", cache=cli / "cache", expect_error="sha256")
    assert not (tmp_path / "ev").exists()
    # through the real entry point: exit 2, one clear line, no traceback, no output
    r = run_cli("evaluate", "--probe", probe, "--data", tmp_path / "empty.jsonl", "--out", tmp_path / "ev",
                cache=cli / "cache")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "empty" in r.stderr, r.stderr
    assert not (tmp_path / "ev").exists()


def test_export_guard_gets_the_safety_probe_and_its_provenance(cli, tmp_path):
    invoke("train", "--train", cli / "st_train", "--test", cli / "st_test", "--neurons", cli / "ns.json",
           "--out", tmp_path / "rep", "--feature-sets", "safety,text", "--bootstrap", "0",
           "--export-guard", tmp_path / "guard", "--guard-classifier", "logreg", cache=cli / "cache")
    meta = json.loads((tmp_path / "guard" / "guard.json").read_text())
    ns = NeuronSet.load(cli / "ns.json")
    st = Store.load(cli / "st_train")
    assert meta["classifier"] == "logreg" and meta["feature_set"] == "safety"
    assert np.array_equal(NeuronSet.from_json(meta["neuron_set"]).flat_indices(), ns.flat_indices())
    assert meta["model"] == {"ref": str(cli / "model"), "sha256": st.fingerprint,
                             "tokenizer_sha256": st.manifest["model"]["tokenizer_sha256"]}
    assert len(meta["model"]["tokenizer_sha256"]) == 64
    assert (meta["hook_point"], meta["pooling"], meta["max_length"]) == ("mlp_out", "mean", 256)
    assert 0 <= meta["metrics"]["auroc"] <= 1 and meta["data"]["train"]["records_sha256"]
    saved = load_probe(tmp_path / "rep" / "probes" / "safety-logreg")
    X = st.select(ns)
    assert np.array_equal(saved.predict_proba(X), Probe.load(tmp_path / "guard").predict_proba(X))


def test_export_guard_with_the_real_guard_module(cli, tmp_path):
    invoke("train", "--train", cli / "st_train", "--test", cli / "st_test", "--neurons", cli / "ns.json",
           "--out", tmp_path / "rep", "--feature-sets", "safety", "--classifiers", "svm", "--bootstrap", "0",
           "--export-guard", tmp_path / "guard", cache=cli / "cache")
    shipped = Probe.load(tmp_path / "guard")  # the guard keeps the probe in our format
    mine = load_probe(tmp_path / "rep" / "probes" / "safety-svm")
    X = Store.load(cli / "st_test").select(NeuronSet.load(cli / "ns.json"))
    assert np.array_equal(shipped.predict_proba(X), mine.predict_proba(X)) and shipped.threshold == mine.threshold


def test_cli_train_calibrates_thresholds_on_val_for_the_target_fpr(cli, tmp_path):
    invoke("train", "--train", cli / "st_train", "--test", cli / "st_test", "--neurons", cli / "ns.json",
           "--out", tmp_path / "rep", "--feature-sets", "safety,text", "--classifiers", "logreg", "--bootstrap", "0",
           "--val", cli / "st_test", "--target-fpr", "0.1", "--export-guard", tmp_path / "guard",
           cache=cli / "cache")
    meta = json.loads((tmp_path / "guard" / "guard.json").read_text())
    strict, loose = (meta["calibration"]["operating_points"][k] for k in ("strict", "loose"))
    assert strict["target_fpr"] == 0.1 and strict["validation"]["fpr_benign"] <= 0.1
    assert loose["target_fpr"] == 0.01 and loose["threshold"] >= strict["threshold"] == meta["threshold"]
    st = Store.load(cli / "st_test")
    probe = load_probe(tmp_path / "rep" / "probes" / "safety-logreg")
    proba = probe.unsafe_probability(st.select(NeuronSet.load(cli / "ns.json")))
    benign = proba[st.labels == 0]
    assert (benign >= probe.threshold).sum() <= int(0.1 * len(benign))  # the saved probe keeps the calibrated cut
    from safetyneurons.guard.guard import Guard

    served = Guard.load(tmp_path / "guard").unsafe_probability(st.prompts)  # as the guard reads, windows included
    assert (served[st.labels == 0] >= meta["threshold"]).sum() <= int(0.1 * len(benign))
    r = run_cli("train", "--train", cli / "st_train", "--test", cli / "st_test", "--neurons", cli / "ns.json",
                "--out", tmp_path / "bad", "--val", cli / "st_test", "--target-fpr", "1.5", cache=cli / "cache")
    assert r.returncode == 2 and "target-fpr" in r.stderr and "Traceback" not in r.stderr
