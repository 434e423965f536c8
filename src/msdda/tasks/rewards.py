"""Rewards by name: a name -> factory registry holding every task's built-in rewards, and "module:function" specs.

The protocol, validation and differentiability default live in msdda.core.rewards (layer 1); each
task's rewards live with the task (msdda.tasks.digits.rewards). This registry sits in the tasks layer
because it names those built-ins, and imports them statically so the layering is visible in imports.
Every reward built here maps x0 [B, ...] and cond [B] (or None) to a checked float tensor [B].
"""

from __future__ import annotations

import importlib
import inspect
import threading
from collections.abc import Callable
from typing import Any

from msdda.core.rewards import CheckedReward, FunctionReward, Reward, RewardError
from msdda.tasks.digits.rewards import (
    AlignmentReward,
    ContrastReward,
    InkReward,
    SmoothnessReward,
    SymmetryReward,
    TemplateReward,
)

__all__ = ["RewardFactory", "available_rewards", "get_reward", "register_reward"]

RewardFactory = Callable[..., Reward]

_REGISTRY: dict[str, RewardFactory] = {
    "alignment": AlignmentReward,
    "ink": InkReward,
    "symmetry": SymmetryReward,
    "template": TemplateReward,
    "contrast": ContrastReward,
    "smoothness": SmoothnessReward,
}
_LOCK = threading.Lock()


def register_reward(name: str, factory: RewardFactory, *, overwrite: bool = False) -> None:
    """Register ``factory(**options) -> Reward`` under ``name``.

    Names may not contain ':' (that marks a "module:function" spec). Registering a taken name raises
    RewardError unless ``overwrite=True``.
    """
    if not isinstance(name, str) or not name or ":" in name or name != name.strip():
        raise RewardError(f"reward name must be a non-empty string without ':' or surrounding spaces, got {name!r}")
    if not callable(factory):
        raise RewardError(f"reward factory for {name!r} must be callable, got {type(factory).__name__}")
    with _LOCK:
        if name in _REGISTRY and not overwrite and _REGISTRY[name] is not factory:
            raise RewardError(f"reward {name!r} is already registered; pass overwrite=True to replace it")
        _REGISTRY[name] = factory


def available_rewards() -> list[str]:
    """Sorted names of all registered rewards (built-ins included)."""
    with _LOCK:
        return sorted(_REGISTRY)


def _is_reward_object(obj: Any) -> bool:
    return callable(obj) and hasattr(obj, "name") and hasattr(obj, "differentiable") and not inspect.isclass(obj)


def _from_spec(spec: str, options: dict[str, Any]) -> Reward:
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise RewardError(f"reward spec {spec!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure is the user's module, report it as such
        raise RewardError(f"reward spec {spec!r}: cannot import module {module_name!r}: {exc!r}") from exc
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"reward spec {spec!r}: {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    if inspect.isclass(obj):
        try:
            obj = obj(**options)
        except TypeError as exc:
            raise RewardError(f"reward spec {spec!r}: cannot construct {attr_path} with {options}: {exc}") from exc
        options = {}
    if _is_reward_object(obj):
        if options:
            raise RewardError(
                f"reward spec {spec!r} names a ready reward object; options {sorted(options)} not allowed"
            )
        return obj
    if not callable(obj):
        raise RewardError(f"reward spec {spec!r} names a {type(obj).__name__}, not a callable reward")
    unknown = sorted(set(options) - {"name", "differentiable"})
    if unknown:
        raise RewardError(
            f"reward spec {spec!r} names a plain function; only options 'name' and 'differentiable' apply, "
            f"got {unknown}"
        )
    # differentiable: the option, else the function's own attribute, else the one default
    # (msdda.core.rewards.is_differentiable).
    return FunctionReward(obj, name=str(options.get("name", spec)), differentiable=options.get("differentiable"))


def get_reward(name_or_spec: str | Reward, **options: Any) -> CheckedReward:
    """Build a reward from a registered name, a "module:function" spec, or a Reward object.

    Registered names call their factory with ``options``. A spec imports the module and takes the
    attribute: a Reward object is used as is, a class is instantiated with ``options``, and a plain
    function ``fn(x0, cond) -> Tensor[B]`` is wrapped (options ``name`` and ``differentiable``; the latter
    defaults to the function's own ``differentiable`` attribute, else to msdda.core.rewards'
    is_differentiable default). The result validates its outputs on every call. Unknown names raise
    RewardError listing the registered ones.
    """
    if not isinstance(name_or_spec, str):
        if _is_reward_object(name_or_spec):
            return CheckedReward(name_or_spec)
        raise RewardError(
            f"get_reward expects a reward name, a 'module:function' spec or a Reward, got {type(name_or_spec).__name__}"
        )
    key = name_or_spec.strip()
    if ":" in key:
        return CheckedReward(_from_spec(key, dict(options)))
    with _LOCK:
        factory = _REGISTRY.get(key)
        valid = sorted(_REGISTRY)
    if factory is None:
        raise RewardError(
            f"unknown reward {name_or_spec!r}; valid names are {', '.join(valid) or '(none)'}, "
            "or pass a 'package.module:function' spec"
        )
    try:
        reward = factory(**options)
    except TypeError as exc:
        raise RewardError(f"cannot build reward {key!r} with options {sorted(options)}: {exc}") from exc
    return CheckedReward(reward)
