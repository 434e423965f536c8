"""Resumable sweeps: methods x preference weights x prompts x seeds into an append-only results store.

A run folder holds `config.json` (the resolved SweepConfig) and the results store, one row per sample:
`results.jsonl` for a single process, `results.rank{r}.jsonl` for rank r of a multi-process run (each
process appends only to its own file). Readers (`read_rows(run_dir)`, `read_run_rows`, the report) see the
union of every results file in the folder. Work is cut into units (method, weights, prompt, seed), each one
sampler call on a batch; a unit's rows are appended in one write and fsynced. Rerunning the same command
resumes: rows of an incomplete unit (a kill mid-write) are dropped and the unit is redone, so the store ends
with no duplicate or missing rows. A unit counts as done when any results file holds it complete, so a run
can be resumed with another number of processes. The generator of a unit depends only on (seed, prompt),
never on the method, the weights, the order of work or the process count: methods are compared on common
random numbers, and a resumed or multi-process run equals an uninterrupted single-process one.

Under `torchrun` / `accelerate launch` the units, in their fixed planned order, go round-robin to the ranks
(unit i -> rank i % world_size); rank 0 alone creates the folder and writes config.json, the others wait at
a barrier and then check it (see `msdda.distributed`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from msdda.atomic import write_bytes_atomic
from msdda.config import JSONConfig
from msdda.core.rewards import is_differentiable
from msdda.distributed import DistContext, get_context
from msdda.errors import MSDDAError
from msdda.evaluation.store import (
    SweepError,
    _append_rows,
    _prepare_shared_run_dir,
    _repair_store,
    done_units,
    lock_and_prepare,
    read_run_rows,
    results_file,
    results_files,
)
from msdda.sampling import DBMPA, DBMPALS, MSDDA, RGG, CoDe, GaussianNoise, SingleModel, make_generator, sample
from msdda.sampling.methods import (
    BASE,
    REWARDED_SOUP,
    SOUP_AVERAGES,
    MethodPlan,
    PlanError,
    _takes_keyword,
    get_method,
    is_weighted,
    method_names,
    plan_method,
    registered_methods,
)
from msdda.tasks.bundle import TaskBundle

logger = logging.getLogger(__name__)

# Largest sweep seed: unit_seed(seed, prompt) = seed * 1_000_003 + prompt must fit torch.Generator's 64 bits.
MAX_SEED = (2**63 - 1) // 1_000_003 - 1


@dataclass
class SweepConfig(JSONConfig):
    """Everything that determines a sweep's results (written to the run folder as config.json)."""

    config_error = SweepError

    task: str = "digits"
    objectives: list[str] | None = None  # default: the task's first two
    methods: list[str] = field(default_factory=lambda: [BASE, MSDDA.name, DBMPA.name])
    weights: list[dict[str, float]] | None = None  # explicit grid; default: grid_points per edge
    grid_points: int = 5
    prompts: list[Any] | None = None  # default: the task's prompts
    seeds: list[int] = field(default_factory=lambda: [0])
    batch_size: int = 8
    steps: int = 50
    # target KL strength; None: sum_k w_k beta_k, so the exponents sum to 1 and the reference drops out
    beta: float | None = None
    code_candidates: int = 4
    code_block: int = 5
    rgg_scale: float | None = None  # None: the task's calibrated scale
    # rewarded-soup on LoRA objectives: "delta" (dW = sum_k w_k B_k A_k, exact) or "factors" (the factor average
    # of Diffusion Blend's released baseline); written to config.json only when not the default
    soup_average: str = "delta"
    save_samples: bool = True
    task_options: dict[str, Any] = field(default_factory=dict)
    # step-rl: train a missing policy on first use (minutes per w); False fails fast naming `msdda train-step-rl`.
    # A run-time choice that never changes a result, so it is not written to config.json (a resume may flip it).
    train_policies: bool = True

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d.pop("train_policies", None)
        if d.get("soup_average") == "delta":  # the default: configs written before the option still match
            d.pop("soup_average")
        return d


def simplex_grid(objectives: Sequence[str], points_per_edge: int) -> list[dict[str, float]]:
    """All weight vectors with coordinates in {0, 1/(n-1), ..., 1} summing to 1 (n = points_per_edge)."""
    if points_per_edge < 2:
        raise SweepError(f"grid_points={points_per_edge}; at least 2 points (the two ends) are needed")
    n = points_per_edge - 1
    k = len(objectives)
    grid = []
    for combo in itertools.product(range(n + 1), repeat=k - 1):
        if sum(combo) <= n:
            counts = [*combo, n - sum(combo)]
            grid.append({o: c / n for o, c in zip(objectives, counts, strict=True)})
    # order: by weight on the first objective, ascending (reads left to right on a front)
    return sorted(grid, key=lambda w: tuple(w[o] for o in objectives))


def validate_weights(grid: Sequence[Mapping[str, float]], objectives: Sequence[str]) -> list[dict[str, float]]:
    """Each entry: weights for known objectives (missing ones are 0), finite, >= 0, summing to 1."""
    if not grid:
        raise SweepError("the weight grid is empty; give at least one weight vector, e.g. {'a': 0.5, 'b': 0.5}")
    out = []
    for i, w in enumerate(grid):
        if not isinstance(w, Mapping):
            raise SweepError(f"weight grid entry {i} is {w!r}; each entry maps objective names to weights")
        unknown = sorted(set(w) - set(objectives))
        if unknown:
            raise SweepError(f"weight grid entry {i} names unknown objectives {unknown}; valid: {list(objectives)}")
        bad = [(o, v) for o, v in w.items() if isinstance(v, bool) or not hasattr(v, "__float__")]
        if bad:
            raise SweepError(f"weight grid entry {i}: weight {bad[0][1]!r:.40} for {bad[0][0]!r} is not a number")
        full = {o: float(w.get(o, 0.0)) for o in objectives}
        for o, v in full.items():
            if not math.isfinite(v) or v < 0:
                raise SweepError(f"weight grid entry {i}: weight {v} for {o!r} must be finite and >= 0")
        total = math.fsum(full.values())
        if not math.isclose(total, 1.0, rel_tol=1e-6):
            raise SweepError(f"weight grid entry {i} sums to {total:.6g}; preference weights must sum to 1")
        out.append(full)
    return out


def supported_methods(bundle: TaskBundle, *, include_training: bool = True) -> list[str]:
    """Every registered method (but the per-objective `single:<objective>`) this task can run, in registry order.

    include_training=False leaves out the methods that train a model per weight vector (step-rl)."""
    out = []
    for spec in registered_methods():
        if spec.takes_argument or (spec.needs_soup and bundle.soup is None):
            continue
        if spec.needs_weighted_policy and (not include_training or getattr(bundle, "weighted_policy", None) is None):
            continue
        if spec.needs_gradients and not all(is_differentiable(r) for r in bundle.rewards.values()):
            continue
        out.append(spec.name)
    return out


def _check_methods(methods: Sequence[str], objectives: Sequence[str], bundle: TaskBundle) -> None:
    """Every method is registered and runnable on this task (the planner's registry says what each needs)."""
    if not methods:
        raise SweepError(f"no methods given; choose from {method_names()}")
    for m in methods:
        try:
            spec, argument = get_method(m)
        except PlanError as exc:
            raise SweepError(str(exc)) from exc
        if argument is not None and argument not in objectives:
            raise SweepError(f"method {m!r}: unknown objective {argument!r}; valid: {list(objectives)}")
        if spec.needs_soup and bundle.soup is None:
            raise SweepError(f"task {bundle.name!r} has no parameterised models, so {m} is not available")
        if spec.needs_weighted_policy and getattr(bundle, "weighted_policy", None) is None:
            raise SweepError(f"task {bundle.name!r} has no step-RL policies, so {m} is not available; drop it")
        if spec.needs_gradients:
            for o in objectives:
                if not is_differentiable(bundle.rewards[o]):
                    raise SweepError(f"{m} needs differentiable rewards; {o!r} is not (drop {m} or that objective)")


@dataclass(frozen=True)
class Unit:
    """One sampler call: `batch_size` samples of one method at one weight, prompt and seed."""

    method: str
    weights: tuple[tuple[str, float], ...] | None
    prompt_index: int
    seed: int

    @property
    def key(self) -> str:
        w = "-" if self.weights is None else ",".join(f"{o}={v:.6g}" for o, v in self.weights)
        return f"{self.method}|{w}|p{self.prompt_index}|s{self.seed}"


def plan_units(
    cfg: SweepConfig, objectives: Sequence[str], grid: Sequence[Mapping[str, float]], num_prompts: int
) -> list[Unit]:
    """All units of a sweep in a fixed order (the order never affects any unit's result)."""
    units = []
    for method in cfg.methods:
        weight_list: list[tuple[tuple[str, float], ...] | None]
        if is_weighted(method):
            weight_list = [tuple((o, w[o]) for o in objectives) for w in grid]
        else:
            weight_list = [None]
        for w in weight_list:
            for p in range(num_prompts):
                for s in cfg.seeds:
                    units.append(Unit(method, w, p, int(s)))
    return units


def unit_seed(seed: int, prompt_index: int) -> int:
    """The generator seed of a unit: common to every method and weight at this (seed, prompt)."""
    return int(seed) * 1_000_003 + int(prompt_index)


def method_options(method: str, cfg: SweepConfig) -> dict[str, Any]:
    """The sweep's settings for a method, as the planner's options (CoDe's N and B, RGG's scale)."""
    name = get_method(method)[0].name
    if name == CoDe.name:
        return {"num_candidates": cfg.code_candidates, "block_size": cfg.code_block}
    if name == RGG.name and cfg.rgg_scale is not None:
        return {"scale": cfg.rgg_scale}
    if name == REWARDED_SOUP and cfg.soup_average != "delta":
        return {"average": cfg.soup_average}
    if get_method(method)[0].needs_weighted_policy and not cfg.train_policies:
        return {"train": False}
    return {}


FUSION_METHODS = (MSDDA.name, DBMPA.name, DBMPALS.name, REWARDED_SOUP)  # built from the K aligned models


def aligned_train_seconds(bundle: TaskBundle) -> dict[str, float]:
    """{objective: seconds} each aligned model's training took, when the task records it ({} otherwise)."""
    found = getattr(bundle, "aligned_train_seconds", None)
    if found is None:
        found = getattr(getattr(bundle, "weighted_policy", None), "aligned_train_seconds", None)
    return {str(k): float(v) for k, v in (found or {}).items()}


def training_record(
    method: str, plan: MethodPlan, bundle: TaskBundle, objectives: Sequence[str]
) -> dict[str, float | str | None]:
    """What a unit's models cost to train, for its rows: "train_seconds" (and "policy") of the policy a
    per-w method trained for this weight vector; "aligned_train_seconds", the one-time training of the aligned
    models a fusion method (or single:<objective>) is built from; {} for the rest (the base model only)."""
    spec, argument = get_method(method)
    if spec.needs_weighted_policy:
        return {"train_seconds": plan.record.get("train_seconds"), "policy": plan.record.get("policy")}
    seconds = aligned_train_seconds(bundle)
    used = list(objectives) if spec.name in FUSION_METHODS else [argument] if spec.name == SingleModel.name else []
    if used and all(o in seconds for o in used):
        return {"aligned_train_seconds": math.fsum(seconds[o] for o in used)}
    return {}


def build_method(
    method: str, bundle: TaskBundle, weights: Mapping[str, float] | None, cfg: SweepConfig, objectives: Sequence[str]
) -> MethodPlan:
    """The plan of one method at one weight vector (`msdda.sampling.plan_method` with the sweep's settings)."""
    w = None if weights is None else {o: weights[o] for o in objectives}
    return plan_method(method, bundle, w, beta=cfg.beta, options=method_options(method, cfg))


@dataclass
class SweepResult:
    """run_dir; units_total: units of the whole sweep; units_run: units sampled by this call (summed over
    the ranks of a multi-process run); rows: rows in the folder's whole store afterwards."""

    run_dir: Path
    units_total: int
    units_run: int
    rows: int
    rank: int = 0
    world_size: int = 1


def _normalised_config(cfg: SweepConfig) -> SweepConfig:
    """The config with its field types checked (SweepError naming the field) and repeated methods and seeds
    given once (in first-seen order): a repeat would only write the same rows twice. Objectives must not
    repeat (each names one aligned model and one reward axis)."""
    for name in ("batch_size", "steps", "grid_points", "code_candidates", "code_block"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise SweepError(f"{name}={value!r:.40} must be an integer, not a {type(value).__name__}")
    for name in ("beta", "rgg_scale"):
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise SweepError(f"{name}={value!r:.40} must be a number or None, not a {type(value).__name__}")
    if not isinstance(cfg.save_samples, bool):
        raise SweepError(f"save_samples={cfg.save_samples!r:.40} must be True or False")
    for name, value in (("methods", cfg.methods), ("seeds", cfg.seeds), ("objectives", cfg.objectives or [])):
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise SweepError(f"{name}={value!r:.80} must be a list (e.g. {name}=[...]), not a {type(value).__name__}")
    bad = [m for m in [*cfg.methods, *(cfg.objectives or [])] if not isinstance(m, str)]
    if bad:
        raise SweepError(f"methods and objectives are names (strings); got {bad[0]!r:.60}")
    if cfg.objectives is not None:
        repeated = sorted({o for o in cfg.objectives if list(cfg.objectives).count(o) > 1})
        if repeated:
            raise SweepError(f"objectives {list(cfg.objectives)} name {repeated} more than once; give each once")
    for s in cfg.seeds:
        if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s <= MAX_SEED:
            raise SweepError(f"seed {s!r} must be an integer in [0, {MAX_SEED}] (it seeds a torch.Generator)")
    methods, seeds = list(dict.fromkeys(cfg.methods)), list(dict.fromkeys(cfg.seeds))
    if methods == list(cfg.methods) and seeds == list(cfg.seeds):
        return cfg
    logger.warning("repeated methods or seeds given once: methods %s, seeds %s", methods, seeds)
    return dataclasses.replace(cfg, methods=methods, seeds=seeds)


def run_sweep(
    cfg: SweepConfig,
    run_dir: Path | str,
    bundle_factory: Callable[[SweepConfig], TaskBundle],
    *,
    overwrite: bool = False,
    progress: bool = True,
    shard: tuple[int, int] | None = None,
    on_unit_done: Callable[[Unit], None] | None = None,
) -> SweepResult:
    """Run (or resume) a sweep into `run_dir`; units i with i % world_size == rank are this process's share.

    shard: None (default) takes (rank, world_size) from the launcher (`msdda.distributed.get_context()`: one
    process unless started by torchrun / accelerate launch), and the ranks coordinate through collectives
    (rank 0 prepares the folder, the others wait and check it). An explicit (rank, world_size) runs that
    share without any communication, for callers that schedule the shares themselves (one after another,
    or as independent jobs); each such call prepares and checks the folder on its own.
    Each rank appends to `results_file(run_dir, rank, world_size)`; units complete in any results file of
    the folder are skipped, so a run resumes under any process count without duplicate or missing units.
    """
    run_dir = Path(run_dir)
    cfg = _normalised_config(cfg)
    bundle = bundle_factory(cfg)
    objectives = list(cfg.objectives or bundle.objectives[:2])
    unknown = sorted(set(objectives) - set(bundle.objectives))
    if unknown:
        raise SweepError(f"unknown objectives {unknown} for task {bundle.name!r}; valid: {bundle.objectives}")
    if len(objectives) < 2:
        raise SweepError(f"a sweep needs at least 2 objectives, got {objectives}")
    if cfg.batch_size < 1 or cfg.steps < 1:
        raise SweepError(f"batch_size={cfg.batch_size} and steps={cfg.steps} must be >= 1")
    if not cfg.seeds:
        raise SweepError("no seeds given; pass at least one seed")
    grid = validate_weights(
        cfg.weights if cfg.weights is not None else simplex_grid(objectives, cfg.grid_points), objectives
    )
    grid = list({tuple(w.items()): w for w in grid}.values())  # a repeated weight vector is one set of units
    _check_methods(cfg.methods, objectives, bundle)
    if cfg.soup_average not in SOUP_AVERAGES:
        raise SweepError(f"soup_average={cfg.soup_average!r:.40}; choose one of {', '.join(SOUP_AVERAGES)}")
    if cfg.soup_average == "factors" and REWARDED_SOUP in cfg.methods and not _takes_keyword(bundle.soup, "average"):
        raise SweepError(
            f"soup_average='factors' averages LoRA factors, but task {bundle.name!r} interpolates full parameters; "
            "drop --soup-average (its soup is the 'delta' one)"
        )
    if not isinstance(cfg.train_policies, bool):
        raise SweepError(f"train_policies={cfg.train_policies!r:.40} must be True or False")
    for m in cfg.methods:  # build every rule once up front: bad settings fail before any sampling
        spec = get_method(m)[0]
        if is_weighted(m) and not spec.needs_soup:
            # a per-w policy is found (or trained) for every weight vector now: a missing one fails fast
            for w in grid if spec.needs_weighted_policy else grid[:1]:
                try:
                    build_method(m, bundle, w, cfg, objectives)
                except MSDDAError as exc:
                    raise SweepError(f"method {m!r}: {exc}") from exc
    prompts = list(cfg.prompts) if cfg.prompts is not None else list(bundle.prompts)
    if not prompts:
        raise SweepError("no prompts; pass at least one prompt (condition)")
    if shard is None:
        ctx = get_context()
        rank, world = ctx.rank, ctx.world_size
    else:
        rank, world = (int(x) for x in shard)
        if world < 1 or not 0 <= rank < world:
            raise SweepError(f"shard={shard!r}: need (rank, world_size) with world_size >= 1 and 0 <= rank < world")
        ctx = DistContext()  # an explicit share: no communication with other processes

    # One sweep writes a folder at a time (a second is refused, never interleaved); the lock is released
    # when the run ends in any way, a SIGKILL included.
    with contextlib.ExitStack() as held:
        if ctx.distributed:
            _prepare_shared_run_dir(run_dir, cfg, overwrite, ctx, held)
        else:
            lock_and_prepare(run_dir, cfg, overwrite, held, shard=None if shard is None else (rank, world))
        results = results_file(run_dir, rank, world)
        if results.exists():  # only this process appends to its file: repair it before appending
            _repair_store(results, cfg.batch_size)
        if rank == 0:  # files no current rank writes (left by a run with another process count)
            current = {results_file(run_dir, r, world) for r in range(world)}
            for f in results_files(run_dir):
                if f not in current:
                    _repair_store(f, cfg.batch_size)
        ctx.barrier()
        done = done_units(run_dir, cfg.batch_size)
        units = plan_units(cfg, objectives, grid, len(prompts))
        mine = [(i, u) for i, u in enumerate(units) if i % world == rank]
        todo = [(i, u) for i, u in mine if u.key not in done]
        logger.info(
            "sweep rank %d of %d: %d of its %d units to run (%d units done in %s)",
            rank,
            world,
            len(todo),
            len(mine),
            len(done),
            run_dir,
        )
        samples_dir = run_dir / "samples"
        if cfg.save_samples:
            samples_dir.mkdir(exist_ok=True)
        show = progress and ctx.is_main  # under a launcher: one bar (rank 0's share), not N interleaved ones
        desc = "sweep" if world == 1 else f"sweep rank {rank}/{world}"
        for position, unit in tqdm(todo, desc=desc, disable=not show):
            rows, samples = run_unit(unit, bundle, cfg, objectives, prompts)
            for row in rows:
                row["unit_index"] = position  # the unit's place in the plan: readers order the union by it
            if cfg.save_samples:
                _save_samples(samples_dir, unit, samples, bundle.decode)
            _append_rows(results, rows)
            if on_unit_done is not None:
                on_unit_done(unit)
        units_run = int(ctx.all_sum(torch.tensor([float(len(todo))])).item())  # also waits for every rank
        return SweepResult(run_dir, len(units), units_run, len(read_run_rows(run_dir)), rank, world)


def _safe_name(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=," else "_" for c in key)


def _save_samples(
    samples_dir: Path, unit: Unit, samples: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> None:
    """The unit's samples: raw tensors in one safetensors file, or, with a task's `decode`, one PNG image
    (uint8) per sample, `{unit}.{index:03d}.png` (see `sample_image_paths`)."""
    if decode is None:
        from safetensors.torch import save

        path = samples_dir / f"{_safe_name(unit.key)}.safetensors"
        write_bytes_atomic(path, save({"samples": samples.detach().float().contiguous().cpu()}))
        return
    with torch.no_grad():
        images = decode(samples)
    for i, png in enumerate(png_images(images)):
        write_bytes_atomic(samples_dir / f"{_safe_name(unit.key)}.{i:03d}.png", png)


def png_images(images: torch.Tensor) -> list[bytes]:
    """PNG bytes of each image of [B, 3, H, W] (or [B, 1, H, W]) in [0, 1], rounded to uint8."""
    import io

    from PIL import Image

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise SweepError(f"decoded samples must be images [B, 3, H, W] in [0, 1], got shape {list(images.shape)}")
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for array in pixels:
        buf = io.BytesIO()
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def samples_path(run_dir: Path, unit_key: str) -> Path:
    """The raw samples file of a unit (tasks without `decode`)."""
    return Path(run_dir) / "samples" / f"{_safe_name(unit_key)}.safetensors"


def sample_image_paths(run_dir: Path, unit_key: str, batch: int) -> list[Path]:
    """The PNG image of each of a unit's `batch` samples (tasks with `decode`)."""
    return [Path(run_dir) / "samples" / f"{_safe_name(unit_key)}.{i:03d}.png" for i in range(batch)]


def run_unit(
    unit: Unit, bundle: TaskBundle, cfg: SweepConfig, objectives: Sequence[str], prompts: Sequence[Any]
) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """Sample one unit and score it: one row per sample with every objective's reward and the unit's cost."""
    weights = None if unit.weights is None else dict(unit.weights)
    plan = build_method(unit.method, bundle, weights, cfg, objectives)
    prompt = prompts[unit.prompt_index]
    cond = bundle.make_cond(prompt, cfg.batch_size)
    # The generator lives where the task draws its noise (SD: on the CPU, as MSDDAPipeline and diffusers do).
    device = torch.device(bundle.device)
    generator = make_generator(None, unit_seed(unit.seed, unit.prompt_index), bundle.generator_device or device)
    shape = (cfg.batch_size, *bundle.sample_shape)
    x_T = None
    if bundle.init_noise_sigma != 1.0:  # x_T = sigma * randn, as diffusers' prepare_latents draws it
        source = bundle.noise if bundle.noise is not None else GaussianNoise()
        x_T = source.randn(shape, generator, device, bundle.dtype) * bundle.init_noise_sigma
    out = sample(
        plan.models,
        bundle.scheduler,
        plan.rule,
        shape=None if x_T is not None else shape,
        x_T=x_T,
        cond=cond,
        reference=plan.reference,
        num_inference_steps=cfg.steps,
        guidance_scale=bundle.guidance_scale,
        null_cond=bundle.null_cond if bundle.guidance_scale is not None else None,
        eta=bundle.eta,
        generator=generator,
        device=device,
        dtype=bundle.dtype,
        progress=False,
        noise=bundle.noise,
        final_step=bundle.final_step,
    )
    with torch.no_grad():
        scores = {
            o: bundle.rewards[o](out.samples, cond).detach().double().cpu()
            for o in bundle.objectives
            if o in objectives
        }
    cost = out.cost.to_dict()
    cost["reward_evals_final"] = len(objectives)
    training = training_record(unit.method, plan, bundle, objectives)
    rows = []
    for i in range(cfg.batch_size):
        rows.append(
            {
                "unit": unit.key,
                "method": unit.method,
                "weights": weights,
                "prompt": bundle.prompt_label(prompt),
                "prompt_index": unit.prompt_index,
                "seed": unit.seed,
                "index": i,
                "rewards": {o: float(scores[o][i]) for o in objectives},
                "cost": cost,
                "batch": cfg.batch_size,
                **training,
            }
        )
    return rows, out.samples


def iter_units(rows: Sequence[dict[str, Any]]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Rows grouped by unit key, in first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["unit"], []).append(r)
    yield from groups.items()
