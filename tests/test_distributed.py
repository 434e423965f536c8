"""Multi-process sweeps and DPO training: real 2-process runs (accelerate launch / torchrun, gloo on CPU)
against single-process ones, a rank killed with SIGKILL and resumed, and resuming under other process counts."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model
from msdda.alignment import AlignmentError, DPOConfig, training_scheduler_config
from msdda.alignment.dpo import shard_seed, shard_sizes, train_dpo
from msdda.core import KernelScheduler
from msdda.distributed import DistContext, DistributedError, get_context, launched_world_size
from msdda.evaluation.report import compute_metrics
from msdda.evaluation.store import SweepError, _check_prepared_config, done_units, read_rows, results_files
from msdda.evaluation.sweep import SweepConfig, run_sweep
from msdda.evaluation.tasks import get_task_bundle
from msdda.rewards import get_reward
from msdda.tasks.digits.training import align_digits, class_conditions

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SWEEP_ARGS = ["--task", "gaussian", "--methods", "base,msdda,db-mpa", "--grid-points", "3", "--seeds", "0,1,2",
              "--batch-size", "4", "--steps", "6", "--quiet"]
UNITS = 21  # (1 base + 3 weights x 2 weighted methods) x 3 seeds x 1 prompt


def _sweep_cfg() -> SweepConfig:
    """The sweep SWEEP_ARGS describe, as the CLI builds it."""
    return SweepConfig(task="gaussian", methods=["base", "msdda", "db-mpa"], grid_points=3, seeds=[0, 1, 2],
                       batch_size=4, steps=6, objectives=None, prompts=None, weights=None)


def _factory(cfg):
    return get_task_bundle(cfg.task, cfg.task_options)


def comparable(rows):
    """Rows without wall-clock and memory figures (those differ between runs by nature), in a fixed order."""
    out = []
    for r in rows:
        r = dict(r)
        r["cost"] = {k: v for k, v in r["cost"].items() if k not in ("seconds", "peak_memory_bytes")}
        out.append(r)
    return sorted(out, key=lambda r: (r["unit"], r["index"]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(n: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
            "-m", "msdda.cli", *args]


def _accelerate_launch(n: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={n}",
            "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={_free_port()}",
            "-m", "msdda.cli", *args]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _kill_rank(launcher: subprocess.Popen, rank: int, ready, timeout: float = 120.0) -> None:
    """SIGKILL the worker of `rank` under a torchrun launcher once `ready()` holds; wait for the launcher."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert launcher.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "the run never reached the point to interrupt it"
        time.sleep(0.02)
    workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)
               if p.environ().get("RANK") == str(rank) and "msdda.cli" in " ".join(p.cmdline())]
    assert len(workers) == 1, workers
    workers[0].send_signal(signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0  # the launcher tears the other rank down and reports the failure


# ---------------------------------------------------------------------------------------------- sweeps
@pytest.fixture(scope="module")
def reference_rows(tmp_path_factory):
    """The sweep run by one process, in this process."""
    run = tmp_path_factory.mktemp("single") / "run"
    run_sweep(_sweep_cfg(), run, _factory, progress=False)
    assert [f.name for f in results_files(run)] == ["results.jsonl"]
    return run, comparable(read_rows(run))


def test_sweep_on_two_processes_equals_one_bitwise(tmp_path, reference_rows):
    single, expected = reference_rows
    run = tmp_path / "two"
    res = _run(_accelerate_launch(2, "sweep", *SWEEP_ARGS, "--out", str(run)))
    assert f"{UNITS} of {UNITS} units run now; {UNITS * 4} rows" in res.stdout
    assert res.stdout.count("units run now") == 1  # rank 0 alone reports
    assert [f.name for f in results_files(run)] == ["results.rank0.jsonl", "results.rank1.jsonl"]
    for rank in (0, 1):  # unit i -> rank i % 2
        assert {r["unit_index"] % 2 for r in read_rows(run / f"results.rank{rank}.jsonl")} == {rank}
    assert comparable(read_rows(run)) == expected
    assert json.loads((run / "config.json").read_text()) == json.loads((single / "config.json").read_text())
    a, b = compute_metrics(single), compute_metrics(run)
    for m in (a, b):
        m.pop("run_dir"), m.pop("cost")
    assert a == b  # the report reads the union of the rank files, in the planned order


def test_sweep_resumes_after_one_rank_is_killed(tmp_path, reference_rows):
    _, expected = reference_rows
    run = tmp_path / "killed"
    rank1 = run / "results.rank1.jsonl"
    launcher = subprocess.Popen(_torchrun(2, "sweep", *SWEEP_ARGS, "--out", str(run), "--throttle", "0.4"),
                                env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_rank(launcher, 1, lambda: rank1.exists() and rank1.read_text().count("\n") >= 8)
    done = done_units(run, 4)
    assert 0 < len(done) < UNITS  # it really was interrupted
    res = _run(_torchrun(2, "sweep", *SWEEP_ARGS, "--out", str(run)))
    assert f"{UNITS - len(done)} of {UNITS} units run now; {UNITS * 4} rows" in res.stdout  # only what was missing
    assert comparable(read_rows(run)) == expected
    assert sum(f.read_text().count("\n") for f in results_files(run)) == UNITS * 4  # no duplicate anywhere


def test_resume_under_other_process_counts_neither_duplicates_nor_misses(tmp_path, reference_rows):
    """Shares run one after another (shard=...): two ranks die mid-way (one leaving a torn line), three ranks
    resume, then one process finds nothing left; the union equals the single-process store."""
    _, expected = reference_rows
    run = tmp_path / "reshard"

    class Killed(Exception):
        pass

    for rank, units in ((0, 3), (1, 2)):
        done = []

        def die(unit, done=done, units=units):
            done.append(unit)
            if len(done) == units:
                raise Killed

        with pytest.raises(Killed):
            run_sweep(_sweep_cfg(), run, _factory, progress=False, shard=(rank, 2), on_unit_done=die)
    with (run / "results.rank1.jsonl").open("a") as f:
        f.write('{"unit": "msdda|objective_1=0.5')  # a kill in the middle of a write
    ran = [run_sweep(_sweep_cfg(), run, _factory, progress=False, shard=(r, 3)).units_run for r in range(3)]
    assert sum(ran) == UNITS - 5
    res = run_sweep(_sweep_cfg(), run, _factory, progress=False)
    assert (res.units_run, res.rows) == (0, UNITS * 4)
    assert comparable(read_rows(run)) == expected
    files = results_files(run)
    assert [f.name for f in files] == [f"results.rank{r}.jsonl" for r in range(3)]
    assert sum(f.read_text().count("\n") for f in files) == UNITS * 4
    assert all(f.read_text().endswith("\n") for f in files)


def test_ranks_check_the_config_rank_0_wrote(tmp_path):
    run = tmp_path / "r"
    assert "shared" in _check_prepared_config(run, _sweep_cfg())  # rank 0 wrote nothing visible here
    run_sweep(_sweep_cfg(), run, _factory, progress=False)
    assert _check_prepared_config(run, _sweep_cfg()) is None
    other = _sweep_cfg()
    other.steps = 7
    assert "differs from this process's sweep in ['steps']" in _check_prepared_config(run, other)
    with pytest.raises(SweepError, match="shard=\\(2, 2\\)"):
        run_sweep(_sweep_cfg(), run, _factory, progress=False, shard=(2, 2))


def test_single_process_context_and_collectives(monkeypatch):
    for var in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    ctx = get_context()
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed) == (0, 1, True, False)
    ctx.barrier()
    assert ctx.all_sum(torch.tensor([1.5, 2.0])).tolist() == [1.5, 2.0]
    assert ctx.all_gather_objects({"a": 1}) == [{"a": 1}] and ctx.broadcast_object(3) == 3
    ctx.check_all(None)
    with pytest.raises(SweepError, match="boom"):
        ctx.check_all("boom", SweepError)
    with pytest.raises(KeyError):
        ctx.call_checked(lambda: {}["x"])
    assert ctx.call_checked(lambda: 4) == 4
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(DistributedError, match="WORLD_SIZE='two' is not an integer"):
        launched_world_size()


# -------------------------------------------------------------------------------------------- training
ALIGN = dict(reward="ink", beta=0.5, steps=4, lr=1e-3, trajectories=4, states_per_trajectory=2, candidates=3,
             checkpoint_every=2, log_every=2, eval_samples=4, data_shards=2)


def _align_args(base: Path, out: Path, *extra: str) -> list[str]:
    c = ALIGN
    return ["align", "--task", "digits", "--reward", c["reward"], "--beta", str(c["beta"]), "--steps", str(c["steps"]),
            "--lr", str(c["lr"]), "--trajectories", str(c["trajectories"]), "--states", str(c["states_per_trajectory"]),
            "--candidates", str(c["candidates"]), "--checkpoint-every", str(c["checkpoint_every"]),
            "--log-every", str(c["log_every"]), "--eval-samples", str(c["eval_samples"]),
            "--data-shards", str(c["data_shards"]), "--base", str(base), "--out", str(out), "--quiet", *extra]


@pytest.fixture(scope="module")
def single_align(tiny_base, tmp_path_factory) -> Path:
    """The tiny DPO run on one process (in this process), with the same two data shards."""
    out = tmp_path_factory.mktemp("align1") / "run"
    align_digits(get_reward("ink"), out, DPOConfig(**ALIGN), base=tiny_base, progress=False)  # as the CLI does
    return out


def _assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


def test_dpo_on_two_processes_matches_one(tiny_base, single_align, tmp_path):
    out = tmp_path / "two"
    res = _run(_torchrun(2, *_align_args(tiny_base, out)))
    assert res.stdout.count("aligned to 'ink'") == 1  # rank 0 alone reports
    _assert_same_weights(single_align, out)
    moved = load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(moved[k], v) for k, v in tiny_model().state_dict().items())  # it did train
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    log1 = [json.loads(x) for x in (single_align / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 2, 4]
    for r, r1 in zip(log, log1, strict=True):  # the logged figures are those of the global batch
        for k in r1:
            if k != "seconds":
                assert r[k] == pytest.approx(r1[k], rel=1e-4, abs=1e-7), k
    rng = load_file(str(out / "checkpoints" / "step-000002" / "rng.safetensors"))
    assert set(rng) == {"generator", "generator.1", "torch_global"}  # every shard's stream, from both ranks


def test_dpo_resumes_under_ddp_after_one_rank_is_killed(tiny_base, single_align, tmp_path):
    out = tmp_path / "cut"
    launcher = subprocess.Popen(_torchrun(2, *_align_args(tiny_base, out, "--throttle", "1.0")), env=ENV, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_rank(launcher, 1, lambda: bool(list((out / "checkpoints").glob("step-*/state.json"))))
    assert not (out / "model.safetensors").exists(), "the run finished before it was killed"
    first = out / "checkpoints" / "step-000002" / "state.json"
    stamp = first.stat().st_mtime_ns
    _run(_torchrun(2, *_align_args(tiny_base, out)))
    assert first.stat().st_mtime_ns == stamp  # resumed from it (a fresh start would have rewritten it)
    _assert_same_weights(single_align, out)
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == [0, 2, 4]


def test_data_shards_are_checked_and_shard_streams_are_fixed(tiny_base, tmp_path):
    assert shard_sizes(8, 3) == [3, 3, 2] and shard_seed(7, 0) == 7
    assert shard_seed(7, 1) == shard_seed(7, 1) != shard_seed(7, 2) != shard_seed(8, 1)
    with pytest.raises(AlignmentError, match="data_shards=5 exceeds trajectories=4"):
        DPOConfig(**{**ALIGN, "data_shards": 5})
    policy, reference = tiny_model(), tiny_model()
    with pytest.raises(AlignmentError, match="data_shards=3 cannot be shared by 2 processes.*--data-shards 2"):
        train_dpo(policy, reference, KernelScheduler(training_scheduler_config()), get_reward("ink"),
                  DPOConfig(**{**ALIGN, "data_shards": 3}), out=tmp_path, sample_shape=(1, 8, 8),
                  cond_sampler=class_conditions, null_cond=torch.tensor([10]), context=DistContext(0, 2))
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_local_device_gives_each_process_its_gpu(monkeypatch):
    from msdda.distributed import local_device

    for var in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert local_device("cuda") == "cuda"  # one process: as given
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert [local_device(d) for d in ("cuda", "cuda:0", "cpu", "mps")] == ["cuda:3", "cuda:0", "cpu", "mps"]
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(DistributedError, match="LOCAL_RANK='x'"):
        local_device("cuda")
