"""Memory and time per step: K objectives as LoRA adapters on one UNet vs K full UNets (MSDDA sampling).

For a tiny and a mid-size SD-shaped UNet2DConditionModel (random weights, built from config) and
K = 1, 2, 4 objectives, each configuration runs in a fresh process (so resident memory is its own):
* lora: one UNet + K LoRA adapters (rank 8 on to_q/to_k/to_v/to_out.0), switched per forward pass by
  msdda.pipelines.AdapterSwitch, exactly as MSDDAPipeline does;
* full: K separate UNets (what full fine-tunes cost; MSDDAPipeline also keeps the base UNet loaded).
Each samples with msdda.sample + the MSDDA rule (weights 1/K, CFG batched, DDIM), the UNetDenoiser of
the pipeline, one latent. Reported: model bytes (parameters), resident-memory growth from building the
models, peak resident growth during sampling (msdda's Cost, process-wide), and seconds per step after one
warm-up step: wall time (the fastest step) and the main thread's CPU time (median; with one torch thread
this is the compute itself and barely moves when other processes share the machine).
It also counts SD 1.5's UNet and LoRA parameters exactly (meta device, no memory).

    .venv/bin/python benchmarks/bench_sd_lora.py [--steps 4] [--threads 1] [--out runs/bench_sd_lora.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

logger = logging.getLogger("bench_sd_lora")

CONFIGS: dict[str, dict[str, Any]] = {
    # The test-suite's shape, a little wider.
    "tiny": dict(
        unet=dict(
            sample_size=16,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
        ),
        text_len=16,
    ),
    # SD 1.5's layout (4 levels, 2 layers per block, 77 x 768 text) at a fifth of its width, 32x32 latents.
    "mid": dict(
        unet=dict(
            sample_size=32,
            layers_per_block=2,
            block_out_channels=(64, 128, 256, 256),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768,
            attention_head_dim=8,
        ),
        text_len=77,
    ),
}
SD15_UNET = dict(
    sample_size=64,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RANK = 8


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _param_bytes(modules) -> int:
    seen, total = set(), 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
    return total


def worker(config: str, mode: str, k: int, steps: int, threads: int) -> dict[str, Any]:
    """One configuration, in this process: build, sample, measure."""
    import torch

    torch.set_num_threads(threads)
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    from msdda.pipelines import AdapterSwitch, UNetDenoiser
    from msdda.sampling import MSDDA, sample

    cfg = CONFIGS[config]
    rss0 = _rss()
    torch.manual_seed(0)
    base = UNet2DConditionModel(**cfg["unet"]).eval()
    modules = [base]
    if mode == "lora":
        for i in range(k):
            base.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=LORA_TARGETS), adapter_name=f"obj{i}")
            with torch.no_grad():
                for name, p in base.named_parameters():
                    if f"lora_B.obj{i}" in name:
                        p.normal_(0, 0.01)
        switch = AdapterSwitch(base)
        switch.disable()
        models = [UNetDenoiser(base, name=f"obj{i}", adapter=f"obj{i}", switch=switch) for i in range(k)]
    else:
        unets = [base]
        for _ in range(k - 1):
            u = UNet2DConditionModel(**cfg["unet"]).eval()
            u.load_state_dict(base.state_dict())
            unets.append(u)
        modules = unets
        models = [UNetDenoiser(u, name=f"obj{i}") for i, u in enumerate(unets)]
    build_rss = _rss() - rss0
    model_bytes = _param_bytes(modules)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    size = cfg["unet"]["sample_size"]
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(1, cfg["text_len"], cfg["unet"]["cross_attention_dim"], generator=g)
    null = torch.randn(1, cfg["text_len"], cfg["unet"]["cross_attention_dim"], generator=g)
    x_t = torch.randn(1, 4, size, size, generator=g)
    stamps: list[tuple[float, float]] = []
    out = sample(
        models,
        scheduler,
        MSDDA([1.0 / k] * k),
        x_T=x_t,
        cond=cond,
        null_cond=null,
        guidance_scale=7.5,
        num_inference_steps=steps + 1,
        seed=0,
        progress=False,
        callback=lambda ctx, x: stamps.append((time.perf_counter(), time.thread_time())),
    )
    per_step = [b[0] - a[0] for a, b in zip(stamps, stamps[1:], strict=False)]  # drops the warm-up step
    cpu_per_step = [b[1] - a[1] for a, b in zip(stamps, stamps[1:], strict=False)]
    return {
        "config": config,
        "mode": mode,
        "k": k,
        "unet_params": _unet_params(base),
        "model_bytes": model_bytes,
        "build_rss_bytes": build_rss,
        "sampling_peak_rss_bytes": out.cost.peak_memory_bytes,
        "seconds_per_step": min(per_step),
        "seconds_per_step_median": statistics.median(per_step),
        "cpu_seconds_per_step": statistics.median(cpu_per_step),
        "model_evals": out.cost.model_evals,
    }


def _unet_params(unet) -> int:
    return sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n)


def sd15_counts() -> dict[str, int]:
    """Exact parameter counts of SD 1.5's UNet and of rank-4 / rank-8 attention LoRAs (meta device)."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    counts = {"sd15_unet_params": sum(p.numel() for p in unet.parameters())}
    for r in (4, 8):
        with torch.device("meta"):
            unet.add_adapter(LoraConfig(r=r, lora_alpha=r, target_modules=LORA_TARGETS), adapter_name=f"r{r}")
        counts[f"sd15_lora_rank{r}_params"] = sum(p.numel() for n, p in unet.named_parameters() if f".r{r}." in n)
    return counts


def _run_worker(config: str, mode: str, k: int, steps: int, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", config, mode, str(k), "--steps", str(steps), "--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {config}/{mode}/K={k} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps (one warm-up step is added)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--configs", default="tiny,mid")
    parser.add_argument("--ks", default="1,2,4")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    parser.add_argument("--worker", nargs=3, metavar=("CONFIG", "MODE", "K"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.worker:
        config, mode, k = args.worker
        sys.stdout.write(json.dumps(worker(config, mode, int(k), args.steps, args.threads)) + "\n")
        return
    results = []
    for config in args.configs.split(","):
        for k in [int(x) for x in args.ks.split(",")]:
            for mode in ("lora", "full"):
                results.append(_run_worker(config, mode, k, args.steps, args.threads))
                r = results[-1]
                logger.info(
                    "%-5s %-4s K=%d  model %s MiB  build RSS %s MiB  sampling peak %s MiB  %.3f s/step (CPU %.3f)",
                    config,
                    mode,
                    k,
                    _mib(r["model_bytes"]),
                    _mib(r["build_rss_bytes"]),
                    _mib(r["sampling_peak_rss_bytes"]),
                    r["seconds_per_step"],
                    r["cpu_seconds_per_step"],
                )
    by = {(r["config"], r["mode"], r["k"]): r for r in results}
    logger.info("\nratios full / lora (model bytes; CPU time per step) and LoRA CPU time(K) / time(K=1):")
    for config in args.configs.split(","):
        for k in [int(x) for x in args.ks.split(",")]:
            lo, fu, one = by[(config, "lora", k)], by[(config, "full", k)], by[(config, "lora", 1)]
            logger.info(
                "%-5s K=%d  memory x%.2f  time x%.2f   LoRA time vs K=1: x%.2f",
                config,
                k,
                fu["model_bytes"] / lo["model_bytes"],
                fu["cpu_seconds_per_step"] / lo["cpu_seconds_per_step"],
                lo["cpu_seconds_per_step"] / one["cpu_seconds_per_step"],
            )
    counts = sd15_counts()
    logger.info("\nSD 1.5 (exact counts): %s", counts)
    summary = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "load_avg_1min": os.getloadavg()[0],
        },
        "steps_timed": args.steps,
        "rank": RANK,
        "results": results,
        **counts,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=args.out.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(tmp, args.out)
        logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
