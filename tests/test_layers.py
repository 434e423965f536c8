"""The architecture of DESIGN.md: every module imports only its own layer or the layers below it, and no
module of msdda depends on itself through a chain of imports (not even within one layer)."""

import ast
from pathlib import Path

import msdda

LAYERS = {
    "errors": 0,
    "config": 0,
    "atomic": 0,
    "distributed": 0,  # rank / world size and collectives (torch.distributed through accelerate)
    "core": 1,  # kernels, fusion, schedules; the Reward protocol and its validation (core/rewards.py)
    "models": 2,
    "sampling": 3,
    "alignment": 4,
    "tasks": 5,  # each task with its rewards; tasks/rewards.py is the reward name registry
    "rewards": 5,  # rewards.py: the public import path msdda.rewards, a re-export of core and tasks
    "evaluation": 6,
    "cli": 7,
    "pipelines": 7,
}
ROOT = Path(msdda.__file__).parent


def _module_name(path: Path) -> str:
    parts = ("msdda", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "msdda" or len(parts) < 2:
        return None
    return LAYERS.get(parts[1])


def _imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module the source of ``module`` imports, wherever the statement sits (module level or in a function).

    Counted: ``import a.b``, ``from a.b import c`` (as a.b.c when that is a module, else a.b), relative
    imports resolved against the package, and ``importlib.import_module("msdda...")`` with a literal name,
    since a lazy or dynamic import is still a dependency. Not counted: the parent packages Python
    imports implicitly before a submodule.
    """
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    found.discard(module)
    return found


def _imports_of(path: Path) -> set[str]:
    return _imported_modules(path.read_text(), _module_name(path), path.name == "__init__.py")


def _cycles(graph: dict[str, list[str]]) -> list[str]:
    """One 'a -> b -> a' line per back edge found by depth-first search (empty: the graph is acyclic)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in graph.get(node, []):
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*path[path.index(dep) :], dep]))
            elif dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_imports_point_downward():
    bad = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "__init__.py":
            continue  # the package root re-exports the public API
        own = LAYERS[rel.parts[0].removesuffix(".py")]
        for name in sorted(_imports_of(path)):
            layer = _layer(name)
            if layer is not None and layer > own:
                bad.append(f"{rel} (layer {own}) imports {name} (layer {layer})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    """No msdda module reaches itself through imports, also within one layer or one package.

    The graph has an edge for every import statement of a module (see _imported_modules): module-level
    and function-local ones alike, because a function-local import is the usual way to hide a cycle and
    the two modules still depend on each other. A package's __init__ is a module of its own.
    """
    graph = {m: sorted(d for d in _imports_of(p) if d in MODULES) for m, p in MODULES.items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_cycle_check_counts_lazy_imports():
    """A function-local import and an import_module literal are edges; a cycle through them is found."""
    lazy = "def f():\n    import msdda.tasks.digits.rewards\n    importlib.import_module('msdda.rewards')\n"
    assert _imported_modules(lazy, "msdda.core.rewards") == {"msdda.tasks.digits.rewards", "msdda.rewards"}
    assert _imported_modules("from .data import NUM_CLASSES", "msdda.tasks.digits.rewards") == {
        "msdda.tasks.digits.data"
    }
    graph = {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}
    assert _cycles(graph) == ["a -> b -> c -> a"]
    assert _cycles({"a": ["b"], "b": [], "c": ["a", "b"]}) == []


def test_core_never_imports_diffusers():
    """The math core reads diffusers schedulers through their config; it never imports the package."""
    for path in (ROOT / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("diffusers"), path
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("diffusers") for a in node.names), path
