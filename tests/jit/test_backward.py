"""Kernel.backward against the float64 oracle and against central finite differences.

Specs compiled: 15 (10 float64, 5 float32) covering the three schedules (channels-first,
channels-last, per-sample), single and multi-axis features, static and dynamic sizes,
modes 0, 1 and 2, the frozen (inference) backward, center/scale on and off and the
fused ReLU.  Examples: 40 per spec against the oracle, 30 per float64 spec against
finite differences, plus a threaded determinism check on 3 of the specs: about 1000
kernel calls in all.  Mode 1 (sample-wise, Keras 1.2's extra epsilon) also: a constant
sample (v = 0) gives finite gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from strategies import backward_problems as problems
from strategies import backward_reference as reference
from strategies import feature_shape, run_backward

import bngen
from bngen import oracle
from bngen.jit.kernel import numpy_dtype

S = bngen.Spec
F64_SPECS = [
    S((None, 5, None), axis=1, activation="relu", dtype="float64"),  # channels-first, dynamic outer and inner
    S((None, None, 4), axis=-1, mode=2, dtype="float64"),  # channels-last, mode 2
    S((None, 3, 2, 4), axis=(1, 2), center=False, activation="relu", dtype="float64"),  # two feature axes, static inner
    S((None, 6), scale=False, dtype="float64", momentum=0.9),  # channels-last, no gamma
    S((None, 3, None, 2), axis=1, center=False, scale=False, dtype="float64"),  # neither gamma nor beta
    S((None, 4, None), axis=1, training=False, activation="relu", dtype="float64"),  # frozen, channels-first
    S((None, 5), training=False, scale=False, dtype="float64"),  # frozen, channels-last, no gamma
    S((None, 3, 5), axis=-1, training=False, activation="relu", center=False, dtype="float64"),  # frozen, relu without beta
    S((None, 3, 4), axis=(1, 2), mode=1, activation="relu", dtype="float64"),  # sample-wise, two feature axes
    S((None, 6), mode=1, center=False, dtype="float64", epsilon=0.1),  # sample-wise, no beta, a large epsilon
]
F32_SPECS = [
    S((None, 8, None), axis=1, activation="relu"),
    S((None, 130)),  # a partial channel tile
    S((None, 7), training=False, activation="relu", center=False),
    S((None, 1030), mode=1),  # sample-wise, a partial feature tile after a whole one
    S((None, 2, 9), mode=1, activation="relu", scale=False),  # sample-wise, no gamma
]


def _ids(spec):
    flags = "".join(f for f, on in (("g", spec.scale), ("b", spec.center), ("r", spec.activation)) if on)
    return f"{spec.dtype}-{'train' if spec.uses_batch_stats else 'frozen'}-m{spec.mode}-ax{''.join(map(str, spec.axis))}-{flags}"


def forward_output_before_relu(spec, x, p):
    """The forward output without the ReLU, in float64 (where the mask is decided)."""
    plain = spec.replace(activation=None, dtype="float64")
    return oracle.forward(plain, x, p["gamma"], p["beta"], p["moving_mean"], p["moving_variance"]).y


def assert_close(spec, got, ref, x, dy, p, rtol):
    """Each gradient within rtol of the scale of its terms (the largest input to its sum)."""
    dx, dgamma, dbeta = got
    assert (dgamma is None) == (not spec.scale) and (dbeta is None) == (not spec.center)
    assert dx.dtype == np.dtype(spec.dtype) and dx.shape == x.shape
    n = x.size // spec.channels
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    axes = oracle.reduce_axes(spec)
    if spec.uses_batch_stats:
        mean, var = x64.mean(axis=axes, keepdims=True), x64.var(axis=axes, keepdims=True)
    else:
        bshape = feature_shape(spec, x.ndim)
        mean, var = p["moving_mean"].reshape(bshape), p["moving_variance"].reshape(bshape)
    r = 1 / np.sqrt(var + spec.epsilon)
    g = np.abs(p["gamma"]).max() if spec.scale else 1.0
    dy_scale = np.abs(dy64).max()
    xhat_scale = np.abs((x64 - mean) * r).max() + 1
    # dx: g r/n (n dy - sum dy - x_hat sum(dy x_hat)): every term is at most g r |dy| (1 + 2 x_hat^2).
    tol_dx = rtol * (g * np.max(r) * dy_scale * (1 + 2 * xhat_scale**2)) + 1e-300
    np.testing.assert_allclose(dx, ref.dx, rtol=0, atol=tol_dx)
    if spec.scale:
        np.testing.assert_allclose(dgamma, ref.dgamma, rtol=0, atol=rtol * n * dy_scale * xhat_scale + 1e-300)
    if spec.center:
        np.testing.assert_allclose(dbeta, ref.dbeta, rtol=0, atol=rtol * n * dy_scale + 1e-300)


@pytest.mark.parametrize("spec", F64_SPECS + F32_SPECS, ids=_ids)
def test_backward_matches_oracle(build, spec):
    kernel = build(spec)
    rtol = 1e-12 if spec.dtype == "float64" else 2e-5

    @settings(max_examples=40)
    @given(problems(spec))
    def check(problem):
        x, dy, p = problem
        if spec.activation == "relu" and spec.dtype == "float32":
            # Outputs within float32 rounding of 0 may fall either side of the mask in C and in the oracle.
            y = forward_output_before_relu(spec, x, p)
            assume(not np.any((np.abs(y) > 0) & (np.abs(y) < 1e-4 * (np.abs(y).max() + 1))))
        got = run_backward(kernel, x, dy, p)
        assert_close(spec, got, reference(spec, x, dy, p), x, dy, p, rtol)

    check()


def _loss(kernel, x, w, gamma, beta, p):
    """sum(w * forward(x, gamma, beta)), and the sum of its terms' magnitudes (what its
    rounding error scales with)."""
    spec = kernel.spec
    if spec.uses_batch_stats:
        y, _, _ = kernel.forward(x, gamma, beta)
    else:
        y = kernel(x, gamma, beta, p["moving_mean"], p["moving_variance"])
    return float(np.sum(w * y)), float(np.sum(np.abs(w * y)))


@pytest.mark.parametrize("spec", F64_SPECS, ids=_ids)
def test_backward_matches_finite_differences(build, spec):
    """The directional derivative of sum(dy * forward(x, gamma, beta)), by central differences
    of the compiled forward, equals the backward's gradients dotted with the direction."""
    kernel = build(spec)
    h = 1e-6

    @settings(max_examples=30)
    @given(problems(spec), st.integers(0, 2**32 - 1))
    def check(problem, seed):
        x, dy, p = problem
        # Step along x in units of each feature's normalising scale sqrt(var + eps), where
        # the forward's curvature lives.
        axes = oracle.reduce_axes(spec)
        var = x.var(axis=axes, keepdims=True) if spec.uses_batch_stats else 0
        rng = np.random.default_rng(seed)
        vx = rng.standard_normal(x.shape) * np.sqrt(var + spec.epsilon)
        vg = rng.standard_normal(spec.channels) if spec.scale else None
        vb = rng.standard_normal(spec.channels) if spec.center else None

        def at(t):
            return (x + t * vx, None if vg is None else p["gamma"] + t * vg, None if vb is None else p["beta"] + t * vb)

        if spec.activation == "relu":  # no output may cross the kink inside the difference
            masks = [forward_output_before_relu(spec, xs, dict(p, gamma=gs, beta=bs)) > 0 for xs, gs, bs in (at(-h), at(h))]
            assume(np.array_equal(*masks))
        (plus, magnitude), (minus, _) = (_loss(kernel, xs, dy, gs, bs, p) for xs, gs, bs in (at(h), at(-h)))
        fd = (plus - minus) / (2 * h)
        dx, dgamma, dbeta = run_backward(kernel, x, dy, p)
        terms = [dx * vx] + ([dgamma * vg] if spec.scale else []) + ([dbeta * vb] if spec.center else [])
        analytic = sum(float(np.sum(t)) for t in terms)
        size = sum(float(np.sum(np.abs(t))) for t in terms)
        # Rounding in the two losses, divided by 2h: each y carries a few ulps of its terms,
        # the largest being (x - mean) / sqrt(var + eps) before cancellation, and the sum a few
        # ulps of its terms' magnitudes (not of the sum, which can cancel: with two samples
        # per feature, y = +-1 nearly whatever x is).
        bshape = feature_shape(spec, x.ndim)
        mean, var = (x.mean(axis=axes, keepdims=True), var) if spec.uses_batch_stats else (
            p["moving_mean"].reshape(bshape), p["moving_variance"].reshape(bshape))
        g = 1.0 if p["gamma"] is None else np.abs(p["gamma"]).reshape(bshape)
        before = float(np.sum(np.abs(dy) * g * (np.abs(x) + np.abs(mean)) / np.sqrt(var + spec.epsilon)))
        rounding = 8 * np.finfo(np.float64).eps * (before + magnitude) / (2 * h)
        assert abs(fd - analytic) <= 1e-5 * size + rounding + 1e-9, (fd, analytic, size, rounding)

    check()


@pytest.mark.parametrize("spec", [F32_SPECS[0], F32_SPECS[1], F32_SPECS[3]], ids=_ids)
def test_threaded_backward_is_deterministic_and_right(build, spec):
    """Sizes big enough to use threads: the same bits run to run for a thread count, and
    the oracle's answer for 1 and 2 threads."""
    kernel = build(spec)
    shape = (64, 8, 96) if spec.ndim == 3 else (400, spec.channels)
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape) * 3 + 2).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = spec.channels
    p = dict(gamma=rng.standard_normal(c).astype(np.float32), beta=rng.standard_normal(c).astype(np.float32),
             moving_mean=None, moving_variance=None)
    ref = reference(spec, x, dy, p)
    results = {t: [run_backward(kernel, x, dy, p, threads=t) for _ in range(3)] for t in (1, 2)}
    for t, runs in results.items():
        for run in runs[1:]:
            for a, b in zip(runs[0], run):
                assert np.array_equal(a, b), f"threads={t}: results differ run to run"
        assert_close(spec, runs[0], ref, x, dy, p, 2e-5)


def test_float32_gradients_survive_a_large_mean(build):
    """|mean| >> std: the mean forward returns is rounded to float32, and backward corrects
    that rounding from x, so the gradient keeps float32 accuracy."""
    spec = F32_SPECS[1]
    kernel = build(spec)
    rng = np.random.default_rng(3)
    x = (1e4 + rng.standard_normal((300, 130))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    p = dict(gamma=np.ones(130, np.float32), beta=np.zeros(130, np.float32))
    dx, dgamma, dbeta = run_backward(kernel, x, dy, p)
    ref = oracle.backward(spec, dy, x, p["gamma"])
    scale = np.abs(ref.dx).max()
    assert np.abs(dx - ref.dx).max() < 1e-4 * scale
    assert np.abs(dgamma - ref.dgamma).max() < 1e-4 * np.abs(ref.dgamma).max() + 1e-3


def test_backward_of_sum_is_zero_and_constant_channel_is_finite(build):
    """dy = 1 (the gradient of sum(y) without ReLU): dx is exactly 0 per the algebra, and a
    channel with zero variance gives finite gradients."""
    spec = F64_SPECS[1]
    kernel = build(spec)
    x = np.random.default_rng(1).standard_normal((3, 5, 4))
    x[:, :, 2] = 7.0
    dx, dgamma, dbeta = kernel.backward(np.ones_like(x), x, np.ones(4), *kernel.forward(x, np.ones(4), np.zeros(4))[1:])
    assert np.all(np.isfinite(dx)) and np.abs(dx).max() < 1e-12
    np.testing.assert_allclose(dbeta, 15.0)
    assert abs(dgamma[2]) == 0.0


def test_plan_exports_the_backward_each_spec_has():
    """bn_backward for batch statistics (mode 1: per-sample ones), bn_backward_frozen for
    mode-0 inference; arguments only for what the spec uses; no C for features it turned off."""
    from bngen.codegen.render import render_source
    from bngen.plan.plan import make_plan

    def names(spec):
        entry = make_plan(spec).backward
        return entry and (entry.name, [a.name for a in entry.args if a.is_array])

    assert names(S((None, 4))) == ("bn_backward", ["dy", "x", "gamma", "mean", "variance", "dx", "dgamma", "dbeta"])
    assert names(S((None, 4), mode=2, activation="relu", scale=False)) == (
        "bn_backward", ["dy", "x", "beta", "mean", "variance", "dx", "dbeta"])
    assert names(S((None, 4), training=False, scale=False)) == (
        "bn_backward_frozen", ["dy", "moving_variance", "dx", "dbeta"])
    assert names(S((None, 4), mode=1)) == ("bn_backward", ["dy", "x", "gamma", "mean", "variance", "dx", "dgamma", "dbeta"])
    assert make_plan(S((None, 4)), backward=False).backward is None
    plain = render_source(make_plan(S((None, 3, None), axis=1, center=False, scale=False)))
    assert "dbeta" not in plain and "dgamma" not in plain and "<= 0 ?" not in plain
    assert "<= 0 ?" in render_source(make_plan(S((None, 3, None), axis=1, activation="relu")))


# -- mode 1 (sample-wise) -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_constant_sample_gives_finite_gradients(build, dtype):
    """A sample whose features are all equal has v = 0: the forward divides by
    sqrt(eps) + eps, and the gradients are finite and the oracle's."""
    spec = S((None, 2, 8), axis=(1, 2), mode=1, dtype=dtype)
    kernel = build(spec)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 2, 8))
    x[1] = 4.5  # a constant sample
    x = x.astype(numpy_dtype(dtype))
    dy = rng.standard_normal(x.shape).astype(numpy_dtype(dtype))
    pd = spec.param_dtype
    gamma, beta = rng.standard_normal(2 * 8).astype(pd), rng.standard_normal(2 * 8).astype(pd)
    _, mean, var = kernel.forward(x, gamma, beta)
    assert var[1] == 0
    dx, dgamma, dbeta = kernel.backward(dy, x, gamma, mean, var)
    ref = oracle.backward(spec, dy, x, gamma)
    for got, want in zip((dx, dgamma, dbeta), ref):
        got = got.astype(np.float64)
        assert np.all(np.isfinite(got))
        tol = 1e-12 if dtype == "float64" else 2e-5 if dtype == "float32" else 1e-2
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * (np.abs(want).max() + 1))
    # With v = 0 the sample's x_hat is 0: alone, it adds nothing to dgamma.
    assert np.all(oracle.backward(spec, dy[1:2], x[1:2], gamma).dgamma == 0)


def test_mode1_backward_checks_its_statistics(build):
    """mean and variance are per sample (shape x.shape[:axis]): per-feature ones, or a
    wrong dtype, are refused before any C runs, naming the argument."""
    spec = S((None, 5), mode=1)
    kernel = build(spec)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 5)).astype(np.float32)  # outer == C: only the shape names the mistake
    gamma = np.ones(5, np.float32)
    _, mean, var = kernel.forward(x, gamma, np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="mean: shape"):
        kernel.backward(x, x, gamma, mean[:4], var)
    with pytest.raises(TypeError, match="variance: dtype"):
        kernel.backward(x, x, gamma, mean, var.astype(np.float64))
    with pytest.raises(TypeError, match="mean: required"):
        kernel.backward(x, x, gamma, None, var)
    with pytest.raises(TypeError, match="moving_mean"):
        kernel.backward(x, x, gamma, mean, var, moving_mean=mean)
    dx, dgamma, dbeta = kernel.backward(x, x, gamma, mean, var)
    np.testing.assert_allclose(dx, oracle.backward(spec, x, x, gamma).dx, atol=1e-5)
