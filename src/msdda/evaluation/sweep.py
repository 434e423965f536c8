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

import itertools
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from msdda.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from msdda.config import JSONConfig
from msdda.core.fusion import exponents_from_preferences
from msdda.distributed import DistContext, get_context
from msdda.errors import MSDDAError
from msdda.sampling import DBMPA, DBMPALS, MSDDA, RGG, CoDe, SingleModel, sample
from msdda.tasks.bundle import TaskBundle

logger = logging.getLogger(__name__)

WEIGHTED_METHODS = ("msdda", "db-mpa", "db-mpa-ls", "rewarded-soup", "code", "rgg")
FIXED_METHODS = ("base",)  # plus "single:<objective>"
RESULTS_FILE = "results.jsonl"  # the store of a single-process run
RANK_RESULTS_PATTERN = re.compile(r"^results\.rank(\d+)\.jsonl$")  # rank r of a multi-process run
CONFIG_FILE = "config.json"


class SweepError(MSDDAError):
    """A sweep is misconfigured, or its run folder holds a different sweep."""


@dataclass
class SweepConfig(JSONConfig):
    """Everything that determines a sweep's results (written to the run folder as config.json)."""

    config_error = SweepError

    task: str = "digits"
    objectives: list[str] | None = None  # default: the task's first two
    methods: list[str] = field(default_factory=lambda: ["base", "msdda", "db-mpa"])
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
    save_samples: bool = True
    task_options: dict[str, Any] = field(default_factory=dict)


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
        full = {o: float(w.get(o, 0.0)) for o in objectives}
        for o, v in full.items():
            if not math.isfinite(v) or v < 0:
                raise SweepError(f"weight grid entry {i}: weight {v} for {o!r} must be finite and >= 0")
        total = math.fsum(full.values())
        if not math.isclose(total, 1.0, rel_tol=1e-6):
            raise SweepError(f"weight grid entry {i} sums to {total:.6g}; preference weights must sum to 1")
        out.append(full)
    return out


def _check_methods(methods: Sequence[str], objectives: Sequence[str], bundle: TaskBundle) -> None:
    if not methods:
        raise SweepError(f"no methods given; choose from {[*FIXED_METHODS, *WEIGHTED_METHODS, 'single:<objective>']}")
    for m in methods:
        if m.startswith("single:"):
            if m[7:] not in objectives:
                raise SweepError(f"method {m!r}: unknown objective {m[7:]!r}; valid: {list(objectives)}")
        elif m not in FIXED_METHODS + WEIGHTED_METHODS:
            raise SweepError(
                f"unknown method {m!r}; choose from {[*FIXED_METHODS, *WEIGHTED_METHODS, 'single:<objective>']}"
            )
        if m == "rewarded-soup" and bundle.soup is None:
            raise SweepError(f"task {bundle.name!r} has no parameterised models, so rewarded-soup is not available")
        if m == "rgg":
            for o in objectives:
                if getattr(bundle.rewards[o], "differentiable", True) is False:
                    raise SweepError(f"rgg needs differentiable rewards; {o!r} is not (drop rgg or that objective)")


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
        if method in WEIGHTED_METHODS:
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


def build_method(
    method: str, bundle: TaskBundle, weights: Mapping[str, float] | None, cfg: SweepConfig, objectives: Sequence[str]
) -> tuple[list[Any], Any, Any]:
    """(models, step rule, reference) for one method at one weight vector."""
    if method == "base":
        return [bundle.base], SingleModel(), None
    if method.startswith("single:"):
        return [bundle.aligned[method[7:]]], SingleModel(), None
    assert weights is not None
    w = [weights[o] for o in objectives]
    aligned = [bundle.aligned[o] for o in objectives]
    rewards = [bundle.rewards[o] for o in objectives]
    if method == "msdda":
        betas = [bundle.beta_of(o) for o in objectives]
        beta = cfg.beta if cfg.beta is not None else math.fsum(wk * bk for wk, bk in zip(w, betas, strict=True))
        a = exponents_from_preferences(w, betas, beta)
        return aligned, MSDDA(a), bundle.base
    if method == "db-mpa":
        return aligned, DBMPA(w), None
    if method == "db-mpa-ls":
        return aligned, DBMPALS(w), None
    if method == "rewarded-soup":
        assert bundle.soup is not None
        return [bundle.soup(dict(weights))], SingleModel(), None
    if method == "code":
        return [bundle.base], CoDe(rewards, w, num_candidates=cfg.code_candidates, block_size=cfg.code_block), None
    if method == "rgg":
        scale = cfg.rgg_scale if cfg.rgg_scale is not None else bundle.rgg_scale
        return [bundle.base], RGG(rewards, w, scale=scale), None
    raise SweepError(f"unknown method {method!r}")


# ----- the results store -------------------------------------------------------------------------------
def results_file(run_dir: Path | str, rank: int, world_size: int) -> Path:
    """The file rank `rank` of a `world_size`-process run appends to: results.jsonl for one process,
    else results.rank{rank}.jsonl."""
    return Path(run_dir) / (RESULTS_FILE if world_size == 1 else f"results.rank{rank}.jsonl")


def results_files(run_dir: Path | str) -> list[Path]:
    """Every results file of a run folder: results.jsonl (if any) first, then results.rank{r}.jsonl by r."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    ranked = []
    for p in run_dir.iterdir():
        m = RANK_RESULTS_PATTERN.match(p.name)
        if m and p.is_file():
            ranked.append((int(m.group(1)), p))
    single = [run_dir / RESULTS_FILE] if (run_dir / RESULTS_FILE).is_file() else []
    return single + [p for _, p in sorted(ranked)]


def _read_file_rows(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    with path.open() as f:
        for line in f:
            if not line.endswith("\n"):
                break  # torn write
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def read_rows(path: Path | str) -> list[dict[str, Any]]:
    """Every complete row of a results file, or of a whole run folder.

    path: one results file (a torn last line from a kill is ignored), or a run folder, for the union of
    its results files (`read_run_rows`): what a multi-process run wrote, as one store.
    """
    path = Path(path)
    if path.is_dir():
        return read_run_rows(path)
    return _read_file_rows(path)


def read_run_rows(run_dir: Path | str) -> list[dict[str, Any]]:
    """The union of every results file of a run folder, each (unit, index) once, in the sweep's planned
    order (by `unit_index`, so the same whatever the process count; stores written before rows carried it
    keep file order)."""
    seen: set[tuple[str, int]] = set()
    rows = []
    for f in results_files(run_dir):
        for r in _read_file_rows(f):
            key = (r["unit"], r["index"])
            if key not in seen:
                seen.add(key)
                rows.append(r)
    if all("unit_index" in r for r in rows):
        rows.sort(key=lambda r: (r["unit_index"], r["index"]))
    return rows


def _complete_units(rows: Sequence[dict[str, Any]], batch_size: int) -> set[str]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["unit"]] = counts.get(r["unit"], 0) + 1
    return {k for k, c in counts.items() if c == batch_size}


def _repair_store(path: Path, batch_size: int) -> set[str]:
    """Drop torn lines and incomplete units (atomic rewrite); return the keys of complete units."""
    text = path.read_text()
    rows = _read_file_rows(path)
    complete = _complete_units(rows, batch_size)
    kept = [r for r in rows if r["unit"] in complete]
    if len(kept) != text.count("\n") or (text and not text.endswith("\n")):
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
        logger.info("results store %s repaired: kept %d rows of %d complete units", path, len(kept), len(complete))
    return complete


def done_units(run_dir: Path | str, batch_size: int) -> set[str]:
    """Keys of the units some results file of the folder holds complete (whichever rank wrote them)."""
    done: set[str] = set()
    for f in results_files(run_dir):
        done |= _complete_units(_read_file_rows(f), batch_size)
    return done


def _append_rows(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    with path.open("a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _config_diff(existing: Mapping[str, Any], cfg: SweepConfig) -> list[str]:
    """Names of the config keys where `existing` (a config.json document) differs from `cfg`."""
    mine = json.loads(json.dumps(cfg.to_dict()))
    return sorted(k for k in set(existing) | set(mine) if existing.get(k) != mine.get(k))


def prepare_run_dir(run_dir: Path, cfg: SweepConfig, overwrite: bool) -> None:
    """Create the run folder, or check that an existing one holds this very sweep (else refuse)."""
    config_path = run_dir / CONFIG_FILE
    if config_path.exists():
        try:
            existing = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise SweepError(f"{config_path} is not valid JSON; pass --overwrite to start the run afresh") from exc
        diff = _config_diff(existing, cfg)
        if diff:
            if not overwrite:
                raise SweepError(
                    f"{run_dir} holds a sweep with a different config (differs in {diff}); use another folder, "
                    f"the same settings to resume, or --overwrite to discard it"
                )
            shutil.rmtree(run_dir)
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise SweepError(f"{run_dir} exists and is not a sweep folder; use another folder or --overwrite")
    elif run_dir.exists() and overwrite:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not config_path.exists():
        write_json_atomic(config_path, cfg.to_dict())


def _check_prepared_config(run_dir: Path, cfg: SweepConfig) -> str | None:
    """On ranks other than 0, after rank 0 prepared the folder: None if config.json is this sweep, else why not."""
    config_path = run_dir / CONFIG_FILE
    try:
        existing = json.loads(config_path.read_text())
    except FileNotFoundError:
        return (
            f"{config_path} is missing after rank 0 wrote it; the run folder must be on a file system every "
            "process shares (on several machines: a shared mount at the same path)"
        )
    except (OSError, json.JSONDecodeError) as exc:
        return f"cannot read {config_path} written by rank 0: {exc}; check the shared file system"
    diff = _config_diff(existing, cfg)
    if diff:
        return (
            f"{config_path} (written by rank 0) differs from this process's sweep in {diff}; launch every "
            "process with the same command and options"
        )
    return None


def _prepare_shared_run_dir(run_dir: Path, cfg: SweepConfig, overwrite: bool, ctx: DistContext) -> None:
    """Rank 0 prepares the folder while the others wait; then every rank checks config.json. A refusal on
    any rank ends every rank with the same SweepError (never a hang)."""
    ctx.call_checked(lambda: prepare_run_dir(run_dir, cfg, overwrite) if ctx.is_main else None, SweepError)
    ctx.check_all(None if ctx.is_main else _check_prepared_config(run_dir, cfg), SweepError)


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
    _check_methods(cfg.methods, objectives, bundle)
    for m in cfg.methods:  # build every rule once up front: bad settings fail before any sampling
        if m in WEIGHTED_METHODS and m != "rewarded-soup":
            try:
                build_method(m, bundle, grid[0], cfg, objectives)
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

    if ctx.distributed:
        _prepare_shared_run_dir(run_dir, cfg, overwrite, ctx)
    else:
        prepare_run_dir(run_dir, cfg, overwrite)
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
    for position, unit in tqdm(todo, desc="sweep" if world == 1 else f"sweep rank {rank}/{world}", disable=not show):
        rows, samples = run_unit(unit, bundle, cfg, objectives, prompts)
        for row in rows:
            row["unit_index"] = position  # the unit's place in the plan: readers order the union by it
        if cfg.save_samples:
            _save_samples(samples_dir, unit, samples)
        _append_rows(results, rows)
        if on_unit_done is not None:
            on_unit_done(unit)
    units_run = int(ctx.all_sum(torch.tensor([float(len(todo))])).item())  # also waits for every rank
    return SweepResult(run_dir, len(units), units_run, len(read_run_rows(run_dir)), rank, world)


def _safe_name(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=," else "_" for c in key)


def _save_samples(samples_dir: Path, unit: Unit, samples: torch.Tensor) -> None:
    from safetensors.torch import save

    path = samples_dir / f"{_safe_name(unit.key)}.safetensors"
    write_bytes_atomic(path, save({"samples": samples.detach().float().contiguous().cpu()}))


def samples_path(run_dir: Path, unit_key: str) -> Path:
    return Path(run_dir) / "samples" / f"{_safe_name(unit_key)}.safetensors"


def run_unit(
    unit: Unit, bundle: TaskBundle, cfg: SweepConfig, objectives: Sequence[str], prompts: Sequence[Any]
) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """Sample one unit and score it: one row per sample with every objective's reward and the unit's cost."""
    weights = None if unit.weights is None else dict(unit.weights)
    models, rule, reference = build_method(unit.method, bundle, weights, cfg, objectives)
    prompt = prompts[unit.prompt_index]
    cond = bundle.make_cond(prompt, cfg.batch_size)
    out = sample(
        models,
        bundle.scheduler,
        rule,
        shape=(cfg.batch_size, *bundle.sample_shape),
        cond=cond,
        reference=reference,
        num_inference_steps=cfg.steps,
        guidance_scale=bundle.guidance_scale,
        null_cond=bundle.null_cond if bundle.guidance_scale is not None else None,
        seed=unit_seed(unit.seed, unit.prompt_index),
        dtype=bundle.dtype,
        progress=False,
    )
    with torch.no_grad():
        scores = {
            o: bundle.rewards[o](out.samples, cond).detach().double().cpu()
            for o in bundle.objectives
            if o in objectives
        }
    cost = out.cost.to_dict()
    cost["reward_evals_final"] = len(objectives)
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
            }
        )
    return rows, out.samples


def iter_units(rows: Sequence[dict[str, Any]]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Rows grouped by unit key, in first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["unit"], []).append(r)
    yield from groups.items()
