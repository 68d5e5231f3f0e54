"""Half precision on x86 targets that convert in hardware: staged kernels (Plan.staged)
against portable ones.  float16 on F16C; bfloat16 on AVX512-BF16 (with VL and DQ).

Staged kernels widen spans of stored values to float buffers eight at a time in
hardware and narrow the results back; the loops between are the float code the
portable kernels run, with every conversion exact or correctly rounded either way
(bfloat16: the groups that vcvtneps2bf16 would flush to zero are narrowed again in
software).  So the two must agree bit for bit (NaN for NaN) on every output: dx, y, and
the float32 statistics and parameter gradients.  The portable kernel comes from the
same compiler and target less the conversion instructions (-mno-f16c,
-mno-avx512bf16).  test_half.py holds the default (staged, on such a machine) kernels
to the oracle.

Specs: 7 per dtype (14), each built twice (staged and portable), covering every staged
loop: the channels-first, channels-last and per-sample forward and backward, the
training and frozen backward of both layouts (with and without the fused ReLU and the
parameter sums).  Examples: 30 per spec (420 in all) with odd dynamic sizes, NaN,
infinities, subnormal inputs, results that are subnormal (a channel whose gamma is) and
values that overflow; plus, for each dtype, one forward large enough to take the
streaming-store path.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import sized

import bngen
from bngen.core.dtypes import numpy_dtype
from bngen.jit.compiler import DEFAULT_FLAGS, STRICT_WARNINGS, Compiler

S = bngen.Spec
SHAPES = [
    dict(shape=(None, 5, None), axis=1, momentum=0.9),
    dict(shape=(None, 3, None), axis=1, training=False, activation="relu"),
    dict(shape=(None, 2, None), axis=1, training=False, center=False, scale=False),
    dict(shape=(None, 70), activation="relu"),
    dict(shape=(None, None, 37), training=False),
    dict(shape=(None, 600), mode=1),
    dict(shape=(None, 7, None), axis=1, mode=2, center=False),
]
HALVES = ("float16", "bfloat16")
SPECS = [S(dtype=dtype, **kw) for dtype in HALVES for kw in SHAPES]
SPECIALS = {
    "float16": [np.nan, np.inf, -np.inf, 6.0e-8, -3.0e-5, 65504.0, 0.0, -0.0],
    "bfloat16": [np.nan, np.inf, -np.inf, 9.2e-41, -3.0e-39, 3.38e38, 0.0, -0.0],
}
# The flag that takes each dtype's conversion instructions away, and the target field saying
# the compiler has them.
WITHOUT = {"float16": ("-mno-f16c", "half_conversion", "f16c"),
           "bfloat16": ("-mno-avx512bf16", "bfloat16_conversion", "avx512bf16")}


@pytest.fixture(scope="module")
def pair(session_cache):
    """Builds a spec twice, staged and portable: for this machine's target with and
    without the dtype's conversion instructions.  Both with -ffp-contract=off: which
    a * b + c a compiler fuses may differ from loop to loop, and that is not what this
    test is about."""
    flags = (*DEFAULT_FLAGS, "-ffp-contract=off")
    with_hw = Compiler(flags=flags, warnings=STRICT_WARNINGS)

    def _pair(spec):
        flag, field, conversion = WITHOUT[spec.dtype]
        if getattr(with_hw.features(session_cache).target(flags), field) != conversion:
            pytest.skip(f"this machine's target has no {conversion}: every {spec.dtype} kernel is the portable one")
        without = Compiler(flags=(*flags, flag), warnings=STRICT_WARNINGS)
        staged = bngen.build(spec, session_cache, compiler=with_hw)
        plain = bngen.build(spec, session_cache, compiler=without)
        assert staged.plan.staged and not plain.plan.staged
        return staged, plain

    return _pair


@st.composite
def problems(draw, spec):
    sizes = draw(st.lists(st.integers(1, 45), min_size=2, max_size=2))
    shape = sized(spec, sizes)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 300.0]))
    dtype = numpy_dtype(spec.dtype)
    x = (rng.standard_normal(shape) * scale + rng.standard_normal()).astype(np.float32).astype(dtype)
    dy = rng.standard_normal(shape).astype(np.float32).astype(dtype)
    if draw(st.booleans()):  # a few special values, anywhere
        flat = x.reshape(-1)
        at = rng.integers(0, flat.size, size=min(3, flat.size))
        flat[at] = np.float32(rng.choice(SPECIALS[spec.dtype], size=at.size)).astype(dtype)
    c = spec.channels
    params = {
        "gamma": rng.uniform(-3, 3, c).astype(np.float32),
        "beta": rng.standard_normal(c).astype(np.float32),
        "moving_mean": rng.standard_normal(c).astype(np.float32),
        "moving_variance": rng.uniform(1e-3, 4, c).astype(np.float32),
    }
    if draw(st.booleans()):  # channel 0's outputs (and gradients) subnormal floats
        params["gamma"][0], params["beta"][0] = 3.0e-39, 0.0
    return x, dy, params


def _args(spec, params):
    used = {"gamma": spec.scale, "beta": spec.center}
    out = {k: (v if used.get(k, True) else None) for k, v in params.items()}
    if spec.mode != 0:
        out["moving_mean"] = out["moving_variance"] = None
    return out


def _run(kernel, x, dy, params):
    """Every output of forward and (where the spec has one) backward, as arrays."""
    spec = kernel.spec
    p = {k: (v.copy() if v is not None else None) for k, v in _args(spec, params).items()}
    mask_beta = p["beta"] if spec.activation == "relu" else None  # backward takes beta only for the ReLU mask
    if spec.uses_batch_stats:
        y, mean, var = kernel.forward(x, p["gamma"], p["beta"], p["moving_mean"], p["moving_variance"])
        dx, dgamma, dbeta = kernel.backward(dy, x, p["gamma"], mean, var, beta=mask_beta)
        outs = [y, mean, var, dx, dgamma, dbeta]
        if p["moving_mean"] is not None:
            outs += [p["moving_mean"], p["moving_variance"]]
        return outs
    y = kernel(x, p["gamma"], p["beta"], p["moving_mean"], p["moving_variance"])
    dx, dgamma, dbeta = kernel.backward(dy, x, p["gamma"], beta=mask_beta, moving_mean=p["moving_mean"],
                                        moving_variance=p["moving_variance"])
    return [y, dx, dgamma, dbeta]


def _assert_same_bits(got, want):
    for g, w in zip(got, want):
        if g is None or w is None:
            assert g is None and w is None
            continue
        assert g.dtype == w.dtype and g.shape == w.shape
        nan = np.isnan(g.astype(np.float32))
        np.testing.assert_array_equal(nan, np.isnan(w.astype(np.float32)))
        # NaN payloads may differ (hardware conversions quiet them); every other bit may not
        bits = {2: np.uint16, 4: np.uint32}[g.dtype.itemsize]
        np.testing.assert_array_equal(g.view(bits)[~nan], w.view(bits)[~nan])


@pytest.mark.parametrize("spec", SPECS,
                         ids=lambda s: f"{s.dtype}-mode{s.mode}-{'train' if s.training else 'infer'}-{s.shape}")
def test_staged_equals_portable(pair, spec):
    staged, plain = pair(spec)

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(problems(spec))
    def check(problem):
        x, dy, params = problem
        x_before, dy_before = x.copy(), dy.copy()
        _assert_same_bits(_run(staged, x, dy, params), _run(plain, x, dy, params))
        np.testing.assert_array_equal(x.view(np.uint16), x_before.view(np.uint16))
        np.testing.assert_array_equal(dy.view(np.uint16), dy_before.view(np.uint16))

    check()


@pytest.mark.parametrize("dtype", HALVES)
def test_streamed_forward_equals_portable(pair, dtype):
    """An output past STREAM_MIN_BYTES, from an odd offset: the staged streaming path
    (plain head, streamed lines, plain tail) writes what the portable one writes."""
    spec = S((None, 2, None), axis=1, dtype=dtype)
    staged, plain = pair(spec)
    assert staged.plan.streaming
    rng = np.random.default_rng(7)
    n = staged.plan.stream_min // 2 // 4 + 4099  # values per (sample, channel)
    x = rng.standard_normal((2, 2, n)).astype(np.float32).astype(numpy_dtype(dtype))
    base = np.empty(x.size + 3, numpy_dtype(dtype))
    out = base[3:].reshape(x.shape)  # 6 bytes past the allocation: no output line is aligned
    gamma, beta = np.float32([1.5, -2]), np.float32([0.25, 3])
    got = staged.forward(x, gamma, beta, out=out)
    want = plain.forward(x, gamma, beta)
    assert got[0] is out
    _assert_same_bits(got, want)
