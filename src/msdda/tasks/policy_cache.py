"""A cache of weighted step-RL policies: one trained model folder per preference vector w (the "step-rl" method).

The expensive thing MSDDA claims to equal is one policy per w, trained by multi-objective step-level RL on
r_w = sum_k w_k r_k at beta_w (MSDDA.md §5). Such a policy is a pure function of its inputs, so it is trained
once and kept under a key: the sha256 of the canonical JSON of

    {key_version, task, sha256 of the base model.safetensors, objectives (in order), weights and betas (float
     repr), target beta, the trainer config the policy is trained with, kernel_offsets, offset_head_ranges and
     offset_head_x0 when set}

(trainer fields that do not change the trained weights, `IGNORED_CONFIG_FIELDS`, and fields at their default,
`PolicyKey.config_defaults`, are left out: a trainer option added later does not orphan the cache). A policy lives
in ``<root>/<key[:16]>/``: the model folder (model.safetensors + config.json) and ``policy.json``, which holds
the full key, its inputs and the training seconds. `PolicyCache.get` looks in a read-only shipped folder first,
then in the user cache root; a missing policy is trained (under a per-key file lock, into a temporary folder
renamed into place when complete, so two processes never train the same key and no reader sees half a
folder) or, with no trainer given, refused with `MissingPolicyError` naming the command that trains it.

The user cache root is ``$MSDDA_CACHE_DIR`` (default ``~/.cache/msdda``); each task keeps its policies in a
subfolder (digits: ``step-rl/digits``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msdda.atomic import replace_dir_atomic, write_json_atomic
from msdda.errors import MSDDAError
from msdda.sampling.methods import MissingPolicyError

__all__ = [
    "CACHE_ENV",
    "IGNORED_CONFIG_FIELDS",
    "KEY_VERSION",
    "POLICY_FILE",
    "CachedPolicy",
    "MissingPolicyError",
    "PolicyCache",
    "PolicyCacheError",
    "PolicyKey",
    "canonical_weights",
    "default_cache_root",
    "file_sha256",
]

logger = logging.getLogger(__name__)

CACHE_ENV = "MSDDA_CACHE_DIR"
POLICY_FILE = "policy.json"
# Trainer fields that never change the trained weights (logging and checkpoint bookkeeping).
IGNORED_CONFIG_FIELDS = frozenset({"log_every", "checkpoint_every", "keep_checkpoints"})
_PACKAGE = __name__.partition(".")[0]  # the cache folder's name: the package's
# Version of the key's canonical form. Version 2 leaves out trainer fields at their default (PolicyKey.
# config_defaults), so a trainer option added later, at a default that reproduces the old training, keeps every
# cached policy's key; changing an existing default must bump this (tests pin StepRLConfig's defaults).
KEY_VERSION = 2
KEY_CHARS = 16  # the folder name: the first 16 hex digits of the key (policy.json holds all 64)


class PolicyCacheError(MSDDAError):
    """A cached policy folder is unreadable or belongs to another key, or the weights name no objective."""


def default_cache_root() -> Path:
    """``$MSDDA_CACHE_DIR``, or ``~/.cache/msdda`` when it is unset or empty."""
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / _PACKAGE


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def canonical_weights(weights: Mapping[str, float], objectives: Sequence[str]) -> dict[str, float]:
    """The weights in `objectives` order with zero weights dropped: w and the same w with extra zeros name one
    policy (sum_k w_k r_k is the same reward). PolicyCacheError for a name not in `objectives` or a bad value."""
    unknown = sorted(str(k) for k in weights if k not in objectives)
    if unknown:
        raise PolicyCacheError(f"weights name unknown objective(s) {unknown}; valid: {list(objectives)}")
    out: dict[str, float] = {}
    for o in objectives:
        if o not in weights:
            continue
        v = float(weights[o])
        if not math.isfinite(v):
            raise PolicyCacheError(f"weight {v} for {o!r} is not finite")
        if v != 0.0:
            out[o] = v
    if not out:
        raise PolicyCacheError(f"weights {dict(weights)} are all zero; a step-RL policy needs a non-zero weight")
    return out


@dataclass(frozen=True)
class PolicyKey:
    """What a weighted policy is a function of (module docstring). `digest` is its cache key."""

    task: str
    base_sha256: str
    objectives: tuple[str, ...]
    weights: tuple[float, ...]
    betas: tuple[float, ...]
    beta: float
    trainer_config: Mapping[str, Any] = field(hash=False)
    kernel_offsets: bool = False
    offset_head_ranges: tuple[int, ...] = ()
    offset_head_x0: bool = False
    config_defaults: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def inputs(self) -> dict[str, Any]:
        """The key's inputs as canonical JSON-able values (floats as their repr; ignored fields and fields at
        their `config_defaults` value dropped)."""
        missing = object()
        config = {
            k: v
            for k, v in sorted(self.trainer_config.items())
            if k not in IGNORED_CONFIG_FIELDS and self.config_defaults.get(k, missing) != v
        }
        return {
            "key_version": KEY_VERSION,
            "task": self.task,
            "base_sha256": self.base_sha256,
            "objectives": list(self.objectives),
            "weights": [repr(float(w)) for w in self.weights],
            "betas": [repr(float(b)) for b in self.betas],
            "beta": repr(float(self.beta)),
            "trainer_config": config,
            "kernel_offsets": bool(self.kernel_offsets),
            # only when set, so keys of policies with one offset head stay what they were
            **({"offset_head_ranges": [int(b) for b in self.offset_head_ranges]} if self.offset_head_ranges else {}),
            **({"offset_head_x0": True} if self.offset_head_x0 else {}),
        }

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON of `inputs()` (sorted keys, no spaces)."""
        text = json.dumps(self.inputs(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def short(self) -> str:
        """The folder name: the first 16 hex digits of the digest."""
        return self.digest[:KEY_CHARS]

    def describe(self) -> str:
        """'w = 0.25*ink + 0.75*template, beta 0.05' for messages."""
        w = " + ".join(f"{v:g}*{o}" for o, v in zip(self.objectives, self.weights, strict=True))
        return f"w = {w}, beta {self.beta:g}"


@dataclass
class CachedPolicy:
    """A policy folder found or trained by the cache.

    directory: the model folder; key: the full digest; train_seconds: what its training took (wall seconds, as
    recorded when it was trained); source: "shipped", "cache" or "trained" (by this call); record: policy.json.
    """

    directory: Path
    key: str
    train_seconds: float | None
    source: str
    record: dict[str, Any]

    @property
    def trained(self) -> bool:
        return self.source == "trained"


# (folder to train into) -> (train seconds, extra fields for policy.json)
TrainFn = Callable[[Path], tuple[float, Mapping[str, Any]]]


class PolicyCache:
    """Policy folders under `root` (read-write) and `shipped` (read-only, may be absent), keyed by PolicyKey."""

    def __init__(self, root: str | os.PathLike[str], shipped: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root)
        self.shipped = Path(shipped) if shipped is not None else None

    def _read(self, directory: Path, key: PolicyKey) -> dict[str, Any] | None:
        path = directory / POLICY_FILE
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PolicyCacheError(
                f"{path} is unreadable or not JSON ({exc}); remove {directory} and the policy is trained again"
            ) from None
        if not isinstance(record, dict) or record.get("key") != key.digest:
            raise PolicyCacheError(
                f"{directory} holds the policy of another key ({record.get('key') if isinstance(record, dict) else '?'}"
                f", not {key.digest}); remove that folder and the policy is trained again"
            )
        return record

    def find(self, key: PolicyKey) -> CachedPolicy | None:
        """The folder of `key` (shipped first, then the cache root), or None when neither holds it."""
        for base, source in ((self.shipped, "shipped"), (self.root, "cache")):
            if base is None:
                continue
            directory = base / key.short
            record = self._read(directory, key)
            if record is not None:
                seconds = record.get("train_seconds")
                return CachedPolicy(
                    directory, key.digest, float(seconds) if seconds is not None else None, source, record
                )
        return None

    @contextlib.contextmanager
    def _lock(self, key: PolicyKey) -> Iterator[None]:
        """An exclusive flock on ``<root>/.<key16>.lock`` (waits for another holder; freed on any exit)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / f".{key.short}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                logger.info("another process is training the step-RL policy %s; waiting for it", key.short)
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def get(self, key: PolicyKey, train: TrainFn | None, *, command: str) -> CachedPolicy:
        """The policy of `key`: found, or trained with `train(folder)` when it is not None.

        train=None and no such policy: MissingPolicyError naming `command`, the command that trains it.
        """
        found = self.find(key)
        if found is not None:
            return found
        if train is None:
            raise MissingPolicyError(
                f"no step-RL policy for {key.describe()} (key {key.short}) in {self.root}"
                + (f" or {self.shipped}" if self.shipped is not None else "")
                + f"; train it first with `{command}` (minutes on CPU), or allow training on first use"
            )
        with self._lock(key):
            found = self.find(key)  # another process may have trained it while this one waited
            if found is not None:
                return found
            final = self.root / key.short
            partial = self.root / f".{key.short}.partial"  # a killed run resumes from its checkpoints
            logger.info(
                "training the step-RL policy for %s into %s; this takes minutes (one training run per w)",
                key.describe(),
                final,
            )
            start = time.perf_counter()
            seconds, extra = train(partial)
            record = {
                "key": key.digest,
                "inputs": key.inputs(),
                "train_seconds": float(seconds),
                "wall_seconds": time.perf_counter() - start,
                "trained_at": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                **dict(extra),
            }
            shutil.rmtree(partial / "checkpoints", ignore_errors=True)  # resumable state, not needed once done
            write_json_atomic(partial / POLICY_FILE, record, sort_keys=True)
            replace_dir_atomic(partial, final)
        return CachedPolicy(final, key.digest, float(seconds), "trained", record)
