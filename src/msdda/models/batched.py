"""Evaluate K denoisers of one architecture in a single batched call (torch.func vmap over stacked weights).

The sampler evaluates K models at the same (x_t, t, cond) every step. When the K models are nn.Modules of
one architecture that differ only in their weights (the aligned copies of a base model), their parameters
and buffers can be stacked along a new leading dimension and the forward of one "skeleton" module
(`torch.func.functional_call`) mapped over that dimension with `torch.func.vmap`: one call, K outputs.
vmap's batching rules turn each layer into its K-wide form (a convolution with per-model weights becomes a
grouped convolution, GroupNorm runs on a K*B batch, ...), so the results equal the sequential ones to float
rounding.

Whether this is faster depends on where the time goes: it removes K-1 rounds of Python and per-operator
overhead (large gains for small per-model work and on GPUs, where each kernel launch costs), but grouped
kernels can be slower than K plain ones on CPU once the batch is large. See benchmarks/bench_batched.py.

    stacked = StackedDenoisers(models)                        # raises BatchingError if they cannot be stacked
    outs = stacked(x_t, t, cond)                              # list of K tensors [B, C, ...]
    guided = StackedGuidance(stacked, scale=3.0, null_cond=n) # CFG: one vmapped call on the 2B batch
    ok, reason = can_stack(models)                            # the check alone, for a fallback
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from msdda.errors import MSDDAError
from msdda.models.denoiser import DenoiserError, _concat_cond, combine_guidance

logger = logging.getLogger(__name__)

# nn.Module.__dict__ entries that are bookkeeping, not configuration. Parameters, buffers and submodules are
# compared on their own; hooks are checked separately (they must be absent).
_MODULE_INTERNALS = frozenset(
    {
        "_parameters",
        "_buffers",
        "_modules",
        "_non_persistent_buffers_set",
        "_backward_pre_hooks",
        "_backward_hooks",
        "_is_full_backward_hook",
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
        "_state_dict_hooks",
        "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
        "_compiled_call_impl",
    }
)
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


class BatchingError(MSDDAError):
    """K models cannot be (or failed to be) evaluated in one batched call; the message says why and what to do."""


def _same_value(a: Any, b: Any, depth: int = 0) -> bool:
    """Conservative equality of two plain attributes: unknown or ambiguous comparisons count as different.

    Two instances of one plain class without its own `__eq__` (e.g. diffusers' attention processors, one
    object per Attention module) are equal when their attributes are, compared the same way (2 levels deep).
    """
    if a is b:
        return True
    if (
        depth < 2
        and type(a) is type(b)
        and type(a).__eq__ is object.__eq__
        and not isinstance(a, nn.Module | Tensor | type)
        and not callable(getattr(type(a), "__get__", None))  # functions, bound methods: identity only
        and hasattr(a, "__dict__")
    ):
        va, vb = vars(a), vars(b)
        return va.keys() == vb.keys() and all(_same_value(va[k], vb[k], depth + 1) for k in va)
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and bool(torch.equal(a, b))
        )
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:  # e.g. numpy arrays (ambiguous truth value): treat as different
        return False


def _tensor_specs(module: nn.Module) -> list[tuple[str, str, tuple[int, ...], torch.dtype, torch.device]]:
    specs = [("parameter", n, tuple(p.shape), p.dtype, p.device) for n, p in module.named_parameters()]
    specs += [("buffer", n, tuple(b.shape), b.dtype, b.device) for n, b in module.named_buffers()]
    return specs


def _train_mode_problem(module: nn.Module) -> str | None:
    """A submodule whose training-mode behaviour vmap cannot reproduce model by model (random or stateful)."""
    for name, sub in module.named_modules():
        if not sub.training:
            continue
        if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.p > 0:
            return f"{name or '<root>'} ({type(sub).__name__}, p={sub.p}) is in training mode"
        if isinstance(sub, nn.modules.batchnorm._NormBase) and sub.track_running_stats:
            return f"{name or '<root>'} ({type(sub).__name__}) is in training mode and updates running statistics"
    return None


def can_stack(models: Sequence[Any], *, ignore_attributes: frozenset[str] = frozenset()) -> tuple[bool, str]:
    """Whether `models` can be evaluated as one vmapped call, and if not, why (the first difference found).

    Stackable means: all nn.Modules of the same class, with the same submodule tree, the same parameter and
    buffer names, shapes, dtypes and devices, equal non-tensor configuration (every plain attribute of every
    submodule, the training flag included), no forward/backward hooks (they would run for the skeleton
    only), and no dropout/batch-norm in training mode. Only the parameter and buffer values may differ.
    ignore_attributes: plain attribute names not compared (the caller checked them its own way, e.g. a
    diffusers model's config, which also records the file it came from). Returns (True, "") when stackable.
    """
    if len(models) == 0:
        return False, "no models given"
    for k, m in enumerate(models):
        if not isinstance(m, nn.Module):
            return False, f"model {k} ({type(m).__name__}) is not a torch.nn.Module"
    first = models[0]
    specs0 = _tensor_specs(first)
    if not specs0:
        # Nothing to stack, and whatever distinguishes the models lives in plain attributes.
        return False, f"the models ({type(first).__name__}) have no parameters or buffers to stack"
    tree0 = [(n, type(s)) for n, s in first.named_modules()]
    for k, m in enumerate(models):
        if type(m) is not type(first):
            return False, f"model {k} is a {type(m).__name__}, model 0 a {type(first).__name__}"
        tree = [(n, type(s)) for n, s in m.named_modules()]
        if tree != tree0:
            diff = next((a, b) for a, b in zip(tree + [None], tree0 + [None], strict=False) if a != b)
            return False, f"model {k} has a different submodule tree than model 0 (first difference: {diff})"
        specs = _tensor_specs(m)
        if specs != specs0:
            diff = next((a, b) for a, b in zip(specs + [None], specs0 + [None], strict=False) if a != b)
            return False, (
                f"model {k} has different parameters/buffers than model 0 (first difference: {diff[0]} vs {diff[1]})"
            )
        for (name, sub), (_, sub0) in zip(m.named_modules(), first.named_modules(), strict=True):
            where = f"model {k} submodule {name or '<root>'} ({type(sub).__name__})"
            for hooks in _HOOKS:
                if getattr(sub, hooks, None):
                    return False, f"{where} has {hooks.strip('_').replace('_', ' ')}, which vmap cannot apply per model"
            skip = _MODULE_INTERNALS | ignore_attributes
            attrs = {a: v for a, v in vars(sub).items() if a not in skip}
            attrs0 = {a: v for a, v in vars(sub0).items() if a not in skip}
            if attrs.keys() != attrs0.keys():
                return False, f"{where} has attributes {sorted(attrs)} but model 0 has {sorted(attrs0)}"
            for a, v in attrs.items():
                if not _same_value(v, attrs0[a]):
                    return False, f"{where} attribute {a!r} differs from model 0's ({v!r} vs {attrs0[a]!r})"
        problem = _train_mode_problem(m)
        if problem is not None:
            return False, f"model {k}: {problem}; call .eval() on the models"
    return True, ""


class _Watch:
    """Cheap staleness check of the source modules, run before every batched call.

    Remembers, for every parameter and buffer, the dict slot that holds it, the tensor itself, its storage
    and its version counter, and every submodule's training flag. Any in-place update (optimizer.step(),
    load_state_dict, `with torch.no_grad(): p.add_(...)`), a Parameter or buffer replaced by assignment,
    `p.data = ...` or a train()/eval() switch makes it stale. Writes through `p.data.<op>_()` bypass the
    version counter, and new or deleted submodules are not looked for: call StackedDenoisers.refresh().
    (Walking named_parameters() on every call instead costs ~1.5 ms per call for K=2 digits networks.)
    """

    def __init__(self, models: Sequence[nn.Module]) -> None:
        self.tensors: list[tuple[dict[str, Any], str, Tensor, int, int]] = []
        self.flags: list[tuple[nn.Module, bool]] = []
        for m in models:
            for sub in m.modules():
                self.flags.append((sub, sub.training))
                for slots in (sub._parameters, sub._buffers):
                    for name, t in slots.items():
                        if t is not None:
                            self.tensors.append((slots, name, t, t._version, t.data_ptr()))

    def stale(self) -> bool:
        return any(sub.training != flag for sub, flag in self.flags) or any(
            slots.get(name) is not t or t._version != version or t.data_ptr() != ptr
            for slots, name, t, version, ptr in self.tensors
        )


def _meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose parameters and buffers are meta tensors (no weight memory is copied)."""
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


class StackedDenoisers:
    """K same-architecture nn.Module denoisers evaluated in one call: `(x_t, t, cond) -> list of K outputs`.

    x_t [B, C, ...], t LongTensor [B] and cond (any object the models accept: a tensor, None, a dict ...) are
    shared by all K models (vmap in_dims None); the stacked weights carry the model dimension (in_dims 0).
    Each output is what `models[k](x_t, t, cond)` returns, [B, C, ...] or [B, 2C, ...], to float rounding.

    Weights: the stacked copies (K x the parameters' memory) are rebuilt lazily before a call whenever a
    source parameter or buffer was updated in place, replaced, or a training flag changed (see `_Watch`);
    writes through `.data` and structural edits go unseen (call `refresh()`). Gradients do not flow
    into the source modules' parameters (use the modules themselves to train); gradients w.r.t. x_t do.

    fallback: when True and the vmapped call fails (an operator vmap cannot batch, data-dependent control
    flow, randomness), log a warning once and evaluate the models one by one from then on; when False,
    raise BatchingError naming the cause. Errors the models raise about their inputs (MSDDAError) pass
    through unchanged either way.
    """

    def __init__(
        self, models: Sequence[nn.Module], *, fallback: bool = False, ignore_attributes: frozenset[str] = frozenset()
    ) -> None:
        self.ignore_attributes = ignore_attributes  # passed to can_stack (see there)
        ok, reason = can_stack(models, ignore_attributes=ignore_attributes)
        if not ok:
            raise BatchingError(
                f"cannot evaluate the {len(models)} models as one batched call: {reason}. Evaluate them one by "
                f"one instead (sample(..., batch_models=False), or None to fall back automatically)"
            )
        self.modules: list[nn.Module] = list(models)
        self.fallback = fallback
        self.failure: str | None = None  # why the batched path was abandoned (fallback=True only)
        self._watch: _Watch | None = None
        self._skeleton: nn.Module | None = None
        self._params: dict[str, Tensor] = {}
        self._buffers: dict[str, Tensor] = {}
        self.refresh()

    @property
    def num_models(self) -> int:
        return len(self.modules)

    def refresh(self) -> None:
        """Re-stack the source modules' current weights (and re-check that they still can be stacked)."""
        ok, reason = can_stack(self.modules, ignore_attributes=self.ignore_attributes)
        if not ok:
            raise BatchingError(
                f"the models changed and can no longer be evaluated as one batched call: {reason}. Rebuild the "
                f"StackedDenoisers or evaluate the models one by one"
            )
        # The skeleton supplies forward() and the non-tensor configuration; its own tensors live on the meta
        # device (no memory) because functional_call substitutes the stacked ones on every call.
        self._skeleton = _meta_copy(self.modules[0])
        with torch.no_grad():
            named = [dict(m.named_parameters()) for m in self.modules]
            self._params = {n: torch.stack([p[n].detach() for p in named]) for n in named[0]}
            named = [dict(m.named_buffers()) for m in self.modules]
            self._buffers = {n: torch.stack([b[n].detach() for b in named]) for n in named[0]}
        self._watch = _Watch(self.modules)

    def _sequential(self, x_t: Tensor, t: Tensor, cond: Any) -> list[Tensor]:
        return [m(x_t, t, cond) for m in self.modules]

    def _give_up(self, cause: str, x_t: Tensor, t: Tensor, cond: Any) -> list[Tensor]:
        """fallback=True: abandon the batched path for good (warning once) and answer one model at a time."""
        self.failure = cause
        logger.warning("batched evaluation abandoned (%s); evaluating the models one by one", cause)
        return self._sequential(x_t, t, cond)

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> list[Tensor]:
        """K outputs at the same (x_t [B, C, ...], t [B], cond), in model order."""
        if self.failure is not None:
            return self._sequential(x_t, t, cond)
        if self._watch is None or self._watch.stale():
            try:
                self.refresh()
            except BatchingError as exc:
                if not self.fallback:
                    raise
                return self._give_up(str(exc), x_t, t, cond)
        skeleton = self._skeleton

        def one(params: dict[str, Tensor], buffers: dict[str, Tensor]) -> Tensor:
            # x_t, t and cond are closed over, so vmap treats them as unbatched (in_dims None) whatever
            # their type; only the stacked weights carry the model dimension.
            return functional_call(skeleton, (params, buffers), (x_t, t, cond))

        try:
            out = vmap(one, in_dims=(0, 0))(self._params, self._buffers)
        except MSDDAError:
            raise  # the models' own input checks: the sequential path would raise the same
        except Exception as exc:
            cause = f"{type(exc).__name__}: {exc}"
            if not self.fallback:
                raise BatchingError(
                    f"batched evaluation of {self.num_models} {type(self.modules[0]).__name__} models under "
                    f"torch.func.vmap failed ({cause}); evaluate them one by one (batch_models=False), or let "
                    f"sample() fall back automatically (batch_models=None)"
                ) from exc
            return self._give_up(f"vmap failed: {cause}", x_t, t, cond)
        if not isinstance(out, Tensor):
            raise BatchingError(
                f"{type(self.modules[0]).__name__} returned {type(out).__name__}; a denoiser must return a tensor"
            )
        return list(out.unbind(0))


class StackedGuidance:
    """Classifier-free guidance for K stacked models, the same arithmetic as ClassifierFreeGuidance per model.

    When cond and null_cond are tensors, conditional and unconditional passes of all K models run as one
    vmapped call on the concatenated [2B] batch; otherwise as two stacked calls (cond, then null_cond).
    Each model's output is then uncond + scale * (cond - uncond) on the prediction channels, with a learned
    variance half taken from the conditional pass (msdda.models.denoiser.combine_guidance).
    """

    def __init__(self, stacked: StackedDenoisers, scale: float, null_cond: Any) -> None:
        self.stacked = stacked
        self.scale = float(scale)
        self.null_cond = null_cond

    @property
    def num_models(self) -> int:
        return self.stacked.num_models

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any = None) -> list[Tensor]:
        """K guided outputs [B, C or 2C, ...] at (x_t [B, C, ...], t [B], cond)."""
        if cond is None:
            raise DenoiserError("classifier-free guidance needs a condition; got cond=None")
        b = x_t.shape[0]
        both = _concat_cond(cond, self.null_cond)
        if both is not None:
            outs = self.stacked(torch.cat([x_t, x_t]), torch.cat([t, t]), both)
            pairs = [(o[:b], o[b:]) for o in outs]
        else:
            pairs = list(zip(self.stacked(x_t, t, cond), self.stacked(x_t, t, self.null_cond), strict=True))
        return [combine_guidance(c, u, self.scale, x_t.shape[1]) for c, u in pairs]


# Auto mode (batch_models=None) batches only models that live on an accelerator. On CPU the sequential path
# is already compute-bound, and vmap's grouped convolutions, un-fused GroupNorm affine and layout copies made
# the K-model evaluation of a digits step 1.1-2.5x slower at B = 64 and 256 with CFG, K = 2 and 4
# (benchmarks/bench_batched.py, 1 and 2 threads); it won only at B <= 8 with K = 4, by ~15%.
# batch_models=True still batches on CPU.
AUTO_BATCH_ON_CPU = False


def auto_batch_allowed(device: torch.device | str) -> bool:
    """Whether batch_models=None (auto) batches models that live on `device`: accelerators yes, CPU only when
    AUTO_BATCH_ON_CPU is set (read at call time, so tests and users can switch it)."""
    return torch.device(device).type != "cpu" or AUTO_BATCH_ON_CPU


@runtime_checkable
class BatchesItself(Protocol):
    """A denoiser that knows a better batched evaluator for itself and its peers than vmap over nn.Modules.

    `stack_for_sampling` asks the first model: `batch_evaluator(members, required=..., guidance_scale=...,
    null_cond=...)` gets the K models (plus the reference last, when one is passed) and returns an evaluator
    with `num_models` (= len(members)), `includes_reference` (bool, set by stack_for_sampling), `__call__(x_t,
    t, cond) -> list of outputs, one per member` and `evaluate(x_t, t, cond, indices) -> outputs of those
    members only`; or None for the sequential path (auto mode, where batching would not pay); with
    required=True it raises BatchingError naming why it cannot batch. Outputs are guided when
    guidance_scale is given (as ClassifierFreeGuidance would guide each member). The SD pipeline's
    UNetDenoiser implements it (peft mixed-adapter batches, msdda.pipelines.objectives.UNetBatch).
    """

    def batch_evaluator(
        self, members: Sequence[Any], *, required: bool, guidance_scale: float | None, null_cond: Any
    ) -> Any: ...


def stack_for_sampling(
    models: Sequence[Any],
    batch_models: bool | None,
    *,
    guidance_scale: float | None = None,
    null_cond: Any = None,
    reference: Any = None,
) -> Any:
    """The batched K-model evaluator sample() uses, or None for the sequential path.

    batch_models None (auto): batch when there are >= 2 models, `can_stack` agrees and they are not on
    the CPU (see AUTO_BATCH_ON_CPU); a vmap failure at run time then falls back to the sequential path
    with a warning. True: batch or raise BatchingError with the reason (also on a vmap failure at run
    time). False: None. With guidance_scale the evaluator applies classifier-free guidance
    (StackedGuidance) exactly as ClassifierFreeGuidance would per model.
    Models that implement `BatchesItself` build their own evaluator instead; only they are handed the
    `reference` (it then joins the batch, as the last member, and the evaluator's `includes_reference` is
    True). The vmap path evaluates the K models only (`includes_reference` False).
    """
    if batch_models is not None and batch_models is not True and batch_models is not False:
        raise BatchingError(f"batch_models must be True, False or None (auto), got {batch_models!r}")
    if batch_models is False:
        return None
    if models and isinstance(models[0], BatchesItself):
        members = [*models, *([reference] if reference is not None else [])]
        evaluator = models[0].batch_evaluator(
            members, required=batch_models is True, guidance_scale=guidance_scale, null_cond=null_cond
        )
        if evaluator is not None:
            evaluator.includes_reference = reference is not None
        return evaluator
    if batch_models is None:
        if len(models) < 2:
            return None
        ok, reason = can_stack(models)
        if not ok:
            logger.debug("evaluating the %d models one by one: %s", len(models), reason)
            return None
        first = next(iter((*models[0].parameters(), *models[0].buffers())))
        if not auto_batch_allowed(first.device):
            logger.debug("evaluating the %d models one by one: on CPU that is faster than vmap", len(models))
            return None
    stacked = StackedDenoisers(models, fallback=batch_models is None)
    if guidance_scale is None:
        return stacked
    return StackedGuidance(stacked, guidance_scale, null_cond)


__all__ = [
    "BatchesItself",
    "BatchingError",
    "StackedDenoisers",
    "StackedGuidance",
    "auto_batch_allowed",
    "can_stack",
    "stack_for_sampling",
]
