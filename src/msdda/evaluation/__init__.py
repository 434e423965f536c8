"""Evaluation (layer 6): metrics over reward samples; sweeps, results store, plots and report beside it."""

from msdda.evaluation.metrics import (
    MetricsError,
    default_reference_point,
    hypervolume,
    mean_ci,
    pareto_front,
    summarise,
    win_rate,
)

__all__ = [
    "MetricsError",
    "default_reference_point",
    "hypervolume",
    "mean_ci",
    "pareto_front",
    "summarise",
    "win_rate",
]
