"""The import graph, read statically: each layer imports only the layers before it, and nothing imports in a circle.

    payload      hf_memlm/*.py (flat): config, model, memory kinds, state; copied next to saved weights, so
                 it imports only torch, transformers, safetensors and its flat siblings (single-dot imports)
    library      data/, training/, evaluation/, integrations/: may import the payload and each other (no circle
                 between them)
    root         hf_memlm/__init__.py, the public names: registers the Auto classes; imports the payload and
                 `integrations.lora` (`lora_target_modules`), so the library imports payload modules, not the root
    recipes      recipes/: turns a config in into a run; may import the payload, the library and the root
    cli          cli/ and __main__.py: argument parsing and printing; may import everything

Every import counts, the ones inside functions too: a lazy import still makes the two modules depend on
each other, it only hides the circle until run time. See docs/architecture.md.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_memlm"
LAYERS = {
    "payload": 0,
    "data": 1,
    "training": 1,
    "evaluation": 1,
    "integrations": 1,
    "root": 2,
    "recipes": 3,
    "cli": 4,
}
LIBRARY = [name for name, rank in LAYERS.items() if rank == 1]
# what the package root imports beyond the payload (the public `hf_memlm.lora_target_modules`)
ROOT_MAY_IMPORT = {"hf_memlm.integrations.lora"}
PAYLOAD_MAY_IMPORT = {"torch", "transformers", "safetensors", "__future__"}
# optional accelerators the payload imports lazily, falling back without them (checked below)
PAYLOAD_OPTIONAL = {"faiss"}
STDLIB = set(sys.stdlib_module_names)


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = [package.name, *path.relative_to(package).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Module name -> file, for every module and sub-package of `package`."""
    return {module_name(path, package): path for path in sorted(package.rglob("*.py"))}


def imported_modules(path: Path, package: Path = PACKAGE) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in the file, at any depth (inside functions too), relative
    ones resolved. `from P import n` names the module `P.n` when `n` is a module of the package, else `P`."""
    modules = package_modules(package)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    own = module_name(path, package).split(".")
    package_parts = own if path.name == "__init__.py" else own[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module
            submodules = [f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in modules]
            found.extend((name, node.lineno) for name in submodules)
            if len(submodules) < len(node.names):
                found.append((module, node.lineno))
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, dict[str, int]]:
    """module -> {module of the package it imports: line}. Only what a module names counts: the packages above
    it, which Python initialises first anyway, are edges only when imported by name."""
    modules = package_modules(package)
    graph = {}
    for name, path in modules.items():
        edges = {}
        for module, line in imported_modules(path, package):
            if module in modules and module != name:
                edges.setdefault(module, line)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int] | set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def describe(component: list[str], graph: dict[str, dict[str, int]]) -> str:
    edges = [
        f"{source} imports {target} (line {line})"
        for source in component
        for target, line in graph[source].items()
        if target in component
    ]
    return "; ".join(edges)


def layer_of(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    if relative.parts == ("__init__.py",):
        return "root"
    if relative.parts == ("__main__.py",):
        return "cli"
    return "payload" if len(relative.parts) == 1 else relative.parts[0]


def target_layer(module: str) -> str:
    """The layer of an hf_memlm module."""
    parts = module.split(".")
    if parts == ["hf_memlm"]:
        return "root"
    if parts[1] == "__main__":
        return "cli"
    if parts[1] in LAYERS:
        return parts[1]
    return "payload"


SOURCES = sorted(PACKAGE.rglob("*.py"))


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
        if layer == "root":
            assert target == "payload" or module in ROOT_MAY_IMPORT, (
                f"__init__.py:{line} imports {module}: the package root imports the payload and "
                f"{', '.join(sorted(ROOT_MAY_IMPORT))} only"
            )
        assert LAYERS[target] <= LAYERS[layer], (
            f"{path.relative_to(PACKAGE)}:{line} imports {module}: the {layer} layer may not import the {target} "
            "layer"
            + (" (import the payload module, e.g. hf_memlm.modeling_memlm, instead)" if target == "root" else "")
        )


def test_no_module_imports_itself_in_a_circle():
    """Within a layer too, and counting imports inside functions."""
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles: " + " | ".join(describe(component, graph) for component in found)


def test_the_library_sub_packages_import_each_other_in_one_direction():
    graph = import_graph()
    between = {name: set() for name in LIBRARY}
    for source, targets in graph.items():
        for target in targets:
            source_layer, target_layer_ = target_layer(source), target_layer(target)
            if source_layer in between and target_layer_ in between and source_layer != target_layer_:
                between[source_layer].add(target_layer_)
    assert not cycles(between), f"the library sub-packages import each other in a circle: {between}"


def test_the_cycle_check_sees_imports_inside_functions(tmp_path):
    """A circle hidden by a function-level import, in a throwaway package, is found."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from .a import f\n")
    (package / "sub" / "a.py").write_text("from .b import g\n\ndef f():\n    return g()\n")
    (package / "sub" / "b.py").write_text("def g():\n    from pkg.sub import a\n\n    return a\n")
    (package / "c.py").write_text("def h():\n    from .sub import b\n")
    graph = import_graph(package)
    assert graph["pkg.sub.b"] == {"pkg.sub.a": 2} and graph["pkg.c"] == {"pkg.sub.b": 2}
    assert cycles(graph) == [["pkg.sub.a", "pkg.sub.b"]]
    (package / "sub" / "b.py").write_text("def g():\n    return 1\n")
    assert cycles(import_graph(package)) == []


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


DRAWING_START, DRAWING_END = "<!-- house drawing: begin -->", "<!-- house drawing: end -->"
ARCHITECTURE_PAGE = PACKAGE.parent / "docs" / "architecture.md"


def house_drawing() -> str:
    """The parts of the package and which imports which, drawn from the import graph (Mermaid): what
    docs/architecture.md shows between its drawing markers."""
    graph = import_graph()
    edges = set()
    for source, targets in graph.items():
        for target in targets:
            above, below = target_layer(source), target_layer(target)
            if above != below:
                edges.add((above, below))
    order = sorted(LAYERS, key=lambda name: (-LAYERS[name], name))
    lines = ["```mermaid", "flowchart TD"]
    lines += [f"    {a} --> {b}" for a in order for b in order if (a, b) in edges]
    return "\n".join([*lines, "```"])


def test_the_house_drawing_in_the_docs_is_the_import_graph_and_has_no_cycle():
    """docs/architecture.md draws the parts and their imports; the drawing must be the code's (regenerate it with
    `python tests/test_architecture.py`), and every arrow points down: no part imports one that imports it."""
    drawing = house_drawing()
    edges = {}
    for line in drawing.splitlines()[2:-1]:
        above, below = line.split(" --> ")
        edges.setdefault(above.strip(), set()).add(below.strip())
    assert not cycles(edges), drawing
    page = ARCHITECTURE_PAGE.read_text(encoding="utf-8")
    shown = page.split(DRAWING_START, 1)[1].split(DRAWING_END, 1)[0].strip()
    assert shown == drawing, "docs/architecture.md's drawing is out of date: run `python tests/test_architecture.py`"


if __name__ == "__main__":  # rewrite the drawing in docs/architecture.md from the import graph
    page = ARCHITECTURE_PAGE.read_text(encoding="utf-8")
    head, rest = page.split(DRAWING_START, 1)
    ARCHITECTURE_PAGE.write_text(
        f"{head}{DRAWING_START}\n{house_drawing()}\n{DRAWING_END}{rest.split(DRAWING_END, 1)[1]}", encoding="utf-8"
    )


def test_every_payload_file_is_in_the_reading_guide():
    """docs/architecture.md, "Reading the payload", lists each payload file once, so a newcomer has an order to read
    them in and a new file has to find its place there."""
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    guide = text.split("## Reading the payload", 1)[1].split("\n## ", 1)[0]
    listed = [line.split("`")[1] for line in guide.splitlines() if line.startswith("| ") and line.count("`") >= 2]
    payload = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert sorted(listed) == payload
