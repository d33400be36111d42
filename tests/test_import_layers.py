"""The layer contract: entry points -> job folders -> training -> checkpointing -> model and dataset -> common.

Each module may import only from layers below its own (or from its own package), and no module imports itself
back through others. Imports under `if TYPE_CHECKING:` are type hints only and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Higher number = higher layer. Packages in the same layer are siblings and must not import each other.
LAYERS = {
    "train": 5,
    "distill": 5,
    "finetune": 5,
    "evaluate": 5,
    "embed": 5,
    "distillation": 4,
    "finetuning": 4,
    "evaluation": 4,
    "serving": 4,
    "interpret": 4,
    "embedding": 4,
    "training": 3,
    "checkpointing": 2,
    "model": 1,
    "modeling_bert_te": 1,
    "dataset": 1,
    "common": 0,
}
# modeling_bert_te.py is the model itself, kept at the root where users of such recipes expect it.
SAME_PACKAGE = {"modeling_bert_te": "model"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> set[str]:
    """Modules imported anywhere in the file (function-level imports too), except type-checking-only ones."""
    found: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _project_graph() -> dict[str, set[str]]:
    files = [
        p
        for p in REPO.rglob("*.py")
        if p.relative_to(REPO).parts[0] in LAYERS or p.parent == REPO and p.stem in LAYERS
    ]
    modules = {_module_name(p): p for p in files}
    graph = {}
    for name, path in modules.items():
        targets = {t for t in _imports(ast.parse(path.read_text())) if t in modules and t != name}
        graph[name] = targets
    return graph


def _top(module: str) -> str:
    return module.split(".")[0]


def test_every_import_points_down_the_layers():
    wrong = []
    for module, targets in _project_graph().items():
        here = _top(module)
        for target in targets:
            there = _top(target)
            if SAME_PACKAGE.get(here, here) == SAME_PACKAGE.get(there, there):
                continue
            if LAYERS[there] >= LAYERS[here]:
                wrong.append(f"{module} imports {target} (layer {LAYERS[here]} -> {LAYERS[there]})")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(sorted(wrong))


def test_no_module_imports_itself_back_through_others():
    graph = _project_graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_contract_sees_every_package_of_the_project():
    """A new top-level package must be placed in a layer, or the contract above would silently skip it."""
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")} | {p.stem for p in REPO.glob("*.py")}
    outside = {"tests", "benchmarks", "hydra_config", "scripts"}
    assert packages - outside - set(LAYERS) == set()
