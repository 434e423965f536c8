"""Step-level DPO (MSDDA.md §5): train a single-objective policy whose reverse kernels prefer high step reward.

At a state x_t taken from the current policy's own (guided) sampling trajectories, draw `candidates`
x_{t-1} from the policy's kernel, score each by the step reward r(x0_hat_ref(x_{t-1}), c) (the *reference*
model's Tweedie estimate from x_{t-1}, clipped to [-1, 1]), and take the best and worst as a pair:
  L = -log sigmoid( beta * [(log pi(x_w|x_t) - log ref(x_w|x_t)) - (log pi(x_l|x_t) - log ref(x_l|x_t))] )
with exact diagonal-Gaussian log-densities of the guided kernels (mean and learned variance), in float64.
The final step (t -> -1) is never a state: the sampler returns the kernel mean there, so nothing is drawn.

Checkpoints (every `checkpoint_every` steps) hold the trainable weights, the optimiser state (tensors in
safetensors, scalars in JSON), the generator state and the step, in one directory written to a temp name
and renamed. Resuming from it reproduces an uninterrupted run bit for bit (tested with a killed process).

Several processes (torchrun / accelerate launch): every step's global batch of `trajectories` is drawn as
`data_shards` independent shards, each from its own generator; shard d goes to rank d % world_size, the
policy is wrapped in DistributedDataParallel (through accelerate) and each rank's loss is scaled so the
averaged gradient is that of the global batch. The data therefore do not depend on the process count, and
the trained weights match a single-process run with the same `data_shards` to float rounding. Rank 0 alone
evaluates, logs and writes checkpoints (holding every shard's generator state) and the final model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from msdda.alignment.errors import AlignmentError, CheckpointError
from msdda.alignment.io import (
    check_state_matches,
    load_tensors,
    replace_dir_atomic,
    tensors_to_bytes,
)
from msdda.config import JSONConfig
from msdda.core.kernel import GaussianKernel
from msdda.core.schedule import KernelScheduler
from msdda.distributed import DistContext, get_context
from msdda.models.denoiser import ClassifierFreeGuidance
from msdda.sampling.rules import StepContext
from msdda.sampling.sampler import sample

logger = logging.getLogger(__name__)

RewardFn = Callable[[Tensor, Any], Tensor]
CondSampler = Callable[[int, "torch.Generator | None"], Tensor]
# Fields that may differ between a checkpoint and the run resuming it (they do not change the training path).
_RESUMABLE_DIFFS = {"steps", "checkpoint_every", "keep_checkpoints", "log_every"}
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class DPOConfig(JSONConfig):
    """Step-level DPO. Round-trips through to_dict/from_dict; written beside every run.

    reward: the reward's name or "module:function" spec (recorded; the callable is passed separately).
    beta: KL strength of the step-level problem (the same beta MSDDA's exponents use).
    steps: optimiser steps. Per step: `trajectories` guided policy trajectories, `states_per_trajectory`
    states from each (uniform over all but the last step), `candidates` draws of x_{t-1} per state.
    guidance_scale: CFG scale of policy and reference (fixed). num_inference_steps: sampling schedule.
    lora: train LoRA adapters (peft) on `lora_targets` instead of all weights; merged into the saved model.
    eval_samples: held-out batch (fixed noise and classes from `eval_seed`) for reward and KL logging.
    data_shards: each step's `trajectories` are drawn as this many shards, each from its own generator
    (shard 0 from `seed`, shard d from a seed derived from (seed, d)); processes share the shards (shard d ->
    rank d % world_size), so any process count dividing data_shards gives the same data. 1 (default) is the
    single-stream recipe the shipped weights were trained with; a run on N processes needs a multiple of N.
    """

    config_error = AlignmentError

    reward: str = "ink"
    beta: float = 0.05
    steps: int = 200
    lr: float = 2e-5
    trajectories: int = 8
    states_per_trajectory: int = 4
    candidates: int = 4
    guidance_scale: float = 2.0
    num_inference_steps: int = 50
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 25
    eval_samples: int = 40
    eval_seed: int = 12345
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["conv1", "conv2", "emb"])
    data_shards: int = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise AlignmentError(f"DPOConfig.beta={self.beta!r} must be a positive number, e.g. 0.05")
        for name in (
            "steps",
            "trajectories",
            "states_per_trajectory",
            "checkpoint_every",
            "log_every",
            "eval_samples",
            "keep_checkpoints",
            "lora_rank",
            "data_shards",
        ):
            if int(getattr(self, name)) < 1:
                raise AlignmentError(f"DPOConfig.{name}={getattr(self, name)!r} must be >= 1")
        if self.candidates < 2:
            raise AlignmentError(f"DPOConfig.candidates={self.candidates!r} must be >= 2 to form a pair")
        if self.num_inference_steps < 2:
            raise AlignmentError(f"DPOConfig.num_inference_steps={self.num_inference_steps!r} must be >= 2")
        if not self.lr > 0:
            raise AlignmentError(f"DPOConfig.lr={self.lr!r} must be > 0")
        if self.data_shards > self.trajectories:
            raise AlignmentError(
                f"DPOConfig.data_shards={self.data_shards!r} exceeds trajectories={self.trajectories!r}; every shard "
                f"needs at least one trajectory: lower data_shards or raise trajectories"
            )


@dataclass
class DPOResult:
    """model: the trained policy (LoRA merged); history: the log rows; final_eval: last held-out figures."""

    model: nn.Module
    seconds: float
    final_eval: dict[str, float]
    history: list[dict[str, Any]]


def dpo_loss(logp_w: Tensor, logref_w: Tensor, logp_l: Tensor, logref_l: Tensor, beta: float) -> Tensor:
    """Per-pair step-level DPO loss [N]: -log sigmoid(beta * ((lp_w - lr_w) - (lp_l - lr_l))). Inputs [N], nats."""
    return -F.logsigmoid(beta * ((logp_w - logref_w) - (logp_l - logref_l)))


def check_reward_values(values: Any, batch_size: int, name: str) -> Tensor:
    """A reward output must be a finite floating tensor [batch_size]; AlignmentError naming the batch index."""
    if not isinstance(values, Tensor):
        raise AlignmentError(
            f"reward {name!r} returned {type(values).__name__}; it must return a Tensor [{batch_size}]"
        )
    if tuple(values.shape) != (batch_size,):
        raise AlignmentError(
            f"reward {name!r} returned shape {list(values.shape)} for a batch of {batch_size}; it must return one "
            f"value per sample, shape [{batch_size}]"
        )
    if not values.is_floating_point():
        raise AlignmentError(f"reward {name!r} returned dtype {values.dtype}; it must return floating-point values")
    bad = (~torch.isfinite(values.detach())).nonzero().flatten().tolist()
    if bad:
        raise AlignmentError(
            f"reward {name!r} returned a non-finite value {float(values[bad[0]])} at batch index {bad[0]} "
            f"({len(bad)} non-finite in total, indices {bad[:8]}); fix the reward's numerics for such samples"
        )
    return values


def _guided(model: nn.Module, scale: float, null_cond: Tensor) -> ClassifierFreeGuidance:
    return ClassifierFreeGuidance(model, scale, null_cond)


class _KLRecorder:
    """A step rule that samples from the policy kernel and records KL(policy || reference) per step."""

    name = "dpo-eval"
    uses_reference = True

    def __init__(self) -> None:
        self.kls: list[Tensor] = []

    def check(self, num_models: int) -> None:
        pass

    def __call__(self, ctx: StepContext) -> GaussianKernel:
        if not ctx.is_last:
            assert ctx.reference_kernel is not None
            self.kls.append(ctx.kernels[0].kl(ctx.reference_kernel).double())
        return ctx.kernels[0]


def evaluate_policy(
    policy: nn.Module,
    reference: nn.Module,
    scheduler: KernelScheduler,
    reward: RewardFn,
    config: DPOConfig,
    sample_shape: Sequence[int],
    cond_sampler: CondSampler,
    null_cond: Tensor,
) -> dict[str, float]:
    """Held-out figures: mean reward of final samples and mean per-step KL(policy || reference) in nats.

    Uses its own generator (config.eval_seed), so it never touches the training random stream.
    """
    gen = torch.Generator().manual_seed(int(config.eval_seed))
    cond = cond_sampler(config.eval_samples, gen)
    rule = _KLRecorder()
    out = sample(
        [policy],
        scheduler,
        rule,
        shape=(config.eval_samples, *sample_shape),
        cond=cond,
        reference=reference,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        null_cond=null_cond,
        generator=gen,
        progress=False,
    )
    with torch.no_grad():
        r = check_reward_values(reward(out.samples.clamp(-1, 1), cond), config.eval_samples, config.reward)
    kl = torch.stack(rule.kls)  # [steps-1, B]
    return {
        "eval_reward": float(r.mean()),
        "eval_kl_per_step": float(kl.mean()),
        "eval_kl_sum": float(kl.sum(0).mean()),
    }


def _list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _generator_key(shard: int) -> str:
    """Name of data shard `shard`'s generator state in rng.safetensors ("generator" for shard 0, as before)."""
    return "generator" if shard == 0 else f"generator.{shard}"


def _as_shards(gen: torch.Generator | Mapping[int, torch.Generator]) -> Mapping[int, torch.Generator]:
    return {0: gen} if isinstance(gen, torch.Generator) else gen


def _save_checkpoint(
    ckpt_root: Path,
    step: int,
    module: nn.Module,
    opt: torch.optim.Optimizer,
    gen: torch.Generator | Mapping[int, torch.Generator],
    config: DPOConfig,
    elapsed: float,
    keep: int,
) -> Path:
    """Write checkpoint `step` (atomically); gen: shard 0's generator, or {shard: generator} for every shard."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    trainable = {k: v for k, v in module.state_dict().items()}
    (tmp / "model.safetensors").write_bytes(tensors_to_bytes(trainable))
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, Tensor):
                tensors[f"state.{pid}.{key}"] = val
            else:
                scalars.setdefault(str(pid), {})[key] = val
    (tmp / "optimizer.safetensors").write_bytes(tensors_to_bytes(tensors))
    (tmp / "rng.safetensors").write_bytes(
        tensors_to_bytes(
            {
                **{_generator_key(d): g.get_state() for d, g in _as_shards(gen).items()},
                "torch_global": torch.get_rng_state(),
            }
        )
    )
    doc = {
        "step": step,
        "config": config.to_dict(),
        "optimizer": {"param_groups": sd["param_groups"], "scalars": scalars},
        "elapsed_seconds": elapsed,
    }
    (tmp / "state.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    final = ckpt_root / f"step-{step:06d}"
    replace_dir_atomic(tmp, final)
    for _, old in _list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint written: %s", final)
    return final


def _load_checkpoint(
    path: Path,
    module: nn.Module,
    opt: torch.optim.Optimizer,
    gen: torch.Generator | Mapping[int, torch.Generator],
    config: DPOConfig,
) -> tuple[int, float]:
    """Restore weights, optimiser and generator states (gen: shard 0's, or {shard: generator} for the shards
    this process draws); return (step, elapsed seconds). CheckpointError if it belongs to another config."""
    try:
        doc = json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} has an unreadable state.json: {exc}; delete it or pass --no-resume"
        ) from exc
    saved = dict(doc.get("config", {}))
    for f in dataclasses.fields(DPOConfig):  # keys added since the checkpoint was written: their defaults
        if saved and f.name not in saved and f.default is not dataclasses.MISSING:
            saved[f.name] = f.default
    now = config.to_dict()
    diff = {
        k: (saved.get(k), now.get(k))
        for k in sorted(set(saved) | set(now))
        if k not in _RESUMABLE_DIFFS and saved.get(k) != now.get(k)
    }
    if diff:
        shown = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(
            f"checkpoint {path} was written by a run with another configuration ({shown}); rerun with the same "
            "options, or pass --no-resume to start over"
        )
    state = load_tensors(path / "model.safetensors")
    check_state_matches(module, state, path / "model.safetensors")
    module.load_state_dict(state)
    opt_tensors = load_tensors(path / "optimizer.safetensors")
    opt_state: dict[int, dict[str, Any]] = {}
    for name, val in opt_tensors.items():
        _, pid, key = name.split(".", 2)
        opt_state.setdefault(int(pid), {})[key] = val
    for pid, sc in doc["optimizer"]["scalars"].items():
        opt_state.setdefault(int(pid), {}).update(sc)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in doc["optimizer"]["param_groups"]]
    opt.load_state_dict({"state": opt_state, "param_groups": groups})
    rng = load_tensors(path / "rng.safetensors")
    for shard, g in _as_shards(gen).items():
        if _generator_key(shard) not in rng:
            raise CheckpointError(
                f"checkpoint {path} holds no generator state for data shard {shard}; it was written with other "
                "data_shards: rerun with the same options, or pass --no-resume to start over"
            )
        g.set_state(rng[_generator_key(shard)])
    torch.set_rng_state(rng["torch_global"])
    return int(doc["step"]), float(doc.get("elapsed_seconds", 0.0))


def _wrap_lora(policy: nn.Module, config: DPOConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        target_modules=list(config.lora_targets),
        lora_dropout=0.0,
        bias="none",
    )
    try:
        return get_peft_model(policy, lcfg)
    except ValueError as exc:
        raise AlignmentError(f"cannot add LoRA adapters to targets {config.lora_targets}: {exc}") from exc


def shard_sizes(trajectories: int, data_shards: int) -> list[int]:
    """Trajectories per data shard: as equal as possible, the first shards one larger when uneven."""
    q, r = divmod(int(trajectories), int(data_shards))
    return [q + (1 if d < r else 0) for d in range(int(data_shards))]


def shard_seed(seed: int, shard: int) -> int:
    """Seed of data shard `shard`'s generator: `seed` itself for shard 0 (the single-stream recipe), else an
    independent 64-bit seed derived from (seed, shard) by numpy's SeedSequence."""
    if shard == 0:
        return int(seed)
    import numpy as np

    return int(np.random.SeedSequence(int(seed), spawn_key=(int(shard),)).generate_state(1, dtype=np.uint64)[0])


@dataclass
class _ShardBatch:
    """The no-gradient part of one data shard's step: states, conditions, pairs and reference log-densities."""

    x: Tensor  # [N, ...] float64 states x_t
    t: Tensor  # [N] timesteps
    prev: Tensor  # [N] previous timesteps
    cond: Tensor  # [N] conditions
    x_w: Tensor  # [N, ...] winners
    x_l: Tensor  # [N, ...] losers
    logref_w: Tensor  # [N]
    logref_l: Tensor  # [N]
    valid: Tensor  # [N] bool: the pair's rewards differ
    gap: Tensor  # [N] reward gap max - min


def train_dpo(
    policy: nn.Module,
    reference: nn.Module,
    scheduler: KernelScheduler,
    reward: RewardFn,
    config: DPOConfig,
    *,
    out: Path,
    sample_shape: Sequence[int],
    cond_sampler: CondSampler,
    null_cond: Tensor,
    resume: bool = True,
    progress: bool = True,
    throttle: float = 0.0,
    context: DistContext | None = None,
) -> DPOResult:
    """Train `policy` (initialised as a copy of `reference`) with step-level DPO; see the module docstring.

    policy, reference: denoisers `(x_t [B,C,...], t [B], cond [B]) -> [B, 2C, ...]` (eps + learned_range).
    reward: `(x0 [B,C,...] in [-1,1], cond [B]) -> [B]`, validated on every call.
    cond_sampler(n, generator) -> [n] conditions. out: run directory (train_log.jsonl, checkpoints/).
    resume: continue from the newest checkpoint in out/checkpoints (same config required).
    throttle: seconds to sleep per step (tests use it to interrupt a real run at a known point).
    context: the process's place in a multi-process run (default: `msdda.distributed.get_context()`, one
    process unless launched by torchrun / accelerate launch). Data shard d of every step goes to rank
    d % world_size, the policy is wrapped in DistributedDataParallel and the loss is normalised by the global
    pair count, so the gradients equal the single-process ones on the same global batch. Only rank 0 writes
    the log and the checkpoints; on the other ranks the result's history and final_eval are empty.
    """
    config.validate()
    ctx = context if context is not None else get_context()
    if config.data_shards % ctx.world_size != 0:
        raise AlignmentError(
            f"data_shards={config.data_shards} cannot be shared by {ctx.world_size} processes (each process takes "
            f"data_shards / processes shards of every step's batch); pass --data-shards {ctx.world_size} or a "
            f"multiple of it, and the same value to a single-process run that should match this one"
        )
    out = Path(out)
    ckpt_root = out / "checkpoints"
    log_path = out / "train_log.jsonl"
    ks = KernelScheduler(scheduler.config, scheduler.alphas_cumprod)
    ks.set_timesteps(config.num_inference_steps)
    timesteps = [int(t) for t in ks.timesteps]
    prevs = [ks.prev_timestep(t) for t in timesteps]
    reference = reference.eval().requires_grad_(False)

    torch.manual_seed(int(config.seed))  # LoRA initialisation
    module = _wrap_lora(policy, config) if config.lora else policy
    module.eval()
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise AlignmentError("the policy has no trainable parameters; pass a model with requires_grad weights")
    opt = torch.optim.Adam(params, lr=config.lr)
    my_shards = [d for d in range(config.data_shards) if d % ctx.world_size == ctx.rank]
    sizes = shard_sizes(config.trajectories, config.data_shards)
    gens = {d: torch.Generator().manual_seed(shard_seed(config.seed, d)) for d in my_shards}

    def choose_checkpoint() -> str | None:  # rank 0 decides; every rank then loads the same one
        if not ctx.is_main:
            return None
        out.mkdir(parents=True, exist_ok=True)
        existing = _list_checkpoints(ckpt_root)
        if resume and existing:
            return str(existing[-1][1])
        shutil.rmtree(ckpt_root, ignore_errors=True)
        return None

    chosen = ctx.broadcast_object(ctx.call_checked(choose_checkpoint, AlignmentError))
    start_step, elapsed = 0, 0.0
    if chosen is not None:
        start_step, elapsed = ctx.call_checked(
            lambda: _load_checkpoint(Path(chosen), module, opt, gens, config), CheckpointError
        )
        if ctx.is_main:
            logger.info("resuming from %s (step %d)", chosen, start_step)
    history: list[dict[str, Any]] = []
    if ctx.is_main:
        if log_path.exists() and start_step > 0:
            for line in log_path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    if row.get("step", 0) <= start_step:
                        history.append(row)
        log_path.write_text("".join(json.dumps(r) + "\n" for r in history))

    def eval_now() -> dict[str, float]:
        return evaluate_policy(module, reference, ks, reward, config, sample_shape, cond_sampler, null_cond)

    def write_row(row: dict[str, Any]) -> None:
        history.append(row)
        with log_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    if start_step == 0 and ctx.is_main:
        write_row({"step": 0, **eval_now()})

    # no-gradient passes use the bare module; the one pass with gradient goes through DDP on several ranks
    train_g = _guided(ctx.wrap_model(module), config.guidance_scale, null_cond)
    pol_g = _guided(module, config.guidance_scale, null_cond)
    ref_g = _guided(reference, config.guidance_scale, null_cond)
    n_steps = len(timesteps)
    t_all = torch.tensor(timesteps)
    p_all = torch.tensor(prevs)
    S, K = config.states_per_trajectory, config.candidates

    def draw(shard: int) -> _ShardBatch:
        """States, candidates and best/worst pairs of one data shard, from that shard's own generator."""
        gen, n_traj = gens[shard], sizes[shard]
        cond = cond_sampler(n_traj, gen)
        traj = sample(
            [module],
            ks,
            _SinglePolicy(),
            shape=(n_traj, *sample_shape),
            cond=cond,
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            null_cond=null_cond,
            generator=gen,
            progress=False,
            return_trajectory=True,
        ).trajectory
        assert traj is not None
        idx = torch.randint(0, n_steps - 1, (n_traj, S), generator=gen)  # never the final (mean) step
        stack = torch.stack(traj[:-1], dim=0)  # [steps, n_traj, ...]
        traj_ix = torch.arange(n_traj).repeat_interleave(S)
        x = stack[idx.flatten(), traj_ix].double()  # [N, ...]
        t_b, p_b = t_all[idx.flatten()], p_all[idx.flatten()]
        cond_s = cond[traj_ix]
        n = x.shape[0]
        with torch.no_grad():
            pk = ks.kernel(pol_g(x.float(), t_b, cond_s), t_b, x, prev_timestep=p_b)
            noise = torch.randn((n, K, *x.shape[1:]), generator=gen, dtype=torch.float64)
            cands = pk.mean[:, None] + pk.std[:, None] * noise  # [N, K, ...]
            flat = cands.reshape(n * K, *x.shape[1:])
            p_rep, c_rep = p_b.repeat_interleave(K), cond_s.repeat_interleave(K)
            ref_next = ref_g(flat.float(), p_rep, c_rep)
            x0_hat = ks.predict_x0(ref_next, p_rep, flat).clamp(-1, 1).float()
            r = check_reward_values(reward(x0_hat, c_rep), n * K, config.reward).double().reshape(n, K)
            w_ix, l_ix = r.argmax(1), r.argmin(1)
            gap = r.max(1).values - r.min(1).values
            rows = torch.arange(n)
            x_w, x_l = cands[rows, w_ix], cands[rows, l_ix]
            rk = ks.kernel(ref_g(x.float(), t_b, cond_s), t_b, x, prev_timestep=p_b)
            lr_w, lr_l = rk.log_prob(x_w), rk.log_prob(x_l)
        return _ShardBatch(x, t_b, p_b, cond_s, x_w, x_l, lr_w, lr_l, gap > 0, gap)

    window: dict[str, float] = {}
    wcount = 0
    t0 = time.perf_counter() - elapsed
    bar = tqdm(
        range(start_step, config.steps),
        desc=f"align {config.reward}",
        disable=not (progress and ctx.is_main),
        initial=start_step,
        total=config.steps,
    )
    for step in bar:
        batches = [draw(d) for d in my_shards]
        lp_ws, lp_ls = [], []
        for b in batches:  # one forward per shard: the same batch shapes as on any other process count
            pk_grad = ks.kernel(train_g(b.x.float(), b.t, b.cond), b.t, b.x, prev_timestep=b.prev)
            lp_ws.append(pk_grad.log_prob(b.x_w))
            lp_ls.append(pk_grad.log_prob(b.x_l))
        lp_w, lp_l = torch.cat(lp_ws), torch.cat(lp_ls)
        lr_w, lr_l = torch.cat([b.logref_w for b in batches]), torch.cat([b.logref_l for b in batches])
        per_pair = dpo_loss(lp_w, lr_w, lp_l, lr_l, config.beta)
        weight = torch.cat([b.valid for b in batches]).double()
        gap = torch.cat([b.gap for b in batches])
        if ctx.distributed:
            # DDP averages gradients over ranks, so each rank's loss carries world_size / (global pair count)
            total = ctx.all_sum(weight.sum().reshape(1))[0].clamp_min(1.0)
            loss = (per_pair * weight).sum() * ctx.world_size / total
        else:
            loss = (per_pair * weight).sum() / weight.sum().clamp_min(1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        with torch.no_grad():
            margin = (lp_w - lr_w) - (lp_l - lr_l)
            if ctx.distributed:  # figures of the global batch
                sums = ctx.all_sum(
                    torch.stack(
                        [
                            (per_pair * weight).sum(),
                            ((margin > 0).double() * weight).sum(),
                            weight.sum(),
                            gap.sum(),
                            (lp_w - lr_w).sum(),
                            (lp_l - lr_l).sum(),
                            torch.tensor(float(gap.numel()), dtype=torch.float64),
                        ]
                    )
                )
                pairs, count = sums[2].clamp_min(1.0), sums[6]
                stats = {
                    "loss": float(sums[0] / pairs),
                    "pair_accuracy": float(sums[1] / pairs),
                    "reward_gap": float(sums[3] / count),
                    "logratio_w": float(sums[4] / count),
                    "logratio_l": float(sums[5] / count),
                }
            else:
                stats = {
                    "loss": float(loss),
                    "pair_accuracy": float(((margin > 0).double() * weight).sum() / weight.sum().clamp_min(1.0)),
                    "reward_gap": float(gap.mean()),
                    "logratio_w": float((lp_w - lr_w).mean()),
                    "logratio_l": float((lp_l - lr_l).mean()),
                }
        for k, v in stats.items():
            window[k] = window.get(k, 0.0) + v
        wcount += 1
        done = step + 1
        if throttle > 0:
            time.sleep(throttle)
        if ctx.is_main and (done % config.log_every == 0 or done == config.steps):
            row = {
                "step": done,
                **{k: v / wcount for k, v in window.items()},
                **eval_now(),
                "seconds": round(time.perf_counter() - t0, 2),
            }
            bar.set_postfix(loss=f"{row['loss']:.3f}", reward=f"{row['eval_reward']:.3f}")
            logger.info("align step %d: %s", done, row)
            write_row(row)
        if done % config.log_every == 0 or done == config.steps:
            window, wcount = {}, 0
        if done % config.checkpoint_every == 0 and done < config.steps:
            states = ctx.all_gather_objects({d: g.get_state() for d, g in gens.items()})  # every shard's stream
            if ctx.is_main:
                all_gens = {}
                for part in states:
                    for d, state in part.items():
                        all_gens[d] = torch.Generator()
                        all_gens[d].set_state(state)
                _save_checkpoint(
                    ckpt_root, done, module, opt, all_gens, config, time.perf_counter() - t0, config.keep_checkpoints
                )
    seconds = time.perf_counter() - t0
    if not ctx.is_main:
        final_eval: dict[str, float] = {}
    else:
        final_eval = {k: v for k, v in history[-1].items() if k.startswith("eval_")} if history else eval_now()
    model = module.merge_and_unload() if config.lora else module
    model = copy.deepcopy(model).eval().requires_grad_(False)
    return DPOResult(model=model, seconds=seconds, final_eval=final_eval, history=history)


class _SinglePolicy:
    """Plain sampling from the one model's kernel (no reference evaluation)."""

    name = "dpo-states"
    uses_reference = False

    def check(self, num_models: int) -> None:
        pass

    def __call__(self, ctx: StepContext) -> GaussianKernel:
        return ctx.kernels[0]
