"""Guard quality: the threshold calibrated for a target false-positive rate, category heads (safetensors + JSON,
moderation schema), the over-refusal table, and held-out sources and our own (train and val only)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from safetyneurons.probes.categories import CategoryHeads, moderation_categories, openai_categories
from safetyneurons.errors import UserError
from safetyneurons.guard.guard import Guard, export_guard
from safetyneurons.probes.overrefusal import overrefusal_table, render_overrefusal
from safetyneurons.data.taxonomy import HAZARDS, hazard_from_garak_intents
from safetyneurons.data.validation import add_own, carve_validation, split_own, threshold_for_fpr
from builders import HOOK, SAFE, UNSAFE, build_guard


# ------------------------------------------------------------------------------------ calibration
def test_threshold_reaches_its_target_fpr_on_a_fixed_validation_example():
    benign = np.linspace(0.01, 0.99, 40)  # 40 benign scores
    harmful = np.array([0.5, 0.9, 0.97, 0.995, 0.999])
    y = np.array([0] * 40 + [1] * 5)
    p = np.concatenate([benign, harmful])
    for target, flagged in ((0.05, 2), (0.10, 4), (0.0, 0), (0.5, 20)):
        t = threshold_for_fpr(y, p, target)
        assert int((benign >= t).sum()) == flagged, (target, t)
        # the lowest such threshold: one notch lower would flag one more benign prompt
        assert int((benign >= np.nextafter(benign[40 - flagged - 1], -1)).sum()) == flagged + 1
    t = threshold_for_fpr(y, p, 0.05)
    assert list(harmful >= t) == [False, False, True, True, True]  # cut just above the 3rd-highest benign, 0.9397


def test_ties_never_push_the_fpr_over_the_target_and_bad_input_is_refused():
    y = np.array([0] * 10 + [1] * 2)
    p = np.array([0.5] * 10 + [0.9, 0.2])
    t = threshold_for_fpr(y, p, 0.2)  # flagging any 0.5 flags all ten: none may be flagged
    assert t > 0.5 and (p[:10] >= t).sum() == 0 and p[10] >= t
    with pytest.raises(UserError, match="target-fpr"):
        threshold_for_fpr(y, p, 1.5)
    with pytest.raises(UserError, match="no benign"):
        threshold_for_fpr(np.ones(3, int), np.ones(3), 0.05)


def test_validation_carving_keeps_clusters_whole_and_own_records_join_without_crossing_clusters():
    recs = [{"id": f"r{i}", "label": i % 2, "source": "a" if i < 40 else "b", "cluster": f"c{i // 2}"}
            for i in range(80)]
    train, val = carve_validation(recs, 0.25, seed=0)
    assert len(train) + len(val) == 80 and 14 <= len(val) <= 26
    assert not {r["cluster"] for r in train} & {r["cluster"] for r in val}
    assert {r["source"] for r in val} == {"a", "b"}
    assert carve_validation(recs, 0.25, seed=0) == (train, val)  # deterministic
    extra = [{"id": "t1", "cluster": "c1"}, {"id": "t2", "cluster": "new"}]
    grown, dropped = add_own(train, [val], extra)
    in_val = any(r["cluster"] == "c1" for r in val)
    assert dropped == int(in_val) and grown[-1]["id"] == "t2"


def test_own_records_split_by_family_and_near_duplicate_families():
    """All phrasings of a family, and families whose texts are near-duplicates, land on one side; the share
    is near the asked one; placement is deterministic and does not depend on the other groups."""
    recs = [{"id": f"f{f}s{s}", "prompt": f"style {s} of task {f}", "source": "t", "family": f"task number {f}"}
            for f in range(200) for s in range(4)]
    recs += [{"id": "dupA", "prompt": "x", "source": "t", "family": "kill a frozen process on my old Mac laptop"},
             {"id": "dupB", "prompt": "y", "source": "t", "family": "kill a frozen process on my old Mac computer"}]
    train, val = split_own(recs, seed=0, val_share=0.35, threshold=0.6)
    side = {r["id"]: "val" for r in val} | {r["id"]: "train" for r in train}
    assert len(side) == len(recs)
    for f in range(200):
        assert len({side[f"f{f}s{s}"] for s in range(4)}) == 1
    assert side["dupA"] == side["dupB"]
    assert 0.25 < len(val) / len(recs) < 0.45
    assert split_own(recs, seed=0, val_share=0.35, threshold=0.6) == (train, val)
    again, _ = split_own(recs[4:], seed=0, val_share=0.35, threshold=0.6)  # one family fewer
    assert all(side[r["id"]] == "train" for r in again)
    assert split_own(recs, seed=1, val_share=0.35, threshold=0.6) != (train, val)


# ------------------------------------------------------------------------------------ category heads
def _planted(n_per: int, names: list[str], d: int = 6, seed: int = 0):
    """Features with a planted mean shift per hazard: head k must find direction k."""
    rng = np.random.default_rng(seed)
    X, y = [], []
    for k, name in enumerate(names):
        Z = rng.normal(size=(n_per, d))
        Z[:, k] += 3.0
        X.append(Z)
        y += [name] * n_per
    return np.vstack(X), y


def test_category_heads_find_planted_hazards_and_skip_rare_ones(tmp_path):
    names = ["violent_crimes", "privacy", "hate"]
    X, y = _planted(40, names)
    Xr, yr = _planted(3, ["self_harm"], seed=1)  # too few: skipped
    heads = CategoryHeads.fit(np.vstack([X, Xr, np.zeros((5, 6))]), y + yr + [None] * 5, min_examples=10)
    assert heads.names == ["violent_crimes", "privacy", "hate"]  # taxonomy order
    assert heads.info["skipped"]["self_harm"] == 3 and heads.info["trained_on"]["privacy"] == 40
    Xt, yt = _planted(30, names, seed=7)  # fresh rows from the same planted distribution
    assert heads.top1_accuracy(Xt, yt)["top1_accuracy"] > 0.9
    heads.save(tmp_path)
    again = CategoryHeads.load(tmp_path)
    np.testing.assert_allclose(again.head_probabilities(Xt), heads.head_probabilities(Xt))
    assert json.loads((tmp_path / "categories.json").read_text())["skipped"]["self_harm"] == 3
    with pytest.raises(UserError, match="at least two hazards"):
        CategoryHeads.fit(X[:40], y[:40], min_examples=10)
    with pytest.raises(UserError, match="Unknown hazard"):
        CategoryHeads.fit(X[:2], ["violent_crimes", "weather"])


def test_moderation_categories_keep_unsafe_as_the_overall_flag():
    cats, scores = moderation_categories(0.8, True, ["hate", "privacy"], [0.9, 0.1])
    assert cats == {"unsafe": True, "hate": True, "privacy": False}
    assert scores == {"unsafe": 0.8, "hate": pytest.approx(0.72), "privacy": pytest.approx(0.08)}
    cats, _ = moderation_categories(0.1, False, ["hate"], [0.99])
    assert cats == {"unsafe": False, "hate": False}  # a category is only flagged with the prompt


@pytest.fixture(scope="module")
def guard_with_heads(tmp_path_factory):
    from safetyneurons.activations.reader import pooled_features

    root = tmp_path_factory.mktemp("gq")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFETYNEURONS_CACHE", str(root / "cache"))
        src, lm, ns, probe = build_guard(root)
        X = pooled_features(lm, UNSAFE, HOOK, pooling="mean", neuron_set=ns, max_length=64)
        hazards = ["violent_crimes" if any(w in p for w in ("bomb", "hurt", "poison")) else "nonviolent_crimes"
                   for p in UNSAFE]
        heads = CategoryHeads.fit(X, hazards, min_examples=3)
        out = root / "guard-cat"
        export_guard(out, lm_ref=str(root / "model"), lm_fingerprint=lm.fingerprint, neuron_set=ns, probe=probe,
                     hook_point=HOOK, pooling="mean", max_length=64, feature_set="safety", metrics={}, data={},
                     category_heads=heads, calibration={"target_fpr": 0.05, "threshold": probe.threshold})
        yield out, lm, heads


def test_category_heads_load_from_the_guard_and_answer_in_the_moderation_schema(guard_with_heads):
    path, lm, heads = guard_with_heads
    meta = json.loads((path / "guard.json").read_text())
    assert {"categories.json", "categories.safetensors"} <= set(meta["files"])
    assert meta["categories"]["names"] == heads.names and meta["calibration"]["target_fpr"] == 0.05
    assert not list(path.glob("*.pkl")) and not list(path.glob("*.pickle"))
    g = Guard.load(path, lm=lm)
    assert g.category_heads is not None and g.category_heads.names == heads.names
    prompts = UNSAFE[:2] + SAFE[:2]
    results = g.score(prompts)
    probs = heads.head_probabilities(g.features(prompts))
    for r, row in zip(results, probs):
        assert set(r.categories) == set(r.category_scores) == {"unsafe", *heads.names}
        assert r.categories["unsafe"] == r.flagged and r.category_scores["unsafe"] == r.unsafe_probability
        for name, p in zip(heads.names, row):
            assert r.category_scores[name] == pytest.approx(r.unsafe_probability * p)
            assert set(HAZARDS) >= {name}
        assert r.to_dict()["categories"] == r.categories

    from fastapi.testclient import TestClient

    from safetyneurons.serve.server import create_app

    with TestClient(create_app(g)) as client:
        body = client.post("/v1/moderations", json={"input": prompts}).json()
    for res, r in zip(body["results"], results):  # the heads under OpenAI's names (probes.categories table)
        cats, scores, _ = openai_categories(r.flagged, r.categories, r.category_scores, r.unsafe_probability)
        assert res["categories"] == cats and res["categories"]["violence"] == r.categories["violent_crimes"]
        assert res["category_scores"] == pytest.approx(scores)


def test_tampered_category_heads_are_refused(guard_with_heads, tmp_path):
    path, lm, _ = guard_with_heads
    bad = tmp_path / "g"
    shutil.copytree(path, bad)
    data = bytearray((bad / "categories.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (bad / "categories.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match="categories.safetensors"):
        Guard.load(bad, lm=lm)


# ------------------------------------------------------------------------------------ over-refusal
def test_overrefusal_table_reads_kinds_from_the_registry_and_scores_every_probe_alike():
    sources = ["mtbench"] * 4 + ["overrefusal"] * 4 + ["harmbench"] * 4
    y = [0] * 8 + [1] * 4
    guard = np.array([0.1, 0.1, 0.1, 0.9, 0.9, 0.9, 0.1, 0.1, 0.9, 0.9, 0.9, 0.1])
    never = np.zeros(12)
    t = overrefusal_table(y, sources, {"guard": (guard, 0.5), "never": (never, 0.5)}, seed=0)
    s = {r["probe"]: r for r in t["summary"]}
    assert s["guard"]["flag_rate_ordinary_benign"] == 0.25 and s["guard"]["flag_rate_hard_negative"] == 0.5
    assert s["guard"]["recall_harmful"] == 0.75 and s["never"]["recall_harmful"] == 0.0
    # balanced hard set: the 4 hard negatives + all 4 harmful prompts: tp 3, fp 2, fn 1 -> F1 6/9
    assert s["guard"]["f1_balanced_hard"] == pytest.approx(6 / 9) and s["never"]["f1_balanced_hard"] == 0.0
    assert [r["kind"] for r in t["per_source"]] == ["benign", "hard_negative", "harmful"]
    md = render_overrefusal(t, "Over-refusal")
    assert "| guard | 0.5000 | 25.0% | 50.0% | 75.0% | 0.667 |" in md


# ------------------------------------------------------------------------------------ data sources
def test_garak_intents_map_onto_the_taxonomy():
    assert hazard_from_garak_intents(["S006sh", "S002med"]) == "self_harm"
    assert hazard_from_garak_intents(["C006", "S009personal"]) == "privacy"
    assert hazard_from_garak_intents(["S006instructions"]) == "violent_crimes"
    assert hazard_from_garak_intents(["C006"]) is None


def test_a_held_out_source_never_enters_training(tmp_path):
    """The default mix keeps the held-out hard-negative source out of every training-side split, and our own
    templates can never be held out (they are for training and validation only)."""
    from safetyneurons.data import splits as data
    from safetyneurons.data.datasets import OWN_SOURCES, REGISTRY, TRAIN_VAL_SOURCES

    s = data.DEFAULT_SETTINGS
    held = set(s["heldout_harmful"] + s["heldout_benign"])
    assert "overrefusal" in held and REGISTRY["overrefusal"].kind == "hard_negative"
    assert not held & set(s["harmful"] + s["benign"])
    assert OWN_SOURCES == {"templates_benign", "templates_ordinary", "templates_harmful"} and not held & OWN_SOURCES
    assert TRAIN_VAL_SOURCES == OWN_SOURCES | {"arenahard", "truthfulqa"} and not held & TRAIN_VAL_SOURCES
    with pytest.raises(UserError, match="training and validation only"):
        data.build_splits(tmp_path / "y", heldout_benign=["truthfulqa"], progress=False)
    with pytest.raises(UserError, match="main mix and held out"):
        data.build_splits(tmp_path / "x", benign=["bfcl", "overrefusal"], heldout_benign=["overrefusal"],
                          progress=False)
    assert not (tmp_path / "x").exists()


def test_templates_are_well_formed_and_labelled():
    """Template prompts are written here; they reach train and val only (checked on the real splits by
    tests/test_data.py); here: the templates themselves are well-formed, labelled and carry their family."""
    from safetyneurons.data.templates import template_records

    benign, ordinary, harmful = (template_records(k) for k in ("benign", "ordinary", "harmful"))
    assert len(benign) >= 500 and len(ordinary) >= 200 and len(harmful) >= 200
    assert {k for _, k, _ in benign} == {"homonyms", "figurative_language", "safe_contexts", "definitions", "history",
                                         "fiction", "safety_questions", "public_figures", "fictional_groups"}
    assert {k for _, k, _ in ordinary} == {"ordinary", "chat_turns"}
    # style is no cue: every style holds both labels
    from safetyneurons.data.phrasings import ACTS, STYLES, TASKS, phrase

    texts = {p for p, _, _ in benign + ordinary + harmful}
    for style in STYLES:
        assert phrase(ACTS[0][0], style) in texts and phrase(TASKS[0][0], style) in texts
    assert {"continue", "Do it now, step by step."} <= {p for p, k, _ in ordinary if k == "chat_turns"}
    assert {h for _, h, _ in harmful} <= set(HAZARDS)
    assert len(texts) == len(benign) + len(ordinary) + len(harmful)
    assert any("kill" in p and "process" in p for p, _, _ in benign)
    families = {f for _, _, f in benign}
    assert len(families) < len(benign) and {f for p, _, f in benign if p.startswith("Tell me how to kill a frozen")} \
        == {"kill a frozen process on my Mac"}


def test_guard_cli_shows_the_category_heads(guard_with_heads, monkeypatch):
    from click.testing import CliRunner

    from safetyneurons.cli import app

    path, lm, heads = guard_with_heads
    monkeypatch.setenv("SAFETYNEURONS_CACHE", str(path.parent / "cache"))
    res = CliRunner().invoke(app, ["guard", "--guard", str(path), "--threshold", "0", "--json", UNSAFE[0]])
    assert res.exit_code == 0, res.output
    [r] = json.loads(res.stdout[res.stdout.index("{"):])["results"]
    assert set(r["categories"]) == {"unsafe", *heads.names} and r["flagged"]
    res = CliRunner().invoke(app, ["guard", "--guard", str(path), "--threshold", "0", UNSAFE[0]])
    top = max(heads.names, key=lambda n: r["category_scores"][n])
    assert res.exit_code == 0 and f"[{top}]" in res.output
