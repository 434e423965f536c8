"""The trainers' learning-rate schedule: values, validation, and old checkpoints resuming as "constant"."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from msdda.alignment.errors import AlignmentError
from msdda.alignment.step_rl import StepRLConfig
from msdda.alignment.trainer import StepTrainer


def _lr(cfg: StepRLConfig, step: int) -> float:
    return StepTrainer.learning_rate(SimpleNamespace(config=cfg), step)  # type: ignore[arg-type]


def test_constant_and_cosine_values() -> None:
    const = StepRLConfig(lr=1e-3, steps=10)
    assert [_lr(const, s) for s in (0, 5, 9)] == [1e-3, 1e-3, 1e-3]
    cos = StepRLConfig(lr=1e-3, steps=10, lr_schedule="cosine")
    assert _lr(cos, 0) == pytest.approx(1e-3)
    assert _lr(cos, 5) == pytest.approx(0.5e-3)
    assert _lr(cos, 9) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    values = [_lr(cos, s) for s in range(10)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))  # strictly decreasing


def test_unknown_schedule_is_refused() -> None:
    with pytest.raises(AlignmentError, match="lr_schedule='linear'; choose one of constant, cosine"):
        StepRLConfig(lr_schedule="linear")


def test_configs_without_the_field_load_as_constant() -> None:
    doc = StepRLConfig().to_dict()
    doc.pop("lr_schedule")
    assert StepRLConfig.from_dict(doc).lr_schedule == "constant"
