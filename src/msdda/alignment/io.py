"""Model and checkpoint files: safetensors tensors plus a JSON document, always written atomically.

A *model directory* holds ``model.safetensors`` and ``config.json``::

    {"model_type": "...", "task": "...", "architecture": {...}, "scheduler": {...}, "metadata": {...}}

`read_model_dir` checks model type, task and architecture against what the caller expects, and the
tensor names and shapes against the module, before any weights are used, so a checkpoint of another
architecture or task fails with a clear error instead of a shape error half-way through sampling.
Only safetensors are read; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from msdda.alignment.errors import CheckpointError
from msdda.atomic import write_bytes_atomic, write_json_atomic
from msdda.models.state import state_mismatches

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temp file beside `path`, then rename: never a half-written file."""
    write_bytes_atomic(path, data)


def atomic_write_json(path: Path, data: Any) -> None:
    """JSON (indented, sorted keys) written atomically."""
    write_json_atomic(path, data, sort_keys=True)


def tensors_to_bytes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise named tensors (moved to CPU, made contiguous) to safetensors bytes."""
    from safetensors.torch import save

    state = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return save(state, metadata=dict(metadata) if metadata else None)


def load_tensors(path: Path) -> dict[str, Tensor]:
    """Read a safetensors file; CheckpointError naming the path if it is missing or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; check the directory or create it with the training command")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file: {exc}") from exc


def save_model_dir(
    module: nn.Module,
    directory: Path,
    *,
    model_type: str,
    task: str,
    architecture: Mapping[str, Any],
    scheduler: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save `module`'s float32 state dict and its description into `directory` (each file atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in module.state_dict().items()}
    atomic_write_bytes(directory / WEIGHTS_FILE, tensors_to_bytes(state, {"model_type": model_type, "task": task}))
    doc = {
        "model_type": model_type,
        "task": task,
        "architecture": dict(architecture),
        "scheduler": dict(scheduler or {}),
        "metadata": dict(metadata or {}),
    }
    atomic_write_json(directory / CONFIG_FILE, doc)
    return directory


def read_model_config(directory: Path) -> dict[str, Any]:
    """The config.json document of a model directory (CheckpointError if missing or not JSON)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} does not exist; {directory} is not a model directory (expected {WEIGHTS_FILE} + {CONFIG_FILE})"
        )
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is unreadable or not valid JSON: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("architecture"), dict):
        raise CheckpointError(f"{path} is not a model config (needs 'model_type', 'task' and an 'architecture' object)")
    return doc


def check_model_config(
    doc: Mapping[str, Any],
    directory: Path,
    *,
    model_type: str,
    task: str,
    architecture: Mapping[str, Any] | None = None,
) -> None:
    """Raise CheckpointError unless the document's model type, task (and architecture, if given) match."""
    if doc.get("model_type") != model_type:
        raise CheckpointError(
            f"{directory} holds a {doc.get('model_type')!r} model, expected {model_type!r}; pass a directory "
            f"written for this model type"
        )
    if doc.get("task") != task:
        raise CheckpointError(
            f"{directory} was trained for task {doc.get('task')!r}, not {task!r}; pass weights of the {task!r} task"
        )
    if architecture is not None:
        got = dict(doc["architecture"])
        want = dict(architecture)
        diff = {k: (want.get(k), got.get(k)) for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)}
        if diff:
            shown = ", ".join(f"{k}: expected {e!r}, file has {g!r}" for k, (e, g) in diff.items())
            raise CheckpointError(
                f"{directory} has another architecture than the reference model ({shown}); all models fused or "
                "compared must share one architecture: retrain it from the same base"
            )


def check_state_matches(module: nn.Module, state: Mapping[str, Tensor], source: Path) -> None:
    """CheckpointError naming missing/unexpected tensors and shape mismatches between `state` and `module`."""
    parts = state_mismatches(module, state)
    if parts:
        raise CheckpointError(f"{source} does not match the model architecture: " + "; ".join(parts))


def load_state_into(module: nn.Module, path: Path) -> None:
    """Load a safetensors state dict into `module` after checking names and shapes."""
    state = load_tensors(path)
    check_state_matches(module, state, path)
    module.load_state_dict(state)


def replace_dir_atomic(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written `tmp_dir` to `final_dir` (replacing an old one) with a rename."""
    final_dir = Path(final_dir)
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
