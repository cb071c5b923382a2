"""The package's import graph has no cycle: no module imports (at any depth, at module level, inside a
function or under ``if TYPE_CHECKING:``) a module that imports it back. Importing ``a.b.c`` counts as importing
the packages ``a.b`` too."""

from __future__ import annotations

import ast
from pathlib import Path

import safetyneurons

ROOT = Path(safetyneurons.__file__).parent
PKG = "safetyneurons"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}




def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules ``name`` imports (with their parent packages)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            if t in known:
                parts = t.split(".")
                out.update(".".join(parts[:k]) for k in range(2, len(parts) + 1))
    out.discard(name)
    return {m for m in out if m in known and not name.startswith(m + ".")}


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _cycle_from(graph: dict[str, set[str]], start: str) -> list[str] | None:
    stack, seen = [(start, [start])], set()
    while stack:
        node, trail = stack.pop()
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                return trail + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, trail + [nxt]))
    return None


def test_graph_sees_the_package():
    graph = import_graph()
    assert {"safetyneurons.model.pair", "safetyneurons.model.twin_cache", "safetyneurons.twin.build"} <= set(graph)
    assert "safetyneurons.model.twin_cache" in graph["safetyneurons.model.pair"]  # twin: refs resolve through the leaf
    assert "safetyneurons.model.pair" in graph["safetyneurons.twin.build"]


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycle_from({"a": {"b"}, "b": {"c"}, "c": {"a"}}, "a") == ["a", "b", "c", "a"]
    assert _cycle_from({"a": {"b"}, "b": set()}, "a") is None


def test_no_import_cycles():
    graph = import_graph()
    cycles = [c for m in sorted(graph) if (c := _cycle_from(graph, m))]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_public_api_resolves_and_import_stays_light():
    """Every name the package exports resolves to its module's object; importing the package loads no torch."""
    import subprocess
    import sys

    code = ("import sys, safetyneurons as s; light = 'torch' not in sys.modules; "
            "missing = [n for n in s.__all__ if not hasattr(s, n)]; "
            "from safetyneurons.activations.features import FeatureSpec; "
            "print(light, missing, s.FeatureSpec is FeatureSpec)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "[]", "True"]
