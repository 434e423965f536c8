"""MSDDA sampling time for K = 2, 4 aligned models vs the single-model sampler (digits network).

The floor for MSDDA is K model evaluations per step, so the ideal ratio to a single model is K; what is
above K is the fusion and the kernel math. Copies of the shipped digits base model with perturbed weights
stand in for K aligned models; CFG 2.0, DDPM learned_range, batch 64.

The runs are interleaved (single, K=2, K=4, single, ...) so that load from other processes hits every
configuration alike; medians over the repeats are reported, and the ratios are medians of the per-round
ratios. Besides wall time the script reports the calling thread's CPU time (time.thread_time), which a busy
neighbour core does not inflate; with --threads 1 torch runs every operator on the calling thread, so it
is the compute the run really took. "sampler overhead" reruns the same sampling with each network replaced
by one that returns a precomputed output: what is left is everything but the networks (CFG combine, kernel
math, fusion, the draw, the loop).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sampling.py [--steps 20] [--batch 64] [--repeats 5]
        [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from msdda import MSDDA, SingleModel, sample
from msdda.tasks.digits.training import load_digits_model, shipped_dir


class FrozenOutput:
    """A stand-in denoiser that returns one precomputed output: sampling with it costs no network time."""

    def __init__(self, output: Tensor) -> None:
        self.output = output

    def __call__(self, x_t: Tensor, t: Tensor, cond: object = None) -> Tensor:
        return self.output


def timed_rounds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[tuple[float, float]]]:
    """Run every fn once to warm up, then `repeats` interleaved rounds; (wall, thread CPU) seconds per run."""
    for fn in fns.values():
        fn()
    out: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.thread_time()
            fn()
            out[name].append((time.perf_counter() - wall, time.thread_time() - cpu))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    base, doc = load_digits_model(shipped_dir("base"))
    from msdda.core.schedule import KernelScheduler, KernelSchedulerConfig

    sched = KernelScheduler(KernelSchedulerConfig.from_dict(doc["scheduler"]))
    g = torch.Generator().manual_seed(0)
    models = []
    for _ in range(4):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=g))
        models.append(m)
    cond = torch.arange(args.batch) % 10
    null = torch.tensor([10])
    common = dict(shape=(args.batch, 1, 8, 8), cond=cond, guidance_scale=2.0, null_cond=null,
                  num_inference_steps=args.steps, seed=0, progress=False)
    # The networks' outputs on the CFG batch (cond and uncond), frozen for the overhead runs.
    with torch.no_grad():
        x = torch.randn(args.batch, 1, 8, 8, generator=g)
        both = torch.cat([cond, null.expand(args.batch)])
        frozen = [FrozenOutput(m(torch.cat([x, x]), torch.full((2 * args.batch,), 500), both)) for m in models]

    def runs(nets: list) -> dict[str, Callable[[], object]]:
        return {
            "single": lambda: sample(nets[:1], sched, SingleModel(), **common),
            "K=2": lambda: sample(nets[:2], sched, MSDDA([0.5, 0.5]), **common),
            "K=4": lambda: sample(nets[:4], sched, MSDDA([0.25] * 4), **common),
        }

    real = timed_rounds(runs(models), args.repeats)
    overhead = timed_rounds(runs(frozen), max(args.repeats, 10))

    def per_step(times: list[tuple[float, float]], i: int) -> float:
        return statistics.median(t[i] for t in times) / args.steps * 1e3

    def ratio(name: str, i: int) -> float:
        return statistics.median(a[i] / b[i] for a, b in zip(real[name], real["single"], strict=True))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.steps} steps, "
          f"{args.repeats} interleaved rounds (medians)")
    print(f"{'':>7} {'wall ms/step':>13} {'ratio':>6} {'ratio/K':>8} {'cpu ms/step':>12} {'ratio':>6} "
          f"{'ratio/K':>8} {'overhead ms/step':>17}")
    for name, k in (("single", 1), ("K=2", 2), ("K=4", 4)):
        rw, rc = ratio(name, 0), ratio(name, 1)
        print(f"{name:>7} {per_step(real[name], 0):>13.2f} {rw:>6.2f} {rw / k:>8.2f} {per_step(real[name], 1):>12.2f} "
              f"{rc:>6.2f} {rc / k:>8.2f} {per_step(overhead[name], 1):>17.3f}")
    print("overhead: CPU ms/step of the same sampling with every network replaced by a precomputed output")


if __name__ == "__main__":
    main()
