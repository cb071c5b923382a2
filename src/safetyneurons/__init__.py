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

from safetyneurons.errors import UserError

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "Record": "data.records", "check_records": "data.records", "records_sha256": "data.records", "write_records": "data.records",
    "stratified_sample": "data.records",
    "read_records": "data.splits", "read_prompts": "data.splits", "build_splits": "data.splits", "default_splits_dir": "data.splits",
    "LoadedModel": "model.pair", "load_model": "model.pair", "load_pair": "model.pair", "resolve_ref": "model.pair",
    "greedy_generate": "model.generate", "Generation": "model.generate",
    "TwinSettings": "twin", "build_twin": "twin", "ensure_default_twin": "twin",
    "ChangeScores": "neurons.contrast",
    "NeuronSet": "neurons.selection", "select": "neurons.selection",
    "FeatureSpec": "activations.features", "pooled_features": "activations.reader", "probe_features": "probes.evaluate",
    "Store": "activations.store", "extract": "activations.store",
    "Probe": "probes.probe", "TextProbe": "probes.probe", "load_probe": "probes.probe", "evaluate_probe": "probes.evaluate",
    "CompareResult": "probes.compare", "compare_feature_sets": "probes.compare", "score_store": "probes.compare",
    "Guard": "guard.guard", "GuardResult": "guard.guard", "export_guard": "guard.guard", "export_run_guard": "guard.guard",
    "RunSettings": "pipeline", "run": "pipeline",
}

#: module aliases of the earlier flat layout that user code imports (``from safetyneurons import pair, store``)
_MODULES: dict[str, str] = {"pair": "model.pair", "contrast": "neurons.contrast", "store": "activations.store",
                            "probe": "probes.probe", "features": "activations.features", "hooks": "model.hooks"}

__all__ = ["UserError", "__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{_MODULES[name]}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_MODULES))


if TYPE_CHECKING:  # static type checkers and IDEs see the real names (noqa: the names are re-exported)
    from safetyneurons.probes.compare import CompareResult, compare_feature_sets, score_store  # noqa: F401
    from safetyneurons.neurons.contrast import ChangeScores  # noqa: F401
    from safetyneurons.data.splits import build_splits, default_splits_dir, read_prompts, read_records  # noqa: F401
    from safetyneurons.activations.features import FeatureSpec  # noqa: F401
    from safetyneurons.activations.reader import pooled_features  # noqa: F401
    from safetyneurons.probes.evaluate import evaluate_probe, probe_features  # noqa: F401
    from safetyneurons.model.generate import Generation, greedy_generate  # noqa: F401
    from safetyneurons.guard.guard import Guard, GuardResult, export_guard, export_run_guard  # noqa: F401
    from safetyneurons.neurons.selection import NeuronSet, select  # noqa: F401
    from safetyneurons.model.pair import LoadedModel, load_model, load_pair, resolve_ref  # noqa: F401
    from safetyneurons.pipeline import RunSettings, run  # noqa: F401
    from safetyneurons.probes.probe import Probe, TextProbe, load_probe  # noqa: F401
    from safetyneurons.data.records import Record, check_records, records_sha256, stratified_sample, write_records  # noqa: F401
    from safetyneurons.activations.store import Store, extract  # noqa: F401
    from safetyneurons.twin import TwinSettings, build_twin, ensure_default_twin  # noqa: F401
