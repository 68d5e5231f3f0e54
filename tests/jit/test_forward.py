"""Property tests: every forward kernel against the float64 NumPy oracle.

Specs: 21 distinct kernels in four kinds (mode-0 training, mode-0 inference, mode 1,
mode 2), chosen to cover every schedule (channels-first, channels-last, per-sample),
static and dynamic sizes, 1-D to 5-D shapes, negative and multi-axis feature axes,
float32 and float64, center/scale on and off, fused ReLU and unbiased moving variance.
Examples: 300 per kind (1200 in all), each drawing a kernel from its kind's pool,
concrete sizes for the dynamic dimensions, a data distribution (normal, |mean| = 1e4
std, tiny, small integers, constant features) and parameters.  Tolerances are K*u
scaled by the size of the terms (see strategies.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import K, assert_close, forward_inputs, per_feature, unit_roundoff

import bngen
from bngen import oracle

S = bngen.Spec
TRAIN0 = [
    S((None, 6, None, None), axis=1, momentum=0.9),
    S((None, None, 5), dtype="float64", activation="relu", epsilon=1e-5),
    S((None, 3, 4, None), axis=(1, 2), unbiased=True, center=False),
    S((None, 300), momentum=0.5, scale=False, unbiased=True),
    S((2, 3, 5), axis=-2, dtype="float64"),
    S((None, 2, 3, 2, None), axis=(-3, -2), activation="relu"),
    S((5,), axis=0, momentum=0.0),
]
INFER0 = [
    S((None, 5, None), axis=1, training=False),
    S((None, None, None, 7), training=False, dtype="float64", activation="relu"),
    S((None, 130), training=False, center=False),
    S((4, 3, 2), axis=(0, 1), training=False, scale=False),
    S((None, 4, 3, 3), axis=1, training=False, scale=False, center=False),
]
MODE1 = [
    S((None, 9), mode=1),
    S((None, None, 4, 5), axis=(-2, -1), mode=1, dtype="float64", activation="relu"),
    S((None, 1500), mode=1, center=False),
    S((None, 6), mode=1, training=False, scale=False),
]
MODE2 = [
    S((None, 4, None), axis=1, mode=2, training=False),
    S((None, 40), mode=2, dtype="float64", center=False),
    S((None, None, 3), mode=2, activation="relu"),
    S((3, None, 2, 2), axis=2, mode=2, training=False, scale=False),
    S((None, 2, 200), axis=-1, mode=2, training=False),
]
EXAMPLES_PER_KIND = 300
U64 = 2.0**-53


def _activate(spec, y):
    return np.where(y < 0, 0.0, y) if spec.activation == "relu" else y


def check_forward(kernel, inputs):
    """Runs the kernel and asserts every output against the oracle."""
    spec = kernel.spec
    x, gamma, beta, mm, mv, dist = inputs
    originals = [a.copy() if a is not None else None for a in (x, gamma, beta)]
    u = unit_roundoff(spec)
    ref = oracle.forward(spec, x, gamma, beta, mm, mv)
    g = per_feature(spec, gamma, x.ndim) if spec.scale else 1.0
    b = per_feature(spec, beta, x.ndim) if spec.center else 0.0

    if not spec.uses_batch_stats:
        y = kernel(x, gamma, beta, mm, mv)
        a = g / np.sqrt(per_feature(spec, mv, x.ndim) + spec.epsilon)
        shift = b - per_feature(spec, mm, x.ndim) * a
        mean = per_feature(spec, mm, x.ndim)
        xa = np.abs(x.astype(np.float64) * a)
        # The kernel's folded x * a + shift and the oracle's (x - mean) * a + beta each
        # round terms of their own size; cancellation between them is not an error.
        oracle_terms = np.abs(x - mean) * np.abs(a) + np.abs(b)
        assert_close("y", y, ref.y, K * u * (xa + np.abs(shift) + np.abs(ref.y)) + K * U64 * oracle_terms)
    elif spec.updates_moving_stats and spec.unbiased and x.size == spec.channels:
        with pytest.raises(ValueError, match="unbiased"):  # n/(n-1) with n = 1
            kernel.forward(x, gamma, beta, mm, mv)
    else:
        mm_k = None if mm is None else mm.copy()
        mv_k = None if mv is None else mv.copy()
        y, mean, var = kernel.forward(x, gamma, beta, mm_k, mv_k)
        std = np.sqrt(ref.variance)
        assert_close("mean", mean, ref.mean, K * u * (std + np.abs(ref.mean)))
        # Merging block means of size |mean| in float64 costs u64 * |mean| * std (second term).
        assert_close("variance", var, ref.variance, K * u * ref.variance + K * U64 * np.abs(ref.mean) * std)
        if spec.mode == 1:
            m = ref.mean.reshape(ref.mean.shape + (1,) * len(spec.axis))
            v = ref.variance.reshape(m.shape)
            xhat = (x - m) / (np.sqrt(v + spec.epsilon) + spec.epsilon)
        else:
            m = per_feature(spec, ref.mean, x.ndim)
            v = per_feature(spec, ref.variance, x.ndim)
            xhat = (x - m) / np.sqrt(v + spec.epsilon)
        # Any float64 x - mean (the oracle's too) loses u64 * |mean| / std of x_hat; the
        # last term allows that, and is negligible for float32 kernels.
        spread = np.abs(m) / np.sqrt(v + spec.epsilon)
        tol = K * u * (np.abs(g) * (np.abs(xhat) + 1) + np.abs(b)) + K * U64 * np.abs(g) * spread
        assert_close("y", y, ref.y, tol)
        if spec.updates_moving_stats:
            n = x.size // spec.channels
            fed = ref.variance * (n / (n - 1) if spec.unbiased else 1.0)
            assert_close("moving_mean", mm_k, ref.moving_mean, K * u * (np.abs(mm) + np.abs(ref.mean) + std))
            assert_close("moving_variance", mv_k, ref.moving_variance, K * u * (np.abs(mv) + fed))
        if dist == "constant_channels":
            # A constant feature has variance exactly 0 and output exactly beta.
            if spec.mode == 1:
                rows = x.reshape(x.shape[: spec.axis[0]] + (-1,))
                flat = (rows == rows[..., :1]).all(axis=-1)
                assert np.all(var[flat] == 0), "constant samples must have variance exactly 0"
                want = np.broadcast_to(_activate(spec, b + 0.0 * g), y.shape)
                sel = np.broadcast_to(flat.reshape(flat.shape + (1,) * len(spec.axis)), y.shape)
            else:
                moved = np.moveaxis(x, spec.axis, range(len(spec.axis))).reshape(spec.channels, -1)
                flat = (moved == moved[:, :1]).all(axis=1)
                assert np.all(var[flat] == 0), "constant features must have variance exactly 0"
                want = np.broadcast_to(_activate(spec, b + 0.0 * g), y.shape)
                sel = np.broadcast_to(per_feature(spec, flat, x.ndim).astype(bool), y.shape)
            np.testing.assert_array_equal(y[sel], want[sel].astype(spec.dtype))
    for before, after in zip(originals, (x, gamma, beta)):
        if before is not None:
            np.testing.assert_array_equal(before, after)


def _property(pool):
    @settings(max_examples=EXAMPLES_PER_KIND)
    @given(data=st.data())
    def test(build, data):
        spec = data.draw(st.sampled_from(pool), label="spec")
        check_forward(build(spec), data.draw(forward_inputs(spec), label="inputs"))

    return test


test_training_mode0 = _property(TRAIN0)
test_inference_mode0 = _property(INFER0)
test_sample_wise_mode1 = _property(MODE1)
test_batch_stats_mode2 = _property(MODE2)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_large_offset_keeps_variance(build, dtype):
    """|mean| = 1e4 * std: a one-pass E[x^2] - E[x]^2 gives garbage or NaN here."""
    rng = np.random.default_rng(7)
    spec = S((None, 4, None), axis=1, dtype=dtype)
    x = (rng.standard_normal((64, 4, 257)) + 1e4).astype(dtype)
    y, mean, var = build(spec).forward(x, np.ones(4, dtype), np.zeros(4, dtype))
    ref = oracle.forward(spec, x, np.ones(4), np.zeros(4))
    np.testing.assert_allclose(var, ref.variance, rtol=1e-5)
    np.testing.assert_allclose(y, ref.y, atol=2e-5)


def test_constant_channel_gives_exactly_beta(build):
    """PyTorch #5410 gave +-1 here; a constant channel must give exactly beta."""
    spec = S((None, 3, None), axis=1)
    x = np.empty((8, 3, 1000), np.float32)
    x[:, 0] = 0.1
    x[:, 1] = -7.3e5
    x[:, 2] = 3.0
    beta = np.array([0.25, -1.5, 2.0], np.float32)
    y, mean, var = build(spec).forward(x, np.full(3, 5.0, np.float32), beta)
    assert np.all(var == 0)
    np.testing.assert_array_equal(mean, x[0, :, 0])
    np.testing.assert_array_equal(y, np.broadcast_to(beta[None, :, None], x.shape))


def test_call_and_forward_agree_and_out_is_used(build, rng):
    spec = S((None, 6, 5), axis=1, momentum=0.8)
    kernel = build(spec)
    x = rng.standard_normal((4, 6, 5)).astype(np.float32)
    gamma, beta = rng.standard_normal(6).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    out = np.empty_like(x)
    result = kernel(x, gamma, beta, out=out)
    assert result is out
    y, _, _ = kernel.forward(x, gamma, beta)
    np.testing.assert_array_equal(out, y)


def test_moving_statistics_update_in_place(build, rng):
    spec = S((None, 3), momentum=0.75, unbiased=True)
    x = rng.standard_normal((10, 3)).astype(np.float32)
    mm, mv = np.ones(3, np.float32), np.full(3, 2.0, np.float32)
    ref = oracle.forward(spec, x, np.ones(3), np.zeros(3), mm, mv)
    build(spec)(x, np.ones(3, np.float32), np.zeros(3, np.float32), mm, mv)
    np.testing.assert_allclose(mm, ref.moving_mean, rtol=1e-6)
    np.testing.assert_allclose(mv, ref.moving_variance, rtol=1e-6)


def test_non_contiguous_input_is_accepted(build, rng):
    spec = S((None, 4, None), axis=1)
    base = rng.standard_normal((3, 4, 10)).astype(np.float32)
    x = base[:, :, ::2]
    g, b = np.ones(4, np.float32), np.zeros(4, np.float32)
    np.testing.assert_allclose(build(spec)(x, g, b), oracle.forward(spec, x, g, b).y, atol=1e-5)
