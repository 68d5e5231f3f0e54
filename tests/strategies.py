"""Hypothesis strategies, tolerance helpers and the small helpers the tests share (shapes,
per-feature arrays, random parameters).

Tolerances follow from the dtype: u is the unit roundoff (2**-24 for float32 parameters
and arithmetic, 2**-53 for float64).  A kernel accumulates at most STAT_BLOCK / 8 = 128
values per SIMD lane before merging in float64, so a statistic carries a relative
error of at most ~128u; the normalised value adds a few more roundings.  K = 256 covers
that with a factor of two.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

import bngen
from bngen import oracle
from bngen.core.dtypes import numpy_dtype

K = 256
MAX_VALUES = 40_000  # elements per drawn input: keeps an example around a millisecond


def unit_roundoff(spec: bngen.Spec) -> float:
    return float(np.finfo(spec.param_dtype).eps) / 2


def feature_shape(spec: bngen.Spec, ndim: int) -> list:
    """The shape that makes a (C,) per-feature array broadcast against an input of `spec`
    with `ndim` dimensions (C along the spec's axes, 1 elsewhere)."""
    return [spec.shape[a] if a in spec.axis else 1 for a in range(ndim)]


def per_feature(spec: bngen.Spec, values, ndim: int) -> np.ndarray:
    """A per-feature array as float64, shaped to broadcast against an input of `ndim` dimensions."""
    return np.asarray(values, np.float64).reshape(feature_shape(spec, ndim))


def sized(spec: bngen.Spec, sizes) -> tuple:
    """`spec.shape` with `sizes`, in order, in its dynamic (None) dimensions."""
    it = iter(sizes)
    return tuple(next(it) if d is None else d for d in spec.shape)


def random_params(spec: bngen.Spec, rng: np.random.Generator) -> tuple:
    """``(gamma, beta, moving_mean, moving_variance)`` drawn from `rng` in the parameter
    dtype, None where `spec` takes none (no scale, no center, modes 1 and 2)."""
    c, pd = spec.channels, spec.param_dtype
    gamma = rng.uniform(0.5, 2.0, c).astype(pd) if spec.scale else None
    beta = rng.standard_normal(c).astype(pd) if spec.center else None
    if spec.mode == 0:
        return gamma, beta, rng.standard_normal(c).astype(pd), rng.uniform(0.5, 2.0, c).astype(pd)
    return gamma, beta, None, None


@st.composite
def concrete_shape(draw, spec: bngen.Spec, max_values: int = MAX_VALUES):
    """A shape matching `spec.shape`, with sizes drawn where the spec has None."""
    shape = list(spec.shape)
    for i, d in enumerate(shape):
        if d is None:
            budget = max(1, max_values // max(1, int(np.prod([s for s in shape if s is not None]))))
            hi = min(budget, draw(st.sampled_from([3, 8, 40, 1100])))
            shape[i] = draw(st.integers(1, max(1, hi)))
    return tuple(shape)


DISTRIBUTIONS = ["normal", "offset", "tiny", "integers", "constant_channels"]


@st.composite
def forward_inputs(draw, spec: bngen.Spec):
    """(x, gamma, beta, moving_mean, moving_variance, distribution) for a forward call."""
    shape = draw(concrete_shape(spec))
    seed = draw(st.integers(0, 2**32 - 1))
    dist = draw(st.sampled_from(DISTRIBUTIONS))
    rng = np.random.default_rng(seed)
    std = 10.0 ** rng.uniform(-2, 3)
    if dist == "normal":
        x = rng.standard_normal(shape) * std + rng.uniform(-3, 3) * std
    elif dist == "offset":  # |mean| = 1e4 * std: one-pass E[x^2] - E[x]^2 fails here
        x = rng.standard_normal(shape) * std + 1e4 * std * rng.choice([-1, 1])
    elif dist == "tiny":
        x = rng.standard_normal(shape) * 1e-6 + 1e-3
    elif dist == "integers":
        x = rng.integers(-3, 4, size=shape).astype(np.float64)
    else:  # some features hold one value everywhere: the output there must be exactly beta
        x = rng.standard_normal(shape) * std
        const = _feature_mask(spec, shape, rng)
        x = np.where(const, np.float64(np.float32(rng.uniform(-50, 50))), x)
    x = x.astype(spec.dtype)
    c, pd = spec.channels, spec.param_dtype
    gamma = rng.uniform(-2, 2, c).astype(pd) if spec.scale else None
    beta = rng.uniform(-2, 2, c).astype(pd) if spec.center else None
    mm = mv = None
    if spec.mode == 0:
        mm = (rng.standard_normal(c) * std).astype(pd)
        mv = (rng.uniform(0.1, 4, c) * std**2).astype(pd)
    return x, gamma, beta, mm, mv, dist


def _feature_mask(spec: bngen.Spec, shape, rng) -> np.ndarray:
    """A boolean array, True on the features (or samples, in mode 1) chosen to be constant."""
    if spec.mode == 1:
        lead = shape[: spec.axis[0]]
        chosen = rng.random(lead) < 0.5
        return chosen.reshape(lead + (1,) * len(spec.axis))
    chosen = rng.random(spec.channels) < 0.5
    return chosen.reshape(feature_shape(spec, len(shape)))


def assert_close(name: str, got, want, tol) -> None:
    """|got - want| <= tol elementwise, with a message naming the worst element."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    err = np.abs(got - want)
    tol = np.broadcast_to(np.asarray(tol, dtype=np.float64), err.shape)
    bad = ~(err <= tol)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err - tol, -np.inf)), err.shape)
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {err.size} values out of tolerance; worst at {i}: "
            f"got {got[i]!r}, want {want[i]!r}, |error| {err[i]:.3e} > tol {tol[i]:.3e}"
        )


# Backward problems (tests/jit/test_backward.py, and the half-precision and exported
# backward tests that hold to its bounds).
@st.composite
def backward_problems(draw, spec: bngen.Spec):
    """Concrete arrays for `spec`: sizes for its None dims, x with per-channel offsets and
    scales (some channels constant), dy, parameters and moving statistics."""
    shape = tuple(draw(st.integers(1, 5)) if d is None else d for d in spec.shape)
    seed = draw(st.integers(0, 2**32 - 1))
    spread = draw(st.sampled_from([1e-2, 1.0, 30.0]))
    offset = draw(st.sampled_from([0.0, 1.0, 100.0]))
    constant = draw(st.booleans())
    rng = np.random.default_rng(seed)
    c = spec.channels
    centers = (offset * rng.standard_normal(c)).reshape(feature_shape(spec, len(shape)))
    x = centers + spread * rng.standard_normal(shape)
    if constant and spec.mode == 1:  # the first sample constant: its variance exactly 0
        x.reshape(-1, c)[0] = centers.reshape(-1)[0]
    elif constant:  # the first feature constant over the batch: variance exactly 0
        flat = x.reshape(-1, c, int(np.prod(shape[spec.axis[-1] + 1:], dtype=int)))
        flat[:, 0, :] = centers.reshape(-1)[0]
    dy = rng.standard_normal(shape) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    pd = spec.param_dtype
    p = dict(
        gamma=rng.standard_normal(c).astype(pd) if spec.scale else None,
        beta=rng.standard_normal(c).astype(pd) if spec.center else None,
        moving_mean=(centers.reshape(-1) + rng.standard_normal(c)).astype(pd),
        moving_variance=(spread**2 * (0.5 + rng.random(c))).astype(pd),
    )
    dtype = numpy_dtype(spec.dtype)
    return x.astype(dtype), dy.astype(dtype), p


def run_backward(kernel, x, dy, p, threads=None):
    """Kernel.backward the way a user calls it: the statistics forward returned, or the moving ones."""
    spec = kernel.spec
    beta = p["beta"] if spec.activation == "relu" else None
    if spec.uses_batch_stats:
        _, mean, var = kernel.forward(x, p["gamma"], p["beta"])
    else:
        mean, var = p["moving_mean"], p["moving_variance"]
    return kernel.backward(dy, x, p["gamma"], mean, var, beta=beta, threads=threads)


def backward_reference(spec: bngen.Spec, x, dy, p):
    """The float64 oracle's backward for `run_backward`'s call."""
    beta = p["beta"] if spec.activation == "relu" else None
    if spec.uses_batch_stats:
        return oracle.backward(spec, dy, x, p["gamma"], beta=beta)
    return oracle.backward(spec, dy, x, p["gamma"], p["moving_mean"], p["moving_variance"], beta=beta)
