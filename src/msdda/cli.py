"""The `msdda` command line (layer 7): a thin face over the library."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Multi-objective denoising-time alignment.")


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
    seed: int = typer.Option(0, help="Seed of the sampler's generator."),
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
    if task == "gaussian":
        _gaussian_demo(out, grid, samples or 2000, steps, seed, quiet)
        return
    if task != "digits":
        raise typer.BadParameter(f"unknown task {task!r}; choose digits or gaussian")
    import time

    from msdda.evaluation.digits_demo import (
        DEFAULT_OBJECTIVES,
        format_digits_table,
        run_digits_demo,
        train_demo_weights,
    )

    start = time.perf_counter()
    dirs = None
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
    gap = max(r["max_gap_to_optimum"] for r in summary["results"] if r["method"] == "msdda")
    typer.echo(
        f"\nMSDDA's fused kernel matched the independently derived optimum at every step "
        f"(largest difference {gap:.1e}), so its step regret J(optimum) - J(kernel) is zero to float "
        f"precision; DB-MPA's is positive wherever both objectives carry weight."
    )
    typer.echo(f"wrote {out / 'summary.json'}")


@app.command("train-base")
def train_base(
    out: Path = typer.Option(..., help="Model directory to write (model.safetensors + config.json)."),
    seed: int = typer.Option(0, help="Seed: initialisation, batches, timesteps, noise."),
    steps: int = typer.Option(3000, min=1, help="Optimiser steps (batch 256)."),
    batch_size: int = typer.Option(256, min=1, hidden=True),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Train the digits base denoiser (improved-DDPM hybrid loss, learned variance, CFG label dropout)."""
    from msdda.alignment.diffusion import BaseTrainConfig
    from msdda.tasks.digits.training import train_digits_base

    cfg = BaseTrainConfig(steps=steps, seed=seed, batch_size=batch_size, warmup_steps=min(100, steps))
    stats = train_digits_base(out, cfg, progress=not quiet)
    loss = stats.get("loss", float("nan"))
    typer.echo(f"trained base in {stats['seconds']:.1f}s (final loss {loss:.4f}); wrote {out}")


@app.command()
def align(
    out: Path = typer.Option(..., help="Run directory: final model, train_log.jsonl, checkpoints/."),
    task: str = typer.Option("digits", help="Task (only 'digits' is embedded)."),
    reward: str = typer.Option(..., help="Reward name (alignment, ink, symmetry) or 'package.module:function'."),
    beta: float = typer.Option(0.05, help="KL strength beta of the step-level problem."),
    steps: int = typer.Option(200, min=1, help="DPO optimiser steps."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from the newest checkpoint in OUT."),
    lora: bool = typer.Option(False, "--lora", help="Train LoRA adapters (peft) instead of all weights."),
    seed: int = typer.Option(0, help="Seed of the training generator."),
    lr: float = typer.Option(2e-5, help="Adam learning rate."),
    base: Path = typer.Option(None, help="Base model directory (default: the shipped digits base)."),
    trajectories: int = typer.Option(8, min=1, hidden=True),
    states: int = typer.Option(4, min=1, hidden=True),
    candidates: int = typer.Option(4, min=2, hidden=True),
    checkpoint_every: int = typer.Option(50, min=1, hidden=True),
    log_every: int = typer.Option(25, min=1, hidden=True),
    eval_samples: int = typer.Option(40, min=1, hidden=True),
    throttle: float = typer.Option(0.0, min=0.0, hidden=True),
    data_shards: int = typer.Option(
        1,
        min=1,
        help="Draw each step's trajectories as this many independent shards (own generators). Processes "
        "share them, so N processes need a multiple of N; runs with equal --data-shards match on any process count.",
    ),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Align the digits base model to one reward with step-level DPO (full fine-tuning by default).

    Under `torchrun --nproc-per-node N` or `accelerate launch --multi_gpu --num_processes N` the policy
    trains with DistributedDataParallel (gloo on CPU); pass --data-shards N (or a multiple).
    """
    from msdda.alignment.dpo import DPOConfig
    from msdda.rewards import get_reward
    from msdda.tasks.digits.training import align_digits

    if task != "digits":
        raise typer.BadParameter(f"task {task!r} is not available for training; use --task digits")
    cfg = DPOConfig(
        reward=reward,
        beta=beta,
        steps=steps,
        lr=lr,
        seed=seed,
        lora=lora,
        trajectories=trajectories,
        states_per_trajectory=states,
        candidates=candidates,
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        eval_samples=eval_samples,
        data_shards=data_shards,
    )
    result = align_digits(get_reward(reward), out, cfg, base=base, resume=resume, progress=not quiet, throttle=throttle)
    if not result.history:  # ranks other than 0 of a multi-process run: rank 0 reports
        return
    first = result.history[0]
    typer.echo(
        f"aligned to {reward!r} in {result.seconds:.1f}s: held-out reward {first.get('eval_reward', float('nan')):.4f}"
        f" -> {result.final_eval.get('eval_reward', float('nan')):.4f}, KL/step "
        f"{result.final_eval.get('eval_kl_per_step', float('nan')):.4f} nats; wrote {out}"
    )


@app.command("train-classifier")
def train_classifier_cmd(
    out: Path = typer.Option(None, help="Output folder (default: the shipped location inside the package)."),
    seed: int = typer.Option(0, help="Training seed."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Train the digit classifier behind the `alignment` reward and save it (safetensors + JSON)."""
    from msdda.tasks.digits.classifier import train_and_save_default_classifier

    path = train_and_save_default_classifier(out_dir=out, seed=seed, progress=not quiet)
    typer.echo(f"wrote {path}")


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


@app.command()
def sweep(
    out: Path = typer.Option(..., help="Run folder (config.json, results.jsonl or results.rank*.jsonl, samples/)."),
    task: str = typer.Option("digits", help="Task: digits or gaussian."),
    methods: str = typer.Option(
        "base,msdda,db-mpa,db-mpa-ls,rewarded-soup,code,rgg",
        help="Comma-separated: base, single:<objective>, msdda, db-mpa, db-mpa-ls, rewarded-soup, code, rgg.",
    ),
    objectives: str = typer.Option(None, help="Comma-separated objectives (default: the task's first two)."),
    grid_points: int = typer.Option(5, help="Points per simplex edge (5 -> 0, .25, .5, .75, 1 for K = 2)."),
    weights_json: Path = typer.Option(None, "--weights", help="JSON file with an explicit grid [{obj: w}, ...]."),
    prompts: str = typer.Option(None, help="Comma-separated prompts (digits: classes 0-9; default: all)."),
    seeds: str = typer.Option("0", help="Comma-separated seeds."),
    batch_size: int = typer.Option(8, min=1, help="Samples per sampler call (per method, weight, prompt, seed)."),
    steps: int = typer.Option(50, min=1, max=1000, help="Reverse steps."),
    beta: float = typer.Option(None, help="Target KL strength (default: sum_k w_k beta_k; exponents sum to 1)."),
    code_candidates: int = typer.Option(4, help="CoDe: candidates per block (N >= 1)."),
    code_block: int = typer.Option(5, help="CoDe: steps per block (B >= 1)."),
    rgg_scale: float = typer.Option(None, help="RGG: guidance scale lambda (default: the task's calibrated one)."),
    no_samples: bool = typer.Option(False, "--no-samples", help="Do not store samples (no image grids)."),
    overwrite: bool = typer.Option(False, help="Discard a run folder that holds a different sweep."),
    throttle: float = typer.Option(0.0, min=0.0, hidden=True),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Run (or resume) methods x weights x prompts x seeds into an append-only results store.

    Under `torchrun --nproc-per-node N` or `accelerate launch --multi_gpu --num_processes N` (CPU processes
    too) the units are shared round-robin between the processes; each writes results.rank{r}.jsonl.
    """
    import json
    import time

    from msdda.evaluation.sweep import SweepConfig, run_sweep
    from msdda.evaluation.tasks import get_task_bundle

    grid = None
    if weights_json is not None:
        try:
            grid = json.loads(weights_json.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise typer.BadParameter(f"cannot read a weight grid from {weights_json}: {exc}") from exc
    try:
        seed_list = [int(x) for x in _split(seeds) or []]
    except ValueError as exc:
        raise typer.BadParameter(f"--seeds {seeds!r} must be comma-separated integers") from exc
    prompt_list: list | None = _split(prompts)
    if prompt_list is not None and task == "digits":
        if not all(p.isdigit() and 0 <= int(p) <= 9 for p in prompt_list):
            raise typer.BadParameter(f"--prompts {prompts!r}: digits prompts are classes 0-9")
        prompt_list = [int(p) for p in prompt_list]
    cfg = SweepConfig(
        task=task,
        objectives=_split(objectives),
        methods=_split(methods) or [],
        weights=grid,
        grid_points=grid_points,
        prompts=prompt_list,
        seeds=seed_list,
        batch_size=batch_size,
        steps=steps,
        beta=beta,
        code_candidates=code_candidates,
        code_block=code_block,
        rgg_scale=rgg_scale,
        save_samples=not no_samples,
    )
    res = run_sweep(
        cfg,
        out,
        lambda c: get_task_bundle(c.task, c.task_options),
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
    paths = write_report(run_dir, ref)
    typer.echo("\n".join(f"wrote {p}" for p in paths.values()))


def _register_optional_commands() -> None:
    from msdda.pipelines.cli import register

    register(app)


_register_optional_commands()


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def entry() -> None:
    """Console entry point: package errors print as one clear line (exit code 2), not a traceback.

    After a successful command of a multi-process run (torchrun / accelerate launch) every rank waits for
    the others and the process group is torn down, so no rank leaves while a peer still talks to it.
    """
    from msdda.distributed import shutdown
    from msdda.errors import MSDDAError

    try:
        app()
    except MSDDAError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    except SystemExit as exc:
        if exc.code in (None, 0):
            shutdown()
        raise
    shutdown()


if __name__ == "__main__":
    entry()
