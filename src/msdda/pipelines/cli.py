"""`msdda sample`: generate images with MSDDAPipeline from local checkpoints (a typer command).

    msdda sample --base PATH --objective NAME=PATH ... --weights NAME=W ... --prompt TEXT --out DIR
                 [--method msdda] [--steps 50] [--guidance-scale 7.5] [--seed 0 | --seeds 0,1,2] [--eta 0]
                 [--prompt-file FILE] [--betas NAME=B ...] [--no-safety-checker] [--quiet]

Writes DIR/image_000.png, ... (prompt by prompt, each prompt's images in seed order) and DIR/config.json
(the resolved configuration, the cost, the image file names and each image's prompt and seed). Every
file is written to a temporary name and renamed, so nothing is half-written; while the images are written
DIR holds a file INCOMPLETE (removed at the end), so a killed run says so. Every argument and the output
folder are checked before the model is loaded.
`msdda prompts [NAME] [--out FILE] [--overwrite]` lists the shipped prompt sets (msdda.pipelines.prompt_sets)
or prints / writes one in the --prompt-file format.
`register(app)` adds the commands to a typer app (msdda.cli calls it).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from msdda.atomic import check_output_dir, incomplete_marker, write_bytes_atomic

logger = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")


def _parse_pairs(values: list[str], what: str, *, number: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for text in values:
        name, sep, value = text.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            example = "aesthetic=0.7" if number else "aesthetic=loras/aesthetic"
            raise typer.BadParameter(f"{what} {text!r} is not NAME=VALUE, e.g. {example}")
        if name in out:
            raise typer.BadParameter(f"{what} {name!r} is given twice")
        if number:
            try:
                out[name] = float(value)
            except ValueError:
                raise typer.BadParameter(f"{what} {text!r}: {value!r} is not a number") from None
            if not math.isfinite(out[name]):
                raise typer.BadParameter(f"{what} {text!r}: {value!r} is not a finite number")
        else:
            out[name] = value
    return out


def _seed(value: int | None) -> int | None:
    if value is not None and not 0 <= value <= 2**63 - 1:
        raise typer.BadParameter(f"seed {value} is outside [0, {2**63 - 1}] (it seeds a torch.Generator)")
    return value


def _parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; each a valid torch seed."""
    items = [t.strip() for t in text.split(",")]
    try:
        seeds = [int(t) for t in items]
    except ValueError:
        raise typer.BadParameter(f"--seeds {text!r} is not a comma-separated list of integers, e.g. 0,1,2") from None
    for value in seeds:
        _seed(value)
    return seeds


def _read_prompt_file(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise typer.BadParameter(f"--prompt-file {path}: cannot read it ({exc})") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise typer.BadParameter(
            f"--prompt-file {path} holds no prompts (blank lines and lines starting with # are skipped); "
            "write one prompt per line"
        )
    return prompts


@contextlib.contextmanager
def _quiet_libraries(quiet: bool) -> Iterator[None]:
    """With quiet: diffusers' and transformers' progress bars (loading, denoising) off and their logging at
    error level, restored afterwards."""
    saved = []
    if quiet:
        for name in ("diffusers", "transformers"):
            try:
                logs = importlib.import_module(f"{name}.utils.logging")
            except ImportError:
                continue
            saved.append((logs, logs.get_verbosity(), logs.is_progress_bar_enabled()))
            logs.set_verbosity_error()
            logs.disable_progress_bar()
    try:
        yield
    finally:
        for logs, verbosity, bars in saved:
            logs.set_verbosity(verbosity)
            if bars:
                logs.enable_progress_bar()


def _finite(value: float, option: str, *, positive: bool = False) -> float:
    if not math.isfinite(value) or (positive and value <= 0):
        raise typer.BadParameter(f"{option} {value} must be a finite number{' > 0' if positive else ''}")
    return value


def _atomic_write_image(path: Path, image: Any) -> None:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())


# The msdda pipeline for each diffusers pipeline class a --base folder can hold (its model_index.json):
# (module, class name).
FAMILY_PIPELINES: dict[str, tuple[str, str]] = {
    "StableDiffusionPipeline": ("msdda.pipelines.sd", "MSDDAPipeline"),
    "StableDiffusionXLPipeline": ("msdda.pipelines.sdxl", "MSDDAXLPipeline"),
    "PixArtAlphaPipeline": ("msdda.pipelines.pixart", "MSDDAPixArtPipeline"),
    "PixArtSigmaPipeline": ("msdda.pipelines.pixart", "MSDDAPixArtPipeline"),
    "StableDiffusion3Pipeline": ("msdda.pipelines.sd3", "MSDDASD3Pipeline"),
    "FluxPipeline": ("msdda.pipelines.flux", "MSDDAFluxPipeline"),
}


def _family_pipeline(base: Path) -> tuple[Any, str]:
    """(the msdda pipeline class, the diffusers class name) for the folder `base`; SD's when model_index.json
    is missing or unreadable (its from_pretrained then says what is wrong)."""
    try:
        name = json.loads((Path(base) / "model_index.json").read_text()).get("_class_name", "")
    except (OSError, ValueError, AttributeError):
        name = ""
    module, cls = FAMILY_PIPELINES.get(name, FAMILY_PIPELINES["StableDiffusionPipeline"])
    return getattr(importlib.import_module(module), cls), name


def _pixart_call_options(pipe: Any) -> dict[str, Any]:
    """PixArt's resolution binning where its transformer's size has aspect-ratio bins (diffusers' default), off
    where it has none (small or custom models)."""
    from msdda.pipelines.pixart import _aspect_bins

    bins = _aspect_bins(type(pipe.base).__name__, int(pipe.transformer.config.sample_size))
    return {"use_resolution_binning": bins is not None}


def sample_command(
    base: Path = typer.Option(
        ...,
        help="Local diffusers pipeline folder (model_index.json): Stable Diffusion 1.x / 2.x, SDXL, SD3 / 3.5, "
        "PixArt-alpha / Sigma or FLUX.1; the matching msdda pipeline is chosen from its class.",
    ),
    objective: list[str] = typer.Option(
        [], help="NAME=PATH: a LoRA (diffusers or peft format, safetensors) or a full-UNet folder; repeatable."
    ),
    weights: list[str] = typer.Option([], help="NAME=W per objective ('reference' allowed); repeatable."),
    prompt: list[str] = typer.Option([], help="Prompt text; repeat for several prompts (or use --prompt-file)."),
    prompt_file: Path | None = typer.Option(
        None, help="A text file with one prompt per line (blank lines and lines starting with # are skipped)."
    ),
    out: Path = typer.Option(..., help="Output folder for image_###.png and config.json."),
    method: str | None = typer.Option(
        None, help="A method name (`msdda methods` lists them; default msdda). Reward-guided ones need Python."
    ),
    steps: int = typer.Option(50, min=1, max=1000, help="Denoising steps."),
    guidance_scale: float | None = typer.Option(
        None,
        help="Classifier-free guidance per objective (<= 1: off). Default: the family's, as diffusers' (SD 7.5, "
        "SDXL 5.0, PixArt 4.5).",
    ),
    seed: int | None = typer.Option(
        None, callback=_seed, help="Seed of the one torch.Generator (CPU) used for all randomness (default 0)."
    ),
    seeds: str | None = typer.Option(
        None,
        help="Comma-separated seeds, e.g. 0,1,2 (instead of --seed): one image per seed per prompt, each from its "
        "own generator, so each image equals the --seed run with that seed.",
    ),
    eta: float = typer.Option(
        0.0, min=0.0, max=1.0, help="DDIM eta, or the flow SDE's noise level for SD3 / FLUX (0: deterministic)."
    ),
    scheduler: str | None = typer.Option(
        None,
        help="ddim | ddpm | euler-ancestral | sde-dpmsolver++ (first order; SD 1.x / 2.x), rebuilt from the base's "
        "config, or keep. Default: ddim (SD, SDXL); ddpm with the learned variance (PixArt).",
    ),
    negative_prompt: str | None = typer.Option(None, help="Negative prompt for classifier-free guidance."),
    num_images: int = typer.Option(1, min=1, help="Images per prompt."),
    height: int | None = typer.Option(None, help="Image height in pixels (default: the model's)."),
    width: int | None = typer.Option(None, help="Image width in pixels (default: the model's)."),
    beta: float | None = typer.Option(
        None, help="Target KL strength (exponents a_k = w_k beta_k / beta); default sum_k w_k beta_k / sum_k w_k."
    ),
    betas: list[str] = typer.Option(
        [], help="NAME=B: the KL strength beta_k an objective was aligned with (default 1); repeatable."
    ),
    device: str = typer.Option("cpu", help="torch device, e.g. cuda."),
    dtype: str = typer.Option("float32", help="float32 | float16 | bfloat16."),
    no_safety_checker: bool = typer.Option(
        False,
        "--no-safety-checker",
        help="Do not load the safety checker the base folder ships (SD 1.5 does). It blacks out images it flags "
        "as NSFW; turn it off for research runs where its false positives would blank images and bias scores, "
        "or to save its memory and time. The default keeps it.",
    ),
    quiet: bool = typer.Option(False, help="No progress bars (also diffusers' and transformers' loading bars)."),
    batch_models: str = typer.Option(
        "auto",
        help="auto | on | off: evaluate a step's objectives in one UNet call (LoRAs via peft mixed-adapter "
        "batches, full UNets vmapped). auto: on accelerators only; on: always, or fail naming why; off: never.",
    ),
) -> None:
    """Generate images with K objectives (LoRAs or UNets) fused at every denoising step (MSDDA)."""
    import torch

    from msdda.errors import MSDDAError

    objectives = _parse_pairs(objective, "--objective", number=False)
    weight_map = _parse_pairs(weights, "--weights", number=True)
    beta_map = _parse_pairs(betas, "--betas", number=True)
    for name, value in beta_map.items():
        if name not in objectives:
            raise typer.BadParameter(
                f"--betas {name}={value:g}: no --objective is named {name!r} (objectives: {sorted(objectives)})"
            )
        if value <= 0:
            raise typer.BadParameter(f"--betas {name}={value:g}: a KL strength must be > 0")
    if prompt and prompt_file is not None:
        raise typer.BadParameter("pass --prompt or --prompt-file, not both")
    if prompt_file is not None:
        prompt = _read_prompt_file(prompt_file)
    elif not prompt:
        raise typer.BadParameter("pass --prompt TEXT (repeatable) or --prompt-file FILE")
    seed_list: list[int] | None = None
    if seeds is not None:
        if seed is not None:
            raise typer.BadParameter("pass --seed or --seeds, not both")
        seed_list = _parse_seeds(seeds)
        if num_images != 1:
            raise typer.BadParameter(
                f"--seeds gives one image per seed per prompt; drop --num-images {num_images} (or use --seed)"
            )
    elif seed is None:
        seed = 0
    from msdda.sampling import MSDDA
    from msdda.sampling.methods import PlanError, get_method

    method = method or MSDDA.name
    try:
        spec, _ = get_method(method)
    except PlanError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if spec.needs_rewards:
        raise typer.BadParameter(f"--method {method} needs reward models; call MSDDAPipeline from Python for it")
    if dtype not in DTYPES:
        raise typer.BadParameter(f"--dtype {dtype!r}; choose one of {DTYPES}")
    batch_choice = {"auto": None, "on": True, "off": False}
    if batch_models not in batch_choice:
        raise typer.BadParameter(f"--batch-models {batch_models!r}; choose auto, on or off")
    pipeline_class, family = _family_pipeline(base)
    kind = pipeline_class.__name__
    pixart, flux = kind == "MSDDAPixArtPipeline", kind == "MSDDAFluxPipeline"
    flow = flux or kind == "MSDDASD3Pipeline"  # flow matching: the folder's own schedule, --eta the SDE's noise
    from msdda.pipelines import pixart as pixart_module
    from msdda.pipelines import sd as sd_module

    choices = pixart_module.SCHEDULERS if pixart else sd_module.SCHEDULERS
    if kind == "MSDDAXLPipeline":
        choices = ("ddim", "ddpm")  # the Gaussian samplers tested on SDXL
    if flow:
        choices = ()  # FLUX / SD3 sample with their own flow-matching schedule; --eta is the SDE's noise level
    if scheduler is None:
        scheduler = "ddpm" if pixart else "keep" if flow else "ddim"
    if guidance_scale is None:  # diffusers' defaults (FLUX.1-dev: the embedded guidance value)
        defaults = {
            "MSDDAXLPipeline": 5.0,
            "MSDDAPixArtPipeline": 4.5,
            "MSDDAFluxPipeline": 3.5,
            "MSDDASD3Pipeline": 7.0,
        }
        guidance_scale = defaults.get(kind, 7.5)
    if scheduler not in (*choices, "keep"):
        takes = (
            f"one of {', '.join(choices)} or keep"
            if choices
            else "none (its own flow-matching schedule; --eta > 0: the SDE)"
        )
        raise typer.BadParameter(f"--scheduler {scheduler!r}; {family or 'this base'} takes {takes}")
    if (pixart or flux) and batch_models != "auto" or (pixart or flow) and no_safety_checker:
        flag = "--no-safety-checker" if no_safety_checker else "--batch-models"
        raise typer.BadParameter(f"{flag} applies to Stable Diffusion folders; {family} has no such option")
    needs_weights = spec.weighted
    if needs_weights and not weight_map:
        raise typer.BadParameter(f"--method {method} needs --weights NAME=W for the objectives")
    _finite(guidance_scale, "--guidance-scale")
    if beta is not None:
        _finite(beta, "--beta", positive=True)
    if any(not p.strip() for p in prompt):
        raise typer.BadParameter(f"--prompt {prompt!r}: every prompt must have some text")
    # one --negative-prompt applies to every prompt (diffusers wants one per prompt for a list of prompts)
    negative: str | list[str] | None = negative_prompt
    if negative_prompt is not None and len(prompt) > 1:
        negative = [negative_prompt] * len(prompt)
    check_output_dir(out)  # before the model is loaded
    generator = None
    if seed_list is not None:
        generator = [torch.Generator().manual_seed(s) for _ in prompt for s in seed_list]
    per_prompt = len(seed_list) if seed_list is not None else num_images
    image_seeds = [s for _ in prompt for s in seed_list] if seed_list is not None else None
    extra: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False} if no_safety_checker else {}
    try:
        from safetensors import SafetensorError

        try:
            with _quiet_libraries(quiet):
                pipe = pipeline_class.from_pretrained(
                    base,
                    objectives,
                    **({} if flux else {"scheduler": None if scheduler == "keep" else scheduler}),
                    dtype=getattr(torch, dtype),
                    device=device,
                    **extra,
                )
        except (MSDDAError, OSError):
            raise
        except (ValueError, KeyError, SafetensorError) as exc:  # a corrupt model_index.json or weights file
            raise MSDDAError(
                f"cannot load the model from --base {base} or an --objective: {type(exc).__name__}: {exc}; "
                "check that the folders are complete diffusers/safetensors files"
            ) from exc
        if quiet:
            pipe.set_progress_bar_config(disable=True)
        with _quiet_libraries(quiet):
            result = pipe(
                prompt if len(prompt) > 1 else prompt[0],
                weight_map if needs_weights else None,
                method=method,
                **({"negative_prompt": negative} if negative is not None or not (pixart or flux) else {}),
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                eta=eta,
                num_images_per_prompt=per_prompt,
                generator=generator,
                seed=seed,
                height=height,
                width=width,
                beta=beta,
                betas=beta_map or None,
                output_type="pil",
                progress=not quiet,
                **(
                    _pixart_call_options(pipe)
                    if pixart
                    else {}
                    if flux
                    else {"batch_models": batch_choice[batch_models]}
                ),
            )
    except MSDDAError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    from msdda import __version__

    files = [f"image_{i:03d}.png" for i in range(len(result.images))]
    with incomplete_marker(out, "msdda sample"):  # several files: a killed run leaves a folder saying so
        for name, image in zip(files, result.images, strict=True):
            _atomic_write_image(out / name, image)
        record = {
            "command": "sample",
            "msdda_version": __version__,
            "base": str(base),
            "prompts": list(prompt),
            "prompt_file": None if prompt_file is None else str(prompt_file),
            "negative_prompt": negative_prompt,
            "device": device,
            "dtype": dtype,
            "scheduler_option": scheduler,
            "beta": beta,
            "betas_option": beta_map or None,
            "safety_checker": not no_safety_checker,
            **result.config,
            "seed": seed,
            "seeds": seed_list,
            "image_prompts": [p for p in prompt for _ in range(per_prompt)],
            "image_seeds": image_seeds,
            "cost": result.cost.to_dict(),
            "nsfw_content_detected": getattr(result, "nsfw_content_detected", None),
            "pipeline": pipeline_class.__name__,
            "images": files,
        }
        write_bytes_atomic(out / "config.json", (json.dumps(record, indent=2, default=str) + "\n").encode())
    typer.echo(f"wrote {len(files)} image(s) and config.json to {out}")


def prompts_command(
    name: str | None = typer.Argument(None, help="A prompt set (without it: list the sets and their sizes)."),
    out: Path | None = typer.Option(
        None, help="Write the set to this file (one prompt per line, the --prompt-file format) instead of stdout."
    ),
    overwrite: bool = typer.Option(
        False,
        help="Replace an existing --out file (atomically: the old file stays whole until the new one is written).",
    ),
) -> None:
    """List the prompt sets that ship with msdda, or print / write one (`msdda prompts colors --out colors.txt`)."""
    from msdda.atomic import write_text_atomic
    from msdda.pipelines.prompt_sets import (
        DESCRIPTIONS,
        PROMPT_SETS,
        PromptSetError,
        format_prompts,
        load_prompt_set,
    )

    if name is None:
        if out is not None or overwrite:
            raise typer.BadParameter(
                "--out and --overwrite need a prompt set NAME, e.g. `msdda prompts colors --out colors.txt`"
            )
        width = max(len(n) for n in PROMPT_SETS)
        for set_name in PROMPT_SETS:
            typer.echo(f"{set_name:<{width}}  {len(load_prompt_set(set_name)):>4} prompts  {DESCRIPTIONS[set_name]}")
        return
    try:
        prompts = load_prompt_set(name)
    except PromptSetError as exc:
        raise typer.BadParameter(str(exc)) from None
    text = format_prompts(prompts)
    if out is None:
        typer.echo(text, nl=False)
        return
    if out.is_dir():
        raise typer.BadParameter(f"--out {out} is a folder; name a file, e.g. {out / (name + '.txt')}")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise typer.BadParameter(f"--out {out} exists; pass --overwrite to replace it, or choose another file")
    check_output_dir(out.parent, "--out's folder")  # a file in the way or a read-only place: refused, nothing made
    write_text_atomic(out, text)
    typer.echo(f"wrote {len(prompts)} prompts of {name!r} to {out}")


def register(app: typer.Typer) -> None:
    """Add the `sample` and `prompts` commands to `app`."""
    app.command("sample")(sample_command)
    app.command("prompts")(prompts_command)
