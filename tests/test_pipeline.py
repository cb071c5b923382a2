"""`safetyneurons run` end to end on tiny random models (and on the real default pair when its twin exists)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from safetyneurons.probes.budget import choose_budget
from safetyneurons.guard.guard import Guard

from builders import templated_records, write_jsonl
from tiny import save_tiny


def _records(n_per_class: int, offset: int) -> list[dict]:
    return templated_records(n_per_class, offset, hazards=True)


def _tiny_pair_and_splits(root: Path):
    """A tiny base, an "aligned" copy with one changed MLP, and a splits directory."""
    base = save_tiny(root / "base", "qwen3", seed=0)
    aligned = save_tiny(root / "aligned", "qwen3", seed=0)
    # the "aligned" twin differs from the base in a few MLP rows
    from safetensors.torch import load_file, save_file

    w = load_file(aligned / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    w[key] = w[key] + 0.5 * torch.randn_like(w[key])
    save_file(w, aligned / "model.safetensors", metadata={"format": "pt"})
    splits = root / "splits"
    splits.mkdir()
    write_jsonl(splits / "contrast.jsonl", _records(10, 1000))  # harmful + a benign part (harmful-minus-benign)
    write_jsonl(splits / "train.jsonl", _records(20, 0))
    write_jsonl(splits / "test.jsonl", _records(10, 100))
    write_jsonl(splits / "val.jsonl", _records(10, 300))
    held = _records(8, 200)
    for r in held[1::4]:  # a few benign held-out prompts from the registry's held-out hard-negative source
        r["source"] = "overrefusal"
    write_jsonl(splits / "heldout.jsonl", held)
    return base, aligned, splits


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    base, aligned, splits = _tiny_pair_and_splits(root)
    from safetyneurons.pipeline import RunSettings, run

    # the layer budget chosen on validation (not the default, which reads the safety set as it is: test_steps)
    settings = RunSettings(out=str(root / "run"), base=str(base), aligned=str(aligned), splits=str(splits),
                           random_draws=2, n_boot=50, store_dtype="float32", batch_size=4, target_fpr=0.1,
                           category_min_examples=5, guard_max_layer="auto")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFETYNEURONS_CACHE", str(root / "cache"))
        summary = run(settings, progress=False)
    return root, settings, summary


def test_run_calibrates_on_val_and_reports_overrefusal_and_categories(tiny_run):
    root, settings, summary = tiny_run
    out = Path(settings.out)
    meta = json.loads((out / "guard" / "guard.json").read_text())
    cal = meta["calibration"]  # operating points, set on val as the guard scores (its most unsafe piece)
    point = cal["operating_points"][cal["default"]]
    assert "piece_margin" not in meta and "piece_margin" not in cal  # no margin by default: every piece alike
    assert cal["default"] == "strict" and set(cal["operating_points"]) == {"strict", "loose"}
    assert point["target_fpr"] == 0.1 and meta["threshold"] == point["threshold"]
    assert point["validation"]["n"] == 20 and point["validation"]["fpr_benign"] <= 0.1
    assert "validation split" in meta["threshold_rule"]
    # by default the guard reads each piece's words beside its neurons (docs/guard_quality.md's rule picks it)
    assert meta["format"] == "safetyneurons.guard/3" and meta["words"] is not None
    assert {"words.json", "words.safetensors"} <= set(meta["files"])
    # category heads ship inside the guard, hashed like every other file
    assert meta["categories"]["names"] == ["violent_crimes", "nonviolent_crimes"]
    assert {"categories.json", "categories.safetensors"} <= set(meta["files"])
    table = summary["overrefusal"]
    kinds = {r["source"]: r["kind"] for r in table["per_source"]}
    assert kinds == {"s": "benign", "overrefusal": "hard_negative", "h": "harmful"}
    names = {r["probe"] for r in table["summary"]}
    assert {f"safety / {settings.guard_classifier}", "text / tfidf-logreg", "length / tokens-logreg"} <= names
    assert not any(n.startswith(("random", "magnitude")) for n in names)  # the neuron controls have their own tables
    md = (out / "probes" / "report.md").read_text()
    assert md.index("Over-refusal and recall") < md.index("## Test metrics")
    assert "## Category heads" in md and "flags hard negatives" in md
    # the guard's layer budget: chosen on the validation split by the documented rule, recorded with the guard
    budget = meta["layer_budget"]
    assert budget["setting"] == "auto" and "validation AUROC" in budget["rule"] and budget["curve"]
    assert choose_budget(budget["curve"])["max_layer"] == budget["max_layer"]
    assert meta["deepest_layer"] == budget["deepest_layer"] == Guard.load(out / "guard").neuron_set.deepest_layer
    assert json.loads((out / "probes" / "report.json").read_text())["guard_budget"]["max_layer"] == budget["max_layer"]
    assert "## Guard layer budget" in md
    if not budget["same_as_safety_set"]:  # a budgeted guard has its own row in the over-refusal table
        assert any(n.startswith("guard (safety <= L") for n in names)


def test_run_writes_every_artifact_and_all_feature_sets(tiny_run):
    root, settings, summary = tiny_run
    out = Path(settings.out)
    for rel in ("run.json", "README.md", "contrast/scores.safetensors", "contrast/neuron_set.json",
                "contrast/heatmap.png", "contrast/stats.json", "probes/report.md", "probes/report.json",
                "guard/guard.json", "probes/probes/safety-svm/probe.json", "probes/probes/text-tfidf-logreg/probe.json"):
        assert (out / rel).is_file(), rel
    got = {(r["feature_set"], r["classifier"]) for r in summary["results"]}
    for fs in ("safety", "pca", "all", "random", "random_global", "magnitude"):
        assert {(fs, "svm"), (fs, "logreg")} <= got
    assert {("text", "tfidf-logreg"), ("length", "tokens-logreg")} <= got
    held = {(r["feature_set"], r["classifier"]) for r in summary["heldout"]}
    assert held == got
    assert all(r["metrics"]["n"] == 16 for r in summary["heldout"])
    # every selection variant is reported side by side (harmful-minus-benign may find nothing clearly harmful)
    report = json.loads((out / "probes" / "report.json").read_text())
    sv = report["selection_variants"]
    assert sv["selected"] == "rms" and {"rms", "relative"} <= set(sv["variants"])
    assert set(sv["variants"]) | set(sv["skipped"]) == {"rms", "relative", "harmful_minus_benign"}
    assert {(r["variant"], r["classifier"]) for r in sv["probes"]} == {
        (v, c) for v in sv["variants"] for c in ("svm", "logreg")}
    assert sv["variants"]["rms"]["count"] == summary["neurons"]["count"]
    assert (out / "contrast" / "benign" / "scores.safetensors").is_file()
    assert "## Selection variants" in (out / "probes" / "report.md").read_text()
    md = (out / "probes" / "report.md").read_text()
    assert "Held-out benchmark" in md and md.count("rank p (AUROC)") == 2  # test split and held-out
    report = json.loads((out / "probes" / "report.json").read_text())
    assert {c["max_overlap_with_safety"] for c in report["controls"].values()} == {0}
    assert set(report["heldout"]["safety_vs_controls"]) == {"random", "random_global", "magnitude"}
    assert (out / "probes" / "probes" / "length-tokens-logreg" / "probe.json").is_file()
    recorded = json.loads((out / "run.json").read_text())
    assert recorded["data"]["files"]["train"]["used"] == 40
    assert recorded["versions"]["torch"] == torch.__version__
    assert recorded["pair"]["aligned"]["sha256"] != recorded["pair"]["base"]["sha256"]


def test_safety_neurons_are_the_top_five_percent_and_sit_in_the_changed_layer(tiny_run):
    _, settings, summary = tiny_run
    from safetyneurons.neurons.selection import NeuronSet

    ns = NeuronSet.load(Path(settings.out) / "contrast" / "neuron_set.json")
    from safetyneurons.neurons.selection import count_for_percent

    assert len(ns) == count_for_percent(5.0, 3 * 32)
    # only layer 1's MLP was changed: mlp_out differs from layer 1 on (layer 0 is untouched)
    assert ns.layers.min() >= 1
    assert summary["neurons"]["count"] == len(ns)


def test_exported_guard_agrees_with_the_trained_safety_probe(tiny_run):
    _, settings, _ = tiny_run
    from safetyneurons.guard.guard import Guard
    from safetyneurons.activations.store import Store

    guard = Guard.load(Path(settings.out) / "guard")
    held = Store.load(Path(settings.out) / "store" / "heldout")
    probs = np.array([r.unsafe_probability for r in guard.score(held.prompts)])
    # the guard's probe is the trained safety/logreg probe: re-score the stored features with it
    from safetyneurons.probes.probe import Probe

    probe = Probe.load(Path(settings.out) / "guard")
    # the default guard adds its words' logit (safetyneurons.guard.words) to the probe's
    assert guard.words is not None
    first: dict[int, str] = {}  # each prompt's first piece, its whole message when it fits, as the guard decodes it
    read = guard.reader.pieces(held.prompts)
    for piece, text in zip(read, guard.reader.piece_texts(read)):
        first.setdefault(piece.owner, text)
    texts = [first[i] for i in range(len(held.prompts))]
    whole = guard.words.probability(probe.decision_function(held.select(guard.neuron_set)), texts)
    # a prompt read whole scores as its stored features and its text do; a longer one as its most unsafe piece
    pieces = np.bincount([p.owner for p in read], minlength=len(held.prompts))
    assert (pieces == 1).any()
    np.testing.assert_allclose(probs[pieces == 1], whole[pieces == 1], atol=1e-5)
    assert (probs >= whole - 1e-5).all()


def _cli(*args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "safetyneurons", "run", *args], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--top-percent", "0"], "top"),
    (["--top-percent", "150"], "top"),
    (["--guard-piece-margin", "-1"], "piece margin must be a number from 0 to 10"),
    (["--guard-sentence-min-words", "0"], "--guard-sentence-min-words must be"),
    (["--base", "/nonexistent/model"], "With a custom --base, give --aligned"),
    (["--splits", "/nonexistent/splits"], "lacks"),
])
def test_run_bad_input_exits_2_without_traceback(tmp_path, args, message):
    out = tmp_path / "out"
    r = _cli("--out", str(out), "--no-progress", *args, env_extra={"SAFETYNEURONS_CACHE": str(tmp_path / "c")})
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (out / "run.json").exists()


def test_run_without_val_split_refuses_the_default_words_guard_before_any_work(tmp_path):
    splits = tmp_path / "splits"
    splits.mkdir()
    for name in ("contrast", "train", "test"):
        write_jsonl(splits / f"{name}.jsonl", _records(4, 0))
    out = tmp_path / "out"
    r = _cli("--out", str(out), "--no-progress", "--splits", str(splits), "--base", "/nonexistent/base",
             "--aligned", "/nonexistent/aligned", env_extra={"SAFETYNEURONS_CACHE": str(tmp_path / "c")})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "lacks val.jsonl" in r.stderr and "--no-guard-words" in r.stderr and not r.stdout.strip()
    assert not out.exists()  # refused before the directory was claimed: the advice works with the same --out


def test_each_preset_gets_its_own_default_directory():
    from safetyneurons.pipeline import RunSettings

    assert RunSettings.for_preset("default").out_dir == Path("runs/default")
    assert RunSettings.for_preset("paper").out_dir == Path("runs/paper")
    assert RunSettings.for_preset("paper", quick=True).out_dir == Path("runs/paper-quick")
    changed = RunSettings.for_preset("default", top_percent=2.0).out_dir
    assert changed.parent == Path("runs") and changed.name.startswith("default-") and changed.name != "default"
    assert RunSettings.for_preset("default", top_percent=3.0).out_dir != changed
    assert RunSettings.for_preset("default", out="x/y").out_dir == Path("x/y")
    # the guard reads words by default; without them is another setting, and so is a run recorded before that
    # default (its settings.json has no guard_words): reusing its directory is refused, not silently mixed
    from safetyneurons.run_settings import identity_of

    assert RunSettings().guard_words is True and RunSettings.for_preset("default").identity()["guard_words"] is True
    no_words = RunSettings.for_preset("default", guard_words=False)
    assert no_words.out_dir.name.startswith("default-") and "guard_words" not in no_words.identity()
    assert identity_of(no_words.identity()) != RunSettings.for_preset("default").identity()


def test_a_run_recorded_before_words_were_the_default_is_refused_naming_the_setting(tmp_path):
    from safetyneurons.errors import UserError
    from safetyneurons.pipeline import RunSettings, claim_out_dir
    from safetyneurons.run_settings import SETTINGS_FILE

    old = tmp_path / "old"
    old.mkdir()
    recorded = RunSettings.for_preset("default", guard_words=False).identity()
    assert "guard_words" not in recorded  # as settings.json was written before the default changed
    (old / SETTINGS_FILE).write_text(json.dumps(recorded))
    with pytest.raises(UserError, match=r"guard_words: False there, True now.*--force.*add --no-guard-words\."):
        claim_out_dir(RunSettings.for_preset("default", out=str(old)))
    assert claim_out_dir(RunSettings.for_preset("default", out=str(old), guard_words=False)) == (old, None)


def test_a_run_recorded_before_the_svm_guard_is_refused_naming_every_flag_that_resumes_it(tmp_path, monkeypatch):
    from safetyneurons.errors import UserError
    from safetyneurons.pipeline import RunSettings, claim_out_dir
    from safetyneurons.run_settings import SETTINGS_FILE

    # the default guard is the RBF SVM; the paper preset keeps the paper's logistic regression
    assert RunSettings().guard_classifier == "svm" and RunSettings.for_preset("default").guard_classifier == "svm"
    assert RunSettings.for_preset("paper").guard_classifier == "logreg"
    assert RunSettings.for_preset("paper", guard_classifier="svm").guard_classifier == "svm"
    old = tmp_path / "old"
    old.mkdir()
    recorded = RunSettings.for_preset("default", guard_words=False, guard_classifier="logreg").identity()
    (old / SETTINGS_FILE).write_text(json.dumps(recorded))
    with pytest.raises(UserError, match=r"guard_classifier: 'logreg' there, 'svm' now; guard_words: False there, "
                                        r"True now.*add --guard-classifier logreg --no-guard-words\."):
        claim_out_dir(RunSettings.for_preset("default", out=str(old)))
    # a setting without a flag that gives it back: no resume hint
    (old / SETTINGS_FILE).write_text(json.dumps({**recorded, "top_percent": 2.0}))
    with pytest.raises(UserError, match=r"replace that run\.$"):
        claim_out_dir(RunSettings.for_preset("default", out=str(old), guard_words=False, guard_classifier="logreg"))
    # without --out the run lands in runs/default; the flags alone would name another directory, so the hint
    # names the directory too, and following it resumes that run
    logreg = RunSettings.for_preset("default", guard_classifier="logreg", guard_words=False)
    assert logreg.out_dir.name.startswith("default-")
    (old / SETTINGS_FILE).write_text(json.dumps(recorded))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    old.rename(tmp_path / "runs" / "default")
    with pytest.raises(UserError, match=r"add --out runs/default --guard-classifier logreg --no-guard-words\."):
        claim_out_dir(RunSettings.for_preset("default"))
    again = RunSettings.for_preset("default", out="runs/default", guard_classifier="logreg", guard_words=False)
    assert claim_out_dir(again) == (Path("runs/default"), None)


def _recorded_run(out: Path, identity: dict) -> Path:
    """A run directory that holds only the settings.json of a run with ``identity``."""
    from safetyneurons.run_settings import SETTINGS_FILE

    out.mkdir()
    (out / SETTINGS_FILE).write_text(json.dumps(identity))
    return out


def test_a_run_recorded_with_the_validation_layer_budget_is_refused_naming_the_flag_that_resumes_it(tmp_path):
    from safetyneurons.errors import UserError
    from safetyneurons.pipeline import RunSettings, claim_out_dir
    from safetyneurons.run_settings import SETTINGS_FILE

    # no layer budget by default (docs/guard_quality.md); runs written before recorded none, which meant auto
    assert RunSettings().guard_max_layer is None and RunSettings.for_preset("paper").guard_max_layer is None
    recorded = RunSettings.for_preset("default", guard_max_layer="auto").identity()
    assert "guard_max_layer" not in recorded
    old = _recorded_run(tmp_path / "old", recorded)
    with pytest.raises(UserError, match=r"guard_max_layer: 'auto' there, None now.*add --guard-max-layer auto\.$"):
        claim_out_dir(RunSettings.for_preset("default", out=str(old)))
    assert claim_out_dir(RunSettings.for_preset("default", out=str(old), guard_max_layer="auto")) == (old, None)
    fixed = RunSettings.for_preset("default", guard_max_layer=7).identity()
    (old / SETTINGS_FILE).write_text(json.dumps(fixed))
    with pytest.raises(UserError, match=r"add --guard-max-layer 7\.$"):
        claim_out_dir(RunSettings.for_preset("default", out=str(old)))
    # and a run made with auto has a directory of its own, not runs/default
    assert RunSettings.for_preset("default", guard_max_layer="auto").out_dir.name.startswith("default-")


def test_the_default_has_no_piece_margin_and_a_run_with_one_is_refused_naming_its_flag(tmp_path):
    from safetyneurons.errors import UserError
    from safetyneurons.pipeline import RunSettings, claim_out_dir
    from safetyneurons.run_settings import SETTINGS_FILE

    # no margin by default: padding must not lower a request's score (docs/guard_quality.md, "Soundness first")
    assert RunSettings().guard_piece_margin == 0.0 and RunSettings.for_preset("paper").guard_piece_margin == 0.0
    assert "guard_piece_margin" not in RunSettings().identity()  # runs written before the margin keep their directory
    old = tmp_path / "old"
    old.mkdir()
    (old / SETTINGS_FILE).write_text(json.dumps(RunSettings.for_preset("default", guard_piece_margin=0.5).identity()))
    want = r"guard_piece_margin: 0\.5 there, 0\.0 now.*add --guard-piece-margin 0\.5\.$"
    with pytest.raises(UserError, match=want):
        claim_out_dir(RunSettings.for_preset("default", out=str(old)))
    assert claim_out_dir(RunSettings.for_preset("default", out=str(old), guard_piece_margin=0.5)) == (old, None)
    assert RunSettings.for_preset("default", guard_piece_margin=0.5).out_dir.name.startswith("default-")
    assert RunSettings.for_preset("default").out_dir.name == "default"


def test_a_run_whose_guard_widens_short_sentences_is_refused_naming_its_flag(tmp_path):
    from safetyneurons.errors import UserError
    from safetyneurons.pipeline import RunSettings, claim_out_dir

    # every sentence alone by default (docs/guard_quality.md, "Soundness first"); runs written before the setting
    # recorded none, which meant 8 words
    assert RunSettings().guard_sentence_min_words == 1 == RunSettings.for_preset("paper").guard_sentence_min_words
    recorded = RunSettings.for_preset("default", guard_sentence_min_words=8).identity()
    assert "guard_sentence_min_words" not in recorded
    old = _recorded_run(tmp_path / "old", recorded)
    with pytest.raises(UserError, match=r"guard_sentence_min_words: 8 there, 1 now.*add --guard-sentence-min-words 8\.$"):
        claim_out_dir(RunSettings.for_preset("default", out=str(old)))
    assert claim_out_dir(RunSettings.for_preset("default", out=str(old), guard_sentence_min_words=8)) == (old, None)
    with pytest.raises(UserError, match="guard-sentence-min-words"):
        RunSettings.for_preset("default", guard_sentence_min_words=0).validate()


def _file_hashes(d: Path) -> dict:
    import hashlib

    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The pipeline run twice from one working directory, reference and paper presets, default --out."""
    root = tmp_path_factory.mktemp("presets")
    base, aligned, splits = _tiny_pair_and_splits(root)
    from safetyneurons.pipeline import RunSettings, run

    small = dict(base=str(base), aligned=str(aligned), splits=str(splits), random_draws=1, n_boot=20,
                 store_dtype="float32", batch_size=8, feature_sets=("safety",), classifiers=("logreg",),
                 guard_classifier="logreg")
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFETYNEURONS_CACHE", str(root / "cache"))
        mp.chdir(root)
        for preset, extra in (("default", {}), ("paper", {"guard_words": False})):  # with and without words
            s = RunSettings.for_preset(preset, **small, **extra)
            run(s, progress=False)
            runs[preset] = (s, root / s.out_dir, _file_hashes(root / s.out_dir))
    return root, small, runs


def test_two_presets_into_the_default_location_both_survive(two_runs):
    root, small, runs = two_runs
    (s_ref, ref_dir, ref_before), (s_pap, pap_dir, _) = runs["default"], runs["paper"]
    assert ref_dir != pap_dir
    assert ref_dir.parent == pap_dir.parent == root / "runs"
    assert ref_dir.name.startswith("default") and pap_dir.name.startswith("paper")
    assert _file_hashes(ref_dir) == ref_before  # the paper run did not touch the reference run
    for d, s in ((ref_dir, s_ref), (pap_dir, s_pap)):
        recorded = json.loads((d / "run.json").read_text())["settings"]
        assert (recorded["hook_point"], recorded["pooling"]) == (s.hook_point, s.pooling)
        assert (d / "guard" / "guard.json").is_file()
    # the default guard reads words; `--no-guard-words` ships the neurons alone, in a directory of its own
    ref_guard = json.loads((ref_dir / "guard" / "guard.json").read_text())
    pap_guard = json.loads((pap_dir / "guard" / "guard.json").read_text())
    assert ref_guard["format"] == "safetyneurons.guard/3" and "words.json" in ref_guard["files"]
    assert pap_guard["format"] == "safetyneurons.guard/2" and pap_guard.get("words") is None
    assert not any(f.startswith("words.") for f in pap_guard["files"]) and not (pap_dir / "guard" / "words.json").exists()
    from safetyneurons.pipeline import RunSettings

    s_pap_words = RunSettings.for_preset("paper", **small)  # the same settings with words: another directory
    assert root / s_pap_words.out_dir != pap_dir and s_pap.guard_words is False and s_ref.guard_words is True


def test_clashing_out_without_force_exits_2_and_keeps_the_old_run(two_runs, tmp_path):
    root, small, runs = two_runs
    _, ref_dir, ref_before = runs["default"]
    args = ["--out", str(ref_dir), "--paper", "--base", small["base"], "--aligned", small["aligned"],
            "--splits", small["splits"], "--no-progress"]
    r = _cli(*args, env_extra={"SAFETYNEURONS_CACHE": str(root / "cache")})
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "other settings" in r.stderr and "hook_point" in r.stderr
    assert "--force" in r.stderr
    assert _file_hashes(ref_dir) == ref_before

    from safetyneurons.errors import UserError
    from safetyneurons.pipeline import RunSettings, run

    # a non-empty directory that holds no run is refused too
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no safetyneurons run"):
        run(RunSettings.for_preset("default", out=str(tmp_path / "stuff"), **small), progress=False)
    assert (tmp_path / "stuff" / "notes.txt").read_text() == "mine"


def test_force_replaces_a_clashing_run_only_when_the_new_one_succeeds(two_runs, tmp_path):
    import shutil

    from safetyneurons.errors import UserError
    from safetyneurons.pipeline import RunSettings, run

    root, small, runs = two_runs
    _, ref_dir, ref_before = runs["default"]
    target = tmp_path / "run"
    shutil.copytree(ref_dir, target)
    # a forced run that fails restores the old run
    bad = dict(small, splits=str(tmp_path / "no-splits"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFETYNEURONS_CACHE", str(root / "cache"))
        with pytest.raises(UserError, match="lacks"):
            run(RunSettings.for_preset("paper", out=str(target), **bad), progress=False, force=True)
        assert _file_hashes(target) == ref_before
        # a forced run that succeeds replaces it, and leaves no backup behind
        run(RunSettings.for_preset("paper", out=str(target), **small), progress=False, force=True)
    assert json.loads((target / "run.json").read_text())["settings"]["hook_point"] == "mlp_neurons"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.e2e
def test_default_pair_quick_pipeline(tmp_path, user_cache):
    """The real default pair (when its twin is built) on a small slice of the default splits."""
    from safetyneurons.data import splits as data
    from safetyneurons.errors import UserError
    from safetyneurons.pipeline import RunSettings, run
    from safetyneurons.twin import resolve_twin_ref

    try:
        resolve_twin_ref("twin:default")
    except UserError as e:
        pytest.skip(f"default twin not built: {e}")
    d = data.default_splits_dir()
    splits = tmp_path / "splits"
    splits.mkdir()
    for name, n in (("contrast", 24), ("train", 60), ("val", 30), ("test", 30), ("heldout", 30)):
        recs = data.read_records(d / f"{name}.jsonl")
        if name != "contrast":
            recs = [r for r in recs if r["label"] == 1][: n // 2] + [r for r in recs if r["label"] == 0][: n // 2]
        write_jsonl(splits / f"{name}.jsonl", recs[:n])
    summary = run(RunSettings(out=str(tmp_path / "run"), splits=str(splits), random_draws=2, n_boot=50,
                              max_length=96), progress=False)
    assert summary["pair"]["base"]["num_layers"] == 30
    from safetyneurons.neurons.selection import count_for_percent

    assert summary["neurons"]["count"] == count_for_percent(5.0, 30 * 576)
    safety = [r for r in summary["results"] if r["feature_set"] == "safety"]
    assert safety and all(r["metrics"]["auroc"] > 0.5 for r in safety)


def test_train_guard_words_ships_words_calibrated_as_the_guard_scores(tiny_run, capsys, tmp_path):
    """`train --guard-words` (as `run` does by default): the guard reads each piece's words beside its neurons, its
    thresholds are set on validation scored that way, and the words ship hashed inside the guard."""
    from builders import cli_in_process

    root, settings, _ = tiny_run
    run, out = Path(settings.out), tmp_path / "words"
    store = run / "store"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFETYNEURONS_CACHE", str(root / "cache"))
        code, _, err = cli_in_process(
            ["train", "--train", store / "train", "--test", store / "test", "--val", store / "val",
             "--neurons", run / "contrast" / "neuron_set.json", "--feature-sets", "safety", "--classifiers", "logreg",
             "--guard-max-layer", "none", "--bootstrap", "0", "--target-fpr", "0.1", "--guard-words",
             "--guard-piece-margin", "0.5", "--out", out / "probes", "--export-guard", out / "guard"], capsys)
        assert code == 0, err
        code, got, err = cli_in_process(
            ["train", "--train", store / "train", "--test", store / "test", "--neurons",
             run / "contrast" / "neuron_set.json", "--feature-sets", "safety", "--guard-words",
             "--out", out / "no-val", "--export-guard", out / "no-val-guard"], capsys)
        assert code == 2 and "--guard-words needs --val" in err and not got and not (out / "no-val-guard").exists()
        for margin, why in (("1", "--guard-piece-margin needs --val"), ("-1", "piece margin must be a number")):
            code, got, err = cli_in_process(
                ["train", "--train", store / "train", "--test", store / "test", "--neurons",
                 run / "contrast" / "neuron_set.json", "--feature-sets", "safety", "--guard-piece-margin", margin,
                 "--out", out / "bad-margin", "--export-guard", out / "bad-margin-guard"], capsys)
            assert code == 2 and why in err and len(err.strip().splitlines()) == 1 and not got
            assert not (out / "bad-margin-guard").exists()
        code, _, err = cli_in_process(  # no words, no margin: what `run --no-guard-words` ships
            ["train", "--train", store / "train", "--test", store / "test", "--val", store / "val",
             "--neurons", run / "contrast" / "neuron_set.json", "--feature-sets", "safety", "--classifiers", "logreg",
             "--bootstrap", "0", "--target-fpr", "0.1", "--out", out / "plain", "--export-guard", out / "plain-guard"],
            capsys)
        assert code == 0, err
        plain = json.loads((out / "plain-guard" / "guard.json").read_text())
        assert plain.get("words") is None and "piece_margin" not in plain and "piece_margin" not in plain["calibration"]
        meta = json.loads((out / "guard" / "guard.json").read_text())
        assert meta["words"]["combine"].startswith("sigmoid((text_logit")
        assert {"words.json", "words.safetensors"} <= set(meta["files"])
        assert "words" in meta["calibration"]["scoring"] and "margin of 0.5" in meta["calibration"]["scoring"]
        g = Guard.load(out / "guard")
    assert g.words is not None and len(g.words.text.vocabulary) > 0
    assert g.piece_margin == meta["piece_margin"] == meta["calibration"]["piece_margin"] == 0.5
    val = [json.loads(line) for line in (store / "val" / "records.jsonl").read_text().splitlines() if line.strip()]
    p = g.unsafe_probability([r["prompt"] for r in val])
    y = np.array([r["label"] for r in val])
    strict = meta["calibration"]["operating_points"]["strict"]
    assert strict["validation"]["fpr_benign"] == pytest.approx(float((p[y == 0] >= g.threshold).mean()))
