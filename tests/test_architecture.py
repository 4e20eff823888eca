"""Imports run one way, as the README's architecture section says: every import between the package's parts (at
module level or inside a function) goes from a higher layer to a lower one."""
from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "vars_ode"

#: the layers, lowest first; a part imports only from parts of lower layers (a subpackage's modules import each other
#: freely). A new module must be placed here.
LAYERS = (
    ("_validation", "_workspace", "sync"),
    ("ops",),
    ("lasso",),
    ("dynamics", "gradients", "dictionaries"),
    ("solvers",),
    ("triton_gram",),
    ("fused",),
    ("layer",),
    ("official",),
    ("models",),
    ("robustness", "plot"),
    ("__init__",),  # the package's names
    ("demo",),  # python -m vars_ode
    ("__main__",),
)
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def part_of(path: pathlib.Path) -> str:
    """The top-level part of the package that a file belongs to (``solvers`` for ``solvers/ode.py``)."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_parts(path: pathlib.Path) -> set[str]:
    """The package's parts that ``path`` imports, relative or absolute, wherever the import statement stands."""
    rel = path.relative_to(PACKAGE)
    package = ["vars_ode", *rel.parts[:-1]]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                module = base + (node.module.split(".") if node.module else [])
            else:
                module = (node.module or "").split(".")
            if module[0] != "vars_ode":
                continue
            if len(module) > 1:
                found.add(module[1])
            else:  # "from vars_ode import x" / "from . import x" at the top: x is a part or a name of __init__
                found.update(a.name if a.name in RANK else "__init__" for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "vars_ode":
                    found.add(parts[1] if len(parts) > 1 else "__init__")
    return found


FILES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_part_has_a_layer():
    missing = sorted({part_of(p) for p in FILES} - set(RANK))
    assert not missing, f"place these parts of vars_ode in tests/test_architecture.py's LAYERS: {missing}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way(path):
    me = part_of(path)
    upward = sorted(other for other in imported_parts(path) - {me} if RANK[other] >= RANK[me])
    assert not upward, f"vars_ode/{path.relative_to(PACKAGE)} ({me}, layer {RANK[me]}) imports {upward}, of layers " \
                       f"{[RANK[o] for o in upward]}: imports run from higher layers to lower ones only"


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    # the parser finds relative, absolute and function-level imports (a check that finds nothing passes anything)
    fake = PACKAGE / "ops.py"
    text = "def f():\n    from .layer import VARSLayer\n    import vars_ode.fused\nfrom . import lasso\n"
    monkeypatch.setattr(pathlib.Path, "read_text", lambda self, *a, **k: text if self == fake else "")
    assert imported_parts(fake) == {"layer", "fused", "lasso"}
