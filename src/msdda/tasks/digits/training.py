"""Digits recipes: train the base denoiser, align it to a reward with step-level DPO, load shipped weights.

Shipped weights live in ``<package>/weights/digits/{base,aligned-alignment,aligned-ink,aligned-symmetry}/``
(``model.safetensors`` + ``config.json``). They are made by the documented commands (docs/digits.md)::

    msdda train-base --out src/msdda/weights/digits/base --seed 0
    msdda align --task digits --reward ink --beta ... --steps ... --out src/msdda/weights/digits/aligned-ink
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from msdda.alignment.diffusion import BaseTrainConfig, train_diffusion, training_scheduler_config
from msdda.alignment.dpo import DPOConfig, DPOResult, train_dpo
from msdda.alignment.io import (
    WEIGHTS_FILE,
    atomic_write_json,
    check_model_config,
    check_state_matches,
    load_tensors,
    read_model_config,
    save_model_dir,
)
from msdda.core.schedule import KernelScheduler, KernelSchedulerConfig
from msdda.distributed import get_context
from msdda.tasks.digits.data import NULL_CLASS, NUM_CLASSES, split_digits
from msdda.tasks.digits.network import DigitsDenoiser, DigitsDenoiserConfig

logger = logging.getLogger(__name__)

MODEL_TYPE = "msdda.digits_denoiser"
TASK = "digits"
REWARD_NAMES = ("alignment", "ink", "symmetry")


def weights_root() -> Path:
    """``<package>/weights/digits``."""
    return Path(__file__).resolve().parents[2] / "weights" / "digits"


def shipped_dir(name: str) -> Path:
    """Shipped model directory: name is "base" or "aligned-<reward>"."""
    return weights_root() / name


def digits_scheduler(num_train_timesteps: int = 1000) -> KernelScheduler:
    """The DDPM learned_range schedule the digits models are trained and sampled with."""
    return KernelScheduler(training_scheduler_config(num_train_timesteps))


def train_digits_base(
    out: str | os.PathLike[str],
    config: BaseTrainConfig | None = None,
    architecture: DigitsDenoiserConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the class-conditional base denoiser on the train split and save it (EMA weights) to `out`.

    Returns the stats (final losses, seconds). Deterministic given config.seed.
    """
    cfg = config or BaseTrainConfig()
    arch = architecture or DigitsDenoiserConfig()
    torch.manual_seed(cfg.seed)  # parameter init
    model = DigitsDenoiser(arch)
    split = split_digits(seed=0)
    sched = digits_scheduler(cfg.num_train_timesteps)
    trained, stats = train_diffusion(
        model, split.train_images, split.train_labels, cfg, null_class=NULL_CLASS, scheduler=sched, progress=progress
    )
    save_model_dir(
        trained,
        Path(out),
        model_type=MODEL_TYPE,
        task=TASK,
        architecture=arch.to_dict(),
        scheduler=sched.config.to_dict(),
        metadata={
            "kind": "base",
            "train_config": cfg.to_dict(),
            "final_loss": round(float(stats.get("loss", float("nan"))), 6),
            "train_seconds": round(float(stats["seconds"]), 1),
            "torch_threads": torch.get_num_threads(),
        },
    )
    return stats


def load_digits_model(
    directory: str | os.PathLike[str], expected_architecture: dict[str, Any] | None = None
) -> tuple[DigitsDenoiser, dict[str, Any]]:
    """Load a digits denoiser from a model directory (eval mode, frozen) and its config document.

    Raises CheckpointError before building anything if the directory is for another model type or task,
    or (when `expected_architecture` is given) another architecture; and if the tensors do not match.
    """
    directory = Path(directory)
    doc = read_model_config(directory)
    check_model_config(doc, directory, model_type=MODEL_TYPE, task=TASK, architecture=expected_architecture)
    arch = DigitsDenoiserConfig.from_dict(doc["architecture"])
    model = DigitsDenoiser(arch)
    state = load_tensors(directory / WEIGHTS_FILE)
    check_state_matches(model, state, directory / WEIGHTS_FILE)
    model.load_state_dict(state)
    model.eval().requires_grad_(False)
    return model, doc


def load_digits_models(
    directories: list[str | os.PathLike[str]],
) -> tuple[list[DigitsDenoiser], KernelScheduler]:
    """Load several digits models that must share the first one's architecture and schedule."""
    models: list[DigitsDenoiser] = []
    first_arch: dict[str, Any] | None = None
    sched_cfg: dict[str, Any] | None = None
    for d in directories:
        model, doc = load_digits_model(d, expected_architecture=first_arch)
        if first_arch is None:
            first_arch, sched_cfg = doc["architecture"], doc.get("scheduler") or None
        models.append(model)
    sched = KernelScheduler(KernelSchedulerConfig.from_dict(sched_cfg)) if sched_cfg else digits_scheduler()
    return models, sched


def class_conditions(n: int, generator: torch.Generator | None = None) -> Tensor:
    """[n] class labels: uniform over 0..9 from `generator`, or 0,1,..,9,0,.. when it is None."""
    if generator is None:
        return torch.arange(n) % NUM_CLASSES
    return torch.randint(0, NUM_CLASSES, (n,), generator=generator)


def align_digits(
    reward: Any,
    out: str | os.PathLike[str],
    config: DPOConfig,
    base: str | os.PathLike[str] | None = None,
    resume: bool = True,
    progress: bool = True,
    throttle: float = 0.0,
) -> DPOResult:
    """Step-level DPO of the digits base model (default: shipped base) towards `reward`; saves to `out`.

    reward: a callable (x0 [B,1,8,8], cond [B]) -> [B]. The result directory holds model.safetensors,
    config.json, train_log.jsonl, train_config.json and checkpoints/. Under torchrun / accelerate launch
    every process calls this; the batch is shared (see `train_dpo`) and rank 0 alone writes the directory.
    """
    ctx = get_context()
    base_dir = Path(base) if base is not None else shipped_dir("base")
    reference, doc = load_digits_model(base_dir)
    arch = DigitsDenoiserConfig.from_dict(doc["architecture"])
    sched = KernelScheduler(KernelSchedulerConfig.from_dict(doc["scheduler"])) if doc.get("scheduler") else (
        digits_scheduler()
    )
    policy = DigitsDenoiser(arch)
    policy.load_state_dict(reference.state_dict())
    out = Path(out)
    result = train_dpo(
        policy,
        reference,
        sched,
        reward,
        config,
        out=out,
        sample_shape=(1, 8, 8),
        cond_sampler=class_conditions,
        null_cond=torch.tensor([NULL_CLASS]),
        resume=resume,
        progress=progress,
        throttle=throttle,
        context=ctx,
    )
    if not ctx.is_main:
        ctx.barrier()  # return once rank 0 has written the model
        return result
    save_model_dir(
        result.model,
        out,
        model_type=MODEL_TYPE,
        task=TASK,
        architecture=arch.to_dict(),
        scheduler=sched.config.to_dict(),
        metadata={
            "kind": "aligned",
            "reward": config.reward,
            "base": str(base_dir.name if base is None else base_dir),
            "dpo_config": config.to_dict(),
            "train_seconds": round(result.seconds, 1),
            "final_eval": result.final_eval,
            "torch_threads": torch.get_num_threads(),
        },
    )
    atomic_write_json(out / "train_config.json", config.to_dict())
    ctx.barrier()
    return result
