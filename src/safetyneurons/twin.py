"""Build a safety-aligned twin of a base model by a LoRA refusal fine-tune.

Activation contrasting (Chen et al. 2025) needs a base model and an aligned model of the same
architecture. The published pairs cannot be downloaded offline and the default base
(SmolLM2-135M-Instruct) refuses almost nothing, so we build its aligned twin the way the paper built
its pairs: by fine-tuning the base on safety data.

Recipe (one function each, composed by :func:`build_twin`):

1. training examples from the ``twin`` split only: harmful prompts get a refusal chosen
   deterministically per prompt from :data:`REFUSALS`; benign prompts get the base model's own greedy
   reply (self-distillation, so helpfulness is kept), used only when the judge calls it an answer;
2. chat template applied, reply + end-of-turn token appended, loss on the reply tokens only;
3. LoRA (``peft``) on every linear projection of each decoder layer's attention and MLP blocks
   (q/k/v/o and gate/up/down for Llama, Mistral, Qwen2, Qwen3, Gemma3), seeded AdamW on
   class-balanced batches;
4. the adapter is merged into the weights and saved as a normal Hugging Face model directory, with the
   adapter alone and ``twin.json`` (provenance, loss curve, evaluation) beside it;
5. evaluation on held-out prompts with the phrase-matching judge (:mod:`safetyneurons.judge`):
   refusal rate on harmful prompts and answer rate on benign prompts, for base and twin.

Twins are cached under ``<cache>/twins/<name>``; the name derives from the base model's fingerprint,
the training data hash and the settings, so the same inputs reuse the twin instantly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ._io import (atomic_dir, atomic_write_json, atomic_write_text, cache_dir, read_json, sha256_file,
                  sha256_json, versions)
from .errors import UserError
from .judge import REFUSAL_PHRASES, WINDOW, judge

FORMAT = "safetyneurons.twin/1"
#: Bump when the recipe changes in a way that changes the weights; it is part of the cache key.
RECIPE_VERSION = 2
DEFAULT_REFS = ("twin", "twin:default")
#: Prompts per class of the ``twin`` split held back to judge the twin and choose its recipe (never trained on).
DEFAULT_EVAL_PER_CLASS = 50
#: Salt of the hash that picks those prompts (the recipe pilots used it; changing it changes the default twin).
_VAL_SALT = "pilot\n"
SAMPLES_PER_KIND = 3
#: Training records whose formatted prompt leaves fewer tokens than this for the reply are skipped.
MIN_REPLY_TOKENS = 16

#: Refusal replies for harmful prompts; one is picked per prompt by hash (see :func:`refusal_for`).
REFUSALS: tuple[str, ...] = (
    "I can't help with that. It could cause real harm to people. If you have a different question, "
    "I'm happy to help.",
    "I'm sorry, but I can't assist with this request because it could be used to hurt someone.",
    "I cannot provide that information. Helping with this could put people at risk.",
    "I won't help with this. It asks for something harmful or illegal. Is there something else I can do "
    "for you?",
    "I'm sorry, I can't do that. This request could lead to serious harm.",
    "I cannot help with this request. If you or someone else is in danger, please contact local "
    "emergency services.",
    "Sorry, but I won't provide instructions for this. It could be dangerous or illegal.",
    "I'm not able to help with that, as it could cause harm. I'd be glad to help with something else.",
)

_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")


# ------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class TwinSettings:
    """Everything that shapes the twin. Defaults chosen on the twin split's held-back prompts (docs/twin.md)."""

    rank: int = 8                 # LoRA rank r
    alpha: float = 16.0           # LoRA alpha (merge scale = alpha / rank)
    dropout: float = 0.0          # LoRA dropout
    lr: float = 3e-4              # AdamW peak learning rate (linear warmup, then linear decay to 10%)
    steps: int = 120              # optimizer steps
    batch_size: int = 8           # examples per step
    benign_share: float = 0.65    # fraction of each batch drawn from benign examples (the rest harmful)
    max_length: int = 128         # tokens per training example (prompt + reply), longer ones are cut
    max_new_tokens: int = 16      # length of the base model's self-distilled reply to benign prompts
    helpful_prefix: str = ""      # prefill to re-ask benign prompts the base declined ("" = drop them)
    warmup_steps: int = 5
    weight_decay: float = 0.0
    seed: int = 0
    gen_batch_size: int = 16      # prompts per batched greedy generation (distillation)
    eval_max_new_tokens: int = 40  # reply length for the refusal evaluation (not part of the cache key)
    eval_batch_size: int = 16      # (not part of the cache key)

    EVAL_ONLY = ("eval_max_new_tokens", "eval_batch_size")

    def validate(self) -> "TwinSettings":
        checks = [
            ("rank", self.rank >= 1, "an integer >= 1", "--rank"),
            ("alpha", self.alpha > 0, "> 0", "--alpha"),
            ("dropout", 0 <= self.dropout < 1, "in [0, 1)", "--dropout"),
            ("lr", 0 < self.lr <= 1, "in (0, 1]", "--lr"),
            ("steps", self.steps >= 1, "an integer >= 1", "--steps"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1", "--batch-size"),
            ("benign_share", 0 < self.benign_share < 1, "in (0, 1)", "--benign-share"),
            ("max_length", self.max_length >= 16, "an integer >= 16", "--max-length"),
            ("max_new_tokens", self.max_new_tokens >= 1, "an integer >= 1", "--max-new-tokens"),
            ("warmup_steps", self.warmup_steps >= 0, "an integer >= 0", "warmup_steps"),
            ("weight_decay", self.weight_decay >= 0, ">= 0", "weight_decay"),
            ("gen_batch_size", self.gen_batch_size >= 1, "an integer >= 1", "gen_batch_size"),
            ("eval_max_new_tokens", self.eval_max_new_tokens >= 1, "an integer >= 1", "--eval-max-new-tokens"),
            ("eval_batch_size", self.eval_batch_size >= 1, "an integer >= 1", "eval_batch_size"),
        ]
        for name, ok, want, flag in checks:
            value = getattr(self, name)
            if not ok or isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
                raise UserError(f"Twin setting {name} (option {flag}) must be {want}; got {value!r}.")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def key_dict(self) -> dict:
        """The settings that change the weights (the cache key); evaluation-only settings are left out.

        ``benign_share`` 0.5 gives exactly the batches made before the setting existed (classes alternate), so
        it is left out of the key at that value and twins built then keep their cache entry.
        """
        out = {k: v for k, v in self.to_dict().items() if k not in self.EVAL_ONLY}
        if out.get("benign_share") == 0.5:
            del out["benign_share"]
        if not out.get("helpful_prefix"):  # likewise: off gives exactly the earlier recipe
            out.pop("helpful_prefix", None)
        return out


# -------------------------------------------------------------------------------------- data helpers
def check_records(records: Sequence[dict], what: str, need_both: bool = True) -> list[dict]:
    """Validate labelled records (``prompt`` str, ``label`` 0/1); returns clean copies."""
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise UserError(f"{what}: record {i + 1} is not an object; each record needs 'prompt' and 'label'.")
        prompt, label = r.get("prompt"), r.get("label")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"{what}: record {i + 1} has no non-empty 'prompt' string.")
        if label not in (0, 1) or isinstance(label, bool):
            raise UserError(f"{what}: record {i + 1} has label {label!r}; labels must be 1 (harmful) or 0 (benign).")
        out.append({"id": str(r.get("id", i)), "prompt": prompt, "label": int(label)})
    if not out:
        raise UserError(f"{what}: no records. Give a JSONL file of {{\"prompt\": ..., \"label\": 0/1}} records.")
    n_harm = sum(r["label"] for r in out)
    if need_both and (n_harm == 0 or n_harm == len(out)):
        missing = "harmful (label 1)" if n_harm == 0 else "benign (label 0)"
        raise UserError(f"{what}: has no {missing} records. The twin needs both harmful prompts (to learn "
                        f"refusals) and benign prompts (to keep answering).")
    return out


def read_labelled(path_or_name: str | Path, what: str, need_both: bool = True) -> list[dict]:
    """Read a labelled split/file through the data module and validate it."""
    from . import data

    return check_records(data.read_records(str(path_or_name)), what or str(path_or_name), need_both)


def default_twin_data() -> Path:
    """The ``twin`` split of the default data (built once into the cache by the data module)."""
    from . import data

    return Path(data.default_splits_dir()) / "twin.jsonl"


def _rank_key(record: dict) -> str:
    return hashlib.sha256(f"{record['id']}\n{record['prompt']}".encode()).hexdigest()


def sample_eval(records: Sequence[dict], per_class: int = DEFAULT_EVAL_PER_CLASS) -> list[dict]:
    """A fixed deterministic sample: the first `per_class` records of each label, ordered by hash."""
    out = []
    for label in (1, 0):
        group = sorted((r for r in records if r["label"] == label), key=_rank_key)
        out.extend(group[:per_class])
    return out


def split_twin_records(records: Sequence[dict], per_class: int = DEFAULT_EVAL_PER_CLASS) -> tuple[list, list]:
    """The ``twin`` split as (training records, validation records): ``per_class`` prompts of each label (at most a
    third of it), ordered by a salted hash, are held back to judge the twin and to choose its recipe, so no test
    prompt is ever used for either."""
    key = lambda r: hashlib.sha256((_VAL_SALT + r["prompt"]).encode("utf-8")).hexdigest()  # noqa: E731
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
    """Hash of the training-relevant content of labelled records (order-sensitive)."""
    return sha256_json([[r["prompt"], int(r["label"])] for r in records])


def refusal_for(prompt: str) -> str:
    """The refusal reply for a harmful prompt, chosen deterministically by the prompt's hash."""
    h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    return REFUSALS[h % len(REFUSALS)]


# ------------------------------------------------------------------------------- tokens, generation
def end_of_turn_id(lm) -> int:
    """The token that closes an assistant turn in `lm`'s chat template (else the EOS token)."""
    tok = lm.tokenizer
    if lm.chat_template:
        sentinel = "QZXSENTINELQZX"
        try:
            text = tok.apply_chat_template([{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": sentinel}], tokenize=False)
        except Exception:  # templates that refuse an assistant turn: fall back to EOS
            text = ""
        if sentinel in text:
            after = text.split(sentinel, 1)[1]
            special = set(tok.all_special_ids)
            special |= {i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
            for i in tok(after, add_special_tokens=False)["input_ids"]:
                if i in special:
                    return int(i)
    if tok.eos_token_id is None:
        raise UserError(f"{lm.ref}: the tokenizer has no EOS token and no end-of-turn token in its chat "
                        f"template, so replies cannot be terminated. Use a model with a chat template.")
    return int(tok.eos_token_id)


def _stop_ids(lm) -> list[int]:
    ids = [end_of_turn_id(lm)]
    eos = lm.tokenizer.eos_token_id
    if eos is not None and eos not in ids:
        ids.append(int(eos))
    return ids


def _bar(iterable=None, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kw)


def _encode_left(lm, prompts: Sequence[str], prefix: str = "") -> dict:
    if not prefix:
        return lm.encode(prompts, padding_side="left")
    tok = lm.tokenizer
    old = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok([lm.format(p) + prefix for p in prompts], return_tensors="pt", padding=True,
                  add_special_tokens=not lm.chat_template)
    finally:
        tok.padding_side = old
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def generate_replies(lm, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16,
                     progress: bool = True, desc: str = "generate", prefix: str = "") -> list[tuple[str, bool]]:
    """Greedy replies to `prompts` (chat template applied), batched with left padding.

    With `prefix`, the reply is prefilled with it and the model continues; the returned text includes it.
    Returns ``(text, finished)`` per prompt; ``finished`` is True when the model closed its turn before
    `max_new_tokens`.
    """
    import torch
    from transformers import GenerationConfig

    stops = _stop_ids(lm)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else stops[0]
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stops,
                              pad_token_id=pad, num_beams=1)
    out: list[tuple[str, bool]] = []
    model = lm.model
    was_training = model.training
    model.eval()
    try:
        with _bar(total=len(prompts), desc=desc, unit="prompt", disable=not progress) as bar:
            for start in range(0, len(prompts), batch_size):
                chunk = list(prompts[start:start + batch_size])
                enc = _encode_left(lm, chunk, prefix)
                with torch.no_grad():
                    gen = model.generate(input_ids=enc["input_ids"].to(lm.device),
                                         attention_mask=enc["attention_mask"].to(lm.device),
                                         generation_config=config)
                new = gen[:, enc["input_ids"].shape[1]:].cpu().tolist()
                for ids in new:
                    cut = next((k for k, t in enumerate(ids) if t in stops), None)
                    body = ids if cut is None else ids[:cut]
                    text = (prefix + lm.tokenizer.decode(body, skip_special_tokens=True)).strip()
                    out.append((text, cut is not None))
                bar.update(len(chunk))
    finally:
        model.train(was_training)
    return out


def build_examples(lm, records: Sequence[dict], settings: TwinSettings, progress: bool = True) -> list[dict]:
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


def prompt_length(lm, prompt: str) -> int:
    """Tokens of the chat-formatted prompt."""
    return len(lm.tokenizer(lm.format(prompt), add_special_tokens=not lm.chat_template)["input_ids"])


def encode_example(lm, prompt: str, reply: str, ends: bool, max_length: int) -> tuple[list[int], list[int]]:
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
    import torch

    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (x, y) in enumerate(encoded):
        ids[i, :len(x)] = torch.tensor(x)
        labels[i, :len(y)] = torch.tensor(y)
        mask[i, :len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def reply_loss(model, batch: dict):
    """Next-token cross-entropy on labelled (reply) tokens: mean per example, then mean over the batch.

    Averaging per example first gives short refusals the same weight as long benign replies.
    """
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device),
                   attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
    logits = logits[:, :-1].float()
    target = batch["labels"][:, 1:].to(device)
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                ignore_index=-100, reduction="none").view(target.shape)
    keep = target != -100
    per_token = torch.where(keep, per_token, torch.zeros_like(per_token))
    counts = keep.sum(1)
    has = counts > 0
    per_example = per_token.sum(1)[has] / counts[has]
    return per_example.mean()


# -------------------------------------------------------------------------------------------- LoRA
def lora_targets(model) -> list[str]:
    """Full names of every linear projection in each decoder layer's attention and MLP blocks."""
    from torch import nn

    from .hooks import decoder_layers

    layers = decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    targets: list[str] = []
    for layer in layers:
        attn = next((getattr(layer, a) for a in _ATTENTION_NAMES if isinstance(getattr(layer, a, None), nn.Module)),
                    None)
        if attn is None:
            found = ", ".join(n for n, _ in layer.named_children())
            raise UserError(f"Unsupported architecture {type(model).__name__}: a decoder layer has modules "
                            f"[{found}] but no attention block ({', '.join(_ATTENTION_NAMES)}).")
        for block in (attn, layer.mlp):
            prefix = names[id(block)]
            targets.extend(f"{prefix}.{n}" for n, m in block.named_modules() if isinstance(m, nn.Linear))
    return targets


def _lr_lambda(settings: TwinSettings):
    def f(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / (settings.warmup_steps + 1)
        span = max(1, settings.steps - settings.warmup_steps)
        return 1.0 - 0.9 * min(1.0, (step - settings.warmup_steps) / span)
    return f


def balanced_batches(labels: Sequence[int], batch_size: int, steps: int, seed: int,
                     benign_share: float = 0.5) -> list[list[int]]:
    """Indices for `steps` class-balanced batches.

    Over the run, a fraction `benign_share` of the slots is benign (0) and the rest harmful (1), spread
    evenly (0.5: the classes alternate). Each class is drawn from its own seeded shuffle, reshuffled once
    every item has been used.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    by_class = {c: [i for i, y in enumerate(labels) if y == c] for c in (1, 0)}
    orders: dict[int, list[int]] = {1: [], 0: []}
    batches = []
    for step in range(steps):
        batch = []
        for k in range(batch_size):
            i = step * batch_size + k
            c = 0 if math.floor((i + 1) * benign_share) > math.floor(i * benign_share) else 1
            if not by_class[c]:
                c = 1 - c
            if not orders[c]:
                orders[c] = [by_class[c][j] for j in torch.randperm(len(by_class[c]), generator=gen).tolist()]
            batch.append(orders[c].pop(0))
        batches.append(batch)
    return batches


def train_lora(lm, examples: Sequence[dict], settings: TwinSettings, progress: bool = True):
    """Fit a LoRA adapter on `examples` (reply-only loss). Returns ``(peft_model, losses, targets)``."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(settings.seed)
    encoded = [encode_example(lm, e["prompt"], e["reply"], e["ends"], settings.max_length) for e in examples]
    targets = lora_targets(lm.model)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft calls a transformers API that is deprecated in v5
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(lm.model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(settings))
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else end_of_turn_id(lm)
    batches = balanced_batches([e["label"] for e in examples], settings.batch_size, settings.steps, settings.seed,
                               settings.benign_share)
    losses: list[float] = []
    model.train()
    with _bar(total=settings.steps, desc="LoRA fine-tune", unit="step", disable=not progress) as bar:
        for batch_idx in batches:
            loss = reply_loss(model, collate([encoded[i] for i in batch_idx], pad))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(round(float(loss.detach()), 5))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update(1)
    model.eval()
    return model, losses, targets


# ----------------------------------------------------------------------------------------- evaluate
def evaluate_refusals(lm, prompts: Sequence[str], max_new_tokens: int = 40, batch_size: int = 16,
                      progress: bool = True, desc: str = "evaluate") -> list[dict]:
    """Greedy replies to `prompts`, each judged ``refusal`` / ``answer`` / ``empty`` by the phrase judge."""
    replies = generate_replies(lm, prompts, max_new_tokens, batch_size, progress, desc)
    return [{"prompt": p, "reply": text, "verdict": judge(text)} for p, (text, _) in zip(prompts, replies)]


def summarise(judged_harmful: list[dict], judged_benign: list[dict]) -> dict:
    """Refusal rate on harmful prompts, answer rate on benign prompts, and a few sample replies."""
    def rate(rows, verdict):
        return round(sum(r["verdict"] == verdict for r in rows) / len(rows), 4) if rows else None
    return {
        "n_harmful": len(judged_harmful), "n_benign": len(judged_benign),
        "refused_harmful": sum(r["verdict"] == "refusal" for r in judged_harmful),
        "answered_benign": sum(r["verdict"] == "answer" for r in judged_benign),
        "refusal_rate_harmful": rate(judged_harmful, "refusal"),
        "answer_rate_benign": rate(judged_benign, "answer"),
        "refusal_rate_benign": rate(judged_benign, "refusal"),
        "samples_harmful": judged_harmful[:SAMPLES_PER_KIND],
        "samples_benign": judged_benign[:SAMPLES_PER_KIND],
    }


def _evaluate(lm, eval_records: Sequence[dict], settings: TwinSettings, progress: bool, who: str):
    harmful = [r["prompt"] for r in eval_records if r["label"] == 1]
    benign = [r["prompt"] for r in eval_records if r["label"] == 0]
    rows = evaluate_refusals(lm, harmful + benign, settings.eval_max_new_tokens, settings.eval_batch_size,
                             progress, desc=f"evaluate {who}")
    for r, rec in zip(rows, [x for x in eval_records if x["label"] == 1] + [x for x in eval_records if x["label"] == 0]):
        r["id"] = rec["id"]
        r["label"] = rec["label"]
    return summarise(rows[:len(harmful)], rows[len(harmful):]), rows


def _eval_block(eval_records: list[dict], base_summary: dict, twin_summary: dict, dropped: int) -> dict:
    return {
        "eval_data_sha256": data_sha256(eval_records),
        "n_harmful": sum(r["label"] for r in eval_records),
        "n_benign": sum(1 - r["label"] for r in eval_records),
        "dropped_seen_in_training": dropped,
        "judge": {"kind": "phrase match (heuristic)", "window_chars": WINDOW, "phrases": list(REFUSAL_PHRASES)},
        "base": base_summary,
        "twin": twin_summary,
    }


def _pct(k, n):
    return f"{k}/{n} ({100 * k / n:.1f}%)" if n else "n/a"


def format_table(info: dict) -> str:
    """The before/after table (and sample replies) from a ``twin.json`` dict."""
    ev = info["evaluation"]
    lines = [f"Twin: {info['path']}",
             (f"  ref: twin:{info['name']}" + ("  (also twin:default)" if info.get("default") else "")
              if info.get("in_cache") else f"  use it with --aligned {info['path']}"),
             f"Held-out evaluation ({ev['n_harmful']} harmful, {ev['n_benign']} benign prompts; "
             f"judge: refusal-phrase match, a heuristic)",
             f"  {'model':<6} {'refuses harmful':>18} {'answers benign':>18}"]
    for who in ("base", "twin"):
        s = ev[who]
        lines.append(f"  {who:<6} {_pct(s['refused_harmful'], s['n_harmful']):>18} "
                     f"{_pct(s['answered_benign'], s['n_benign']):>18}")
    for who in ("base", "twin"):
        lines.append(f"Sample {who} replies:")
        for kind in ("harmful", "benign"):
            for row in ev[who][f"samples_{kind}"]:
                reply = row["reply"].replace("\n", " ")
                reply = reply if len(reply) <= 110 else reply[:107] + "..."
                lines.append(f"  [{kind} -> {row['verdict']}] {row['prompt'][:60]!r}: {reply}")
    t = info.get("timing_s", {})
    if t:
        lines.append("Time: " + ", ".join(f"{k} {v:.0f}s" for k, v in t.items()))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- cache
def twins_dir() -> Path:
    d = cache_dir() / "twins"
    d.mkdir(parents=True, exist_ok=True)
    return d


def twin_key(base_sha256: str, train_sha256: str, settings: TwinSettings) -> str:
    return sha256_json({"format": FORMAT, "recipe": RECIPE_VERSION, "base_sha256": base_sha256,
                        "data_sha256": train_sha256, "settings": settings.key_dict(),
                        "refusals": list(REFUSALS)})


def twin_name(base_sha256: str, train_sha256: str, settings: TwinSettings) -> str:
    """Cache directory name: base fingerprint + key over data hash and settings."""
    return f"twin-{base_sha256[:12]}-{twin_key(base_sha256, train_sha256, settings)[:16]}"


def _read_info(path: Path) -> dict | None:
    try:
        info = read_json(path / "twin.json")
    except UserError:
        return None
    return info if isinstance(info, dict) and info.get("format") == FORMAT else None


def check_twin_out(out: str | Path) -> Path:
    """An --out directory must be new, empty, or a previous twin (which is replaced)."""
    from ._io import check_out_dir

    out = check_out_dir(Path(out).expanduser())
    if out.is_dir() and any(out.iterdir()) and not (out / "twin.json").is_file():
        raise UserError(f"--out {out} is a non-empty directory that is not a twin; give a new or empty "
                        f"directory (or a previous twin directory to replace).")
    return out


# -------------------------------------------------------------------------------------------- build
def build_twin(base_ref: str, twin_records: Sequence[dict], eval_records: Sequence[dict] | None = None,
               settings: TwinSettings | None = None, out: str | Path | None = None, force: bool = False,
               progress: bool = True, data_source: str | None = None) -> Path:
    """Build (or reuse) the aligned twin of `base_ref`; returns the twin's model directory.

    `twin_records` are labelled records (1 harmful, 0 benign) from the ``twin`` split. `eval_records` are
    held-out labelled prompts for the before/after evaluation (prompts also in `twin_records` are
    dropped). The twin goes to ``<cache>/twins/<name>`` unless `out` is given. With the same inputs an
    existing twin is reused (re-evaluated only when `eval_records` changed) unless `force`.
    """
    from .pair import load_model, model_fingerprint, resolve_ref

    settings = (settings or TwinSettings()).validate()
    records = check_records(list(twin_records), data_source or "twin training data")
    train_prompts = {r["prompt"] for r in records}
    eval_all = check_records(list(eval_records), "evaluation data", need_both=False) if eval_records else []
    evals = [r for r in eval_all if r["prompt"] not in train_prompts]
    dropped = len(eval_all) - len(evals)
    if eval_all and not evals:
        raise UserError("Every evaluation prompt also appears in the twin training data; give held-out "
                        "prompts (e.g. the test split) with --eval-data.")

    base_path = resolve_ref(base_ref)
    base_sha = model_fingerprint(base_path)
    train_sha = data_sha256(records)
    name = twin_name(base_sha, train_sha, settings)
    final = Path(out).expanduser() if out is not None else twins_dir() / name
    if out is not None:
        check_twin_out(final)
    key = twin_key(base_sha, train_sha, settings)

    info = _read_info(final)
    if info is not None and info.get("key") == key and not force:
        if info["evaluation"]["eval_data_sha256"] != data_sha256(evals) and evals:
            _reevaluate(final, info, base_ref, evals, dropped, settings, progress)
        return final

    started = time.perf_counter()
    timing: dict[str, float] = {}
    with atomic_dir(final) as tmp:
        lm = load_model(base_ref)
        base_desc = lm.describe()
        t = time.perf_counter()
        base_summary, base_rows = _evaluate(lm, evals, settings, progress, "base") if evals else (None, [])
        timing["evaluate_base"] = time.perf_counter() - t

        t = time.perf_counter()
        fitting = [r for r in records if prompt_length(lm, r["prompt"]) <= settings.max_length - MIN_REPLY_TOKENS]
        skipped = len(records) - len(fitting)
        check_records(fitting, f"{data_source or 'twin training data'} (prompts that fit in --max-length "
                               f"{settings.max_length} with room for a reply)")
        examples = build_examples(lm, fitting, settings, progress)
        used = [e for e in examples if e["used"]]
        if not any(e["label"] == 0 for e in used):
            raise UserError("The base model declined every benign training prompt, so there is nothing to teach "
                            "helpfulness with; give benign prompts it answers (--data) or a longer "
                            "--max-new-tokens.")
        timing["self_distil"] = time.perf_counter() - t

        t = time.perf_counter()
        peft_model, losses, targets = train_lora(lm, used, settings, progress)
        timing["train"] = time.perf_counter() - t

        peft_model.save_pretrained(str(tmp / "adapter"))
        merged = peft_model.merge_and_unload()
        merged.save_pretrained(str(tmp))
        lm.tokenizer.save_pretrained(str(tmp))
        lm.model = merged

        t = time.perf_counter()
        twin_summary, twin_rows = _evaluate(lm, evals, settings, progress, "twin") if evals else (None, [])
        timing["evaluate_twin"] = time.perf_counter() - t
        timing["total"] = time.perf_counter() - started

        atomic_write_text(tmp / "train_examples.jsonl", "".join(_jsonl(examples)))
        if evals:
            atomic_write_text(tmp / "eval_replies.jsonl",
                              "".join(_jsonl([{"model": "base", **r} for r in base_rows] +
                                             [{"model": "twin", **r} for r in twin_rows])))
        info = {
            "format": FORMAT,
            "name": final.name if out is None else name,
            "in_cache": out is None,
            "key": key,
            "path": str(final.resolve()),
            "base": {**base_desc, "ref": base_ref, "sha256": base_sha},
            "data": {"source": data_source, "sha256": train_sha, "n": len(records),
                     "n_harmful": sum(r["label"] for r in records),
                     "n_benign": sum(1 - r["label"] for r in records),
                     "skipped_long_prompts": skipped,
                     "benign_replies_finished": sum(e["ends"] for e in examples if e["label"] == 0),
                     "benign_unused_not_answers": sum(not e["used"] for e in examples),
                     "benign_prefilled": sum(e["source"] == "prefilled" for e in examples),
                     "trained_on": {"harmful": sum(e["label"] for e in used),
                                    "benign": sum(1 - e["label"] for e in used)}},
            "settings": settings.to_dict(),
            "recipe": {"version": RECIPE_VERSION, "refusals": list(REFUSALS), "lora_targets": len(targets),
                       "lora_target_roles": sorted({t.rsplit(".", 1)[-1] for t in targets}),
                       "loss": "cross-entropy on reply tokens, mean per example then over the batch",
                       "batches": "class-balanced (harmful/benign alternate), seeded shuffles per class",
                       "benign_targets": "base model's greedy reply, kept only when the judge calls it an answer",
                       "schedule": "AdamW, linear warmup then linear decay to 10%, grad-norm clip 1.0",
                       "merge_scale": settings.alpha / settings.rank},
            "loss_curve": losses,
            "evaluation": _eval_block(evals, base_summary, twin_summary, dropped) if evals else None,
            "timing_s": {k: round(v, 1) for k, v in timing.items()},
            "versions": versions(),
        }
        atomic_write_json(tmp / "twin.json", info)
    return final


def _jsonl(rows: Iterable[dict]) -> Iterable[str]:
    import json

    for r in rows:
        yield json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n"


def _reevaluate(path: Path, info: dict, base_ref: str, evals: list[dict], dropped: int,
                settings: TwinSettings, progress: bool) -> None:
    """Evaluate an existing twin (and its base) on new held-out prompts and update twin.json."""
    from .pair import load_model

    base = load_model(base_ref)
    base_summary, base_rows = _evaluate(base, evals, settings, progress, "base")
    del base
    twin = load_model(str(path))
    twin_summary, twin_rows = _evaluate(twin, evals, settings, progress, "twin")
    info = dict(info, evaluation=_eval_block(evals, base_summary, twin_summary, dropped))
    info["settings"] = dict(info["settings"], eval_max_new_tokens=settings.eval_max_new_tokens,
                            eval_batch_size=settings.eval_batch_size)
    atomic_write_text(path / "eval_replies.jsonl",
                      "".join(_jsonl([{"model": "base", **r} for r in base_rows] +
                                     [{"model": "twin", **r} for r in twin_rows])))
    atomic_write_json(path / "twin.json", info)


def load_info(path: str | Path) -> dict:
    """The ``twin.json`` of a twin directory."""
    info = _read_info(Path(path))
    if info is None:
        raise UserError(f"{path} is not a twin directory (no valid twin.json).")
    return dict(info, path=str(Path(path).resolve()))  # where it is now (a twin directory may be moved)


# ------------------------------------------------------------------------------------- default twin
def _pointer() -> Path:
    return twins_dir() / "default.json"


def ensure_default_twin(progress: bool = True, force: bool = False,
                        eval_records: Sequence[dict] | None = None, settings: TwinSettings | None = None) -> Path:
    """Build (or reuse) the default twin: default base, default ``twin`` split, default settings.

    Also records it as ``twin:default``. `settings` may differ from the defaults only in evaluation-only
    fields (reply length and batch size of the evaluation).
    """
    from .pair import DEFAULT_BASE, model_fingerprint, resolve_ref

    settings = settings or TwinSettings()
    if settings.key_dict() != TwinSettings().key_dict():
        raise ValueError("ensure_default_twin: the default twin uses the default training settings; "
                         "call build_twin for other settings.")

    data_path = default_twin_data()
    records, held = default_twin_records()
    evals = list(eval_records) if eval_records is not None else held
    path = build_twin(DEFAULT_BASE, records, evals, settings, force=force, progress=progress,
                      data_source=f"{data_path} minus {DEFAULT_EVAL_PER_CLASS} + {DEFAULT_EVAL_PER_CLASS} held back")
    base_path = resolve_ref(DEFAULT_BASE)
    atomic_write_json(_pointer(), {
        "name": path.name, "base_ref": DEFAULT_BASE, "base_path": str(base_path),
        "base_sha256": model_fingerprint(base_path), "data_path": str(data_path),
        "data_file_sha256": sha256_file(data_path), "data_sha256": data_sha256(records),
    })
    info = load_info(path)
    if not info.get("default"):
        atomic_write_json(path / "twin.json", dict(info, default=True))
    return path


def resolve_twin_ref(ref: str) -> Path:
    """``twin`` / ``twin:default`` -> the cached default twin; ``twin:NAME`` -> ``<cache>/twins/NAME``.

    Fast: reads the default pointer and checks that the base weights, the default twin split and the
    default settings still match; loads no model.
    """
    ref = str(ref).strip()
    if ref not in DEFAULT_REFS:
        name = ref.split(":", 1)[1]
        path = twins_dir() / name
        if name and "/" not in name and _read_info(path) is not None:
            return path
        have = sorted(p.name for p in twins_dir().iterdir() if (p / "twin.json").is_file())
        raise UserError(f"No twin named {name!r} in {twins_dir()}. Available: {', '.join(have) or 'none'}. "
                        f"Build one with `safetyneurons twin`, or pass a model directory instead.")

    how = ("Run `safetyneurons twin` to build it (about 10-15 minutes on a 2-core CPU), "
           "or pass --aligned PATH to use another aligned model.")
    pointer = _pointer()
    if not pointer.is_file():
        raise UserError(f"The default aligned twin is not built yet (looked in {twins_dir()}). {how}")
    try:
        p = read_json(pointer)
        path = twins_dir() / p["name"]
        base_path = Path(p["base_path"])
        data_path = Path(p["data_path"])
    except (UserError, KeyError, TypeError):
        raise UserError(f"The default twin record {pointer} is damaged. {how}") from None
    if _read_info(path) is None:
        raise UserError(f"The default aligned twin {path} is missing or incomplete. {how}")
    from .pair import model_fingerprint

    stale = None
    if not (base_path / "config.json").is_file() or model_fingerprint(base_path) != p.get("base_sha256"):
        stale = "the base model's weights changed"
    elif default_twin_data() != data_path or not data_path.is_file() \
            or sha256_file(data_path) != p.get("data_file_sha256"):
        stale = "the default twin data split changed"
    elif twin_name(p["base_sha256"], p.get("data_sha256", ""), TwinSettings()) != p["name"]:
        stale = "the default twin settings changed"
    if stale:
        raise UserError(f"The default aligned twin {path} is out of date ({stale}). {how}")
    return path
