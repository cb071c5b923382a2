"""The guard: a probe on the safety neurons that scores prompts, and guarded generation in the serving model.

``safetyneurons.guard`` re-exports the API of :mod:`safetyneurons.guard.guard`.
"""

from safetyneurons.guard.guard import Guard, GuardResult, export_guard, export_run_guard, read_guard_meta

__all__ = ["Guard", "GuardResult", "export_guard", "export_run_guard", "read_guard_meta"]
