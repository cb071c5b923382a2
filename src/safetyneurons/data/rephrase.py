"""Rewrite a prompt by rule, keeping what it asks: the rephrasing-stability check of the guard.

Each rule takes a prompt and returns its rewrite, or None when the rule does not apply to it (a rule never
returns the prompt unchanged). A guard whose verdict changes under these rewrites reads the wording, not the
request. The rules:

- ``question_imperative``: "How do I X?" / "How can I X?" / "How to X?" / "Can you X?" become "Tell me how to X." /
  "X."; an imperative ("Write X.") becomes a question ("Can you write X?");
- ``do_can``: "do I/you/we" <-> "can I/you/we" (the first one; "Do you" <-> "Can you" at the start);
- ``polite_prefix`` / ``polite_suffix``: "Please help me with this: X" / "X Thank you so much!";
- ``tense``: "How do/can I X?" -> "How did people X in the past?"; otherwise the first "is"/"are" -> "was"/"were";
- ``typo``: two neighbouring letters of the longest word swapped (a deterministic typo).
"""

from __future__ import annotations

import re
from typing import Callable

_HOW = re.compile(r"^\s*how (?:do|can|could|would|should) (?:i|you|we|one|someone) (.+?)[?.!]*\s*$", re.I)
_HOW_TO = re.compile(r"^\s*how to (.+?)[?.!]*\s*$", re.I)
_CAN_YOU = re.compile(r"^\s*(?:can|could|would|will) you(?: please)? (.+?)[?.!]*\s*$", re.I)
_IMPERATIVE = ("write", "explain", "tell", "give", "create", "describe", "list", "provide", "make", "generate",
               "develop", "design", "show", "teach", "find", "help", "outline", "draft", "suggest", "compose")
_DO_CAN = re.compile(r"\b(do|can)( (?:i|you|we|they|people))\b", re.I)
_BE = re.compile(r"\b(is|are)\b")


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


def _upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def question_imperative(prompt: str) -> str | None:
    for pattern, lead in ((_HOW, "Tell me how to "), (_HOW_TO, "Tell me how to "), (_CAN_YOU, "")):
        m = pattern.match(prompt)
        if m:
            rest = m.group(1).strip()
            return f"{lead}{rest}." if lead else f"{_upper_first(rest)}."
    words = prompt.split()
    if words and words[0].lower().strip(",:") in _IMPERATIVE:
        body = prompt.strip().rstrip(".!?")
        return f"Can you {_lower_first(body)}?"
    return None


def do_can(prompt: str) -> str | None:
    m = _DO_CAN.search(prompt)
    if not m:
        return None
    word = m.group(1)
    swap = {"do": "can", "can": "do"}[word.lower()]
    swap = swap.capitalize() if word[0].isupper() else swap
    return prompt[:m.start(1)] + swap + prompt[m.end(1):]


def polite_prefix(prompt: str) -> str | None:
    return f"Please help me with this: {prompt.strip()}"


def polite_suffix(prompt: str) -> str | None:
    return f"{prompt.strip()} Thank you so much!"


def tense(prompt: str) -> str | None:
    m = _HOW.match(prompt)
    if m:
        return f"How did people {m.group(1).strip()} in the past?"
    m = _BE.search(prompt)
    if not m:
        return None
    return prompt[:m.start()] + {"is": "was", "are": "were"}[m.group(1)] + prompt[m.end():]


def typo(prompt: str) -> str | None:
    words = list(re.finditer(r"[A-Za-z]{4,}", prompt))
    if not words:
        return None
    w = max(words, key=lambda m: (len(m.group()), -m.start()))
    k = w.start() + len(w.group()) // 2 - 1
    if prompt[k] == prompt[k + 1]:
        k -= 1
    if prompt[k] == prompt[k + 1]:
        return None
    return prompt[:k] + prompt[k + 1] + prompt[k] + prompt[k + 2:]


RULES: dict[str, Callable[[str], str | None]] = {
    "question_imperative": question_imperative, "do_can": do_can, "polite_prefix": polite_prefix,
    "polite_suffix": polite_suffix, "tense": tense, "typo": typo}


def rephrasings(prompt: str) -> dict[str, str]:
    """``{rule: rewrite}`` for every rule that applies to ``prompt`` and changes it."""
    out = {}
    for name, rule in RULES.items():
        text = rule(prompt)
        if text is not None and text.strip() and text != prompt:
            out[name] = text
    return out
