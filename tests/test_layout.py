"""The package's layering: imports run one way, with no cycle, and the engine knows no
inversion method and no pipeline class."""

import ast
import importlib
import pkgutil
from pathlib import Path

import p2p_widgets

PACKAGE = Path(p2p_widgets.__file__).parent


def modules() -> dict[str, Path]:
    found = {}
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="p2p_widgets."):
        spec = importlib.util.find_spec(info.name)
        found[info.name] = Path(spec.origin)
    return found


def imports(name: str, path: Path, anywhere: bool = False) -> set[str]:
    """The package modules ``name`` imports at module level (outside ``TYPE_CHECKING``), or
    ``anywhere`` (function-level imports too)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    nodes = ast.walk(tree) if anywhere else _module_level(tree.body)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c.startswith("p2p_widgets")}
    return found


def _module_level(body):
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        yield from ast.walk(node)


def test_module_level_imports_have_no_cycle():
    known = modules()
    graph = {name: {m for m in imports(name, path) if m in known and m != name} for name, path in known.items()}
    # a package's __init__ importing its own submodules is not a cycle of the layering
    for name in graph:
        graph[name] = {m for m in graph[name] if not (known[name].name == "__init__.py" and m.startswith(name + "."))}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(child) :], child]))
            if child not in state:
                visit(child)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_engine_and_the_families_know_no_inversion_and_no_pipeline_class():
    known = modules()
    for name in (
        "p2p_widgets.engine",
        "p2p_widgets.families.base",
        "p2p_widgets.families.sd",
        "p2p_widgets.families.sdxl",
    ):
        used = imports(name, known[name], anywhere=True)
        assert not any(
            m.startswith(("p2p_widgets.inversion", "p2p_widgets.study", "p2p_widgets.panel")) for m in used
        ), (name, used)
    used = code_words(known["p2p_widgets.engine"])
    for word in (
        "StableDiffusionPipeline",
        "StableDiffusionXLPipeline",
        "unet",
        "text_encoder",
        "null-text",
        "negative-prompt",
        "direct",
    ):
        assert word not in used, word


def code_words(path: Path) -> set[str]:
    """Names, attributes and string constants of a module's code (docstrings left out)."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    words = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.add(node.id)
        elif isinstance(node, ast.Attribute):
            words.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.add(node.value)
    return words
