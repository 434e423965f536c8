"""Step-level trainers as objects (MSDDA.md §5): the machinery every step trainer shares.

A trainer turns a frozen reference and a step reward into a policy whose reverse kernels prefer high
reward. `StepTrainer` owns the config, the policy (optionally wrapped in LoRA adapters) and the frozen
reference, the optimiser, the data shards and their generators, the checkpointer, the train loop,
logging and evaluation. A subclass implements two methods:

* ``collect(shard) -> batch``: the no-gradient part of one data shard's step (usually starting from
  ``sample_states(shard)``, states x_t taken from the policy's own guided trajectories);
* ``loss(batches) -> StepLoss``: the loss over this process's batches (its gradient is what the
  optimiser follows) and the per-sample tensors ``statistics`` turns into logged figures.

Every trainer scores a candidate x_{t-1} with ``step_reward(x_prev, prev_t, cond) -> [N]``: by default the
reward of the reference's Tweedie estimate x0_hat(x_{t-1}) at prev_t, clipped to [-1, 1] (MSDDA.md §3);
a constructor argument ``step_reward=`` replaces it (e.g. the exact step reward of the Gaussian oracle).
Unconditional tasks pass a ``cond_sampler`` returning None and ``null_cond=None``: no guidance is applied.

Every config is a dataclass beside its trainer (as trl does), deriving from `StepTrainerConfig`.

Checkpoints (every `checkpoint_every` steps, through `msdda.models.checkpoint.Checkpointer`) hold the
trainable weights, the optimiser state, every data shard's generator, the global RNG, the step and the
config; resuming reproduces an uninterrupted run bit for bit (tested with a killed process).

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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from msdda.alignment.errors import AlignmentError, CheckpointError, TrainingRewardError
from msdda.atomic import write_text_atomic
from msdda.config import JSONConfig
from msdda.core.kernel import GaussianKernel
from msdda.core.rewards import validate_reward_output
from msdda.core.samplers import SamplerKernelScheduler
from msdda.core.schedule import KernelScheduler
from msdda.distributed import DistContext, get_context
from msdda.models.checkpoint import Checkpoint, Checkpointer
from msdda.models.denoiser import ClassifierFreeGuidance
from msdda.sampling.rules import StepContext, StepRuleBase
from msdda.sampling.sampler import sample

logger = logging.getLogger(__name__)

RewardFn = Callable[[Tensor, Any], Tensor]
# (x_prev [N, ...], prev_t [N], cond [N] or None) -> [N]: the step reward of candidates x_{t-1}
StepRewardFn = Callable[[Tensor, Tensor, Any], Tensor]
CondSampler = Callable[[int, "torch.Generator | None"], Any]
LOG_FILE = "train_log.jsonl"
LR_SCHEDULES: tuple[str, ...] = ("constant", "cosine")
STATE_SOURCES: tuple[str, ...] = ("policy", "reference", "mixed")
CHECKPOINT_DIR = "checkpoints"


@dataclass
class StepTrainerConfig(JSONConfig):
    """What every step-level trainer is configured by. Round-trips through to_dict/from_dict.

    reward: the reward's name or "module:function" spec (recorded; the callable is passed separately).
    beta: KL strength of the step-level problem (the same beta MSDDA's exponents use).
    steps: optimiser steps. Per step: `trajectories` guided policy trajectories and `states_per_trajectory`
    states from each (uniform over all but the last step).
    guidance_scale: CFG scale of policy and reference (fixed). num_inference_steps: sampling schedule.
    lora: train LoRA adapters (peft) on `lora_targets` instead of all weights; merged into the saved model.
    eval_samples: held-out batch (fixed noise and classes from `eval_seed`) for reward and KL logging.
    lr_schedule: "constant" (lr throughout) or "cosine" (lr * (1 + cos(pi * step / steps)) / 2, down to 0 at
    the last step: the late small steps average out the gradient noise that otherwise keeps the policy
    jittering around the fixed point; a resumed run must keep `steps` for the same path).
    trainable: names (or name prefixes, e.g. "offset_head") of the policy's parameters to train, the rest
    frozen; None (default) trains all. Training only a kernel-offset head leaves the noise prediction exactly
    the reference's: on digits a fine-tuned trunk moved eps by ~0.02 at every t, which at the last steps
    (variance ~1e-3) was a mean error of ~0.6 reference sd that 300 steps did not remove (docs/digits.md).
    Not with `lora`.
    state_source: whose guided trajectories the training states x_t come from: "policy" (on-policy, the
    default), "reference" or "mixed" (half the trajectories from each, the policy's first). The step optimum at
    a state does not depend on how the state was reached, so any source is valid; the policy is judged (by
    `msdda diagnose`) and fused (by MSDDA) at the reference's and at fused trajectories' states, which an
    on-policy run never visits once the policy has moved away.
    data_shards: each step's `trajectories` are drawn as this many shards, each from its own generator
    (shard 0 from `seed`, shard d from a seed derived from (seed, d)); processes share the shards (shard d ->
    rank d % world_size), so any process count dividing data_shards gives the same data. 1 (default) is the
    single-stream recipe; a run on N processes needs a multiple of N.
    """

    config_error = AlignmentError
    # Fields that may differ between a checkpoint and the run resuming it (they do not change the training path).
    resumable_fields: ClassVar[frozenset[str]] = frozenset(
        {"steps", "checkpoint_every", "keep_checkpoints", "log_every"}
    )

    reward: str = "ink"
    beta: float = 0.05
    steps: int = 200
    lr: float = 2e-5
    lr_schedule: str = "constant"
    trajectories: int = 8
    states_per_trajectory: int = 4
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
    state_source: str = "policy"
    trainable: list[str] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """AlignmentError naming the first invalid field and its valid range."""
        cls = type(self).__name__
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise AlignmentError(f"{cls}.beta={self.beta!r} must be a positive number, e.g. 0.05")
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
                raise AlignmentError(f"{cls}.{name}={getattr(self, name)!r} must be >= 1")
        if self.num_inference_steps < 2:
            raise AlignmentError(f"{cls}.num_inference_steps={self.num_inference_steps!r} must be >= 2")
        if not self.lr > 0:
            raise AlignmentError(f"{cls}.lr={self.lr!r} must be > 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise AlignmentError(f"{cls}.lr_schedule={self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        if self.trainable is not None and (
            not self.trainable or not all(isinstance(n, str) and n for n in self.trainable)
        ):
            raise AlignmentError(
                f"{cls}.trainable={self.trainable!r} must be None (train all) or a non-empty list of parameter "
                "names or prefixes, e.g. ['offset_head']"
            )
        if self.trainable is not None and self.lora:
            raise AlignmentError(f"{cls}.trainable and lora=True exclude each other; LoRA picks lora_targets")
        if self.state_source not in STATE_SOURCES:
            raise AlignmentError(f"{cls}.state_source={self.state_source!r}; choose one of {', '.join(STATE_SOURCES)}")
        if self.data_shards > self.trajectories:
            raise AlignmentError(
                f"{cls}.data_shards={self.data_shards!r} exceeds trajectories={self.trajectories!r}; every shard "
                f"needs at least one trajectory: lower data_shards or raise trajectories"
            )


@dataclass
class TrainResult:
    """model: the trained policy (LoRA merged, eval mode, frozen); seconds: training wall time (resumed runs
    included); final_eval: last held-out figures; history: the log rows (empty on ranks other than 0)."""

    model: nn.Module
    seconds: float
    final_eval: dict[str, float]
    history: list[dict[str, Any]]


@dataclass
class States:
    """States x_t of one data shard with their timesteps and conditions (N = trajectories x states each)."""

    x: Tensor  # [N, ...] float64 states x_t
    t: Tensor  # [N] timesteps (LongTensor; float32 for a schedule with fractional timesteps, e.g. flow matching)
    prev: Tensor  # [N] previous timesteps, the same dtype
    cond: Any  # [N] conditions (a tensor or a list), or None for an unconditional task

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass
class StepLoss:
    """loss: the scalar this process backpropagates; parts: named tensors `statistics` reads (no gradient
    needed)."""

    loss: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)


def check_reward_values(values: Any, batch_size: int, name: str) -> Tensor:
    """A reward output must be a finite floating tensor [batch_size]; TrainingRewardError (an AlignmentError
    and a RewardError) naming the batch index otherwise."""
    return validate_reward_output(values, batch_size, name, error=TrainingRewardError)


def select_cond(cond: Any, index: Tensor) -> Any:
    """Conditions at `index` [M]: a tensor is indexed, a list is picked from, None (unconditional) stays None."""
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return cond[index]
    return [cond[int(i)] for i in index]


def repeat_cond(cond: Any, k: int) -> Any:
    """Each condition repeated k times in place ([N, ...] -> [N*k, ...]: class labels [N], prompt embeddings
    [N, L, D]), matching a [N, K] -> [N*K] flatten."""
    if cond is None:
        return None
    if isinstance(cond, Tensor):
        return cond.repeat_interleave(k, dim=0)  # without dim, a [N, L, D] condition would be flattened
    return [c for c in cond for _ in range(k)]


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


def generator_key(shard: int) -> str:
    """Name of data shard `shard`'s generator in a checkpoint ("generator" for shard 0, as before shards)."""
    return "generator" if shard == 0 else f"generator.{shard}"


class _KLRecorder(StepRuleBase):
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


class _Unguided:
    """Call a denoiser as is: the stand-in for ClassifierFreeGuidance on unconditional tasks (null_cond None)."""

    def __init__(self, denoiser: Callable[..., Tensor]) -> None:
        self.denoiser = denoiser

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.denoiser(x_t, t, cond)


def guide(denoiser: Callable[..., Tensor], scale: float, null_cond: Any) -> Callable[..., Tensor]:
    """Classifier-free guidance at `scale`, or the bare denoiser when the task is unconditional (null_cond None)."""
    if null_cond is None:
        return _Unguided(denoiser)
    return ClassifierFreeGuidance(denoiser, scale, null_cond)


class _SinglePolicy(StepRuleBase):
    """Plain sampling from the one model's kernel (no reference evaluation)."""

    name = "dpo-states"
    uses_reference = False

    def check(self, num_models: int) -> None:
        pass

    def __call__(self, ctx: StepContext) -> GaussianKernel:
        return ctx.kernels[0]


def own_training_schedule(
    scheduler: KernelScheduler | SamplerKernelScheduler, num_inference_steps: int
) -> KernelScheduler | SamplerKernelScheduler:
    """The trainer's own copy of `scheduler` with `num_inference_steps` steps (the caller's is never changed).

    DDPM/DDIM: rebuilt from its config and training alphas, as always. A sigma-table sampler (Euler ancestral,
    SDE-DPM-Solver++, flow_sde) is deep-copied and its tables rebuilt, or kept as mirrored from diffusers when
    they already have that many steps (dynamic shifting, custom sigmas: set_timesteps cannot rebuild those).
    AlignmentError for a flow schedule with noise level 0, whose kernels are point masses.
    """
    if isinstance(scheduler, KernelScheduler):
        ks = KernelScheduler(scheduler.config, scheduler.alphas_cumprod)
        ks.set_timesteps(num_inference_steps)
        return ks
    if not isinstance(scheduler, SamplerKernelScheduler):
        raise AlignmentError(
            f"scheduler is a {type(scheduler).__name__}; the step trainers take a KernelScheduler (DDPM/DDIM) or a "
            "SamplerKernelScheduler: mirror a diffusers scheduler with msdda.core.as_kernel_scheduler(scheduler)"
        )
    cfg = scheduler.config
    if cfg.kind == "flow_sde" and cfg.noise_level == 0:
        raise AlignmentError(
            "flow_sde with noise level 0 steps by the flow ODE: every kernel is a point mass, so KL(pi || p_ref) is "
            "infinite for every other kernel and there is no step-level problem: pass eta > 0 (e.g. eta=0.7, "
            "Flow-GRPO's SDE)"
        )
    ks = copy.deepcopy(scheduler)
    if ks.num_inference_steps != num_inference_steps or cfg.sigma_schedule != "mirrored":
        if cfg.sigma_schedule == "mirrored":
            raise AlignmentError(
                f"the scheduler's mirrored sigma table has {ks.num_inference_steps} steps and the trainer needs "
                f"num_inference_steps={num_inference_steps}, which set_timesteps cannot rebuild (dynamic shifting or "
                f"custom sigmas); call set_timesteps({num_inference_steps}) on the diffusers scheduler before "
                "mirroring it"
            )
        ks.set_timesteps(num_inference_steps)
    return ks


def _steps_for(scheduler: Any, num_inference_steps: int) -> int | None:
    """What sample() gets as num_inference_steps: None for a sigma-table schedule that already has that many
    steps (its table is used as is, so a mirrored one is never rebuilt), else the count."""
    if isinstance(scheduler, SamplerKernelScheduler) and scheduler.num_inference_steps == num_inference_steps:
        return None
    return num_inference_steps


def evaluate_policy(
    policy: nn.Module,
    reference: nn.Module,
    scheduler: KernelScheduler | SamplerKernelScheduler,
    reward: RewardFn,
    config: StepTrainerConfig,
    sample_shape: Sequence[int],
    cond_sampler: CondSampler,
    null_cond: Any,
    *,
    clip_samples: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Held-out figures: mean reward of final samples and mean per-step KL(policy || reference) in nats.

    Uses its own generator (config.eval_seed), so it never touches the training random stream.
    null_cond None: an unconditional task, sampled without guidance. clip_samples: the reward sees samples
    clamped to [-1, 1] (images); False for tasks in unbounded space. dtype: the models' input dtype;
    device: where the samples live (the generator stays on the CPU, as diffusers draws noise).
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
        num_inference_steps=_steps_for(scheduler, config.num_inference_steps),
        guidance_scale=config.guidance_scale if null_cond is not None else None,
        null_cond=null_cond,
        generator=gen,
        dtype=dtype,
        device=device,
        progress=False,
    )
    with torch.no_grad():
        x0 = out.samples.clamp(-1, 1) if clip_samples else out.samples
        r = check_reward_values(reward(x0, cond), config.eval_samples, config.reward)
    kl = torch.stack(rule.kls)  # [steps-1, B]
    return {
        "eval_reward": float(r.mean()),
        "eval_kl_per_step": float(kl.mean()),
        "eval_kl_sum": float(kl.sum(0).mean()),
    }


def _freeze_all_but(module: nn.Module, names: Sequence[str]) -> None:
    """requires_grad only for parameters whose name is, or starts with, one of `names` ("a" matches "a.w")."""
    params = dict(module.named_parameters())
    keep = {n for n in params if any(n == k or n.startswith(k + ".") for k in names)}
    unknown = [k for k in names if not any(n == k or n.startswith(k + ".") for n in params)]
    if unknown:
        some = ", ".join(sorted({n.split(".")[0] for n in params})[:12])
        raise AlignmentError(
            f"trainable={list(names)!r}: {unknown} name no parameter of the policy (top-level: {some})"
        )
    for n, p in params.items():
        p.requires_grad_(n in keep)


def _wrap_lora(policy: nn.Module, config: StepTrainerConfig) -> nn.Module:
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


C = TypeVar("C", bound=StepTrainerConfig)
B = TypeVar("B")


class StepTrainer(Generic[C, B]):
    """Base class of the step-level trainers; see the module docstring. Subclasses set `config_class` and
    implement `collect` and `loss` (and usually `statistics`).

    policy, reference: denoisers `(x_t [B,C,...], t [B], cond [B]) -> [B, 2C, ...]` (eps + learned_range);
    the policy starts as a copy of the reference and is trained in place (or through LoRA adapters).
    reward: `(x0 [B,C,...] in [-1,1], cond [B]) -> [B]`, validated on every call.
    cond_sampler(n, generator) -> [n] conditions, or None for an unconditional task (then null_cond=None:
    no guidance). out: run directory (train_log.jsonl, checkpoints/).
    context: the process's place in a multi-process run (default: `msdda.distributed.get_context()`).
    step_reward: `(x_prev [N,...], prev_t [N], cond) -> [N]`, the step reward of candidates x_{t-1}
    (default: `reward` of the reference's clipped Tweedie estimate at prev_t; see `step_reward`).
    clip_samples: rewards see x0 clamped to [-1, 1] (images); False for tasks in unbounded space.
    The models' input dtype is that of the policy's weights (float32 for the digits models).
    Nothing is written before `train` is called.
    """

    config_class: ClassVar[type[StepTrainerConfig]] = StepTrainerConfig
    result_class: ClassVar[type[TrainResult]] = TrainResult

    def __init__(
        self,
        policy: nn.Module,
        reference: nn.Module,
        scheduler: KernelScheduler | SamplerKernelScheduler,
        reward: RewardFn,
        config: C,
        *,
        out: str | Path,
        sample_shape: Sequence[int],
        cond_sampler: CondSampler,
        null_cond: Any,
        context: DistContext | None = None,
        step_reward: StepRewardFn | None = None,
        clip_samples: bool = True,
    ) -> None:
        if not isinstance(config, self.config_class):
            raise AlignmentError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}"
            )
        config.validate()
        self.config = config
        self.ctx = context if context is not None else get_context()
        if config.data_shards % self.ctx.world_size != 0:
            raise AlignmentError(
                f"data_shards={config.data_shards} cannot be shared by {self.ctx.world_size} processes (each process "
                f"takes data_shards / processes shards of every step's batch); pass --data-shards "
                f"{self.ctx.world_size} or a multiple of it, and the same value to a single-process run that should "
                "match this one"
            )
        self.out = Path(out)
        self.log_path = self.out / LOG_FILE
        self.checkpointer = Checkpointer(self.out / CHECKPOINT_DIR, keep=config.keep_checkpoints)
        ks = own_training_schedule(scheduler, config.num_inference_steps)  # our own copy, with our timesteps
        self.scheduler = ks
        # Integer timesteps stay ints (DDPM/DDIM: LongTensors, as before); fractional ones (flow matching:
        # 1000 * sigma) stay floats and reach the model as float32, as msdda.sample passes them.
        fractional = bool(torch.is_floating_point(ks.timesteps) and (ks.timesteps != ks.timesteps.round()).any())
        self.t_dtype = torch.float32 if fractional else torch.long
        self.timesteps = [float(t) if fractional else int(t) for t in ks.timesteps]
        self.prev_timesteps = [ks.prev_timestep(t) for t in self.timesteps]
        self.reference = reference.eval().requires_grad_(False)
        for m in (policy, reference):
            if hasattr(m, "bind_schedule"):  # models that encode the step grid's kernels (the Gaussian oracle)
                m.bind_schedule(ks)
        self.reward = reward
        self.sample_shape = tuple(sample_shape)
        self.cond_sampler = cond_sampler
        self.null_cond = null_cond
        self.custom_step_reward = step_reward
        self.clip_samples = bool(clip_samples)
        weights = list(policy.parameters())
        self.dtype = weights[0].dtype if weights else torch.float32
        # states and samples live with the weights; every generator stays on the CPU (reproducible anywhere)
        self.device = weights[0].device if weights else torch.device("cpu")

        torch.manual_seed(int(config.seed))  # LoRA initialisation
        self.module = self.wrap_policy(policy)
        self.module.eval()
        if config.trainable is not None:
            _freeze_all_but(self.module, config.trainable)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        if not self.params:
            raise AlignmentError("the policy has no trainable parameters; pass a model with requires_grad weights")
        self.optimizer = self.make_optimizer(self.params)
        self.shards = [d for d in range(config.data_shards) if d % self.ctx.world_size == self.ctx.rank]
        self.shard_sizes = shard_sizes(config.trajectories, config.data_shards)
        self.generators = {d: torch.Generator().manual_seed(shard_seed(config.seed, d)) for d in self.shards}
        # no-gradient passes use the bare module; the pass with gradient goes through DDP on several ranks
        self.policy_guided = guide(self.module, config.guidance_scale, null_cond)
        self.reference_guided = guide(self.reference, config.guidance_scale, null_cond)
        self.train_guided: Callable[..., Tensor] | None = None  # built by `train` (DDP wraps there)
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------- subclass hooks
    def wrap_policy(self, policy: nn.Module) -> nn.Module:
        """The module to train: `policy` wrapped in peft LoRA adapters when config.lora, else `policy` itself
        (a subclass may inject adapters its own way, e.g. diffusers' `add_adapter` on an SD UNet)."""
        return _wrap_lora(policy, self.config) if self.config.lora else policy

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        """{name: module} saved in (and restored from) every checkpoint: the trained module."""
        return {"model": self.module}

    def make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """The optimiser over the trainable parameters (Adam at config.lr)."""
        return torch.optim.Adam(params, lr=self.config.lr)

    def collect(self, shard: int) -> B:
        """The no-gradient part of data shard `shard`'s step, drawn from that shard's own generator."""
        raise NotImplementedError

    def loss(self, batches: list[B]) -> StepLoss:
        """The loss over this process's batches (normalised over the global batch under DDP)."""
        raise NotImplementedError

    def statistics(self, out: StepLoss) -> dict[str, float]:
        """Figures of the step to log (averaged over `log_every` steps); default: the loss."""
        return {"loss": float(out.loss.detach())}

    # ------------------------------------------------------------------------------------ building blocks
    def sample_states(self, shard: int) -> States:
        """`states_per_trajectory` states from each of the shard's guided trajectories (of the policy, the
        reference or both, per `config.state_source`; never the final step, where the sampler returns the
        mean); draws conditions, trajectories and state indices from the shard's generator, in that order."""
        gen, n_traj = self.generators[shard], self.shard_sizes[shard]
        cfg = self.config
        cond = self.cond_sampler(n_traj, gen)
        n_ref = {"policy": 0, "reference": n_traj, "mixed": n_traj // 2}[cfg.state_source]
        parts = []
        for model, rows in ((self.module, slice(0, n_traj - n_ref)), (self.reference, slice(n_traj - n_ref, n_traj))):
            n = rows.stop - rows.start
            if n == 0:
                continue
            traj = sample(
                [model],
                self.scheduler,
                _SinglePolicy(),
                shape=(n, *self.sample_shape),
                cond=select_cond(cond, torch.arange(rows.start, rows.stop)),
                num_inference_steps=_steps_for(self.scheduler, cfg.num_inference_steps),
                guidance_scale=cfg.guidance_scale if self.null_cond is not None else None,
                null_cond=self.null_cond,
                generator=gen,
                dtype=self.dtype,
                device=self.device,
                progress=False,
                return_trajectory=True,
            ).trajectory
            assert traj is not None
            parts.append(torch.stack(traj[:-1], dim=0))  # [steps, n, ...]
        n_steps, per = len(self.timesteps), cfg.states_per_trajectory
        idx = torch.randint(0, n_steps - 1, (n_traj, per), generator=gen)  # never the final (mean) step
        stack = torch.cat(parts, dim=1)  # [steps, n_traj, ...]
        traj_ix = torch.arange(n_traj).repeat_interleave(per)
        x = stack[idx.flatten(), traj_ix].double()  # [N, ...]
        t_all = torch.tensor(self.timesteps, dtype=self.t_dtype)
        p_all = torch.tensor(self.prev_timesteps, dtype=self.t_dtype)
        return States(x=x, t=t_all[idx.flatten()], prev=p_all[idx.flatten()], cond=select_cond(cond, traj_ix))

    def kernel(self, model: Callable[[Tensor, Tensor, Any], Tensor], states: States) -> GaussianKernel:
        """The reverse kernel p(x_{t-1} | x_t) of `model` (a guided denoiser) at `states` (float64 input)."""
        out = model(states.x.to(self.dtype), states.t, states.cond)
        return self.scheduler.kernel(out, states.t, states.x, prev_timestep=states.prev)

    def score(self, x0: Tensor, cond: Any) -> Tensor:
        """The reward of clean samples x0 [N, ...] under conditions [N], validated: [N]."""
        return check_reward_values(self.reward(x0, cond), x0.shape[0], self.config.reward)

    def step_reward(self, x_prev: Tensor, prev_t: Tensor, cond: Any) -> Tensor:
        """The step reward r_t(x_{t-1}) of candidates x_prev [N, ...] at timesteps prev_t [N]: [N] float64.

        Default (MSDDA.md §3): the reward of the reference's Tweedie estimate x0_hat(x_prev) at prev_t, clipped
        to [-1, 1] (unless clip_samples=False). The constructor's `step_reward=` replaces it. Gradients flow
        to x_prev when the reward is differentiable (call under torch.no_grad when they are not needed).
        """
        if self.custom_step_reward is not None:
            values = self.custom_step_reward(x_prev, prev_t, cond)
            return check_reward_values(values, x_prev.shape[0], f"step reward ({self.config.reward})").double()
        ref_next = self.reference_guided(x_prev.to(self.dtype), prev_t, cond)
        x0_hat = self.scheduler.predict_x0(ref_next, prev_t, x_prev)
        if self.clip_samples:
            x0_hat = x0_hat.clamp(-1, 1)
        return self.score(x0_hat.to(self.dtype), cond).double()

    def evaluate(self) -> dict[str, float]:
        """Held-out reward and KL to the reference (see `evaluate_policy`); never touches the training streams."""
        return evaluate_policy(
            self.module,
            self.reference,
            self.scheduler,
            self.reward,
            self.config,
            self.sample_shape,
            self.cond_sampler,
            self.null_cond,
            clip_samples=self.clip_samples,
            dtype=self.dtype,
            device=self.device,
        )

    def learning_rate(self, step: int) -> float:
        """The learning rate of optimiser step `step` (0-based) under config.lr_schedule."""
        cfg = self.config
        if cfg.lr_schedule == "cosine":
            return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / max(cfg.steps, 1)))
        return cfg.lr

    def optimise(self, loss: Tensor, step: int | None = None) -> None:
        """One optimiser step on `loss` (gradient clipped to config.grad_clip when > 0); `step` sets the
        scheduled learning rate (None: leave it as it is)."""
        if step is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.learning_rate(step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()

    # ------------------------------------------------------------------------------------ checkpoints
    def check_resumable(self, checkpoint: Checkpoint) -> None:
        """CheckpointError if `checkpoint` was written with a config that changes the training path."""
        saved = dict(checkpoint.state.get("config", {}))
        for f in dataclasses.fields(self.config_class):  # keys added since the checkpoint was written: defaults
            if saved and f.name not in saved and f.default is not dataclasses.MISSING:
                saved[f.name] = f.default
        now = self.config.to_dict()
        skip = self.config.resumable_fields
        diff = {
            k: (saved.get(k), now.get(k))
            for k in sorted(set(saved) | set(now))
            if k not in skip and saved.get(k) != now.get(k)
        }
        if diff:
            shown = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(
                f"checkpoint {checkpoint.path} was written by a run with another configuration ({shown}); rerun "
                "with the same options, or pass --no-resume to start over"
            )

    def save_checkpoint(self, step: int, elapsed: float) -> Path | None:
        """Checkpoint `step` (a collective: every rank contributes its shards' generators; rank 0 writes)."""
        states = self.ctx.all_gather_objects({d: g.get_state() for d, g in self.generators.items()})
        if not self.ctx.is_main:
            return None
        gens = {}
        for part in states:
            for d, state in part.items():
                gens[generator_key(d)] = torch.Generator()
                gens[generator_key(d)].set_state(state)
        return self.checkpointer.save(
            step,
            self.checkpoint_modules(),
            self.optimizer,
            gens,
            {"config": self.config.to_dict(), "elapsed_seconds": elapsed},
        )

    def load_checkpoint(self, path: str | Path) -> tuple[int, float]:
        """Restore weights, optimiser and this process's shard generators from `path`: (step, elapsed s)."""
        ckpt = self.checkpointer.load(
            path,
            self.checkpoint_modules(),
            self.optimizer,
            {generator_key(d): g for d, g in self.generators.items()},
            validate=self.check_resumable,
        )
        return ckpt.step, float(ckpt.state.get("elapsed_seconds", 0.0))

    def restore(self, resume: bool) -> tuple[int, float]:
        """Rank 0 picks the newest checkpoint (resume) or clears old ones; every rank loads the same one.
        Returns (start step, elapsed seconds); (0, 0.0) for a fresh start."""
        ctx = self.ctx

        def choose() -> str | None:
            if not ctx.is_main:
                return None
            self.out.mkdir(parents=True, exist_ok=True)
            latest = self.checkpointer.latest()
            if resume and latest is not None:
                return str(latest)
            self.checkpointer.clear()
            return None

        chosen = ctx.broadcast_object(ctx.call_checked(choose, AlignmentError))
        if chosen is None:
            return 0, 0.0
        start = ctx.call_checked(lambda: self.load_checkpoint(Path(chosen)), CheckpointError)
        if ctx.is_main:
            logger.info("resuming from %s (step %d)", chosen, start[0])
        return start

    # ------------------------------------------------------------------------------------------ logging
    def open_log(self, start_step: int) -> None:
        """Rank 0: keep the log rows up to `start_step` (a resumed run) and rewrite the log with them."""
        if not self.ctx.is_main:
            return
        self.history = []
        if self.log_path.exists() and start_step > 0:
            for line in self.log_path.read_text().splitlines():
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a row cut short by a kill; it lies past the checkpoint
                    continue
                if row.get("step", 0) <= start_step:
                    self.history.append(row)
        write_text_atomic(self.log_path, "".join(json.dumps(r) + "\n" for r in self.history))

    def log_row(self, row: dict[str, Any]) -> None:
        """Rank 0: append one row to the history and to train_log.jsonl."""
        self.history.append(row)
        with self.log_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    # --------------------------------------------------------------------------------------- the loop
    def final_model(self) -> nn.Module:
        """A frozen eval-mode copy of the trained policy (LoRA adapters merged)."""
        model = self.module.merge_and_unload() if self.config.lora else self.module
        return copy.deepcopy(model).eval().requires_grad_(False)

    def progress_description(self) -> str:
        return f"align {self.config.reward}"

    def train(self, *, resume: bool = True, progress: bool = True, throttle: float = 0.0) -> TrainResult:
        """Run (or resume) training to config.steps; see the module docstring.

        resume: continue from the newest checkpoint in out/checkpoints (same config required).
        throttle: seconds to sleep per step (tests use it to interrupt a real run at a known point).
        Only rank 0 writes the log and the checkpoints; on the other ranks history and final_eval are empty.
        """
        cfg, ctx = self.config, self.ctx
        start_step, elapsed = self.restore(resume)
        self.open_log(start_step)
        if start_step == 0 and ctx.is_main:
            self.log_row({"step": 0, **self.evaluate()})
        self.train_guided = guide(ctx.wrap_model(self.module), cfg.guidance_scale, self.null_cond)

        window: dict[str, float] = {}
        wcount = 0
        t0 = time.perf_counter() - elapsed
        bar = tqdm(
            range(start_step, cfg.steps),
            desc=self.progress_description(),
            disable=not (progress and ctx.is_main),
            initial=start_step,
            total=cfg.steps,
        )
        for step in bar:
            batches = [self.collect(d) for d in self.shards]
            out = self.loss(batches)
            self.optimise(out.loss, step)
            with torch.no_grad():
                stats = self.statistics(out)
            for k, v in stats.items():
                window[k] = window.get(k, 0.0) + v
            wcount += 1
            done = step + 1
            if throttle > 0:
                time.sleep(throttle)
            log_now = done % cfg.log_every == 0 or done == cfg.steps
            if ctx.is_main and log_now:
                row = {
                    "step": done,
                    **{k: v / wcount for k, v in window.items()},
                    **self.evaluate(),
                    "seconds": round(time.perf_counter() - t0, 2),
                }
                postfix = {"loss": f"{row['loss']:.3f}"} if "loss" in row else {}
                bar.set_postfix(**postfix, reward=f"{row['eval_reward']:.3f}")
                logger.info("%s step %d: %s", self.progress_description(), done, row)
                self.log_row(row)
            if log_now:
                window, wcount = {}, 0
            if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                self.save_checkpoint(done, time.perf_counter() - t0)
        seconds = time.perf_counter() - t0
        if not ctx.is_main:
            final_eval: dict[str, float] = {}
        elif self.history:
            final_eval = {k: v for k, v in self.history[-1].items() if k.startswith("eval_")}
        else:
            final_eval = self.evaluate()
        return self.result_class(model=self.final_model(), seconds=seconds, final_eval=final_eval, history=self.history)
