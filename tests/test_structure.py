"""The package's shape stays small enough to read: no module over 500 lines, no function over 80 lines, no
private name (leading underscore) imported from another module. (Import cycles: tests/test_imports.py.)"""

from __future__ import annotations

import ast
from pathlib import Path

import safetyneurons

ROOT = Path(safetyneurons.__file__).parent
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _modules():
    return sorted(ROOT.rglob("*.py"))


def _name(p: Path) -> str:
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else p.name


def long_modules(paths, limit: int = MAX_MODULE_LINES) -> list[str]:
    return [f"{_name(p)}: {n} lines" for p in paths
            if (n := p.read_text(encoding="utf-8").count("\n")) > limit]


def long_functions(paths, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    out = []
    for p in paths:
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    out.append(f"{_name(p)}:{node.lineno} {node.name}: {n} lines")
    return out


def private_imports(paths) -> list[str]:
    out = []
    for p in paths:
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("safetyneurons")):
                bad = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if bad:
                    out.append(f"{_name(p)}:{node.lineno} imports {', '.join(bad)} from {node.module}")
    return out


def test_the_checks_find_planted_violations(tmp_path):
    big = tmp_path / "big.py"
    big.write_text("def f():\n" + "    x = 1\n" * 90 + "\nfrom safetyneurons.model.hooks import _secret, EarlyExit\n"
                   + "\n" * 420)
    small = tmp_path / "small.py"
    small.write_text("from safetyneurons import __version__\n\n\ndef g():\n    return 1\n")
    assert long_modules([big]) == ["big.py: 513 lines"] and long_modules([small]) == []
    assert long_functions([big]) == ["big.py:1 f: 91 lines"] and long_functions([small]) == []
    assert private_imports([big]) == ["big.py:93 imports _secret from safetyneurons.model.hooks"]
    assert private_imports([small]) == []


def test_no_module_over_500_lines():
    assert not long_modules(_modules()), long_modules(_modules())


def test_no_function_over_80_lines():
    assert not long_functions(_modules()), long_functions(_modules())


def test_no_private_name_is_imported_from_another_module():
    assert not private_imports(_modules()), private_imports(_modules())
