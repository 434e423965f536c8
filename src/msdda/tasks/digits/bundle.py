"""The digits task as a TaskBundle for sweeps: shipped base and aligned models, rewards, class prompts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from msdda.models.io import read_model_config
from msdda.models.soups import rewarded_soup
from msdda.tasks.bundle import TaskBundle
from msdda.tasks.digits.data import NULL_CLASS, NUM_CLASSES
from msdda.tasks.digits.step_rl import DigitsStepRLPolicies
from msdda.tasks.digits.training import load_digits_models, shipped_dir
from msdda.tasks.rewards import get_reward

# The default objectives (docs/digits.md, "The demo's objectives"): unsaturated, conflicting rewards of different
# step curvature (ink linear, template concave, contrast convex) whose aligned models are trained by step-RL.
OBJECTIVES = ("ink", "template", "contrast")
# Every objective with a shipped aligned model; alignment and symmetry are the earlier hard-label DPO models.
SHIPPED_OBJECTIVES = ("ink", "template", "contrast", "alignment", "symmetry")
DEFAULT_GUIDANCE = 2.0
# RGG's shift lambda_t * var_t * grad is tiny here at scale 1 (small per-step variances, sqrt(alpha_bar)
# tempering). 30 moves ink and template about as far as their aligned models do (80 samples, seed 1: ink
# 0.332 vs 0.344, template -0.093 vs -0.116); at 100 template's guidance diverges to infinite samples, and
# the 300 calibrated on the earlier objectives (alignment, ink, symmetry) diverges with template too
# (docs/evaluation.md). Pass --rgg-scale 300 to reproduce the earlier objectives' comparison.
RGG_SCALE = 30.0


def digits_bundle(
    objectives: Sequence[str] = OBJECTIVES,
    model_dirs: Mapping[str, str] | None = None,
    guidance_scale: float = DEFAULT_GUIDANCE,
) -> TaskBundle:
    """Load the base and one aligned model per objective (default: the shipped weights of `OBJECTIVES`; any of
    `SHIPPED_OBJECTIVES`, or another reward's name with its folder in `model_dirs`).

    model_dirs: {"base": dir, objective: dir} overrides. Prompts are the classes 0..9 (one class per
    sampler call); betas come from each aligned model's DPO config.
    """
    dirs = {k: Path(v) for k, v in (model_dirs or {}).items()}
    dirs.setdefault("base", shipped_dir("base"))
    for o in objectives:
        dirs.setdefault(o, shipped_dir(f"aligned-{o}"))
    models, scheduler = load_digits_models([dirs["base"], *(dirs[o] for o in objectives)])
    base, aligned = models[0], dict(zip(objectives, models[1:], strict=True))
    betas = {
        o: float(read_model_config(dirs[o]).get("metadata", {}).get("dpo_config", {}).get("beta", 1.0))
        for o in objectives
    }

    def soup(weights: Mapping[str, float]) -> torch.nn.Module:
        names = [o for o in objectives if o in weights]
        return rewarded_soup([aligned[o] for o in names], [weights[o] for o in names]).eval()

    return TaskBundle(
        name="digits",
        objectives=list(objectives),
        base=base,
        aligned=aligned,
        scheduler=scheduler,
        rewards={o: get_reward(o) for o in objectives},
        prompts=list(range(NUM_CLASSES)),
        sample_shape=(1, 8, 8),
        make_cond=lambda prompt, batch: torch.full((batch,), int(prompt), dtype=torch.long),
        betas=betas,
        guidance_scale=guidance_scale,
        null_cond=torch.tensor([NULL_CLASS]),
        soup=soup,
        prompt_label=lambda p: f"digit {p}",
        rgg_scale=RGG_SCALE,
        weighted_policy=DigitsStepRLPolicies(dirs["base"], dirs, betas, objectives=objectives, aligned=aligned),
    )
