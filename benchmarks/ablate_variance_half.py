"""Does the variance half of MSDDA help on the embedded task? The shipped models with and without their
log-variance offsets.

The shipped digits models (ink, template) are the frozen reference plus a kernel-offset head that moves each
kernel's mean (d_mean) AND its log-variance (d_logvar); their trunks, and so their learned variances, are the
reference's. Zeroing d_logvar at sampling time keeps every model's mean and gives all of them the reference's
variance: "mean-only" models, on which MSDDA's fusion is a weighted average of the means (= DB-MPA's). So
MSDDA(full) - MSDDA(mean-only) is what the per-objective variances contribute, measured two ways:

* J_w: `run_diagnose` (18 states, 4,096 draws, 5 weights), J* - J per step of each rule (lower is better);
* the front: an msdda-only sweep with the mean-only models at the grid, seeds and batch of the full comparison
  in docs/evaluation.md (runs/paper-2obj: `msdda sweep --task digits --objectives ink,template ... --grid-points
  5 --seeds 0,1,2 --batch-size 8`), so both use the same initial noise; hypervolume at that run's reference point.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ablate_variance_half.py \
        [--full-run runs/paper-2obj] [--out runs/ablate-var]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor, nn


class MeanOnly(nn.Module):
    """A digits model with kernel offsets, its d_logvar channels zeroed: its mean as it is, the reference's
    variance (the layout is eps, variance value, d_mean, d_logvar: 4C channels for C sample channels)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x_t: Tensor, t: Tensor, cond=None) -> Tensor:
        out = self.model(x_t, t, cond)
        c = x_t.shape[1]
        if out.shape[1] not in (3 * c, 4 * c):
            raise ValueError(f"output with {out.shape[1]} channels carries no kernel offsets (C = {c})")
        return torch.cat([out[:, :-c], torch.zeros_like(out[:, -c:])], dim=1)


def j_gaps(summary: dict, rule: str) -> dict[float, tuple[float, float]]:
    """{w on ink: (mean J* - J, se)} of `rule` in a diagnose summary."""
    out = {}
    for entry in summary["rules"][rule].values():
        g = entry["j_star_minus_j"]
        out[round(entry["weights"]["ink"], 4)] = (g["mean"], g["se"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full-run", type=Path, default=Path("runs/paper-2obj"), help="the full comparison's sweep")
    ap.add_argument("--out", type=Path, default=Path("runs/ablate-var"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from msdda.evaluation.diagnose import DiagnoseConfig, run_diagnose
    from msdda.evaluation.metrics import hypervolume
    from msdda.evaluation.store import read_rows
    from msdda.evaluation.sweep import SweepConfig, run_sweep
    from msdda.evaluation.tasks import get_task_bundle

    options = {"objectives": ["ink", "template"]}
    bundle = get_task_bundle("digits", options)
    mean_only = {k: MeanOnly(m) for k, m in bundle.aligned.items()}

    cfg = DiagnoseConfig(objectives=("ink", "template"), methods=("msdda", "db-mpa"), weight_points=5,
                         train_policies=False)  # fmt: skip
    full = run_diagnose(bundle, config=cfg, progress=False)
    ablated = run_diagnose(bundle, models=mean_only, config=cfg, progress=False)
    rows = {"msdda (full)": j_gaps(full, "msdda"), "db-mpa (full)": j_gaps(full, "db-mpa"),
            "msdda (mean-only)": j_gaps(ablated, "msdda")}  # fmt: skip
    weights = sorted(rows["msdda (full)"], reverse=True)
    print("J* - J per step (mean over 18 states; se in brackets), by w on ink:")
    print("| rule | " + " | ".join(f"{w:g}" for w in weights) + " |")
    print("|---|" + "---|" * len(weights))
    for name, gaps in rows.items():
        print(f"| {name} | " + " | ".join(f"{gaps[w][0]:.4f} ({gaps[w][1]:.4f})" for w in weights) + " |")
    # paired over the 18 states (the same states and optimum in both runs): full - mean-only, and how often full wins
    print("\nmsdda (full) - msdda (mean-only), J* - J paired over states (mean, se, states where full is closer):")
    for key, entry in full["rules"]["msdda"].items():
        other = ablated["rules"]["msdda"][key]
        d = torch.tensor([a["j_star_minus_j"] - b["j_star_minus_j"] for a, b in
                          zip(entry["per_state"], other["per_state"], strict=True)])  # fmt: skip
        w = entry["weights"]["ink"]
        print(f"w={w:g}: {float(d.mean()):+.5f} ({float(d.std() / len(d) ** 0.5):.5f}), {int((d < 0).sum())}/{len(d)}")

    if not (args.full_run / "results.jsonl").exists():
        print(f"no {args.full_run}/results.jsonl: skipping the front comparison")
        return
    full_cfg = json.loads((args.full_run / "config.json").read_text())
    sweep_cfg = SweepConfig(task="digits", task_options=options, methods=["msdda"], grid_points=full_cfg["grid_points"],
                            seeds=full_cfg["seeds"], batch_size=full_cfg["batch_size"], steps=full_cfg["steps"],
                            save_samples=False)  # fmt: skip

    def factory(c: SweepConfig):
        b = get_task_bundle(c.task, c.task_options)
        b.aligned = {k: MeanOnly(m) for k, m in b.aligned.items()}
        return b

    run_sweep(sweep_cfg, args.out, factory, progress=False)
    metrics = json.loads((args.full_run / "metrics.json").read_text())
    ref = metrics["reference_point"]
    objs = ["ink", "template"]

    def means(rs: list[dict]) -> dict[float, list[float]]:
        by_w: dict[float, list[list[float]]] = {}
        for r in rs:
            by_w.setdefault(round(r["weights"]["ink"], 4), []).append([r["rewards"][o] for o in objs])
        return {w: torch.tensor(v).mean(0).tolist() for w, v in sorted(by_w.items())}

    full_rows = [r for r in read_rows(args.full_run / "results.jsonl") if r["method"] == "msdda"]
    ablated_rows = read_rows(args.out / "results.jsonl")
    for name, rs in (("msdda (full)", full_rows), ("msdda (mean-only)", ablated_rows)):
        m = means(rs)
        hv = hypervolume(list(m.values()), ref)
        print(f"{name}: hypervolume {hv:.4e} at {ref}; means " + ", ".join(
            f"w={w:g}: ({v[0]:.4f}, {v[1]:.4f})" for w, v in m.items()))  # fmt: skip
    # paired: the same unit (weights, prompt, seed) and index in both runs
    key = lambda r: (round(r["weights"]["ink"], 4), r["prompt_index"], r["seed"], r["index"])  # noqa: E731
    fr = {key(r): r for r in full_rows}
    for w in sorted({key(r)[0] for r in ablated_rows}, reverse=True):
        diffs = torch.tensor([[fr[key(r)]["rewards"][o] - r["rewards"][o] for o in objs] for r in ablated_rows
                              if key(r)[0] == w and key(r) in fr])  # fmt: skip
        if len(diffs):
            mu, se = diffs.mean(0), diffs.std(0) / len(diffs) ** 0.5
            print(f"w={w:g}: full - mean-only, ink {mu[0]:+.5f} ({se[0]:.5f}), template {mu[1]:+.5f} ({se[1]:.5f}),"
                  f" n={len(diffs)}")  # fmt: skip


if __name__ == "__main__":
    main()
