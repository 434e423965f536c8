"""Cost of MSDDA vs CoDe and RGG at their defaults, next to the hypervolume each reaches (digits).

Runs a small sweep (alignment vs ink, 5 weights, all 10 digits, one seed, batch 8, 50 steps) into a
temporary folder and prints per method: model evaluations, reward evaluations and reward gradients per
sampler call, seconds per sample, and hypervolume against the shared reference point.

    .venv/bin/python benchmarks/bench_methods.py [--out runs/bench-methods]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from msdda.evaluation.report import compute_metrics
from msdda.evaluation.sweep import SweepConfig, run_sweep
from msdda.evaluation.tasks import get_task_bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seeds", default="0")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp()) / "bench-methods"
    cfg = SweepConfig(task="digits", objectives=["alignment", "ink"], methods=["base", "msdda", "code", "rgg"],
                      seeds=[int(s) for s in args.seeds.split(",")], batch_size=8, steps=50, save_samples=False,
                      rgg_scale=300.0)  # the scale calibrated for these (earlier) objectives; the default is 30
    run_sweep(cfg, out, lambda c: get_task_bundle(c.task, c.task_options), progress=False)
    m = compute_metrics(out)
    base_s = m["cost"]["base"]["seconds_per_sample"]
    print(f"{'method':<8} {'model evals':>11} {'reward evals':>12} {'reward grads':>12} {'s/sample':>9} "
          f"{'x base':>7} {'hypervolume':>11}")
    for method in m["methods"]:
        c = m["cost"][method]
        print(f"{method:<8} {c['model_evals']:>11.0f} {c['reward_evals']:>12.1f} {c['reward_grads']:>12.0f} "
              f"{c['seconds_per_sample']:>9.4f} {c['seconds_per_sample'] / base_s:>7.2f} "
              f"{m['hypervolume'][method]:>11.4f}")
    print(f"reference point {m['reference_point']}")


if __name__ == "__main__":
    main()
