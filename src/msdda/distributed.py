"""Multi-process runs: rank and world size from the launcher's environment, collectives through accelerate.

`msdda sweep` and `msdda align` run unchanged under `torchrun` or `accelerate launch`: `get_context()` reads
the launcher's environment (RANK / WORLD_SIZE / LOCAL_RANK from torchrun and accelerate; PMI_SIZE or
OMPI_COMM_WORLD_SIZE from mpirun) and, when more than one process was launched, lets accelerate's
`PartialState(cpu=True)` initialise the process group (gloo on CPU; MASTER_ADDR/MASTER_PORT from the
launcher). A plain `python`/`msdda` invocation gets the single-process context, which never imports
accelerate nor touches torch.distributed; every collective below is then a no-op.

The context is a small frozen value (rank, world size, local rank) with the few collectives the sweep and
the trainer need: a barrier, a float64 all-reduce sum, an object all-gather and broadcast, an "all ranks
agree or all fail" check (so a refusal on one rank ends every rank with the same typed error instead of a
hang), and `wrap_model`, which hands a module to `accelerate.Accelerator(cpu=True).prepare_model`
(DistributedDataParallel: gradients averaged over ranks in backward).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from msdda.errors import MSDDAError

logger = logging.getLogger(__name__)

# Environment variables launchers set to the number of processes (torchrun/accelerate; MPI flavours).
_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
T = TypeVar("T")


class DistributedError(MSDDAError):
    """A multi-process run is misconfigured (environment, process count) or one of its ranks refused."""


def launched_world_size() -> int:
    """Number of processes the launcher started, from the environment (1 when not launched)."""
    for var in _WORLD_SIZE_VARS:
        raw = os.environ.get(var)
        if raw is None or raw == "":
            continue
        try:
            value = int(raw)
        except ValueError as exc:
            raise DistributedError(f"{var}={raw!r} is not an integer; unset it or launch with torchrun") from exc
        if value < 1:
            raise DistributedError(f"{var}={value} must be >= 1; unset it or launch with torchrun")
        return value
    return 1


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a run: rank in [0, world_size), and the collectives over all ranks."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the one process that writes shared files: configs, logs, checkpoints, models)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part (collectives then communicate)."""
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.distributed:
            torch.distributed.barrier()

    def all_sum(self, values: Tensor) -> Tensor:
        """Element-wise sum over ranks of a float64 CPU tensor (a copy; the input is left alone)."""
        out = values.detach().to(dtype=torch.float64, device="cpu").clone()
        if self.distributed:
            torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
        return out

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """[obj of rank 0, obj of rank 1, ...] on every rank (objects are pickled between our own processes)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def check_all(self, error: str | None, error_type: Callable[[str], Exception] = DistributedError) -> None:
        """Every rank passes its error message (None if fine); if any rank has one, every rank raises it.

        A collective: all ranks must call it. The first failing rank's message is raised, prefixed with its
        rank when that is not this process, so a refusal on one rank never leaves the others in a hang.
        """
        messages = self.all_gather_objects(error)
        for rank, message in enumerate(messages):
            if message is not None:
                prefix = "" if rank == self.rank or not self.distributed else f"rank {rank}: "
                raise error_type(prefix + message)

    def call_checked(self, fn: Callable[[], T], error_type: Callable[[str], Exception] = DistributedError) -> T:
        """Run `fn` on this rank; if it raises on any rank, every rank raises (a collective).

        The failing rank re-raises its own exception; the others raise `error_type` naming that rank and
        its message. Use it around work whose failure must not leave the other ranks waiting forever.
        """
        failure: Exception | None = None
        result: Any = None
        try:
            result = fn()
        except Exception as exc:  # every rank must reach the collective below, whatever went wrong
            failure = exc
        messages = self.all_gather_objects(None if failure is None else f"{type(failure).__name__}: {failure}")
        if failure is not None:
            raise failure
        for rank, message in enumerate(messages):
            if message is not None:
                raise error_type(f"rank {rank} failed: {message}")
        return result

    def wrap_model(self, module: nn.Module) -> nn.Module:
        """The module as training sees it: itself on one process, DistributedDataParallel (through
        `accelerate.Accelerator(cpu=True).prepare_model`) on several, so backward averages gradients."""
        if not self.distributed:
            return module
        first = next(iter(module.parameters()), None)
        if first is not None and first.device.type != "cpu":
            # accelerate's cpu=True would move the module to the CPU; keep it where it is (gloo all-reduces
            # CUDA tensors too, so the process group the CPU collectives use serves it)
            from torch.nn.parallel import DistributedDataParallel

            ids = [first.device.index] if first.device.type == "cuda" and first.device.index is not None else None
            return DistributedDataParallel(module, device_ids=ids)
        from accelerate import Accelerator

        return Accelerator(cpu=True).prepare_model(module)


def get_context() -> DistContext:
    """The context of this process: single-process unless a launcher started several (see module docstring).

    Initialises the process group through accelerate on first use (idempotent afterwards). Raises
    DistributedError when several processes were launched but accelerate is not installed.
    """
    if launched_world_size() <= 1:
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and os.environ.get("MASTER_ADDR"):
            logger.warning(
                "accelerate launch --cpu started this as a single process (it spawns several CPU processes only "
                "through mpirun, --mpirun_hostfile); for N processes use `torchrun --nproc-per-node N` or "
                "`accelerate launch --multi_gpu --num_processes N` (they run on CPU with gloo)"
            )
        return DistContext()
    try:
        from accelerate import PartialState
    except ImportError as exc:
        raise DistributedError(
            f"{launched_world_size()} processes were launched but accelerate is not installed; "
            "pip install 'accelerate>=0.30' (or msdda[distributed]), or run a single process"
        ) from exc
    state = PartialState(cpu=True)
    ctx = DistContext(int(state.process_index), int(state.num_processes), int(state.local_process_index))
    logger.debug(
        "distributed context: rank %d of %d (local rank %d, backend %s)",
        ctx.rank,
        ctx.world_size,
        ctx.local_rank,
        state.backend,
    )
    return ctx


def local_device(device: str | torch.device) -> str:
    """The device this process should use: a bare "cuda" under a multi-process launch means this process's own
    GPU, cuda:LOCAL_RANK (one process per GPU, as torchrun and accelerate launch start them); anything else
    (cpu, mps, an explicit cuda:N) is taken as given."""
    name = str(device)
    if name == "cuda" and launched_world_size() > 1:
        raw = os.environ.get("LOCAL_RANK", "0")
        try:
            return f"cuda:{int(raw)}"
        except ValueError as exc:
            raise DistributedError(f"LOCAL_RANK={raw!r} is not an integer; launch with torchrun") from exc
    return name


def shutdown() -> None:
    """End a successful multi-process run cleanly: wait for every rank, then tear the process group down.

    A process that exits while a peer still holds a gloo connection to it can abort that peer, so the CLI
    calls this after a command succeeds (scripts that call `run_sweep` or `train_dpo` themselves under
    torchrun should too). Not for error paths: a rank that failed alone would wait here forever. A no-op
    when no process group was initialised.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
