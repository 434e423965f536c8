"""The `msdda` command line (layer 7): a thin face over the library.

Every argument is checked before any work and any file (a bad value is one `error: ...` line, exit 2), and
so is every output folder (an existing file or a read-only place is refused before training or sampling).
`entry` turns every msdda error and every OSError into one line on stderr and exit code 2; pass --debug
(or set MSDDA_DEBUG=1) for the full traceback.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import typer

from msdda.atomic import check_output_dir, incomplete_marker

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Multi-objective denoising-time alignment.")

SEED_MAX = 2**63 - 1  # a torch.Generator seed is 64 bits; the sweep's unit seeds need more room (see sweep)
_debug = False  # set by --debug: entry() then shows full tracebacks


def _seed(value: int) -> int:
    """typer callback of a --seed option: an integer in [0, 2**63 - 1], named in the error otherwise."""
    if value is not None and not 0 <= value <= SEED_MAX:
        raise typer.BadParameter(f"seed {value} is outside [0, {SEED_MAX}] (it seeds a torch.Generator)")
    return value


def _finite(value: float, option: str, *, positive: bool = False) -> float:
    """`value` if finite (and > 0 with `positive`), else BadParameter naming the option and the value."""
    if not math.isfinite(value) or (positive and value <= 0):
        need = "a finite number > 0" if positive else "a finite number"
        raise typer.BadParameter(f"{option} {value} must be {need}")
    return value


def _parse_seeds(text: str, option: str = "--seeds", maximum: int = SEED_MAX) -> list[int]:
    """Comma-separated integer seeds in [0, maximum]; a repeat is given once."""
    items = _split(text) or []
    if not items:
        raise typer.BadParameter(f"{option} {text!r} holds no seed; pass e.g. 0,1,2")
    seeds = []
    for item in items:
        if not re.fullmatch(r"[0-9]+", item):  # ASCII digits only: int() takes '²' or '٣' differently
            raise typer.BadParameter(f"{option} {text!r} must be comma-separated integers; {item!r} is not one")
        value = int(item)
        if value > maximum:
            raise typer.BadParameter(f"{option}: seed {value} is larger than {maximum}, the largest seed allowed")
        seeds.append(value)
    return list(dict.fromkeys(seeds))


def _parse_ints(text: str | None, option: str) -> list[int]:
    """Comma-separated non-negative integers in the order given (None: an empty list, the default)."""
    items = _split(text)
    if items is None:
        return []
    bad = [item for item in items if not re.fullmatch(r"[0-9]+", item)]
    if bad or not items:
        raise typer.BadParameter(f"{option} {text!r} must be comma-separated integers, e.g. 200,600")
    return [int(item) for item in items]


def _parse_names(text: str | None, option: str) -> list[str] | None:
    """Comma-separated names, each given once (None stays None: the default)."""
    names = _split(text)
    if names is None:
        return None
    if not names:
        raise typer.BadParameter(f"{option} {text!r} names nothing; pass comma-separated names")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise typer.BadParameter(f"{option} {text!r} names {repeated} more than once; give each once")
    return names


def _parse_digit_prompts(text: str) -> list[int]:
    """Digits prompts: comma-separated classes 0-9."""
    items = _split(text) or []
    if not items or not all(re.fullmatch(r"[0-9]", p) for p in items):
        raise typer.BadParameter(f"--prompts {text!r}: digits prompts are classes 0-9, e.g. 3,7")
    return [int(p) for p in items]


def _load_weight_grid(path: Path) -> list[dict[str, float]]:
    """A JSON list of {objective: weight} objects from `path` (never unpickled; numbers checked here)."""
    example = '[{"ink": 0.5, "symmetry": 0.5}]'
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read a weight grid from {path}: {exc.strerror or exc}") from None
    if raw[:1] == b"\x80":
        raise typer.BadParameter(f"--weights {path} looks like a pickle; msdda reads only JSON here, e.g. {example}")
    try:
        grid = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise typer.BadParameter(f"cannot read a weight grid from {path}: not JSON ({exc}); e.g. {example}") from None
    if isinstance(grid, dict):
        raise typer.BadParameter(
            f"--weights {path} holds one JSON object; a list of weight vectors is expected: wrap it in [ ], {example}"
        )
    if not isinstance(grid, list) or not grid:
        raise typer.BadParameter(f"--weights {path} must hold a non-empty JSON list of objects, e.g. {example}")
    for i, w in enumerate(grid):
        if not isinstance(w, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in w.values()
        ):
            raise typer.BadParameter(f"--weights {path}: entry {i} is {w!r:.80}; each maps objectives to numbers")
    return grid


def _check_reward_spec(spec: str) -> None:
    """A 'module:function' reward must name a Python callable taking (x0, cond), checked before any work
    (a built-in like os:system is refused rather than called). Registered names are left to the registry."""
    import importlib
    import inspect

    if ":" not in spec:
        return
    module_name, _, attr = spec.strip().partition(":")
    if not module_name or not attr:
        raise typer.BadParameter(f"--reward {spec!r} must look like 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # any failure while importing is the named module's
        raise typer.BadParameter(
            f"--reward {spec!r}: cannot import {module_name!r} ({type(exc).__name__}: {exc})"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise typer.BadParameter(f"--reward {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    fn = obj.__call__ if inspect.isclass(obj) else obj
    what = f"--reward {spec!r} names {type(obj).__name__} {getattr(obj, '__qualname__', obj)!s:.60}"
    shape = "a reward is a Python function fn(x0, cond) -> Tensor[B] (or a Reward class or object)"
    if not callable(obj) or inspect.isbuiltin(obj) or inspect.isbuiltin(fn) or inspect.ismodule(obj):
        raise typer.BadParameter(f"{what}, not a reward; {shape}")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        raise typer.BadParameter(f"{what}, whose signature cannot be read; {shape}") from None
    try:
        if inspect.isclass(obj):
            inspect.signature(obj).bind()  # get_reward builds a reward class without arguments here
            sig.bind(None, None, None)  # self, x0, cond
        else:
            sig.bind(None, None)
    except TypeError:
        raise typer.BadParameter(f"{what}{sig}, which does not take (x0, cond); {shape}") from None


def _parse_weights(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of numbers, e.g. 0,0.5,1") from exc
    if not values:
        raise typer.BadParameter("the weight grid is empty; pass e.g. 0,0.25,0.5,0.75,1")
    for v in values:
        if not 0.0 <= v <= 1.0:
            raise typer.BadParameter(f"weight {v} is outside [0, 1]")
    return values


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Folder for summary.json and plots."),
    task: str = typer.Option("digits", help="digits (shipped weights) or gaussian (the exact oracle)."),
    weights: str = typer.Option("0,0.25,0.5,0.75,1", help="Weights on objective 1, comma-separated."),
    samples: int = typer.Option(None, min=1, help="Samples per method and weight (digits 200, gaussian 2000)."),
    steps: int = typer.Option(50, min=1, max=1000, help="Reverse steps."),
    seed: int = typer.Option(0, callback=_seed, help="Seed of the sampler's generator."),
    from_scratch: bool = typer.Option(False, "--from-scratch", help="Retrain base and aligned models first."),
    train_steps_base: int = typer.Option(3000, min=1, hidden=True),
    train_steps_align: int = typer.Option(None, min=1, hidden=True),
    threads: int = typer.Option(
        1,
        min=1,
        help="torch CPU threads. 1 is the robust default: these small batches gain little from more "
        "threads, and oversubscribed OpenMP threads slow down badly when other processes share the cores.",
    ),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Compare MSDDA, DB-MPA and the base model (digits: shipped weights; gaussian: exact oracle)."""
    import torch

    torch.set_num_threads(threads)
    grid = _parse_weights(weights)
    if task not in ("digits", "gaussian"):
        raise typer.BadParameter(f"unknown task {task!r}; choose digits or gaussian")
    check_output_dir(out)
    if task == "gaussian":
        _gaussian_demo(out, grid, samples or 2000, steps, seed, quiet)
        return
    import time

    from msdda.evaluation.digits_demo import (
        DEFAULT_OBJECTIVES,
        format_digits_table,
        run_digits_demo,
        train_demo_weights,
    )

    start = time.perf_counter()
    dirs = None
    with incomplete_marker(out, "msdda demo"):  # several files: a killed demo leaves a folder saying so
        if from_scratch:
            dirs = train_demo_weights(
                out / "weights",
                DEFAULT_OBJECTIVES,
                seed=seed,
                base_steps=train_steps_base,
                align_steps=train_steps_align,
                progress=not quiet,
            )
        summary = run_digits_demo(
            out, grid=grid, samples=samples or 200, steps=steps, seed=seed, model_dirs=dirs, progress=not quiet
        )
    typer.echo(format_digits_table(summary))
    typer.echo(
        f"\nwrote {out / 'summary.json'}, {out / 'pareto.png'} and one samples_w*.png per weight "
        f"in {time.perf_counter() - start:.1f}s"
    )


def _gaussian_demo(out: Path, grid: list[float], samples: int, steps: int, seed: int, quiet: bool) -> None:
    from msdda.atomic import write_json_atomic
    from msdda.evaluation.oracle import format_table, run_oracle_demo

    summary = run_oracle_demo(grid, samples=samples, steps=steps, seed=seed, progress=not quiet)
    write_json_atomic(out / "summary.json", summary)
    typer.echo(format_table(summary))
    gap = max(r["max_gap_to_optimum"] for r in summary["results"] if "max_gap_to_optimum" in r)
    typer.echo(
        f"\nMSDDA's fused kernel matched the independently derived optimum at every step "
        f"(largest difference {gap:.1e}), so its step regret J(optimum) - J(kernel) is zero to float "
        f"precision; DB-MPA's is positive wherever both objectives carry weight."
    )
    typer.echo(f"wrote {out / 'summary.json'}")


@app.command("train-base")
def train_base(
    out: Path = typer.Option(..., help="Model directory to write (model.safetensors + config.json)."),
    seed: int = typer.Option(0, callback=_seed, help="Seed: initialisation, batches, timesteps, noise."),
    steps: int = typer.Option(3000, min=1, help="Optimiser steps (batch 256)."),
    batch_size: int = typer.Option(256, min=1, hidden=True),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Train the digits base denoiser (improved-DDPM hybrid loss, learned variance, CFG label dropout)."""
    from msdda.alignment.diffusion import BaseTrainConfig
    from msdda.tasks.digits.training import train_digits_base

    check_output_dir(out)  # before training, not after
    cfg = BaseTrainConfig(steps=steps, seed=seed, batch_size=batch_size, warmup_steps=min(100, steps))
    stats = train_digits_base(out, cfg, progress=not quiet)
    loss = stats.get("loss", float("nan"))
    typer.echo(f"trained base in {stats['seconds']:.1f}s (final loss {loss:.4f}); wrote {out}")


TRAINERS = ("bt", "listwise", "hard", "step-rl")


@app.command()
def align(
    out: Path = typer.Option(..., help="Run directory: final model, train_log.jsonl, checkpoints/."),
    task: str = typer.Option(
        "digits",
        help="digits (the shipped base), gaussian (a policy on the exact oracle), sd (a LoRA on a Stable "
        "Diffusion folder: needs --base and --prompt-file), sdxl, sd3, flux, pixart or dit (the same on those folders; "
        "dit's prompt file holds class names).",
    ),
    reward: list[str] = typer.Option(
        ...,
        help="digits: alignment, ink, symmetry or 'package.module:function'; gaussian: objective_1, objective_2; "
        "sd: jpeg-compressibility, jpeg-incompressibility, brightness, KIND=PATH (a reward model's local files, "
        "e.g. imagereward=models/ImageReward) or 'package.module:function' of (images, prompts). sd with "
        "--reward-weights: repeat it, one per reward (multi-objective step-level RL on sum_k w_k r_k).",
    ),
    reward_weights: str = typer.Option(
        None, help="sd: comma-separated weights w_k, one per --reward, for a LoRA on sum_k w_k r_k (e.g. 0.5,0.5)."
    ),
    trainer: str = typer.Option(
        "bt",
        help="bt: step-level DPO with Bradley-Terry soft labels on every candidate pair (fixed point p_ref "
        "exp(r/beta)/Z); listwise: the same over softmaxes; step-rl: maximise E[r] - beta KL directly; hard: "
        "best-vs-worst labels (no Gibbs fixed point: kept to reproduce older models).",
    ),
    beta: float = typer.Option(None, help="KL strength beta of the step-level problem (digits 0.05; gaussian beta_k)."),
    steps: int = typer.Option(None, min=1, help="Optimiser steps (digits 200)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the newest checkpoint in OUT."),
    lora: bool = typer.Option(False, "--lora", help="Train LoRA adapters (peft) instead of all weights (digits)."),
    kernel_offsets: bool = typer.Option(
        False, "--kernel-offsets", help="digits: a zero-initialised head that lets the kernel reach the optimum."
    ),
    offset_head_ranges: str = typer.Option(
        None,
        help="digits, with --kernel-offsets: comma-separated timestep boundaries, one offset head per range "
        "(e.g. 200,600: t < 200, 200-599, >= 600). Default: one head.",
    ),
    offset_head_x0: bool = typer.Option(
        False, "--offset-head-x0", help="digits, with --kernel-offsets: feed the offset head the clean estimate x0_hat."
    ),
    seed: int = typer.Option(0, callback=_seed, help="Seed of the training generator."),
    lr: float = typer.Option(None, help="Adam learning rate (digits 2e-5)."),
    lr_schedule: str = typer.Option(None, help="constant (default) or cosine (decays to 0 at the last step)."),
    trainable: str = typer.Option(
        None,
        help="Comma-separated parameter names or prefixes to train, the rest frozen (e.g. offset_head: only the "
        "kernel-offset head, the noise prediction stays the reference's). Default: all.",
    ),
    state_source: str = typer.Option(
        None, help="Whose trajectories the training states come from: policy (default), reference or mixed."
    ),
    state_weights: str = typer.Option(
        None, help="step-rl: uniform (default) or inverse_variance (each state's loss / its reference variance)."
    ),
    antithetic: bool = typer.Option(
        False, "--antithetic", help="step-rl: draw each state's samples in pairs (z, -z) (an even --candidates)."
    ),
    estimator: str = typer.Option(
        None,
        help="step-rl: auto (default), reparam, loo, or moment (regression onto the importance-sampled optimum).",
    ),
    base: Path = typer.Option(
        None, help="Base model directory (digits default: the shipped base; sd: a StableDiffusionPipeline folder)."
    ),
    prompt_file: Path = typer.Option(None, help="sd: training prompts, one per line (# comments, blanks skipped)."),
    lora_rank: int = typer.Option(None, min=1, help="sd: LoRA rank (8)."),
    lora_alpha: float = typer.Option(None, help="sd: LoRA alpha (8; the update is scaled by alpha / rank)."),
    lora_targets: str = typer.Option(None, help="sd: comma-separated UNet module names (to_q,to_k,to_v,to_out.0)."),
    dtype: str = typer.Option(None, help="sd: float32 (default), float16 or bfloat16 for the frozen weights."),
    device: str = typer.Option(None, help="sd: cpu (default), cuda, cuda:N or mps."),
    gradient_checkpointing: bool = typer.Option(
        False, "--gradient-checkpointing", help="sd: recompute UNet activations and reward passes in backward."
    ),
    num_inference_steps: int = typer.Option(None, min=2, help="sd: sampling steps of the training trajectories (50)."),
    guidance_scale: float = typer.Option(None, help="sd: CFG scale of policy and reference (7.5)."),
    scheduler: str = typer.Option(
        None, help="sd / sdxl: ddim (default, with --eta) or ddpm; pixart: ddpm (default) or ddim; sd3 / flux: flow."
    ),
    eta: float = typer.Option(
        None, help="DDIM eta of the training kernels, or the flow SDE's noise level (sd3, flux); in (0, 1] (default 1)."
    ),
    height: int = typer.Option(None, help="sd: training height in pixels (the UNet's sample size)."),
    width: int = typer.Option(None, help="sd: training width in pixels (the UNet's sample size)."),
    reward_batch: int = typer.Option(None, min=1, help="sd: candidates decoded and scored per chunk (8)."),
    variance_head: bool = typer.Option(
        False,
        "--variance-head",
        help="sd: also train a per-timestep, per-channel log-variance offset (saved as variance_head.safetensors), "
        "so this objective's kernel variance is its own and MSDDA's fusion differs from DB-MPA's average.",
    ),
    variance_head_buckets: int = typer.Option(
        None, min=1, max=1000, help="sd: timestep buckets of --variance-head (50)."
    ),
    allow_pickle: bool = typer.Option(
        False,
        "--allow-pickle",
        help="sd: let a reward model load a pickle checkpoint. Unpickling runs code from the file: trusted files only.",
    ),
    trajectories: int = typer.Option(None, min=1, help="Guided trajectories per step (digits 8, sd 2)."),
    states: int = typer.Option(None, min=1, help="Training states per trajectory (digits 4, sd 2)."),
    candidates: int = typer.Option(None, min=2, help="Candidates per state (DPO) or samples per state (step-rl)."),
    checkpoint_every: int = typer.Option(None, min=1, hidden=True),
    log_every: int = typer.Option(None, min=1, hidden=True),
    eval_samples: int = typer.Option(None, min=1, hidden=True),
    throttle: float = typer.Option(0.0, min=0.0, hidden=True),
    data_shards: int = typer.Option(
        1,
        min=1,
        help="Draw each step's trajectories as this many independent shards (own generators). Processes "
        "share them, so N processes need a multiple of N; runs with equal --data-shards match on any process count.",
    ),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Align a model to one reward with a step-level trainer (digits: the shipped base; gaussian: the oracle;
    sd: a LoRA on a Stable Diffusion folder).

    Under `torchrun --nproc-per-node N` or `accelerate launch --multi_gpu --num_processes N` the policy
    trains with DistributedDataParallel (gloo on CPU); pass --data-shards N (or a multiple).
    """
    if trainer not in TRAINERS:
        raise typer.BadParameter(f"--trainer {trainer!r}; choose one of {', '.join(TRAINERS)}")
    rewards = list(reward)
    # a LoRA on a diffusers folder (msdda.pipelines.sd_align)
    image_task = task in ("sd", "sdxl", "sd3", "flux", "pixart", "dit")
    if not image_task and (len(rewards) != 1 or reward_weights is not None):
        raise typer.BadParameter(
            f"--task {task} trains on one --reward and no --reward-weights (got {len(rewards)} rewards); several "
            "rewards with --reward-weights are for --task sd or pixart"
        )
    for value, option in ((beta, "--beta"), (lr, "--lr")):
        if value is not None:
            _finite(value, option, positive=True)
    overrides = {
        k: v
        for k, v in dict(
            steps=steps,
            lr=lr,
            trajectories=trajectories,
            states_per_trajectory=states,
            checkpoint_every=checkpoint_every,
            log_every=log_every,
            eval_samples=eval_samples,
            lr_schedule=lr_schedule,
            state_source=state_source,
            trainable=[n.strip() for n in trainable.split(",") if n.strip()] if trainable is not None else None,
        ).items()
        if v is not None
    }
    step_rl_only = (
        ("--state-weights", "state_weights", state_weights),
        ("--antithetic", "antithetic", antithetic or None),
        ("--estimator", "estimator", estimator),
    )
    for flag, name, value in step_rl_only:
        if value is not None:
            if trainer != "step-rl":
                raise typer.BadParameter(f"{flag} applies to --trainer step-rl, not {trainer!r}")
            overrides[name] = value
    if candidates is not None:
        overrides["samples" if trainer == "step-rl" else "candidates"] = candidates
    sd_given = {
        "--prompt-file": prompt_file,
        "--lora-rank": lora_rank,
        "--lora-alpha": lora_alpha,
        "--lora-targets": lora_targets,
        "--dtype": dtype,
        "--device": device,
        "--gradient-checkpointing": gradient_checkpointing or None,
        "--num-inference-steps": num_inference_steps,
        "--guidance-scale": guidance_scale,
        "--scheduler": scheduler,
        "--eta": eta,
        "--height": height,
        "--width": width,
        "--reward-batch": reward_batch,
        "--variance-head": variance_head or None,
        "--variance-head-buckets": variance_head_buckets,
        "--allow-pickle": allow_pickle or None,
    }
    if not image_task:
        given = [k for k, v in sd_given.items() if v is not None]
        if given:
            raise typer.BadParameter(
                f"{', '.join(given)} belong to --task sd (or pixart); task {task!r} takes none of them"
            )
    if image_task:
        for flag, value in (
            ("--lora", lora or None),
            ("--kernel-offsets", kernel_offsets or None),
            ("--offset-head-ranges", offset_head_ranges),
            ("--offset-head-x0", offset_head_x0 or None),
            ("--trainable", trainable),
        ):
            if value is not None:
                raise typer.BadParameter(f"{flag} is a digits option; --task sd always trains a LoRA (--lora-rank ...)")
        if variance_head_buckets is not None and not variance_head:
            raise typer.BadParameter("--variance-head-buckets sets the buckets of --variance-head; pass both")
        for value, option in ((guidance_scale, "--guidance-scale"), (eta, "--eta"), (lora_alpha, "--lora-alpha")):
            if value is not None:
                _finite(value, option)
        overrides.update(
            {
                k: v
                for k, v in dict(
                    lora_rank=lora_rank,
                    lora_alpha=lora_alpha,
                    lora_targets=_split(lora_targets),
                    num_inference_steps=num_inference_steps,
                    # FLUX.1-dev's embedded guidance defaults to diffusers' 3.5 (the others: CFG at 7.5)
                    guidance_scale=3.5 if guidance_scale is None and task == "flux" else guidance_scale,
                ).items()
                if v is not None
            }
        )
        _align_sd(
            task,
            out,
            base,
            rewards,
            reward_weights,
            prompt_file,
            trainer,
            beta,
            seed,
            resume,
            overrides,
            quiet,
            data_shards,
            throttle,
            dict(
                dtype=dtype,
                device=device,
                gradient_checkpointing=gradient_checkpointing,
                scheduler=scheduler,
                eta=eta,
                height=height,
                width=width,
                reward_batch=reward_batch,
                allow_pickle=allow_pickle,
                variance_head=variance_head,
                variance_head_buckets=variance_head_buckets,
            ),
        )
        return
    reward = rewards[0]
    if task == "gaussian":
        _align_gaussian(out, reward, trainer, beta, seed, resume, overrides, quiet)
        return
    if task != "digits":
        raise typer.BadParameter(
            f"task {task!r} is not available for training; use --task digits, gaussian, sd, sdxl, sd3, flux, pixart "
            "or dit"
        )
    from msdda.tasks.digits.training import align_digits, digits_train_config
    from msdda.tasks.rewards import get_reward

    _check_reward_spec(reward)
    check_output_dir(out)
    cfg = digits_train_config(trainer, reward, beta=beta, seed=seed, lora=lora, data_shards=data_shards, **overrides)
    result = align_digits(
        get_reward(reward),
        out,
        cfg,
        base=base,
        resume=resume,
        progress=not quiet,
        throttle=throttle,
        kernel_offsets=kernel_offsets,
        offset_head_ranges=_parse_ints(offset_head_ranges, "--offset-head-ranges"),
        offset_head_x0=offset_head_x0,
    )
    if not result.history:  # ranks other than 0 of a multi-process run: rank 0 reports
        return
    first = result.history[0]
    typer.echo(
        f"aligned to {reward!r} ({trainer}) in {result.seconds:.1f}s: held-out reward "
        f"{first.get('eval_reward', float('nan')):.4f} -> {result.final_eval.get('eval_reward', float('nan')):.4f}, "
        f"KL/step {result.final_eval.get('eval_kl_per_step', float('nan')):.4f} nats; wrote {out}"
    )


def _align_sd(
    task: str,
    out: Path,
    base: Path | None,
    rewards: list[str],
    reward_weights: str | None,
    prompt_file: Path | None,
    trainer: str,
    beta: float | None,
    seed: int,
    resume: bool,
    overrides: dict,
    quiet: bool,
    data_shards: int,
    throttle: float,
    sd_options: dict,
) -> None:
    """`msdda align --task sd|pixart`: every option checked before the pipeline loads, then `align_sd` /
    `align_pixart`."""
    from msdda.alignment.errors import AlignmentError
    from msdda.pipelines.cli import _read_prompt_file
    from msdda.pipelines.sd_align import (
        ALIGNERS,
        FAMILIES,
        SDAlignError,
        SDAlignOptions,
        check_base_folder,
        check_reward_weights,
        sd_train_config,
    )
    from msdda.pipelines.sd_task import SDTaskError
    from msdda.pipelines.sd_task import _check_reward_spec as check_sd_reward_spec

    family = FAMILIES[task]
    if base is None:
        raise typer.BadParameter(f"--task {task} needs --base DIR: a local {family.pipeline_classes[0]} folder")
    if prompt_file is None:
        raise typer.BadParameter(f"--task {task} needs --prompt-file FILE: the training prompts, one per line")
    prompts = _read_prompt_file(prompt_file)
    specs = [r.strip() for r in rewards]
    weights = None
    if reward_weights is not None:
        try:
            weights = [float(x) for x in _split(reward_weights) or []]
        except ValueError:
            raise typer.BadParameter(f"--reward-weights {reward_weights!r} must be numbers, e.g. 0.5,0.5") from None
    try:  # every option is checked here, before the pipeline loads: one error line naming the fix
        check_base_folder(base, family)
        names = []
        for spec in specs:
            if "=" in spec or ":" not in spec:
                names.append(check_sd_reward_spec("--reward", spec)[0])  # a built-in or KIND=PATH
            else:
                _check_reward_spec(spec)  # 'module:function', a function of (images, prompts)
                names.append(spec.rpartition(":")[2])
        weights = check_reward_weights(specs, weights)
        name = names[0] if weights is None else "+".join(f"{w:g}*{n}" for n, w in zip(names, weights, strict=True))
        options = SDAlignOptions(**{k: v for k, v in sd_options.items() if v is not None and v is not False})
        if options.scheduler is None:  # the family's kernels, checked with eta now
            options = SDAlignOptions(**{**options.to_dict(), "scheduler": family.default_scheduler})
        if sd_options.get("eta") is not None and options.scheduler not in ("ddim", "flow"):
            raise SDAlignError(
                f"--eta sets DDIM's noise; the {options.scheduler} kernels take none (or pass --scheduler ddim)"
            )
        cfg = sd_train_config(trainer, name, beta=beta, seed=seed, data_shards=data_shards, **overrides)
    except (SDAlignError, SDTaskError, AlignmentError) as exc:
        raise typer.BadParameter(str(exc)) from None
    check_output_dir(out)
    with _quiet_sd_loading(quiet):
        result = ALIGNERS[task](
            base,
            specs[0] if weights is None else specs,
            prompts,
            out,
            cfg,
            reward_weights=weights,
            options=options,
            resume=resume,
            progress=not quiet,
            throttle=throttle,
        )
    if not result.train.history:  # ranks other than 0 of a multi-process run: rank 0 reports
        return
    first = result.train.history[0]
    typer.echo(
        f"aligned a LoRA to {name!r} ({trainer}) in {result.train.seconds:.1f}s: held-out reward "
        f"{first.get('eval_reward', float('nan')):.4f} -> "
        f"{result.train.final_eval.get('eval_reward', float('nan')):.4f}, KL/step "
        f"{result.train.final_eval.get('eval_kl_per_step', float('nan')):.4f} nats; wrote {result.lora_file}"
    )


def _align_gaussian(
    out: Path, reward: str, trainer: str, beta: float | None, seed: int, resume: bool, overrides: dict, quiet: bool
) -> None:
    from msdda.tasks.gaussian import align_gaussian, gaussian_train_config

    check_output_dir(out)
    cfg = gaussian_train_config(trainer, reward, beta=beta, seed=seed, **overrides)
    result = align_gaussian(reward, out, cfg, trainer=trainer, resume=resume, progress=not quiet)
    ratio = result.fit.get("kl_to_optimum_over_reference")
    typer.echo(
        f"aligned the oracle policy to {reward!r} ({trainer}) in {result.train.seconds:.1f}s: "
        f"KL(optimum || policy) / KL(optimum || reference) = {ratio:.4f} (0 at the optimum); wrote {out}"
    )


def _parse_model_dirs(items: list[str], option: str) -> dict[str, Path]:
    """NAME=DIR pairs, each name once, each DIR an existing folder."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise typer.BadParameter(f"{option} {item!r}: write NAME=DIR, e.g. {option} ink=runs/ink")
        if name in out:
            raise typer.BadParameter(f"{option}: {name!r} is given twice")
        if not Path(path).is_dir():
            raise typer.BadParameter(f"{option} {item!r}: {path} is not a folder")
        out[name.strip()] = Path(path)
    return out


def _trained_steps(directory: Path) -> int | None:
    """The sampling steps a trained model's states came from (its config.json), if recorded."""
    import json

    try:
        doc = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    meta = doc.get("metadata", {}) if isinstance(doc, dict) else {}
    steps = meta.get("num_inference_steps") or (meta.get("dpo_config") or {}).get("num_inference_steps")
    return int(steps) if isinstance(steps, int) else None


@app.command()
def diagnose(
    out: Path = typer.Option(..., help="Folder for diagnose.json, diagnose_config.json and diagnose.png."),
    task: str = typer.Option("digits", help="digits or gaussian."),
    model: list[str] = typer.Option([], help="OBJECTIVE=DIR: diagnose this trained model in place of the task's."),
    policy: list[str] = typer.Option([], help="NAME=DIR: an extra single model scored at every weight (step-RL)."),
    objectives: str = typer.Option(None, help="Comma-separated objectives (default: all of the task's)."),
    methods: str = typer.Option(
        None,
        help="Comma-separated fusion rules (default: every fusion rule and base, and step-rl when the task has "
        "step-RL policies: cached ones are scored, missing ones skipped).",
    ),
    timesteps: str = typer.Option(None, help="Comma-separated timesteps of the states (default 960,...,20)."),
    draws: int = typer.Option(4096, min=4, help="Reference draws per state (antithetic pairs; even)."),
    trajectories: int = typer.Option(1, min=1, help="Reference trajectories per condition."),
    steps: int = typer.Option(
        None, min=1, max=1000, help="Steps of the states' schedule (default 50, or the grid --model was trained on)."
    ),
    seed: int = typer.Option(0, callback=_seed, help="Seed of every draw."),
    train_policies: bool = typer.Option(
        None,
        "--train-policies/--no-train-policies",
        help="step-rl: train missing per-w policies (default: only when step-rl is named in --methods).",
    ),
    threads: int = typer.Option(2, min=1, help="torch CPU threads."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """How far are the models and fusion rules from the step optimum MSDDA assumes? (docs/diagnose.md)"""
    import torch

    from msdda.evaluation.diagnose import (
        DEFAULT_METHODS,
        DEFAULT_TIMESTEPS,
        DiagnoseConfig,
        format_diagnose,
        run_diagnose,
    )
    from msdda.evaluation.tasks import get_task_bundle, load_task_model

    torch.set_num_threads(threads)
    check_output_dir(out)
    names = _parse_names(objectives, "--objectives")
    bundle = get_task_bundle(task, _task_options(task, names))
    models = {k: load_task_model(task, d) for k, d in _parse_model_dirs(model, "--model").items()}
    policies = {k: load_task_model(task, d) for k, d in _parse_model_dirs(policy, "--policy").items()}
    try:
        times = [int(t) for t in _split(timesteps)] if timesteps is not None else list(DEFAULT_TIMESTEPS)
    except ValueError as exc:
        raise typer.BadParameter(f"--timesteps {timesteps!r}: comma-separated integers, e.g. 960,480,20") from exc
    if steps is None:  # a trained model's kernels are those of the step grid it was trained on
        grids = {n for n in (_trained_steps(d) for d in [*_parse_model_dirs(model, "--model").values()]) if n}
        steps = grids.pop() if len(grids) == 1 else 50
    cfg = DiagnoseConfig(
        objectives=tuple(names) if names is not None else None,
        methods=tuple(_split(methods) or DEFAULT_METHODS),
        timesteps=tuple(times),
        num_inference_steps=steps,
        draws=draws,
        trajectories=trajectories,
        seed=seed,
        train_policies=train_policies,
    )
    summary = run_diagnose(
        bundle, models=models or None, policies=policies or None, config=cfg, out_dir=out, progress=not quiet
    )
    typer.echo(format_diagnose(summary))
    typer.echo(f"\nwrote {out / 'diagnose.json'} and {out / 'diagnose.png'}")


@app.command("train-classifier")
def train_classifier_cmd(
    out: Path = typer.Option(None, help="Output folder (default: the shipped location inside the package)."),
    seed: int = typer.Option(0, callback=_seed, help="Training seed."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Train the digit classifier behind the `alignment` reward and save it (safetensors + JSON)."""
    from msdda.tasks.digits.classifier import default_classifier_dir, train_and_save_default_classifier

    check_output_dir(default_classifier_dir() if out is None else out)  # before training, not after
    path = train_and_save_default_classifier(out_dir=out, seed=seed, progress=not quiet)
    typer.echo(f"wrote {path}")


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


def _task_methods(task: str) -> list[str]:
    """The default of `sweep --methods`: every method the task supports but those that train a model per
    weight vector (step-rl: minutes per w; name it in --methods to run it)."""
    from msdda.evaluation.sweep import supported_methods
    from msdda.evaluation.tasks import get_task_bundle

    return supported_methods(get_task_bundle(task), include_training=False)


def _parse_weight_vector(text: str, objectives: list[str]) -> dict[str, float]:
    """One --weights value: comma-separated finite weights >= 0, one per objective, not all zero."""
    items = _split(text) or []
    try:
        values = [float(x) for x in items]
    except ValueError:
        raise typer.BadParameter(f"--weights {text!r} must be comma-separated numbers, e.g. 0.25,0.75") from None
    if len(values) != len(objectives):
        raise typer.BadParameter(
            f"--weights {text!r} gives {len(values)} weight(s) for {len(objectives)} objectives {objectives}"
        )
    if any(not math.isfinite(v) or v < 0 for v in values) or not any(values):
        raise typer.BadParameter(f"--weights {text!r}: weights must be finite, >= 0 and not all zero")
    return dict(zip(objectives, values, strict=True))


@app.command("train-step-rl")
def train_step_rl(
    task: str = typer.Option("digits", help="Task whose step-RL policies to train (digits)."),
    objectives: str = typer.Option(None, help="Comma-separated objectives (default: the task's first two)."),
    grid_points: int = typer.Option(5, min=2, help="Points per simplex edge, as `msdda sweep --grid-points`."),
    weights: list[str] = typer.Option(
        [], help="One weight vector, comma-separated in --objectives order (repeatable); replaces the grid."
    ),
    beta: float = typer.Option(None, help="Target KL strength (default per w: sum_k w_k beta_k, as the sweep's)."),
    cache_dir: Path = typer.Option(
        None, help="Folder holding the policies (default: $MSDDA_CACHE_DIR/step-rl/digits, ~/.cache/msdda/...)."
    ),
    out: Path = typer.Option(None, help="With exactly one --weights: also copy that policy's folder to OUT."),
    steps: int = typer.Option(None, min=1, help="Trainer steps (default: the aligned models'; enters the key)."),
    trajectories: int = typer.Option(None, min=1, hidden=True),
    eval_samples: int = typer.Option(None, min=1, hidden=True),
    num_inference_steps: int = typer.Option(None, min=2, hidden=True),
    threads: int = typer.Option(1, min=1, help="torch CPU threads."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Train (or find cached) one multi-objective step-RL policy per weight vector: the `step-rl` baseline.

    Every policy the grid (or --weights) needs and the cache lacks is trained with the aligned models'
    trainer settings on r_w = sum_k w_k r_k at beta_w (minutes each on CPU); sweeps and `msdda diagnose`
    then load them. A one-hot w reuses the aligned model when it is that policy (trained with step-rl).
    """
    import shutil
    import tempfile

    import torch

    from msdda.atomic import replace_dir_atomic
    from msdda.evaluation.sweep import simplex_grid
    from msdda.sampling.methods import MissingPolicyError, default_beta

    torch.set_num_threads(threads)
    if task != "digits":
        raise typer.BadParameter(f"--task {task!r} has no step-RL policies to train; use --task digits")
    from msdda.tasks.digits.bundle import digits_bundle

    if beta is not None:
        _finite(beta, "--beta", positive=True)
    names = _parse_names(objectives, "--objectives")
    if out is not None and len(weights) != 1:
        raise typer.BadParameter(f"--out needs exactly one --weights vector (got {len(weights)})")
    if out is not None:
        check_output_dir(out)
        if out.is_dir() and any(out.iterdir()):
            raise typer.BadParameter(f"--out {out} is not empty; choose a new or empty folder")
    if cache_dir is not None:
        check_output_dir(cache_dir, "--cache-dir")
    bundle = digits_bundle(**({"objectives": names} if names is not None else {}))
    names = list(names or bundle.objectives[:2])
    if len(names) < 1:
        raise typer.BadParameter("--objectives names nothing")
    grid = [_parse_weight_vector(w, names) for w in weights] if weights else simplex_grid(names, grid_points)
    overrides = {
        k: v
        for k, v in dict(
            steps=steps, trajectories=trajectories, eval_samples=eval_samples, num_inference_steps=num_inference_steps
        ).items()
        if v is not None
    }
    policies = bundle.weighted_policy.with_options(
        cache_dir=cache_dir, trainer_overrides=overrides or None, progress=not quiet
    )
    rows = []
    for i, w in enumerate(grid, start=1):
        target = beta if beta is not None else default_beta(w, {o: bundle.beta_of(o) for o in w})
        label = ", ".join(f"{o}={v:g}" for o, v in w.items())
        try:
            entry = policies.ensure(w, target, train=False)
        except MissingPolicyError:
            typer.echo(f"[{i}/{len(grid)}] {label}: training (beta {target:g}); this takes minutes", err=True)
            entry = policies.ensure(w, target, train=True)
        status = {"cache": "cached", "trained": "trained", "shipped": "shipped", "aligned": "aligned model"}
        rows.append((label, entry, status.get(entry.status, entry.status)))
        typer.echo(f"[{i}/{len(grid)}] {label}: {rows[-1][2]} ({entry.directory})", err=True)
    width = max(len(r[0]) for r in rows)
    typer.echo(f"{'w':<{width}}  {'key':<16}  {'train (s)':>10}  status")
    for label, entry, status in rows:
        key = entry.key[:16] if entry.status != "aligned" else Path(entry.key).name
        secs = "-" if entry.train_seconds is None else f"{entry.train_seconds:.1f}"
        typer.echo(f"{label:<{width}}  {key:<16}  {secs:>10}  {status}")
    if out is not None:
        src = rows[0][1].directory
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoints"))
            if out.is_dir():
                out.rmdir()  # empty (checked above)
            replace_dir_atomic(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        typer.echo(f"wrote {out}")


def _task_options(task: str, objectives: list[str] | None) -> dict[str, Any]:
    """Bundle options for the named objectives: digits loads the shipped model of each one asked for (any of
    SHIPPED_OBJECTIVES), not only its default three."""
    return {"objectives": list(objectives)} if task == "digits" and objectives else {}


def _quiet_sd_loading(quiet: bool) -> Any:
    """diffusers' and transformers' loading bars and logging off while an SD pipeline loads (with --quiet)."""
    import contextlib

    if not quiet:
        return contextlib.nullcontext()
    from msdda.pipelines.cli import _quiet_libraries

    return _quiet_libraries(True)


def _sd_task_options(
    path: Path | None, base: Path | None, objective: list[str], reward: list[str], device: str | None, dtype: str | None
) -> dict[str, Any]:
    """The sd task's options: the --task-options JSON object, overridden by the flags, checked before any model
    loads (`msdda.pipelines.sd_task.check_sd_options`)."""
    from msdda.pipelines.cli import _parse_pairs
    from msdda.pipelines.sd_task import SDTaskError, check_sd_options, register

    register()
    options: dict[str, Any] = {}
    if path is not None:
        try:
            options = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise typer.BadParameter(f"--task-options {path}: cannot read a JSON object ({exc})") from None
        if not isinstance(options, dict):
            raise typer.BadParameter(f'--task-options {path} must hold one JSON object, e.g. {{"base": "sd15"}}')
    if base is not None:
        options["base"] = str(base)
    if objective:
        options["objectives"] = _parse_pairs(objective, "--objective", number=False)
    if reward:
        options["rewards"] = _parse_pairs(reward, "--reward", number=False)
    if device is not None:
        options["device"] = device
    if dtype is not None:
        options["dtype"] = dtype
    try:
        return check_sd_options(options)
    except SDTaskError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command()
def methods() -> None:
    """List the methods every command knows, what each does and what it costs."""
    from msdda.sampling.methods import registered_methods

    for spec in registered_methods():
        name = f"{spec.name}:<objective>" if spec.takes_argument else spec.name
        flags = (("rewards", spec.needs_rewards), ("reward gradients", spec.needs_gradients))
        flags += (("step-RL policies per w", spec.needs_weighted_policy),)
        needs = [w for w, on in (*flags, ("parameterised models", spec.needs_soup)) if on]
        extra = f"; needs {', '.join(needs)}" if needs else ""
        typer.echo(f"{name:<18} {spec.description}; cost: {spec.cost}{extra}")


@app.command()
def sweep(
    out: Path = typer.Option(..., help="Run folder (config.json, results.jsonl or results.rank*.jsonl, samples/)."),
    task: str = typer.Option("digits", help="Task: digits, gaussian or sd (Stable Diffusion: needs --base)."),
    methods: str = typer.Option(
        None,
        help="Comma-separated method names, e.g. base,msdda,db-mpa (`msdda methods` lists them; default: every "
        "method the task supports).",
    ),
    objectives: str = typer.Option(None, help="Comma-separated objectives (default: the task's first two)."),
    grid_points: int = typer.Option(5, help="Points per simplex edge (5 -> 0, .25, .5, .75, 1 for K = 2)."),
    weights_json: Path = typer.Option(None, "--weights", help="JSON file with an explicit grid [{obj: w}, ...]."),
    prompts: str = typer.Option(None, help="Comma-separated prompts (digits: classes 0-9; default: all)."),
    prompt_file: Path = typer.Option(
        None, help="sd: a text file of prompts, one per line (blank lines and lines starting with # skipped)."
    ),
    base: Path = typer.Option(None, help="sd: a local diffusers StableDiffusionPipeline folder."),
    objective: list[str] = typer.Option(
        [], help="sd: NAME=PATH, a LoRA (diffusers or peft format) or a full-UNet folder; repeat per objective."
    ),
    reward: list[str] = typer.Option(
        [],
        help="sd: NAME=SPEC per objective; SPEC is jpeg-compressibility, jpeg-incompressibility, brightness or "
        "KIND=PATH of a reward model (imagereward, pickscore, hpsv2, aesthetic, clip-score).",
    ),
    task_options_json: Path = typer.Option(
        None,
        "--task-options",
        help="sd: a JSON object of task options (base, objectives, rewards, betas, device, dtype, guidance_scale, "
        "scheduler, eta, height, width); the flags above override its entries.",
    ),
    device: str = typer.Option(None, help="sd: torch device, e.g. cuda (default cpu)."),
    dtype: str = typer.Option(None, help="sd: float32 | float16 | bfloat16 (default float32)."),
    seeds: str = typer.Option("0", help="Comma-separated seeds."),
    batch_size: int = typer.Option(8, min=1, help="Samples per sampler call (per method, weight, prompt, seed)."),
    steps: int = typer.Option(50, min=1, max=1000, help="Reverse steps."),
    beta: float = typer.Option(None, help="Target KL strength (default: sum_k w_k beta_k; exponents sum to 1)."),
    code_candidates: int = typer.Option(4, help="CoDe: candidates per block (N >= 1)."),
    code_block: int = typer.Option(5, help="CoDe: steps per block (B >= 1)."),
    soup_average: str = typer.Option(
        "delta",
        help="rewarded-soup on LoRA objectives: delta (dW = sum_k w_k B_k A_k, exact) or factors (the factor average "
        "of Diffusion Blend's released baseline, to reproduce its numbers).",
    ),
    rgg_scale: float = typer.Option(None, help="RGG: guidance scale lambda (default: the task's calibrated one)."),
    no_samples: bool = typer.Option(False, "--no-samples", help="Do not store samples (no image grids)."),
    train_policies: bool = typer.Option(
        True,
        "--train-policies/--no-train-policies",
        help="step-rl: train a missing per-w policy on first use (minutes each), or fail fast naming "
        "`msdda train-step-rl`.",
    ),
    overwrite: bool = typer.Option(
        False, help="Discard a different sweep in the run folder: removes only msdda's files (others stay)."
    ),
    throttle: float = typer.Option(0.0, min=0.0, hidden=True),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Run (or resume) methods x weights x prompts x seeds into an append-only results store.

    Under `torchrun --nproc-per-node N` or `accelerate launch --multi_gpu --num_processes N` (CPU processes
    too) the units are shared round-robin between the processes; each writes results.rank{r}.jsonl.
    """
    import time

    from msdda.evaluation.sweep import MAX_SEED, SweepConfig, run_sweep
    from msdda.evaluation.tasks import get_task_bundle

    grid = None if weights_json is None else _load_weight_grid(weights_json)
    seed_list = _parse_seeds(seeds, "--seeds", MAX_SEED)
    sd_flags = {"--base": base, "--prompt-file": prompt_file, "--task-options": task_options_json, "--device": device}
    sd_flags.update({"--dtype": dtype, "--objective": objective or None, "--reward": reward or None})
    given = [k for k, v in sd_flags.items() if v is not None]
    if task != "sd" and given:
        raise typer.BadParameter(f"{', '.join(given)} belong to --task sd; task {task!r} takes none of them")
    prompt_list: list | None = _split(prompts)
    if prompt_list is not None and task == "digits":
        prompt_list = _parse_digit_prompts(prompts)
    sd_options = None
    if task == "sd":
        sd_options = _sd_task_options(task_options_json, base, objective, reward, device, dtype)
        if prompt_list is not None:
            raise typer.BadParameter("--task sd reads its prompts from --prompt-file FILE (texts may hold commas)")
        if prompt_file is not None:
            from msdda.pipelines.cli import _read_prompt_file

            prompt_list = _read_prompt_file(prompt_file)
        elif not sd_options["prompts"]:
            raise typer.BadParameter("--task sd needs prompts: --prompt-file FILE (one prompt per line)")
    if beta is not None:
        _finite(beta, "--beta", positive=True)
    if rgg_scale is not None:
        _finite(rgg_scale, "--rgg-scale")
    check_output_dir(out)
    names = _parse_names(objectives, "--objectives")
    options = sd_options if sd_options is not None else _task_options(task, names)
    loaded: dict[str, Any] = {}  # the bundle is built once (an SD pipeline takes a while to load)

    def bundle_factory(c: SweepConfig) -> Any:
        key = json.dumps(c.task_options, sort_keys=True, default=str)
        if loaded.get("key") != key:
            with _quiet_sd_loading(task == "sd" and quiet):
                loaded.update(key=key, bundle=get_task_bundle(c.task, c.task_options))
        return loaded["bundle"]

    if methods is None:
        from msdda.evaluation.sweep import supported_methods

        probe = SweepConfig(task=task, task_options=options)
        method_list = supported_methods(bundle_factory(probe), include_training=False)
    else:
        method_list = _split(methods) or _task_methods(task)
    cfg = SweepConfig(
        task=task,
        task_options=options,
        objectives=names,
        methods=method_list,
        weights=grid,
        grid_points=grid_points,
        prompts=prompt_list,
        seeds=seed_list,
        batch_size=batch_size,
        steps=steps,
        beta=beta,
        code_candidates=code_candidates,
        code_block=code_block,
        soup_average=soup_average,
        rgg_scale=rgg_scale,
        save_samples=not no_samples,
        train_policies=train_policies,
    )
    res = run_sweep(
        cfg,
        out,
        bundle_factory,
        overwrite=overwrite,
        progress=not quiet,
        on_unit_done=(lambda _: time.sleep(throttle)) if throttle > 0 else None,  # tests interrupt real runs
    )
    if res.rank == 0:  # under torchrun / accelerate launch every rank gets here; one summary is enough
        store = out / "results.jsonl" if res.world_size == 1 else f"{out}/results.rank*.jsonl ({res.world_size} ranks)"
        typer.echo(f"{res.units_run} of {res.units_total} units run now; {res.rows} rows in {store}")


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A sweep's run folder."),
    reference_point: str = typer.Option(
        None, help="Comma-separated hypervolume reference point (default: shared minimum minus 10% of the range)."
    ),
) -> None:
    """Write metrics.json, pareto.png and a self-contained report.html for a sweep."""
    from msdda.evaluation.report import write_report

    ref = None
    if reference_point is not None:
        try:
            ref = [float(x) for x in reference_point.split(",")]
        except ValueError as exc:
            raise typer.BadParameter(f"--reference-point {reference_point!r} must be comma-separated numbers") from exc
    check_output_dir(run_dir, "RUN_DIR")  # metrics.json, pareto.png and report.html are written into it
    paths = write_report(run_dir, ref)
    typer.echo("\n".join(f"wrote {p}" for p in paths.values()))


def _register_optional_commands() -> None:
    from msdda.pipelines.cli import register

    register(app)


_register_optional_commands()


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error (or set MSDDA_DEBUG=1)."),
) -> None:
    global _debug
    _debug = debug
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def _one_line(exc: BaseException) -> str:
    """The message of an error as one line: what failed and why (OSError: the reason and the path)."""
    if isinstance(exc, OSError) and exc.strerror:
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        text = f"{exc.strerror}: {where}" if where else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _out_of_memory(exc: BaseException) -> bool:
    return (
        isinstance(exc, MemoryError)
        or type(exc).__name__ == "OutOfMemoryError"
        or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))
    )


def _corrupt_file_error(exc: BaseException) -> bool:
    """A file that cannot be decoded (truncated JSON or safetensors, a pickle where JSON belongs)."""
    return isinstance(exc, json.JSONDecodeError | UnicodeDecodeError) or type(exc).__name__ == "SafetensorError"


def entry(argv: list[str] | None = None) -> None:
    """Console entry point: every msdda error, OSError or usage mistake prints as one line `error: ...` on
    stderr with exit code 2, not a traceback (--debug or MSDDA_DEBUG=1 shows the traceback).

    After a successful command of a multi-process run (torchrun / accelerate launch) every rank waits for
    the others and the process group is torn down, so no rank leaves while a peer still talks to it.
    """
    try:  # typer vendors click from 0.2x on; its exceptions are not click's then
        from typer._click import exceptions as click_errors
    except ImportError:  # pragma: no cover - older typer uses click itself
        from click import exceptions as click_errors

    from msdda.distributed import shutdown
    from msdda.errors import MSDDAError

    args = sys.argv[1:] if argv is None else list(argv)
    try:
        code = app(args=args, prog_name="msdda", standalone_mode=False)
    except click_errors.NoArgsIsHelpError as exc:
        exc.show()
        raise SystemExit(exc.exit_code) from None
    except click_errors.ClickException as exc:  # a usage mistake: bad option, missing value, BadParameter
        hint = f" (see `{exc.ctx.command_path} --help`)" if getattr(exc, "ctx", None) is not None else ""
        typer.echo(f"error: {' '.join(exc.format_message().split())}{hint}", err=True)
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        raise SystemExit(130) from None
    except Exception as exc:
        debug = _debug or "--debug" in args or os.environ.get("MSDDA_DEBUG", "") not in ("", "0")
        corrupt = _corrupt_file_error(exc)
        if debug or not (isinstance(exc, MSDDAError | OSError) or _out_of_memory(exc) or corrupt):
            raise  # a bug, not a user's mistake: the traceback is what is needed
        if _out_of_memory(exc):
            message = f"{_one_line(exc)}; lower --batch-size or --samples"
        elif corrupt:
            message = f"a corrupt input file ({type(exc).__name__}: {_one_line(exc)}); rerun with --debug to see which"
        else:
            message = _one_line(exc)
        typer.echo(f"error: {message}", err=True)
        raise SystemExit(2) from None
    if code not in (None, 0):
        raise SystemExit(code)
    shutdown()


if __name__ == "__main__":
    entry()
