"""`data/` imports only its allowed dependencies (never hydra, deepspeed, moba_core, train, kernels)."""

import ast
import sys
from pathlib import Path

import pytest

# omegaconf: the typed settings of python -m data.prepare (Hydra's config library, without Hydra);
# matplotlib: its length histogram (imported inside plot_lengths only)
ALLOWED = {"datasets", "numpy", "torch", "sentencepiece", "transformers", "tqdm", "omegaconf", "matplotlib"}
DATA_DIR = Path(__file__).resolve().parents[2] / "data"


@pytest.mark.parametrize("path", [pytest.param(p, id=p.name) for p in sorted(DATA_DIR.glob("*.py"))])
def test_imports_are_allowed(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules = [node.module]
        else:
            continue
        for module in modules:
            top = module.split(".")[0]
            assert top in ALLOWED or top in sys.stdlib_module_names, f"{path.name} imports {module}"
