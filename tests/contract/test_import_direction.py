"""Import direction between the packages: the architecture, enforced.

* The components (``actors``, ``learner``, ``replay``, ``plasticity``) never import ``evergreen``,
  the system around them.
* ``plasticity`` imports only torch, numpy, the standard library and itself: interventions and
  diagnostics stay pure PyTorch.
* ``replay`` imports none of the other components: the replay service runs on its own.

Only absolute imports can cross packages, so the check parses every module of a package and looks
at the first name of each ``import x`` / ``from x import ...``, function-local imports included.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = ("actors", "learner", "replay", "plasticity")
PROJECT = (*COMPONENTS, "evergreen")
STDLIB = set(sys.stdlib_module_names) | {"__future__"}

#: package -> (forbidden project packages, allowed third-party packages or None for any)
RULES = {
    "actors": ({"evergreen"}, None),
    "learner": ({"evergreen"}, None),
    "replay": ({"evergreen", "actors", "learner", "plasticity"}, None),
    "plasticity": ({"evergreen", "actors", "learner", "replay"}, {"torch", "numpy"}),
}


def imported_packages(source: str, filename: str = "<module>") -> set[str]:
    """First names of every absolute import in ``source``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def violations(package: str, imported: set[str]) -> set[str]:
    forbidden, third_party = RULES[package]
    bad = imported & forbidden
    if third_party is not None:
        bad |= {n for n in imported if n not in STDLIB and n not in PROJECT and n not in third_party}
    return bad


MODULES = [(pkg, path) for pkg in COMPONENTS for path in sorted((ROOT / pkg).rglob("*.py"))
           if "_pb2" not in path.name]


@pytest.mark.parametrize(("package", "path"), MODULES, ids=[str(p.relative_to(ROOT)) for _, p in MODULES])
def test_component_imports_follow_the_architecture(package, path):
    bad = violations(package, imported_packages(path.read_text(), str(path)))
    assert bad == set(), f"{path.relative_to(ROOT)} imports {sorted(bad)}, which {package}/ must not"


def test_the_checker_catches_each_kind_of_violation():
    assert violations("actors", imported_packages("from evergreen.config import RunConfig")) == {"evergreen"}
    assert violations("replay", imported_packages("def f():\n    import learner.dqn\n")) == {"learner"}
    assert violations("plasticity", imported_packages("import ray\nimport torch\nimport os")) == {"ray"}
    assert violations("learner", imported_packages("from . import core\nimport replay.errors")) == set()
