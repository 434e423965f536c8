"""The Reward protocol, output validation and a name -> factory registry.

A reward maps a batch of clean samples x0 [B, ...] and optional conditions cond [B] (or None) to one
float per sample, Tensor[B]. ``differentiable`` says whether gradients w.r.t. x0 are meaningful (RGG
needs that); ``name`` labels results and plots.
"""

from __future__ import annotations

import importlib
import inspect
import threading
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from msdda.errors import MSDDAError

_MAX_LISTED = 8  # how many bad batch indices an error message names before summarising


class RewardError(MSDDAError):
    """A reward is unknown, cannot be built, got bad input, or returned bad values."""


@runtime_checkable
class Reward(Protocol):
    """Anything callable as ``reward(x0, cond) -> Tensor[B]`` with a ``name`` and ``differentiable``.

    x0: [B, ...] clean samples (for digits [B, 1, 8, 8] in [-1, 1]); cond: [B] conditions or None.
    """

    name: str
    differentiable: bool

    def __call__(self, x0: Tensor, cond: Tensor | None) -> Tensor: ...


def validate_reward_output(values: Any, batch_size: int, name: str) -> Tensor:
    """Check a reward's output and return it unchanged.

    Raises RewardError if ``values`` is not a floating tensor of shape [batch_size] (the message names
    the expected and the received shape), or if any entry is NaN or infinite (the message names the
    offending batch indices and their values).
    """
    if not isinstance(values, Tensor):
        raise RewardError(
            f"reward {name!r} must return a torch.Tensor of shape [{batch_size}], got {type(values).__name__}"
        )
    if tuple(values.shape) != (batch_size,):
        raise RewardError(
            f"reward {name!r} returned shape {list(values.shape)}, expected [{batch_size}] "
            "(one value per sample in the batch)"
        )
    if not values.is_floating_point():
        raise RewardError(f"reward {name!r} must return floating-point values, got dtype {values.dtype}")
    finite = torch.isfinite(values.detach())
    if not bool(finite.all()):
        bad = torch.nonzero(~finite, as_tuple=False).flatten().tolist()
        shown = ", ".join(f"index {i} ({float(values[i])})" for i in bad[:_MAX_LISTED])
        more = f" and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
        raise RewardError(
            f"reward {name!r} returned non-finite values at batch {shown}{more}; check the samples at "
            "those indices (they may have diverged) or the reward's numerics"
        )
    return values


class CheckedReward:
    """Wraps a reward so every call validates its input batch and its output (see validate_reward_output).

    Attributes ``name`` and ``differentiable`` are forwarded; the wrapped object is ``inner``.
    """

    def __init__(self, reward: Reward) -> None:
        if isinstance(reward, CheckedReward):
            reward = reward.inner
        self.inner = reward
        self.name: str = str(getattr(reward, "name", type(reward).__name__))
        self.differentiable: bool = bool(getattr(reward, "differentiable", False))

    def __call__(self, x0: Tensor, cond: Tensor | None = None) -> Tensor:
        """x0: [B, ...], cond: [B] or None -> Tensor[B] of finite floats."""
        if not isinstance(x0, Tensor) or x0.ndim < 1:
            raise RewardError(
                f"reward {self.name!r} expects x0 as a tensor [B, ...], got "
                f"{type(x0).__name__}{list(x0.shape) if isinstance(x0, Tensor) else ''}"
            )
        b = x0.shape[0]
        if cond is not None and (not isinstance(cond, Tensor) or cond.ndim < 1 or cond.shape[0] != b):
            got = list(cond.shape) if isinstance(cond, Tensor) else type(cond).__name__
            raise RewardError(f"reward {self.name!r} expects cond with batch size {b} (or None), got {got}")
        return validate_reward_output(self.inner(x0, cond), b, self.name)

    def __repr__(self) -> str:
        return f"CheckedReward({self.inner!r})"


class FunctionReward:
    """Adapts a plain function ``fn(x0, cond) -> Tensor[B]`` to the Reward protocol."""

    def __init__(self, fn: Callable[[Tensor, Tensor | None], Tensor], name: str, differentiable: bool) -> None:
        self.fn = fn
        self.name = name
        self.differentiable = differentiable

    def __call__(self, x0: Tensor, cond: Tensor | None = None) -> Tensor:
        """x0: [B, ...], cond: [B] or None -> Tensor[B]."""
        return self.fn(x0, cond)

    def __repr__(self) -> str:
        return f"FunctionReward(name={self.name!r}, differentiable={self.differentiable})"


RewardFactory = Callable[..., Reward]

_REGISTRY: dict[str, RewardFactory] = {}
_LOCK = threading.Lock()
_builtins_loaded = False


def _ensure_builtins() -> None:
    # Built-ins register themselves on import; importing lazily keeps base.py free of task imports.
    global _builtins_loaded
    if not _builtins_loaded:
        importlib.import_module("msdda.rewards.digits")
        _builtins_loaded = True


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
    _ensure_builtins()
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
    # A plain function is assumed non-differentiable unless it says otherwise: gradient guidance must
    # not silently differentiate through code that was never meant for it.
    differentiable = bool(options.get("differentiable", getattr(obj, "differentiable", False)))
    return FunctionReward(obj, name=str(options.get("name", spec)), differentiable=differentiable)


def get_reward(name_or_spec: str | Reward, **options: Any) -> CheckedReward:
    """Build a reward from a registered name, a "module:function" spec, or a Reward object.

    Registered names call their factory with ``options``. A spec imports the module and takes the
    attribute: a Reward object is used as is, a class is instantiated with ``options``, and a plain
    function ``fn(x0, cond) -> Tensor[B]`` is wrapped (options ``name`` and ``differentiable``; the latter
    defaults to the function's own ``differentiable`` attribute, else False). The result validates its
    outputs on every call. Unknown names raise RewardError listing the registered ones.
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
    _ensure_builtins()
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
