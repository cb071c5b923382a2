"""The readout comparison: the agreement readout finds a planted harmful token anywhere in long benign text, the
per-token rows agree with the reader's pooled features, the rephrasing rules rewrite as documented, and the
pre-registered rule picks by what docs/guard_quality.md says."""

from __future__ import annotations

import numpy as np
import pytest

from builders import HARMFUL, HOOK, MLP, NUM_LAYERS, SAFE, J, plant_model, run_cli
from tiny import tiny_tokenizer
from safetyneurons.data import rephrase
from safetyneurons.probes import readout_metrics as rm

PAD_SENTENCES = ["Write a short and friendly poem about the sea.", "The moon and the stars shine tonight.",
                 "Tell me about the weather in spring.", "What is the capital of France?",
                 "Explain photosynthesis simply.", "Give me a bread recipe for a family dinner."]


# ------------------------------------------------------------------------------------ the planted oracle
@pytest.fixture(scope="module")
def planted_lm(tmp_path_factory, cache):
    """A tiny llama whose layer-0 neuron J fires on one token of HARMFUL only (builders.plant_model)."""
    from safetyneurons.model.pair import load_model

    tok = tiny_tokenizer()
    ids = lambda text: set(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    template = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    benign = " ".join(PAD_SENTENCES + SAFE)
    trigger = min(ids(HARMFUL) - ids(benign) - ids(template))
    root = tmp_path_factory.mktemp("planted-readouts")
    plant_model(root / "model", trigger)
    return load_model(str(root / "model"))


def _cache(lm, tmp_path):
    from safetyneurons.neurons.selection import NeuronSet
    from safetyneurons.probes.readout_cache import ReadoutCache, columns, layer_block

    ns = NeuronSet(hook_point=HOOK, num_layers=NUM_LAYERS, width=MLP, layers=[0, 0, 0], indices=[3, J, 20],
                   scores=[1.0, 1.0, 1.0], model=lm.describe())
    block = layer_block(ns)
    cols = columns(block, ns)
    return ReadoutCache(lm, block, cols, tmp_path / "cache", 64, batch_size=8, progress=False), cols


def _benign(rng, n_sentences: int) -> str:
    return " ".join(PAD_SENTENCES[int(i)] for i in rng.integers(len(PAD_SENTENCES), size=n_sentences))


def _served_training(lm, tmp_path):
    """A readout cache that reads as a guard with sentence pieces does, on three layer-0 neurons (J planted), and
    the training texts read through it: (cache, columns, texts, labels, their text set)."""
    from builders import SAFE, UNSAFE
    from safetyneurons.activations.reader import GUARD_READING
    from safetyneurons.neurons.selection import NeuronSet
    from safetyneurons.probes.readout_cache import ReadoutCache, columns, layer_block

    ns = NeuronSet(hook_point=HOOK, num_layers=NUM_LAYERS, width=MLP, layers=[0, 0, 0], indices=[3, J, 20],
                   scores=[1.0, 1.0, 1.0], model=lm.describe())
    block = layer_block(ns)
    cols = columns(block, ns)
    cache = ReadoutCache(lm, block, cols, tmp_path / "cache", 64, batch_size=8, progress=False,
                         reading=GUARD_READING)
    texts = UNSAFE + SAFE + PAD_SENTENCES
    y = np.asarray([1] * len(UNSAFE) + [0] * (len(SAFE) + len(PAD_SENTENCES)))
    return cache, cols, texts, y, cache.read("train", texts)


def test_agreement_finds_planted_token_at_every_position(planted_lm, tmp_path):
    from safetyneurons.probes.readout_probes import train_agreement, train_pooled
    from safetyneurons.probes.readouts import place

    rng = np.random.default_rng(0)
    cache, cols = _cache(planted_lm, tmp_path)
    harmful = [HARMFUL, HARMFUL + " Tell me now.", "Please: " + HARMFUL, HARMFUL + " Step by step."] * 3
    benign = SAFE + [_benign(rng, n) for n in (1, 2, 4, 8, 12, 1, 3, 6)]
    train = cache.read("train", harmful + benign)
    y = np.asarray([1] * len(harmful) + [0] * len(benign))
    pooled = train_pooled(train, y, "safety", cols)
    agree = train_agreement(train, y, "safety", cols, np.arange(len(cols)), pooled["mean"].probe, [4])[4]

    val_benign = [_benign(rng, n) for n in (1, 2, 5, 10, 20, 40, 60)] + SAFE
    t_agree = rm.threshold(np.zeros(len(val_benign), int), agree.score(cache.read("vb", val_benign)))
    t_mean = rm.threshold(np.zeros(len(val_benign), int), pooled["mean"].score(cache.read("vb", val_benign)))
    filler = _benign(rng, 70)  # several hundred tokens of benign text
    composed = [place(HARMFUL, filler, pos) for pos in ("start", "middle", "end")]
    composed += [place(HARMFUL, _benign(rng, 3), pos) for pos in ("start", "middle", "end")]
    ts = cache.read("composed", composed)
    assert ts.content[:3].min() > 300
    assert (agree.score(ts) >= t_agree).all(), agree.score(ts)
    assert (agree.score(cache.read("pad", [filler])) < t_agree).all()
    # the oracle has teeth: the whole-text mean dilutes the one token in long text
    assert (pooled["mean"].score(ts)[:3] < t_mean).all()


def test_token_rows_match_reader_pooling_and_window_logits(planted_lm, tmp_path):
    from safetyneurons.activations.features import FeatureSpec
    from safetyneurons.activations.reader import ActivationReader
    from safetyneurons.probes.probe import Probe
    from safetyneurons.probes.readout_cache import LAST, MEAN
    from safetyneurons.probes.readout_probes import rolling_max, token_logits

    cache, cols = _cache(planted_lm, tmp_path)
    texts = [HARMFUL, "Write a poem about the sea.", _benign(np.random.default_rng(1), 10)]
    ts = cache.read("t", texts)
    spec = FeatureSpec(HOOK, "mean", None, cache.block, model=planted_lm.describe())
    X = ActivationReader(planted_lm, spec).features(texts)
    np.testing.assert_allclose(ts.pooled[:, MEAN], X, atol=1e-3)  # the same reader, the same features
    # per-token rows: the last content token's row is the ``last`` readout, the mean of the rows the ``mean`` one
    np.testing.assert_allclose(ts.rows[ts.offsets[1:] - 1].astype(np.float32), ts.pooled[:, LAST][:, cols], atol=2e-3)
    np.testing.assert_allclose(ts.token_rows(2).astype(np.float32).mean(0), ts.pooled[2, MEAN][cols], atol=2e-3)
    probe = Probe("logreg", cv=0).fit(ts.pooled[:, MEAN][:, cols].repeat(2, 0), [1, 1, 0, 0, 0, 0])
    rows = ts.token_rows(2)
    z = token_logits(probe, rows)
    np.testing.assert_allclose(z[2:6].mean(), probe.decision_function(rows[2:6].astype(np.float64).mean(0)[None])[0],
                               atol=1e-3)
    best, start = rolling_max(np.array([0.0, 5.0, 1.0, -3.0, 4.0, 4.0]), 2)
    assert (best, start) == (4.0, 4)
    assert rolling_max(np.array([1.0, 2.0]), 5) == (1.5, 0)


def test_served_pieces_are_the_guards_reading(planted_lm, tmp_path):
    """The comparison's "as served" rows read every piece the guard reads, sentence pieces included when the
    guard's reading records them, and each row is that piece's pooled features."""
    from safetyneurons.activations.features import FeatureSpec
    from safetyneurons.activations.reader import GUARD_READING, ActivationReader, reading_options
    from safetyneurons.neurons.selection import NeuronSet
    from safetyneurons.probes.readout_cache import ReadoutCache, columns, layer_block

    ns = NeuronSet(hook_point=HOOK, num_layers=NUM_LAYERS, width=MLP, layers=[0, 0, 0], indices=[3, J, 20],
                   scores=[1.0, 1.0, 1.0], model=planted_lm.describe())
    block = layer_block(ns)
    long_text = _benign(np.random.default_rng(2), 12) + " " + HARMFUL
    texts = [long_text, HARMFUL]
    counts = {}
    for name, reading in (("windows", None), ("sentences", GUARD_READING)):
        cache = ReadoutCache(planted_lm, block, columns(block, ns), tmp_path / name, 64, batch_size=8,
                             progress=False, reading=reading)
        ts = cache.read("t", texts, windows=True)
        spec = FeatureSpec(HOOK, "mean", 64, block, model=planted_lm.describe())
        guard_reader = ActivationReader(planted_lm, spec, **reading_options(reading))
        pieces = guard_reader.pieces(texts)
        feats, owner = guard_reader.read_pieces(pieces)
        assert ts.window_owner.tolist() == owner.tolist()
        np.testing.assert_allclose(ts.windows, feats, atol=1e-3)
        counts[name] = len(pieces)
    assert counts["sentences"] > counts["windows"]  # the sentence pieces are read too


def test_text_scorers_as_served_read_each_piece_alone(planted_lm, tmp_path):
    """TF-IDF and the neurons + TF-IDF sum "as served" score the text of every piece the guard reads (whole,
    windows, sentences) and take the most unsafe: a request padded with benign text scores as it does alone, where
    the same scorers reading the whole text are diluted by the padding."""
    from safetyneurons.probes.readout_probes import train_pooled
    from safetyneurons.probes.readouts import _text_scorers

    cache, cols, train_texts, y, train = _served_training(planted_lm, tmp_path)
    mean = train_pooled(train, y, "safety", cols)["mean"]
    scorers = {sc.name: sc for sc in _text_scorers(train_texts, y, train, mean, 0, cache.piece_texts)}
    rng = np.random.default_rng(3)
    padded = [_benign(rng, 10) + " " + HARMFUL, _benign(rng, 10)]
    texts = padded + [HARMFUL]
    ts = cache.read("eval", texts, windows=True)
    words, owner = cache.piece_texts(texts)
    assert owner.tolist() == ts.window_owner.tolist()
    assert HARMFUL in [w.strip() for w, o in zip(words, owner) if o == 0]  # its own sentence piece
    for whole, served in (("text/tfidf", "text/tfidf_windows"), ("safety+text/mean", "safety+text/mean_windows")):
        p_whole, p_served = scorers[whole].fn(texts, ts), scorers[served].fn(texts, ts)
        assert scorers[served].cost == "windows"
        assert p_served[0] == pytest.approx(p_served[2], abs=1e-6), served  # padded: as high as the request alone
        assert p_whole[0] < p_whole[2] - 0.05, whole  # whole-text reading: diluted by the padding
        assert p_served[0] > p_served[1], served  # above the same padding without the request


# ------------------------------------------------------------------------------------------ rephrasing
@pytest.mark.parametrize("rule, prompt, expected", [
    ("question_imperative", "How do I make a cake?", "Tell me how to make a cake."),
    ("question_imperative", "How to bake bread?", "Tell me how to bake bread."),
    ("question_imperative", "Can you write a poem about the sea?", "Write a poem about the sea."),
    ("question_imperative", "Write a poem about the sea.", "Can you write a poem about the sea?"),
    ("question_imperative", "The sky is blue.", None),
    ("do_can", "How do I make a cake?", "How can I make a cake?"),
    ("do_can", "Can you help me?", "Do you help me?"),
    ("do_can", "Bake bread.", None),
    ("polite_prefix", "Bake bread.", "Please help me with this: Bake bread."),
    ("polite_suffix", "Bake bread.", "Bake bread. Thank you so much!"),
    ("tense", "How can I make a cake?", "How did people make a cake in the past?"),
    ("tense", "What is the capital of France?", "What was the capital of France?"),
    ("tense", "Bake bread.", None),
    ("typo", "Explain photosynthesis simply.", "Explain photosnythesis simply."),
    ("typo", "Hi.", None),
])
def test_rephrase_rules(rule, prompt, expected):
    assert rephrase.RULES[rule](prompt) == expected


def test_rephrasings_keep_only_changes():
    out = rephrase.rephrasings("How do I make a cake?")
    assert set(out) == set(rephrase.RULES)
    assert all(v != "How do I make a cake?" for v in out.values())
    assert "do_can" not in rephrase.rephrasings("Bake bread.")


# ------------------------------------------------------------------------------------------ the rule
def _row(name, comp, recall, hard, cost=1.0, eligible=True):
    return {"name": name, "eligible": eligible, "val_composition_recall": comp, "val_recall": recall,
            "val_hard_negative": hard, "cost": cost}


def test_rule_keeps_composition_then_recall():
    rows = [_row("a", 0.95, 0.80, 0.1), _row("b", 0.85, 0.99, 0.0), _row("c", 0.92, 0.90, 0.3),
            _row("ctrl", 1.0, 0.99, 0.0, eligible=False)]
    out = rm.choose(rows)
    assert out["chosen"] == "c" and out["passed"] == ["a", "c"]
    assert out["would_win"] == "ctrl"


def test_rule_ties_go_to_hard_negatives_then_cost():
    rows = [_row("a", 0.95, 0.900, 0.20, cost=1.0), _row("b", 0.95, 0.895, 0.10, cost=5.0),
            _row("c", 0.95, 0.870, 0.00, cost=1.0)]
    assert rm.choose(rows)["chosen"] == "b"  # within 1 point of the best recall: lower hard-negative flag rate
    rows = [_row("a", 0.95, 0.90, 0.10, cost=5.0), _row("b", 0.95, 0.90, 0.10, cost=1.0)]
    assert rm.choose(rows)["chosen"] == "b"  # then the cheaper readout


def test_rule_without_a_passing_variant_takes_best_composition():
    out = rm.choose([_row("a", 0.50, 0.95, 0.0), _row("b", 0.70, 0.60, 0.0)])
    assert out["chosen"] == "b" and out["passed"] == [] and "no variant" in out["reason"]


def test_choose_k_by_the_rule():
    rows = [{"k": 1, "val_composition_recall": 0.95, "val_recall": 0.80},
            {"k": 4, "val_composition_recall": 0.95, "val_recall": 0.905},
            {"k": 8, "val_composition_recall": 0.92, "val_recall": 0.90},
            {"k": 16, "val_composition_recall": 0.80, "val_recall": 0.99}]
    assert rm.choose_k(rows) == 8
    assert rm.choose_k([{"k": 2, "val_composition_recall": 0.5, "val_recall": 0.9},
                        {"k": 4, "val_composition_recall": 0.6, "val_recall": 0.1}]) == 4


def test_length_buckets_and_kept():
    lengths = np.array([5, 10, 40, 40, 300])
    y = np.array([0, 1, 0, 1, 0])
    p = np.array([0.9, 0.9, 0.1, 0.2, 0.8])
    b = {r["bucket"]: r for r in rm.length_buckets(lengths, y, p, 0.5)}
    assert b["1-16"]["benign_flag_rate"] == 1.0 and b["1-16"]["harmful_recall"] == 1.0
    assert b["33-64"]["harmful_recall"] == 0.0 and b[">256"]["benign_flag_rate"] == 1.0
    assert b["65-128"]["n_benign"] == 0 and b["65-128"]["benign_flag_rate"] is None
    assert rm.kept(np.array([0.9, 0.1, 0.6]), np.array([0.8, 0.7, 0.4]), 0.5) == pytest.approx(1 / 3)


def test_cli_refuses_a_run_without_guard(tmp_path):
    r = run_cli("readouts", "--run", tmp_path, "--out", tmp_path / "out")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "holds no guard" in r.stderr and "Traceback" not in r.stderr


def test_readme_rows_keep_the_eligible_readouts_and_baselines_with_held_out_figures():
    from safetyneurons.probes.readout_report import README_COLUMNS, readme_rows

    def row(name, eligible, auroc):
        return [name, "f", "r", eligible, 0.5, 0.9, 0.1, auroc, 0.2, 0.7, 0.243, 0.3267, 0.93]

    rows = [row("safety/mean_windows", True, 0.8058), row("random0/mean", False, 0.8), row("text/tfidf", False, 0.907),
            row("deployed guard", False, 0.81)]
    frontier = {"text/tfidf": [{"recall_target": 0.7, "flag_ordinary_benign": 0.0, "flag_hard_negative": 0.02},
                               {"recall_target": 0.8, "flag_ordinary_benign": 0.01, "flag_hard_negative": 0.1}]}
    got = readme_rows(rows, frontier)
    assert [r[0] for r in got] == ["safety/mean_windows", "text/tfidf"]
    assert len(got[0]) == len(README_COLUMNS) and got[0][1:] == ["0.806", "70.0%", "24.3%", "32.7%", "93.0%", "-"]
    assert got[1][-1] == "1.0% / 10.0%"  # the 80% column


def test_frontier_gives_flag_rates_at_equal_recall():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    kind = np.array(["harmful"] * 4 + ["benign", "benign", "hard_negative", "hard_negative"])
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.65, 0.1, 0.85, 0.2])
    half, full = rm.frontier(y, kind, p, recalls=(0.5, 1.0))
    assert half["recall"] == 0.5 and half["flag_ordinary_benign"] == 0.0 and half["flag_hard_negative"] == 0.5
    assert full["recall"] == 1.0 and full["flag_ordinary_benign"] == 0.5 and full["flag_hard_negative"] == 0.5


def test_readme_tables_show_the_shipped_guard_by_length_and_rephrasing():
    from safetyneurons.probes.readout_report import readme_tables

    report = {"length_buckets": {"deployed guard": [
        {"bucket": "1-16", "n_benign": 3, "n_harmful": 1, "benign_flag_rate": 1 / 3, "harmful_recall": 1.0},
        {"bucket": ">256", "n_benign": 0, "n_harmful": 2, "benign_flag_rate": None, "harmful_recall": 0.5}]},
        "rephrase": {"deployed guard": [{"rule": "do_can", "n": 4, "kept": 0.75}]}}
    by_length, kept = readme_tables(report)
    assert by_length["columns"] == ["tokens", "1-16 (3 / 1)", ">256 (0 / 2)"]
    assert by_length["rows"] == [["benign flagged", "33.3%", "-"], ["harmful recall", "100.0%", "50.0%"]]
    assert kept["columns"] == ["rule", "do_can (4)"] and kept["rows"] == [["kept", "75.0%"]]
    assert readme_tables({"length_buckets": {}, "rephrase": {}}) == []


def test_deployed_guard_row_scores_as_a_guard_with_words_serves(tmp_path, cache):
    """The comparison's "deployed guard" row of a guard with words reads each piece's neurons and words, as
    Guard.unsafe_probability does."""
    from builders import build_guard
    from safetyneurons.guard.guard import Guard
    from safetyneurons.probes.readout_cache import ReadoutCache, columns, layer_block
    from safetyneurons.probes.readouts import _words_served

    path, lm, ns, _ = build_guard(tmp_path, max_length=64, words=True)
    g = Guard.load(path, lm=lm)
    block = layer_block(ns)
    cache = ReadoutCache(lm, block, columns(block, ns), tmp_path / "cache", g.max_length, batch_size=8,
                         progress=False, reading=g.meta.get("reading"))
    texts = [HARMFUL, _benign(np.random.default_rng(5), 12) + " " + HARMFUL, PAD_SENTENCES[0]]
    ts = cache.read("t", texts, windows=True)
    sc = _words_served("deployed guard", "mean_windows + words", g.probe, columns(block, ns), g.words,
                       cache.piece_texts)
    np.testing.assert_allclose(sc.fn(texts, ts), g.unsafe_probability(texts), atol=1e-4)


def test_margin_rule_keeps_composition_then_recall_and_ties_go_to_the_larger_margin():
    def row(m, comp, recall):
        return {"margin": m, "val_composition_recall": comp, "val_recall": recall}

    rows = [row(0.0, 0.95, 0.850), row(0.5, 0.93, 0.862), row(1.0, 0.91, 0.856), row(2.0, 0.80, 0.95)]
    out = rm.choose_margin(rows)
    # 0.5 has the highest recall, 1 is within a point of it: the larger margin; 0 is not within a point
    assert out["chosen"] == 1.0 and out["passed"] == [0.0, 0.5, 1.0]
    assert rm.choose_margin([row(0.0, 0.95, 0.80), row(0.5, 0.92, 0.85)])["chosen"] == 0.5
    assert rm.choose_margin([row(0.0, 0.95, 0.86), row(0.5, 0.92, 0.80)])["chosen"] == 0.0  # recall first
    none = rm.choose_margin([row(0.0, 0.5, 0.9), row(1.0, 0.4, 0.95)])
    assert none["chosen"] == 0.0 and none["passed"] == [] and "no margin" in none["reason"]


def test_classifier_rule_reads_the_two_guards_with_words_as_served():
    from safetyneurons.probes.readouts import WORDS, WORDS_SVM, choose_classifier

    rows = [_row(WORDS, 0.92, 0.870, 0.08), _row(WORDS_SVM, 0.92, 0.885, 0.09),
            _row("safety/mean_windows/svm", 0.99, 0.99, 0.0, eligible=False)]  # not a candidate, however good
    assert choose_classifier(rows) == "svm"
    rows[1] = _row(WORDS_SVM, 0.92, 0.875, 0.09)  # within a point: the lower hard-negative rate
    assert choose_classifier(rows) == "logreg"
    rows[1] = _row(WORDS_SVM, 0.92, 0.875, 0.08)  # a full tie: the cheaper, logistic regression, in any order
    assert choose_classifier(rows) == "logreg" and choose_classifier(rows[::-1]) == "logreg"
    rows[0] = _row(WORDS, 0.85, 0.95, 0.0)  # below 90% composition recall
    assert choose_classifier(rows) == "svm"
    assert choose_classifier([_row("text/tfidf", 0.1, 0.5, 0.0)]) is None


def test_svm_guard_as_served_reads_each_piece_alone(planted_lm, tmp_path):
    """The SVM rows of the comparison (the neurons alone and with words) score every piece the guard reads and take
    the most unsafe, as the logistic-regression rows do: a padded request scores at least as it does alone."""
    from safetyneurons.guard.words import Words
    from safetyneurons.probes.probe import Probe
    from safetyneurons.probes.readout_cache import MEAN
    from safetyneurons.probes.readouts import WORDS_CONTENT, WORDS_SVM, _svm_scorers

    cache, cols, train_texts, y, train = _served_training(planted_lm, tmp_path)
    scorers = {sc.name: sc for sc in _svm_scorers(train_texts, y, train, cols, 0, cache.piece_texts)}
    assert set(scorers) == {"safety/mean_windows/svm", WORDS_SVM, WORDS_CONTENT}
    rng = np.random.default_rng(3)
    texts = [_benign(rng, 10) + " " + HARMFUL, _benign(rng, 10), HARMFUL]
    ts = cache.read("eval", texts, windows=True)
    for sc in scorers.values():
        p = sc.fn(texts, ts)
        assert sc.cost == "windows" and p[0] >= p[2] - 1e-6 and p[0] > p[1], sc.name  # its piece is read alone
    # the words row is the Words sum on the SVM's decision values, exactly as a guard with words computes it
    X = train.pooled[:, MEAN][:, cols]
    svm = Probe("svm", C=1.0, seed=0, cv=0).fit(X, y)
    words = Words.fit(train_texts, y, svm.decision_function(X), seed=0)
    pieces, owner = cache.piece_texts(texts)
    expect = words.probability(svm.decision_function(ts.windows[:, cols]), pieces)
    got = np.full(len(texts), -np.inf)
    np.maximum.at(got, owner, expect)
    np.testing.assert_allclose(scorers[WORDS_SVM].fn(texts, ts), got, atol=1e-9)


def test_piece_margin_scores_pieces_less_the_margin_and_the_whole_message_as_it_is(tmp_path, cache):
    """Margin 0 is the guard as it serves; a margin larger than any logit leaves each text its whole message's
    score; a text over the token limit has no whole piece and scores its pieces less the margin."""
    from builders import build_guard
    from safetyneurons.guard.guard import Guard
    from safetyneurons.probes.readout_cache import MEAN, ReadoutCache, columns, layer_block
    from safetyneurons.probes.readout_probes import Variant
    from safetyneurons.probes.readouts import deployed_scorer, margin_scorer

    path, lm, ns, _ = build_guard(tmp_path, max_length=64, words=True)
    g = Guard.load(path, lm=lm)
    block = layer_block(ns)
    cache = ReadoutCache(lm, block, columns(block, ns), tmp_path / "cache", g.max_length, batch_size=8,
                         progress=False, reading=g.meta.get("reading"))
    rng = np.random.default_rng(5)
    texts = [HARMFUL, _benign(rng, 1) + " " + HARMFUL, PAD_SENTENCES[0], _benign(rng, 40)]
    ts = cache.read("t", texts, windows=True)
    at = margin_scorer(Variant("deployed guard", "safety", "mean_windows", columns(block, ns), g.probe), g.words,
                       cache, texts, ts)
    np.testing.assert_allclose(at(0.0), g.unsafe_probability(texts), atol=1e-4)
    whole = g.words.probability(g.probe.decision_function(ts.pooled[:3, MEAN][:, columns(block, ns)]), texts[:3])
    assert cache.whole_pieces(texts[:3]).sum() == 3 and len(cache.whole_pieces(texts[1:2])) > 1  # it has pieces
    np.testing.assert_allclose(at(1e3)[:3], whole, atol=1e-4)
    assert cache.whole_pieces(texts[3:]).sum() == 0  # over the limit: windows only
    assert at(1e3)[3] < 1e-6 and at(0.0)[3] > at(1.0)[3]
    for m in (0.5, 2.0):  # the guard that ships a margin scores as the comparison measured it
        served = Guard.load(build_guard(tmp_path, max_length=64, words=True, piece_margin=m)[0], lm=lm)
        assert served.piece_margin == m and served.meta["piece_margin"] == m
        np.testing.assert_allclose(at(m), served.unsafe_probability(texts), atol=1e-4)
        assert np.abs(at(m) - at(0.0)).max() > 1e-2  # the margin changes what the guard scores
        deployed = deployed_scorer(Variant("deployed guard", "safety", "mean_windows", columns(block, ns),
                                           served.probe), served, cache)
        assert deployed.readout == f"mean_windows + words, piece margin {m:g}"
        np.testing.assert_allclose(deployed.fn(texts, ts), served.unsafe_probability(texts), atol=1e-4)
    plain = Guard.load(build_guard(tmp_path, max_length=64, piece_margin=1.0)[0], lm=lm)  # no words: its probe
    deployed = deployed_scorer(Variant("deployed guard", "safety", "mean_windows", columns(block, ns), plain.probe),
                               plain, cache)
    np.testing.assert_allclose(deployed.fn(texts, ts), plain.unsafe_probability(texts), atol=1e-4)
    assert np.abs(deployed.fn(texts, ts) - at(0.0)).max() > 1e-2


def test_content_word_rule_prefers_all_words_on_a_tie():
    from safetyneurons.probes.readouts import WORDS_CONTENT, WORDS_SVM, choose_between

    rows = [_row(WORDS_SVM, 0.92, 0.885, 0.08), _row(WORDS_CONTENT, 0.89, 0.95, 0.05)]
    assert choose_between(rows, [WORDS_SVM, WORDS_CONTENT]) == WORDS_SVM  # below 90% composition recall
    rows[1] = _row(WORDS_CONTENT, 0.91, 0.885, 0.08)
    assert choose_between(rows[::-1], [WORDS_SVM, WORDS_CONTENT]) == WORDS_SVM  # a full tie: all words
    rows[1] = _row(WORDS_CONTENT, 0.91, 0.90, 0.08)
    assert choose_between(rows, [WORDS_SVM, WORDS_CONTENT]) == WORDS_CONTENT
    assert choose_between(rows, ["text/tfidf"]) is None


def test_only_linear_probes_are_explained_token_by_token():
    """Per-token logits exist for a linear probe only: an SVM guard (without words) is scored and reported, but
    the comparison does not try to explain it token by token (it has no coefficients to read)."""
    from safetyneurons.probes.probe import Probe
    from safetyneurons.probes.readouts import Scorer, explainable
    from safetyneurons.probes.readout_probes import Variant

    X = np.random.default_rng(0).normal(size=(40, 3))
    y = (X[:, 0] > 0).astype(int)
    for clf, expect in (("logreg", True), ("svm", False)):
        probe = Probe(clf, cv=0).fit(X, y)
        v = Variant("deployed guard", "safety", "mean_windows", np.arange(3), probe)
        assert explainable(Scorer(v.name, "safety", "mean_windows", False, lambda t, ts: None, "windows", v)) is expect
        assert ("coef" in probe.arrays) is expect  # what explain reads
    assert not explainable(Scorer("text/tfidf", "text", "TF-IDF", False, lambda t, ts: None))
