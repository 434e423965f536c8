"""What a sampling run cost: model and reward evaluations, reward gradients, wall time, peak memory."""

from __future__ import annotations

import sys
import threading
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass
class Cost:
    """Counters one sampling run accumulates (per batch, not per sample).

    model_evals: network forwards (a batched CFG call counts 2: it does the work of two).
    reward_evals: reward calls on a batch; reward_grads: reward gradients w.r.t. x_t.
    peak_memory_bytes: the run's peak memory above what was allocated when it started (`PeakMemory`):
      on CUDA the caching allocator's peak of allocated bytes (exact, unless `peak_memory_bound`); on CPU
      the resident-set growth of the whole process (an upper bound on the run's own share when other
      threads allocate too); on MPS the Metal allocator's current allocation sampled every 50 ms (a lower
      bound). None when it could not be measured.
    peak_memory_bound: True when peak_memory_bytes is only an upper bound: on CUDA, the run never went above
      the peak the process had already reached (the allocator's peak counter is not reset, so a caller's
      own figures stay intact; then the run's peak is at most that earlier peak).
    """

    model_evals: int = 0
    reward_evals: int = 0
    reward_grads: int = 0
    seconds: float = 0.0
    peak_memory_bytes: int | None = None
    peak_memory_bound: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _max_rss_bytes() -> int | None:
    """The process's lifetime peak resident set (getrusage ru_maxrss: KiB on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    value = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return value if sys.platform == "darwin" else value * 1024


class PeakMemory:
    """Context manager measuring the peak memory growth of its block (see `Cost.peak_memory_bytes`).

    CUDA: reads `torch.cuda.max_memory_allocated` and `memory_allocated` at entry and exit and never resets
      the peak counter (the caller's statistics are left alone). A peak above the entry peak was reached
      inside the block: growth = that peak - allocated at entry, exact. Otherwise the block's peak is at most
      the entry peak: that bound is reported with `bound = True` (0 and exact when the entry peak was what
      was allocated, e.g. right after the caller's own reset). No thread, no device synchronisation.
    CPU: the resident set (psutil) at entry, every `interval_s` (50 ms) in a daemon thread, and at exit; and
      getrusage's lifetime peak at exit, exact whenever the block set a new lifetime peak. Overhead
      (measured on a busy 2-core machine): one ~8 us RSS read per 50 ms of run time (~0.02%; the earlier
      2 ms poll took the GIL 25x as often), and one thread start and join per block (~0.6 ms); the thread
      is stopped and joined on exit, also after an exception. Short peaks between polls that stay below
      the lifetime peak are missed (then the figure is a lower bound on the true growth).
    MPS: `torch.mps.current_allocated_memory()` polled the same way (a lower bound; Metal has no peak
      counter); None if this torch has no MPS memory query.
    Other devices: None.
    """

    def __init__(self, device: torch.device | str, interval_s: float = 0.05) -> None:
        self.device = torch.device(device)
        self.interval_s = float(interval_s)
        self.peak_bytes: int | None = None
        self.bound = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = 0
        self._max = 0
        self._entry_peak = 0
        self._entry_maxrss: int | None = None
        self._read: Any = None
        self._process: Any = None

    def _rss(self) -> int:
        return int(self._process.memory_info().rss)

    def _poll(self) -> None:
        # Event.wait, not time.sleep: __exit__ then returns at once instead of waiting out the interval.
        while not self._stop.wait(self.interval_s):
            self._max = max(self._max, self._read())

    def __enter__(self) -> PeakMemory:
        kind = self.device.type
        if kind == "cuda":
            self._entry_peak = int(torch.cuda.max_memory_allocated(self.device))
            self._start = int(torch.cuda.memory_allocated(self.device))
            return self
        if kind == "mps":
            query = getattr(getattr(torch, "mps", None), "current_allocated_memory", None)
            if query is None:
                return self
            self._read = lambda: int(query())
        elif kind == "cpu":
            try:
                import psutil  # a dependency of accelerate; imported lazily so the core stays light

                self._process = psutil.Process()  # one handle for every poll, not one per poll
                self._read = self._rss
            except ImportError:
                self._read = None
            self._entry_maxrss = _max_rss_bytes()
            if self._read is None:
                return self
        else:
            return self
        self._start = self._max = self._read()
        self._thread = threading.Thread(target=self._poll, name="msdda-peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        kind = self.device.type
        if kind == "cuda":
            peak = int(torch.cuda.max_memory_allocated(self.device))
            if peak > self._entry_peak:
                self.peak_bytes = peak - self._start
            else:  # the block stayed at or below the earlier peak: only a bound is known
                self.peak_bytes = max(self._entry_peak - self._start, 0)
                self.bound = self.peak_bytes > 0
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self._read is not None:
            self._max = max(self._max, self._read())
            if kind == "cpu" and self._entry_maxrss is not None:
                after = _max_rss_bytes()
                if after is not None and after > self._entry_maxrss:  # a new lifetime peak: reached in the block
                    self._max = max(self._max, after)
            self.peak_bytes = max(self._max - self._start, 0)
        elif kind == "cpu" and self._entry_maxrss is not None:  # no psutil: the lifetime peak's growth only
            after = _max_rss_bytes()
            self.peak_bytes = None if after is None else after - self._entry_maxrss
