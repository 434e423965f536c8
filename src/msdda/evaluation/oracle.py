"""The oracle demo: MSDDA vs DB-MPA vs the base model on the exact Gaussian task, over a weight grid.

Every number here can be checked against closed forms: the per-step gap between the fused kernel and the
independently derived optimum, and the step objective J of each rule at the states it visits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from msdda.evaluation.metrics import mean_ci
from msdda.sampling import DBMPA, MSDDA, StepContext, sample
from msdda.sampling.methods import BASE, plan_method
from msdda.tasks.gaussian import GaussianTask, gaussian_bundle

logger = logging.getLogger(__name__)


def run_oracle_demo(
    weights: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    *,
    samples: int = 2000,
    steps: int = 50,
    seed: int = 0,
    beta: float = 1.0,
    progress: bool = False,
) -> dict[str, Any]:
    """Sample base, MSDDA and DB-MPA on the 2-objective oracle; return a summary dict.

    weights: w on objective 1 (objective 2 gets 1 - w). Rewards are the quadratic step rewards of the
    final samples. `step_regret` is the mean over steps and samples of J(optimum) - J(kernel the rule
    used), both at the state the rule visited (>= 0; 0 means step-optimal); `max_gap_to_optimum` is the
    largest |MSDDA kernel - exact optimum| seen (mean and var).
    """
    bundle = gaussian_bundle(num_objectives=2, dim=2, seed=0)
    task: GaussianTask = bundle.base.task
    objectives = list(bundle.objectives)
    results: list[dict[str, Any]] = []

    def run(method: str, w: list[float]) -> None:
        weights = dict(zip(objectives, w, strict=True))
        # an explicit target beta: the step objective J below is the one with this beta
        plan = plan_method(method, bundle, weights if method != BASE else None, beta=beta)
        regrets: list[float] = []
        gaps: list[float] = [0.0]

        def on_step(ctx: StepContext, _x: torch.Tensor) -> None:
            ref = task.reference_kernel(ctx.x_t, ctx.timestep, ctx.prev_timestep)
            used = ctx.kernel  # the kernel the rule sampled from at this step
            assert used is not None
            opt = task.optimal_kernel(ref, w, beta)
            regret = task.objective(opt, ref, w, beta) - task.objective(used, ref, w, beta)
            regrets.append(float(regret.mean()))
            if method == MSDDA.name:
                gaps.append(float((used.mean - opt.mean).abs().max()))
                gaps.append(float((torch.broadcast_to(used.var, opt.mean.shape) - opt.var).abs().max()))

        start = time.perf_counter()
        out = sample(
            plan.models,
            bundle.scheduler,
            plan.rule,
            reference=plan.reference,
            shape=(samples, 2),
            dtype=torch.float64,
            num_inference_steps=steps,
            seed=seed,
            progress=progress,
            callback=on_step,
        )
        seconds = time.perf_counter() - start
        rewards = {}
        for k, name in enumerate(objectives):
            m, lo, hi = mean_ci(task.step_reward(k, out.samples).numpy(), seed=seed)
            rewards[name] = {"mean": m, "ci95": [lo, hi]}
        row: dict[str, Any] = {
            "method": method,
            "weights": dict(zip(objectives, w, strict=True)),
            "n": samples,
            "rewards": rewards,
            "step_regret": sum(regrets) / len(regrets),
            "seconds": seconds,
            "model_evals": out.model_evals,
        }
        if method == MSDDA.name:
            row["max_gap_to_optimum"] = max(gaps)
        results.append(row)

    for w1 in weights:
        w = [float(w1), 1.0 - float(w1)]
        for method in (BASE, MSDDA.name, DBMPA.name):
            run(method, w)
    return {"task": "gaussian-oracle", "objectives": objectives, "beta": beta, "steps": steps, "results": results}


def format_table(summary: dict[str, Any]) -> str:
    """A plain-text table of the summary (one row per method and weight)."""
    objs = summary["objectives"]
    head = f"{'method':<8} {'w1':>5} " + " ".join(f"{o:>13}" for o in objs) + f" {'step regret':>11} {'gap':>9}"
    lines = [head, "-" * len(head)]
    for r in summary["results"]:
        cells = " ".join(f"{r['rewards'][o]['mean']:>13.4f}" for o in objs)
        gap = f"{r['max_gap_to_optimum']:.1e}" if "max_gap_to_optimum" in r else "-"
        lines.append(f"{r['method']:<8} {r['weights'][objs[0]]:>5.2f} {cells} {r['step_regret']:>11.2e} {gap:>9}")
    return "\n".join(lines)
