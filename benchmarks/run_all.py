"""The benchmark suite in one command: every ratio measured in one run, with the machine described.

    .venv/bin/python benchmarks/run_all.py [--out runs/bench] [--quick]

Runs, each in its own process: fusion cost vs one UNet forward; MSDDA sampling time for K = 2, 4 vs one
model; batched vs sequential K-model evaluation; memory of LoRA objectives vs full UNet copies; K LoRA
objectives in one UNet call vs one by one; cost of MSDDA vs CoDe and RGG next to the hypervolume each
reaches. Writes the combined output to OUT/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
SUITE = [
    ("Fusion cost vs one model evaluation", "bench_fusion.py", [], ["--repeats", "5"]),
    ("MSDDA sampling time vs a single model", "bench_sampling.py", [], ["--steps", "10", "--repeats", "2"]),
    ("Batched vs sequential K-model evaluation", "bench_batched.py", [], []),
    ("LoRA objectives vs full UNet copies", "bench_sd_lora.py", [], ["--configs", "tiny", "--steps", "2"]),
    (
        "K LoRA objectives in one UNet call vs one by one",
        "bench_sd_batched.py",
        [],
        ["--sizes", "tiny", "--repeats", "5"],
    ),
    ("MSDDA vs CoDe and RGG: cost and hypervolume", "bench_methods.py", [], []),
]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
        f"{platform.system()} {platform.release()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--quick", action="store_true", help="the smaller argument sets (marked with their args)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    parts = [f"# Benchmark run {time.strftime('%Y-%m-%d %H:%M')}\n", f"Machine: {machine()}\n"]
    for title, script, full_args, quick_args in SUITE:
        path = HERE / script
        if not path.exists():
            parts.append(f"## {title}\n\n(missing: {script})\n")
            continue
        extra = quick_args if args.quick else full_args
        cmd = [sys.executable, str(path), *extra]
        print(f"== {title}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        took = time.perf_counter() - start
        text = res.stdout.strip() or res.stderr.strip()[-2000:]
        print(text, flush=True)
        shown = " ".join(["python", f"benchmarks/{script}", *extra])
        parts.append(f"## {title}\n\n`{shown}` ({took:.0f} s, exit {res.returncode})\n\n```\n{text}\n```\n")
    (args.out / "benchmarks.md").write_text("\n".join(parts))
    print(f"wrote {args.out / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
