"""Hostile input and faults: one table of bad inputs to the CLI and the Python API, each of which must fail
with the exact error type (CLI: exit code 2 and one line `error: ...` naming the value, no traceback) and
leave the folder exactly as it was; then the faults around it (corrupt rows, duplicates, --overwrite,
concurrent sweeps, killed writers, stale temp files)."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from msdda import cli
from msdda.atomic import (
    INCOMPLETE_MARKER,
    OutputPathError,
    check_output_dir,
    incomplete_marker,
    remove_stale_temp_files,
    write_json_atomic,
)
from msdda.core.errors import FusionError, ScheduleError
from msdda.core.fusion import exponents_from_preferences, fuse_gaussians
from msdda.core.schedule import KernelScheduler, KernelSchedulerConfig, reverse_kernel
from msdda.evaluation.metrics import MetricsWarning, hypervolume
from msdda.evaluation.report import ReportError, compute_metrics
from msdda.evaluation.store import SweepError, prepare_run_dir, read_rows, read_run_rows, run_lock
from msdda.evaluation.sweep import SweepConfig, run_sweep, validate_weights
from msdda.evaluation.tasks import get_task_bundle

BIG = str(2**63)
SHAPE = (2, 1, 2, 2)
ONE = torch.ones(3)


def factory(cfg: SweepConfig):
    return get_task_bundle(cfg.task, cfg.task_options)


def tiny_cfg(**kw: Any) -> SweepConfig:
    base: dict[str, Any] = dict(task="gaussian", methods=["base", "msdda"], grid_points=2, seeds=[0], batch_size=2)
    base.update(steps=3, save_samples=False)
    base.update(kw)
    return SweepConfig(**base)


SWEEP = ["sweep", "--task", "gaussian", "--methods", "base", "--steps", "3", "--batch-size", "2", "--quiet"]


# ----- the table -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cli:
    """`msdda ARGS` must exit 2 with exactly one `error:` line matching `message`."""

    args: list[str]
    message: str
    setup: Callable[[Path], None] | None = None


@dataclass(frozen=True)
class Api:
    """`call(folder)` must raise `error` with a message matching `message`."""

    call: Callable[[Path], Any]
    error: type[Exception]
    message: str
    setup: Callable[[Path], None] | None = None
    warns: bool = field(default=False)  # `error` is a warning category: the call must warn, not raise


def _file(name: str, data: bytes | str = "x") -> Callable[[Path], None]:
    def make(d: Path) -> None:
        p = d / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)

    return make


def _both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        for s in setups:
            s(d)

    return make


def _sweep_in(name: str, **kw: Any) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        run_sweep(tiny_cfg(**kw), d / name if name != "." else d, factory, progress=False)

    return make


def _corrupt_rows_only(d: Path) -> None:
    (d / "r").mkdir()
    write_json_atomic(d / "r" / "config.json", tiny_cfg().to_dict())
    (d / "r" / "results.jsonl").write_text('{"unit": 1}\n[1, 2]\n{}\nnot json\n')


def _weights_file(content: Any, name: str = "w.json") -> Callable[[Path], None]:
    return _file(name, content if isinstance(content, bytes) else json.dumps(content))


def _reference_point_run(d: Path) -> None:
    run_sweep(tiny_cfg(), d / "r", factory, progress=False)


GRID = json.dumps([{"objective_1": 0.5, "objective_2": 0.5}])


def ks_ddim_unset() -> KernelScheduler:
    return KernelScheduler(KernelSchedulerConfig(kind="ddim"))


def diffusers_ddim_unset():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000)


x = torch.zeros(SHAPE)

CASES: list[tuple[str, Cli | Api]] = [
    # --- sweep arguments
    ("sweep-prompts-superscript", Cli(["sweep", "--prompts", "²", "--out", "r"], r"--prompts '²'.*classes 0-9")),
    ("sweep-prompts-10", Cli(["sweep", "--prompts", "3,10", "--out", "r"], r"--prompts '3,10'")),
    ("sweep-prompts-word", Cli(["sweep", "--prompts", "seven", "--out", "r"], r"--prompts 'seven'")),
    ("sweep-prompts-empty", Cli(["sweep", "--prompts", ",", "--out", "r"], r"--prompts ','")),
    ("sweep-seeds-word", Cli([*SWEEP, "--seeds", "x", "--out", "r"], r"--seeds 'x' must be comma-separated integers")),
    ("sweep-seeds-negative", Cli([*SWEEP, "--seeds=-1", "--out", "r"], r"--seeds '-1'.*'-1' is not one")),
    ("sweep-seeds-2^63", Cli([*SWEEP, "--seeds", BIG, "--out", "r"], rf"seed {BIG} is larger than")),
    ("sweep-seeds-huge", Cli([*SWEEP, "--seeds", "1" * 40, "--out", "r"], r"seed 1111111111.* is larger than")),
    ("sweep-seeds-empty", Cli([*SWEEP, "--seeds", ",", "--out", "r"], r"--seeds ',' holds no seed")),
    ("sweep-seeds-superscript", Cli([*SWEEP, "--seeds", "0,²", "--out", "r"], r"'²' is not one")),
    ("sweep-seeds-float", Cli([*SWEEP, "--seeds", "1.5", "--out", "r"], r"'1.5' is not one")),
    (
        "sweep-objectives-twice",
        Cli([*SWEEP, "--objectives", "objective_1,objective_1", "--out", "r"], r"more than once"),
    ),
    ("sweep-objectives-none", Cli([*SWEEP, "--objectives", ",", "--out", "r"], r"--objectives ',' names nothing")),
    ("sweep-objectives-unknown", Cli([*SWEEP, "--objectives", "ink,nope", "--out", "r"], r"unknown objectives")),
    ("sweep-objectives-one", Cli([*SWEEP, "--objectives", "objective_1", "--out", "r"], r"at least 2 objectives")),
    (
        "sweep-weights-object",
        Cli([*SWEEP, "--weights", "w.json", "--out", "r"], r"holds one JSON object.*wrap it", _weights_file({"a": 1})),
    ),
    (
        "sweep-weights-pickle",
        Cli([*SWEEP, "--weights", "w.pkl", "--out", "r"], r"looks like a pickle", _file("w.pkl", pickle.dumps([1]))),
    ),
    ("sweep-weights-not-json", Cli([*SWEEP, "--weights", "w.json", "--out", "r"], r"not JSON", _file("w.json", "[{"))),
    ("sweep-weights-missing", Cli([*SWEEP, "--weights", "nope.json", "--out", "r"], r"cannot read.*nope.json")),
    (
        "sweep-weights-numbers",
        Cli([*SWEEP, "--weights", "w.json", "--out", "r"], r"entry 0 is 0.5", _weights_file([0.5, 0.5])),
    ),
    (
        "sweep-weights-string-value",
        Cli([*SWEEP, "--weights", "w.json", "--out", "r"], r"entry 0", _weights_file([{"objective_1": "x"}])),
    ),
    ("sweep-weights-empty", Cli([*SWEEP, "--weights", "w.json", "--out", "r"], r"non-empty", _weights_file([]))),
    (
        "sweep-weights-sum",
        Cli(
            [*SWEEP, "--methods", "msdda", "--weights", "w.json", "--out", "r"],
            r"sums to 0.6",
            _weights_file([{"objective_1": 0.3, "objective_2": 0.3}]),
        ),
    ),
    (
        "sweep-weights-unknown",
        Cli(
            [*SWEEP, "--weights", "w.json", "--out", "r"], r"unknown objectives \['ink'\]", _weights_file([{"ink": 1}])
        ),
    ),
    (
        "sweep-weights-utf16",
        Cli([*SWEEP, "--weights", "w.json", "--out", "r"], r"not JSON", _file("w.json", b"\xff\xfe[")),
    ),
    ("sweep-beta-nan", Cli([*SWEEP, "--beta", "nan", "--out", "r"], r"--beta nan must be a finite number > 0")),
    ("sweep-beta-negative", Cli([*SWEEP, "--beta=-1", "--out", "r"], r"--beta -1.0 must be")),
    ("sweep-beta-inf", Cli([*SWEEP, "--beta", "inf", "--out", "r"], r"--beta inf must be")),
    ("sweep-rgg-nan", Cli([*SWEEP, "--rgg-scale", "nan", "--out", "r"], r"--rgg-scale nan must be a finite number")),
    ("sweep-steps-0", Cli([*SWEEP, "--steps", "0", "--out", "r"], r"--steps")),
    ("sweep-steps-5000", Cli([*SWEEP, "--steps", "5000", "--out", "r"], r"--steps")),
    ("sweep-batch-0", Cli([*SWEEP, "--batch-size", "0", "--out", "r"], r"--batch-size")),
    ("sweep-grid-1", Cli([*SWEEP, "--methods", "msdda", "--grid-points", "1", "--out", "r"], r"grid_points=1")),
    ("sweep-task-unknown", Cli(["sweep", "--task", "nope", "--out", "r"], r"unknown task 'nope'")),
    ("sweep-method-unknown", Cli([*SWEEP, "--methods", "bogus", "--out", "r"], r"unknown method 'bogus'")),
    (
        "sweep-soup-gaussian",
        Cli([*SWEEP, "--methods", "rewarded-soup", "--out", "r"], r"rewarded-soup is not available"),
    ),
    ("sweep-single-unknown", Cli([*SWEEP, "--methods", "single:zzz", "--out", "r"], r"unknown objective 'zzz'")),
    ("sweep-unknown-option", Cli([*SWEEP, "--bogus", "--out", "r"], r"No such option: --bogus")),
    ("sweep-missing-out", Cli(SWEEP, r"Missing option '--out'")),
    ("sweep-steps-word", Cli([*SWEEP, "--steps", "many", "--out", "r"], r"--steps")),
    # --- sweep output folders
    ("sweep-out-file", Cli([*SWEEP, "--out", "f"], r"--out f is an existing file", _file("f"))),
    ("sweep-out-in-file", Cli([*SWEEP, "--out", "f/run"], r"f is a file", _file("f"))),
    (
        "sweep-out-user-folder",
        Cli([*SWEEP, "--out", "mine"], r"holds no msdda sweep.*thesis.txt", _file("mine/thesis.txt")),
    ),
    (
        "sweep-out-user-folder-overwrite",
        Cli([*SWEEP, "--out", "mine", "--overwrite"], r"only ever removes a sweep msdda", _file("mine/thesis.txt")),
    ),
    (
        "sweep-out-cwd-overwrite",
        Cli([*SWEEP, "--out", ".", "--overwrite"], r"refuses to empty \.", _sweep_in(".", methods=["msdda"])),
    ),
    (
        "sweep-out-different",
        Cli([*SWEEP, "--out", "r"], r"different config.*removes config.json, results.jsonl", _sweep_in("r", steps=4)),
    ),
    (
        "sweep-out-corrupt-config",
        Cli([*SWEEP, "--out", "r", "--overwrite"], r"not valid JSON.*left alone", _file("r/config.json", "{oops")),
    ),
    (
        "sweep-out-foreign-config",
        Cli([*SWEEP, "--out", "r", "--overwrite"], r"is not a sweep config", _file("r/config.json", '{"lr": 1}')),
    ),
    (
        "sweep-out-config-list",
        Cli([*SWEEP, "--out", "r", "--overwrite"], r"is not a sweep config", _file("r/config.json", "[1, 2]")),
    ),
    # --- demo
    ("demo-weights-word", Cli(["demo", "--task", "gaussian", "--weights", "0,abc", "--out", "d"], r"'0,abc' is not")),
    (
        "demo-weights-empty",
        Cli(["demo", "--task", "gaussian", "--weights", ",", "--out", "d"], r"weight grid is empty"),
    ),
    ("demo-weights-2", Cli(["demo", "--task", "gaussian", "--weights", "0,2", "--out", "d"], r"weight 2.0 is outside")),
    ("demo-weights-nan", Cli(["demo", "--task", "gaussian", "--weights", "nan", "--out", "d"], r"weight nan")),
    ("demo-task", Cli(["demo", "--task", "imagenet", "--out", "d"], r"unknown task 'imagenet'")),
    ("demo-seed-2^63", Cli(["demo", "--task", "gaussian", "--seed", BIG, "--out", "d"], rf"seed {BIG} is outside")),
    ("demo-seed-negative", Cli(["demo", "--task", "gaussian", "--seed=-1", "--out", "d"], r"seed -1 is outside")),
    ("demo-out-file", Cli(["demo", "--task", "gaussian", "--out", "f"], r"--out f is an existing file", _file("f"))),
    ("demo-out-in-file", Cli(["demo", "--task", "digits", "--out", "f/d"], r"f is a file", _file("f"))),
    ("demo-steps-0", Cli(["demo", "--task", "gaussian", "--steps", "0", "--out", "d"], r"--steps")),
    ("demo-samples-0", Cli(["demo", "--task", "gaussian", "--samples", "0", "--out", "d"], r"--samples")),
    ("demo-threads-0", Cli(["demo", "--task", "gaussian", "--threads", "0", "--out", "d"], r"--threads")),
    # --- align
    ("align-reward-os-system", Cli(["align", "--reward", "os:system", "--out", "a"], r"'os:system'.*not a reward")),
    ("align-reward-print", Cli(["align", "--reward", "builtins:print", "--out", "a"], r"'builtins:print'")),
    ("align-reward-signature", Cli(["align", "--reward", "json:dumps", "--out", "a"], r"does not take \(x0, cond\)")),
    ("align-reward-module", Cli(["align", "--reward", "no_such_mod:f", "--out", "a"], r"cannot import 'no_such_mod'")),
    ("align-reward-attr", Cli(["align", "--reward", "os:no_such_fn", "--out", "a"], r"has no attribute 'no_such_fn'")),
    ("align-reward-empty-attr", Cli(["align", "--reward", "os:", "--out", "a"], r"must look like")),
    ("align-reward-module-obj", Cli(["align", "--reward", "os:path", "--out", "a"], r"'os:path'.*not a reward")),
    ("align-reward-constant", Cli(["align", "--reward", "math:pi", "--out", "a"], r"'math:pi'.*not a reward")),
    ("align-state-source", Cli(["align", "--reward", "ink", "--trainer", "step-rl", "--state-source", "fused",
                                "--out", "a"], r"state_source='fused'; choose one of policy, reference, mixed")),
    ("align-state-weights-dpo", Cli(["align", "--reward", "ink", "--state-weights", "inverse_variance", "--out", "a"],
                                    r"--state-weights applies to --trainer step-rl")),
    ("align-antithetic-dpo", Cli(["align", "--reward", "ink", "--antithetic", "--out", "a"],
                                 r"--antithetic applies to --trainer step-rl")),
    ("align-antithetic-odd", Cli(["align", "--reward", "ink", "--trainer", "step-rl", "--antithetic", "--candidates",
                                  "3", "--out", "a"], r"samples=3: antithetic draws come in pairs")),
    ("align-estimator", Cli(["align", "--reward", "ink", "--trainer", "step-rl", "--estimator", "sgd", "--out", "a"],
                            r"estimator='sgd' is not an estimator; choose one of auto, reparam, loo, moment")),
    ("align-lr-schedule", Cli(["align", "--reward", "ink", "--lr-schedule", "linear", "--out", "a"],
                              r"lr_schedule='linear'; choose one of constant, cosine")),
    ("align-trainable", Cli(["align", "--reward", "ink", "--trainable", ",", "--out", "a"], r"trainable=\[\] must be")),
    ("align-head-ranges-text", Cli(["align", "--reward", "ink", "--kernel-offsets", "--offset-head-ranges", "a,b", "--out",
                                    "a"], r"--offset-head-ranges 'a,b' must be comma-separated integers")),
    ("align-head-ranges-order", Cli(["align", "--reward", "ink", "--kernel-offsets", "--offset-head-ranges", "600,200",
                                     "--out", "a"], r"offset_head_ranges=\[600, 200\] must be increasing")),
    ("align-head-ranges-no-offsets", Cli(["align", "--reward", "ink", "--offset-head-ranges", "200", "--out", "a"],
                                         r"needs kernel_offsets=True")),
    ("align-head-x0-no-offsets", Cli(["align", "--reward", "ink", "--offset-head-x0", "--out", "a"],
                                     r"offset_head_x0=True needs kernel_offsets=True")),
    ("align-reward-unknown", Cli(["align", "--reward", "beauty", "--out", "a"], r"unknown reward 'beauty'")),
    ("align-lr-inf", Cli(["align", "--reward", "ink", "--lr", "inf", "--out", "a"], r"--lr inf must be")),
    ("align-lr-nan", Cli(["align", "--reward", "ink", "--lr", "nan", "--out", "a"], r"--lr nan must be")),
    ("align-lr-0", Cli(["align", "--reward", "ink", "--lr", "0", "--out", "a"], r"--lr 0.0 must be")),
    ("align-beta-nan", Cli(["align", "--reward", "ink", "--beta", "nan", "--out", "a"], r"--beta nan must be")),
    ("align-beta-negative", Cli(["align", "--reward", "ink", "--beta=-0.1", "--out", "a"], r"--beta -0.1 must")),
    ("align-task", Cli(["align", "--reward", "ink", "--task", "mnist", "--out", "a"], r"task 'mnist'")),
    ("align-trainer", Cli(["align", "--reward", "ink", "--trainer", "ppo", "--out", "a"], r"--trainer 'ppo'")),
    ("align-seed-2^63", Cli(["align", "--reward", "ink", "--seed", BIG, "--out", "a"], rf"seed {BIG}")),
    ("align-out-file", Cli(["align", "--reward", "ink", "--out", "f"], r"--out f is an existing file", _file("f"))),
    ("align-missing-reward", Cli(["align", "--out", "a"], r"Missing option '--reward'")),
    # --- train-base / train-classifier
    ("train-base-out-file", Cli(["train-base", "--out", "f", "--steps", "1"], r"--out f is an existing", _file("f"))),
    ("train-base-out-in-file", Cli(["train-base", "--out", "f/m", "--steps", "1"], r"f is a file", _file("f"))),
    ("train-base-seed", Cli(["train-base", "--out", "m", "--seed", BIG], rf"seed {BIG}")),
    ("train-base-steps-0", Cli(["train-base", "--out", "m", "--steps", "0"], r"--steps")),
    ("train-classifier-out-file", Cli(["train-classifier", "--out", "f"], r"--out f is an existing", _file("f"))),
    ("train-classifier-seed", Cli(["train-classifier", "--out", "c", "--seed=-3"], r"seed -3 is outside")),
    # --- report
    ("report-missing", Cli(["report", "nothing"], r"nothing has no results.jsonl")),
    ("report-file", Cli(["report", "f"], r"RUN_DIR f is an existing file", _file("f"))),
    ("report-empty-folder", Cli(["report", "e"], r"has no results.jsonl", lambda d: (d / "e").mkdir())),
    (
        "report-corrupt-config",
        Cli(["report", "r"], r"config.json is not valid JSON", _both(_sweep_in("r"), _file("r/config.json", "{"))),
    ),
    (
        "report-config-list",
        Cli(["report", "r"], r"config.json holds a list", _both(_sweep_in("r"), _file("r/config.json", "[]"))),
    ),
    ("report-only-corrupt-rows", Cli(["report", "r"], r"hold no complete rows", _corrupt_rows_only)),
    ("report-ref-word", Cli(["report", "r", "--reference-point", "a,b"], r"'a,b' must be", _reference_point_run)),
    ("report-ref-nan", Cli(["report", "r", "--reference-point", "nan,0"], r"nan", _reference_point_run)),
    (
        "report-ref-length",
        Cli(["report", "r", "--reference-point", "0,0,0"], r"\[0.0, 0.0, 0.0\]", _reference_point_run),
    ),
    # --- sample (checked before any model is loaded)
    (
        "sample-weight-nan",
        Cli(["sample", "--base", "b", "--weights", "a=nan", "--prompt", "p", "--out", "o"], r"a=nan"),
    ),
    (
        "sample-weight-word",
        Cli(["sample", "--base", "b", "--weights", "a=x", "--prompt", "p", "--out", "o"], r"'x' is"),
    ),
    (
        "sample-weight-pair",
        Cli(["sample", "--base", "b", "--weights", "a", "--prompt", "p", "--out", "o"], r"NAME=VALUE"),
    ),
    (
        "sample-objective-twice",
        Cli(
            ["sample", "--base", "b", "--objective", "a=x", "--objective", "a=y", "--prompt", "p", "--out", "o"],
            r"'a' is given twice",
        ),
    ),
    ("sample-seed", Cli(["sample", "--base", "b", "--prompt", "p", "--out", "o", "--seed", BIG], rf"seed {BIG}")),
    (
        "sample-guidance-nan",
        Cli(
            ["sample", "--base", "b", "--method", "base", "--prompt", "p", "--out", "o", "--guidance-scale", "nan"],
            r"--guidance-scale nan",
        ),
    ),
    (
        "sample-beta-0",
        Cli(["sample", "--base", "b", "--method", "base", "--prompt", "p", "--out", "o", "--beta", "0"], r"--beta 0.0"),
    ),
    ("sample-dtype", Cli(["sample", "--base", "b", "--prompt", "p", "--out", "o", "--dtype", "float8"], r"float8")),
    ("sample-scheduler", Cli(["sample", "--base", "b", "--prompt", "p", "--out", "o", "--scheduler", "x"], r"'x'")),
    ("sample-method-code", Cli(["sample", "--base", "b", "--prompt", "p", "--out", "o", "--method", "code"], r"code")),
    ("sample-no-weights", Cli(["sample", "--base", "b", "--prompt", "p", "--out", "o"], r"needs --weights NAME=W")),
    (
        "sample-empty-prompt",
        Cli(["sample", "--base", "b", "--method", "base", "--prompt", " ", "--out", "o"], r"every prompt must have"),
    ),
    (
        "sample-out-file",
        Cli(["sample", "--base", "b", "--method", "base", "--prompt", "p", "--out", "f"], r"existing file", _file("f")),
    ),
    ("sample-missing-prompt", Cli(["sample", "--base", "b", "--out", "o"], r"pass --prompt TEXT .* or --prompt-file")),
    # --- global
    ("no-such-command", Cli(["bogus"], r"No such command 'bogus'")),
    # --- fusion API
    ("fuse-mean-none", Api(lambda d: fuse_gaussians([None], [1.0], [1.0]), FusionError, r"mean of kernel 0 is None")),
    (
        "fuse-mean-complex",
        Api(lambda d: fuse_gaussians([torch.zeros(2, dtype=torch.complex64)], [1.0], [1.0]), FusionError, r"complex"),
    ),
    (
        "fuse-mean-bool",
        Api(lambda d: fuse_gaussians([torch.zeros(2, dtype=torch.bool)], [1.0], [1.0]), FusionError, r"torch.bool"),
    ),
    ("fuse-mean-string", Api(lambda d: fuse_gaussians(["abc"], [1.0], [1.0]), FusionError, r"'abc'")),
    (
        "fuse-var-none",
        Api(lambda d: fuse_gaussians([ONE], [None], [1.0]), FusionError, r"variance of kernel 0 is None"),
    ),
    (
        "fuse-var-string",
        Api(lambda d: fuse_gaussians([ONE], ["1"], [1.0]), FusionError, r"variance of kernel 0 is '1'"),
    ),
    (
        "fuse-var-complex",
        Api(lambda d: fuse_gaussians([ONE], [torch.ones(3, dtype=torch.complex64)], [1.0]), FusionError, r"complex"),
    ),
    ("fuse-weights-string", Api(lambda d: fuse_gaussians([ONE], [1.0], "1"), FusionError, r"weights is '1' \(str\)")),
    ("fuse-weights-dict", Api(lambda d: fuse_gaussians([ONE], [1.0], {"a": 1.0}), FusionError, r"\(dict\)")),
    ("fuse-weights-none", Api(lambda d: fuse_gaussians([ONE], [1.0], None), FusionError, r"weights is None")),
    ("fuse-weight-item-str", Api(lambda d: fuse_gaussians([ONE], [1.0], ["1"]), FusionError, r"weights\[0\] is '1'")),
    ("fuse-means-tensor", Api(lambda d: fuse_gaussians(ONE, [1.0], [1.0]), FusionError, r"means is a Tensor")),
    (
        "fuse-variances-dict",
        Api(lambda d: fuse_gaussians([ONE], {"v": 1.0}, [1.0]), FusionError, r"variances is a dict"),
    ),
    (
        "fuse-ref-none",
        Api(lambda d: fuse_gaussians([ONE], [1.0], [0.5], ref_mean=None, ref_var=1.0), FusionError, r"both ref_mean"),
    ),
    (
        "fuse-ref-complex",
        Api(
            lambda d: fuse_gaussians([ONE], [1.0], [0.5], ref_mean=ONE, ref_var=torch.ones(1, dtype=torch.complex64)),
            FusionError,
            r"ref_var has dtype torch.complex64",
        ),
    ),
    ("prefs-dict", Api(lambda d: exponents_from_preferences({"a": 1.0}, 1.0, 1.0), FusionError, r"preferences is")),
    ("prefs-string", Api(lambda d: exponents_from_preferences("0.5", 1.0, 1.0), FusionError, r"preferences is '0.5'")),
    (
        "prefs-beta-string",
        Api(lambda d: exponents_from_preferences([1.0], 1.0, "1"), FusionError, r"target beta is '1'"),
    ),
    (
        "prefs-beta-none",
        Api(lambda d: exponents_from_preferences([1.0], 1.0, None), FusionError, r"target beta is None"),
    ),
    (
        "prefs-beta-nan",
        Api(lambda d: exponents_from_preferences([1.0], 1.0, math.nan), FusionError, r"target beta is nan"),
    ),
    ("prefs-betas-string", Api(lambda d: exponents_from_preferences([1.0], "1", 1.0), FusionError, r"betas is '1'")),
    (
        "prefs-bool",
        Api(lambda d: exponents_from_preferences([True], 1.0, 1.0), FusionError, r"preferences\[0\] is True"),
    ),
    # --- schedule API
    ("kernel-negative-t", Api(lambda d: KernelScheduler().kernel(x, -5, x), ScheduleError, r"timestep -5 is negative")),
    ("kernel-minus-one", Api(lambda d: KernelScheduler().kernel(x, -1, x), ScheduleError, r"timestep -1 is negative")),
    (
        "reverse-kernel-negative",
        Api(lambda d: reverse_kernel(KernelScheduler(), x, -3, x), ScheduleError, r"timestep -3 is negative"),
    ),
    (
        "kernel-t-1000",
        Api(lambda d: KernelScheduler().kernel(x, 1000, x), ScheduleError, r"timestep 1000 >= num_train"),
    ),
    ("kernel-t-fraction", Api(lambda d: KernelScheduler().kernel(x, 10.5, x), ScheduleError, r"timestep is 10.5")),
    ("kernel-t-string", Api(lambda d: KernelScheduler().kernel(x, "10", x), ScheduleError, r"timestep is '10'")),
    (
        "kernel-t-batched-negative",
        Api(
            lambda d: KernelScheduler().kernel(x, torch.tensor([3, -2]), x, prev_timestep=torch.tensor([2, -3])),
            ScheduleError,
            r"timestep -2 is negative",
        ),
    ),
    (
        "kernel-t-float-tensor",
        Api(lambda d: KernelScheduler().kernel(x, torch.tensor([2.5, 3.0]), x), ScheduleError, r"torch.float32"),
    ),
    ("ddim-no-set-timesteps", Api(lambda d: ks_ddim_unset().kernel(x, 500, x), ScheduleError, r"call .*set_timesteps")),
    (
        "ddim-diffusers-no-set-timesteps",
        Api(lambda d: reverse_kernel(diffusers_ddim_unset(), x, 500, x), ScheduleError, r"set_timesteps"),
    ),
    ("predict-x0-negative", Api(lambda d: KernelScheduler().predict_x0(x, -7, x), ScheduleError, r"timestep -7")),
    (
        "add-noise-negative",
        Api(lambda d: KernelScheduler().add_noise(x, x, torch.tensor([5, -1])), ScheduleError, r"timesteps -1"),
    ),
    ("q-posterior-negative", Api(lambda d: KernelScheduler().q_posterior(x, x, -4, -5), ScheduleError, r"timestep -4")),
    ("kernel-output-list", Api(lambda d: KernelScheduler().kernel([0.0], 5, x), ScheduleError, r"must be tensors")),
    (
        "kernel-int-sample",
        Api(lambda d: KernelScheduler().kernel(x.long(), 5, x.long()), ScheduleError, r"floating-point"),
    ),
    # --- sweep / store API
    ("sweep-api-seeds-str", Api(lambda d: run_sweep(tiny_cfg(seeds="0"), d / "r", factory), SweepError, r"seeds='0'")),
    ("sweep-api-seed-neg", Api(lambda d: run_sweep(tiny_cfg(seeds=[-1]), d / "r", factory), SweepError, r"seed -1")),
    ("sweep-api-seed-big", Api(lambda d: run_sweep(tiny_cfg(seeds=[2**63]), d / "r", factory), SweepError, BIG)),
    ("sweep-api-seed-str", Api(lambda d: run_sweep(tiny_cfg(seeds=["1"]), d / "r", factory), SweepError, r"seed '1'")),
    (
        "sweep-api-beta-str",
        Api(lambda d: run_sweep(tiny_cfg(beta="0.5"), d / "r", factory), SweepError, r"beta='0.5' must be a number"),
    ),
    (
        "sweep-api-batch-str",
        Api(lambda d: run_sweep(tiny_cfg(batch_size="2"), d / "r", factory), SweepError, r"batch_size='2'"),
    ),
    (
        "sweep-api-steps-float",
        Api(lambda d: run_sweep(tiny_cfg(steps=2.5), d / "r", factory), SweepError, r"steps=2.5 must be an integer"),
    ),
    (
        "sweep-api-methods-str",
        Api(lambda d: run_sweep(tiny_cfg(methods="base"), d / "r", factory), SweepError, r"methods='base'"),
    ),
    (
        "sweep-api-objectives-twice",
        Api(
            lambda d: run_sweep(tiny_cfg(objectives=["objective_1"] * 2), d / "r", factory),
            SweepError,
            r"more than once",
        ),
    ),
    (
        "sweep-api-weights-str",
        Api(
            lambda d: run_sweep(tiny_cfg(weights=[{"objective_1": "0.5", "objective_2": 0.5}]), d / "r", factory),
            SweepError,
            r"weight '0.5' for 'objective_1' is not a number",
        ),
    ),
    (
        "validate-weights-dict",
        Api(lambda d: validate_weights({"objective_1": 1.0}, ["objective_1"]), SweepError, r"entry 0 is 'objective_1'"),
    ),
    (
        "prepare-file",
        Api(lambda d: prepare_run_dir(d / "f", tiny_cfg(), False), SweepError, r"is a file, not a folder", _file("f")),
    ),
    (
        "prepare-user-folder-overwrite",
        Api(
            lambda d: prepare_run_dir(d / "u", tiny_cfg(), True), SweepError, r"holds no msdda sweep", _file("u/a.txt")
        ),
    ),
    (
        "prepare-cwd-overwrite",
        Api(
            lambda d: prepare_run_dir(Path("."), tiny_cfg(), True),
            SweepError,
            r"refuses to empty",
            _sweep_in(".", steps=5),
        ),
    ),
    (
        "prepare-corrupt-config-overwrite",
        Api(
            lambda d: prepare_run_dir(d / "r", tiny_cfg(), True),
            SweepError,
            r"not valid JSON",
            _file("r/config.json", "{"),
        ),
    ),
    # --- outputs, metrics, report API
    (
        "check-output-file",
        Api(lambda d: check_output_dir(d / "f"), OutputPathError, r"is an existing file", _file("f")),
    ),
    ("check-output-in-file", Api(lambda d: check_output_dir(d / "f" / "x"), OutputPathError, r"is a file", _file("f"))),
    ("report-api-missing", Api(lambda d: compute_metrics(d / "none"), ReportError, r"none has no results.jsonl")),
    (
        "report-api-only-corrupt",
        Api(lambda d: compute_metrics(d / "r"), ReportError, r"no complete rows", _corrupt_rows_only),
    ),
    (
        "hypervolume-dominating-reference",
        Api(lambda d: hypervolume([[1.0, 2.0], [2.0, 1.0]], [3.0, 3.0]), MetricsWarning, r"\[3.0, 3.0\]", warns=True),
    ),
    (
        "hypervolume-reference-above-one-axis",
        Api(
            lambda d: hypervolume([[1.0, 2.0]], [0.0, 2.0]), MetricsWarning, r"no point strictly dominates", warns=True
        ),
    ),
]


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file and folder under root with its content (folders: None)."""
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = None if p.is_dir() else p.read_bytes()
    return out


def test_the_table_is_large_enough():
    assert len(CASES) >= 100
    assert len({name for name, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [c for _, c in CASES], ids=[n for n, _ in CASES])
def test_hostile_input(case: Cli | Api, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MSDDA_DEBUG", raising=False)
    monkeypatch.setattr(cli, "_debug", False)
    if case.setup is not None:
        case.setup(tmp_path)
    capsys.readouterr()
    before = _snapshot(tmp_path)
    if isinstance(case, Cli):
        with pytest.raises(SystemExit) as exc:
            cli.entry(case.args)
        err = capsys.readouterr().err
        assert exc.value.code == 2, err
        assert "Traceback" not in err
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1, err
        assert re.search(case.message, lines[0]), lines[0]
    elif case.warns:
        with pytest.warns(case.error, match=case.message):
            case.call(tmp_path)
    else:
        with pytest.raises(case.error, match=case.message) as exc:
            case.call(tmp_path)
        assert "\n" not in str(exc.value)
    assert _snapshot(tmp_path) == before  # nothing left behind, nothing removed


# ----- debugging: the traceback on request ----------------------------------------------------------------
def test_debug_flag_and_env_show_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputPathError):
        cli.entry(["--debug", "sweep", *SWEEP[1:], "--out", "f"])
    monkeypatch.setattr(cli, "_debug", False)
    monkeypatch.setenv("MSDDA_DEBUG", "1")
    with pytest.raises(OutputPathError):
        cli.entry([*SWEEP, "--out", "f"])


def test_an_oserror_is_one_line(tmp_path, monkeypatch, capsys):
    """A disk-full write (or any OSError) mid-run: one line naming the file, exit 2."""
    import errno

    import msdda.evaluation.store as store

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "r" / "results.jsonl"))

    monkeypatch.setattr(store, "_append_rows", full)
    monkeypatch.setattr("msdda.evaluation.sweep._append_rows", full)
    monkeypatch.delenv("MSDDA_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exc:
        cli.entry([*SWEEP, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"error: No space left on device: {tmp_path / 'r' / 'results.jsonl'}"
    assert not (tmp_path / "r").exists()  # the run had no row yet: its fresh folder is gone again


def test_read_only_output_is_refused_before_work(tmp_path, monkeypatch):
    import tempfile

    def denied(*_a, **_k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(OutputPathError, match=r"--out .*ro is not writable \(Permission denied"):
        check_output_dir(tmp_path / "ro")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_for_real(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputPathError, match="not writable"):
            check_output_dir(ro / "run")
    finally:
        ro.chmod(0o755)


# ----- the results store: corrupt lines, duplicates -------------------------------------------------------
def test_corrupt_line_is_skipped_with_a_warning_in_report_and_resume(tmp_path, caplog):
    run = tmp_path / "r"
    cfg = tiny_cfg(seeds=[0, 1])
    run_sweep(cfg, run, factory, progress=False)
    path = run / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    valid = len(lines) - 1
    lines[2] = '{"unit": "broken\n'
    path.write_text("".join(lines))
    with caplog.at_level("WARNING"):
        rows = read_run_rows(run)
    assert len(rows) == valid  # every row after the corrupt one is kept
    assert f"{path}, line 3: skipped a corrupt results row" in caplog.text
    metrics = compute_metrics(run)
    assert metrics["rows"] == valid and set(metrics["methods"]) == {"base", "msdda"}
    caplog.clear()
    with caplog.at_level("WARNING"):
        res = run_sweep(cfg, run, factory, progress=False)
    assert res.units_run == 1  # only the unit that lost a row is sampled again
    assert "line 3" in caplog.text and "results.jsonl.corrupt" in caplog.text
    assert (run / "results.jsonl.corrupt").read_text() == '{"unit": "broken\n'
    assert len(read_rows(path)) == valid + 1


_ROW = {"unit": "u", "method": "base", "index": 0, "prompt_index": 0, "seed": 0, "batch": 2, "weights": None}
_ROW.update(rewards={"objective_1": 1.0, "objective_2": 1.0}, cost={})
BAD_ROWS = [
    "{}",
    "[]",
    '"text"',
    "null",
    '{"unit": "u", "index": "0"}',
    "\x00\x01",
    json.dumps({**_ROW, "rewards": {"objective_1": math.nan, "objective_2": 1.0}}),
    json.dumps({**_ROW, "batch": 0}),
    json.dumps({**_ROW, "weights": [0.5, 0.5]}),
    json.dumps({**_ROW, "rewards": {"objective_1": "high"}}),
]


@pytest.mark.parametrize("bad", BAD_ROWS)
def test_rows_that_are_not_rows_are_skipped(tmp_path, caplog, bad):
    run = tmp_path / "r"
    run_sweep(tiny_cfg(), run, factory, progress=False)
    path = run / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join([lines[0], bad + "\n", *lines[1:]]))
    with caplog.at_level("WARNING"):
        assert len(read_rows(path)) == len(lines)
    assert "line 2: skipped a corrupt results row" in caplog.text


def test_duplicate_rows_are_read_once_and_never_written(tmp_path):
    run = tmp_path / "r"
    cfg = tiny_cfg()
    run_sweep(cfg, run, factory, progress=False)
    path = run / "results.jsonl"
    text = path.read_text()
    path.write_text(text + text)  # what two concurrent writers used to leave
    assert len(read_rows(path)) == text.count("\n")
    res = run_sweep(cfg, run, factory, progress=False)
    assert res.units_run == 0 and path.read_text() == text  # repaired, nothing recomputed


def test_repeated_methods_seeds_and_weights_write_each_row_once(tmp_path):
    run = tmp_path / "r"
    grid = [{"objective_1": 0.5, "objective_2": 0.5}] * 2
    res = run_sweep(tiny_cfg(methods=["base", "base", "msdda"], seeds=[0, 0], weights=grid), run, factory)
    rows = read_rows(run / "results.jsonl")
    assert res.units_total == 2 and len(rows) == 4
    assert len({(r["unit"], r["index"]) for r in rows}) == len(rows)
    assert json.loads((run / "config.json").read_text())["methods"] == ["base", "msdda"]
    assert run_sweep(tiny_cfg(methods=["base", "msdda"], weights=grid), run, factory).units_run == 0


# ----- --overwrite ----------------------------------------------------------------------------------------
def test_overwrite_removes_only_what_msdda_wrote(tmp_path, caplog):
    run = tmp_path / "r"
    run_sweep(tiny_cfg(save_samples=True), run, factory, progress=False)
    (run / "thesis.txt").write_text("mine")
    (run / "samples" / "notes.md").write_text("mine too")
    with pytest.raises(SweepError, match=r"removes config.json, results.jsonl, samples/ \(3 sample file"):
        run_sweep(tiny_cfg(steps=4, save_samples=True), run, factory, progress=False)
    with caplog.at_level("WARNING"):
        res = run_sweep(tiny_cfg(steps=4, save_samples=True), run, factory, progress=False, overwrite=True)
    assert res.units_run == res.units_total
    assert "--overwrite: removing config.json, results.jsonl, samples/" in caplog.text
    assert (run / "thesis.txt").read_text() == "mine"
    assert (run / "samples" / "notes.md").read_text() == "mine too"


def test_overwrite_never_empties_home_or_the_package(tmp_path, monkeypatch):
    import msdda

    monkeypatch.setenv("HOME", str(tmp_path))
    run_sweep(tiny_cfg(), tmp_path / "r", factory, progress=False)
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: tmp_path / "r"))
    with pytest.raises(SweepError, match="refuses to empty"):
        prepare_run_dir(tmp_path / "r", tiny_cfg(steps=4), True)
    pkg = Path(msdda.__file__).parent
    assert pkg in __import__("msdda.evaluation.store", fromlist=["_protected_dirs"])._protected_dirs()


# ----- concurrency: one sweep per folder; a killed holder frees the lock ---------------------------------
def test_a_second_sweep_into_the_same_folder_is_refused_while_the_first_runs(tmp_path, capsys):
    run = tmp_path / "r"
    args = [*SWEEP, "--methods", "base,msdda", "--grid-points", "3", "--seeds", "0,1,2", "--out", str(run)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    slow = subprocess.Popen([sys.executable, "-m", "msdda.cli", *args, "--throttle", "0.5"], env=env)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (run / "results.jsonl").exists():
            time.sleep(0.05)
        assert (run / "results.jsonl").exists()
        before = (run / "results.jsonl").read_bytes()
        with pytest.raises(SystemExit) as exc:
            cli.entry(args)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert exc.value.code == 2
        assert re.fullmatch(
            rf"error: another msdda sweep \(pid {slow.pid}\) is writing to {re.escape(str(run))}.*", err
        )
        assert (run / "results.jsonl").read_bytes()[: len(before)] == before
    finally:
        slow.send_signal(signal.SIGKILL)
        slow.wait()
    with run_lock(run):  # the kernel released the killed holder's lock: not stuck
        pass
    cli.entry(args)  # resumes to the end
    rows = read_rows(run / "results.jsonl")
    assert len(rows) == len({(r["unit"], r["index"]) for r in rows}) == (1 + 3) * 3 * 2  # units x batch


def test_run_lock_refuses_a_second_holder_in_process(tmp_path):
    with run_lock(tmp_path), pytest.raises(SweepError, match=rf"pid {os.getpid()}"), run_lock(tmp_path):
        pass
    with run_lock(tmp_path):  # released
        pass


# ----- killed writers: markers and temp files -------------------------------------------------------------
def test_incomplete_marker(tmp_path):
    out = tmp_path / "a" / "b"
    with incomplete_marker(out, "msdda demo"):
        assert (out / INCOMPLETE_MARKER).read_text().startswith("msdda demo started")
        (out / "one.png").write_text("1")
    assert not (out / INCOMPLETE_MARKER).exists() and (out / "one.png").exists()
    with pytest.raises(RuntimeError), incomplete_marker(out, "msdda demo"):
        (out / "two.png").write_text("2")
        raise RuntimeError("boom")
    assert (out / INCOMPLETE_MARKER).exists()  # a partial image set says so
    fresh = tmp_path / "fresh" / "deep"
    with pytest.raises(RuntimeError), incomplete_marker(fresh, "msdda sample"):
        raise RuntimeError("before any file")
    assert not (tmp_path / "fresh").exists()  # nothing left behind


def test_a_killed_multi_file_writer_leaves_the_marker(tmp_path):
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from msdda.atomic import incomplete_marker, write_text_atomic\n"
        "out = Path(sys.argv[1])\n"
        "with incomplete_marker(out, 'msdda sample'):\n"
        "    write_text_atomic(out / 'image_000.png', 'x')\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "o")])
    deadline = time.time() + 30
    while time.time() < deadline and not (tmp_path / "o" / "image_000.png").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [INCOMPLETE_MARKER, "image_000.png"]


def test_stale_temp_files_of_dead_writers_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    from msdda.atomic import _HOST

    stale = tmp_path / f".metrics.json.msdda{dead_pid}-{_HOST}.abc123.tmp"
    live = tmp_path / f".pareto.png.msdda{os.getppid()}-{_HOST}.def456.tmp"  # a live writer: kept
    elsewhere = tmp_path / f".pareto.png.msdda{dead_pid}-otherhost.def456.tmp"  # another machine's: kept
    user = tmp_path / ".notes.tmp"  # not ours: kept
    for p in (stale, live, elsewhere, user):
        p.write_text("partial")
    write_json_atomic(tmp_path / "metrics.json", {"a": 1})
    assert not stale.exists() and live.exists() and elsewhere.exists() and user.exists()
    assert remove_stale_temp_files(tmp_path) == []  # once per folder and process


def test_failed_write_removes_its_temp_file(tmp_path, monkeypatch):
    def fail(*_a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        write_json_atomic(tmp_path / "x.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


# ----- numerics of the math core ---------------------------------------------------------------------------
@pytest.mark.parametrize("tiny", [1e-320, 5e-324, 1e-200, 1e-160])
def test_subnormal_and_tiny_variances_fuse_without_nan(tiny):
    m = [torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    for variances in ([tiny, 1.0], [tiny, 2 * tiny]):
        mean, var = fuse_gaussians(m, variances, [0.5, 0.5])
        assert torch.isfinite(mean).all() and torch.isfinite(var).all()
        tv = [torch.full((3,), v, dtype=torch.float64) for v in variances]
        mean_t, var_t = fuse_gaussians(m, tv, [0.5, 0.5])
        assert torch.isfinite(mean_t).all() and torch.isfinite(var_t).all()
        assert torch.allclose(mean_t, mean.expand(3), rtol=1e-12, atol=1e-300)
    mean, _ = fuse_gaussians(m, [tiny, 2 * tiny], [0.5, 0.5])
    assert mean[0].item() == pytest.approx(1 / 3, rel=1e-9)  # precision-weighted, as for normal variances


def test_hypervolume_with_a_good_reference_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hypervolume([[1.0, 2.0]], [0.0, 0.0]) == 2.0


# ----- the multi-file commands mark their folder while writing --------------------------------------------
def test_a_failed_demo_leaves_its_incomplete_marker(tmp_path, monkeypatch, capsys):
    import msdda.evaluation.digits_demo as demo

    def half_done(out, **_kw):
        (Path(out) / "samples_w0.png").write_bytes(b"png")
        raise OSError(28, "No space left on device", str(Path(out) / "samples_w1.png"))

    monkeypatch.setattr(demo, "run_digits_demo", half_done)
    with pytest.raises(SystemExit) as exc:
        cli.entry(["demo", "--out", str(tmp_path / "d"), "--quiet"])
    assert exc.value.code == 2 and "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [INCOMPLETE_MARKER, "samples_w0.png"]


class _FakePipe:
    """Stands in for MSDDAPipeline (the real one is tested in test_sd_pipeline.py): records the call."""

    calls: list[dict[str, Any]] = []

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls()

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, prompt, weights, **kw):
        from types import SimpleNamespace

        from PIL import Image

        from msdda.sampling.cost import Cost

        _FakePipe.calls.append({"prompt": prompt, **kw})
        n = len(prompt) if isinstance(prompt, list) else 1
        images = [Image.new("RGB", (4, 4)) for _ in range(n * kw["num_images_per_prompt"])]
        return SimpleNamespace(images=images, config={"method": "base"}, cost=Cost(), nsfw_content_detected=None)


def test_sample_one_negative_prompt_for_several_prompts(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    import msdda.pipelines.sd as sd

    monkeypatch.setattr(sd, "MSDDAPipeline", _FakePipe)
    _FakePipe.calls.clear()
    out = tmp_path / "o"
    args = ["sample", "--base", "b", "--method", "base", "--prompt", "a", "--prompt", "b", "--negative-prompt", "n"]
    cli.entry([*args, "--out", str(out), "--quiet"])
    assert _FakePipe.calls[0]["negative_prompt"] == ["n", "n"] and _FakePipe.calls[0]["prompt"] == ["a", "b"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "image_000.png", "image_001.png"]


def test_sample_with_a_corrupt_model_file_is_one_line(tmp_path, monkeypatch, capsys):
    pytest.importorskip("diffusers")
    import msdda.pipelines.sd as sd

    class Corrupt(_FakePipe):
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            return json.loads("{truncated")

    monkeypatch.setattr(sd, "MSDDAPipeline", Corrupt)
    with pytest.raises(SystemExit) as exc:
        cli.entry(["sample", "--base", "b", "--method", "base", "--prompt", "a", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert re.search(r"^error: cannot load the model from --base b.*JSONDecodeError", err, re.M)
    assert list(tmp_path.iterdir()) == []


def test_a_real_reward_spec_passes_the_check(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "import torch\n"
        "def brightness(x0, cond=None):\n"
        "    return x0.flatten(1).mean(1)\n"
        "class Ink:\n"
        "    name = 'ink2'\n"
        "    differentiable = True\n"
        "    def __call__(self, x0, cond):\n"
        "        return x0.flatten(1).sum(1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cli._check_reward_spec("my_rewards:brightness")
    cli._check_reward_spec("my_rewards:Ink")
    cli._check_reward_spec("ink")  # registered names are the registry's to check


def test_report_on_rows_without_cost_figures(tmp_path):
    run = tmp_path / "r"
    run_sweep(tiny_cfg(), run, factory, progress=False)
    path = run / "results.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "cost": {}}) + "\n" for r in rows))
    metrics = compute_metrics(run)
    assert metrics["rows"] == len(rows) and metrics["cost"]["base"]["seconds"] is None
