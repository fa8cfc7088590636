"""Imports go one way: kernels <- moba_core <- train; data depends on neither (DESIGN.md layout)."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ALLOWED = {
    "kernels": set(),
    "moba_core": {"kernels"},
    "data": set(),
    "train": {"moba_core", "data", "kernels"},
}


EXEMPT: set[str] = set()
FORBIDDEN_THIRD_PARTY = {"kernels": {"hydra", "deepspeed", "transformers"}, "moba_core": {"hydra", "deepspeed"},
                         "data": {"hydra", "deepspeed"}}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_import_direction(package):
    ours = set(ALLOWED)
    for path in sorted((REPO / package).rglob("*.py")):
        if str(path.relative_to(REPO)) in EXEMPT:
            continue
        roots = imported_roots(path)
        wrong = (roots & ours) - ALLOWED[package] - {package}
        assert not wrong, f"{path.relative_to(REPO)} imports {sorted(wrong)}"
        bad = roots & FORBIDDEN_THIRD_PARTY.get(package, set())
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"
