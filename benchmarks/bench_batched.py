"""Sequential vs batched (vmapped) evaluation of K digits denoisers per reverse step, with CFG.

For K = 2, 4 copies of the digits network (DigitsDenoiser, default config, different random weights) and
batch sizes 64 and 256 (so 128 and 512 rows per model with the conditional and unconditional passes),
times one step's model evaluation both ways:

  sequential: [ClassifierFreeGuidance(m, scale, null)(x, t, cond) for m in models]   (K calls of 2B)
  batched:    StackedGuidance(StackedDenoisers(models), scale, null)(x, t, cond)    (one vmapped call)

and, with --sample, a whole MSDDA step of msdda.sample (evaluation + kernels + fusion + draw) both ways.
Reports the best of --repeats interleaved timings (least disturbed by other processes) and the ratio
sequential / batched (> 1: batching is faster).

    .venv/bin/python benchmarks/bench_batched.py [--threads N] [--batches 64,256] [--ks 2,4] [--sample]
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch

import msdda
from msdda import MSDDA, KernelScheduler, KernelSchedulerConfig
from msdda.models import ClassifierFreeGuidance, StackedDenoisers, StackedGuidance
from msdda.tasks.digits.network import DigitsDenoiser, count_parameters

NULL_CLASS = 10
SCALE = 3.0


def digits_models(k: int) -> list[DigitsDenoiser]:
    """K default-size digits denoisers with different random weights (zero-initialised layers perturbed too)."""
    models = []
    for _ in range(k):
        m = DigitsDenoiser().eval()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.03 * torch.randn_like(p))
        models.append(m)
    return models


def interleaved_best(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of each function over `repeats` rounds, alternating between them every round."""
    for fn in fns.values():
        fn()  # warm-up (vmap tracing, allocator)
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def scheduler() -> KernelScheduler:
    return KernelScheduler(
        KernelSchedulerConfig(
            kind="ddpm", prediction_type="epsilon", variance_type="learned_range", clip_sample=True
        )
    )


def bench_one(k: int, b: int, models: list[DigitsDenoiser], args: argparse.Namespace) -> None:
    """Print the K-model evaluation (and, with --sample, the whole-step) timings for one (K, B)."""
    null = torch.tensor([NULL_CLASS])
    guided = [ClassifierFreeGuidance(m, SCALE, null) for m in models]
    stacked = StackedGuidance(StackedDenoisers(models), SCALE, null)
    x = torch.randn(b, 1, 8, 8)
    t = torch.full((b,), 500, dtype=torch.long)
    cond = torch.arange(b) % 10
    with torch.no_grad():
        best = interleaved_best(
            {"seq": lambda: [g(x, t, cond) for g in guided], "bat": lambda: stacked(x, t, cond)}, args.repeats
        )
    row(k, b, "K-model eval", best["seq"], best["bat"])
    if args.sample:
        rule = MSDDA([1.0 / k] * k)
        run = dict(shape=(b, 1, 8, 8), cond=cond, guidance_scale=SCALE, null_cond=null,
                   num_inference_steps=args.steps, seed=0, progress=False)
        best = interleaved_best(
            {
                "seq": lambda: msdda.sample(models, scheduler(), rule, batch_models=False, **run),
                "bat": lambda: msdda.sample(models, scheduler(), rule, batch_models=True, **run),
            },
            max(2, args.repeats // 3),
        )
        row(k, b, "sample step", best["seq"] / args.steps, best["bat"] / args.steps)


def row(k: int, b: int, what: str, seq_s: float, bat_s: float) -> None:
    print(f"{k:>2} {b:>4} {what:>12} {seq_s * 1e3:>14.1f} {bat_s * 1e3:>11.1f} {seq_s / bat_s:>12.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--batches", default="64,256", help="comma-separated batch sizes B (CFG makes 2B rows)")
    parser.add_argument("--ks", default="2,4", help="comma-separated model counts K")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sample", action="store_true", help="also time whole msdda.sample steps (MSDDA rule)")
    parser.add_argument("--steps", type=int, default=4, help="reverse steps per timed sample() run")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    params = count_parameters(DigitsDenoiser()) / 1e6
    print(f"digits network: {params:.2f} M params; CFG scale {SCALE} with a tensor null condition")
    print(f"{'K':>2} {'B':>4} {'what':>12} {'sequential ms':>14} {'batched ms':>11} {'seq/batched':>12}")
    for k in (int(v) for v in args.ks.split(",")):
        models = digits_models(k)
        for b in (int(v) for v in args.batches.split(",")):
            bench_one(k, b, models, args)


if __name__ == "__main__":
    main()
