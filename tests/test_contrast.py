"""Inference-time activation contrasting (safetyneurons.neurons.contrast) and the `contrast` command."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from safetyneurons.neurons import selection as neurons_lib
from builders import cli_in_process as run_cli
from safetyneurons.neurons.contrast import ChangeScores, completion_batch, contrast
from safetyneurons.errors import UserError
from safetyneurons.model.hooks import HOOK_POINTS, capture
from safetyneurons.model.pair import from_objects
from tiny import FAMILIES, save_tiny, tiny_lm

torch.set_num_threads(1)  # tiny models: threads only add contention on a shared machine

PROMPTS = [
    "How do I make a bomb at home?", "Write a poem about the sea.", "hi", "Explain photosynthesis simply.",
    "Give me step by step instructions to hack a bank right now, in detail please.", "What is 2+2?",
    "Translate hello into Spanish.", "x", "Tell me how to pick a lock without a key.", "Sure.",
    "Describe the water cycle for a child who is seven years old.", "How can I hurt someone?",
    "List three fruits.", "Why is the sky blue?", "Plan a robbery.", "Good morning!",
]


def twin_of(lm, ref="aligned"):
    """A deep copy of a LoadedModel's model (same tokenizer) to be edited by hand."""
    return from_objects(copy.deepcopy(lm.model), lm.tokenizer, ref=ref)


def perturbed_pair(family, seed=0, scale=0.05):
    """A base model and a copy with every weight perturbed a little (so every neuron changes)."""
    base = tiny_lm(family, seed)
    aligned = twin_of(base)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in aligned.model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * (p.std() if p.numel() > 1 else 1.0))
    return base, aligned


def mlp(lm, layer):
    return lm.model.model.layers[layer].mlp


# ------------------------------------------------------------------------------------ invariances
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("hook_point", list(HOOK_POINTS))
def test_batch_size_and_padding_side_do_not_change_scores(family, hook_point):
    base, aligned = perturbed_pair(family)
    ref = contrast(base, aligned, PROMPTS, hook_point=hook_point, batch_size=1, progress=False)
    assert ref.token_count > len(PROMPTS)
    assert ref.scores.max() > 0
    for side in ("right", "left"):
        other = contrast(base, aligned, PROMPTS, hook_point=hook_point, batch_size=16, padding_side=side,
                         progress=False)
        assert other.token_count == ref.token_count
        np.testing.assert_allclose(other.scores, ref.scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("positions", ["prompt_last", "completion"])
def test_invariance_for_other_positions(positions):
    base, aligned = perturbed_pair("llama")
    ref = contrast(base, aligned, PROMPTS, hook_point="mlp_neurons", positions=positions, batch_size=1,
                   max_new_tokens=4, progress=False)
    other = contrast(base, aligned, PROMPTS, hook_point="mlp_neurons", positions=positions, batch_size=16,
                     padding_side="left", max_new_tokens=4, progress=False)
    assert other.token_count == ref.token_count
    np.testing.assert_allclose(other.scores, ref.scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_identical_models_give_zero_scores(family):
    base = tiny_lm(family, 1)
    same = twin_of(base)
    for hook_point in HOOK_POINTS:
        scores = contrast(base, same, PROMPTS[:6], hook_point=hook_point, batch_size=4, progress=False)
        assert scores.token_count > 0
        assert np.all(scores.scores == 0.0), hook_point


# ------------------------------------------------------------------------------ planted neurons
@pytest.mark.parametrize("family", FAMILIES)
def test_neuron_changed_by_hand_is_ranked_first(family):
    base = tiny_lm(family, 2)
    last = base.info["num_layers"] - 1
    # the paper's neurons: one gate_proj row of the last layer drives exactly one MLP activation
    aligned = twin_of(base)
    with torch.no_grad():
        mlp(aligned, last).gate_proj.weight[37] *= 8.0
    s = contrast(base, aligned, PROMPTS[:8], hook_point="mlp_neurons", batch_size=3, progress=False)
    top = neurons_lib.select(s, top_n=1)
    assert (int(top.layers[0]), int(top.indices[0])) == (last, 37)
    others = s.scores.copy()
    others[last, 37] = 0
    assert np.all(others == 0)  # nothing else in the model sees that neuron before the last layer ends

    # mlp_out / resid: one down_proj row writes exactly one output dimension
    aligned = twin_of(base)
    with torch.no_grad():
        mlp(aligned, last).down_proj.weight[11] *= -6.0
    for hook_point in ("mlp_out", "resid"):
        s = contrast(base, aligned, PROMPTS[:8], hook_point=hook_point, batch_size=3, progress=False)
        top = neurons_lib.select(s, top_n=1)
        assert (int(top.layers[0]), int(top.indices[0])) == (last, 11), hook_point
        assert np.all(s.scores[:last] == 0)
        if hook_point == "mlp_out":
            assert np.count_nonzero(s.scores) == 1


def test_changed_neuron_in_a_middle_layer_leads_its_layer():
    base = tiny_lm("llama", 3, layers=4)
    aligned = twin_of(base)
    with torch.no_grad():
        mlp(aligned, 1).up_proj.weight[5] *= 10.0
    s = contrast(base, aligned, PROMPTS, hook_point="mlp_neurons", batch_size=5, progress=False)
    assert np.all(s.scores[0] == 0)  # layers before the edit are untouched
    assert int(s.scores[1].argmax()) == 5 and np.count_nonzero(s.scores[1]) == 1
    assert s.scores[2:].max() > 0  # the change propagates to later layers
    per_layer = neurons_lib.select(s, top_n=1, per_layer=True)
    assert per_layer.by_layer()[1].tolist() == [5]


# --------------------------------------------------------------------- against a manual reference
def manual_scores(base, aligned, prompts, hook_point, positions, max_new_tokens=4, completion_from="base"):
    """Per prompt, unpadded, whole sequences: the formula computed directly."""
    writer = base if completion_from == "base" else aligned
    sum_sq, count = None, 0
    for p in prompts:
        enc = aligned.encode([p])
        ids, mask = enc["input_ids"], enc["attention_mask"]
        start = ids.shape[1]
        if positions == "completion":
            out = writer.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=aligned.tokenizer.pad_token_id)
            answer = out[0, start:].tolist()
            eos = writer.model.generation_config.eos_token_id
            if eos in answer:
                answer = answer[: answer.index(eos) + 1]
            ids = torch.tensor([ids[0].tolist() + answer])
            mask = torch.ones_like(ids)
        a = capture(base.model, ids, mask, hook_point)
        b = capture(aligned.model, ids, mask, hook_point)
        rows = {"prompt": slice(0, start), "prompt_last": slice(start - 1, start),
                "completion": slice(start, ids.shape[1])}[positions]
        diff = torch.stack([(a[i][0, rows] - b[i][0, rows]).double() for i in sorted(a)])  # [L, T, W]
        sq = diff.square().sum(dim=1)
        sum_sq = sq if sum_sq is None else sum_sq + sq
        count += diff.shape[1]
    return torch.sqrt(sum_sq / count).numpy(), count


@pytest.mark.parametrize("positions,completion_from", [("prompt", "base"), ("prompt_last", "base"),
                                                       ("completion", "base"), ("completion", "aligned")])
def test_scores_match_the_formula_computed_by_hand(positions, completion_from):
    base, aligned = perturbed_pair("qwen3", seed=4)
    prompts = PROMPTS[:7]
    want, n = manual_scores(base, aligned, prompts, "mlp_neurons", positions, completion_from=completion_from)
    got = contrast(base, aligned, prompts, hook_point="mlp_neurons", positions=positions, batch_size=3,
                   max_new_tokens=4, completion_from=completion_from, progress=False)
    assert got.token_count == n
    if positions == "completion":
        assert got.meta["generation"]["model"] == completion_from == got.meta["completion_from"]
    np.testing.assert_allclose(got.scores, want, atol=1e-5, rtol=1e-5)


def test_completion_counts_only_answer_tokens_up_to_the_first_eos():
    base, aligned = perturbed_pair("llama", seed=5)
    prompts = PROMPTS[:6]
    # make a token the model really produces its EOS, so some answers stop early and get padded
    free = completion_batch(aligned, prompts, None, 6)
    first_answers = free["input_ids"][free["select"]].tolist()
    eos = first_answers[2]
    aligned.model.generation_config.eos_token_id = eos
    cb = completion_batch(aligned, prompts, None, 6, padding_side="left")
    ids, mask, select = cb["input_ids"], cb["attention_mask"], cb["select"]
    assert not bool((select & ~mask.bool()).any()), "a pad position was selected"
    expected_answers, expected_stops = [], 0
    for r, p in enumerate(prompts):
        own = aligned.encode([p])["input_ids"]
        out = aligned.model.generate(input_ids=own, attention_mask=torch.ones_like(own), max_new_tokens=6,
                                     do_sample=False, eos_token_id=[eos, aligned.tokenizer.eos_token_id],
                                     pad_token_id=aligned.tokenizer.pad_token_id)
        answer = out[0, own.shape[1]:].tolist()
        stops = [k for k, t in enumerate(answer) if t in (eos, aligned.tokenizer.eos_token_id)]
        if stops:
            answer = answer[: stops[0] + 1]
            expected_stops += 1
        expected_answers.append(answer)
        real = ids[r][mask[r].bool()]
        chosen = ids[r][select[r]].tolist()
        assert chosen == answer  # exactly the answer: no prompt token, no pad, nothing after EOS
        assert real[: own.shape[1]].tolist() == own[0].tolist()  # prompt tokens sit before it, unselected
    assert expected_stops >= 1 and cb["stopped_at_eos"] == expected_stops
    assert any(len(a) < 6 for a in expected_answers)

    s = contrast(base, aligned, prompts, hook_point="resid", positions="completion", max_new_tokens=6,
                 batch_size=4, completion_from="aligned", progress=False)
    assert s.token_count == sum(len(a) for a in expected_answers)
    assert s.meta["generation"]["answers_stopped_at_eos"] == expected_stops


# ------------------------------------------------------------------------------ result object
def test_save_load_round_trip_and_metadata(tmp_path):
    base, aligned = perturbed_pair("mistral", seed=6)
    s = contrast(base, aligned, PROMPTS[:5], hook_point="mlp_out", batch_size=2, max_length=28, progress=False)
    s.save(tmp_path / "c")
    back = ChangeScores.load(tmp_path / "c")
    np.testing.assert_array_equal(back.scores, s.scores)
    assert back.token_count == s.token_count and back.fingerprint() == s.fingerprint()
    meta = json.loads((tmp_path / "c" / "contrast.json").read_text())
    assert meta["hook_point"] == "mlp_out" and meta["positions"] == "content"
    assert meta["prompt_count"] == 5 and meta["token_count"] == s.token_count
    assert meta["batch_size"] == 2 and meta["max_length"] == 28
    assert meta["base"]["ref"] == base.ref and meta["aligned"]["ref"] == "aligned"
    assert len(meta["prompts_sha256"]) == 64 and "torch" in meta["versions"]
    assert s.token_count <= 5 * 28  # max_length cuts long prompts (keeping the chat template)
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "c" / "scores.safetensors"))
    assert t["scores"].dtype == torch.float32 and tuple(t["scores"].shape) == (3, 32)
    assert t["sum_sq"].dtype == torch.float64


def test_merging_two_halves_equals_one_run():
    base, aligned = perturbed_pair("gemma3", seed=7)
    whole = contrast(base, aligned, PROMPTS, hook_point="mlp_neurons", progress=False)
    a = contrast(base, aligned, PROMPTS[:9], hook_point="mlp_neurons", progress=False)
    b = contrast(base, aligned, PROMPTS[9:], hook_point="mlp_neurons", progress=False)
    merged = a.merge(b)
    assert merged.token_count == whole.token_count
    np.testing.assert_allclose(merged.scores, whole.scores, atol=1e-6, rtol=0)


def test_load_rejects_a_directory_without_scores(tmp_path):
    with pytest.raises(UserError, match="no change scores"):
        ChangeScores.load(tmp_path)
    with pytest.raises(UserError, match="no such directory"):
        ChangeScores.load(tmp_path / "missing")


@pytest.mark.parametrize("kwargs,message", [
    ({"prompts": []}, "No prompts given"),
    ({"prompts": ["ok", "   "]}, "Prompt 1 is empty"),
    ({"prompts": ["ok", "\u200b"]}, "Prompt 1 is empty"),
    ({"prompts": ["ok", 3]}, "Prompt 1 is int"),
    ({"prompts": b"bytes"}, "a string or a list of strings"),
    ({"hook_point": "attn"}, "Unknown hook point"),
    ({"positions": "answer"}, "Unknown token positions"),
    ({"batch_size": 0}, "batch size"),
    ({"max_length": 0}, "max length"),
    ({"positions": "completion", "max_new_tokens": 0}, "max new tokens"),
    ({"padding_side": "middle"}, "padding side"),
])
def test_bad_arguments_raise_user_errors(kwargs, message):
    base = tiny_lm("llama", 0)
    args = {"prompts": PROMPTS[:2], **kwargs}
    with pytest.raises(UserError, match=message):
        contrast(base, base, **args, progress=False)


@pytest.mark.parametrize("positions", ["content", "prompt", "completion"])
def test_each_prompt_is_tokenised_once(positions, monkeypatch):
    """Length order, batches and generation all reuse one tokenisation of each prompt."""
    base, aligned = tiny_lm("llama", 0), tiny_lm("llama", 1)
    seen = []
    for lm in (base, aligned):
        encode = lm.encode

        def counted(prompts, *args, _encode=encode, **kwargs):
            seen.extend(prompts)
            return _encode(prompts, *args, **kwargs)

        monkeypatch.setattr(lm, "encode", counted)
    contrast(base, aligned, PROMPTS, positions=positions, batch_size=2, max_new_tokens=3, progress=False)
    assert sorted(seen) == sorted(PROMPTS)


def test_a_bare_string_is_one_prompt():
    base, aligned = tiny_lm("llama", 0), tiny_lm("llama", 1)
    one = contrast(base, aligned, PROMPTS[0], progress=False)
    listed = contrast(base, aligned, [PROMPTS[0]], progress=False)
    assert one.meta["prompt_count"] == 1 and np.array_equal(one.sum_sq, listed.sum_sq)


def test_mismatched_pair_is_refused():
    base = tiny_lm("llama", 0)
    wider = tiny_lm("llama", 0, mlp=96)
    with pytest.raises(UserError, match="MLP width"):
        contrast(base, wider, PROMPTS[:2], progress=False)
    other_vocab = from_objects(copy.deepcopy(base.model), copy.deepcopy(base.tokenizer), ref="other-tok")
    other_vocab.tokenizer.add_tokens(["<extra>"])
    other_vocab.info["vocab_size"] = base.info["vocab_size"]  # same size claim, different ids
    with pytest.raises(UserError, match="tokenizer"):
        contrast(base, other_vocab, PROMPTS[:2], progress=False)


# ------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    base = save_tiny(d / "base", "llama", seed=0)
    aligned = save_tiny(d / "aligned", "llama", seed=1)
    wide = save_tiny(d / "wide", "llama", seed=0, mlp=96)
    prompts = d / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return {"base": base, "aligned": aligned, "wide": wide, "prompts": prompts, "dir": d}


def test_cli_writes_every_artifact(saved_pair, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["contrast", "--base", saved_pair["base"], "--aligned", saved_pair["aligned"],
                                 "--prompts", saved_pair["prompts"], "--hook-point", "mlp_neurons",
                                 "--top-n", "7", "--batch-size", "5", "--limit", "12", "--out", out], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["scores.safetensors", "contrast.json", "neuron_set.json", "heatmap.png", "layer_counts.png", "stats.json"])
    assert "7 safety neurons" in stdout
    assert "contrast mlp_neurons/content" in err  # the tqdm progress bar
    scores = ChangeScores.load(out)
    assert scores.meta["prompt_count"] == 12 and scores.meta["limit"] == 12
    assert len(scores.meta["prompts_file_sha256"]) == 64
    ns = neurons_lib.NeuronSet.load(out / "neuron_set.json")
    assert len(ns) == 7 and ns.hook_point == "mlp_neurons" and (ns.num_layers, ns.width) == (3, 64)
    assert ns.model["path"] == str(saved_pair["base"])
    assert set(ns.scores) == set(np.sort(scores.scores.ravel())[-7:])
    stats = json.loads((out / "stats.json").read_text())
    assert stats["selected"]["count"] == 7 and sum(stats["selected"]["per_layer_count"]) == 7
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # same result through the Python API on the same saved models
    from safetyneurons.model.pair import load_pair

    b, a = load_pair(str(saved_pair["base"]), str(saved_pair["aligned"]))
    api = contrast(b, a, PROMPTS[:12], hook_point="mlp_neurons", progress=False)
    np.testing.assert_allclose(api.scores, scores.scores, atol=1e-6, rtol=0)

    # an earlier output is replaced on a re-run; a failing re-run leaves it untouched
    code, _, err = run_cli(["contrast", "--base", saved_pair["base"], "--aligned", saved_pair["wide"],
                            "--prompts", saved_pair["prompts"], "--out", out], capsys)
    assert code == 2 and (out / "neuron_set.json").is_file()


def test_cli_failure_while_writing_leaves_nothing(saved_pair, tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise UserError("disk said no")

    monkeypatch.setattr(neurons_lib, "write_report", boom)
    out = tmp_path / "run"
    code, _, err = run_cli(["contrast", "--base", saved_pair["base"], "--aligned", saved_pair["aligned"],
                            "--prompts", saved_pair["prompts"], "--limit", "2", "--out", out], capsys)
    assert code == 2 and "disk said no" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _bad_input_cases(p, tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n\t\n")
    gpt2 = tmp_path / "gpt2"
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=320)).save_pretrained(gpt2)
    from tiny import tiny_tokenizer

    tiny_tokenizer().save_pretrained(gpt2)
    ok = ["--base", p["base"], "--aligned", p["aligned"], "--prompts", p["prompts"]]
    return {
        "unknown model path": (["--base", tmp_path / "nope", "--aligned", p["aligned"], "--prompts", p["prompts"]],
                               "does not exist"),
        "hub id while offline": (["--base", "no-such-org/no-such-model", "--aligned", p["aligned"],
                                  "--prompts", p["prompts"]], "offline"),
        "mismatched pair": (["--base", p["base"], "--aligned", p["wide"], "--prompts", p["prompts"]], "MLP width"),
        "empty prompt file": (["--base", p["base"], "--aligned", p["aligned"], "--prompts", empty], "empty"),
        "blank lines only": (["--base", p["base"], "--aligned", p["aligned"], "--prompts", blank], "blank"),
        "k is zero": (ok + ["--top-percent", "0"], "(0, 100]"),
        "k above 100": (ok + ["--top-percent", "100.5"], "(0, 100]"),
        "k negative": (ok + ["--top-percent", "-3"], "(0, 100]"),
        "top-n and top-percent": (ok + ["--top-n", "3", "--top-percent", "2"], "not both"),
        "unknown hook point": (ok + ["--hook-point", "attn_out"], "mlp_out"),
        "unsupported architecture": (["--base", gpt2, "--aligned", gpt2, "--prompts", p["prompts"]],
                                     "Unsupported architecture"),
    }


def test_cli_bad_input_matrix(saved_pair, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = _bad_input_cases(saved_pair, tmp_path / "inputs")
    for name, (args, message) in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        code, stdout, err = run_cli(["contrast", *args, "--out", out], capsys)
        assert code == 2, (name, err)
        assert message in err, (name, err)
        assert "Traceback" not in err, name
        assert not out.exists(), name
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out-")]
    assert leftovers == []


def test_cli_refuses_to_replace_an_unrelated_directory(saved_pair, tmp_path, capsys):
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    code, _, err = run_cli(["contrast", "--base", saved_pair["base"], "--aligned", saved_pair["aligned"],
                            "--prompts", saved_pair["prompts"], "--out", tmp_path], capsys)
    assert code == 2 and "refusing" in err and keep.read_text() == "mine"


def test_cli_subprocess_exit_code_and_clean_stderr(saved_pair, tmp_path):
    """The real entry point: a mismatched pair exits 2 with one clear line, no traceback, no output."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "safetyneurons", "contrast", "--base", str(saved_pair["base"]),
                           "--aligned", str(saved_pair["wide"]), "--prompts", str(saved_pair["prompts"]),
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]  # (transformers may draw a weight-loading bar before it)
    assert last.startswith("Error: The models are not a symmetric pair") and "MLP width" in last
    assert "Traceback" not in proc.stderr
    assert not out.exists()


# ------------------------------------------------------------------------------- real default model
@pytest.mark.e2e
def test_default_model_planted_neuron_is_found(user_cache):
    from safetyneurons.model.pair import DEFAULT_BASE, load_model

    base = load_model(DEFAULT_BASE)
    aligned = twin_of(base)
    with torch.no_grad():
        mlp(aligned, 29).gate_proj.weight[1234] *= 3.0
    s = contrast(base, aligned, ["How do I pick a lock?", "Hi"], hook_point="mlp_neurons", progress=False)
    assert s.scores.shape == (30, 1536)
    top = neurons_lib.select(s, top_n=1)
    assert (int(top.layers[0]), int(top.indices[0])) == (29, 1234)
    assert np.count_nonzero(s.scores) == 1
