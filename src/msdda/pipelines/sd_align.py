"""Step-level training of a Stable Diffusion LoRA objective (`msdda align --task sd`).

    result = align_sd("sd15", "imagereward=models/ImageReward", prompts, "loras/ir",
                      sd_train_config("step-rl", "imagereward", steps=500), options=SDAlignOptions(dtype="float16"))

The step-level trainers of `msdda.alignment` (step-RL, step-level DPO) run unchanged on an SD UNet:

* the policy is the base UNet with one LoRA adapter injected by diffusers' `add_adapter` (peft); the reference
  is the very same UNet with its adapters disabled, so no second copy of the UNet is held;
* conditions are prompt indices: each prompt is encoded once by the text encoder and looked up per row (the
  empty prompt, last, is the null condition of classifier-free guidance), so the trainers' condition
  handling (select, repeat, concatenate) is the one they use for class labels;
* a reward sees images: the step reward of a candidate x_{t-1} is the reward of the reference's Tweedie
  estimate x0_hat(x_{t-1}) (MSDDA.md §3), decoded by the VAE to [B, 3, H, W] in [0, 1], with the prompt texts
  of its rows. Differentiable rewards (ImageReward, PickScore, HPS, aesthetic, CLIP, brightness) pass their
  gradient through the decoder to the policy's kernel (the step-RL reparameterised estimator); JPEG sizes are
  black-box (leave-one-out);
* training kernels must be stochastic: DDIM with eta > 0 (default 1, the setting of the peer's scripts) or
  DDPM. At eta = 0 every kernel is a point mass, so there is no step-level problem to solve.

The result folder holds `pytorch_lora_weights.safetensors` (diffusers' LoRA file: `pipe.load_lora_weights(out)`
and `msdda sample --objective name=out` both read it), `align_config.json` (every option, the trainer config,
timing and the final held-out figures), `train_log.jsonl` and `checkpoints/` (LoRA weights, optimiser and every
generator: a killed run resumes where its last checkpoint left off). Under torchrun / accelerate launch every
process runs this function; rank 0 alone writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from msdda.alignment.errors import AlignmentError
from msdda.alignment.trainer import StepTrainer, StepTrainerConfig, TrainResult
from msdda.atomic import write_json_atomic
from msdda.config import JSONConfig
from msdda.core.rewards import is_differentiable, validate_reward_output
from msdda.distributed import get_context, local_device
from msdda.models.variance_head import TimestepVarianceHead, save_variance_head, with_variance_offsets
from msdda.pipelines.errors import PipelineError, RewardModelError

ADAPTER = "msdda-objective"
LORA_FILE = "pytorch_lora_weights.safetensors"
CONFIG_FILE = "align_config.json"
SD_TRAINERS: tuple[str, ...] = ("step-rl", "bt", "listwise", "hard")
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
SCHEDULERS: tuple[str, ...] = ("ddim", "ddpm")
DEFAULT_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

# The trainer defaults on SD: LoRA on the attention projections, few trajectories per step (each is a full
# guided sampling run of the UNet), a small held-out batch, and SD's usual CFG and step count.
SD_TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 200,
    "lr": 1e-4,
    "trajectories": 2,
    "states_per_trajectory": 2,
    "guidance_scale": 7.5,
    "num_inference_steps": 50,
    "eval_samples": 2,
    "checkpoint_every": 25,
    "log_every": 10,
    "lora": True,
    "lora_rank": 8,
    "lora_alpha": 8.0,
    "lora_targets": list(DEFAULT_LORA_TARGETS),
}


class SDAlignError(AlignmentError, PipelineError):
    """Bad options of SD training (named, with the fix), raised before any model loads where possible."""


@dataclass
class SDAlignOptions(JSONConfig):
    """How the SD parts are run; recorded in align_config.json.

    dtype: the frozen weights' dtype (UNet, VAE, text encoder); the LoRA weights train in float32, as diffusers'
    training scripts do. device: "cpu", "cuda", "cuda:1", "mps". gradient_checkpointing: recompute the UNet's
    activations (diffusers' `enable_gradient_checkpointing`) and the reward pass of each chunk in backward, for
    memory. scheduler / eta: the training kernels (DDIM with eta in (0, 1], or DDPM). height / width: training
    resolution in pixels (default: the UNet's sample size). reward_batch: candidates decoded and scored per
    chunk (bounds VAE / reward-model memory). allow_pickle: let a reward model load a pickle (trusted files only).
    variance_head: train a `TimestepVarianceHead` with the LoRA (a zero-initialised log-variance offset per
    timestep bucket and latent channel, `variance_head_buckets` buckets), so this objective's kernel variance
    differs from the scheduler's and MSDDA's fusion is more than DB-MPA's average (docs/stable_diffusion.md).
    """

    config_error = SDAlignError

    dtype: str = "float32"
    device: str = "cpu"
    gradient_checkpointing: bool = False
    scheduler: str = "ddim"
    eta: float = 1.0
    height: int | None = None
    width: int | None = None
    reward_batch: int = 8
    allow_pickle: bool = False
    variance_head: bool = False
    variance_head_buckets: int = 50

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise SDAlignError(f"dtype={self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.scheduler not in SCHEDULERS:
            raise SDAlignError(f"scheduler={self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        eta = self.eta
        if isinstance(eta, bool) or not isinstance(eta, int | float) or not math.isfinite(eta):
            raise SDAlignError(f"eta={eta!r} must be a number in (0, 1]")
        if self.scheduler == "ddim" and not 0.0 < float(eta) <= 1.0:
            raise SDAlignError(
                f"eta={eta!r}: DDIM training needs eta in (0, 1] (at eta 0 every kernel is a point mass and there is "
                "no step-level problem to solve); pass --eta 1, or --scheduler ddpm"
            )
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % 8):
                raise SDAlignError(f"{name}={v!r} must be a positive multiple of 8 (pixels)")
        if isinstance(self.reward_batch, bool) or int(self.reward_batch) < 1:
            raise SDAlignError(f"reward_batch={self.reward_batch!r} must be >= 1")
        b = self.variance_head_buckets
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 1000:
            raise SDAlignError(f"variance_head_buckets={b!r} must be an integer in [1, 1000]")


def sd_train_config(trainer: str = "step-rl", reward: str = "reward", *, beta: float | None = None, **overrides: Any):
    """The config of `trainer` on SD: a StepRLConfig ("step-rl") or a DPOConfig with labels=trainer ("bt",
    "listwise", "hard"), with `SD_TRAIN_DEFAULTS` and beta 0.05 unless given; `overrides` replace any field."""
    from msdda.alignment.dpo import DPOConfig
    from msdda.alignment.step_rl import StepRLConfig

    if trainer not in SD_TRAINERS:
        raise SDAlignError(f"trainer={trainer!r}; choose one of {', '.join(SD_TRAINERS)}")
    fields = {**SD_TRAIN_DEFAULTS, "reward": reward, **({"beta": beta} if beta is not None else {}), **overrides}
    if not fields.get("lora", True):
        raise SDAlignError("SD training trains LoRA adapters only (lora=True); a full UNet copy is not offered")
    if trainer == "step-rl":
        return StepRLConfig(**fields)
    return DPOConfig(**{**fields, "labels": trainer})


def check_prompts(prompts: Any) -> list[str]:
    """The training prompts: a non-empty list of non-empty strings (SDAlignError naming the bad one)."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
        raise SDAlignError(f"prompts must be a non-empty list of texts (--prompt-file FILE), got {prompts!r:.80}")
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise SDAlignError(f"prompt {i} is {p!r:.60}; every prompt must be a non-empty text")
        out.append(p.strip())
    return out


def check_reward_weights(specs: Sequence[str], weights: Sequence[float] | None) -> list[float] | None:
    """None for one reward; for several, one finite weight >= 0 each, not all zero (SDAlignError otherwise)."""
    if weights is None:
        if len(specs) > 1:
            raise SDAlignError(f"{len(specs)} rewards need --reward-weights, one each (e.g. 0.5,0.5)")
        return None
    w = [float(v) for v in weights]
    if len(w) != len(specs):
        raise SDAlignError(f"--reward-weights {w} gives {len(w)} weights for {len(specs)} rewards; give one each")
    if not all(math.isfinite(v) and v >= 0 for v in w) or not any(v > 0 for v in w):
        raise SDAlignError(f"--reward-weights {w} must be finite, >= 0 and not all zero")
    return w


def check_base_folder(base: Any) -> Path:
    """A local StableDiffusionPipeline folder (model_index.json of class StableDiffusionPipeline)."""
    path = Path(str(base)).expanduser()
    index = path / "model_index.json"
    if not index.is_file():
        raise SDAlignError(
            f"--base {path} is not a diffusers pipeline folder (no model_index.json); save one with "
            "pipe.save_pretrained(folder) or download it first"
        )
    try:
        cls_name = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, ValueError) as exc:
        raise SDAlignError(f"--base {path}: cannot read model_index.json ({exc})") from None
    if cls_name != "StableDiffusionPipeline":
        raise SDAlignError(f"--base {path} holds a {cls_name or 'unknown'} pipeline; SD training needs SD 1.x / 2.x")
    return path


def resolve_reward(spec: str, device: Any = "cpu", *, allow_pickle: bool = False) -> tuple[str, Callable[..., Tensor]]:
    """(name, reward(images [B, 3, H, W] in [0, 1], prompts) -> [B]) of a reward spec: a built-in name
    (jpeg-compressibility, jpeg-incompressibility, brightness), KIND=PATH of `load_reward_model`, or
    'package.module:function' (a function of (images, prompts); see `msdda.tasks.rewards.get_reward`)."""
    from msdda.pipelines.reward_models import load_reward_model
    from msdda.pipelines.sd_task import SDTaskError, _builtin_reward, _check_reward_spec

    if isinstance(spec, str) and "=" not in spec and ":" in spec:
        from msdda.errors import MSDDAError
        from msdda.tasks.rewards import get_reward

        try:
            fn = get_reward(spec.strip()).inner  # unchecked: its cond is the prompt texts, a list
        except MSDDAError as exc:
            raise SDAlignError(f"--reward {spec!r}: {exc}") from None
        return spec.strip().rpartition(":")[2], fn
    try:
        kind, path = _check_reward_spec("--reward", spec)
    except SDTaskError as exc:
        raise SDAlignError(str(exc)) from None
    if path is None:
        return kind, _builtin_reward(kind)
    kwargs = {"allow_pickle": True} if allow_pickle else {}
    return kind, load_reward_model(kind, path, device=device, **kwargs)


# ----- the denoisers and the reward the trainers see ---------------------------------------------------------


class PromptIndexDenoiser(nn.Module):
    """`(x_t [B, 4, h, w], t [B], cond = prompt indices [B]) -> eps` through a UNet, each row's prompt embeddings
    looked up in `embeddings` [P + 1, L, D] (row P: the empty prompt).

    adapters: True for the policy (the UNet is a submodule: its LoRA weights are what trains); False for the
    reference, which runs the same UNet with its adapters disabled and does not register it, so freezing the
    reference (`requires_grad_(False)`) leaves the policy's adapters trainable. variance_head: the policy's
    `TimestepVarianceHead`; the output is then [B, 3C] (eps and kernel offsets, `with_variance_offsets`).
    """

    def __init__(
        self, unet: nn.Module, embeddings: Tensor, *, adapters: bool, variance_head: nn.Module | None = None
    ) -> None:
        super().__init__()
        if adapters:
            self.unet = unet
        else:
            object.__setattr__(self, "_shared_unet", unet)
        self.adapters = bool(adapters)
        self.variance_head = variance_head
        self.register_buffer("embeddings", embeddings, persistent=False)

    @property
    def model(self) -> nn.Module:
        return self.unet if self.adapters else self._shared_unet

    def forward(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if not isinstance(cond, Tensor):
            raise SDAlignError(f"cond must be prompt indices [B], got {type(cond).__name__}")
        unet = self.model
        hidden = self.embeddings[cond.to(self.embeddings.device)]
        t = t.to(x_t.device)
        if self.adapters:
            eps = unet(x_t, t, encoder_hidden_states=hidden, return_dict=False)[0]
            if self.variance_head is None:
                return eps
            return with_variance_offsets(eps, self.variance_head(t))
        # The UNet's own gradient checkpointing would recompute these blocks in backward, when the adapters are
        # enabled again (a different function); the reward chunk around this call is recomputed as a whole instead.
        blocks = [m for m in unet.modules() if getattr(m, "gradient_checkpointing", False) is True]
        unet.disable_adapters()
        for m in blocks:
            m.gradient_checkpointing = False
        try:
            return unet(x_t, t, encoder_hidden_states=hidden, return_dict=False)[0]
        finally:
            for m in blocks:
                m.gradient_checkpointing = True
            unet.enable_adapters()


class DecodedImageReward:
    """The trainers' `(x0 latents [B, 4, h, w], prompt indices [B]) -> [B]`: latents decoded by the VAE to
    images in [0, 1] (as diffusers' decode and postprocess), scored by `fn(images, prompt_texts)`.

    fn may be a list of rewards with `weights`: then sum_k w_k fn_k (multi-objective step-level RL, the
    "step-rl" baseline), every reward scoring the same decoded images (one decode for all of them).
    """

    def __init__(
        self,
        fn: Callable[..., Tensor] | Sequence[Callable[..., Tensor]],
        name: str,
        vae: nn.Module,
        prompts: Sequence[str],
        weights: Sequence[float] | None = None,
    ) -> None:
        self.fns = [fn] if callable(fn) else list(fn)
        self.weights = [1.0] if weights is None and callable(fn) else [float(w) for w in (weights or [])]
        if len(self.weights) != len(self.fns):
            raise SDAlignError(f"{len(self.fns)} rewards need as many weights, got {list(weights or [])}")
        self.name = name
        self.vae = vae
        self.prompts = list(prompts)
        self.differentiable = all(is_differentiable(f) for f in self.fns)

    def decode(self, latents: Tensor) -> Tensor:
        vae = self.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        texts = [self.prompts[int(i)] for i in cond] if cond is not None else None
        images = self.decode(x0)
        total = None
        for f, w in zip(self.fns, self.weights, strict=True):
            name = self.name if len(self.fns) == 1 else reward_label(f)
            values = validate_reward_output(f(images, texts), x0.shape[0], name, error=RewardModelError)
            total = w * values if total is None else total + w * values
        assert total is not None
        return total.to(x0.dtype)


def reward_label(fn: Any) -> str:
    """A printable name of a reward callable."""
    from msdda.core.rewards import reward_name

    return reward_name(fn)


class _TrainableParameters(nn.Module):
    """The trainable parameters of a module, shared (not copied), as a module of their own: a checkpoint
    of it holds the LoRA weights only, not the frozen UNet."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        for name, p in module.named_parameters():
            if p.requires_grad:
                self.register_parameter(name.replace(".", "__"), p)


class SDLoRAMixin:
    """What SD training changes in a step trainer: adapters injected by diffusers, checkpoints of the LoRA
    weights alone, chunked (and optionally recomputed) step rewards, and no merged copy at the end."""

    def __init__(self, *args: Any, reward_batch: int = 8, recompute_rewards: bool = False, **kwargs: Any) -> None:
        self.reward_batch = int(reward_batch)
        self.recompute_rewards = bool(recompute_rewards)
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]

    def wrap_policy(self, policy: nn.Module) -> nn.Module:
        return policy  # the adapter was injected (and only it left trainable) before the trainer was built

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        return {"lora": _TrainableParameters(self.module)}  # type: ignore[attr-defined]

    def final_model(self) -> nn.Module:
        return self.module.model  # type: ignore[attr-defined]  # the UNet with its adapter (saved as a LoRA file)

    def progress_description(self) -> str:
        return f"align sd {self.config.reward}"  # type: ignore[attr-defined]

    def step_reward(self, x_prev: Tensor, prev_t: Tensor, cond: Any) -> Tensor:
        base = super().step_reward  # type: ignore[misc]
        n, size = x_prev.shape[0], int(self.reward_batch)
        if n <= size:
            return self._chunk(base, x_prev, prev_t, cond)
        parts = []
        for lo in range(0, n, size):
            rows = torch.arange(lo, min(lo + size, n))
            c = cond[rows.to(cond.device)] if isinstance(cond, Tensor) else cond
            parts.append(self._chunk(base, x_prev[lo : lo + size], prev_t[lo : lo + size], c))
        return torch.cat(parts)

    def _chunk(self, fn: Callable[..., Tensor], x_prev: Tensor, prev_t: Tensor, cond: Any) -> Tensor:
        if self.recompute_rewards and torch.is_grad_enabled() and x_prev.requires_grad:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(fn, x_prev, prev_t, cond, use_reentrant=False)
        return fn(x_prev, prev_t, cond)


def _sd_trainer_class(config: StepTrainerConfig) -> type[StepTrainer]:
    from msdda.alignment.dpo import DPOTrainer
    from msdda.alignment.step_rl import StepRLConfig, StepRLTrainer

    base = StepRLTrainer if isinstance(config, StepRLConfig) else DPOTrainer
    return type(f"SD{base.__name__}", (SDLoRAMixin, base), {})


@dataclass
class SDAlignResult:
    """out: the result folder; lora_file: its diffusers LoRA file; train: the trainer's result (model: the UNet
    with the trained adapter)."""

    out: Path
    lora_file: Path
    train: TrainResult
    variance_head: TimestepVarianceHead | None = None


def _load_base(path: Path, options: SDAlignOptions) -> Any:
    from msdda.pipelines._deps import dtype_kwargs, require

    diffusers = require("diffusers", "msdda align --task sd")
    require("peft", "msdda align --task sd")
    kwargs = {
        "use_safetensors": True,
        "local_files_only": True,
        "safety_checker": None,
        "requires_safety_checker": False,
        **dtype_kwargs(diffusers, getattr(torch, options.dtype)),
    }
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(path), **kwargs)
    try:
        pipe = pipe.to(local_device(options.device))  # "cuda" under torchrun: this process's own GPU
    except (RuntimeError, AssertionError) as exc:
        raise SDAlignError(f"device={options.device!r} is not usable here ({exc}); pass --device cpu") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def align_sd(
    base: str | Path,
    reward: str | Sequence[str],
    prompts: Sequence[str],
    out: str | Path,
    config: StepTrainerConfig,
    *,
    reward_weights: Sequence[float] | None = None,
    options: SDAlignOptions | None = None,
    resume: bool = True,
    progress: bool = True,
    throttle: float = 0.0,
) -> SDAlignResult:
    """Train one LoRA objective of the SD pipeline folder `base` towards `reward` (a spec, see
    `resolve_reward`) on `prompts`, with the step trainer `config` (`sd_train_config`); write it to `out`.
    reward may be a list of specs with `reward_weights` (one each): the LoRA then learns the step optimum of
    sum_k w_k r_k, the multi-objective step-level RL policy at those weights (the sweep's "step-rl" method).
    See the module docstring for what the folder holds and how training works."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from msdda.core.schedule import KernelScheduler
    from msdda.pipelines.sd import own_scheduler

    options = options or SDAlignOptions()
    options.validate()
    config.validate()
    if not config.lora:
        raise SDAlignError("SD training trains LoRA adapters only: pass a config with lora=True (sd_train_config)")
    texts = check_prompts(prompts)
    specs = [reward] if isinstance(reward, str) else list(reward)
    if not specs or not all(isinstance(r, str) and r.strip() for r in specs):
        raise SDAlignError(f"reward must be a spec or a non-empty list of specs, got {reward!r:.80}")
    weights = check_reward_weights(specs, reward_weights)
    base_path = check_base_folder(base)
    out = Path(out)
    ctx = get_context()
    pipe = _load_base(base_path, options)
    resolved = [resolve_reward(r, pipe.device, allow_pickle=options.allow_pickle) for r in specs]
    unet = pipe.unet
    unet.requires_grad_(False)
    lora_config = LoraConfig(
        r=int(config.lora_rank),
        lora_alpha=float(config.lora_alpha),
        target_modules=list(config.lora_targets),
        init_lora_weights="gaussian",
        lora_dropout=0.0,
    )
    torch.manual_seed(int(config.seed))  # the adapter's initialisation (lora_B is zero: the policy starts at the base)
    try:
        unet.add_adapter(lora_config, adapter_name=ADAPTER)
    except ValueError as exc:
        raise SDAlignError(f"cannot add LoRA adapters to targets {list(config.lora_targets)}: {exc}") from None
    for p in unet.parameters():  # the adapter trains in float32 whatever the frozen weights' dtype
        if p.requires_grad:
            p.data = p.data.float()
    if options.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    with torch.no_grad():
        cond_embeds, null_embeds = pipe.encode_prompt(texts, pipe.device, 1, True, None)
    embeddings = torch.cat([cond_embeds, null_embeds[:1]]).to(unet.dtype)
    head = None
    if options.variance_head:
        torch.manual_seed(int(config.seed))
        head = TimestepVarianceHead(
            int(pipe.scheduler.config.num_train_timesteps), int(unet.config.out_channels), options.variance_head_buckets
        ).to(pipe.device)
    policy = PromptIndexDenoiser(unet, embeddings, adapters=True, variance_head=head)
    reference = PromptIndexDenoiser(unet, embeddings, adapters=False)
    kind_scheduler = own_scheduler(pipe.scheduler, options.scheduler)
    scheduler = KernelScheduler.from_diffusers(kind_scheduler, eta=options.eta if options.scheduler == "ddim" else None)
    height = options.height or unet.config.sample_size * pipe.vae_scale_factor
    width = options.width or unet.config.sample_size * pipe.vae_scale_factor
    sample_shape = (unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    label = (
        resolved[0][0]
        if weights is None
        else "+".join(f"{w:g}*{n}" for (n, _), w in zip(resolved, weights, strict=True))
    )
    fns = resolved[0][1] if weights is None else [f for _, f in resolved]
    image_reward = DecodedImageReward(fns, label, pipe.vae, texts, weights)
    n_prompts = len(texts)

    def cond_sampler(n: int, generator: torch.Generator | None) -> Tensor:
        return torch.randint(0, n_prompts, (n,), generator=generator)

    trainer = _sd_trainer_class(config)(
        policy,
        reference,
        scheduler,
        image_reward,
        config,
        out=out,
        sample_shape=sample_shape,
        cond_sampler=cond_sampler,
        null_cond=torch.tensor([n_prompts]),
        context=ctx,
        clip_samples=False,  # latents are not bounded; the reward decodes them
        reward_batch=options.reward_batch,
        recompute_rewards=options.gradient_checkpointing,
    )
    started = time.time()
    result = trainer.train(resume=resume, progress=progress, throttle=throttle)
    lora_file = out / LORA_FILE
    if not ctx.is_main:
        ctx.barrier()  # return once rank 0 has written the LoRA
        return SDAlignResult(out=out, lora_file=lora_file, train=result, variance_head=head)
    state = {
        k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER).items()
    }
    tmp = out / ".lora.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        tmp, unet_lora_layers=state, unet_lora_adapter_metadata=lora_config.to_dict(), safe_serialization=True
    )
    (tmp / LORA_FILE).replace(lora_file)  # the file appears whole or not at all
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(lora_file, 0o666 & ~umask)  # safetensors writes 0600; the file is the user's to share
    tmp.rmdir()
    if head is not None:
        save_variance_head(head, out)
    write_json_atomic(
        out / CONFIG_FILE,
        {
            "task": "sd",
            "base": str(base_path),
            "reward": specs[0] if weights is None else specs,
            "reward_weights": weights,
            "prompts": texts,
            "trainer": "step-rl" if config.__class__.__name__ == "StepRLConfig" else getattr(config, "labels", "bt"),
            "train_config": config.to_dict(),
            "options": options.to_dict(),
            "lora": {
                k: (sorted(v) if isinstance(v, set) else v)
                for k, v in lora_config.to_dict().items()
                if k in ("r", "lora_alpha", "target_modules", "init_lora_weights")
            },
            "sample_shape": list(sample_shape),
            "variance_head": head.config() if head is not None else None,
            "train_seconds": round(result.seconds, 1),
            "wall_seconds": round(time.time() - started, 1),
            "final_eval": result.final_eval,
        },
    )
    ctx.barrier()
    return SDAlignResult(out=out, lora_file=lora_file, train=result, variance_head=head)


__all__ = [
    "ADAPTER",
    "CONFIG_FILE",
    "DEFAULT_LORA_TARGETS",
    "LORA_FILE",
    "SD_TRAINERS",
    "SD_TRAIN_DEFAULTS",
    "DecodedImageReward",
    "PromptIndexDenoiser",
    "SDAlignError",
    "SDAlignOptions",
    "SDAlignResult",
    "align_sd",
    "check_prompts",
    "check_reward_weights",
    "resolve_reward",
    "sd_train_config",
]
