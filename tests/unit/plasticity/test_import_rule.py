"""plasticity/ imports only torch, numpy, the standard library and itself (no learner/actors/replay/evergreen)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[3] / "plasticity"
ALLOWED_THIRD_PARTY = {"torch", "numpy"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_imports_only_torch_numpy_stdlib_and_plasticity(path):
    foreign = {name for name in _imports(path)
               if name not in ALLOWED_THIRD_PARTY | {"plasticity", "__future__"} and name not in sys.stdlib_module_names}
    assert foreign == set(), f"{path.relative_to(PACKAGE.parent)} imports {sorted(foreign)}"
