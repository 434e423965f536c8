"""Digits step-RL policies per preference vector w: the expensive baseline MSDDA claims to equal (method "step-rl").

`DigitsStepRLPolicies` is the digits bundle's `weighted_policy`: called with weights {objective: w} and the target
KL strength beta it returns the policy trained by `StepRLTrainer` on r_w = sum_k w_k r_k at beta, from the shipped
folder ``<package>/weights/digits/step-rl/`` (read-only; may be empty), the user cache
``$MSDDA_CACHE_DIR/step-rl/digits`` (default ``~/.cache/msdda/step-rl/digits``), or trained on first use (minutes on
CPU, with a progress bar; `msdda train-step-rl` trains a whole grid ahead of time). See msdda.tasks.policy_cache
for the key and the folder layout.

The trainer config of a policy is the aligned models' own (their config.json "dpo_config"; every objective of w
must agree on everything but reward and beta): the fields every step trainer shares (steps, lr, trajectories,
states_per_trajectory, guidance_scale, num_inference_steps, seed, ...) are copied, the step-RL fields (estimator,
samples) too when the aligned models were trained with step-RL, else they keep the StepRLConfig defaults (policy.json
says which). reward is "w1*name1+w2*name2", beta the target, reward_weights w; the policy has a kernel-offset head
when the aligned models do. For a one-hot w the aligned model itself is returned when it was trained with step-RL at
the target beta (it then IS that policy); otherwise it is trained like any other w.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from msdda.alignment.step_rl import StepRLConfig, weighted_reward
from msdda.alignment.trainer import StepTrainerConfig
from msdda.distributed import get_context
from msdda.models.io import WEIGHTS_FILE, read_model_config
from msdda.sampling.methods import STEP_RL, WeightedPolicy
from msdda.tasks.digits.training import align_digits, load_digits_model, weights_root
from msdda.tasks.policy_cache import (
    CachedPolicy,
    PolicyCache,
    PolicyCacheError,
    PolicyKey,
    canonical_weights,
    default_cache_root,
    file_sha256,
)
from msdda.tasks.rewards import get_reward

__all__ = [
    "DigitsStepRLPolicies",
    "PolicyEntry",
    "default_policies_dir",
    "shipped_policies_dir",
    "step_rl_config_for",
]

logger = logging.getLogger(__name__)

TASK = "digits"
# Fields a weighted policy never takes from the aligned models' config: they are set from w and the target beta.
_PER_W_FIELDS = ("reward", "beta", "reward_weights")
_STEP_FIELDS = {f.name for f in dataclasses.fields(StepTrainerConfig)}
_STEP_RL_FIELDS = {f.name for f in dataclasses.fields(StepRLConfig)}


def shipped_policies_dir() -> Path:
    """``<package>/weights/digits/step-rl`` (read-only; nothing is shipped there unless a release adds it)."""
    return weights_root() / STEP_RL


def default_policies_dir() -> Path:
    """``$MSDDA_CACHE_DIR/step-rl/digits`` (default ``~/.cache/msdda/step-rl/digits``)."""
    return default_cache_root() / STEP_RL / TASK


@dataclass
class PolicyEntry:
    """One w's policy without loading it: weights (canonical, zeros dropped), key (cache digest, or the aligned
    model's folder), directory, train_seconds, status ("aligned", "shipped", "cache" or "trained")."""

    weights: dict[str, float]
    key: str
    directory: Path
    train_seconds: float | None
    status: str


def _trainer_of(doc: Mapping[str, Any]) -> str:
    """The trainer an aligned model was made with ("step-rl", "bt", "hard", ...; older folders: from the config)."""
    meta = doc.get("metadata", {})
    trainer = meta.get("trainer")
    if isinstance(trainer, str) and trainer:
        return trainer
    labels = (meta.get("dpo_config") or {}).get("labels")
    return str(labels) if labels else "hard"  # folders made before `labels` existed used best-vs-worst labels


def step_rl_config_for(
    docs: Mapping[str, Mapping[str, Any]],
    weights: Mapping[str, float],
    beta: float,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[StepRLConfig, dict[str, Any]]:
    """The StepRLConfig of the policy at `weights` (canonical, in order) and `beta`, from the aligned models'
    config documents `docs[objective]`; returns (config, notes for policy.json). PolicyCacheError when the
    objectives' configs differ in anything but reward and beta, or an override names a per-w or unknown field."""
    objectives = list(weights)
    first = objectives[0]
    configs = {o: dict((docs[o].get("metadata") or {}).get("dpo_config") or {}) for o in objectives}
    trainers = {o: _trainer_of(docs[o]) for o in objectives}
    if not configs[first]:
        raise PolicyCacheError(
            f"the aligned model of {first!r} records no trainer config (metadata 'dpo_config' in its config.json); "
            "retrain it with `msdda align` so its step-RL policies can be trained with the same settings"
        )
    # Bookkeeping fields (checkpoint and log cadence) never change the trained weights: they may differ.
    ignored = {"reward", "beta", "checkpoint_every", "keep_checkpoints", "log_every"}
    for o in objectives[1:]:
        a = {k: v for k, v in configs[first].items() if k not in ignored}
        b = {k: v for k, v in configs[o].items() if k not in ignored}
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff or trainers[o] != trainers[first]:
            shown = diff or ["trainer"]
            raise PolicyCacheError(
                f"the aligned models of {first!r} and {o!r} were trained with different settings ({shown}); a "
                "step-RL policy per w copies one trainer config, so align every objective with the same settings"
            )
    trainer = trainers[first]
    shared = _STEP_RL_FIELDS if trainer == STEP_RL else _STEP_FIELDS
    fields = {k: v for k, v in configs[first].items() if k in shared and k not in _PER_W_FIELDS}
    copied = sorted(fields)
    bad = sorted(k for k in (overrides or {}) if k in _PER_W_FIELDS or k not in _STEP_RL_FIELDS)
    if bad:
        raise PolicyCacheError(
            f"trainer_overrides name {bad}; override StepRLConfig fields other than {list(_PER_W_FIELDS)} "
            f"(valid: {sorted(_STEP_RL_FIELDS - set(_PER_W_FIELDS))})"
        )
    fields.update(overrides or {})
    w = [float(weights[o]) for o in objectives]
    name = weighted_reward([get_reward(o) for o in objectives], w).name  # type: ignore[attr-defined]
    config = StepRLConfig(**fields, reward=name, beta=float(beta), reward_weights=w)
    notes = {
        "aligned_trainer": trainer,
        "config_source": (
            "the aligned models' step-RL config"
            if trainer == STEP_RL
            else f"the aligned models were trained with {trainer!r}: the fields every step trainer shares are "
            f"copied from their config, the step-RL fields (estimator, samples) are StepRLConfig defaults"
        ),
        "copied_fields": copied,
        "trainer_overrides": dict(overrides or {}),
    }
    return config, notes


class DigitsStepRLPolicies:
    """The digits bundle's `weighted_policy(weights, beta, *, train=None) -> WeightedPolicy` (module docstring).

    base_dir: the reference model's folder; aligned_dirs: {objective: folder}; betas: the objectives' KL strengths;
    aligned: the loaded aligned models (returned for a one-hot w when they are that policy). cache_dir: the folder
    holding the policies (default `default_policies_dir()`); shipped: the read-only folder searched first (default
    `shipped_policies_dir()`). train: train a missing policy on first use (False: MissingPolicyError naming
    `msdda train-step-rl`); trainer_overrides: StepRLConfig fields replacing the aligned models' (e.g.
    {"steps": 2} in tests; they enter the key). rewards: {objective: reward} (default get_reward(objective)).
    aligned_train_seconds: {objective: seconds} each aligned model's training took (its config.json).
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        aligned_dirs: Mapping[str, str | os.PathLike[str]],
        betas: Mapping[str, float],
        *,
        objectives: Sequence[str] | None = None,
        aligned: Mapping[str, nn.Module] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        shipped: str | os.PathLike[str] | None = None,
        train: bool = True,
        trainer_overrides: Mapping[str, Any] | None = None,
        rewards: Mapping[str, Callable[..., Any]] | None = None,
        progress: bool = True,
    ) -> None:
        self.objectives = list(objectives) if objectives is not None else list(aligned_dirs)
        missing = [o for o in self.objectives if o not in aligned_dirs or o not in betas]
        if missing:
            raise PolicyCacheError(f"no aligned folder or beta for {missing}; pass aligned_dirs and betas for each")
        self.base_dir = Path(base_dir)
        self.aligned_dirs = {o: Path(aligned_dirs[o]) for o in self.objectives}
        self.betas = {o: float(betas[o]) for o in self.objectives}
        self.aligned = dict(aligned or {})
        self.cache = PolicyCache(
            Path(cache_dir) if cache_dir is not None else default_policies_dir(),
            Path(shipped) if shipped is not None else shipped_policies_dir(),
        )
        self.train = bool(train)
        self.trainer_overrides = dict(trainer_overrides or {})
        self.rewards = dict(rewards or {})
        self.progress = progress
        self._docs: dict[str, dict[str, Any]] = {}
        self._base_sha: str | None = None
        self._memo: dict[str, WeightedPolicy] = {}
        self.aligned_train_seconds: dict[str, float] = {}
        for o in self.objectives:
            seconds = self.doc(o).get("metadata", {}).get("train_seconds")
            if isinstance(seconds, int | float) and not isinstance(seconds, bool):
                self.aligned_train_seconds[o] = float(seconds)

    # ----- the key ------------------------------------------------------------------------------------------
    def doc(self, objective: str) -> dict[str, Any]:
        """The config.json document of an objective's aligned model (read once)."""
        if objective not in self._docs:
            self._docs[objective] = read_model_config(self.aligned_dirs[objective])
        return self._docs[objective]

    def base_sha256(self) -> str:
        if self._base_sha is None:
            self._base_sha = file_sha256(self.base_dir / WEIGHTS_FILE)
        return self._base_sha

    def _offset_head(self, objectives: Sequence[str]) -> tuple[bool, tuple[int, ...], bool]:
        """(kernel_offsets, offset_head_ranges, offset_head_x0) of the aligned models of `objectives`, which must
        agree: the policy gets the same offset head."""

        def layout(o: str) -> tuple[bool, tuple[int, ...], bool]:
            arch = self.doc(o).get("architecture", {})
            ranges = tuple(int(b) for b in arch.get("offset_head_ranges", ()))
            return bool(arch.get("kernel_offsets", False)), ranges, bool(arch.get("offset_head_x0", False))

        layouts = {o: layout(o) for o in objectives}
        if len(set(layouts.values())) > 1:
            raise PolicyCacheError(
                "the aligned models differ in their offset head (kernel_offsets, offset_head_ranges, offset_head_x0: "
                f"{layouts}); align every objective the same way"
            )
        return next(iter(layouts.values()))

    def resolve(self, weights: Mapping[str, float], beta: float) -> tuple[dict[str, float], StepRLConfig, PolicyKey]:
        """(canonical weights, trainer config, key) of the policy at `weights` and target `beta`."""
        if not (isinstance(beta, int | float) and math.isfinite(beta) and beta > 0):
            raise PolicyCacheError(f"beta={beta!r}; the target KL strength must be a finite number > 0")
        w = canonical_weights(weights, self.objectives)
        docs = {o: self.doc(o) for o in w}
        config, _ = step_rl_config_for(docs, w, beta, self.trainer_overrides)
        offsets, ranges, x0_input = self._offset_head(list(w))
        key = PolicyKey(
            task=TASK,
            base_sha256=self.base_sha256(),
            objectives=tuple(w),
            weights=tuple(w.values()),
            betas=tuple(self.betas[o] for o in w),
            beta=float(beta),
            trainer_config=config.to_dict(),
            kernel_offsets=offsets,
            offset_head_ranges=ranges,
            offset_head_x0=x0_input,
            config_defaults=StepRLConfig().to_dict(),
        )
        return w, config, key

    def command(self, weights: Mapping[str, float]) -> str:
        """The explicit command that trains the policy at `weights`."""
        objs = ",".join(weights)
        vals = ",".join(f"{v:g}" for v in weights.values())
        extra = "" if self.cache.root == default_policies_dir() else f" --cache-dir {self.cache.root}"
        return f"msdda train-step-rl --task digits --objectives {objs} --weights {vals}{extra}"

    def _aligned_is_policy(self, w: Mapping[str, float], beta: float) -> str | None:
        """The objective whose aligned model IS the policy at a one-hot w (step-RL trained at this beta), or None."""
        if len(w) != 1 or next(iter(w.values())) != 1.0 or self.trainer_overrides:
            return None
        o = next(iter(w))
        doc = self.doc(o)
        trained_beta = (doc.get("metadata", {}).get("dpo_config") or {}).get("beta")
        if _trainer_of(doc) != STEP_RL or not isinstance(trained_beta, int | float):
            return None
        return o if math.isclose(float(trained_beta), float(beta), rel_tol=1e-12, abs_tol=0.0) else None

    # ----- finding, training, loading ------------------------------------------------------------------------
    def ensure(self, weights: Mapping[str, float], beta: float, *, train: bool | None = None) -> PolicyEntry:
        """Find (or train, unless train=False) the policy at `weights` and `beta` without loading it."""
        train = self.train if train is None else train
        w, config, key = self.resolve(weights, beta)
        aligned = self._aligned_is_policy(w, beta)
        if aligned is not None:
            seconds = self.aligned_train_seconds.get(aligned)
            return PolicyEntry(w, str(self.aligned_dirs[aligned]), self.aligned_dirs[aligned], seconds, "aligned")
        found: CachedPolicy | None = self.cache.find(key)
        if found is None:
            trainer = None
            if train:
                if get_context().distributed:
                    raise PolicyCacheError(
                        f"the step-RL policy for {key.describe()} is not trained, and it is not trained inside a "
                        f"multi-process run; train it first with `{self.command(w)}`"
                    )
                trainer = self._trainer(w, config, key)
            found = self.cache.get(key, trainer, command=self.command(w))
        return PolicyEntry(w, found.key, found.directory, found.train_seconds, found.source)

    def _trainer(
        self, w: Mapping[str, float], config: StepRLConfig, key: PolicyKey
    ) -> Callable[[Path], tuple[float, Mapping[str, Any]]]:
        def train(folder: Path) -> tuple[float, Mapping[str, Any]]:
            _, notes = step_rl_config_for({o: self.doc(o) for o in w}, w, key.beta, self.trainer_overrides)
            rewards = [self.rewards[o] if o in self.rewards else get_reward(o) for o in w]
            with torch.enable_grad():  # callers may plan inside torch.no_grad() (the diagnostic does)
                result = align_digits(
                    rewards,
                    folder,
                    config,  # type: ignore[arg-type]  # align_digits takes a DPOConfig or a StepRLConfig
                    base=self.base_dir,
                    resume=True,
                    progress=self.progress,
                    kernel_offsets=key.kernel_offsets,
                    offset_head_ranges=key.offset_head_ranges,
                    offset_head_x0=key.offset_head_x0,
                )
            return float(result.seconds), {
                **notes,
                "base_dir": str(self.base_dir),
                "aligned_dirs": {o: str(self.aligned_dirs[o]) for o in w},
                "final_eval": result.final_eval,
            }

        return train

    def __call__(self, weights: Mapping[str, float], beta: float, *, train: bool | None = None) -> WeightedPolicy:
        """The policy at `weights` and target `beta` (loaded once per process; trained on first use unless
        train=False, which raises MissingPolicyError naming the command that trains it)."""
        w, _, key = self.resolve(weights, beta)
        memo = f"{key.digest}"
        if memo not in self._memo:
            entry = self.ensure(w, beta, train=train)
            if entry.status == "aligned" and entry.weights and next(iter(entry.weights)) in self.aligned:
                model = self.aligned[next(iter(entry.weights))]
            else:
                model = load_digits_model(entry.directory)[0]
            self._memo[memo] = WeightedPolicy(model, entry.key, entry.train_seconds)
        return self._memo[memo]

    def with_options(
        self,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        train: bool | None = None,
        trainer_overrides: Mapping[str, Any] | None = None,
        progress: bool | None = None,
    ) -> DigitsStepRLPolicies:
        """A copy with another cache folder, training choice, trainer overrides or progress setting."""
        return DigitsStepRLPolicies(
            self.base_dir,
            self.aligned_dirs,
            self.betas,
            objectives=self.objectives,
            aligned=self.aligned,
            cache_dir=self.cache.root if cache_dir is None else cache_dir,
            shipped=self.cache.shipped,
            train=self.train if train is None else train,
            trainer_overrides=self.trainer_overrides if trainer_overrides is None else trainer_overrides,
            rewards=self.rewards,
            progress=self.progress if progress is None else progress,
        )
