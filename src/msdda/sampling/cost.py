"""What a sampling run cost: model and reward evaluations, reward gradients, wall time, peak memory."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass
class Cost:
    """Counters one sampling run accumulates (per batch, not per sample).

    model_evals: network forwards (a batched CFG call counts 2: it does the work of two).
    reward_evals: reward calls on a batch; reward_grads: reward gradients w.r.t. x_t.
    peak_memory_bytes: on CUDA the allocator's peak during the run; on CPU the peak resident-set growth
      over the run, sampled every few milliseconds (process-wide, so an upper bound).
    """

    model_evals: int = 0
    reward_evals: int = 0
    reward_grads: int = 0
    seconds: float = 0.0
    peak_memory_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PeakMemory:
    """Context manager measuring peak memory growth of the block (see `Cost.peak_memory_bytes`)."""

    def __init__(self, device: torch.device | str, interval_s: float = 0.002) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_rss = 0
        self._max_rss = 0
        self._process: Any = None

    def _rss(self) -> int:
        if self._process is None:
            import psutil  # a dependency of accelerate; imported lazily so the core stays light

            self._process = psutil.Process()  # one handle for every poll, not one per poll
        return int(self._process.memory_info().rss)

    def _poll(self) -> None:
        # Event.wait, not time.sleep: __exit__ then returns at once instead of waiting out the interval.
        while not self._stop.wait(self.interval_s):
            self._max_rss = max(self._max_rss, self._rss())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_rss = torch.cuda.memory_allocated(self.device)
            return self
        try:
            self._start_rss = self._max_rss = self._rss()
        except ImportError:
            return self
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device) - self._start_rss)
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._max_rss = max(self._max_rss, self._rss())
            self.peak_bytes = self._max_rss - self._start_rss
