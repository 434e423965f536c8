"""The digits demo: MSDDA vs DB-MPA vs the base model on the embedded 8x8 digits task.

Two single-objective models (aligned to objectives[0] and objectives[1] by step-level DPO) are fused at
every reverse step over a grid of preference weights w (w on objective 1, 1 - w on objective 2). Every
method and weight starts from the same noise and classes (common random numbers), so differences between
rows are due to the method, not to the draw.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from msdda.alignment.diffusion import BaseTrainConfig
from msdda.atomic import write_bytes_atomic, write_json_atomic
from msdda.evaluation.metrics import mean_ci
from msdda.sampling import DBMPA, MSDDA, sample
from msdda.sampling.methods import BASE, plan_method
from msdda.tasks.digits.bundle import DEFAULT_GUIDANCE, digits_bundle
from msdda.tasks.digits.training import (
    OFFSET_HEAD_FIELDS,
    align_digits,
    class_conditions,
    digits_train_config,
    shipped_dir,
    train_digits_base,
)
from msdda.tasks.rewards import get_reward

logger = logging.getLogger(__name__)

DEFAULT_OBJECTIVES = ("ink", "template")
# The shipped recipes (docs/digits.md), one per reward; --from-scratch reruns them.
# * ink, template, contrast (the demo's objectives): direct step-level RL, whose fixed point is the step optimum,
#   of a kernel-offset head alone, the trunk and its noise prediction frozen (docs/method.md, "Training only the
#   offsets"), one head per t-range; 32 antithetic draws per state, 600 steps and lr 3e-3 because template's
#   offsets are learnt only as the gradient noise falls and the ranges stop sharing a head (docs/digits.md,
#   "Re-aligning ..."). One recipe for all three: a step-RL policy per w copies its objectives' shared recipe.
# * alignment, symmetry: DPOConfig defaults (beta 0.05, lr 2e-5, 200 steps, seed 0) with best-vs-worst (hard)
#   labels, made before Bradley-Terry labels became DPOConfig's default; pinned so --from-scratch reproduces them.
HARD_DPO: dict[str, Any] = {"trainer": "hard"}
PREMISE_RECIPE: dict[str, Any] = {
    "trainer": "step-rl",
    "kernel_offsets": True,
    "offset_head_ranges": [200, 600],
    "estimator": "reparam",
    "samples": 32,
    "antithetic": True,
    "steps": 600,
    "lr": 3e-3,
    "lr_schedule": "cosine",
    "trainable": ["offset_head"],
    "state_weights": "inverse_variance",
}
# template's beta: at 0.05 the mean template leaves the reference at t = 960 with ESS 1 of 2,048 draws.
PREMISE_BETAS = {"ink": 0.05, "template": 0.0625, "contrast": 0.05}
RECIPE_ALIGN: dict[str, dict[str, Any]] = {
    **{name: dict(PREMISE_RECIPE, beta=beta) for name, beta in PREMISE_BETAS.items()},
    **{name: dict(HARD_DPO) for name in ("alignment", "symmetry")},
}


def _stats(values: Tensor, seed: int) -> dict[str, Any]:
    mean, lo, hi = mean_ci(values.double().numpy(), seed=seed)
    return {"mean": mean, "ci95": [lo, hi]}


def _save_grid(path: Path, rows: dict[str, Tensor], title: str, per_row: int = 20) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, axes = plt.subplots(len(names), 1, figsize=(per_row * 0.45, 0.75 * len(names) + 0.5), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        imgs = rows[name][:per_row, 0].clamp(-1, 1)
        strip = torch.cat([torch.nn.functional.pad(im, (0, 1), value=-1) for im in imgs], dim=1)
        ax.imshow(strip.numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def _save_pareto(path: Path, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    o1, o2 = summary["objectives"]
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    styles = {MSDDA.name: ("tab:blue", "o-"), DBMPA.name: ("tab:orange", "s--")}
    for method, (color, fmt) in styles.items():
        rows = sorted((r for r in summary["results"] if r["method"] == method), key=lambda r: r["weights"][o1])
        if not rows:
            continue
        xs = [r["rewards"][o1]["mean"] for r in rows]
        ys = [r["rewards"][o2]["mean"] for r in rows]
        ax.plot(xs, ys, fmt, color=color, label=method.upper())
        for r, x, y in zip(rows, xs, ys, strict=True):
            ax.annotate(f"{r['weights'][o1]:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for r in summary["results"]:
        if r["method"] == BASE:
            ax.plot(r["rewards"][o1]["mean"], r["rewards"][o2]["mean"], "k*", markersize=11, label=BASE)
    ax.set_xlabel(f"{o1} (mean reward)")
    ax.set_ylabel(f"{o2} (mean reward)")
    ax.set_title(f"digits: weight on {o1} annotated")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def train_demo_weights(
    out: Path,
    objectives: Sequence[str],
    *,
    seed: int = 0,
    base_steps: int = 3000,
    align_steps: int | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Retrain the base and one aligned model per objective (the shipped recipe) into `out`/{base,aligned-*}."""
    out = Path(out)
    dirs = {"base": out / "base"}
    train_digits_base(
        dirs["base"], BaseTrainConfig(steps=base_steps, seed=seed, warmup_steps=min(100, base_steps)), progress=progress
    )
    for name in objectives:
        d = out / f"aligned-{name}"
        cfg = recipe_config(name, seed=seed)
        if align_steps is not None:
            cfg.steps = align_steps
            cfg.checkpoint_every = max(1, align_steps)
            cfg.log_every = max(1, align_steps)
            cfg.eval_samples = min(cfg.eval_samples, 10)
        align_digits(
            get_reward(name),
            d,
            cfg,
            base=dirs["base"],
            resume=False,
            progress=progress,
            **recipe_offset_head(name),
        )
        dirs[name] = d
    return dirs


def recipe_config(reward: str, seed: int = 0) -> Any:
    """The trainer configuration (DPOConfig or StepRLConfig) the shipped aligned-<reward> weights were made with
    (`RECIPE_ALIGN`; a reward without a recipe gets Bradley-Terry DPO at the defaults)."""
    kw = {k: v for k, v in RECIPE_ALIGN.get(reward, {"trainer": "bt"}).items() if k not in OFFSET_HEAD_FIELDS}
    trainer = kw.pop("trainer")
    return digits_train_config(trainer, reward, seed=seed, **kw)


def recipe_offset_head(reward: str) -> dict[str, Any]:
    """align_digits' offset-head keywords for the shipped aligned-<reward> model ({} for a plain model)."""
    return {k: v for k, v in RECIPE_ALIGN.get(reward, {}).items() if k in OFFSET_HEAD_FIELDS}


def run_digits_demo(
    out: Path,
    *,
    grid: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    samples: int = 200,
    steps: int = 50,
    seed: int = 0,
    objectives: Sequence[str] = DEFAULT_OBJECTIVES,
    model_dirs: dict[str, Path] | None = None,
    guidance_scale: float = DEFAULT_GUIDANCE,
    progress: bool = True,
) -> dict[str, Any]:
    """Sample base, MSDDA and DB-MPA over the weight grid; write summary.json, pareto.png, grid PNGs.

    model_dirs: {"base": dir, objective: dir, ...} (default: the shipped weights). All models are loaded and
    checked to share one architecture and task before any sampling. Returns the summary dict.
    """
    if len(objectives) != 2:
        raise ValueError(f"the digits demo compares two objectives, got {list(objectives)}")
    dirs = dict(model_dirs or {})
    dirs.setdefault("base", shipped_dir("base"))
    for name in objectives:
        dirs.setdefault(name, shipped_dir(f"aligned-{name}"))
    bundle = digits_bundle(objectives, model_dirs=dirs, guidance_scale=guidance_scale)
    rewards = [bundle.rewards[o] for o in objectives]
    cond = class_conditions(samples)
    out = Path(out)
    common = dict(
        shape=(samples, *bundle.sample_shape),
        cond=cond,
        num_inference_steps=steps,
        guidance_scale=bundle.guidance_scale,
        null_cond=bundle.null_cond,
        progress=progress,
    )

    def run(method: str, weights: dict[str, float]) -> tuple[dict[str, Any], Tensor]:
        plan = plan_method(method, bundle, weights or None)
        start = time.perf_counter()
        res = sample(plan.models, bundle.scheduler, plan.rule, seed=seed, reference=plan.reference, **common)
        x0 = res.samples.clamp(-1, 1)
        with torch.no_grad():
            vals = [r(x0, cond) for r in rewards]
        row = {
            "method": method,
            "weights": weights,
            "n": samples,
            "rewards": {o: _stats(v, seed) for o, v in zip(objectives, vals, strict=True)},
            "seconds": round(time.perf_counter() - start, 3),
            "model_evals": int(res.model_evals),
        }
        return row, x0

    t_all = time.perf_counter()
    results: list[dict[str, Any]] = []
    base_row, base_x = run(BASE, {})
    results.append(base_row)
    for w in grid:
        weights = {objectives[0]: float(w), objectives[1]: 1.0 - float(w)}
        # The planner's default target beta (sum_k w_k beta_k) keeps sum a_k = 1: the reference drops out.
        m_row, m_x = run(MSDDA.name, weights)
        d_row, d_x = run(DBMPA.name, weights)
        results.extend([m_row, d_row])
        _save_grid(
            out / f"samples_w{w:g}.png",
            {BASE: base_x, MSDDA.name: m_x, DBMPA.name: d_x},
            f"w({objectives[0]})={w:g}, w({objectives[1]})={1 - w:g}",
        )
    summary = {"task": "digits", "objectives": list(objectives), "results": results}
    write_json_atomic(out / "summary.json", summary)
    _save_pareto(out / "pareto.png", summary)
    logger.info("digits demo sampled in %.1fs", time.perf_counter() - t_all)
    return summary


def format_digits_table(summary: dict[str, Any]) -> str:
    """A short text table: method, weight on objective 1, mean rewards with 95% CIs, seconds."""
    o1, o2 = summary["objectives"]
    lines = [f"{'method':<8} {'w(' + o1 + ')':>14} {o1:>24} {o2:>24} {'s':>6}"]
    for r in summary["results"]:
        w = r["weights"].get(o1)
        ws = "-" if w is None else f"{w:.2f}"
        cells = []
        for o in (o1, o2):
            s = r["rewards"][o]
            cells.append(f"{s['mean']:8.4f} [{s['ci95'][0]:.3f},{s['ci95'][1]:.3f}]")
        lines.append(f"{r['method']:<8} {ws:>14} {cells[0]:>24} {cells[1]:>24} {r['seconds']:6.1f}")
    return "\n".join(lines)


__all__ = ["format_digits_table", "recipe_config", "recipe_offset_head", "run_digits_demo", "train_demo_weights"]
