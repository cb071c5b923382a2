"""Safety-neuron selection, sparsity statistics, plots, and the `neurons select|plot` commands."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest

from safetyneurons.neurons import selection as lib
from builders import cli_in_process as run_cli
from safetyneurons.neurons.contrast import ChangeScores
from safetyneurons.errors import UserError
from safetyneurons.neurons.selection import NeuronSet, gini, neuron_stats, select, top_share


def make_scores(matrix, hook_point="mlp_neurons", tokens=10) -> ChangeScores:
    """ChangeScores whose .scores equal `matrix` (sum_sq = score^2 * tokens)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    return ChangeScores(hook_point, "prompt", matrix ** 2 * tokens, tokens,
                        meta={"base": {"ref": "base-ref", "sha256": "ab" * 32}, "aligned": {"ref": "al"},
                              "prompts_sha256": "cd" * 32})


def random_scores(layers=6, width=50, seed=0):
    rng = np.random.default_rng(seed)
    return make_scores(rng.gamma(0.5, 1.0, size=(layers, width)))


# ------------------------------------------------------------------------------------ selection
def test_global_top_percent_takes_the_highest_scores():
    s = random_scores()
    ns = select(s, top_percent=5.0)
    assert len(ns) == math.ceil(0.05 * 300) == 15
    chosen = set(zip(ns.layers.tolist(), ns.indices.tolist()))
    order = np.argsort(-s.scores.ravel(), kind="stable")[:15]
    assert chosen == {(int(i) // 50, int(i) % 50) for i in order}
    assert ns.scores.min() >= np.sort(s.scores.ravel())[-15]
    np.testing.assert_array_equal(ns.scores, s.scores[ns.layers, ns.indices])
    assert ns.hook_point == "mlp_neurons" and (ns.num_layers, ns.width) == (6, 50)
    assert ns.model["ref"] == "base-ref"
    assert ns.settings["rule"] == "top_percent" and ns.settings["top_percent"] == 5.0
    assert ns.settings["scores_sha256"] == s.fingerprint() and ns.settings["total_neurons"] == 300


def test_default_is_top_five_percent_and_counts_round_up():
    s = random_scores(layers=3, width=7)  # 21 neurons
    assert len(select(s)) == 2  # ceil(1.05)
    assert len(select(s, top_percent=100)) == 21
    assert len(select(s, top_percent=0.001)) == 1  # never empty
    assert lib.count_for_percent(5.0, 46080) == 2304  # exact products are not bumped up by float noise
    assert lib.count_for_percent(1.0, 300) == 3


def test_top_n_and_per_layer():
    s = random_scores()
    ns = select(s, top_n=4)
    assert len(ns) == 4 and ns.settings["rule"] == "top_n"
    per = select(s, top_n=3, per_layer=True)
    assert per.per_layer_counts().tolist() == [3] * 6
    for layer, idx in per.by_layer().items():
        assert set(idx.tolist()) == set(np.argsort(-s.scores[layer], kind="stable")[:3].tolist())
    pct = select(s, top_percent=10, per_layer=True)
    assert pct.per_layer_counts().tolist() == [5] * 6


def test_ties_are_broken_by_layer_then_index():
    matrix = np.zeros((3, 4))
    matrix[2, 1] = matrix[0, 3] = matrix[1, 0] = 1.0  # three-way tie at the top
    matrix[1, 2] = 0.5
    ns = select(make_scores(matrix), top_n=2)
    assert list(zip(ns.layers.tolist(), ns.indices.tolist())) == [(0, 3), (1, 0)]
    flat = select(make_scores(np.ones((2, 5))), top_n=3)
    assert list(zip(flat.layers.tolist(), flat.indices.tolist())) == [(0, 0), (0, 1), (0, 2)]
    # the same call always gives the same set
    s = random_scores(seed=3)
    assert select(s, top_percent=7).to_json() == select(s, top_percent=7).to_json()


@pytest.mark.parametrize("kwargs,message", [
    ({"top_percent": 0}, r"\(0, 100\]"),
    ({"top_percent": -1}, r"\(0, 100\]"),
    ({"top_percent": 100.01}, r"\(0, 100\]"),
    ({"top_percent": float("nan")}, r"\(0, 100\]"),
    ({"top_percent": 5, "top_n": 3}, "not both"),
    ({"top_n": 0}, "positive whole number"),
    ({"top_n": 2.5}, "positive whole number"),
    ({"top_n": 301}, "at most 300"),
    ({"top_n": 51, "per_layer": True}, "only 50"),
])
def test_bad_selection_rules(kwargs, message):
    with pytest.raises(UserError, match=message):
        select(random_scores(), **kwargs)


def test_bare_matrix_needs_a_hook_point_and_finite_values():
    with pytest.raises(UserError, match="hook point"):
        select(np.ones((2, 3)))
    ns = select(np.arange(6.0).reshape(2, 3), top_n=1, hook_point="resid")
    assert (int(ns.layers[0]), int(ns.indices[0])) == (1, 2)
    with pytest.raises(UserError, match="NaN"):
        select(np.array([[1.0, np.nan]]), hook_point="resid")


def test_neuron_set_round_trip(tmp_path):
    ns = select(random_scores(), top_percent=3)
    ns.save(tmp_path / "set.json")
    back = NeuronSet.load(tmp_path / "set.json")
    assert back.to_json() == ns.to_json()
    assert json.loads((tmp_path / "set.json").read_text())["format"] == "safetyneurons.neuron_set/1"


# ----------------------------------------------------------------------------------- statistics
def test_gini_known_values():
    assert gini(np.ones(10)) == 0.0
    assert gini(np.zeros(10)) == 0.0
    assert gini([1, 2, 3, 4]) == pytest.approx(0.25)  # mean absolute difference / (2 * mean)
    one_hot = np.zeros(100)
    one_hot[7] = 3.0
    assert gini(one_hot) == pytest.approx(0.99)
    rng = np.random.default_rng(0)
    x = rng.random(60)
    brute = np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean())
    assert gini(x) == pytest.approx(brute)


def test_top_share_known_values():
    values = np.arange(1, 101, dtype=float)  # 1..100, total 5050
    assert top_share(values, 1.0) == pytest.approx(100 / 5050)
    assert top_share(values, 5.0) == pytest.approx(sum(range(96, 101)) / 5050)
    assert top_share(np.zeros(5), 5.0) is None


def test_stats_report_sparsity_and_layer_counts():
    matrix = np.full((4, 25), 0.01)
    matrix[2, :5] = 10.0  # the change is concentrated in 5 neurons of layer 2
    s = make_scores(matrix)
    ns = select(s, top_percent=5)  # 5 neurons
    st = neuron_stats(s, ns)
    assert st["selected"]["per_layer_count"] == [0, 0, 5, 0]
    assert [row["selected"] for row in st["per_layer"]] == [0, 0, 5, 0]
    assert st["selected"]["share_of_total_score"] == pytest.approx(50 / (50 + 95 * 0.01))
    assert st["top_share"]["top_5_percent"] == pytest.approx(50 / 50.95)
    assert st["top_share"]["top_1_percent"] == pytest.approx(10 / 50.95)
    assert st["gini"] > 0.9
    assert neuron_stats(make_scores(np.ones((4, 25))))["gini"] == 0.0
    assert st["total_neurons"] == 100 and st["hook_point"] == "mlp_neurons"
    json.dumps(st)  # JSON-ready


def test_mismatched_neuron_set_is_refused():
    ns = select(random_scores(layers=6, width=50), top_n=3)
    with pytest.raises(UserError, match="does not match"):
        neuron_stats(random_scores(layers=5, width=50), ns)
    with pytest.raises(UserError, match="does not match"):
        lib.heatmap_png(make_scores(np.ones((6, 50)), hook_point="resid"), ns)


# ---------------------------------------------------------------------------------------- plots
def _image(png: bytes) -> np.ndarray:
    import matplotlib.image

    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(io.BytesIO(png), format="png")


def _red_pixels(img) -> int:
    return int(((img[..., 0] > 0.8) & (img[..., 1] < 0.25) & (img[..., 2] < 0.25)).sum())


def test_heatmap_marks_the_selected_neurons():
    s = random_scores(layers=8, width=300)
    ns = select(s, top_percent=2)
    plain, marked = _image(lib.heatmap_png(s)), _image(lib.heatmap_png(s, ns))
    assert plain.shape == marked.shape and plain.shape[1] > 1000  # wide enough for a column per neuron
    assert _red_pixels(plain) == 0
    assert _red_pixels(marked) > 10 * len(ns)  # markers are drawn (the legend alone is far smaller)
    assert lib.heatmap_png(s, ns) == lib.heatmap_png(s, ns)  # deterministic bytes


def test_heatmap_of_all_zero_scores_renders():
    """Identical models give all-zero scores; the plot still renders (linear scale) with the neurons marked."""
    s = make_scores(np.zeros((3, 20)))
    plain, marked = _image(lib.heatmap_png(s)), _image(lib.heatmap_png(s, select(s, top_n=2)))
    assert np.isfinite(plain).all() and plain.shape == marked.shape
    assert _red_pixels(plain) == 0 and _red_pixels(marked) > 0
    # every score is zero, so the heat map shows one colour: viridis' lowest (dark purple), no yellow at all
    assert _viridis_top(plain[: int(0.8 * len(plain)), : int(0.8 * plain.shape[1])]).sum() == 0


def _viridis_top(img) -> np.ndarray:
    """Pixels of viridis' highest colour (yellow, about (0.99, 0.91, 0.14))."""
    return (img[..., 0] > 0.85) & (img[..., 1] > 0.8) & (img[..., 2] < 0.35)


def _runs(mask_row: np.ndarray) -> int:
    """Number of contiguous runs of True in a 1-D mask."""
    m = mask_row.astype(int)
    return int(m[0] + (np.diff(m) == 1).sum())


def test_heatmap_of_very_wide_layers_is_pooled():
    """5,000 neurons do not fit in the image: neighbours are max-pooled, so every isolated hot neuron stays
    visible (plain downsampling would drop most single columns)."""
    matrix = np.zeros((2, 5000))
    hot = np.arange(100, 5000, 250)
    matrix[0, hot] = 1.0  # layer 0 is the lower half of the plot (origin lower)
    img = _image(lib.heatmap_png(make_scores(matrix)))
    row = _viridis_top(img[int(0.7 * len(img))])  # through layer 0, below the colorbar's yellow end
    assert _runs(row) == len(hot)


def test_layer_count_plot_bars_follow_the_counts():
    matrix = np.zeros((5, 10))
    matrix[3] = 1.0
    ns = select(make_scores(matrix), top_n=10)
    assert ns.per_layer_counts().tolist() == [0, 0, 0, 10, 0]
    img = _image(lib.layer_counts_png(ns))
    red_cols = np.where(_red_pixels_mask(img).any(axis=0))[0]
    assert len(red_cols) > 0
    # one bar only: the red columns form a single contiguous run
    assert red_cols.max() - red_cols.min() + 1 == len(red_cols)


def _red_pixels_mask(img):
    # tab:red is (0.84, 0.15, 0.16)
    return (img[..., 0] > 0.75) & (img[..., 1] < 0.3) & (img[..., 2] < 0.3)


def test_write_report(tmp_path):
    s = random_scores()
    ns = select(s)
    written = lib.write_report(s, ns, tmp_path / "r")
    assert sorted(written) == sorted(lib.REPORT_FILES)
    assert json.loads((tmp_path / "r" / "stats.json").read_text())["selected"]["count"] == len(ns)


# ------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def scores_dir(tmp_path):
    d = tmp_path / "contrast"
    random_scores(layers=4, width=40, seed=5).save(d)
    return d


def test_cli_select(scores_dir, tmp_path, capsys):
    out = tmp_path / "sets" / "top.json"
    code, stdout, err = run_cli(["neurons", "select", "--scores", scores_dir, "--top-n", "6", "--per-layer",
                                 "--out", out], capsys)
    assert code == 0, err
    ns = NeuronSet.load(out)
    assert ns.per_layer_counts().tolist() == [6, 6, 6, 6] and ns.settings["per_layer"] is True
    assert "Selected 24 of 160" in stdout
    code, _, _ = run_cli(["neurons", "select", "--scores", scores_dir, "--out", out], capsys)
    assert code == 0 and len(NeuronSet.load(out)) == 8  # default 5% of 160


def test_layer_budget_keeps_the_count_and_takes_the_best_neurons_up_to_the_layer():
    matrix = np.random.default_rng(1).gamma(0.5, 1.0, size=(6, 50))
    matrix[5] += 10.0  # the change piles up in the last layer, as on the default model
    s = make_scores(matrix)
    assert select(s, top_percent=5).deepest_layer == 5
    ns = select(s, top_percent=5, max_layer=2)
    assert len(ns) == 15 and ns.deepest_layer <= 2 and ns.settings["max_layer"] == 2
    best = np.argsort(-matrix[:3].ravel(), kind="stable")[:15]
    assert set(zip(ns.layers.tolist(), ns.indices.tolist())) == {(int(i) // 50, int(i) % 50) for i in best}
    assert (ns.num_layers, ns.width) == (6, 50) and ns.settings["total_neurons"] == 300
    assert select(s, top_n=3, per_layer=True, max_layer=1).per_layer_counts().tolist() == [3, 3, 0, 0, 0, 0]
    assert "max_layer" not in select(s).settings  # unconstrained sets are written as before
    with pytest.raises(UserError, match="hold only 50"):
        select(s, top_percent=20, max_layer=0)  # 60 neurons cannot come from one layer of 50


def test_cli_select_with_a_layer_budget(scores_dir, tmp_path, capsys):
    out = tmp_path / "budget.json"
    code, stdout, err = run_cli(["neurons", "select", "--scores", scores_dir, "--max-layer", "1", "--out", out],
                                capsys)
    assert code == 0, err
    ns = NeuronSet.load(out)
    assert len(ns) == 8 and ns.deepest_layer <= 1 and "deepest layer" in stdout
    for bad, message in (("4", "beyond the model's last layer (3)"), ("-1", ">= 0")):
        code, _, err = run_cli(["neurons", "select", "--scores", scores_dir, "--max-layer", bad, "--out",
                                tmp_path / "x.json"], capsys)
        assert code == 2 and message in err and "Traceback" not in err and not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("args,message", [
    (["--top-percent", "0"], "(0, 100]"),
    (["--top-percent", "250"], "(0, 100]"),
    (["--top-n", "161"], "at most 160"),
    (["--top-n", "2", "--top-percent", "1"], "not both"),
])
def test_cli_select_bad_rules(scores_dir, tmp_path, capsys, args, message):
    out = tmp_path / "x.json"
    code, _, err = run_cli(["neurons", "select", "--scores", scores_dir, *args, "--out", out], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()


def test_cli_select_bad_paths(scores_dir, tmp_path, capsys):
    code, _, err = run_cli(["neurons", "select", "--scores", tmp_path / "missing", "--out", tmp_path / "a.json"],
                           capsys)
    assert code == 2 and "no such directory" in err
    code, _, err = run_cli(["neurons", "select", "--scores", scores_dir, "--out", tmp_path], capsys)
    assert code == 2 and "directory" in err


def test_cli_plot(scores_dir, tmp_path, capsys):
    out = tmp_path / "plots"
    code, _, err = run_cli(["neurons", "plot", "--scores", scores_dir, "--out", out], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(lib.REPORT_FILES)
    assert json.loads((out / "stats.json").read_text())["selected"]["count"] == 8
    chosen = tmp_path / "set.json"
    select(ChangeScores.load(scores_dir), top_n=3).save(chosen)
    code, _, err = run_cli(["neurons", "plot", "--scores", scores_dir, "--neurons", chosen, "--out", out], capsys)
    assert code == 0 and json.loads((out / "stats.json").read_text())["selected"]["count"] == 3
    # a set from other scores is refused and the earlier plots stay as they were
    other = tmp_path / "other.json"
    select(random_scores(layers=3, width=40), top_n=3).save(other)
    before = (out / "heatmap.png").read_bytes()
    code, _, err = run_cli(["neurons", "plot", "--scores", scores_dir, "--neurons", other, "--out", out], capsys)
    assert code == 2 and "does not match" in err and (out / "heatmap.png").read_bytes() == before
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, err = run_cli(["neurons", "plot", "--scores", scores_dir, "--neurons", bad, "--out", out], capsys)
    assert code == 2 and "not valid JSON" in err


def test_run_settings_layer_budget_is_validated_and_names_its_own_run_directory():
    from safetyneurons.pipeline import RunSettings

    plain = RunSettings.for_preset("default")
    assert "max_layer" not in plain.identity()  # runs made before the option keep their identity
    budget = RunSettings.for_preset("default", max_layer=19)
    assert budget.identity()["max_layer"] == 19 and budget.default_out() != plain.default_out()
    with pytest.raises(UserError, match=">= 0"):
        RunSettings.for_preset("default", max_layer=-1).validate()
