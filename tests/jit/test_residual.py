"""The residual fusion (``Spec(residual=True)``): y = activation(normalised x + residual).

Property test: 7 kernels (channels-first, channels-last and dense; training and
inference; float32, float64, float16, bfloat16; with and without the fused ReLU; one
with the adjustment), 140 examples drawn over them, each against the float64 oracle
with the residual added, and against the same spec without the residual: the
statistics must be the same bits.  Then the streamed stores (outputs of 16 MiB and
more, with ``out=``: plain and staged half precision), the fast path, and every
error a caller can make.  Exports of it run in tests/aot/test_emit.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import K, assert_close, forward_inputs, per_feature, unit_roundoff

import bngen
from bngen import oracle
from bngen.core.dtypes import numpy_dtype

S = bngen.Spec
POOL = [
    S((None, 6, None, None), axis=1, momentum=0.9, residual=True, activation="relu"),
    S((None, 5, None), axis=1, training=False, dtype="float64", residual=True),
    S((None, None, 7), dtype="float16", residual=True, activation="relu"),
    S((None, 40), dtype="bfloat16", residual=True),
    S((None, 3, 3, 20), training=False, residual=True, activation="relu"),
    S((None, 4, 9), axis=1, dtype="float16", training=False, residual=True, activation="relu"),
    S((None, 6, 5), axis=1, mode=2, adjustment=False, residual=True, unbiased=True),
]
EXAMPLES = 140
U64 = 2.0**-53


def _half_roundoff(spec) -> float:
    """The storage dtype's unit roundoff for half precision (y is rounded once), else 0."""
    return float(np.finfo(numpy_dtype(spec.dtype)).eps) / 2 if spec.dtype in ("float16", "bfloat16") else 0.0


def _plain(spec):
    return spec.replace(residual=False)


def _call(kernel, x, gamma, beta, mm, mv, residual=None, out=None):
    """(y, mean, variance) of any kernel: forward where it has batch statistics."""
    spec = kernel.spec
    kw = {} if residual is None else {"residual": residual}
    if spec.uses_batch_stats:
        return kernel.forward(x, gamma, beta, mm, mv, out=out, **kw)
    return kernel(x, gamma, beta, mm, mv, out=out, **kw), None, None


@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_residual_matches_the_oracle(build, data):
    spec = data.draw(st.sampled_from(POOL), label="spec")
    half = spec.dtype in ("float16", "bfloat16")  # (inputs drawn in float32, the parameter dtype, then rounded)
    x, gamma, beta, mm, mv, _ = data.draw(forward_inputs(spec.replace(dtype="float32") if half else spec), label="inputs")
    if half:  # kept finite in float16: at most 1000 in magnitude
        x = x / max(1.0, float(np.abs(x).max()) / 1000)
    x = x.astype(numpy_dtype(spec.dtype))
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-2, 2)
    residual = (rng.standard_normal(x.shape) * scale).astype(x.dtype)
    kept = [a.copy() for a in (x, residual)]
    mm_k = None if mm is None else mm.copy()
    mv_k = None if mv is None else mv.copy()
    y, mean, var = _call(build(spec), x, gamma, beta, mm_k, mv_k, residual)
    for before, after in zip(kept, (x, residual)):
        np.testing.assert_array_equal(before, after)

    ref = oracle.forward(spec, x, gamma, beta, mm, mv, residual=residual)
    u = unit_roundoff(spec)
    g = per_feature(spec, gamma, x.ndim) if spec.scale else 1.0
    b = per_feature(spec, beta, x.ndim) if spec.center else 0.0
    if spec.uses_batch_stats:
        m, v = per_feature(spec, ref.mean, x.ndim), per_feature(spec, ref.variance, x.ndim)
    else:
        m, v = per_feature(spec, mm, x.ndim), per_feature(spec, mv, x.ndim)
    xhat = (x - m) / np.sqrt(v + spec.epsilon)
    terms = np.abs(g) * (np.abs(xhat) + 1) + np.abs(b) + np.abs(residual.astype(np.float64))
    spread = np.abs(m) / np.sqrt(v + spec.epsilon)
    tol = K * u * terms + K * U64 * np.abs(g) * spread + _half_roundoff(spec) * np.abs(ref.y)
    assert_close("y", y, ref.y, tol)

    if spec.uses_batch_stats:  # the residual changes the output only: the same statistics, bit for bit
        mm_p = None if mm is None else mm.copy()
        mv_p = None if mv is None else mv.copy()
        _, mean_p, var_p = _call(build(_plain(spec)), x, gamma, beta, mm_p, mv_p)
        np.testing.assert_array_equal(mean, mean_p)
        np.testing.assert_array_equal(var, var_p)
        if mm is not None:
            np.testing.assert_array_equal(mm_k, mm_p)
            np.testing.assert_array_equal(mv_k, mv_p)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_streamed_output_adds_the_residual(build, dtype):
    """A channels-first training output of 16 MiB or more, written into `out=`, streams
    past the caches: plain stores in chunks (float32), staged spans (float16, F16C)."""
    spec = S((None, 16, 256, 256), axis=1, dtype=dtype, residual=True, activation="relu")
    kernel = build(spec)
    n = -(-(16 << 20) // (16 * 256 * 256 * np.dtype(dtype).itemsize))  # samples to reach 16 MiB
    rng = np.random.default_rng(3)
    x = rng.standard_normal((n, 16, 256, 256), np.float32).astype(dtype)
    residual = rng.standard_normal(x.shape, np.float32).astype(dtype)
    gamma, beta = rng.uniform(0.5, 2, 16).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    out = np.empty_like(x)
    y, mean, var = kernel.forward(x, gamma, beta, out=out, residual=residual)
    assert y is out
    ref = oracle.forward(spec, x, gamma, beta, residual=residual).y
    u = _half_roundoff(spec) or unit_roundoff(spec)
    assert_close("y", y, ref, 4 * u * (np.abs(ref) + 8) + 1e-6)


def test_fast_path_and_checked_path_agree(build, rng):
    spec = S((None, 8, 6), axis=1, residual=True, activation="relu")
    kernel = build(spec)
    x = rng.standard_normal((5, 8, 6)).astype(np.float32)
    residual = rng.standard_normal(x.shape).astype(np.float32)
    gamma, beta = np.ones(8, np.float32), np.zeros(8, np.float32)
    first = kernel.forward(x, gamma, beta, residual=residual)
    second = kernel.forward(x, gamma, beta, residual=residual)  # the kept parameters: the fast path
    checked = bngen.Kernel.forward(kernel, x, gamma, beta, residual=residual)
    for a, b, c in zip(first, second, checked):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    # a strided residual is copied by the checked path, with the same result
    wide = np.repeat(residual, 2, axis=2)[:, :, ::2]
    np.testing.assert_array_equal(kernel.forward(x, gamma, beta, residual=wide)[0], first[0])


def test_bad_residual_calls_raise_before_any_c_runs(build, rng):
    kernel = build(S((None, 4, 3), axis=1, residual=True))
    plain = build(S((None, 4, 3), axis=1))
    x = rng.standard_normal((2, 4, 3)).astype(np.float32)
    g, b = np.ones(4, np.float32), np.zeros(4, np.float32)
    with pytest.raises(TypeError, match="residual: required"):
        kernel.forward(x, g, b)
    with pytest.raises(TypeError, match="residual: not used by this kernel"):
        plain.forward(x, g, b, residual=x.copy())
    with pytest.raises(ValueError, match="residual: shape"):
        kernel.forward(x, g, b, residual=x[:1].copy())
    with pytest.raises(TypeError, match="residual: dtype"):
        kernel.forward(x, g, b, residual=x.astype(np.float64))
    with pytest.raises(TypeError, match="residual: expected a numpy.ndarray"):
        kernel.forward(x, g, b, residual=x.tolist())
    out = x.copy()
    with pytest.raises(ValueError, match="residual"):
        kernel.forward(x, g, b, out=out, residual=out)  # y would overwrite the residual it reads
    with pytest.raises(TypeError, match="has no backward"):
        kernel.backward(x, x, g, np.zeros(4, np.float32), np.ones(4, np.float32))
    with pytest.raises(TypeError, match="residual=True kernel"):
        kernel.moments(x)


def test_residual_spec_rules(tmp_path):
    with pytest.raises(bngen.SpecError, match="residual: True with mode=1"):
        S((None, 8), mode=1, residual=True)
    with pytest.raises(bngen.SpecError, match="residual: True with virtual_batch_size"):
        S((None, 8), virtual_batch_size=2, residual=True)
    with pytest.raises(bngen.SpecError, match="residual: 1 is not a bool"):
        S((None, 8), residual=1)
    plain, fused = S((None, 8)), S((None, 8), residual=True)
    assert "residual" not in json.loads(plain.to_json())  # specs written before it read and write unchanged
    assert S.from_json(fused.to_json()) == fused and fused != plain
    # exported too (tests/aot/test_emit.py runs such exports): the header documents the argument
    bngen.emit(fused, tmp_path, name="block")
    header = (tmp_path / "block.h").read_text()
    assert "input added to the normalised x" in header and "const float *residual," in header
