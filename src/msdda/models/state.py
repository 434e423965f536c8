"""Checking a loaded state dict against a module before loading it: what is missing, extra or misshapen."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn


def state_mismatches(module: nn.Module, state: Mapping[str, Tensor], shown: int = 6) -> list[str]:
    """Human-readable differences between `module.state_dict()` and `state` (empty when they match).

    Names at most `shown` tensors per kind, so a wholly different checkpoint still gives a short message.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = [(k, expected[k], got[k]) for k in sorted(set(expected) & set(got)) if expected[k] != got[k]]
    parts = []
    if missing:
        parts.append(f"missing tensors {missing[:shown]}")
    if unexpected:
        parts.append(f"unexpected tensors {unexpected[:shown]}")
    if wrong:
        parts.append("shape mismatches " + ", ".join(f"{k}: model {e}, file {g}" for k, e, g in wrong[:shown]))
    return parts
