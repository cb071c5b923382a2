"""Labelled records (safetyneurons.data.records): the validator, the canonical JSONL form, the three sha256 forms,
the seeded stratified sampler and the unseeded hash order."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest

from safetyneurons._io import sha256_file
from safetyneurons.data.records import (HASH_FORMS, STORE_FIELDS, check_records, first_by_hash, jsonl, labels,
                                        records_sha256, store_rows, stratified_sample, write_records)
from safetyneurons.data.splits import read_records
from safetyneurons.errors import UserError


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def pool(n_unsafe: int, n_safe: int, sources=("a", "b")) -> list[dict]:
    out = [{"id": f"u{k}", "prompt": f"harmful {k}", "label": 1, "source": sources[k % len(sources)]}
           for k in range(n_unsafe)]
    out += [{"id": f"s{k}", "prompt": f"benign {k}", "label": 0, "source": sources[k % len(sources)]}
            for k in range(n_safe)]
    return out


# ------------------------------------------------------------------------------------------ validate
def test_check_records_returns_copies_with_text_ids_and_int_labels():
    given = [{"id": 7, "prompt": "hello", "label": 1, "source": "x", "extra": [1]},
             {"id": "b", "prompt": "hi", "label": 0}]
    got = check_records(given)
    assert got == [{"id": "7", "prompt": "hello", "label": 1, "source": "x", "extra": [1]},
                   {"id": "b", "prompt": "hi", "label": 0}]
    assert got[0] is not given[0] and given[0]["id"] == 7  # the input is left as it was
    assert labels(got).dtype == np.int64 and labels(got).tolist() == [1, 0]
    # without need_ids, a record's position is its id
    assert [r["id"] for r in check_records([{"prompt": "a", "label": 0}, {"prompt": "b", "label": 1}],
                                           need_ids=False)] == ["0", "1"]
    assert len(check_records([{"id": "x", "prompt": "a", "label": 0}] * 2, unique_ids=False)) == 2


@pytest.mark.parametrize("records,kw,message", [
    ([], {}, "the data is empty"),
    (["not a dict"], {}, "record 1 is not an object"),
    ([{"id": "a", "prompt": "p"}], {}, "record 1 lacks label"),
    ([{"prompt": "p", "label": 1}], {}, "record 1 lacks id"),
    ([{"id": "a", "prompt": "   ", "label": 1}], {}, "record 'a' has no non-empty 'prompt'"),
    ([{"id": "a", "prompt": 3, "label": 1}], {}, "record 'a' has no non-empty 'prompt'"),
    ([{"id": "a", "prompt": "p", "label": 2}], {}, "has label 2"),
    ([{"id": "a", "prompt": "p", "label": True}], {}, "has label True"),
    ([{"id": "a", "prompt": "p", "label": "1"}], {}, "has label '1'"),
    ([{"id": "a", "prompt": "p", "label": 1}, {"id": "a", "prompt": "q", "label": 0}], {}, "duplicate record id 'a'"),
    ([{"id": "a", "prompt": "p", "label": 1}], {"need_both": True}, r"no benign \(label 0\)"),
    ([{"id": "a", "prompt": "p", "label": 0}], {"need_both": True}, r"no harmful \(label 1\)"),
])
def test_check_records_refuses_bad_records_naming_them(records, kw, message):
    with pytest.raises(UserError, match=message) as e:
        check_records(records, "train.jsonl", **kw)
    assert str(e.value).startswith("train.jsonl: ")


# ------------------------------------------------------------------------------------- serialise
def test_jsonl_is_canonical_sorted_keys_utf8_one_line_each():
    rows = [{"prompt": "café \u2014 \"quoted\"", "label": 1, "id": "a"}, {"b": [1, 2], "a": None}]
    assert jsonl(rows) == ('{"id": "a", "label": 1, "prompt": "café \u2014 \\"quoted\\""}\n'
                           '{"a": null, "b": [1, 2]}\n')
    assert jsonl([]) == ""
    assert jsonl([{"b": 1, "a": 2}]) == jsonl([{"a": 2, "b": 1}])  # key order does not matter


def test_split_file_round_trips_exactly(tmp_path):
    recs = [{"id": "a:0", "prompt": "Tell me a story.", "label": 0, "source": "a"},
            {"id": "b:7", "prompt": "How to pick a lock", "label": 1, "source": "b", "category": "crime"},
            {"id": "b:8", "prompt": "x" * 30, "label": 1, "source": "b", "long": True}]
    path = write_records(tmp_path / "s.jsonl", recs)
    assert read_records(path) == recs
    assert records_sha256(recs) == sha256_file(path)


def test_write_records_refuses_a_directory(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        write_records(tmp_path, [{"id": "a", "prompt": "p", "label": 0}])


# ------------------------------------------------------------------------------------------- hashes
def test_records_sha256_forms_hash_what_they_say():
    recs = [{"id": 1, "prompt": "héllo", "label": 1, "source": "s", "long": True, "hazard": "x"},
            {"id": "2", "prompt": "bye", "label": 0}]
    assert HASH_FORMS == ("file", "store", "training")
    # file: the canonical JSONL of every field
    assert records_sha256(recs) == records_sha256(recs, "file") == sha(jsonl(recs))
    # store: only the store's fields, id as text, label as int
    assert store_rows(recs) == [{"id": "1", "prompt": "héllo", "label": 1, "source": "s"},
                                {"id": "2", "prompt": "bye", "label": 0}]
    assert set(STORE_FIELDS) >= {"id", "prompt", "label", "source", "category", "cluster"}
    assert records_sha256(recs, "store") == sha('{"id": "1", "label": 1, "prompt": "héllo", "source": "s"}\n'
                                                '{"id": "2", "label": 0, "prompt": "bye"}\n')
    # training: the compact [[prompt, label], ...] list, ids and other fields ignored
    assert records_sha256(recs, "training") == sha('[["héllo",1],["bye",0]]')


def test_records_sha256_forms_see_different_changes():
    base = [{"id": "a", "prompt": "p", "label": 1}, {"id": "b", "prompt": "q", "label": 0}]
    extra_field = [{**base[0], "long": True}, base[1]]
    other_ids = [{**r, "id": r["id"] + "!"} for r in base]
    digests = {form: records_sha256(base, form) for form in HASH_FORMS}
    assert records_sha256(extra_field, "file") != digests["file"]
    assert records_sha256(extra_field, "store") == digests["store"]  # "long" is not a store field
    assert records_sha256(other_ids, "store") != digests["store"]
    assert records_sha256(other_ids, "training") == digests["training"]
    assert records_sha256(base[::-1], "training") != digests["training"]  # order-sensitive
    with pytest.raises(ValueError, match="unknown records hash form"):
        records_sha256(base, "nope")


# ------------------------------------------------------------------------------------------- sample
def test_stratified_sample_is_determined_by_its_seed_and_keeps_the_order():
    recs = pool(60, 40)
    a = stratified_sample(recs, 20, 0)
    assert a == stratified_sample(recs, 20, 0) == stratified_sample(recs, 20, np.random.default_rng(0))
    assert a != stratified_sample(recs, 20, 1)
    pos = [recs.index(r) for r in a]
    assert pos == sorted(pos) and len(set(pos)) == 20  # original order, no repeats
    assert Counter(r["label"] for r in a) == {1: 12, 0: 8}  # proportional: the class ratio is kept
    assert stratified_sample(recs, 100, 0) == recs and stratified_sample(recs, 500, 0) == recs


def test_fair_quota_keeps_small_strata_whole_and_shares_the_rest():
    recs = ([{"id": f"a{k}", "prompt": "p", "label": 1, "source": "a"} for k in range(50)]
            + [{"id": f"b{k}", "prompt": "p", "label": 1, "source": "b"} for k in range(30)]
            + [{"id": f"c{k}", "prompt": "p", "label": 1, "source": "c"} for k in range(4)])
    by_source = lambda r: r["source"]  # noqa: E731
    fair = stratified_sample(recs, 24, 3, key=by_source, quota="fair")
    assert Counter(r["source"] for r in fair) == {"a": 10, "b": 10, "c": 4}
    assert fair == stratified_sample(recs, 24, 3, key=by_source, quota="fair")
    proportional = stratified_sample(recs, 24, 3, key=by_source)
    assert Counter(r["source"] for r in proportional) == {"a": 14, "b": 9, "c": 1}
    with pytest.raises(ValueError, match="unknown quota"):
        stratified_sample(recs, 24, 3, quota="even")


def test_first_by_hash_is_a_fixed_sample_without_a_seed():
    recs = pool(10, 10)
    got = first_by_hash(recs, 3)
    assert [r["label"] for r in got] == [1, 1, 1, 0, 0, 0]
    assert first_by_hash(recs[::-1], 3) == got  # the input order does not matter
    want = sorted((r for r in recs if r["label"] == 1),
                  key=lambda r: hashlib.sha256(f"{r['id']}\n{r['prompt']}".encode()).hexdigest())[:3]
    assert got[:3] == want
    assert [r["label"] for r in first_by_hash(recs, 2, label_order=(0,))] == [0, 0]
