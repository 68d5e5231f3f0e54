"""What the half-precision tests share (tests/jit/test_half.py, tests/aot/test_emit_half.py): the
spacing of float16 and bfloat16, the one-ulp comparison with the oracle, and the
strategy that draws their inputs."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from strategies import assert_close, concrete_shape

from bngen.jit.kernel import numpy_dtype

MANTISSA = {"float16": 10, "bfloat16": 7}
MIN_EXP = {"float16": -14, "bfloat16": -126}


def ulp(values: np.ndarray, dtype: str) -> np.ndarray:
    """The spacing of `dtype` at each (finite, already rounded) value."""
    mag = np.abs(values.astype(np.float64))
    _, e = np.frexp(np.where(mag > 0, mag, 1.0))
    e = np.maximum(e - 1, MIN_EXP[dtype])
    return np.ldexp(1.0, e - MANTISSA[dtype])


def assert_within_one_ulp(y, ref64, dtype, arithmetic=0.0):
    """|y - round(ref)| <= ulp(round(ref)) + `arithmetic` (the float32 error bound)."""
    with np.errstate(over="ignore"):  # values beyond the dtype's range round to infinity, as the kernel's do
        want = ref64.astype(numpy_dtype(dtype))
    arithmetic = np.broadcast_to(arithmetic, want.shape)
    got64, want64 = y.astype(np.float64), want.astype(np.float64)
    finite = np.isfinite(want64)
    np.testing.assert_array_equal(np.isnan(got64), np.isnan(want64), err_msg="NaN positions differ")
    inf = np.isinf(want64)
    np.testing.assert_array_equal(got64[inf], want64[inf], err_msg="infinities differ")
    assert_close("y (ulp)", got64[finite], want64[finite], ulp(want64[finite], dtype) + arithmetic[finite])


def half_inputs(draw, spec):
    shape = draw(concrete_shape(spec, max_values=20_000))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    std = 10.0 ** rng.uniform(-2, 1)
    x = rng.standard_normal(shape) * std + rng.choice([0.0, 3.0, -20.0]) * std
    if draw(st.booleans()):  # a constant feature (mode 1: a constant sample)
        if spec.mode == 1:
            x[(0,) * (len(shape) - len(spec.axis))] = 1.5
        else:
            index = [slice(None)] * len(shape)
            index[spec.axis[0]] = 0
            x[tuple(index)] = -2.25
    x = x.astype(numpy_dtype(spec.dtype))
    c = spec.channels
    gamma = rng.uniform(-2, 2, c).astype(np.float32) if spec.scale else None
    beta = rng.uniform(-2, 2, c).astype(np.float32) if spec.center else None
    mm = mv = None
    if spec.mode == 0:
        mm = (rng.standard_normal(c) * std).astype(np.float32)
        mv = (rng.uniform(0.1, 4, c) * std**2).astype(np.float32)
    return x, gamma, beta, mm, mv
