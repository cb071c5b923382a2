"""Guarded generation (library): the guard reads the model's own prefill, and the model decodes from its KV cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from safetyneurons.guard.chat import GuardedChat, SamplingSettings, normalize_messages
from safetyneurons.errors import UserError
from safetyneurons.guard.guard import Guard
from builders import QUERIES, SAFE, UNSAFE, build_guard
from tiny import tiny_lm


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_guard(tmp_path_factory.mktemp("g"))


class Calls:
    """Counts forward calls of the LM head and of the last decoder layer."""

    def __init__(self, lm):
        from safetyneurons.model.hooks import decoder_layers

        self.head = self.last = 0
        self._h = [lm.model.get_output_embeddings().register_forward_hook(lambda *a: self._inc("head")),
                   decoder_layers(lm.model)[-1].register_forward_hook(lambda *a: self._inc("last"))]

    def _inc(self, name):
        setattr(self, name, getattr(self, name) + 1)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self._h:
            h.remove()


@pytest.fixture(scope="module")
def built_last(tmp_path_factory):
    return build_guard(tmp_path_factory.mktemp("g"), pooling="last")


@pytest.mark.parametrize("pooling,max_length", [("mean", 64), ("last", 64), ("mean", 40), ("last", None)])
def test_prefill_probability_equals_guard_score(request, pooling, max_length):
    path, lm, _, _ = request.getfixturevalue("built" if pooling == "mean" else "built_last")
    g = Guard.load(path, lm=lm)
    g.max_length = max_length
    chat = GuardedChat(g, mode="monitor")
    prompts = QUERIES + UNSAFE[:2]  # short ones are read in the prefill itself, long ones in windows first
    assert {len(g.reader.pieces([q])) for q in prompts} != {1}
    want = [r.unsafe_probability for r in g.score(prompts)]
    got = [chat.prefill(user(q)).unsafe_probability for q in prompts]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert len(prompts) >= 4 and len(set(round(p, 6) for p in got)) >= 4  # not a constant


def assert_greedy_equals_generate(chat: GuardedChat, prompt: str, n: int = 12) -> None:
    """Oracle: transformers' own greedy `generate` (no KV cache of ours) gives the same reply."""
    lm = chat.lm
    ids = chat.encode(user(prompt)).ids
    ref = lm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                            do_sample=False, eos_token_id=chat.stop_ids, pad_token_id=0)[0, ids.shape[1]:].tolist()
    cut = next((k for k, t in enumerate(ref) if t in chat.stop_ids), len(ref))
    want = lm.tokenizer.decode(ref[:cut], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    got = chat.complete(user(prompt), SamplingSettings(max_tokens=n, temperature=0))
    assert got.text == want
    assert got.finish_reason == ("stop" if cut < len(ref) else "length")
    assert got.completion_tokens == min(cut + 1, n) and got.prompt_tokens == ids.shape[1]


def test_greedy_decoding_from_the_kv_cache_equals_transformers_generate(built):
    path, lm, _, _ = built
    chat = GuardedChat(Guard.load(path, lm=lm), mode="monitor")
    for prompt in SAFE[:3]:
        assert_greedy_equals_generate(chat, prompt)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "gemma3", "mistral"])
def test_other_architectures_score_the_prefill_and_decode_like_generate(family):
    from safetyneurons.neurons.selection import NeuronSet
    from safetyneurons.probes.probe import Probe
    from safetyneurons.activations.reader import pooled_features

    lm = tiny_lm(family, layers=3)
    ns = NeuronSet(hook_point="mlp_neurons", num_layers=3, width=64, layers=[0, 0, 1, 1, 1], indices=[1, 5, 2, 9, 40],
                   scores=np.ones(5), model=lm.describe())
    X = pooled_features(lm, UNSAFE + SAFE, "mlp_neurons", pooling="last", neuron_set=ns, max_length=64)
    probe = Probe("logreg", cv=3, seed=0).fit(X, np.array([1] * len(UNSAFE) + [0] * len(SAFE)))
    meta = {"hook_point": "mlp_neurons", "pooling": "last", "max_length": 64}
    g = Guard(Path("in-memory"), meta, lm, probe, ns, threshold=0.5)
    chat = GuardedChat(g, mode="monitor")
    got = [chat.prefill(user(q)).unsafe_probability for q in QUERIES]
    assert got == pytest.approx(g.unsafe_probability(QUERIES).tolist(), rel=1e-5, abs=1e-6)
    assert_greedy_equals_generate(chat, SAFE[0], n=8)


def test_a_blocked_prompt_runs_no_later_layer_no_lm_head_and_no_decoding(built):
    path, lm, ns, _ = built
    g = Guard.load(path, lm=lm)
    bad, good = UNSAFE[0], SAFE[0]
    p_bad, p_good = (r.unsafe_probability for r in g.score([bad, good]))
    assert p_bad > p_good  # the planted signal: the probe was fitted on these prompts
    g.threshold = (p_bad + p_good) / 2
    chat = GuardedChat(g, mode="block", refusal="No.")
    assert ns.deepest_layer < lm.info["num_layers"] - 1  # so the early stop is observable
    with Calls(lm) as calls:
        out = chat.complete(user(bad), SamplingSettings(max_tokens=5))
        assert (calls.head, calls.last, chat.decode_steps) == (0, 0, 0)
        assert out.text == "No." and out.finish_reason == "content_filter" and out.blocked
        assert out.completion_tokens == 0 and out.unsafe_probability == pytest.approx(p_bad, abs=1e-6)
        ok = chat.complete(user(good), SamplingSettings(max_tokens=5, temperature=0))
        assert not ok.blocked and ok.finish_reason in ("stop", "length")
        assert calls.head == 1 + chat.decode_steps and calls.head == ok.completion_tokens - (ok.finish_reason == "stop")
    monitor = GuardedChat(g, mode="monitor")
    seen = monitor.complete(user(bad), SamplingSettings(max_tokens=3, temperature=0))
    assert not seen.blocked and seen.unsafe_probability >= g.threshold and seen.finish_reason != "content_filter"
    off = GuardedChat(g, mode="off").complete(user(good), SamplingSettings(max_tokens=5, temperature=0))
    assert off.unsafe_probability is None and off.text == ok.text  # the guard does not change the answer


def test_stop_strings_max_tokens_and_seeded_sampling(built):
    path, lm, _, _ = built
    chat = GuardedChat(Guard.load(path, lm=lm), mode="off")
    msgs = user(SAFE[1])
    full = chat.complete(msgs, SamplingSettings(max_tokens=20, temperature=0))
    assert full.finish_reason == "length" and full.completion_tokens == 20  # this tiny model never ends its turn
    stop = full.text[5:8]
    cut = chat.complete(msgs, SamplingSettings(max_tokens=20, temperature=0, stop=("zzz-none", stop)))
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.find(stop)]
    pieces = [d.text for d in chat.generate(chat.prefill(msgs), SamplingSettings(max_tokens=20, stop=(stop,),
                                                                                   temperature=0))]
    assert "".join(pieces) == cut.text and all(stop not in p for p in pieces)
    a = chat.complete(msgs, SamplingSettings(max_tokens=10, temperature=1.0, seed=3))
    b = chat.complete(msgs, SamplingSettings(max_tokens=10, temperature=1.0, seed=3))
    c = chat.complete(msgs, SamplingSettings(max_tokens=10, temperature=1.0, seed=4))
    assert a.text == b.text and a.text != c.text


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    s = SamplingSettings(temperature=1.0, top_p=0.7)
    gen = torch.Generator().manual_seed(0)
    drawn = {GuardedChat.pick(logits, s, gen) for _ in range(300)}
    assert drawn == {0, 1}
    assert GuardedChat.pick(logits, SamplingSettings(temperature=0)) == 0


def test_every_message_of_a_conversation_is_read_and_the_verdict_is_the_most_unsafe(built):
    path, lm, _, _ = built
    g = Guard.load(path, lm=lm)
    chat = GuardedChat(g, mode="monitor")
    msgs = normalize_messages([{"role": "system", "content": "Always answer in French."},
                               {"role": "user", "content": "Write a poem about the sea."},
                               {"role": "assistant", "content": UNSAFE[0]},
                               {"role": "user", "content": "Now explain photosynthesis simply."}])
    each = [r.unsafe_probability for r in g.score([m["content"] for m in msgs])]  # each as a user message
    p_conv = chat.prefill(msgs).unsafe_probability
    assert p_conv == pytest.approx(max(each), abs=1e-6) and p_conv == pytest.approx(g.score([msgs])[0].unsafe_probability)
    assert max(each) == each[2] and each[2] > each[1]  # the forged assistant turn is the most unsafe piece
    enc = chat.encode(msgs)
    read = lm.tokenizer.decode(enc.ids[0])
    assert "French" in read and "photosynthesis simply" in read and read.endswith("<|im_start|>assistant\n")


def test_messages_and_settings_are_validated(built):
    path, lm, _, _ = built
    parts = normalize_messages([{"role": "developer", "content": "Be brief."},
                                {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                             {"type": "text", "text": "there"}]}])
    assert parts == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    for bad, match in [([], "non-empty list"), ([{"role": "robot", "content": "x"}], "roles"),
                       ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "image_url"),
                       ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "last message"),
                       ([{"role": "system", "content": "x"}], "no user message")]:
        with pytest.raises(UserError, match=match):
            normalize_messages(bad)
    for kw, match in [({"max_tokens": 0}, "max_tokens"), ({"temperature": 3}, "temperature"),
                      ({"top_p": 0}, "top_p"), ({"stop": ("",)}, "stop"), ({"stop": tuple("abcde")}, "stop")]:
        with pytest.raises(UserError, match=match):
            SamplingSettings(**kw).check()
    with pytest.raises(UserError, match="limit of 4"):
        SamplingSettings(max_tokens=5).check(4)
    g = Guard.load(path, lm=lm)
    with pytest.raises(UserError, match="guard mode"):
        GuardedChat(g, mode="loud")
    with pytest.raises(UserError, match="context"):
        GuardedChat(g, context_length=8).encode(user("a long prompt " * 5))


@pytest.mark.parametrize("mode", ["off", "monitor"])
def test_a_chunked_prefill_equals_one_pass(built, mode):
    """The prompt fed in chunks (KV cache carried from chunk to chunk) gives the logits of one pass (to 1e-5) and
    the same greedy reply, for chunk sizes that cut inside a message, and the same guard verdict."""
    path, lm, _, _ = built
    chat = GuardedChat(Guard.load(path, lm=lm), mode=mode)
    msgs = normalize_messages([{"role": "system", "content": "Answer briefly and kindly."},
                               {"role": "user", "content": "Write a poem about the sea, the moon and the stars, "
                                                           "and explain photosynthesis simply."}])
    enc = chat.encode(msgs)
    n = enc.n_tokens
    spans = lm.template.encode([msgs])[0].spans
    whole = chat.prefill(enc)
    greedy = SamplingSettings(max_tokens=12, temperature=0)
    want = [d.text for d in chat.generate(whole, greedy)]
    for size in (1, 7, 16, n - 1, n, n + 5):
        cuts = range(size, n, size)
        if size in (7, 16):  # precondition: a chunk boundary falls inside a message's text
            assert any(a < c < b for c in cuts for a, b in spans), (size, spans)
        steps = list(chat.prefill_steps(enc, size))
        model_calls = -(-n // size)
        assert len(steps) == model_calls + (mode != "off" and not chat.reads_in_prefill(enc, chat.guard_pieces(enc)))
        assert all(s is None for s in steps[:-1])
        pre = steps[-1]
        torch.testing.assert_close(pre.logits, whole.logits, rtol=0, atol=1e-5)
        assert pre.prompt_tokens == n and pre.unsafe_probability == whole.unsafe_probability
        assert [d.text for d in chat.generate(pre, greedy)] == want  # decoding from the carried cache
    if mode == "monitor":
        assert whole.unsafe_probability == pytest.approx(chat.guard.score([msgs])[0].unsafe_probability, abs=1e-6)
