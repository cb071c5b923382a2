"""safetyneurons: find safety neurons by inference-time activation contrasting, probe them, ship a guard.

Pipeline, one module per concept (see docs/architecture.md):
data -> pair -> contrast -> neurons -> features/store -> probe/compare -> guard -> server, with records, generate
and twin beside them.

The main types and functions are importable from here; each is loaded from its module on first use, so
``import safetyneurons`` (and the CLI's ``--help``) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import UserError

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "Record": "records", "check_records": "records", "records_sha256": "records", "write_records": "records",
    "stratified_sample": "records",
    "read_records": "data", "read_prompts": "data", "build_splits": "data", "default_splits_dir": "data",
    "LoadedModel": "pair", "load_model": "pair", "load_pair": "pair", "resolve_ref": "pair",
    "greedy_generate": "generate", "Generation": "generate",
    "TwinSettings": "twin", "build_twin": "twin", "ensure_default_twin": "twin",
    "ChangeScores": "contrast",
    "NeuronSet": "neurons", "select": "neurons",
    "FeatureSpec": "features", "pooled_features": "features", "probe_features": "features",
    "Store": "store", "extract": "store",
    "Probe": "probe", "TextProbe": "probe", "load_probe": "probe", "evaluate_probe": "probe",
    "CompareResult": "compare", "compare_feature_sets": "compare", "score_store": "compare",
    "Guard": "guard", "GuardResult": "guard", "export_guard": "guard", "export_run_guard": "guard",
    "RunSettings": "pipeline", "run": "pipeline",
}

__all__ = ["UserError", "__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # static type checkers and IDEs see the real names (noqa: the names are re-exported)
    from .compare import CompareResult, compare_feature_sets, score_store  # noqa: F401
    from .contrast import ChangeScores  # noqa: F401
    from .data import build_splits, default_splits_dir, read_prompts, read_records  # noqa: F401
    from .features import FeatureSpec, pooled_features, probe_features  # noqa: F401
    from .generate import Generation, greedy_generate  # noqa: F401
    from .guard import Guard, GuardResult, export_guard, export_run_guard  # noqa: F401
    from .neurons import NeuronSet, select  # noqa: F401
    from .pair import LoadedModel, load_model, load_pair, resolve_ref  # noqa: F401
    from .pipeline import RunSettings, run  # noqa: F401
    from .probe import Probe, TextProbe, evaluate_probe, load_probe  # noqa: F401
    from .records import Record, check_records, records_sha256, stratified_sample, write_records  # noqa: F401
    from .store import Store, extract  # noqa: F401
    from .twin import TwinSettings, build_twin, ensure_default_twin  # noqa: F401
