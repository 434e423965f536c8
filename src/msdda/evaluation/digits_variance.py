"""Per-step statistics of the learned variances of the digits models (docs/digits.md, "findings").

All models are evaluated at the *same* states: the base model's own guided sampling trajectory, so
differences are due to the models, not to where they were evaluated.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from msdda.models.denoiser import ClassifierFreeGuidance
from msdda.sampling import SingleModel, sample
from msdda.tasks.digits.data import NULL_CLASS
from msdda.tasks.digits.training import class_conditions, load_digits_models


def variance_statistics(
    base_dir: str | os.PathLike[str],
    model_dirs: dict[str, str | os.PathLike[str]],
    *,
    samples: int = 100,
    steps: int = 50,
    guidance_scale: float = 2.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Per reverse step (t): for every model, mean and std over pixels and samples of log(var / var_base),
    the mean learned_range fraction, and KL(model || base) [nats]; for every pair of aligned models the
    mean |log(var_a / var_b)|. Returns {"timesteps": [...], "models": {name: {...: [per step]}},
    "pairs": {"a|b": [per step]}}.
    """
    names = list(model_dirs)
    models, sched = load_digits_models([base_dir, *(model_dirs[n] for n in names)])
    null = torch.tensor([NULL_CLASS])
    cond = class_conditions(samples)
    traj = sample(
        [models[0]],
        sched,
        SingleModel(),
        shape=(samples, 1, 8, 8),
        cond=cond,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        null_cond=null,
        seed=seed,
        progress=False,
        return_trajectory=True,
    ).trajectory
    assert traj is not None
    ts = [int(t) for t in sched.timesteps]
    guided = [ClassifierFreeGuidance(m, guidance_scale, null) for m in models]
    out: dict[str, Any] = {"timesteps": ts[:-1], "models": {n: {} for n in names}, "pairs": {}}
    keys = ("mean_log_var_ratio", "std_log_var_ratio", "mean_frac", "kl_to_base")
    for n in names:
        for k in keys:
            out["models"][n][k] = []
    out["models"]["base"] = {"mean_frac": []}
    pair_names = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    for a, b in pair_names:
        out["pairs"][f"{a}|{b}"] = []
    with torch.no_grad():
        for i, t in enumerate(ts[:-1]):  # the last step returns the mean; its variance is never used
            x = traj[i]
            tb = torch.full((samples,), t, dtype=torch.long)
            outs = [g(x, tb, cond) for g in guided]
            kers = [sched.kernel(o, t, x.double()) for o in outs]
            lv = [torch.log(k.var) for k in kers]
            out["models"]["base"]["mean_frac"].append(float(((outs[0][:, 1:] + 1) / 2).mean()))
            for j, n in enumerate(names, start=1):
                r = lv[j] - lv[0]
                out["models"][n]["mean_log_var_ratio"].append(float(r.mean()))
                out["models"][n]["std_log_var_ratio"].append(float(r.std()))
                out["models"][n]["mean_frac"].append(float(((outs[j][:, 1:] + 1) / 2).mean()))
                out["models"][n]["kl_to_base"].append(float(kers[j].kl(kers[0]).mean()))
            for a, b in pair_names:
                ja, jb = names.index(a) + 1, names.index(b) + 1
                out["pairs"][f"{a}|{b}"].append(float((lv[ja] - lv[jb]).abs().mean()))
    return out


def summarise_variance_statistics(
    stats: dict[str, Any], buckets: Sequence[tuple[int, int]] = ((999, 600), (599, 200), (199, 0))
) -> dict[str, Any]:
    """Average the per-step figures over timestep ranges (inclusive, descending), for a short table."""
    ts = stats["timesteps"]
    res: dict[str, Any] = {}
    for hi, lo in buckets:
        idx = [i for i, t in enumerate(ts) if lo <= t <= hi]
        label = f"t={hi}..{lo}"
        row: dict[str, Any] = {}
        for n, d in stats["models"].items():
            row[n] = {k: sum(v[i] for i in idx) / len(idx) for k, v in d.items()}
        for p, v in stats["pairs"].items():
            row[p] = sum(v[i] for i in idx) / len(idx)
        res[label] = row
    return res
