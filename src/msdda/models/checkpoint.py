"""The one training checkpointer: weights, optimiser, random-number streams, step and JSON state.

A checkpoint is a directory ``<root>/step-NNNNNN/``::

    model.safetensors      the trained module's state dict (dtypes kept); ``<name>.safetensors`` for more
                           modules (e.g. ``ema.safetensors``)
    optimizer.safetensors  the optimiser's tensor state, named ``state.<param id>.<key>``
    rng.safetensors        every named torch.Generator's state, and the global CPU RNG (``torch_global``)
    state.json             {"step": int, "optimizer": {"param_groups": [...], "scalars": {...}},
                            "state": {...}}  (the caller's JSON state: config, elapsed time, log window)

It is written under a temp name (each file fsynced) and renamed into place, so a kill at any moment
leaves either the previous checkpoints or the new one, never a half-written one; the newest `keep` are
kept. Loading restores every tensor exactly (safetensors keeps dtypes and bits; floats in JSON
round-trip exactly), so a resumed run continues bit for bit as if it had not stopped.
Only safetensors and JSON are read; nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from msdda.atomic import replace_dir_atomic, write_bytes_atomic, write_json_atomic
from msdda.models.io import CheckpointError, check_state_matches, load_tensors, tensors_to_bytes

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
GLOBAL_RNG = "torch_global"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_RESERVED = {"step", "optimizer", "state"}  # top-level keys of state.json


@dataclass
class Checkpoint:
    """A loaded checkpoint: its directory, step and the caller's JSON state."""

    path: Path
    step: int
    state: dict[str, Any] = field(default_factory=dict)


def _module_file(name: str) -> str:
    return f"{name}.safetensors"


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimiser's state dict into named tensors and a JSON document (param groups, scalars)."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, Tensor):
                tensors[f"state.{pid}.{key}"] = val
            else:
                scalars.setdefault(str(pid), {})[key] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_files(
    optimizer: torch.optim.Optimizer, tensors: Mapping[str, Tensor], doc: Mapping[str, Any], source: Path
) -> None:
    """Inverse of `optimizer_to_files`: load the state into `optimizer` (CheckpointError if it does not fit)."""
    state: dict[int, dict[str, Any]] = {}
    try:
        for name, val in tensors.items():
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = val
        for pid, sc in doc["scalars"].items():
            state.setdefault(int(pid), {}).update(sc)
        # JSON turns tuples (Adam's betas) into lists; the optimiser's own code expects the tuple back
        groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in doc["param_groups"]]
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint {source} holds an optimiser state that does not fit this optimiser ({exc}); it was written "
            "for other parameters: rerun with the same options, or start over"
        ) from exc


class Checkpointer:
    """Save, list, load and prune training checkpoints under `root` (see the module docstring for the layout).

    keep: how many of the newest checkpoints `save` leaves (older ones are removed after each save).
    """

    def __init__(self, root: str | os.PathLike[str], keep: int = 2) -> None:
        if int(keep) < 1:
            raise CheckpointError(f"Checkpointer keep={keep!r} must be >= 1 (the newest checkpoint is always kept)")
        self.root = Path(root)
        self.keep = int(keep)

    def __repr__(self) -> str:
        return f"Checkpointer({str(self.root)!r}, keep={self.keep})"

    def path(self, step: int) -> Path:
        """The directory checkpoint `step` has (or would have)."""
        return self.root / f"step-{int(step):06d}"

    def list(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as (step, directory), oldest first (temp directories are never listed)."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / STATE_FILE).is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        found = self.list()
        return found[-1][1] if found else None

    def clear(self) -> None:
        """Remove every checkpoint (the whole root), e.g. before a fresh start."""
        shutil.rmtree(self.root, ignore_errors=True)

    def prune(self, keep: int | None = None) -> None:
        """Remove all but the newest `keep` (default self.keep) checkpoints."""
        keep = self.keep if keep is None else int(keep)
        for _, old in self.list()[: -keep if keep > 0 else None]:
            # renamed out of the listing first, so a kill during the removal never leaves a partial step-* dir
            trash = old.with_name(f".{old.name}.old")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(old, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def save(
        self,
        step: int,
        modules: Mapping[str, nn.Module],
        optimizer: torch.optim.Optimizer | None = None,
        generators: Mapping[str, torch.Generator] | None = None,
        state: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write checkpoint `step` atomically, then prune; returns its directory.

        modules: {name: module}, each saved as ``<name>.safetensors`` (the trained one as "model").
        generators: {name: generator} whose states are saved beside the global CPU RNG. state: the
        caller's JSON-serialisable state (config, elapsed seconds, running statistics).
        """
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-step-{int(step):06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name, module in modules.items():
            write_bytes_atomic(tmp / _module_file(name), tensors_to_bytes(module.state_dict()))
        opt_doc: dict[str, Any] = {}
        if optimizer is not None:
            tensors, opt_doc = optimizer_to_files(optimizer)
            write_bytes_atomic(tmp / OPTIMIZER_FILE, tensors_to_bytes(tensors))
        rng = {name: g.get_state() for name, g in (generators or {}).items()}
        if GLOBAL_RNG in rng:
            raise CheckpointError(f"generator name {GLOBAL_RNG!r} is reserved for the global RNG; rename it")
        rng[GLOBAL_RNG] = torch.get_rng_state()
        write_bytes_atomic(tmp / RNG_FILE, tensors_to_bytes(rng))
        doc = {"step": int(step), "optimizer": opt_doc, "state": dict(state or {})}
        write_json_atomic(tmp / STATE_FILE, doc, sort_keys=True)  # written last: marks the directory complete
        final = self.path(step)
        replace_dir_atomic(tmp, final)
        self.prune()
        logger.info("checkpoint written: %s", final)
        return final

    def read(self, path: str | os.PathLike[str]) -> Checkpoint:
        """Step and JSON state of the checkpoint at `path`, without loading tensors (CheckpointError if
        state.json is missing or unreadable)."""
        path = Path(path)
        try:
            doc = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
            step = int(doc["step"])
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"checkpoint {path} has an unreadable {STATE_FILE}: {exc}; delete it or pass --no-resume"
            ) from exc
        if "state" in doc:
            state = dict(doc["state"])
        else:  # the earlier layout kept the caller's keys beside step and optimizer
            state = {k: v for k, v in doc.items() if k not in _RESERVED}
        return Checkpoint(path=path, step=step, state=state)

    def load(
        self,
        path: str | os.PathLike[str],
        modules: Mapping[str, nn.Module],
        optimizer: torch.optim.Optimizer | None = None,
        generators: Mapping[str, torch.Generator] | None = None,
        validate: Callable[[Checkpoint], None] | None = None,
    ) -> Checkpoint:
        """Restore the checkpoint at `path` into `modules`, `optimizer`, `generators` and the global RNG.

        validate(checkpoint) runs on the JSON state before any tensor is touched (e.g. to refuse a
        checkpoint of another configuration by raising CheckpointError). Tensor names and shapes are
        checked against each module before loading. Returns the Checkpoint (step and JSON state).
        """
        path = Path(path)
        ckpt = self.read(path)
        if validate is not None:
            validate(ckpt)
        doc = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        for name, module in modules.items():
            source = path / _module_file(name)
            state = load_tensors(source)
            check_state_matches(module, state, source)
            module.load_state_dict(state)
        if optimizer is not None:
            optimizer_from_files(optimizer, load_tensors(path / OPTIMIZER_FILE), doc.get("optimizer", {}), path)
        rng = load_tensors(path / RNG_FILE)
        for name, g in (generators or {}).items():
            if name not in rng:
                have = sorted(k for k in rng if k != GLOBAL_RNG)
                raise CheckpointError(
                    f"checkpoint {path} holds no state for generator {name!r} (it has {have}); it was written by a "
                    "run with other options (e.g. another data_shards): rerun with the same options, or start over"
                )
            g.set_state(rng[name])
        if GLOBAL_RNG in rng:
            torch.set_rng_state(rng[GLOBAL_RNG])
        return ckpt

    def load_latest(
        self,
        modules: Mapping[str, nn.Module],
        optimizer: torch.optim.Optimizer | None = None,
        generators: Mapping[str, torch.Generator] | None = None,
        validate: Callable[[Checkpoint], None] | None = None,
    ) -> Checkpoint | None:
        """`load` the newest checkpoint, or return None when there is none."""
        latest = self.latest()
        return None if latest is None else self.load(latest, modules, optimizer, generators, validate)
