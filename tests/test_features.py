"""What a probe reads (safetyneurons.activations.features.FeatureSpec): its checks, its round trip through the
fields a manifest / probe meta / guard.json keep, and a store reading only the specs it was extracted with."""

from __future__ import annotations

import json

import numpy as np
import pytest

from safetyneurons.activations.features import FeatureSpec
from safetyneurons.activations.store import Store, extract
from safetyneurons.errors import UserError
from safetyneurons.neurons.selection import NeuronSet
from builders import make_records, ns_for
from tiny import save_tiny

MODEL = {"ref": "org/tiny", "sha256": "ab" * 32, "chat_template": "ct", "architecture": "LlamaForCausalLM"}


def neuron_set() -> NeuronSet:
    return NeuronSet(hook_point="mlp_out", num_layers=3, width=32, layers=[2, 0, 0], indices=[5, 17, 3],
                     scores=[0.5, 1.0, 2.0], model={"ref": "org/tiny"})


# ------------------------------------------------------------------------------------------- the spec
@pytest.mark.parametrize("kw", [{}, {"pooling": "last", "max_length": None},
                                {"neuron_set": "set", "max_length": 17, "model": MODEL}])
def test_fields_and_from_meta_round_trip(kw):
    if kw.get("neuron_set") == "set":
        kw = {**kw, "neuron_set": neuron_set()}
    spec = FeatureSpec("mlp_out", **kw)
    fields = spec.fields()
    assert set(fields) == {"hook_point", "pooling", "max_length", "neuron_set", "model"}  # positions: the default
    meta = json.loads(json.dumps(fields))  # as a manifest / guard.json stores it
    again = FeatureSpec.from_meta(meta)
    assert again.fields() == fields
    assert (again.hook_point, again.pooling, again.max_length, again.positions) == \
           (spec.hook_point, spec.pooling, spec.max_length, "prompt")
    if spec.neuron_set is None:
        assert fields["neuron_set"] is None and again.neuron_set is None
    else:
        assert again.neuron_set.flat_indices().tolist() == [3, 17, 69]  # sorted by (layer, index)
        np.testing.assert_array_equal(again.neuron_set.scores, [2.0, 1.0, 0.5])


def test_fields_keep_the_model_keys_asked_for_and_the_fingerprint_is_the_weights_sha256():
    spec = FeatureSpec("resid", model=MODEL)
    assert spec.fields(("ref", "sha256", "missing"))["model"] == {"ref": "org/tiny", "sha256": "ab" * 32,
                                                                   "missing": None}
    assert spec.fields()["model"] == MODEL and spec.fields()["model"] is not MODEL
    assert spec.fingerprint == "ab" * 32 and FeatureSpec("resid").fingerprint == ""


def test_from_meta_takes_a_given_neuron_set_over_its_own():
    meta = FeatureSpec("mlp_out", neuron_set=neuron_set()).fields()
    other = NeuronSet(hook_point="mlp_out", num_layers=3, width=32, layers=[1], indices=[0], scores=[1.0])
    assert FeatureSpec.from_meta(meta, neuron_set=other).neuron_set is other


@pytest.mark.parametrize("kw,message", [
    ({"hook_point": "attn"}, "Unknown hook point 'attn'"),
    ({"hook_point": "mlp_out", "pooling": "max"}, "Unknown pooling 'max'"),
    ({"hook_point": "mlp_out", "max_length": 0}, "max length"),
    ({"hook_point": "mlp_out", "max_length": -5}, "max length"),
    ({"hook_point": "mlp_out", "max_length": 1.5}, "max length"),
    ({"hook_point": "mlp_out", "max_length": True}, "max length"),
    ({"hook_point": "mlp_out", "max_length": "256"}, "max length"),
    ({"hook_point": "mlp_out", "positions": "response"}, "Unknown feature token positions 'response'"),
])
def test_bad_settings_are_refused_with_a_user_error(kw, message):
    with pytest.raises(UserError, match=message):
        FeatureSpec(**kw)


@pytest.mark.parametrize("meta,message", [
    ({"pooling": "mean", "max_length": 8}, "^guard.json: malformed feature settings"),  # no hook_point
    ({"hook_point": "mlp_out", "max_length": 8}, "^guard.json: malformed feature settings"),  # no pooling
    ({"hook_point": "mlp_out", "pooling": "mean", "max_length": 8, "model": 3}, "^guard.json: malformed"),
    ({"hook_point": "mlp_out", "pooling": "mean", "max_length": 8, "neuron_set": {"format": "x"}},
     r"^guard.json \(neuron set\): not a safetyneurons neuron set"),
    ({"hook_point": "mlp_out", "pooling": "sum", "max_length": 8}, "^guard.json: Unknown pooling 'sum'"),
    ({"hook_point": "mlp_out", "pooling": "mean", "max_length": 0}, "^guard.json: max length"),
    ({"hook_point": "mlp_out", "pooling": "mean", "max_length": 8, "model": "abc"}, "^guard.json: malformed"),
])
def test_from_meta_refuses_malformed_metadata(meta, message):
    with pytest.raises(UserError, match=message):
        FeatureSpec.from_meta(meta, source="guard.json")


# -------------------------------------------------------------------------------- a store reads a spec
@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """An all-neurons store and a neuron-set store of a saved tiny llama (so it has a weights fingerprint)."""
    from safetyneurons.model.pair import load_model

    root = tmp_path_factory.mktemp("features")
    lm = load_model(str(save_tiny(root / "model", "llama", 0)))
    recs = make_records(6)
    full = extract(lm, recs, root / "all", hook_point="mlp_out", max_length=64, dtype="float32", progress=False)
    ns = ns_for(lm, layers=(0, 1, 2), indices=(3, 4, 5), model=lm.describe())
    part = extract(lm, recs, root / "set", hook_point="mlp_out", max_length=64, dtype="float32", neuron_set=ns,
                   progress=False)
    return lm, Store.load(full.path), Store.load(part.path), ns


def test_a_store_reads_the_spec_it_was_extracted_with(stores):
    lm, full, part, ns = stores
    assert full.spec.fields() == FeatureSpec("mlp_out", max_length=64, model=lm.describe()).fields()
    assert full.spec.fingerprint == lm.fingerprint and len(lm.fingerprint) == 64
    np.testing.assert_array_equal(full.read(full.spec), full.features)
    # a neuron set's columns, from the all-neurons store and from the store extracted with that set
    spec = FeatureSpec("mlp_out", max_length=64, neuron_set=ns, model=lm.describe())
    np.testing.assert_array_equal(full.read(spec), full.features[:, ns.flat_indices()])
    np.testing.assert_allclose(part.read(spec), full.read(spec), rtol=1e-5, atol=1e-9)  # early exit: float noise
    assert part.read(part.spec).shape == (6, 3)


@pytest.mark.parametrize("change,message", [
    ({"hook_point": "resid"}, "has hook_point 'mlp_out' but the probe was trained with 'resid'"),
    ({"pooling": "last"}, "has pooling 'mean' but the probe was trained with 'last'"),
    ({"max_length": 256}, "has max_length 64 but the probe was trained with 256"),
    ({"max_length": None}, "has max_length 64 but the probe was trained with None"),
    ({"model": {"sha256": "0" * 64}}, "comes from model"),
])
def test_a_store_refuses_a_spec_it_was_not_extracted_with(stores, change, message):
    lm, full, _, _ = stores
    spec = FeatureSpec(**{"hook_point": "mlp_out", "max_length": 64, "model": lm.describe(), **change})
    with pytest.raises(UserError, match=message):
        full.check_spec(spec)
    with pytest.raises(UserError, match=message):
        full.read(spec)


def test_an_unknown_model_is_not_a_mismatch_but_missing_neurons_are(stores):
    lm, full, part, ns = stores
    np.testing.assert_array_equal(full.read(FeatureSpec("mlp_out", max_length=64)), full.features)  # no sha256
    with pytest.raises(UserError, match="holds only a neuron set's"):
        part.read(FeatureSpec("mlp_out", max_length=64, model=lm.describe()))  # all neurons from a set's store
    other = ns_for(lm, layers=(1,), indices=(9,), model=lm.describe())
    with pytest.raises(UserError, match="lacks some requested neurons"):
        part.read(FeatureSpec("mlp_out", max_length=64, neuron_set=other, model=lm.describe()))
