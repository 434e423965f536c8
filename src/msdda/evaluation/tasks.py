"""Task names -> TaskBundle factories, for sweeps and reports."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from msdda.errors import MSDDAError
from msdda.tasks.bundle import TaskBundle


class UnknownTaskError(MSDDAError):
    """No task of that name."""


def _gaussian(options: Mapping[str, Any]) -> TaskBundle:
    from msdda.tasks.gaussian import gaussian_bundle

    return gaussian_bundle(**dict(options))


def _digits(options: Mapping[str, Any]) -> TaskBundle:
    from msdda.tasks.digits.bundle import digits_bundle

    return digits_bundle(**dict(options))


TASKS: dict[str, Callable[[Mapping[str, Any]], TaskBundle]] = {"digits": _digits, "gaussian": _gaussian}


def get_task_bundle(name: str, options: Mapping[str, Any] | None = None) -> TaskBundle:
    """Build the named task (`digits`: shipped weights; `gaussian`: the exact oracle)."""
    if name not in TASKS:
        raise UnknownTaskError(f"unknown task {name!r}; valid tasks: {sorted(TASKS)}")
    return TASKS[name](options or {})
