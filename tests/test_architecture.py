"""The import graph, read statically: each layer imports only the layers before it.

    payload      hf_memlm/*.py (flat): config, model, memory kinds, state; copied next to saved weights, so
                 it imports only torch, transformers, safetensors and its flat siblings (single-dot imports)
    library      data/, training/, evaluation/: may import the payload and each other
    recipes      recipes/: turns a config into a run; may import the payload and the library
    cli          cli/: argument parsing and printing; may import everything

See docs/architecture.md.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_memlm"
LAYERS = {"payload": 0, "data": 1, "training": 1, "evaluation": 1, "integrations": 1, "recipes": 2, "cli": 3}
PAYLOAD_MAY_IMPORT = {"torch", "transformers", "safetensors", "__future__"}
# optional accelerators the payload imports lazily, falling back without them (checked below)
PAYLOAD_OPTIONAL = {"faiss"}
STDLIB = set(sys.stdlib_module_names)


def layer_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return "payload" if len(relative.parts) == 1 else relative.parts[0]


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package_parts = ["hf_memlm", *path.relative_to(PACKAGE).parts[:-1]]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
                if node.module is None:  # `from . import x`: x is a module of that package
                    found.extend((f"{module}.{alias.name}", node.lineno) for alias in node.names)
                    continue
            else:
                module = node.module
            found.append((module, node.lineno))
    return found


def target_layer(module: str) -> str | None:
    """The layer of an hf_memlm module; None for the package root (`import hf_memlm`)."""
    parts = module.split(".")
    if parts == ["hf_memlm"]:
        return None
    if parts[1] in LAYERS:
        return parts[1]
    return "payload"


SOURCES = sorted(
    p for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py") or p.parent != PACKAGE
)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_layer_imports_only_the_layers_before_it(path):
    layer = layer_of(path)
    assert layer in LAYERS, f"{path}: a new sub-package must be given a layer in tests/test_architecture.py"
    for module, line in imported_modules(path):
        top = module.split(".")[0]
        if layer == "payload":
            assert top in PAYLOAD_MAY_IMPORT | PAYLOAD_OPTIONAL | STDLIB or module.startswith("hf_memlm."), (
                f"{path.name}:{line} imports {module}: the payload may import only torch, transformers, safetensors"
            )
            if module.startswith("hf_memlm."):
                assert target_layer(module) == "payload", f"{path.name}:{line} imports {module} from the library"
            continue
        if top != "hf_memlm":
            continue
        target = target_layer(module)
        if target is None:  # the package root registers the Auto classes; it imports only the payload
            continue
        assert LAYERS[target] <= LAYERS[layer], (
            f"{path.relative_to(PACKAGE)}:{line} imports {module}: the {layer} layer may not import the {target} layer"
        )


def test_payload_uses_single_dot_relative_imports_only():
    """Flat files copied next to the weights cannot reach a sub-package or use `hf_memlm.` absolutely."""
    for path in PACKAGE.glob("*.py"):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level > 1 or (node.module or "").startswith("hf_memlm")):
                pytest.fail(f"{path.name}:{node.lineno}: payload files import siblings with `from .name import ...`")


def test_the_package_root_does_not_import_the_command_line():
    modules = [module for module, _ in imported_modules(PACKAGE / "__init__.py")]
    assert not [m for m in modules if m.startswith("hf_memlm.cli") or m.startswith("hf_memlm.recipes")]


def test_optional_payload_imports_are_lazy_and_guarded():
    """A saved model must load where the optional package is missing: its import sits inside a function,
    in a `try` that catches ImportError."""
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        guarded = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers
            ):
                guarded |= {id(inner) for inner in ast.walk(node)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(name.split(".")[0] in PAYLOAD_OPTIONAL for name in names):
                    assert node.col_offset > 0 and id(node) in guarded, (
                        f"{path.name}:{node.lineno}: import optional packages inside a function, in a try/except ImportError"
                    )
