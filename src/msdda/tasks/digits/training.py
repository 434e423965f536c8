"""Digits recipes: train the base denoiser, align it to a reward with step-level DPO, load shipped weights.

Shipped weights live in ``<package>/weights/digits/{base,aligned-alignment,aligned-ink,aligned-symmetry}/``
(``model.safetensors`` + ``config.json``). They are made by the documented commands (docs/digits.md)::

    msdda train-base --out src/msdda/weights/digits/base --seed 0
    msdda align --task digits --reward ink --beta ... --steps ... --out src/msdda/weights/digits/aligned-ink
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from msdda.alignment.diffusion import BaseTrainConfig, train_diffusion, training_scheduler_config
from msdda.alignment.dpo import DPOConfig, DPOResult, DPOTrainer
from msdda.atomic import write_json_atomic
from msdda.core.schedule import KernelScheduler, KernelSchedulerConfig
from msdda.distributed import get_context
from msdda.models.io import from_pretrained, read_model_config, save_pretrained
from msdda.tasks.digits.data import NULL_CLASS, NUM_CLASSES, DigitsTaskError, split_digits
from msdda.tasks.digits.network import DigitsDenoiser, DigitsDenoiserConfig, with_kernel_offsets

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
    checkpoint_every: int = 0,
    resume: bool = True,
) -> dict[str, Any]:
    """Train the class-conditional base denoiser on the train split and save it (EMA weights) to `out`.

    Returns the stats (final losses, seconds). Deterministic given config.seed. checkpoint_every > 0:
    write resumable checkpoints to out/checkpoints every that many steps (resume: continue from the newest).
    """
    cfg = config or BaseTrainConfig()
    arch = architecture or DigitsDenoiserConfig()
    torch.manual_seed(cfg.seed)  # parameter init
    model = DigitsDenoiser(arch)
    split = split_digits(seed=0)
    sched = digits_scheduler(cfg.num_train_timesteps)
    trained, stats = train_diffusion(
        model,
        split.train_images,
        split.train_labels,
        cfg,
        null_class=NULL_CLASS,
        scheduler=sched,
        progress=progress,
        checkpoint_dir=Path(out) / "checkpoints" if checkpoint_every > 0 else None,
        checkpoint_every=checkpoint_every,
        resume=resume,
    )
    save_pretrained(
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
    return from_pretrained(
        directory,
        lambda arch: DigitsDenoiser(DigitsDenoiserConfig.from_dict(arch)),
        model_type=MODEL_TYPE,
        task=TASK,
        architecture=expected_architecture,
    )


# The architecture fields that shape an aligned model's offset head; also align_digits' keywords of that name.
OFFSET_HEAD_FIELDS = ("kernel_offsets", "offset_head_ranges", "offset_head_x0")


def load_digits_models(
    directories: list[str | os.PathLike[str]],
) -> tuple[list[DigitsDenoiser], KernelScheduler]:
    """Load several digits models that must share the first one's architecture and schedule.

    Only the offset head (`OFFSET_HEAD_FIELDS`) may differ: aligned models carry one the reference
    lacks (DB-MPA, which averages outputs, counts a model without one as zero offsets)."""
    models: list[DigitsDenoiser] = []
    first_arch: dict[str, Any] | None = None
    sched_cfg: dict[str, Any] | None = None
    for d in directories:
        expected = None
        if first_arch is not None:
            arch = read_model_config(d).get("architecture", {})
            expected = {k: v for k, v in first_arch.items() if k not in OFFSET_HEAD_FIELDS}
            expected.update({k: arch[k] for k in OFFSET_HEAD_FIELDS if k in arch})
        model, doc = load_digits_model(d, expected_architecture=expected)
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


DIGITS_TRAIN_DEFAULTS: dict[str, Any] = {"beta": 0.05}  # the rest: the config dataclasses' own defaults


def digits_train_config(
    trainer: str = "bt", reward: str = "ink", *, beta: float | None = None, **overrides: Any
) -> Any:
    """The config of `trainer` on digits: a DPOConfig with labels=trainer ("bt", "listwise", "hard") or a
    StepRLConfig ("step-rl"), beta 0.05 unless given; `overrides` replace any field (e.g. steps=100)."""
    from msdda.alignment.step_rl import StepRLConfig

    fields = {**DIGITS_TRAIN_DEFAULTS, "reward": reward, **({"beta": beta} if beta is not None else {}), **overrides}
    if trainer == "step-rl":
        return StepRLConfig(**fields)
    return DPOConfig(**{**fields, "labels": trainer})


def align_digits(
    reward: Any,
    out: str | os.PathLike[str],
    config: DPOConfig,
    base: str | os.PathLike[str] | None = None,
    resume: bool = True,
    progress: bool = True,
    throttle: float = 0.0,
    kernel_offsets: bool = False,
    offset_head_ranges: Sequence[int] = (),
    offset_head_x0: bool = False,
) -> DPOResult:
    """Step-level training of the digits base model (default: shipped base) towards `reward`; saves to `out`.

    config: a DPOConfig (step-level DPO, `labels` picks the rule) or a StepRLConfig (direct step-level RL);
    `digits_train_config(trainer, reward, ...)` builds either with the digits defaults.

    kernel_offsets: give the aligned model a zero-initialised kernel-offset head (DigitsDenoiserConfig), so
    its kernel can reach the step optimum (the scheduler's parametrisation caps the mean by x0 clipping
    and confines the variance to [beta_tilde_t, beta_t]); the reference stays as it is. offset_head_ranges:
    timestep boundaries for one head per range (`DigitsDenoiserConfig.offset_head_ranges`; needs kernel_offsets).
    offset_head_x0: feed the head the clean estimate x0_hat too (`DigitsDenoiserConfig.offset_head_x0`).

    reward: a callable (x0 [B,1,8,8], cond [B]) -> [B]. The result directory holds model.safetensors,
    config.json, train_log.jsonl, train_config.json and checkpoints/. Under torchrun / accelerate launch
    every process calls this; the batch is shared (see `train_dpo`) and rank 0 alone writes the directory.
    """
    ctx = get_context()
    base_dir = Path(base) if base is not None else shipped_dir("base")
    reference, doc = load_digits_model(base_dir)
    arch = DigitsDenoiserConfig.from_dict(doc["architecture"])
    sched = (
        KernelScheduler(KernelSchedulerConfig.from_dict(doc["scheduler"]))
        if doc.get("scheduler")
        else (digits_scheduler())
    )
    policy = DigitsDenoiser(arch)
    policy.load_state_dict(reference.state_dict())
    if offset_head_ranges and not kernel_offsets:
        raise DigitsTaskError(f"offset_head_ranges={list(offset_head_ranges)} needs kernel_offsets=True")
    if offset_head_x0 and not kernel_offsets:
        raise DigitsTaskError("offset_head_x0=True needs kernel_offsets=True")
    if kernel_offsets:
        policy = with_kernel_offsets(policy, offset_head_ranges, offset_head_x0)
        arch = policy.config
    out = Path(out)
    from msdda.alignment.step_rl import StepRLConfig, StepRLTrainer

    trainer_class = StepRLTrainer if isinstance(config, StepRLConfig) else DPOTrainer
    result = trainer_class(
        policy,
        reference,
        sched,
        reward,
        config,
        out=out,
        sample_shape=(1, 8, 8),
        cond_sampler=class_conditions,
        null_cond=torch.tensor([NULL_CLASS]),
        context=ctx,
    ).train(resume=resume, progress=progress, throttle=throttle)
    if not ctx.is_main:
        ctx.barrier()  # return once rank 0 has written the model
        return result
    save_pretrained(
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
            "dpo_config": config.to_dict(),  # the trainer's config (the key predates the step-RL trainer)
            "trainer": "step-rl" if isinstance(config, StepRLConfig) else config.labels,
            "train_seconds": round(result.seconds, 1),
            "final_eval": result.final_eval,
            "torch_threads": torch.get_num_threads(),
        },
    )
    write_json_atomic(out / "train_config.json", config.to_dict(), sort_keys=True)
    ctx.barrier()
    return result
