"""Task names -> TaskBundle factories, for sweeps and reports."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
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


def register_task(name: str, factory: Callable[[Mapping[str, Any]], TaskBundle], *, overwrite: bool = False) -> None:
    """Make `factory(options) -> TaskBundle` available to sweeps, reports and the CLI as task `name`."""
    if not isinstance(name, str) or not name or not callable(factory):
        raise UnknownTaskError(f"register_task needs a non-empty name and a callable factory, got {name!r}")
    if name in TASKS and not overwrite:
        raise UnknownTaskError(f"task {name!r} is already registered; pass overwrite=True to replace it")
    TASKS[name] = factory


def get_task_bundle(name: str, options: Mapping[str, Any] | None = None) -> TaskBundle:
    """Build the named task (`digits`: shipped weights; `gaussian`: the exact oracle)."""
    if name not in TASKS:
        hint = ""
        if name == "sd":  # a face (layer 7) registers it: evaluation never imports the pipelines
            hint = " (Stable Diffusion: call msdda.pipelines.sd_task.register() first; `msdda sweep` does)"
        raise UnknownTaskError(f"unknown task {name!r}; valid tasks: {sorted(TASKS)}{hint}")
    return TASKS[name](options or {})


def load_task_model(task: str, directory: str | Path) -> Any:
    """A trained model of task `task` from its model folder (digits: a denoiser; gaussian: an OraclePolicy)."""
    if task == "digits":
        from msdda.tasks.digits.training import load_digits_model

        return load_digits_model(directory)[0]
    if task == "gaussian":
        from msdda.tasks.gaussian import load_gaussian_policy

        return load_gaussian_policy(directory)
    raise UnknownTaskError(f"task {task!r} has no model folders to load; valid: digits, gaussian")
