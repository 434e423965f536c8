"""The Reward protocol, the one check of a reward's output, and the one differentiability default.

A reward maps a batch of clean samples x0 [B, ...] and conditions cond (one per sample, or None) to one
float per sample, Tensor[B]. Two attributes are optional: ``name`` (labels errors, results and plots)
and ``differentiable`` (whether gradients w.r.t. x0 are meaningful; read it with ``is_differentiable``).
Every entry point that calls a reward (guided step rules, trainers, pipelines) checks its output with
``validate_reward_output`` and so raises the same ``RewardError`` with the same message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from msdda.errors import MSDDAError

__all__ = [
    "DEFAULT_DIFFERENTIABLE",
    "CheckedReward",
    "FunctionReward",
    "Reward",
    "RewardError",
    "is_differentiable",
    "reward_name",
    "validate_reward_output",
]

_MAX_LISTED = 8  # how many bad batch indices an error message names before summarising

# The one default for a reward that does not declare ``differentiable``: see is_differentiable.
DEFAULT_DIFFERENTIABLE = True


class RewardError(MSDDAError):
    """A reward is unknown, cannot be built, got bad input, or returned bad values."""


@runtime_checkable
class Reward(Protocol):
    """Anything callable as ``reward(x0, cond) -> Tensor[B]``.

    x0: [B, ...] clean samples (for digits [B, 1, 8, 8] in [-1, 1]); cond: one condition per sample
    (e.g. class labels [B], a list of B prompts) or None. Optional attributes: ``name: str`` and
    ``differentiable: bool`` (default: see is_differentiable).
    """

    def __call__(self, x0: Tensor, cond: Any) -> Tensor: ...


def is_differentiable(reward: Any) -> bool:
    """Whether gradient guidance (RGG) may differentiate ``reward`` w.r.t. x0.

    A reward's own ``differentiable`` attribute decides; without one (or with None) the answer is
    DEFAULT_DIFFERENTIABLE = True. Why True: a reward is a torch function of x0 in the common case, so
    a plain user callable must work with RGG without ceremony (as it does in the SD pipeline), and the
    optimistic default cannot fail silently, because RGG raises an error naming the cause when the
    scalarised reward carries no gradient. A reward that is not differentiable declares
    ``differentiable = False`` and is then refused by RGG before any sampling.
    """
    declared = getattr(reward, "differentiable", None)
    return DEFAULT_DIFFERENTIABLE if declared is None else bool(declared)


def reward_name(reward: Any, fallback: str | None = None) -> str:
    """The reward's ``name`` attribute, else ``fallback``, else its type name (for messages and labels)."""
    name = getattr(reward, "name", None)
    if name is not None:
        return str(name)
    return fallback if fallback is not None else type(reward).__name__


def validate_reward_output(
    values: Any, batch_size: int, name: str, *, error: type[RewardError] = RewardError
) -> Tensor:
    """Check a reward's output and return it unchanged: a floating tensor [batch_size], all finite.

    Raises ``error`` (RewardError, or a subclass an entry point keeps for compatibility; catching
    RewardError catches them all) if ``values`` is not a tensor, has another shape (the message names
    the received and the expected shape), is not floating-point, or has NaN or infinite entries (the
    message names the offending batch indices and their values).
    """
    if not isinstance(values, Tensor):
        raise error(
            f"reward {name!r} must return a torch.Tensor of shape [{batch_size}], got {type(values).__name__}"
        )
    if tuple(values.shape) != (batch_size,):
        raise error(
            f"reward {name!r} returned shape {list(values.shape)}, expected [{batch_size}] for a batch of "
            f"{batch_size} (one value per sample)"
        )
    if not values.is_floating_point():
        raise error(f"reward {name!r} must return floating-point values, got dtype {values.dtype}")
    finite = torch.isfinite(values.detach())
    if not bool(finite.all()):
        bad = torch.nonzero(~finite, as_tuple=False).flatten().tolist()
        shown = ", ".join(f"index {i} ({float(values[i])})" for i in bad[:_MAX_LISTED])
        more = f" and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
        raise error(
            f"reward {name!r} returned non-finite values at batch {shown}{more}; check the samples at "
            "those indices (they may have diverged) or the reward's numerics"
        )
    return values


class CheckedReward:
    """Wraps a reward so every call validates its input batch and its output (see validate_reward_output).

    ``name`` and ``differentiable`` are read once from the wrapped reward (``inner``) through
    reward_name and is_differentiable.
    """

    def __init__(self, reward: Reward) -> None:
        if isinstance(reward, CheckedReward):
            reward = reward.inner
        self.inner = reward
        self.name: str = reward_name(reward)
        self.differentiable: bool = is_differentiable(reward)

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
    """Adapts a plain function ``fn(x0, cond) -> Tensor[B]`` to a named Reward.

    differentiable: None takes the function's own attribute, else the default (see is_differentiable).
    """

    def __init__(
        self, fn: Callable[[Tensor, Any], Tensor], name: str, differentiable: bool | None = None
    ) -> None:
        self.fn = fn
        self.name = name
        self.differentiable = is_differentiable(fn) if differentiable is None else bool(differentiable)

    def __call__(self, x0: Tensor, cond: Tensor | None = None) -> Tensor:
        """x0: [B, ...], cond: [B] or None -> Tensor[B]."""
        return self.fn(x0, cond)

    def __repr__(self) -> str:
        return f"FunctionReward(name={self.name!r}, differentiable={self.differentiable})"
