"""The MSDDA closed form: fuse K diagonal Gaussian kernels (and optionally the reference) by exponents.

pi_w  ∝  p_ref^{a_0} * prod_k p_k^{a_k},   a_0 = 1 - sum_k a_k      (MSDDA.md §4)
  1/var_w = a_0/var_ref + sum_k a_k/var_k
  mu_w    = var_w * (a_0*mu_ref/var_ref + sum_k a_k*mu_k/var_k)

Zero variances (DDIM with eta = 0, or a clamped last step) are treated as the limit in which every
zero-variance kernel has the same infinitesimal variance: they dominate, the fused kernel is a point mass
at their exponent-weighted mean, and the result never divides by zero. Tiny positive variances (down to
subnormal ones) are fused with precisions rescaled by the smallest variance, so 1/var never overflows.
Inputs are checked first: means and variances must be real, finite tensors or numbers (variances >= 0),
weights real numbers; anything else (None, complex, strings, a dict) raises FusionError.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from msdda.core.errors import FusionError
from msdda.core.kernel import compute_dtype

# Weights whose sum is within this relative distance of 1 leave no exponent for the reference.
SUM_TO_ONE_RTOL = 1e-6

VarianceLike = float | Tensor


def _real(value: object, what: str) -> float:
    """`value` as a float if it is a real number (or a one-element real tensor), else FusionError."""
    if isinstance(value, Tensor) and value.numel() == 1 and not (value.is_complex() or value.dtype == torch.bool):
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise FusionError(f"{what} is {value!r:.80} ({type(value).__name__}); it must be a real number")
    return float(value)


def _real_list(values: object, what: str) -> list[float]:
    """A sequence of real numbers as floats (a str or a dict is refused, not iterated)."""
    if isinstance(values, str | bytes | Mapping) or not isinstance(values, Sequence | Tensor):
        raise FusionError(
            f"{what} is {values!r:.80} ({type(values).__name__}); pass a list of numbers, one per objective"
        )
    return [_real(x, f"{what}[{i}]") for i, x in enumerate(values)]


def exponents_from_preferences(
    preferences: Sequence[float], betas: Sequence[float] | float, beta: float
) -> list[float]:
    """Turn preference weights w_k into the fusion exponents a_k = w_k * beta_k / beta.

    preferences: w_k, one per objective (usually >= 0, summing to 1).
    betas: the KL strength beta_k each single-objective model was aligned with (one float = shared).
    beta: the KL strength of the target multi-objective problem. With a common beta_k = beta and
      weights on the simplex the exponents are the weights and the reference drops out (a_0 = 0);
      otherwise the reference kernel takes a_0 = 1 - sum_k a_k.
    """
    w = _real_list(preferences, "preferences")
    if not w:
        raise FusionError("no preference weights given (K = 0); pass one weight per objective")
    if isinstance(betas, numbers.Real) and not isinstance(betas, bool):
        b = [float(betas)] * len(w)
    else:
        b = _real_list(betas, "betas")
    beta = _real(beta, "target beta")
    if len(b) != len(w):
        raise FusionError(f"{len(w)} preference weights but {len(b)} betas; pass one beta per objective")
    for name, values in (("preference weight", w), ("beta_k", b)):
        for i, v in enumerate(values):
            if not math.isfinite(v):
                raise FusionError(f"{name} {i} is {v}; it must be finite")
    for i, v in enumerate(b):
        if v <= 0:
            raise FusionError(f"beta_k {i} is {v}; KL strengths must be > 0")
    if not (math.isfinite(float(beta)) and beta > 0):
        raise FusionError(f"target beta is {beta}; it must be a finite number > 0")
    return [wk * bk / float(beta) for wk, bk in zip(w, b, strict=True)]


def _as_weights(weights: Sequence[float] | Tensor) -> list[float]:
    if isinstance(weights, Tensor):
        if weights.dim() > 1:
            raise FusionError(f"weights must be 1-D (one exponent per kernel), got shape {tuple(weights.shape)}")
        if weights.is_complex() or weights.dtype == torch.bool:
            raise FusionError(f"weights have dtype {weights.dtype}; exponents must be real numbers")
        return [float(x) for x in weights.detach().cpu().double().reshape(-1)]
    return _real_list(weights, "weights")


def _as_mean(m: object, what: str) -> Tensor:
    """A mean as a real floating or integer tensor (numbers and nested lists are converted)."""
    if m is None:
        raise FusionError(f"{what} is None; pass a tensor (the kernel's mean)")
    try:
        t = m if isinstance(m, Tensor) else torch.as_tensor(m)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise FusionError(f"{what} is {m!r:.80} ({type(m).__name__}), not a tensor: {exc}") from None
    if t.is_complex() or t.dtype == torch.bool:
        raise FusionError(f"{what} has dtype {t.dtype}; kernels must be real-valued (a float tensor)")
    return t


def _as_variance(v: VarianceLike, device: torch.device, what: str = "variance") -> Tensor:
    # Python floats stay float64: a float32 round trip would cost the variance 7 digits.
    if isinstance(v, Tensor):
        if v.is_complex() or v.dtype == torch.bool:
            raise FusionError(f"{what} has dtype {v.dtype}; variances must be real (a float tensor or number)")
        return v.to(device)
    if v is None or isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise FusionError(f"{what} is {v!r:.80} ({type(v).__name__}); pass a float or a tensor >= 0")
    return torch.tensor(float(v), dtype=torch.float64, device=device)


def _check_tensor(t: Tensor, what: str, *, variance: bool) -> float:
    """FusionError unless `t` is finite (and >= 0 for a variance); returns its smallest value (inf if empty)."""
    # One reduction pass in the common (valid) case; NaN makes both comparisons false and lands below.
    if not t.numel():
        return math.inf
    lo_t, hi_t = torch.aminmax(t.detach())
    lo, hi = lo_t.item(), hi_t.item()
    if hi < math.inf and lo >= (0 if variance else -math.inf):
        return lo
    if not torch.isfinite(t).all():
        bad = t[~torch.isfinite(t)].reshape(-1)[0].item()
        raise FusionError(f"{what} contains a non-finite value ({bad}); kernels must be finite")
    raise FusionError(f"{what} has a negative value (smallest {t.min().item():.6g}); variances must be >= 0")


def _rescale_below(cdt: torch.dtype) -> float:
    """Variances below this are fused with rescaled precisions: 1/var and 1/var * mean could overflow."""
    return math.sqrt(torch.finfo(cdt).tiny)


def _compute_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps the precision-weighted sums exact to the input dtype even under extrapolation
    # (a_0 < 0 cancels); MPS has no float64 (msdda.core.kernel.compute_dtype).
    return compute_dtype(device)


def fuse_gaussians(
    means: Sequence[Tensor],
    variances: Sequence[VarianceLike],
    weights: Sequence[float] | Tensor,
    ref_mean: Tensor | None = None,
    ref_var: VarianceLike | None = None,
) -> tuple[Tensor, Tensor]:
    """Fuse K diagonal Gaussians with exponents a_k (and the reference with a_0 = 1 - sum a_k).

    means: K tensors that broadcast together (e.g. [B, C, H, W] each).
    variances: K floats, 0-dim tensors or tensors broadcastable against the means.
    weights: the exponents a_k (see `exponents_from_preferences`). When they sum to 1 (relative
      tolerance 1e-6) no reference is needed; otherwise `ref_mean` and `ref_var` are required.
    Returns (mean, var): mean has the broadcast shape of the inputs and the means' dtype; var is 0-dim
      when every variance is a scalar, else the broadcast shape. Raises FusionError on invalid input or
      when the fused precision is not positive everywhere (the product is then not a Gaussian).
    """
    if isinstance(means, Tensor | str | Mapping) or not isinstance(means, Sequence):
        raise FusionError(f"means is a {type(means).__name__}; pass a list of K tensors, one per kernel")
    if isinstance(variances, str | Mapping) or not isinstance(variances, Sequence):
        raise FusionError(f"variances is a {type(variances).__name__}; pass a list of K floats or tensors")
    k = len(means)
    if k == 0:
        raise FusionError("no kernels to fuse (K = 0); pass at least one mean/variance pair")
    a = _as_weights(weights)
    if len(variances) != k or len(a) != k:
        raise FusionError(
            f"length mismatch: {k} means, {len(variances)} variances, {len(a)} weights; pass one of each per kernel"
        )
    for i, ai in enumerate(a):
        if not math.isfinite(ai):
            raise FusionError(f"weight {i} is {ai}; weights must be finite")
    if (ref_mean is None) != (ref_var is None):
        raise FusionError("pass both ref_mean and ref_var, or neither")

    a_sum = math.fsum(a)
    a0 = 1.0 - a_sum
    use_ref = ref_mean is not None and a0 != 0.0
    if not math.isclose(a_sum, 1.0, rel_tol=SUM_TO_ONE_RTOL) and ref_mean is None:
        raise FusionError(
            f"weights {a} sum to {a_sum:.9g}, not 1, so the reference kernel takes exponent "
            f"a_0 = {a0:.9g}; pass ref_mean and ref_var, or use weights that sum to 1"
        )
    if not use_ref:
        a0 = 0.0

    mus = [_as_mean(m, f"mean of kernel {i}") for i, m in enumerate(means)]
    out_dtype = mus[0].dtype if mus[0].is_floating_point() else torch.get_default_dtype()
    for m in mus[1:]:
        out_dtype = torch.promote_types(out_dtype, m.dtype)
    device = mus[0].device
    vars_ = [_as_variance(v, device, f"variance of kernel {i}") for i, v in enumerate(variances)]
    if use_ref:
        mus.append(_as_mean(ref_mean, "ref_mean").to(device))
        vars_.append(_as_variance(ref_var, device, "ref_var"))
        a.append(a0)
    try:
        out_shape = _broadcast_shapes([m.shape for m in mus] + [v.shape for v in vars_])
    except RuntimeError as exc:
        shapes = [tuple(m.shape) for m in mus] + [tuple(v.shape) for v in vars_]
        raise FusionError(f"kernel shapes do not broadcast together: {shapes}") from exc
    names = [f"kernel {i}" for i in range(k)] + (["reference"] if use_ref else [])
    var_mins = []
    for name, m, v in zip(names, mus, vars_, strict=True):
        _check_tensor(m, f"mean of {name}", variance=False)
        var_mins.append(_check_tensor(v, f"variance of {name}", variance=True))

    # One-hot exponents: return that kernel unchanged (bit-exact, as the spec requires).
    nonzero = [i for i, ai in enumerate(a) if ai != 0.0]
    if len(nonzero) == 1 and a[nonzero[0]] == 1.0:
        i = nonzero[0]
        return torch.broadcast_to(mus[i], out_shape).to(out_dtype), vars_[i].to(out_dtype)

    cdt = _compute_dtype(device)
    if all(v.dim() == 0 for v in vars_):
        return _fuse_scalar_variances(mus, [float(v) for v in vars_], a, out_shape, out_dtype, cdt)
    if min(var_mins) >= _rescale_below(cdt):  # no zero or tiny variance anywhere: the plain sums
        return _fuse_positive_variances(mus, vars_, a, out_dtype, cdt)
    return _fuse_tensor_variances(mus, vars_, a, out_shape, out_dtype, cdt)


def _broadcast_shapes(shapes: list[torch.Size]) -> torch.Size:
    """torch.broadcast_shapes, without its cost in the common case (equal shapes, or 0-dim variances)."""
    full = [s for s in shapes if len(s)]
    if not full:
        return torch.Size([])
    if all(s == full[0] for s in full):
        return torch.Size(full[0])
    return torch.broadcast_shapes(*shapes)


def _fuse_scalar_variances(
    mus: list[Tensor],
    vs: list[float],
    a: list[float],
    out_shape: torch.Size,
    out_dtype: torch.dtype,
    cdt: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Scalar variances: the fused mean is a fixed linear combination of the means (cheap path)."""
    zero = [i for i, v in enumerate(vs) if v == 0.0]
    if zero:
        mass = math.fsum(a[i] for i in zero)
        if mass <= 0:
            raise FusionError(
                f"the zero-variance kernels {zero} carry total exponent {mass:.6g} <= 0, so the fused "
                f"kernel is not a Gaussian (weights {a}); give them positive total weight"
            )
        coeffs = [a[i] / mass if i in zero else 0.0 for i in range(len(a))]
        var = 0.0
    elif min(vs) < _rescale_below(cdt):
        # precisions relative to the smallest variance (each scale/v in (0, 1]): no overflow, same fusion
        scale = min(vs)
        rel = [ai * (scale / v) for ai, v in zip(a, vs, strict=True)]
        rel_precision = math.fsum(rel)
        if not rel_precision > 0:
            raise FusionError(
                f"fused precision must be > 0 everywhere; it is {rel_precision / scale:.6g} for weights "
                f"{a} and variances {vs}; reduce the extrapolation (negative reference exponent)"
            )
        var = scale / rel_precision
        coeffs = [r / rel_precision for r in rel]
    else:
        precision = math.fsum(ai / v for ai, v in zip(a, vs, strict=True))
        if not precision > 0:
            raise FusionError(
                f"fused precision must be > 0 everywhere; smallest value is {precision:.6g} for weights "
                f"{a} and variances {vs}; reduce the extrapolation (negative reference exponent)"
            )
        var = 1.0 / precision
        coeffs = [(ai / v) * var for ai, v in zip(a, vs, strict=True)]
    mean = torch.zeros(out_shape, dtype=cdt, device=mus[0].device)
    for c, m in zip(coeffs, mus, strict=True):
        if c != 0.0:
            mean = mean + c * m.to(cdt)
    return mean.to(out_dtype), torch.tensor(var, dtype=out_dtype, device=mus[0].device)


def _fuse_tensor_variances(
    mus: list[Tensor],
    vars_: list[Tensor],
    a: list[float],
    out_shape: torch.Size,
    out_dtype: torch.dtype,
    cdt: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Per-element variances (learned-variance models): precision-weighted sums element by element.

    Called (by `fuse_gaussians`, which checks each variance's minimum exactly) when some variance is zero or
    below the rescale threshold: precisions are taken relative to the smallest positive variance at each
    element (scale / var in (0, 1]), so nothing divides by zero or overflows.
    """
    var_shape = torch.broadcast_shapes(*(v.shape for v in vars_))
    device = mus[0].device
    scale = torch.full(var_shape, math.inf, dtype=cdt, device=device)
    for v in vars_:
        v = v.to(cdt)
        scale = torch.minimum(scale, torch.where(v > 0, v, torch.full_like(v, math.inf)))
    scale = torch.where(torch.isinf(scale), torch.ones_like(scale), scale)  # no positive variance: any scale
    precision = torch.zeros(var_shape, dtype=cdt, device=device)  # relative: the precision times scale
    zero_mass = torch.zeros(var_shape, dtype=cdt, device=device)
    any_zero = torch.zeros(var_shape, dtype=torch.bool, device=device)
    num = torch.zeros(out_shape, dtype=cdt, device=device)
    zero_num = torch.zeros(out_shape, dtype=cdt, device=device)
    for ai, m, v in zip(a, mus, vars_, strict=True):
        v = v.to(cdt)
        is_zero = v == 0
        inv = torch.where(is_zero, torch.zeros_like(v), scale / torch.where(is_zero, torch.ones_like(v), v))
        precision = precision + ai * inv
        num = num + (ai * inv) * m.to(cdt)
        zero_mass = zero_mass + ai * is_zero.to(cdt)
        zero_num = zero_num + (ai * is_zero.to(cdt)) * m.to(cdt)
        any_zero = any_zero | is_zero
    if any_zero.any():
        bad = zero_mass[any_zero]
        if (bad <= 0).any():
            raise FusionError(
                f"where some kernels have zero variance their total exponent must be > 0; smallest is "
                f"{bad.min().item():.6g} for weights {a}"
            )
    finite_part = precision[~any_zero]
    if finite_part.numel() and not (finite_part > 0).all():
        smallest = (finite_part / torch.broadcast_to(scale, var_shape)[~any_zero]).min().item()
        raise FusionError(
            f"fused precision must be > 0 everywhere; smallest value is {smallest:.6g} "
            f"for weights {a}; reduce the extrapolation (negative reference exponent)"
        )
    safe_precision = torch.where(any_zero, torch.ones_like(precision), precision)
    safe_mass = torch.where(any_zero, zero_mass, torch.ones_like(zero_mass))
    var = torch.where(any_zero, torch.zeros_like(precision), scale / safe_precision)
    mean = torch.where(any_zero, zero_num / safe_mass, num / safe_precision)
    return mean.to(out_dtype), var.to(out_dtype)


def _fuse_positive_variances(
    mus: list[Tensor], vars_: list[Tensor], a: list[float], out_dtype: torch.dtype, cdt: torch.dtype
) -> tuple[Tensor, Tensor]:
    """The common case, no zero variance anywhere: a few fused passes per kernel, no masking."""
    precision: Tensor | None = None
    num: Tensor | None = None
    for ai, m, v in zip(a, mus, vars_, strict=True):
        if ai == 0.0:
            continue
        coeff = torch.reciprocal(v.to(cdt)).mul_(ai)
        # type promotion converts m to cdt exactly, as m.to(cdt) would, without the copy (a 0-dim coeff
        # would not promote a float32 mean: convert it then)
        term = coeff * (m if coeff.dim() or not m.dim() else m.to(cdt))
        precision = coeff if precision is None else precision.add_(coeff)
        num = term if num is None else num.add_(term)
    assert precision is not None and num is not None  # the one-hot/zero cases never reach here
    if min(a) < 0 and not bool((precision > 0).all()):
        raise FusionError(
            f"fused precision must be > 0 everywhere; smallest value is {precision.min().item():.6g} "
            f"for weights {a}; reduce the extrapolation (negative reference exponent)"
        )
    var = torch.reciprocal(precision)
    return (num.mul_(var)).to(out_dtype), var.to(out_dtype)
