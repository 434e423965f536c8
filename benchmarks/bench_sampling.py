"""MSDDA sampling time for K = 2, 4 aligned models vs the single-model sampler (digits network).

The floor for MSDDA is K model evaluations per step, so the ideal ratio to a single model is K; what is
above K is the fusion and the kernel math. Copies of the shipped digits base model with perturbed weights
stand in for K aligned models; CFG 2.0, DDPM learned_range, batch 64.

    .venv/bin/python benchmarks/bench_sampling.py [--steps 20] [--batch 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from msdda import MSDDA, SingleModel, sample
from msdda.tasks.digits.training import load_digits_model, shipped_dir


def timed(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
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
    common = dict(shape=(args.batch, 1, 8, 8), cond=cond, guidance_scale=2.0, null_cond=torch.tensor([10]),
                  num_inference_steps=args.steps, seed=0, progress=False)
    single = timed(lambda: sample([models[0]], sched, SingleModel(), **common), args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.steps} steps")
    print(f"single model: {single / args.steps * 1e3:.2f} ms/step")
    print(f"{'K':>3} {'ms/step':>9} {'ratio to single':>16} {'ratio / K':>10}")
    for k in (2, 4):
        t = timed(lambda k=k: sample(models[:k], sched, MSDDA([1.0 / k] * k), **common), args.repeats)
        print(f"{k:>3} {t / args.steps * 1e3:>9.2f} {t / single:>16.2f} {t / single / k:>10.2f}")


if __name__ == "__main__":
    main()
