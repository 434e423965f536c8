"""Task "sd": a Stable Diffusion base with LoRA / full-UNet objectives as a TaskBundle, for `msdda sweep`.

    sd_bundle(base="sd15", objectives={"aes": "loras/aes", "pick": "loras/pick"},
              rewards={"aes": "aesthetic=clip-folder", "pick": "jpeg-compressibility"}, prompts=[...])

The bundle is the pipeline's own ObjectiveSet (`MSDDAPipeline` and its `_ObjectiveStore`): denoisers over
latents with LoRA adapters switched per call, the base UNet as the reference, a LoRA-delta (or UNet) soup.
Conditions are text embeddings (each prompt encoded once; the empty prompt is the null condition of
classifier-free guidance). Rewards get the latents decoded by the VAE to images [B, 3, H, W] in [0, 1] and
the unit's prompt texts. Noise is drawn as MSDDAPipeline draws it (a CPU generator, diffusers' randn_tensor,
x_T scaled by init_noise_sigma, the last step sampled), so a sweep unit at generator seed s equals
`MSDDAPipeline(...)(prompt, weights, seed=s, num_images_per_prompt=batch)`. Samples are stored as PNGs.

`check_sd_options` validates every option (paths exist, reward specs are known) before any model loads;
`register()` adds the task to `msdda.evaluation.tasks` (the CLI calls it). diffusers is imported lazily.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from msdda.core.rewards import is_differentiable, validate_reward_output
from msdda.pipelines.errors import PipelineError, RewardModelError

TASK = "sd"
DTYPES = ("float32", "float16", "bfloat16")
SCHEDULERS = ("ddim", "ddpm")
BUILTIN_REWARDS = ("jpeg-compressibility", "jpeg-incompressibility", "brightness")
OPTIONS = (
    "base",
    "objectives",
    "rewards",
    "betas",
    "prompts",
    "device",
    "dtype",
    "guidance_scale",
    "scheduler",
    "eta",
    "height",
    "width",
    "policies",
)
# the base folders the task takes: SD 1.x / 2.x, SDXL and the learned-variance PixArt family
PIPELINES = (
    "StableDiffusionPipeline",
    "StableDiffusionXLPipeline",
    "PixArtAlphaPipeline",
    "PixArtSigmaPipeline",
    "DiTPipeline",  # class-conditional: its "prompts" are class names (or ids) of the folder's id2label
)
WEIGHT_TOLERANCE = 1e-9  # a trained step-RL policy serves a weight vector equal to its own to this tolerance


class SDTaskError(PipelineError):
    """Bad options of the "sd" sweep task (named, with the fix), raised before any model loads."""


def _builtin_reward(spec: str) -> Callable[..., Tensor]:
    from msdda.pipelines.rewards import brightness, jpeg_compressibility, jpeg_incompressibility

    return {
        "jpeg-compressibility": jpeg_compressibility,
        "jpeg-incompressibility": jpeg_incompressibility,
        "brightness": lambda: brightness,
    }[spec]()


def _check_reward_spec(name: str, spec: Any) -> tuple[str, str | None]:
    """(kind, path): a built-in name (path None) or KIND=PATH of `load_reward_model`."""
    from msdda.pipelines.reward_models import REWARD_MODELS

    if not isinstance(spec, str) or not spec.strip():
        raise SDTaskError(f"reward {name!r}: spec {spec!r:.60} must be a string, e.g. jpeg-compressibility")
    spec = spec.strip()
    if spec in BUILTIN_REWARDS:
        return spec, None
    kind, sep, path = spec.partition("=")
    key = kind.strip().lower().replace("_", "-")
    if not sep:
        raise SDTaskError(
            f"reward {name!r}: unknown spec {spec!r}; use one of {list(BUILTIN_REWARDS)} or KIND=PATH with KIND in "
            f"{sorted(REWARD_MODELS)}"
        )
    if key not in REWARD_MODELS:
        raise SDTaskError(f"reward {name!r}: unknown reward model kind {kind!r}; choose one of {sorted(REWARD_MODELS)}")
    if not Path(path.strip()).expanduser().exists():
        raise SDTaskError(f"reward {name!r}: {path.strip()} does not exist (the {key} model's local files)")
    return key, str(Path(path.strip()).expanduser())


def check_sd_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The "sd" task's options, checked and with defaults filled in, without loading anything.

    base: a local StableDiffusionPipeline or StableDiffusionXLPipeline folder; objectives {name: LoRA path or UNet
    folder} (>= 2);
    rewards {name: spec} for every objective (spec: jpeg-compressibility, jpeg-incompressibility,
    brightness, or KIND=PATH for `load_reward_model`); betas {name: beta} (default 1 each); prompts: the
    default prompt texts; device ("cpu"), dtype ("float32"), guidance_scale (7.5; <= 1: off), scheduler
    ("ddim" | "ddpm"), eta (DDIM, 0), height / width (pixels; default the model's); policies: the step-RL LoRAs
    of the "step-rl" method, a list of {"weights": {objective: w}, "path": LoRA folder}, each trained by
    `msdda align --task sd --reward ... --reward-weights ...` (its beta is read from its align_config.json).
    """
    if not isinstance(options, Mapping):
        raise SDTaskError(f"task options must be a mapping, got {type(options).__name__}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise SDTaskError(f"unknown sd task options {unknown}; valid: {list(OPTIONS)}")
    o = dict(options)
    base = o.get("base")
    if not base:
        raise SDTaskError("the sd task needs `base`: a local StableDiffusionPipeline folder (--base PATH)")
    base_path = Path(str(base)).expanduser()
    index = base_path / "model_index.json"
    if not index.is_file():
        raise SDTaskError(f"base {base_path} is not a diffusers pipeline folder (no model_index.json)")
    cls_name = json.loads(index.read_text()).get("_class_name", "")
    if cls_name not in PIPELINES:
        raise SDTaskError(
            f"base {base_path} holds a {cls_name or 'unknown'} pipeline; the sd task takes SD 1.x / 2.x, SDXL, "
            f"PixArt or DiT ({', '.join(PIPELINES)})"
        )
    objectives = o.get("objectives") or {}
    if not isinstance(objectives, Mapping) or len(objectives) < 2:
        raise SDTaskError(
            f"the sd task needs at least 2 objectives {{name: LoRA path or UNet folder}}, got {objectives!r:.80} "
            "(--objective NAME=PATH, repeated)"
        )
    for name, path in objectives.items():
        if not isinstance(path, str | Path) or not Path(str(path)).expanduser().exists():
            raise SDTaskError(f"objective {name!r}: {path} does not exist (a LoRA file or folder, or a UNet folder)")
    rewards = o.get("rewards") or {}
    if not isinstance(rewards, Mapping):
        raise SDTaskError(f"rewards must map objective names to specs, got {type(rewards).__name__}")
    for name, spec in rewards.items():
        _check_reward_spec(name, spec)
    missing = [n for n in objectives if n not in rewards]
    extra = sorted(set(rewards) - set(objectives))
    if missing or extra:
        raise SDTaskError(
            f"every objective needs one reward (--reward NAME=SPEC): missing for {missing}, no objective for {extra}"
        )
    betas = o.get("betas") or {}
    if not isinstance(betas, Mapping) or any(n not in objectives for n in betas):
        raise SDTaskError(f"betas {betas!r:.80} must map objective names {list(objectives)} to numbers")
    for name, b in betas.items():
        if isinstance(b, bool) or not isinstance(b, int | float) or not math.isfinite(b) or b <= 0:
            raise SDTaskError(f"beta {b!r} of {name!r} must be a finite number > 0")
    dtype = o.get("dtype") or "float32"
    if dtype not in DTYPES:
        raise SDTaskError(f"dtype={dtype!r}; choose one of {DTYPES}")
    # PixArt's default keeps the transformer's learned variance (DDPM learned_range); SD's is DDIM
    learned = cls_name.startswith("PixArt") or cls_name == "DiTPipeline"
    scheduler = o.get("scheduler") or ("ddpm" if learned else "ddim")
    if scheduler not in SCHEDULERS:
        raise SDTaskError(f"scheduler={scheduler!r}; choose one of {SCHEDULERS}")
    for key, default in (("guidance_scale", 7.5), ("eta", 0.0)):
        v = o.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise SDTaskError(f"{key}={v!r} must be a finite number")
        o[key] = float(v)
    if not 0.0 <= o["eta"] <= 1.0 or (o["eta"] > 0 and scheduler != "ddim"):
        raise SDTaskError(f"eta={o['eta']} must be in [0, 1] and needs scheduler='ddim'")
    for key in ("height", "width"):
        v = o.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % 8):
            raise SDTaskError(f"{key}={v!r} must be a positive multiple of 8 (pixels)")
    policies = _check_policies(o.get("policies") or [], list(objectives))
    prompts = o.get("prompts")
    if prompts is not None and (isinstance(prompts, str) or not all(isinstance(p, str) and p.strip() for p in prompts)):
        raise SDTaskError(f"prompts must be a list of non-empty strings, got {prompts!r:.80}")
    return {
        **o,
        "base": str(base_path),
        "objectives": {str(k): str(v) for k, v in objectives.items()},
        "rewards": {str(k): str(v).strip() for k, v in rewards.items()},
        "betas": {str(k): float(v) for k, v in betas.items()},
        "dtype": dtype,
        "scheduler": scheduler,
        "device": str(o.get("device") or "cpu"),
        "prompts": list(prompts) if prompts is not None else [],
        "policies": policies,
    }


def _check_policies(policies: Any, objectives: list[str]) -> list[dict[str, Any]]:
    """The step-RL policies option: [{"weights": {objective: w >= 0}, "path": existing LoRA path}], each weight
    vector once; objectives left out weigh 0."""
    if not isinstance(policies, Sequence) or isinstance(policies, str):
        raise SDTaskError(f"policies must be a list of {{'weights': {{...}}, 'path': ...}}, got {policies!r:.80}")
    out: list[dict[str, Any]] = []
    for i, entry in enumerate(policies):
        if not isinstance(entry, Mapping) or set(entry) != {"weights", "path"}:
            raise SDTaskError(f"policies[{i}] = {entry!r:.80} must be {{'weights': {{objective: w}}, 'path': LoRA}}")
        weights = entry["weights"]
        if not isinstance(weights, Mapping) or not weights or any(k not in objectives for k in weights):
            raise SDTaskError(f"policies[{i}].weights {weights!r:.80} must map objectives of {objectives} to weights")
        w = {}
        for k, v in weights.items():
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise SDTaskError(f"policies[{i}].weights[{k!r}] = {v!r} must be a finite number >= 0")
            w[str(k)] = float(v)
        if not any(v > 0 for v in w.values()):
            raise SDTaskError(f"policies[{i}].weights are all zero; the step optimum there is the base model itself")
        full = {k: w.get(k, 0.0) for k in objectives}
        path = Path(str(entry["path"])).expanduser()
        if not path.exists():
            raise SDTaskError(f"policies[{i}].path {path} does not exist (a LoRA trained by msdda align --task sd)")
        for j, seen in enumerate(out):
            if all(abs(seen["weights"][k] - full[k]) <= WEIGHT_TOLERANCE for k in objectives):
                raise SDTaskError(f"policies[{i}] and policies[{j}] are for the same weights {full}; keep one")
        out.append({"weights": full, "path": str(path)})
    return out


def _policy_record(path: str) -> tuple[float, float | None, str] | None:
    """(beta, training seconds, trainer) of a LoRA trained by `msdda align --task sd`, from the align_config.json
    beside it (None: not recorded, e.g. a LoRA trained elsewhere)."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    try:
        doc = json.loads((folder / "align_config.json").read_text())
        seconds = doc.get("train_seconds")
        return (
            float(doc["train_config"]["beta"]),
            (float(seconds) if seconds is not None else None),
            str(doc["trainer"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def vae_factor(pipe: Any) -> int:
    """The VAE's downsampling factor of a diffusers pipeline (DiTPipeline has no vae_scale_factor attribute)."""
    f = getattr(pipe, "vae_scale_factor", None)
    return int(f) if f else 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def _repeat_rows(cond: Any, batch: int) -> Any:
    """A one-row condition repeated to `batch` rows: a tensor, or each tensor field of a dataclass (PixArt's
    TextCondition)."""
    if isinstance(cond, Tensor):
        return cond.repeat(batch, *([1] * (cond.dim() - 1)))
    import dataclasses

    fields = {f.name: getattr(cond, f.name) for f in dataclasses.fields(cond)}
    return type(cond)(**{k: None if v is None else _repeat_rows(v, batch) for k, v in fields.items()})


class _Prompts:
    """Text conditions: each prompt encoded once, by the pipeline's own family hook (`MSDDAPipeline._encode`:
    SD's prompt embeddings, SDXL's with the pooled embeddings and time ids packed in); remembers which texts
    the last condition it made holds, so rewards (called with that condition) get the prompt texts."""

    def __init__(self, pipe: Any, device: torch.device, do_cfg: bool, height: int, width: int) -> None:
        self.pipe = pipe
        self.device = device
        self.do_cfg = do_cfg
        self.height, self.width = height, width
        self.cache: dict[str, Tensor] = {}
        self.null: Tensor | None = None
        self._last: tuple[Tensor, list[str]] | None = None

    def _encode(self, prompt: str) -> Any:
        if prompt not in self.cache:
            with torch.no_grad():
                if hasattr(self.pipe, "class_ids"):  # DiT: a class id, the null class for guidance
                    embeds = torch.tensor(self.pipe.class_ids([prompt]), device=self.device)
                    negative = torch.tensor([self.pipe.num_classes], device=self.device) if self.do_cfg else None
                elif hasattr(self.pipe, "_encode"):  # the SD pipelines' family hook
                    encoded = self.pipe._encode(
                        prompt, self.device, 1, self.do_cfg, None, prompt_embeds=None, negative_prompt_embeds=None,
                        lora_scale=None, clip_skip=None, height=self.height, width=self.width, family_kwargs={},
                    )  # fmt: skip
                    embeds, negative = encoded.cond, encoded.null_cond
                else:
                    embeds, negative = self._text_condition(prompt)
            self.cache[prompt] = embeds
            if self.null is None and negative is not None:
                self.null = negative
        return self.cache[prompt]

    def _text_condition(self, prompt: str) -> tuple[Any, Any]:
        """PixArt: T5 embeddings and mask (and alpha's micro-conditions), as MSDDAPixArtPipeline builds them."""
        from msdda.pipelines.pixart import TextCondition

        base = self.pipe.base
        sigma = type(base).__name__ == "PixArtSigmaPipeline"
        embeds, mask, neg, neg_mask = base.encode_prompt(
            prompt, self.do_cfg, negative_prompt="", device=self.device, clean_caption=False,
            max_sequence_length=300 if sigma else 120,
        )  # fmt: skip
        res = aspect = None
        if getattr(self.pipe.transformer, "use_additional_conditions", False):
            res = torch.tensor([[self.height, self.width]], dtype=embeds.dtype, device=self.device)
            aspect = torch.tensor([[self.height / self.width]], dtype=embeds.dtype, device=self.device)
        null = TextCondition(neg, neg_mask, res, aspect) if self.do_cfg else None
        return TextCondition(embeds, mask, res, aspect), null

    def make_cond(self, prompt: Any, batch: int) -> Any:
        if not isinstance(prompt, str):
            raise SDTaskError(f"sd prompts are texts; got {prompt!r:.60} ({type(prompt).__name__})")
        cond = _repeat_rows(self._encode(prompt), batch)
        self._last = (cond, [prompt] * batch)
        return cond

    def texts(self, cond: Any, batch: int) -> list[str] | None:
        if self._last is not None and cond is self._last[0]:
            texts = self._last[1]
            return texts if len(texts) == batch else [texts[0]] * batch
        return None


class _ImageReward:
    """A reward on images [B, 3, H, W] in [0, 1] and prompt texts, as the bundle's `(latents, cond) -> [B]`:
    the latents are decoded by the VAE (differentiably, for RGG)."""

    def __init__(self, fn: Callable[..., Tensor], name: str, decode: Callable[[Tensor], Tensor], prompts: _Prompts):
        self.fn = fn
        self.name = name
        self.decode = decode
        self.prompts = prompts
        self.differentiable = is_differentiable(fn)

    def __call__(self, x0: Tensor, cond: Any = None) -> Tensor:
        images = self.decode(x0)
        values = self.fn(images, self.prompts.texts(cond, x0.shape[0]))
        values = validate_reward_output(values, x0.shape[0], self.name, error=RewardModelError)
        return values.to(x0.dtype)


def sd_bundle(**options: Any) -> Any:
    """The "sd" TaskBundle (options: see `check_sd_options`); loads the base pipeline, objectives, rewards."""
    from msdda.pipelines.reward_models import load_reward_model
    from msdda.pipelines.sd import DiffusersNoise, MSDDAPipeline, _ObjectiveStore
    from msdda.pipelines.sdxl import MSDDAXLPipeline
    from msdda.tasks.bundle import TaskBundle

    o = check_sd_options(options)
    dtype = getattr(torch, o["dtype"])
    from msdda.distributed import local_device

    device_name = local_device(o["device"])  # "cuda" under torchrun / accelerate launch: this process's own GPU
    cls_name = json.loads((Path(o["base"]) / "model_index.json").read_text()).get("_class_name")
    if cls_name.startswith("PixArt") or cls_name == "DiTPipeline":
        from msdda.pipelines.dit import MSDDADiTPipeline
        from msdda.pipelines.pixart import MSDDAPixArtPipeline

        family = MSDDADiTPipeline if cls_name == "DiTPipeline" else MSDDAPixArtPipeline
        pipe = family.from_pretrained(
            o["base"], o["objectives"], scheduler=o["scheduler"], dtype=dtype, device=device_name
        )
    else:
        pipe = (MSDDAXLPipeline if cls_name == PIPELINES[1] else MSDDAPipeline).from_pretrained(
            o["base"], o["objectives"], scheduler=o["scheduler"], dtype=dtype, device=device_name, safety_checker=None
        )
    pipe.set_progress_bar_config(disable=True)
    base = pipe.base
    device = base._execution_device
    vae = base.vae
    do_cfg = o["guidance_scale"] > 1.0
    network = pipe._base_model  # the UNet, or PixArt's transformer
    factor = vae_factor(base)  # DiTPipeline has no vae_scale_factor attribute
    height = o.get("height") or network.config.sample_size * factor
    width = o.get("width") or network.config.sample_size * factor
    prompts = _Prompts(pipe, device, do_cfg, height, width)

    last: list[Any] = [None, None, None]  # (latents, their version, images) of the last no-grad decode

    def decode(latents: Tensor) -> Tensor:
        """Latents [B, 4, h, w] -> images [B, 3, H, W] in [0, 1], as diffusers' VAE decode and postprocess.
        Without gradients the last result is reused for the very same tensor (a unit's final batch is
        scored by every reward and saved as PNGs: one decode)."""
        grad = torch.is_grad_enabled()
        if not grad and last[0] is latents and last[1] == latents._version:
            return last[2]
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        images = (images / 2 + 0.5).clamp(0, 1)
        if not grad:
            last[:] = [latents, latents._version, images]
        return images

    rewards = {}
    for name, spec in o["rewards"].items():
        kind, path = _check_reward_spec(name, spec)
        fn = _builtin_reward(kind) if path is None else load_reward_model(kind, path, device=device)
        rewards[name] = _ImageReward(fn, name, decode, prompts)
    store = _ObjectiveStore(pipe, {}, "image", None)

    def soup(weights: Mapping[str, float], average: str = "delta") -> Any:
        store.release()  # one soup adapter at a time: the previous weight vector's is removed first
        return store.soup(weights, average=average)

    channels = network.config.in_channels
    if hasattr(pipe, "class_ids"):  # DiT: the null class is the unconditional condition
        prompts.null = torch.tensor([pipe.num_classes], device=device) if do_cfg else None
    else:
        prompts.make_cond(o["prompts"][0] if o["prompts"] else "", 1)  # the null condition: the empty prompt's
    if do_cfg and prompts.null is None:
        raise SDTaskError("encode_prompt returned no negative embeddings for classifier-free guidance")
    bundle = TaskBundle(
        name=TASK,
        objectives=list(o["objectives"]),
        base=store.reference,
        aligned=store.aligned,
        scheduler=base.scheduler,
        rewards=rewards,
        prompts=list(o["prompts"]),
        sample_shape=(channels, height // factor, width // factor),
        make_cond=prompts.make_cond,
        betas={n: o["betas"].get(n, 1.0) for n in o["objectives"]},
        guidance_scale=o["guidance_scale"] if do_cfg else None,
        null_cond=prompts.null if do_cfg else None,
        soup=soup,
        dtype=network.dtype,
        prompt_label=str,
        rgg_scale=1.0,
        device=device,
        noise=DiffusersNoise(),
        final_step="sample",
        eta=o["eta"] if o["scheduler"] == "ddim" else None,
        generator_device="cpu",
        init_noise_sigma=float(base.scheduler.init_noise_sigma),
        decode=decode,
    )
    bundle.pipeline = pipe  # type: ignore[attr-defined]  # kept alive with the bundle (and for callers)
    if o["policies"]:
        bundle.weighted_policy = _StepRLPolicies(pipe, o, list(o["objectives"]))
    return bundle


class _StepRLPolicies:
    """The sd task's `weighted_policy(weights, beta, *, train=True)`: the step-RL LoRA listed for these weights
    (loaded as an extra adapter of the pipeline's UNet on first use). SD policies are never trained inside a
    sweep (hours on a GPU): a missing one raises MissingPolicyError naming the command that trains it."""

    def __init__(self, pipe: Any, options: Mapping[str, Any], objectives: list[str]) -> None:
        self.pipe = pipe
        self.options = options
        self.objectives = objectives
        self.loaded: dict[int, Any] = {}

    def __call__(self, weights: Mapping[str, float], beta: float, *, train: bool = True) -> Any:
        from msdda.sampling.methods import STEP_RL, MissingPolicyError, WeightedPolicy

        full = {k: float(weights.get(k, 0.0)) for k in self.objectives}
        used = [k for k, v in full.items() if v > 0]
        if len(used) == 1:  # one objective alone: its own LoRA is that policy when step-RL trained it at this beta
            rec = _policy_record(self.options["objectives"][used[0]])
            if rec is not None and rec[2] == STEP_RL and abs(rec[0] - beta) <= 1e-9 * max(1.0, abs(beta)):
                return WeightedPolicy(self.pipe.denoiser(used[0]), key=f"aligned:{used[0]}", train_seconds=rec[1])
        for i, entry in enumerate(self.options["policies"]):
            if not all(abs(entry["weights"][k] - full[k]) <= WEIGHT_TOLERANCE for k in self.objectives):
                continue
            recorded = _policy_record(entry["path"])
            if recorded is not None and abs(recorded[0] - beta) > 1e-9 * max(1.0, abs(beta)):
                raise MissingPolicyError(
                    f"{STEP_RL}: the policy at {entry['path']} was trained at beta={recorded[0]:g}, but weights {full} "
                    f"ask for beta={beta:g} (the objectives' betas averaged with these weights): retrain it with "
                    f"--beta {beta:g}, or set the task's betas so that they give {recorded[0]:g}"
                )
            if i not in self.loaded:
                name = f"{STEP_RL}-{i}"
                self.pipe.add_objective(name, entry["path"])
                self.loaded[i] = self.pipe.denoiser(name)
            seconds = recorded[1] if recorded is not None else None
            return WeightedPolicy(self.loaded[i], key=entry["path"], train_seconds=seconds)
        o = self.options
        rewards = " ".join(f"--reward {o['rewards'][k]}" for k in self.objectives)
        ws = ",".join(f"{full[k]:g}" for k in self.objectives)
        raise MissingPolicyError(
            f"{STEP_RL}: no step-RL LoRA is listed for weights {full}. Train one with `msdda align --task sd --base "
            f"{o['base']} {rewards} --reward-weights {ws} --beta {beta:g} --trainer step-rl --prompt-file PROMPTS "
            f'--out DIR`, then add {{"weights": {json.dumps(full)}, "path": "DIR"}} to the task option '
            "policies (SD policies are not trained inside a sweep)"
        )


def sd_task(options: Mapping[str, Any]) -> Any:
    """The task factory of `msdda.evaluation.tasks` for "sd"."""
    return sd_bundle(**dict(options))


def register(overwrite: bool = True) -> None:
    """Make "sd" a task of `msdda sweep` / `msdda.evaluation.tasks.get_task_bundle`."""
    from msdda.evaluation.tasks import register_task

    register_task(TASK, sd_task, overwrite=overwrite)


__all__: Sequence[str] = ["BUILTIN_REWARDS", "SDTaskError", "check_sd_options", "register", "sd_bundle", "sd_task"]
