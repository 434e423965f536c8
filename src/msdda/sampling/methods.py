"""The method registry and planner: the one place that turns a method name and preference weights into
the models to evaluate, the step rule, and whether the reference runs.

A *method* is a name plus a recipe. From an `ObjectiveSet` (the reference, named aligned models, their KL
strengths, optional rewards and a soup builder) and preference weights, `plan_method` builds a
`MethodPlan`; `msdda.sample(plan.models, scheduler, plan.rule, reference=plan.reference, ...)` runs it.
Sweeps, the demos, the Stable Diffusion pipeline and both command lines call it, so the same betas and
weights give the same exponents everywhere.

Exponents (MSDDA.md §4): a_k = w_k beta_k / beta. The one default target strength is the w-weighted mean
of the objectives' betas, beta = sum_k w_k beta_k / sum_k w_k: for preference weights on the simplex that is
sum_k w_k beta_k, the exponents sum to 1 and the reference drops out; weights summing to s != 1 leave the
reference a_0 = 1 - s (KL-strength control: s < 1 moves toward the reference, s > 1 extrapolates). An
explicit beta brings the reference in whenever sum_k w_k beta_k != beta.

Adding a method is one `register_method(MethodSpec(...))` (docs/extending.md).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from msdda.core.fusion import SUM_TO_ONE_RTOL, exponents_from_preferences
from msdda.errors import MSDDAError
from msdda.models.denoiser import Denoiser
from msdda.sampling.guided import RGG, CoDe
from msdda.sampling.rules import DBMPA, DBMPALS, MSDDA, SingleModel, StepRule

REFERENCE = "reference"  # the weight key that names the reference model explicitly
BASE = "base"
REWARDED_SOUP = "rewarded-soup"
STEP_RL = "step-rl"  # one policy per w trained by multi-objective step-level RL (the expensive baseline)
SINGLE_PREFIX = f"{SingleModel.name}:"  # "single:<objective>"
# rewarded-soup's option "average": "delta" interpolates the weight updates (for LoRA dW = sum_k w_k B_k A_k,
# exact; for full models theta = sum_k w_k theta_k), "factors" averages LoRA factors separately,
# (sum_k w_k B_k)(sum_k w_k A_k), as Diffusion Blend's released baseline does (LoRA objective sets only)
SOUP_AVERAGES = ("delta", "factors")


class PlanError(MSDDAError):
    """A method name, its weights or its options do not make a runnable plan."""


class MissingPolicyError(PlanError):
    """The step-RL policy at these weights is not trained yet and training was not allowed (train=False)."""


@dataclass
class WeightedPolicy:
    """What an ObjectiveSet's `weighted_policy(weights, beta)` may return instead of a bare Denoiser.

    model: the policy trained by multi-objective step-level RL on r_w = sum_k w_k r_k at KL strength beta;
    key: where it came from (a cache key, a model directory or "aligned:<objective>"); train_seconds: the
    wall seconds its training took (a one-time cost of this w, recorded even when it was loaded from a cache).
    """

    model: Denoiser
    key: str | None = None
    train_seconds: float | None = None


@runtime_checkable
class ObjectiveSet(Protocol):
    """What a method needs to know about the models on offer.

    objectives: names of the aligned models, in order. reference: the base model. aligned[name]: the
    single-objective model for `name`; beta_of(name): the KL strength it was aligned with. rewards[name]:
    reward callables `(x0, cond) -> [B]` for the reward-guided methods (may be empty). soup(weights): one
    model with interpolated parameters for {name: w}, or None when the set has no parameters to mix; a
    builder that also takes a keyword `average` (one of SOUP_AVERAGES) serves rewarded-soup's option of
    that name (the SD pipeline's, for LoRA factors).
    rgg_scale: the reward-gradient guidance scale calibrated for this set.

    Optional (read with getattr, so a set need not define it): `weighted_policy(weights, beta, *, train=True)
    -> Denoiser | WeightedPolicy`, the policy trained by multi-objective step-level RL on sum_k w_k r_k at KL
    strength beta (the "step-rl" method); train=False raises MissingPolicyError instead of training one.
    """

    objectives: Sequence[str]
    aligned: Mapping[str, Denoiser]
    rewards: Mapping[str, Callable[..., Any]]
    soup: Callable[[Mapping[str, float]], Denoiser] | None
    rgg_scale: float

    @property
    def reference(self) -> Denoiser: ...

    def beta_of(self, objective: str) -> float: ...


@dataclass
class MethodPlan:
    """What `msdda.sample` runs for one method at one weight vector.

    models: the K denoisers evaluated at every step; rule: the step rule; reference: the base model, to be
    passed as `reference=` (evaluated only when rule.uses_reference); record: the resolved settings (method,
    weights, exponents or mixture weights, target beta, ...) for run configs and reports.
    """

    method: str
    models: list[Denoiser]
    rule: StepRule
    reference: Denoiser | None
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def uses_reference(self) -> bool:
        return bool(self.rule.uses_reference)


@dataclass(frozen=True)
class PlanRequest:
    """The inputs of one plan, after the planner checked them (what a method's builder receives)."""

    method: str
    objective_set: ObjectiveSet
    weights: dict[str, float]  # objective -> w, in the caller's order (zero weights dropped if asked)
    reference_weight: float | None  # an explicit "reference" weight, when the caller gave one
    beta: float | None
    betas: dict[str, float]
    options: dict[str, Any]
    argument: str | None = None  # the <objective> of "single:<objective>"


@dataclass(frozen=True)
class MethodSpec:
    """A registered method. weighted: it takes preference weights; needs_rewards / needs_gradients: it
    calls rewards (or their gradients) while sampling; cost: what it costs, in words (docs and --help)."""

    name: str
    build: Callable[[PlanRequest], MethodPlan]
    description: str
    cost: str
    weighted: bool = True
    needs_rewards: bool = False
    needs_gradients: bool = False
    needs_soup: bool = False
    needs_weighted_policy: bool = False  # the objective set must offer `weighted_policy` (step-RL policies)
    takes_argument: bool = False  # "<name>:<argument>", e.g. single:<objective>


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec, *, overwrite: bool = False) -> None:
    """Add a method to the registry (every sweep, pipeline and CLI then knows it)."""
    if spec.name in _REGISTRY and not overwrite:
        raise PlanError(f"method {spec.name!r} is already registered; pass overwrite=True to replace it")
    if not spec.name or ":" in spec.name or "," in spec.name:
        raise PlanError(f"method name {spec.name!r} must be non-empty without ':' or ','")
    _REGISTRY[spec.name] = spec


def method_names(*, with_arguments: bool = True) -> list[str]:
    """Registered method names, in registration order ("single:<objective>" for argument methods)."""
    return [f"{s.name}:<objective>" if (s.takes_argument and with_arguments) else s.name for s in _REGISTRY.values()]


def registered_methods() -> list[MethodSpec]:
    """Every registered method's spec, in registration order."""
    return list(_REGISTRY.values())


def get_method(method: str) -> tuple[MethodSpec, str | None]:
    """(spec, argument) for a method string such as "msdda" or "single:ink"; PlanError names the choices."""
    if not isinstance(method, str):
        raise PlanError(f"method={method!r} is not a string; choose one of {method_names()}")
    name, sep, arg = method.partition(":")
    spec = _REGISTRY.get(name)
    if spec is None or (sep != "") != spec.takes_argument or (sep and not arg):
        raise PlanError(f"unknown method {method!r}; choose one of {method_names()}")
    return spec, (arg if sep else None)


def is_weighted(method: str) -> bool:
    """Whether the method takes preference weights (the sweep runs it at every grid point)."""
    return get_method(method)[0].weighted


def default_beta(weights: Mapping[str, float], betas: Mapping[str, float]) -> float:
    """The one default target KL strength: sum_k w_k beta_k / sum_k w_k (see the module docstring)."""
    total = math.fsum(weights.values())
    if total == 0.0:
        return 1.0  # every weight zero: the reference alone, any beta gives a_k = 0
    if total < 0:
        raise PlanError(f"weights {dict(weights)} sum to {total:.6g} < 0; pass an explicit beta")
    return math.fsum(w * betas[o] for o, w in weights.items()) / total


def resolve_exponents(
    weights: Mapping[str, float], betas: Mapping[str, float], beta: float | None = None
) -> tuple[list[float], float]:
    """(a_k per objective in order, target beta): a_k = w_k beta_k / beta, beta defaulting as above."""
    target = default_beta(weights, betas) if beta is None else float(beta)
    return exponents_from_preferences(list(weights.values()), [betas[o] for o in weights], target), target


def _check_number(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) and not hasattr(value, "__float__"):
        raise PlanError(f"{what}={value!r} is not a number")
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise PlanError(f"{what}={value!r} is not a number") from exc
    if not math.isfinite(v):
        raise PlanError(f"{what}={value!r} is not finite")
    return v


def plan_method(
    method: str,
    objective_set: ObjectiveSet,
    weights: Mapping[str, float] | None = None,
    *,
    beta: float | None = None,
    betas: Mapping[str, float] | None = None,
    options: Mapping[str, Any] | None = None,
    skip_zero_weights: bool = False,
) -> MethodPlan:
    """Plan `method` at preference `weights` over `objective_set`.

    weights: {objective: w} (for code/rgg: {reward name: w}); the key "reference" may carry the reference's
      weight explicitly (all weights must then sum to 1). Ignored by "base" and "single:<objective>".
    beta: the target KL strength (None: the default of the module docstring); betas: per-objective
      overrides of objective_set.beta_of. options: the method's own settings (CoDe: num_candidates,
      block_size; RGG: scale, tempering; both: model, the objective to guide, default the reference).
    skip_zero_weights: leave objectives with weight 0 out (they are then never evaluated); False keeps
      every named objective, so a sweep evaluates the same models at every grid point.
    """
    spec, argument = get_method(method)
    if not isinstance(objective_set, ObjectiveSet):
        raise PlanError(
            f"{type(objective_set).__name__} is not an ObjectiveSet (objectives, reference, aligned, beta_of, "
            "rewards, soup, rgg_scale)"
        )
    if options is not None and not isinstance(options, Mapping):
        raise PlanError(f"options={options!r}; pass a mapping of the method's settings, e.g. {{'num_candidates': 4}}")
    clean: dict[str, float] = {}
    ref_weight: float | None = None
    if spec.weighted:
        if weights is None or not isinstance(weights, Mapping):
            raise PlanError(f"method {method!r} needs weights {{name: w}}, got {weights!r}")
        if spec.needs_rewards and not objective_set.rewards:
            raise PlanError(
                f"method {method!r} needs rewards={{name: callable}} (reward callables `(x0, cond) -> [B]`); "
                "none were given"
            )
        allowed = list(objective_set.rewards) if spec.needs_rewards else list(objective_set.objectives)
        unknown = sorted(str(k) for k in weights if k != REFERENCE and k not in allowed)
        if unknown:
            raise PlanError(f"weights name unknown objective(s) {unknown}; valid names for {method!r}: {allowed}")
        for k, v in weights.items():
            value = _check_number(f"weight {k}", v)
            if k == REFERENCE:
                ref_weight = value
            elif not (skip_zero_weights and value == 0.0):
                clean[k] = value
        if ref_weight is not None:
            total = math.fsum(_check_number(f"weight {k}", v) for k, v in weights.items())
            if not math.isclose(total, 1.0, rel_tol=SUM_TO_ONE_RTOL):
                rest = math.fsum(v for k, v in clean.items())
                raise PlanError(
                    f"{method}: with an explicit {REFERENCE!r} weight all weights must sum to 1, got {total:.9g}; "
                    f"drop {REFERENCE!r} (it then takes 1 - sum = {1 - rest:.6g}) or fix them"
                )
    resolved_betas: dict[str, float] = {}
    if betas is not None:
        if not isinstance(betas, Mapping):
            raise PlanError(f"betas={betas!r}; pass a mapping {{objective: beta_k}}")
        unknown = sorted(str(k) for k in betas if k not in objective_set.objectives)
        if unknown:
            raise PlanError(f"betas name unknown objective(s) {unknown}; valid: {list(objective_set.objectives)}")
    for o in objective_set.objectives:
        b = (betas or {}).get(o, objective_set.beta_of(o))
        resolved_betas[o] = _check_number(f"beta of {o!r}", b)
        if resolved_betas[o] <= 0:
            raise PlanError(f"beta of {o!r} is {resolved_betas[o]}; KL strengths must be > 0")
    if beta is not None:
        beta = _check_number("beta", beta)
        if beta <= 0:
            raise PlanError(f"beta={beta}; the target KL strength must be > 0")
    request = PlanRequest(
        method=method,
        objective_set=objective_set,
        weights=clean,
        reference_weight=ref_weight,
        beta=beta,
        betas=resolved_betas,
        options=dict(options or {}),
        argument=argument,
    )
    plan = spec.build(request)
    plan.record = {"method": method, **({"weights": dict(weights)} if spec.weighted and weights else {}), **plan.record}
    return plan


# ----- the built-in methods ----------------------------------------------------------------------------
def _remainder(req: PlanRequest) -> float:
    """The reference's share of a mixture: explicit, or 1 - sum of the objective weights (0 on the simplex)."""
    if req.reference_weight is not None:
        return req.reference_weight
    total = math.fsum(req.weights.values())
    return 0.0 if math.isclose(total, 1.0, rel_tol=SUM_TO_ONE_RTOL) else 1.0 - total


def _aligned(req: PlanRequest) -> list[Denoiser]:
    return [req.objective_set.aligned[o] for o in req.weights]


def _no_options(req: PlanRequest) -> None:
    if req.options:
        raise PlanError(f"method {req.method!r} takes no options, got {sorted(req.options)}")


def _plan_base(req: PlanRequest) -> MethodPlan:
    return MethodPlan(req.method, [req.objective_set.reference], SingleModel(), None)


def _plan_single(req: PlanRequest) -> MethodPlan:
    name = req.argument
    if name not in req.objective_set.aligned:
        raise PlanError(
            f"method {req.method!r}: unknown objective {name!r}; valid: {list(req.objective_set.objectives)}"
        )
    return MethodPlan(req.method, [req.objective_set.aligned[name]], SingleModel(), None)


def _nothing_weighted(req: PlanRequest) -> MethodPlan | None:
    """Every objective weight zero (after skip_zero_weights): the reference alone, when that is what is asked."""
    if req.weights:
        return None
    if req.reference_weight is None and not math.isclose(_remainder(req), 1.0):
        raise PlanError(f"{req.method}: every weight is zero; give at least one objective a non-zero weight")
    return MethodPlan(req.method, [req.objective_set.reference], SingleModel(), None, {"reference_only": True})


def _plan_msdda(req: PlanRequest) -> MethodPlan:
    _no_options(req)
    if (alone := _nothing_weighted(req)) is not None:
        return alone
    a, target = resolve_exponents(req.weights, req.betas, req.beta)
    a0 = 1.0 - math.fsum(a)
    if req.reference_weight is not None and not math.isclose(a0, req.reference_weight, rel_tol=1e-9, abs_tol=1e-12):
        raise PlanError(
            f"msdda: the explicit {REFERENCE!r} weight {req.reference_weight:g} disagrees with beta={target:g}, "
            f"which gives the reference a_0 = {a0:.6g}; drop one of them"
        )
    exps = dict(zip(req.weights, a, strict=True))
    record: dict[str, Any] = {"exponents": exps, "beta": target, "betas": {o: req.betas[o] for o in req.weights}}
    if not math.isclose(math.fsum(a), 1.0, rel_tol=SUM_TO_ONE_RTOL):
        record["exponents"] = {**exps, REFERENCE: a0}
    return MethodPlan(req.method, _aligned(req), MSDDA(a), req.objective_set.reference, record)


def _plan_mixture(rule_cls: type[DBMPA] | type[DBMPALS]) -> Callable[[PlanRequest], MethodPlan]:
    def build(req: PlanRequest) -> MethodPlan:
        _no_options(req)
        if (alone := _nothing_weighted(req)) is not None:
            return alone
        w = list(req.weights.values())
        ref = _remainder(req)
        if rule_cls is DBMPALS and (ref < 0 or any(v < 0 for v in w)):
            raise PlanError(
                f"{req.method}: weights {req.weights} with the reference taking {ref:.6g} include a negative "
                "probability; use weights in [0, 1] that sum to at most 1"
            )
        try:
            rule = rule_cls(w, reference_weight=ref)
        except MSDDAError as exc:
            raise PlanError(str(exc)) from exc
        record = {"model_weights": {**req.weights, **({REFERENCE: ref} if ref != 0.0 else {})}}
        return MethodPlan(req.method, _aligned(req), rule, req.objective_set.reference, record)

    return build


def _takes_keyword(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable without a signature: assume not
        return False
    return any(p.name == name and p.kind != p.POSITIONAL_ONLY or p.kind == p.VAR_KEYWORD for p in params)


def _plan_soup(req: PlanRequest) -> MethodPlan:
    """One model with interpolated parameters. Option `average` (SOUP_AVERAGES): "delta" (default) or
    "factors" (LoRA adapters only: the builder must take the keyword `average`)."""
    opts = dict(req.options)
    average = opts.pop("average", None)
    if opts:
        raise PlanError(f"method {req.method!r} takes only the option 'average' {SOUP_AVERAGES}, got {sorted(opts)}")
    if average is not None and average not in SOUP_AVERAGES:
        raise PlanError(f"{REWARDED_SOUP}: options average={average!r}; choose one of {SOUP_AVERAGES}")
    builder = req.objective_set.soup
    if builder is None:
        raise PlanError(f"{REWARDED_SOUP} needs models with parameters to interpolate; this objective set has none")
    takes_average = _takes_keyword(builder, "average")
    if average == "factors" and not takes_average:
        raise PlanError(
            f"{REWARDED_SOUP}: options average='factors' averages LoRA factors, but this objective set's soup "
            "interpolates full parameters (no LoRA adapters); drop the option (its soup is the 'delta' one)"
        )
    objs = {k: v for k, v in req.weights.items() if v != 0.0} if req.reference_weight is not None else req.weights
    record: dict[str, Any] = {"soup": dict(objs)}
    if average is not None:
        record["soup_average"] = average
    if not objs:
        return MethodPlan(req.method, [req.objective_set.reference], SingleModel(), None, record)
    model = builder(dict(objs), average=average) if average is not None and takes_average else builder(dict(objs))
    return MethodPlan(req.method, [model], SingleModel(), None, record)


def _plan_step_rl(req: PlanRequest) -> MethodPlan:
    """The policy trained by multi-objective step-level RL at these weights: one model, the plain rule."""
    opts = dict(req.options)
    train = opts.pop("train", True)
    if opts:
        raise PlanError(f"method {req.method!r} takes only the option 'train' (True/False), got {sorted(opts)}")
    if not isinstance(train, bool):
        raise PlanError(f"{req.method}: options train={train!r} must be True or False")
    provider = getattr(req.objective_set, "weighted_policy", None)
    if provider is None:
        name = getattr(req.objective_set, "name", type(req.objective_set).__name__)
        raise PlanError(
            f"{STEP_RL}: task {name!r} has no step-RL policies (its objective set offers no weighted_policy); "
            "choose a task that trains them (digits) or another method"
        )
    if (alone := _nothing_weighted(req)) is not None:
        return alone  # r_w = 0: the step optimum is the reference itself
    target = default_beta(req.weights, req.betas) if req.beta is None else req.beta
    got = provider(dict(req.weights), target) if train else provider(dict(req.weights), target, train=False)
    if isinstance(got, WeightedPolicy):
        model, key, seconds = got.model, got.key, got.train_seconds
    else:
        model, key, seconds = got, None, None
    record = {"beta": target, "policy": key, "train_seconds": seconds}
    return MethodPlan(req.method, [model], SingleModel(), None, record)


def _guided(rule_cls: type[CoDe] | type[RGG]) -> Callable[[PlanRequest], MethodPlan]:
    def build(req: PlanRequest) -> MethodPlan:
        if not req.weights:
            raise PlanError(f"{req.method}: every reward weight is zero")
        rewards = req.objective_set.rewards
        opts = dict(req.options)
        model = opts.pop("model", None)
        if model in (None, REFERENCE):
            guided, model_name = req.objective_set.reference, REFERENCE
        elif model in req.objective_set.aligned:
            guided, model_name = req.objective_set.aligned[model], model
        else:
            raise PlanError(
                f"{req.method}: options model={model!r}; choose {REFERENCE!r} or one of "
                f"{list(req.objective_set.objectives)}"
            )
        if rule_cls is RGG:
            opts.setdefault("scale", req.objective_set.rgg_scale)
        try:
            rule = rule_cls([rewards[k] for k in req.weights], list(req.weights.values()), model=0, **opts)
        except TypeError as exc:
            raise PlanError(f"options {dict(req.options)} are not valid for {req.method!r}: {exc}") from exc
        except MSDDAError as exc:
            raise PlanError(str(exc)) from exc
        record = {"reward_weights": dict(req.weights), "guided_model": model_name, **opts}
        return MethodPlan(req.method, [guided], rule, None, record)

    return build


for _spec in (
    MethodSpec(BASE, _plan_base, "the reference model alone", "1 model per step", weighted=False),
    MethodSpec(
        SingleModel.name,
        _plan_single,
        "one aligned model alone",
        "1 model per step",
        weighted=False,
        takes_argument=True,
    ),
    MethodSpec(
        MSDDA.name,
        _plan_msdda,
        "exact fusion of the kernels' means and variances",
        "K models per step (+1 reference when sum a_k != 1)",
    ),
    MethodSpec(
        DBMPA.name, _plan_mixture(DBMPA), "average the noise predictions, then one scheduler step", "K models per step"
    ),
    MethodSpec(
        DBMPALS.name,
        _plan_mixture(DBMPALS),
        "one model per step, drawn with probability w_k",
        "1 model per step (only the drawn one runs; the reference only on steps that draw it)",
    ),
    MethodSpec(
        REWARDED_SOUP,
        _plan_soup,
        "one model with interpolated parameters (option average: delta | factors)",
        "1 model per step + one soup build",
        needs_soup=True,
    ),
    MethodSpec(
        STEP_RL,
        _plan_step_rl,
        "a policy trained by multi-objective step-level RL at this w",
        "1 model per step + one training run per w",
        needs_weighted_policy=True,
    ),
    MethodSpec(
        CoDe.name,
        _guided(CoDe),
        "blockwise best-of-N on the reward of the Tweedie estimate",
        "1 model per step + N per block, N*K reward calls per block",
        needs_rewards=True,
    ),
    MethodSpec(
        RGG.name,
        _guided(RGG),
        "reward-gradient guidance of the mean",
        "2 model passes per step (one with gradients) + K reward gradients",
        needs_rewards=True,
        needs_gradients=True,
    ),
):
    register_method(_spec)
