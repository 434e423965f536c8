"""The one model-folder format: ``model.safetensors`` plus ``config.json``, each written atomically.

Every trained model the package saves (digits denoisers, the digits classifier, DPO results) is a folder::

    model.safetensors   float32 state dict (safetensors metadata: model_type, task)
    config.json         {"model_type": "...", "task": "...", "architecture": {...}, "scheduler": {...},
                         "metadata": {...}}

`save_pretrained` writes one; `from_pretrained` reads one back: it checks model type, task and (when
given) architecture against what the caller expects, builds the module from the architecture, and checks
the tensor names and shapes against the module before loading, so a folder of another architecture or
task fails with a clear `CheckpointError` instead of a shape error half-way through sampling.
Only safetensors are read; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from msdda.atomic import write_bytes_atomic, write_json_atomic
from msdda.errors import MSDDAError
from msdda.models.state import state_mismatches

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

M = TypeVar("M", bound=nn.Module)


class CheckpointError(MSDDAError):
    """A model or checkpoint directory is missing, corrupt, or belongs to another task or architecture."""


def tensors_to_bytes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise named tensors (moved to CPU, made contiguous, dtype kept) to safetensors bytes."""
    from safetensors.torch import save

    state = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return save(state, metadata=dict(metadata) if metadata else None)


def load_tensors(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Read a safetensors file; CheckpointError naming the path if it is missing or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; check the directory or create it with the training command")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file: {exc}") from exc


def save_pretrained(
    module: nn.Module,
    directory: str | os.PathLike[str],
    *,
    model_type: str,
    task: str,
    architecture: Mapping[str, Any],
    scheduler: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save `module`'s float32 state dict and its description into `directory` (each file atomically).

    architecture: the JSON config the module is rebuilt from; scheduler: the noise schedule's config
    (empty for models that are not denoisers); metadata: anything JSON-serialisable (training config,
    final figures). Returns the directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in module.state_dict().items()}
    write_bytes_atomic(directory / WEIGHTS_FILE, tensors_to_bytes(state, {"model_type": model_type, "task": task}))
    doc = {
        "model_type": model_type,
        "task": task,
        "architecture": dict(architecture),
        "scheduler": dict(scheduler or {}),
        "metadata": dict(metadata or {}),
    }
    write_json_atomic(directory / CONFIG_FILE, doc, sort_keys=True)
    return directory


def read_config_document(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The parsed config.json of `directory`, whatever its layout (CheckpointError if missing or not a JSON
    object). Most callers want `read_model_config`, which also checks the layout."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} does not exist; {directory} is not a model directory (expected {WEIGHTS_FILE} + {CONFIG_FILE})"
        )
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is unreadable or not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path} is not a model config: expected a JSON object, got {type(doc).__name__}")
    return doc


def check_layout(doc: Mapping[str, Any], directory: str | os.PathLike[str]) -> None:
    """CheckpointError unless `doc` has the model-folder layout (model_type, task, an architecture object)."""
    if not isinstance(doc.get("architecture"), dict):
        raise CheckpointError(
            f"{Path(directory) / CONFIG_FILE} is not a model config (needs 'model_type', 'task' and an "
            "'architecture' object)"
        )


def read_model_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The config.json document of a model directory (CheckpointError if missing, not JSON or another layout)."""
    doc = read_config_document(directory)
    check_layout(doc, directory)
    return doc


def check_model_config(
    doc: Mapping[str, Any],
    directory: str | os.PathLike[str],
    *,
    model_type: str,
    task: str,
    architecture: Mapping[str, Any] | None = None,
) -> None:
    """Raise CheckpointError unless the document's model type, task (and architecture, if given) match."""
    check_layout(doc, directory)
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


def check_state_matches(module: nn.Module, state: Mapping[str, Tensor], source: str | os.PathLike[str]) -> None:
    """CheckpointError naming missing/unexpected tensors and shape mismatches between `state` and `module`."""
    parts = state_mismatches(module, state)
    if parts:
        raise CheckpointError(f"{source} does not match the model architecture: " + "; ".join(parts))


def load_state_into(module: nn.Module, path: str | os.PathLike[str], device: str | torch.device = "cpu") -> None:
    """Load a safetensors state dict into `module` after checking names and shapes (CheckpointError)."""
    state = load_tensors(path, device=device)
    check_state_matches(module, state, path)
    module.load_state_dict(state)


def from_pretrained(
    directory: str | os.PathLike[str],
    build: Callable[[dict[str, Any]], M],
    *,
    model_type: str,
    task: str,
    architecture: Mapping[str, Any] | None = None,
    document: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    freeze: bool = True,
) -> tuple[M, dict[str, Any]]:
    """Load the model folder `directory`: (module in eval mode on `device`, its config document).

    build(architecture dict) -> module constructs the (untrained) module; errors it raises propagate.
    Checks model type, task and, when `architecture` is given, that the stored one equals it, all before
    building anything; then the tensor names and shapes before loading. document: an already read (and
    possibly upgraded from an older layout) config document, instead of reading config.json again.
    freeze: also set requires_grad=False on every weight (models used as fixed references).
    """
    directory = Path(directory)
    doc = dict(document) if document is not None else read_model_config(directory)
    check_model_config(doc, directory, model_type=model_type, task=task, architecture=architecture)
    module = build(dict(doc["architecture"]))
    load_state_into(module, directory / WEIGHTS_FILE, device=device)
    module.to(device)
    module.eval()
    if freeze:
        module.requires_grad_(False)
    return module, doc
