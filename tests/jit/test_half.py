"""Half precision: float16 and bfloat16 storage, float32 parameters and arithmetic.

Property: every output is within one unit in the last place (of the output dtype) of
the oracle's result rounded to that dtype, plus the error bound of the float32
arithmetic the kernel is specified to use (K * 2**-24 times the size of the terms, as
for float32 kernels; see strategies.py).  That bound is far below half an ulp of
float16 (2**-11) or bfloat16 (2**-8) relative to the terms, so where no cancellation
happens the result is the correctly rounded one or its neighbour; where the terms
cancel (|y| much smaller than |beta|) float32 itself cannot do better.  Returned
statistics are float32 and are held to the float32 tolerance.

Specs: 8 forward kernels (4 per dtype: NCHW training, channels-last inference with
ReLU, mode 1, mode 2), 300 examples per dtype (600 in all); 6 backward kernels
(training, frozen and mode 1 with a ReLU, per dtype), 60 examples each.  Plus special values (NaN,
overflow to infinity, subnormals) and, when torch is installed, parity with PyTorch's
half and bfloat16 batch norm with float32 parameters.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from _half_support import assert_within_one_ulp, half_inputs, ulp
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from strategies import K, assert_close, per_feature

import bngen
from bngen import oracle
from bngen.jit.kernel import numpy_dtype


def specs(dtype):
    S = bngen.Spec
    return [
        S((None, 4, None), axis=1, dtype=dtype, momentum=0.9),
        S((None, None, 6), dtype=dtype, training=False, activation="relu"),
        S((None, 12), mode=1, dtype=dtype),
        S((None, 3, 5), axis=-1, mode=2, dtype=dtype, center=False),
    ]


def _property(dtype):
    pool = specs(dtype)

    @settings(max_examples=300)
    @given(data=st.data())
    def test(build, data):
        spec = data.draw(st.sampled_from(pool), label="spec")
        x, gamma, beta, mm, mv = half_inputs(data.draw, spec)
        kernel = build(spec)
        ref = oracle.forward(spec, x, gamma, beta, mm, mv)
        u = 2.0**-24
        g = per_feature(spec, gamma, x.ndim) if spec.scale else 1.0
        b = per_feature(spec, beta, x.ndim) if spec.center else 0.0
        if spec.uses_batch_stats:
            mm_k = None if mm is None else mm.copy()
            mv_k = None if mv is None else mv.copy()
            y, mean, var = kernel.forward(x, gamma, beta, mm_k, mv_k)
            assert mean.dtype == var.dtype == np.float32
            std = np.sqrt(ref.variance)
            assert_close("mean", mean, ref.mean, K * u * (std + np.abs(ref.mean)))
            assert_close("variance", var, ref.variance, K * u * ref.variance)
            if mm_k is not None:
                assert_close("moving_mean", mm_k, ref.moving_mean, K * u * (np.abs(mm) + np.abs(ref.mean) + std))
            xhat = (ref.y - b) / g if spec.scale else ref.y - b
            arithmetic = K * u * (np.abs(g) * (np.abs(xhat) + 1) + np.abs(b))
        else:
            y = kernel(x, gamma, beta, mm, mv)
            a = g / np.sqrt(per_feature(spec, mv, x.ndim) + spec.epsilon)
            shift = b - per_feature(spec, mm, x.ndim) * a
            arithmetic = K * u * (np.abs(x.astype(np.float64) * a) + np.abs(shift) + np.abs(ref.y))
        assert y.dtype == x.dtype
        assert_within_one_ulp(y, ref.y, dtype, arithmetic)

    return test


test_float16_within_one_ulp = _property("float16")
test_bfloat16_within_one_ulp = _property("bfloat16")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_special_values(build, dtype):
    """NaN poisons its own feature's statistics in training and only its element at
    inference; results beyond the dtype's range overflow to signed infinity."""
    npdt = numpy_dtype(dtype)
    train = build(bngen.Spec((None, 3), dtype=dtype))
    x = np.array([[1, 2, 3], [np.nan, 4, 5], [3, 6, 7]], dtype=npdt)
    y, mean, var = train.forward(x, np.ones(3, np.float32), np.zeros(3, np.float32))
    assert np.isnan(y[:, 0].astype(np.float32)).all() and np.isnan(mean[0]) and np.isnan(var[0])
    assert np.isfinite(y[:, 1:].astype(np.float32)).all()

    infer = build(bngen.Spec((None, 2), dtype=dtype, training=False))
    big = float(ml_dtypes.finfo(npdt).max)
    x = np.array([[np.nan, big], [1.0, -big]], dtype=npdt)
    y = infer(x, np.array([1.0, 4.0], np.float32), np.zeros(2, np.float32),
              np.zeros(2, np.float32), np.full(2, 1.0 - 1e-3, np.float32))
    y = y.astype(np.float64)
    assert np.isnan(y[0, 0]) and y[1, 0] == 1.0
    assert y[0, 1] == np.inf and y[1, 1] == -np.inf


def test_float16_subnormals_round_trip(build):
    spec = bngen.Spec((None, 1), dtype="float16", training=False, center=False, scale=False)
    bits = np.arange(0, 1024, dtype=np.uint16)  # every positive subnormal and zero
    x = bits.view(np.float16).reshape(-1, 1)
    y = build(spec)(x, moving_mean=np.zeros(1, np.float32), moving_variance=np.full(1, 1 - 1e-3, np.float32))
    np.testing.assert_array_equal(y.view(np.uint16), x.view(np.uint16))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("training", [True, False])
def test_parity_with_torch(build, dtype, training):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    spec = bngen.Spec((None, 8, None, None), axis=1, dtype=dtype, training=training, momentum=0.9, epsilon=1e-5)
    x32 = rng.standard_normal((4, 8, 5, 6)).astype(np.float32) * 2 + 1
    x = x32.astype(numpy_dtype(dtype))
    gamma, beta = rng.uniform(0.5, 2, 8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    mm, mv = rng.standard_normal(8).astype(np.float32), rng.uniform(0.5, 2, 8).astype(np.float32)
    tdt = getattr(torch, dtype)
    tx = torch.from_numpy(x.astype(np.float32)).to(tdt)
    tmm, tmv = torch.from_numpy(mm.copy()), torch.from_numpy(mv.copy())
    want = torch.nn.functional.batch_norm(
        tx, tmm, tmv, torch.from_numpy(gamma), torch.from_numpy(beta), training=training, momentum=0.1, eps=1e-5
    )
    assert want.dtype == tdt
    kmm, kmv = mm.copy(), mv.copy()
    got = build(spec)(x, gamma, beta, kmm, kmv)
    # Two correct float32 computations rounded to a half type agree to one ulp.
    diff = np.abs(got.astype(np.float64) - want.float().numpy().astype(np.float64))
    assert np.all(diff <= ulp(want.float().numpy().astype(np.float64), dtype))
    if training:  # PyTorch feeds the unbiased variance; compare the means only
        np.testing.assert_allclose(kmm, tmm.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["train", "frozen", "mode1"])
def test_backward_within_one_ulp(build, dtype, kind):
    """dx within one ulp of the rounded oracle plus the float32 arithmetic bound that
    test_backward.py uses; dgamma and dbeta are float32 and held to float32 tolerances.
    6 specs x 60 examples."""
    from strategies import backward_problems as problems
    from strategies import backward_reference as reference
    from strategies import run_backward

    training = kind != "frozen"
    if kind == "mode1":  # sample-wise, with the fused ReLU
        spec = bngen.Spec((None, 3, 6), axis=(1, 2), mode=1, dtype=dtype, activation="relu")
    else:
        spec = bngen.Spec((None, 6, None), axis=1, dtype=dtype, training=training)
    kernel = build(spec)

    @settings(max_examples=60)
    @given(problems(spec))
    def check(problem):
        x, dy, p = problem
        if spec.activation == "relu":  # outputs within float32 rounding of 0 may be masked either way
            y = oracle.forward(spec.replace(activation=None, dtype="float64"), x, p["gamma"], p["beta"]).y
            assume(not np.any((np.abs(y) > 0) & (np.abs(y) < 1e-4 * (np.abs(y).max() + 1))))
        dx, dgamma, dbeta = run_backward(kernel, x, dy, p)
        ref = reference(spec, x, dy, p)
        assert dx.dtype == x.dtype and dgamma.dtype == dbeta.dtype == np.float32
        x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
        n = x.size // spec.channels
        axes = oracle.reduce_axes(spec)
        if training:
            mean, var = x64.mean(axis=axes, keepdims=True), x64.var(axis=axes, keepdims=True)
        else:
            mean, var = per_feature(spec, p["moving_mean"], x.ndim), per_feature(spec, p["moving_variance"], x.ndim)
        r = 1 / np.sqrt(var + spec.epsilon)
        dy_scale = np.abs(dy64).max()
        xhat_scale = np.abs((x64 - mean) * r).max() + 1
        rtol = 2e-5  # float32 arithmetic, as in test_backward.py
        arithmetic = rtol * np.abs(p["gamma"]).max() * np.max(r) * dy_scale * (1 + 2 * xhat_scale**2)
        assert_within_one_ulp(dx, ref.dx, dtype, arithmetic)
        assert_close("dgamma", dgamma, ref.dgamma, rtol * n * dy_scale * xhat_scale)
        assert_close("dbeta", dbeta, ref.dbeta, rtol * n * dy_scale)

    check()
