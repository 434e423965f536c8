"""Sequential vs batched evaluation of K LoRA objectives (+ the reference) on one SD UNet, with CFG.

One reverse step's model evaluation of MSDDA with a reference weight, both ways:

  sequential: [ClassifierFreeGuidance(d, scale, null)(x, t, cond) for d in members]   (K + 1 UNet calls of 2B)
  batched:    UNetBatch(members)(x, t, cond)          (one UNet call of (K + 1) * 2B, peft mixed-adapter rows)

members: K LoRA adapters (rank 8 on to_q/to_k/to_v/to_out.0, random) in one UNet2DConditionModel built from
config (random weights) and the reference (adapters off), exactly as MSDDAPipeline holds them. Reports the
median of --repeats interleaved timings of each, the ratio sequential / batched (> 1: batching is faster)
and the largest difference between the two outputs. On CUDA (when available, or --device cuda) the
timings synchronise the device. Sizes: "tiny" (the test suite's shape, a little wider, 16x16 latents) and
"mid" (SD 1.5's layout at a fifth of its width, 77 x 768 text, 32x32 latents).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sd_batched.py [--sizes tiny] [--ks 2,3] \
        [--batches 1,4] [--repeats 15] [--threads 1] [--device auto|cpu|cuda] [--dtype float32|float16]
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from bench_sd_lora import CONFIGS, LORA_TARGETS, RANK

SCALE = 7.5


def build(size: str, k: int, device: str, dtype: torch.dtype) -> tuple[Any, list[Any], dict[str, Any]]:
    """The UNet with K random adapters and the K + 1 UNetDenoisers (the reference last)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from msdda.pipelines import AdapterSwitch, UNetDenoiser

    cfg = CONFIGS[size]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg["unet"]).eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
        for i in range(k):
            unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=LORA_TARGETS), adapter_name=f"obj{i}")
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    unet.to(device=device, **({"dtype": dtype} if dtype != torch.float32 else {}))  # (a no-op cast warns)
    switch = AdapterSwitch(unet)
    switch.disable()
    members = [UNetDenoiser(unet, name=f"obj{i}", adapter=f"obj{i}", switch=switch) for i in range(k)]
    members.append(UNetDenoiser(unet, name="reference", adapter=None, switch=switch))
    return unet, members, cfg


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, float]:
    """Median wall time of each function over `repeats` rounds, alternating between them every round."""

    def timed(fn: Callable[[], object]) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for fn in fns.values():
        fn()  # warm-up (allocator, kernels, hooks)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=None, help="comma list of tiny, mid (default: tiny on CPU, both on CUDA)")
    parser.add_argument("--ks", default="2,3")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = getattr(torch, args.dtype)
    sizes = (args.sizes or ("tiny,mid" if device == "cuda" else "tiny")).split(",")

    from msdda.models import ClassifierFreeGuidance
    from msdda.pipelines.objectives import UNetBatch

    where = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()}"
    print(f"# {where}, torch {torch.__version__}, {args.threads} thread(s), {args.dtype}, median of {args.repeats}")
    print("| UNet | K (+ reference) | batch B | sequential | batched | seq / batched | max |diff| |")
    print("|---|---|---|---|---|---|---|")
    for size in sizes:
        for k in (int(v) for v in args.ks.split(",")):
            unet, members, cfg = build(size, k, device, dtype)
            for b in (int(v) for v in args.batches.split(",")):
                g = torch.Generator().manual_seed(1)
                shape = (b, 4, cfg["unet"]["sample_size"], cfg["unet"]["sample_size"])
                x = torch.randn(shape, generator=g).to(device, dtype)
                text = (b, cfg["text_len"], cfg["unet"]["cross_attention_dim"])
                cond = torch.randn(text, generator=g).to(device, dtype)
                null = torch.randn(text, generator=g).to(device, dtype)
                t = torch.full((b,), 500, device=device, dtype=torch.long)
                guided = [ClassifierFreeGuidance(m, SCALE, null) for m in members]
                batch = UNetBatch.build(members, required=True, guidance_scale=SCALE, null_cond=null)
                with torch.no_grad():
                    seq_out = [m(x, t, cond) for m in guided]
                    bat_out = batch(x, t, cond)
                    diff = max(float((a - s).abs().max()) for a, s in zip(bat_out, seq_out, strict=True))
                    med = interleaved_medians(
                        {
                            "seq": lambda x=x, t=t, c=cond, g=guided: [m(x, t, c) for m in g],
                            "bat": lambda x=x, t=t, c=cond, f=batch: f(x, t, c),
                        },
                        args.repeats,
                        device,
                    )
                print(
                    f"| {size} | {k} (+1) | {b} | {med['seq'] * 1e3:.1f} ms | {med['bat'] * 1e3:.1f} ms | "
                    f"{med['seq'] / med['bat']:.2f} | {diff:.1e} |",
                    flush=True,
                )
            del unet, members


if __name__ == "__main__":
    main()
