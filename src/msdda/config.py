"""Configuration dataclasses that round-trip through JSON: `to_dict()` and a `from_dict()` that refuses typos."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from msdda.errors import MSDDAError


class JSONConfig:
    """Mixin for config dataclasses. Tuples are written as lists and read back as tuples; unknown keys
    raise `config_error` (a subclass sets its layer's error type) naming them and the valid ones."""

    config_error: ClassVar[type[MSDDAError]] = MSDDAError

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise cls.config_error(f"unknown {cls.__name__} keys {unknown}; valid keys are {sorted(fields)}")
        kwargs = {k: tuple(v) if isinstance(v, list) and "tuple" in str(fields[k].type) else v for k, v in data.items()}
        return cls(**kwargs)
