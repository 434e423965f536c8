"""The peak-memory tracker of Cost: never resets the caller's CUDA statistics, cheap on CPU, thread stopped."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import msdda
from msdda import KernelScheduler, KernelSchedulerConfig, SingleModel
from msdda.sampling import cost as cost_mod
from msdda.sampling.cost import PeakMemory


def _tracker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "msdda-peak-memory"]


@pytest.fixture
def no_cuda_reset(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the tracker reset the caller's CUDA peak statistics")

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", refuse)


def test_cpu_tracker_sees_an_allocation_and_stops_its_thread(no_cuda_reset):
    with PeakMemory("cpu") as memory:
        assert len(_tracker_threads()) == 1
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        time.sleep(0.12)  # longer than two polls: seen by the thread even below the lifetime peak
        del block
    assert memory.peak_bytes is not None and memory.peak_bytes >= 32 * 2**20
    assert not memory.bound and memory._thread is None and not _tracker_threads()


def test_cpu_tracker_stops_its_thread_after_an_exception():
    with pytest.raises(RuntimeError, match="boom"), PeakMemory("cpu"):
        raise RuntimeError("boom")
    assert not _tracker_threads()


def test_sample_on_cpu_records_peak_memory_without_cuda_calls(no_cuda_reset, monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("a CPU run asked CUDA for memory statistics")

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", no_cuda)

    class Allocates(torch.nn.Module):
        def forward(self, x, t, cond=None):
            scratch = torch.ones(16 * 2**20 // 4)  # 16 MiB per call, freed again
            return 0.1 * x + 0 * scratch[0]

    out = msdda.sample(
        [Allocates()],
        KernelScheduler(KernelSchedulerConfig(kind="ddpm")),
        SingleModel(),
        shape=(2, 1, 4, 4),
        num_inference_steps=3,
        seed=0,
        progress=False,
    )
    assert isinstance(out.cost.peak_memory_bytes, int) and out.cost.peak_memory_bytes >= 0
    assert out.cost.peak_memory_bound is False and not _tracker_threads()
    assert set(out.cost.to_dict()) >= {"peak_memory_bytes", "peak_memory_bound"}


class _FakeCuda:
    """torch.cuda's allocator counters, scripted: `allocated` now, `peak` since the caller's last reset."""

    def __init__(self, monkeypatch, allocated: int, peak: int) -> None:
        self.allocated, self.peak = allocated, peak
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: self.allocated)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak)

    def allocate(self, n: int) -> None:
        self.allocated += n
        self.peak = max(self.peak, self.allocated)

    def free(self, n: int) -> None:
        self.allocated -= n


def test_cuda_peak_is_exact_above_the_earlier_peak_and_a_bound_below_it(no_cuda_reset, monkeypatch):
    cuda = _FakeCuda(monkeypatch, allocated=1000, peak=1500)  # the caller's own earlier peak: 1500
    with PeakMemory("cuda") as memory:
        cuda.allocate(800)  # reaches 1800 > 1500: the run set the peak
        cuda.free(800)
    assert memory.peak_bytes == 800 and not memory.bound and memory._thread is None
    assert cuda.peak == 1800  # the caller's statistics are what the allocator says, untouched
    with PeakMemory("cuda") as memory:
        cuda.allocate(300)  # 1300 < 1800: the run's own peak is unknown, at most 1800 - 1000
        cuda.free(300)
    assert memory.peak_bytes == 800 and memory.bound
    cuda.peak = cuda.allocated  # right after a reset by the caller: a run that allocates nothing is exactly 0
    with PeakMemory("cuda") as memory:
        pass
    assert memory.peak_bytes == 0 and not memory.bound


def test_mps_polls_the_metal_allocator(monkeypatch):
    current = [100]
    monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda: current[0], raising=False)
    with PeakMemory("mps") as memory:
        current[0] = 400
        time.sleep(0.12)
        current[0] = 150
    assert memory.peak_bytes == 300 and not _tracker_threads()
    monkeypatch.delattr(torch.mps, "current_allocated_memory")
    with PeakMemory("mps") as memory:
        pass
    assert memory.peak_bytes is None


def test_cpu_without_psutil_falls_back_to_the_lifetime_peak(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_psutil(name, *args, **kwargs):
        if name == "psutil":
            raise ImportError("no psutil here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_psutil)
    assert cost_mod._max_rss_bytes() is not None
    with PeakMemory("cpu") as memory:
        assert not _tracker_threads()
    assert memory.peak_bytes is not None and memory.peak_bytes >= 0


def test_report_leaves_bounded_peaks_out_of_the_mean():
    from msdda.evaluation.report import _cost

    def row(unit, peak, bound):
        cost = {"model_evals": 2, "seconds": 1.0, "peak_memory_bytes": peak, "peak_memory_bound": bound}
        return {"unit": unit, "method": "msdda", "batch": 2, "cost": cost, "train_seconds": None}

    out = _cost([row("a", 100, False), row("b", 900, True), row("c", 300, False)], ["msdda"])
    assert out["msdda"]["peak_memory_bytes"] == 200 and out["msdda"]["model_evals"] == 2
