"""Activation store: pooling, early exit, shards + manifest, checksums, resume after a crash, CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from safetyneurons.activations import store as store_mod
from safetyneurons.errors import UserError
from safetyneurons.model.hooks import capture
from safetyneurons.neurons.selection import NeuronSet
from safetyneurons.activations.reader import pooled_features
from safetyneurons.activations.store import Store, extract
from builders import dir_bytes, make_records, ns_for, run_cli
from tiny import save_tiny, tiny_lm


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama", 0)


# ------------------------------------------------------------------------------------------ pooling
@pytest.mark.parametrize("hook_point", ["mlp_out", "mlp_neurons", "resid"])
def test_mean_and_last_pooling_match_a_direct_capture_of_each_prompt_alone(lm, hook_point):
    prompts = [r["prompt"] for r in make_records(7)] + ["Hi"]
    batched_mean = pooled_features(lm, prompts, hook_point, "mean", batch_size=8)
    batched_last = pooled_features(lm, prompts, hook_point, "last", batch_size=8)
    for k, p in enumerate(prompts):
        enc = lm.encode([p])  # a single prompt: no pads at all
        acts = capture(lm.model, enc["input_ids"], enc["attention_mask"], hook_point, early_exit=False)
        # mean pooling runs over the user's message only, never the chat-template tokens around it
        formatted = lm.format(p)
        start = len(lm.tokenizer(formatted[:formatted.index(p)], add_special_tokens=False)["input_ids"])
        rows = slice(start, start + len(lm.tokenizer(p, add_special_tokens=False)["input_ids"]))
        assert lm.tokenizer.decode(enc["input_ids"][0, rows]) == p
        mean = torch.cat([acts[l][0, rows].mean(0) for l in sorted(acts)]).numpy()
        last = torch.cat([acts[l][0, -1] for l in sorted(acts)]).numpy()
        np.testing.assert_allclose(batched_mean[k], mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(batched_last[k], last, rtol=1e-4, atol=1e-6)


def test_mean_pooling_ignores_pads_even_when_pad_positions_hold_nan(lm, monkeypatch):
    prompts = ["Hi", "Write a poem about the sea and the moon and the stars tonight please"]
    alone = np.stack([pooled_features(lm, [p], "mlp_out")[0] for p in prompts])
    # Poison every pad position: torch.where masking must keep NaN out; a multiply-by-mask would not.
    import safetyneurons.model.hooks as hooks

    real = hooks.forward_with_hooks

    def poisoned(model, input_ids, attention_mask, hook_point, callback, **kw):
        def cb(layer, t):
            t = t.clone()
            t[~attention_mask.bool()] = float("nan")
            callback(layer, t)
        return real(model, input_ids, attention_mask, hook_point, cb, **kw)

    monkeypatch.setattr(hooks, "forward_with_hooks", poisoned)
    batched = pooled_features(lm, prompts, "mlp_out", "mean", batch_size=2)
    assert np.isfinite(batched).all()
    np.testing.assert_allclose(batched, alone, rtol=1e-4, atol=1e-6)


def test_rows_come_back_in_input_order_whatever_the_length_sorting(lm):
    prompts = [r["prompt"] for r in make_records(9)]
    together = pooled_features(lm, prompts, "mlp_out", batch_size=4)
    reverse = pooled_features(lm, prompts[::-1], "mlp_out", batch_size=4)
    np.testing.assert_allclose(together, reverse[::-1], rtol=1e-4, atol=1e-6)
    assert pooled_features(lm, [], "mlp_out").shape == (0, 3 * 32)


def test_early_exit_gives_the_full_forward_features_and_skips_deeper_layers(lm):
    from safetyneurons.model.hooks import decoder_layers

    prompts = [r["prompt"] for r in make_records(6)]
    ns = ns_for(lm, "mlp_neurons", layers=(0, 1, 1), indices=(60, 2, 9))
    full = pooled_features(lm, prompts, "mlp_neurons", "last")
    calls = []
    handle = decoder_layers(lm.model)[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        sub = pooled_features(lm, prompts, "mlp_neurons", "last", neuron_set=ns)
    finally:
        handle.remove()
    assert calls == []  # layer 2 never ran: the set's deepest layer is 1
    assert sub.shape == (6, 3)
    np.testing.assert_allclose(sub, full[:, ns.flat_indices()], rtol=1e-5, atol=1e-7)


def test_neuron_set_mismatch_with_the_model_is_a_user_error(lm):
    with pytest.raises(UserError, match="hook point"):
        pooled_features(lm, ["hi"], "mlp_out", neuron_set=ns_for(lm, "mlp_neurons"))
    wrong = NeuronSet(hook_point="mlp_out", num_layers=5, width=32, layers=[4], indices=[0], scores=[1.0])
    with pytest.raises(UserError, match="5 layers"):
        pooled_features(lm, ["hi"], "mlp_out", neuron_set=wrong)
    with pytest.raises(UserError, match="pooling"):
        pooled_features(lm, ["hi"], "mlp_out", pooling="max")


# -------------------------------------------------------------------------------------------- store
def test_store_roundtrip_manifest_and_column_selection(lm, tmp_path):
    recs = make_records(11)
    st = extract(lm, recs, tmp_path / "s", shard_size=4, dtype="float32", batch_size=3, progress=False,
                 data_info={"source": "unit"})
    assert len(sorted((tmp_path / "s").glob("shard-*.safetensors"))) == 3
    loaded = Store.load(tmp_path / "s")
    direct = pooled_features(lm, [r["prompt"] for r in recs], "mlp_out")
    np.testing.assert_allclose(loaded.features, direct, rtol=1e-5, atol=1e-8)
    assert loaded.ids == [r["id"] for r in recs]
    assert loaded.labels.tolist() == [r["label"] for r in recs]
    m = loaded.manifest
    assert (m["n"], m["d"], m["layout"], m["hook_point"], m["pooling"]) == (11, 96, "all", "mlp_out", "mean")
    assert m["data"]["source"] == "unit" and m["data"]["n_unsafe"] == 5
    assert "torch" in m["versions"] and all(len(s["sha256"]) == 64 for s in m["shards"])
    assert [r["prompt"] for r in loaded.records] == [r["prompt"] for r in recs]
    assert not (tmp_path / "s" / store_mod.PROGRESS_FILE).exists()

    # one all-neurons store serves any neuron set; a neuron-set store holds the same columns
    ns = ns_for(lm)
    sub = extract(lm, recs, tmp_path / "n", neuron_set=ns, dtype="float32", progress=False)
    assert sub.features.shape == (11, 3) and sub.layout == "neuron_set"
    np.testing.assert_allclose(loaded.select(ns), sub.features, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(sub.select(ns), sub.features)
    smaller = ns_for(lm, layers=(1,), indices=(5,))
    np.testing.assert_allclose(sub.select(smaller), sub.features[:, [2]])
    with pytest.raises(UserError, match="lacks some requested neurons"):
        sub.select(ns_for(lm, layers=(2,), indices=(0,)))


def test_float16_store_is_close_to_float32(lm, tmp_path):
    recs = make_records(5)
    a = extract(lm, recs, tmp_path / "a", dtype="float32", progress=False)
    b = extract(lm, recs, tmp_path / "b", dtype="float16", progress=False)
    assert (tmp_path / "b" / "shard-00000.safetensors").stat().st_size < (tmp_path / "a" / "shard-00000.safetensors").stat().st_size
    np.testing.assert_allclose(b.features, a.features, rtol=2e-3, atol=1e-7)


def test_resume_after_a_crash_skips_finished_shards_and_is_byte_identical(lm, tmp_path, monkeypatch):
    recs = make_records(14)
    kw = dict(shard_size=4, batch_size=3, dtype="float16", progress=False)
    extract(lm, recs, tmp_path / "ref", **kw)
    reference = dir_bytes(tmp_path / "ref")
    assert sorted(reference) == ["manifest.json", "records.jsonl"] + [f"shard-0000{i}.safetensors" for i in range(4)]

    real = store_mod.ActivationReader.batches
    calls = []
    crash = {"at": 3}

    def crash_after_two_shards(self, pieces, *a, **k):
        calls.append(len(pieces))
        if len(calls) == crash["at"]:
            raise RuntimeError("simulated crash")
        return real(self, pieces, *a, **k)

    monkeypatch.setattr(store_mod.ActivationReader, "batches", crash_after_two_shards)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract(lm, recs, tmp_path / "run", **kw)
    assert not (tmp_path / "run" / "manifest.json").exists()
    assert sorted(p.name for p in (tmp_path / "run").glob("shard-*")) == ["shard-00000.safetensors",
                                                                          "shard-00001.safetensors"]
    with pytest.raises(UserError, match="unfinished extraction"):
        Store.load(tmp_path / "run")

    calls.clear()
    crash["at"] = None
    extract(lm, recs, tmp_path / "run", **kw)
    assert calls == [4, 2]  # only shards 2 and 3 were recomputed, never more than shard_size prompts at once
    assert dir_bytes(tmp_path / "run") == reference

    # a truncated shard is detected by checksum and rebuilt alone
    shard = tmp_path / "run" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:50])
    calls.clear()
    extract(lm, recs, tmp_path / "run", **kw)
    assert calls == [4]
    assert dir_bytes(tmp_path / "run") == reference

    # a finished identical store is not recomputed at all
    calls.clear()
    extract(lm, recs, tmp_path / "run", **kw)
    assert calls == [] and dir_bytes(tmp_path / "run") == reference


def test_different_settings_start_the_store_over(lm, tmp_path):
    recs = make_records(6)
    extract(lm, recs, tmp_path / "s", shard_size=2, progress=False)
    st = extract(lm, recs[:3], tmp_path / "s", shard_size=4, pooling="last", dtype="float32", progress=False)
    assert st.pooling == "last" and len(st) == 3
    assert sorted(p.name for p in (tmp_path / "s").glob("shard-*")) == ["shard-00000.safetensors"]
    np.testing.assert_allclose(st.features, pooled_features(lm, [r["prompt"] for r in recs[:3]], "mlp_out", "last"),
                               rtol=1e-5, atol=1e-8)


def test_corrupted_shard_is_detected_on_load(lm, tmp_path):
    extract(lm, make_records(6), tmp_path / "s", shard_size=3, progress=False)
    shard = tmp_path / "s" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="shard-00001.safetensors is corrupted"):
        Store.load(tmp_path / "s")


def test_bad_records_and_options_are_user_errors(lm, tmp_path):
    with pytest.raises(UserError, match="empty"):
        extract(lm, [], tmp_path / "e", progress=False)
    with pytest.raises(UserError, match="label"):
        extract(lm, [{"id": "a", "prompt": "x", "label": 3}], tmp_path / "e", progress=False)
    with pytest.raises(UserError, match="duplicate"):
        extract(lm, [{"id": "a", "prompt": "x", "label": 1}, {"id": "a", "prompt": "y", "label": 0}],
                tmp_path / "e", progress=False)
    with pytest.raises(UserError, match="dtype"):
        extract(lm, make_records(2), tmp_path / "e", dtype="int8", progress=False)
    assert not (tmp_path / "e").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not part of an activation store"):
        extract(lm, make_records(2), tmp_path / "busy", progress=False)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny(root / "model", "llama", 0)
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_records(10)))
    (root / "empty.jsonl").write_text("")
    return root


def test_cli_extract_with_neurons_and_resume_message(cli_env, tmp_path):
    lm = tiny_lm("llama", 0)
    ns = ns_for(lm, "mlp_neurons", layers=(1, 2), indices=(4, 40))
    ns.save(tmp_path / "ns.json")
    r = run_cli("extract", "--model", cli_env / "model", "--data", cli_env / "data.jsonl", "--neurons",
                tmp_path / "ns.json", "--pooling", "last", "--out", tmp_path / "st", "--shard-size", "4",
                "--dtype", "float32", cache=tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert "10 prompts x 2 features" in r.stdout and "prompt/s" in r.stderr  # tqdm rate in prompts/s
    st = Store.load(tmp_path / "st")
    assert st.hook_point == "mlp_neurons" and st.layout == "neuron_set" and len(st.manifest["model"]["sha256"]) == 64
    recs = make_records(10)
    np.testing.assert_allclose(st.features, pooled_features(lm, [x["prompt"] for x in recs], "mlp_neurons", "last",
                                                            neuron_set=ns), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("case", ["empty", "hook", "bad_option", "foreign_out"])
def test_cli_extract_bad_inputs_exit_2_without_output(cli_env, tmp_path, case):
    out = tmp_path / "out"
    args = ["extract", "--model", cli_env / "model", "--data", cli_env / "data.jsonl", "--out", out]
    if case == "empty":
        args[4] = cli_env / "empty.jsonl"
    elif case == "hook":
        lm = tiny_lm("llama", 0)
        ns_for(lm, "mlp_neurons").save(tmp_path / "ns.json")
        args += ["--neurons", tmp_path / "ns.json", "--hook-point", "mlp_out"]
    elif case == "bad_option":
        args += ["--batch-size", "0"]
    else:
        out.mkdir()
        (out / "keep.txt").write_text("x")
    r = run_cli(*args, cache=tmp_path / "cache")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Error:" in r.stderr
    if case == "foreign_out":
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    else:
        assert not out.exists()
