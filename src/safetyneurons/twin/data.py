"""Twin training data: labelled records, refusal targets, self-distilled benign replies, token encoding."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from safetyneurons.data import splits as data
from safetyneurons.model.generate import end_of_turn_id, greedy_generate
from safetyneurons.model.judge import judge
from safetyneurons.data.records import check_records, first_by_hash, records_sha256
from safetyneurons.model.twin_cache import default_twin_data
from safetyneurons.model.twin_settings import DEFAULT_EVAL_PER_CLASS, REFUSALS, VAL_SALT, TwinSettings

if TYPE_CHECKING:
    from safetyneurons.model.pair import LoadedModel


def check_twin_records(records: Sequence[dict], what: str, need_both: bool = True) -> list[dict]:
    """Validate twin data: labelled records (ids may be absent, then their position is used, or repeat);
    by default both labels must occur (harmful prompts teach refusals, benign ones keep answering)."""
    return check_records(records, what, need_ids=False, unique_ids=False, need_both=need_both)


def read_labelled(path_or_name: str | Path, what: str, need_both: bool = True) -> list[dict]:
    """Read a labelled split/file through the data module and validate it."""
    return check_twin_records(data.read_records(str(path_or_name)), what or str(path_or_name), need_both)


def sample_eval(records: Sequence[dict], per_class: int = DEFAULT_EVAL_PER_CLASS) -> list[dict]:
    """A fixed deterministic sample: the first `per_class` records of each label (harmful first), by hash."""
    return first_by_hash(records, per_class, label_order=(1, 0))


def split_twin_records(records: Sequence[dict], per_class: int = DEFAULT_EVAL_PER_CLASS) -> tuple[list, list]:
    """The ``twin`` split as (training records, validation records): ``per_class`` prompts of each label (at most a
    third of it), ordered by a salted hash, are held back to judge the twin and to choose its recipe, so no test
    prompt is ever used for either."""
    key = lambda r: hashlib.sha256((VAL_SALT + r["prompt"]).encode("utf-8")).hexdigest()  # noqa: E731
    train: list[dict] = []
    val: list[dict] = []
    for label in (1, 0):  # harmful first, each class in hash order (the order the twin is trained in)
        group = sorted((r for r in records if r["label"] == label), key=key)
        k = min(per_class, len(group) // 3)  # small data: a third of each class
        val += group[:k]
        train += group[k:]
    return train, val


def default_twin_records() -> tuple[list, list]:
    """(training records, validation records) of the default data's ``twin`` split."""
    path = default_twin_data()
    return split_twin_records(read_labelled(path, f"default twin split {path}"))


def default_eval_records(per_class: int = DEFAULT_EVAL_PER_CLASS) -> list[dict]:
    """Up to ``per_class`` harmful + benign prompts of the twin split's validation part (never trained on)."""
    return sample_eval(default_twin_records()[1], per_class)


def data_sha256(records: Sequence[dict]) -> str:
    """Hash of the training-relevant content of labelled records (order-sensitive; the ``training`` form)."""
    return records_sha256(records, form="training")


def refusal_for(prompt: str) -> str:
    """The refusal reply for a harmful prompt, chosen deterministically by the prompt's hash."""
    h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    return REFUSALS[h % len(REFUSALS)]



def generate_replies(lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16,
                     progress: bool = True, desc: str = "generate", prefix: str = "") -> list[tuple[str, bool]]:
    """Greedy replies (:func:`safetyneurons.model.generate.greedy_generate`) as ``(text, finished)`` per prompt.

    With `prefix`, the reply is prefilled with it and the text includes it; ``finished`` is True when the
    model closed its turn before `max_new_tokens`.
    """
    gens = greedy_generate(lm, prompts, max_new_tokens, batch_size=batch_size, prefix=prefix, progress=progress,
                           desc=desc)
    return [(g.text(lm, prefix), g.stopped) for g in gens]


def build_examples(lm: LoadedModel, records: Sequence[dict], settings: TwinSettings,
                   progress: bool = True) -> list[dict]:
    """Training examples: a refusal for each harmful prompt, the base model's own reply for each benign one.

    With ``settings.helpful_prefix`` (off by default), a benign prompt the base declined is asked again with
    the reply prefilled by that text (e.g. "Sure, here") and the base continues from there. Each example
    carries ``source`` (refusal / greedy / prefilled), the judge's ``verdict`` on its reply and ``used``:
    benign examples whose reply is not an answer (the base declined or said nothing) are marked unused.
    """
    benign = [r["prompt"] for r in records if r["label"] == 0]
    replies = dict(zip(benign, generate_replies(lm, benign, settings.max_new_tokens, settings.gen_batch_size,
                                                progress, desc="self-distil benign replies")))
    declined = [p for p in benign if judge(replies[p][0]) != "answer"]
    prefilled = {}
    if declined and settings.helpful_prefix:
        prefilled = dict(zip(declined, generate_replies(lm, declined, settings.max_new_tokens,
                                                        settings.gen_batch_size, progress,
                                                        desc="re-ask declined benign", prefix=settings.helpful_prefix)))
    out = []
    for r in records:
        if r["label"] == 1:
            out.append({"id": r["id"], "prompt": r["prompt"], "label": 1, "reply": refusal_for(r["prompt"]),
                        "ends": True, "source": "refusal"})
        else:
            text, finished = replies[r["prompt"]]
            source = "greedy"
            if r["prompt"] in prefilled and judge(prefilled[r["prompt"]][0]) == "answer":
                text, finished = prefilled[r["prompt"]]
                source = "prefilled"
            out.append({"id": r["id"], "prompt": r["prompt"], "label": 0, "reply": text, "ends": finished,
                        "source": source})
        out[-1]["verdict"] = judge(out[-1]["reply"])
        # a benign prompt teaches helpfulness only with a reply that answers (the base sometimes declines
        # benign requests, e.g. tool calls it cannot make); such replies are kept on file but not trained on
        out[-1]["used"] = r["label"] == 1 or out[-1]["verdict"] == "answer"
    return out


def prompt_length(lm: LoadedModel, prompt: str) -> int:
    """Tokens of the chat-formatted prompt."""
    return len(lm.tokenizer(lm.format(prompt), add_special_tokens=not lm.chat_template)["input_ids"])


def encode_example(lm: LoadedModel, prompt: str, reply: str, ends: bool,
                   max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of chat-formatted prompt + reply (+ end-of-turn token when `ends`), and labels.

    Labels are -100 on the prompt tokens, so the loss sees the reply tokens only. Too long: the reply is
    cut first (keeping at least 8 tokens), then the prompt loses its first tokens.
    """
    tok = lm.tokenizer
    p = tok(lm.format(prompt), add_special_tokens=not lm.chat_template)["input_ids"]
    r = tok(reply, add_special_tokens=False)["input_ids"] if reply else []
    if ends:
        r = r + [end_of_turn_id(lm)]
    if len(p) + len(r) > max_length:
        r = r[:max(max_length - len(p), min(8, len(r)))]
        if len(p) + len(r) > max_length:
            p = p[len(p) + len(r) - max_length:]
    return p + r, [-100] * len(p) + r


def collate(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """Right-padded batch: ``input_ids``, ``attention_mask`` and ``labels`` (-100 on pads)."""
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (x, y) in enumerate(encoded):
        ids[i, :len(x)] = torch.tensor(x)
        labels[i, :len(y)] = torch.tensor(y)
        mask[i, :len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}

