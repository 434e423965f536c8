"""Import guards: optional packages are imported when first needed, with a typed error when missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from msdda.pipelines.errors import MissingDependencyError

_EXTRA = "pip install 'msdda[diffusers]'  (diffusers, peft, transformers, accelerate)"
REWARDS_EXTRA = "pip install 'msdda[rewards]'  (transformers)"


def require(module: str, feature: str, install: str | None = None) -> ModuleType:
    """Import `module` (e.g. "peft") or raise MissingDependencyError naming `feature` and the install line
    (`install`, default: the diffusers extra)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise MissingDependencyError(
            f"{feature} needs the optional package {top!r}, which could not be imported ({exc}); "
            f"install it with: {install or _EXTRA}"
        ) from exc


def dtype_kwargs(library: ModuleType, dtype: object) -> dict[str, object]:
    """`{"dtype": dtype}` for from_pretrained of diffusers >= 0.36 / transformers >= 4.56, else `torch_dtype`.

    Both libraries renamed the argument; the old name still works there but warns.
    """
    if dtype is None:
        return {}
    name = library.__name__.split(".")[0]
    if name == "diffusers":
        try:
            new = hasattr(importlib.import_module("diffusers.utils.deprecation_utils"), "_resolve_dtype")
        except ImportError:
            new = False
    else:
        from packaging.version import Version

        new = Version(library.__version__.split("+")[0]) >= Version("4.56")
    return {"dtype" if new else "torch_dtype": dtype}
