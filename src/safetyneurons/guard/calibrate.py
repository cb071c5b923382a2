"""The guard's thresholds, set on the validation split the way the guard scores (windows included).

A guard scores an input by its most unsafe piece (the whole message, its 32-token windows and its sentences, see
:mod:`safetyneurons.activations.reader`), so a threshold set on whole-prompt store features would let the
false-positive rate drift up on long benign prompts. :func:`calibrate_guard` reads the validation prompts through
the guard's own reader and sets one threshold per **operating point**:

- ``strict`` (the default): flags more; the lowest threshold whose false-positive rate on the validation split's
  benign prompts (hard negatives included) is at most 5%;
- ``loose``: fewer false positives; at most 1%.

A caller may ask for a point that flags at least as much as the operator's (``strict`` when the server runs
``loose``), never for a looser one (:func:`check_operating_point`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from safetyneurons.activations.features import FeatureSpec
from safetyneurons.activations.reader import GUARD_READING, ActivationReader, max_per_input, reading_options
from safetyneurons.checks import check_piece_margin
from safetyneurons.data.datasets import REGISTRY
from safetyneurons.data.validation import calibration_figures, threshold_for_fpr
from safetyneurons.errors import UserError
from safetyneurons.guard.words import piece_probability

if TYPE_CHECKING:
    from safetyneurons.guard.words import Words
    from safetyneurons.model.pair import LoadedModel
    from safetyneurons.probes.probe import Probe

#: operating point -> its target false-positive rate on the validation split's benign prompts
OPERATING_POINTS: dict[str, float] = {"strict": 0.05, "loose": 0.01}
DEFAULT_POINT = "strict"


def check_operating_point(asked: str | None, served: str = DEFAULT_POINT, thresholds: Mapping[str, float] | None = None
                          ) -> str:
    """The operating point a caller gets: ``served`` when ``asked`` is None; ``asked`` when it flags at least as
    much as ``served`` (its threshold is not higher); a UserError naming the choices otherwise."""
    if asked is None:
        return served
    known = dict(thresholds or {})
    if asked not in known:
        raise UserError(f"Unknown operating point {asked!r}; this guard has: {', '.join(sorted(known)) or 'none'}.")
    if known[asked] > known[served]:
        raise UserError(f"Operating point {asked!r} is looser than the server's {served!r}; a caller may only make "
                        f"the guard stricter.")
    return asked


def guard_validation_scores(lm: LoadedModel, spec: FeatureSpec, probe: Probe, prompts: Sequence[str],
                            batch_size: int = 16, progress: bool = False,
                            reading: Mapping | None = None, words: Words | None = None,
                            piece_margin: float = 0.0) -> np.ndarray:
    """Unsafe probability of each validation prompt as the guard scores it (its most unsafe piece, with
    ``words`` its text too, a piece that is not a whole message less ``piece_margin``), read as ``reading`` says
    (default :data:`~safetyneurons.activations.reader.GUARD_READING`, how guards read)."""
    reader = ActivationReader(lm, spec, batch_size=batch_size,
                              **reading_options(GUARD_READING if reading is None else reading))
    pieces = reader.pieces(list(prompts))
    X, owner = reader.read_pieces(pieces, progress=progress)
    texts = reader.piece_texts(pieces) if words is not None else None
    p = piece_probability(probe, words, X, texts, [q.whole for q in pieces], piece_margin)
    return max_per_input(p, owner, len(prompts))


def calibrate_guard(lm: LoadedModel, spec: FeatureSpec, probe: Probe, val_records: Sequence[dict],
                    points: Mapping[str, float] = OPERATING_POINTS, batch_size: int = 16,
                    progress: bool = False, words: Words | None = None, piece_margin: float = 0.0,
                    reading: Mapping | None = None) -> dict:
    """Thresholds of every operating point on the validation records, read as the guard reads them (``reading``,
    default :data:`~safetyneurons.activations.reader.GUARD_READING`; with ``piece_margin``,
    :func:`~safetyneurons.guard.words.piece_probability`).

    Returns ``{"scoring", "reading", "default": DEFAULT_POINT, "operating_points": {point: calibration figures}}``
    (and ``"piece_margin"`` when it is not 0) for guard.json; :func:`guard_probe` gives the probe with the default
    point's threshold."""
    if DEFAULT_POINT not in points:
        raise UserError(f"The operating points must include {DEFAULT_POINT!r}.")
    y = np.asarray([int(r["label"]) for r in val_records], dtype=np.int64)
    sources = [str(r.get("source", "")) for r in val_records]
    piece_margin = check_piece_margin(piece_margin)
    reading = dict(GUARD_READING if reading is None else reading)
    proba = guard_validation_scores(lm, spec, probe, [r["prompt"] for r in val_records], batch_size, progress,
                                    reading=reading, words=words, piece_margin=piece_margin)
    hard = sorted({s for s in sources if s in REGISTRY and REGISTRY[s].hard_negative})
    figures = {}
    for name, fpr in points.items():
        t = threshold_for_fpr(y, proba, fpr)
        figures[name] = calibration_figures(y, proba, sources, t, fpr, hard)
    scoring = "the guard's own: each prompt's most unsafe piece (whole, 32-token windows, sentences)"
    scoring += "; each piece by its neurons and its words" if words is not None else ""
    scoring += f"; a window or sentence less a margin of {piece_margin:g} in the logit" if piece_margin else ""
    margin = {"piece_margin": piece_margin} if piece_margin else {}
    return {"scoring": scoring, "reading": reading, **margin, "default": DEFAULT_POINT,
            "operating_points": figures}


def guard_probe(probe: Probe, calibration: dict) -> Probe:
    """A copy of ``probe`` whose threshold is the default operating point's of ``calibration``."""
    import copy

    out = copy.deepcopy(probe)
    fig = calibration["operating_points"][calibration["default"]]
    out.threshold = float(fig["threshold"])
    out.threshold_rule = (f"operating point {calibration['default']!r}: false-positive rate <= {fig['target_fpr']:g} "
                          f"on the {fig['validation']['n_benign']} benign prompts of the validation split, scored as "
                          f"the guard scores (most unsafe piece)")
    return out
