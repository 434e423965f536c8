"""fuse_gaussians against independent closed forms, its properties, and every error path."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msdda import FusionError, MSDDAError, exponents_from_preferences, fuse_gaussians


def _rand(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _pos(shape, seed, dtype=torch.float64):
    return 0.1 + torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _product_of_powers(means, variances, weights):
    """Independent route: expand the log-density quadratic a*x^2 + b*x per element and read mean/var."""
    quad = sum(-0.5 * w / v for w, v in zip(weights, variances, strict=True))
    lin = sum(w * m / v for w, m, v in zip(weights, means, variances, strict=True))
    var = -0.5 / quad
    return lin * var, var


def test_two_kernels_match_expanded_quadratic():
    means = [_rand((3, 4), 0), _rand((3, 4), 1)]
    variances = [_pos((3, 4), 2), _pos((3, 4), 3)]
    mean, var = fuse_gaussians(means, variances, [0.3, 0.7])
    m_ref, v_ref = _product_of_powers(means, variances, [0.3, 0.7])
    torch.testing.assert_close(mean, m_ref, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(var, v_ref, rtol=1e-13, atol=1e-13)


def test_scalar_variances_give_0dim_var_and_linear_combination():
    means = [_rand((2, 3), 0), _rand((2, 3), 1)]
    mean, var = fuse_gaussians(means, [0.5, 2.0], [0.5, 0.5])
    assert var.dim() == 0
    assert var.item() == pytest.approx(1 / (0.5 / 0.5 + 0.5 / 2.0), rel=1e-15)
    torch.testing.assert_close(mean, var * (0.5 * means[0] / 0.5 + 0.5 * means[1] / 2.0), rtol=1e-14, atol=1e-14)


def test_equal_variances_reduce_to_weighted_mean_db_mpa_rule():
    means = [_rand((5,), i) for i in range(3)]
    w = [0.2, 0.5, 0.3]
    mean, var = fuse_gaussians(means, [0.7] * 3, w)
    torch.testing.assert_close(mean, sum(wi * m for wi, m in zip(w, means, strict=True)), rtol=0, atol=1e-15)
    assert var.item() == pytest.approx(0.7, rel=1e-15)


def test_equal_tensor_variances_reduce_to_weighted_mean():
    means = [_rand((4, 4), i) for i in range(2)]
    v = _pos((4, 4), 9)
    mean, var = fuse_gaussians(means, [v, v.clone()], [0.25, 0.75])
    torch.testing.assert_close(mean, 0.25 * means[0] + 0.75 * means[1], rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(var, v, rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_hot_returns_that_kernel_unchanged(dtype):
    means = [_rand((2, 3), i, dtype) for i in range(3)]
    variances = [_pos((2, 3), 10 + i, dtype) for i in range(3)]
    mean, var = fuse_gaussians(means, variances, [0.0, 1.0, 0.0])
    assert torch.equal(mean, means[1]) and torch.equal(var, variances[1])
    assert mean.dtype == dtype


def test_kl_strength_control_with_reference():
    """K = 1, weight lam on the aligned model and 1 - lam on the reference (lam > 1 extrapolates)."""
    ref_m, ref_v = _rand((6,), 0), _pos((6,), 1) + 1.0
    m1, v1 = _rand((6,), 2), _pos((6,), 3)
    for lam in (0.0, 0.3, 1.0, 1.4):
        mean, var = fuse_gaussians([m1], [v1], [lam], ref_mean=ref_m, ref_var=ref_v)
        precision = (1 - lam) / ref_v + lam / v1
        torch.testing.assert_close(var, 1 / precision, rtol=1e-13, atol=0)
        torch.testing.assert_close(
            mean, ((1 - lam) * ref_m / ref_v + lam * m1 / v1) / precision, rtol=1e-12, atol=1e-12
        )


def test_extrapolation_past_validity_raises_with_smallest_precision():
    ref_v = torch.full((3,), 0.5, dtype=torch.float64)
    with pytest.raises(FusionError, match=r"smallest value is -") as exc:
        fuse_gaussians(
            [torch.zeros(3, dtype=torch.float64)],
            [1.0 * torch.ones(3, dtype=torch.float64)],
            [3.0],
            ref_mean=torch.zeros(3, dtype=torch.float64),
            ref_var=ref_v,
        )
    assert "3.0" in str(exc.value)


def test_zero_variances_are_the_equal_variance_limit():
    means = [_rand((4,), 0), _rand((4,), 1)]
    mean, var = fuse_gaussians(means, [0.0, 0.0], [0.3, 0.7])
    torch.testing.assert_close(mean, 0.3 * means[0] + 0.7 * means[1], rtol=1e-15, atol=1e-15)
    assert var.item() == 0.0
    # limit check: tiny equal variances give the same answer
    m_eps, _ = fuse_gaussians(means, [1e-30, 1e-30], [0.3, 0.7])
    torch.testing.assert_close(mean, m_eps, rtol=1e-14, atol=1e-14)


def test_zero_variance_elements_dominate_elementwise():
    means = [torch.tensor([1.0, 1.0], dtype=torch.float64), torch.tensor([3.0, 3.0], dtype=torch.float64)]
    variances = [torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64)]
    mean, var = fuse_gaussians(means, variances, [0.5, 0.5])
    assert mean.tolist() == [1.0, 2.0]
    assert var.tolist() == [0.0, 1.0]
    assert torch.isfinite(mean).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_variance_elements_with_a_reference_share(dtype):
    """A float32 zero variance beside a reference exponent: the zero-variance kernel alone sets that element
    (its mean), the rest is the precision-weighted fusion (0.3 / 1 * 2 + 0.7 / 1 * 6 = 4.8)."""
    mean, var = fuse_gaussians([torch.tensor([1.0, 2.0], dtype=dtype)], [torch.tensor([0.0, 1.0], dtype=dtype)],
                               [0.3], ref_mean=torch.tensor([5.0, 6.0], dtype=dtype),
                               ref_var=torch.tensor([1.0, 1.0], dtype=dtype))
    assert mean.tolist() == pytest.approx([1.0, 4.8]) and var.tolist() == [0.0, 1.0]


def test_float32_accuracy_matches_float64_result_rounded():
    means32 = [_rand((64,), i, torch.float32) * 100 for i in range(4)]
    vars32 = [_pos((64,), 10 + i, torch.float32) for i in range(4)]
    w = [0.1, 0.2, 0.3, 0.4]
    mean32, var32 = fuse_gaussians(means32, vars32, w)
    mean64, var64 = fuse_gaussians([m.double() for m in means32], [v.double() for v in vars32], w)
    assert mean32.dtype == torch.float32
    assert torch.equal(mean32, mean64.float()) and torch.equal(var32, var64.float())


def test_broadcasting_variances_against_means():
    means = [_rand((2, 3, 4), 0), _rand((2, 3, 4), 1)]
    per_channel = [_pos((1, 3, 1), 2), _pos((1, 3, 1), 3)]
    mean, var = fuse_gaussians(means, per_channel, [0.5, 0.5])
    assert mean.shape == (2, 3, 4) and var.shape == (1, 3, 1)
    m_ref, _ = _product_of_powers(means, per_channel, [0.5, 0.5])
    torch.testing.assert_close(mean, m_ref, rtol=1e-13, atol=1e-13)


def test_tensor_weights_accepted():
    means = [_rand((3,), 0), _rand((3,), 1)]
    a, _ = fuse_gaussians(means, [1.0, 2.0], torch.tensor([0.4, 0.6]))
    b, _ = fuse_gaussians(means, [1.0, 2.0], [0.4, 0.6])
    torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)


def test_exponents_from_preferences():
    assert exponents_from_preferences([0.3, 0.7], 1.0, 1.0) == [0.3, 0.7]
    a = exponents_from_preferences([0.5, 0.5], [2.0, 1.0], 1.0)
    assert a == [1.0, 0.5]
    with pytest.raises(FusionError, match="beta_k 1 is -1"):
        exponents_from_preferences([0.5, 0.5], [1.0, -1.0], 1.0)
    with pytest.raises(FusionError, match="2 preference weights but 3 betas"):
        exponents_from_preferences([0.5, 0.5], [1.0, 1.0, 1.0], 1.0)
    with pytest.raises(FusionError, match="target beta is 0"):
        exponents_from_preferences([1.0], [1.0], 0)


# ----- error paths: type and the message names the value ---------------------------------------------
ONE = torch.zeros(3, dtype=torch.float64)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(means=[], variances=[], weights=[]), "K = 0"),
        (dict(means=[ONE, ONE], variances=[1.0], weights=[0.5, 0.5]), "2 means, 1 variances, 2 weights"),
        (dict(means=[ONE], variances=[1.0], weights=[float("nan")]), "weight 0 is nan"),
        (
            dict(means=[ONE + float("inf")], variances=[1.0], weights=[1.0]),
            "mean of kernel 0 contains a non-finite value \\(inf\\)",
        ),
        (
            dict(means=[ONE], variances=[torch.tensor([1.0, float("nan"), 1.0])], weights=[1.0]),
            "variance of kernel 0 contains a non-finite value",
        ),
        (
            dict(means=[ONE, ONE], variances=[1.0, -0.5], weights=[0.5, 0.5]),
            "variance of kernel 1 has a negative value \\(smallest -0.5\\)",
        ),
        (
            dict(means=[ONE, torch.zeros(4)], variances=[1.0, 1.0], weights=[0.5, 0.5]),
            "do not broadcast.*\\(3,\\).*\\(4,\\)",
        ),
        (dict(means=[ONE, ONE], variances=[1.0, 1.0], weights=[0.5, 0.2]), "sum to 0.7.*a_0 = 0.3.*ref_mean"),
        (
            dict(means=[ONE, ONE], variances=[1.0, 0.2], weights=[1.5, -0.5]),
            "fused precision must be > 0.*smallest value is -1",
        ),
        (
            dict(means=[ONE, ONE], variances=[0.0, 1.0], weights=[-0.5, 1.5]),
            "zero-variance kernels \\[0\\] carry total exponent -0.5",
        ),
        (dict(means=[ONE], variances=[1.0], weights=[1.0], ref_mean=ONE), "both ref_mean and ref_var"),
    ],
)
def test_error_paths(kwargs, pattern):
    with pytest.raises(FusionError, match=pattern) as exc:
        fuse_gaussians(**kwargs)
    assert isinstance(exc.value, MSDDAError) and isinstance(exc.value, ValueError)


def test_negative_tensor_precision_names_smallest_value():
    v1 = torch.tensor([1.0, 1.0], dtype=torch.float64)
    v2 = torch.tensor([1.0, 0.1], dtype=torch.float64)
    with pytest.raises(FusionError, match=r"smallest value is -8"):
        fuse_gaussians([ONE[:2], ONE[:2]], [v1, v2], [2.0, -1.0])


# ----- properties ------------------------------------------------------------------------------------
simplex = st.lists(st.floats(0.05, 1.0), min_size=1, max_size=5).map(lambda w: [x / math.fsum(w) for x in w])


@settings(max_examples=60, deadline=None)
@given(w=simplex, seed=st.integers(0, 10_000))
def test_permutation_invariance(w, seed):
    k = len(w)
    means = [_rand((3,), seed + i) for i in range(k)]
    variances = [_pos((3,), seed + 100 + i) for i in range(k)]
    perm = list(reversed(range(k)))
    m1, v1 = fuse_gaussians(means, variances, w)
    m2, v2 = fuse_gaussians([means[i] for i in perm], [variances[i] for i in perm], [w[i] for i in perm])
    torch.testing.assert_close(m1, m2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v1, v2, rtol=1e-12, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(w=simplex, seed=st.integers(0, 10_000))
def test_fused_kernel_minimises_weighted_kl(w, seed):
    """pi_w = argmin sum_k a_k KL(pi || p_k): the fused mean/var are the stationary point of that sum."""
    from msdda import GaussianKernel

    k = len(w)
    means = [_rand((4,), seed + i) for i in range(k)]
    variances = [_pos((4,), seed + 100 + i) for i in range(k)]
    mean, var = fuse_gaussians(means, variances, w)

    def loss(m, v):
        pi = GaussianKernel(m, v)
        return sum(
            wk * pi.kl(GaussianKernel(mk, vk), batch_dims=0) for wk, mk, vk in zip(w, means, variances, strict=True)
        )

    best = loss(mean, var)
    g = torch.Generator().manual_seed(seed)
    for _ in range(5):
        dm = 0.05 * torch.randn(4, generator=g, dtype=torch.float64)
        dv = 1 + 0.1 * torch.randn(4, generator=g, dtype=torch.float64)
        assert loss(mean + dm, var * dv.abs()) >= best - 1e-12


@settings(max_examples=60, deadline=None)
@given(w=simplex, c=st.floats(0.05, 0.95), seed=st.integers(0, 10_000))
def test_two_stage_fusion_equals_one_stage(w, c, seed):
    k = len(w)
    means = [_rand((3,), seed + i) for i in range(k + 1)]
    variances = [_pos((3,), seed + 100 + i) for i in range(k + 1)]
    m1, v1 = fuse_gaussians(means[:k], variances[:k], w)
    m2, v2 = fuse_gaussians([m1, means[k]], [v1, variances[k]], [c, 1 - c])
    m3, v3 = fuse_gaussians(means, variances, [c * x for x in w] + [1 - c])
    torch.testing.assert_close(m2, m3, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(v2, v3, rtol=1e-11, atol=1e-11)


@settings(max_examples=40, deadline=None)
@given(w=simplex, v=st.floats(1e-3, 10.0), seed=st.integers(0, 10_000))
def test_equal_variance_property(w, v, seed):
    means = [_rand((5,), seed + i) for i in range(len(w))]
    mean, var = fuse_gaussians(means, [v] * len(w), w)
    torch.testing.assert_close(mean, sum(wi * m for wi, m in zip(w, means, strict=True)), rtol=1e-12, atol=1e-12)
    assert var.item() == pytest.approx(v, rel=1e-12)
