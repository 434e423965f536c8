"""The architecture of DESIGN.md: every module imports only its own layer or the layers below it."""

import ast
from pathlib import Path

import msdda

LAYERS = {
    "errors": 0,
    "config": 0,
    "atomic": 0,
    "distributed": 0,  # rank / world size and collectives (torch.distributed through accelerate)
    "core": 1,
    "models": 2,
    "sampling": 3,
    "alignment": 4,
    "rewards": 5,
    "tasks": 5,
    "evaluation": 6,
    "cli": 7,
    "pipelines": 7,
}
ROOT = Path(msdda.__file__).parent


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "msdda" or len(parts) < 2:
        return None
    return LAYERS.get(parts[1])


def test_imports_point_downward():
    bad = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "__init__.py":
            continue  # the package root re-exports the public API
        own = LAYERS[rel.parts[0].removesuffix(".py")]
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                layer = _layer(name)
                if layer is not None and layer > own:
                    bad.append(f"{rel} (layer {own}) imports {name} (layer {layer})")
    assert not bad, "\n".join(bad)


def test_core_never_imports_diffusers():
    """The math core reads diffusers schedulers through their config; it never imports the package."""
    for path in (ROOT / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("diffusers"), path
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("diffusers") for a in node.names), path
