"""Half precision on x86 targets that convert eight values at a time: staged kernels
(Plan.staged) against portable ones.  float16 on F16C; bfloat16 on AVX512-BF16 (with VL
and DQ) and, in the build for x86-64-v3 (AVX2, no AVX-512), on AVX2's integer lanes.

Staged kernels widen spans of stored values to float buffers eight at a time and narrow
the results back; the loops between are the float code the portable kernels run, with
every conversion exact or correctly rounded either way (bfloat16: the groups that
vcvtneps2bf16 would flush to zero are narrowed again in software; on AVX2 the portable
rounding itself runs on eight lanes).  So the two must agree bit for bit (NaN for NaN;
on AVX2 NaN payloads too) on every output: dx, y, and the float32 statistics and
parameter gradients.  The portable kernel comes from the same compiler, flags and target
but for the conversion, set to the portable bits (no flag takes exactly the one away: a
machine without AVX512-BF16 stages bfloat16 on AVX2's lanes, and one without AVX2 has no
AVX-512 either).  test_half.py holds the default (staged, on such a machine) kernels to
the oracle.

Specs: 7 per staged conversion and build (28; float16 in the x86-64-v3 build too, whose
statistics loops differ), each built twice (staged and portable), covering every staged
loop: the channels-first, channels-last and per-sample forward and backward, the
training and frozen backward of both layouts (with and without the fused ReLU and the
parameter sums).  Examples: 30 per spec (840 in all) with odd dynamic
sizes, NaN, infinities, subnormal inputs, results that are subnormal (a channel whose
gamma is) and values that overflow; plus, for each conversion, one forward large enough
to take the streaming-store path.  And the bfloat16 block conversions themselves
(tests/c/narrow8_check.c.j2): narrow8 over all 2^32 float bit patterns and widen8 over
all 2^16 stored ones, bit for bit against the one-value conversions.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import jinja2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import sized

import bngen
from bngen.codegen.render import render_template
from bngen.core.dtypes import numpy_dtype
from bngen.jit.compiler import DEFAULT_FLAGS, STRICT_WARNINGS, Compiler
from bngen.plan.plan import make_plan

S = bngen.Spec
TEST_C = Path(__file__).parent.parent / "c"  # C only the tests use
SHAPES = [
    dict(shape=(None, 5, None), axis=1, momentum=0.9),
    dict(shape=(None, 3, None), axis=1, training=False, activation="relu"),
    dict(shape=(None, 2, None), axis=1, training=False, center=False, scale=False),
    dict(shape=(None, 70), activation="relu"),
    dict(shape=(None, None, 37), training=False),
    dict(shape=(None, 600), mode=1),
    dict(shape=(None, 7, None), axis=1, mode=2, center=False),
]


@dataclasses.dataclass(frozen=True)
class Staging:
    """A staged conversion and the builds that compare it with the portable one."""

    conversion: str  # the target field's value in the staged build
    dtype: str
    field: str  # the Target field that names the conversion
    isa: str = "native"  # the instruction set both builds target
    nan_payloads: bool = False  # whether NaN payloads must agree too, not only NaN positions


STAGINGS = [
    Staging("f16c", "float16", "half_conversion"),
    Staging("avx512bf16", "bfloat16", "bfloat16_conversion"),
    # the build for AVX2 machines (bngen bench's row for x86-64-v3); its narrowing is the
    # portable arithmetic itself, so NaNs keep the same payloads too
    Staging("avx2bf16", "bfloat16", "bfloat16_conversion", isa="x86-64-v3", nan_payloads=True),
    # and float16 in that build, whose loops differ from the native ones (Plan.lanes_in_place)
    Staging("f16c", "float16", "half_conversion", isa="x86-64-v3"),
]
CASES = [(staging, S(dtype=staging.dtype, **kw)) for staging in STAGINGS for kw in SHAPES]
SPECIALS = {
    "float16": [np.nan, np.inf, -np.inf, 6.0e-8, -3.0e-5, 65504.0, 0.0, -0.0],
    "bfloat16": [np.nan, np.inf, -np.inf, 9.2e-41, -3.0e-39, 3.38e38, 0.0, -0.0],
}


def _flags(staging):
    """Both builds' flags for `staging`'s instruction set, with -ffp-contract=off: which
    a * b + c a compiler fuses may differ from loop to loop, and that is not what this
    test is about."""
    flags = tuple(f if not f.startswith("-march=") else f"-march={staging.isa}" for f in DEFAULT_FLAGS)
    return (*flags, "-ffp-contract=off")


def _staged_compiler(staging, cache):
    """The compiler of `staging`'s staged build; skips the test where this machine (or
    this compiler for this machine) does not stage it."""
    native = Compiler(flags=DEFAULT_FLAGS, warnings=STRICT_WARNINGS)
    if staging.isa != "native" and "__AVX2__" not in native.features(cache).macros:
        pytest.skip(f"this machine cannot run the {staging.isa} build")
    flags = _flags(staging)
    with_hw = Compiler(flags=flags, warnings=STRICT_WARNINGS)
    if getattr(with_hw.features(cache).target(flags), staging.field) != staging.conversion:
        pytest.skip(f"this compiler's {staging.isa} target has no {staging.conversion}: "
                    f"every {staging.dtype} kernel is the portable one")
    return with_hw


@pytest.fixture(scope="module")
def pair(session_cache):
    """Builds a spec twice, staged and portable: with `staging`'s compiler, for its target
    and for that target with the portable conversion."""

    def _pair(staging, spec):
        with_hw = _staged_compiler(staging, session_cache)
        target = with_hw.features(session_cache).target(with_hw.flags)
        portable = dataclasses.replace(target, **{staging.field: "bits"})
        staged = bngen.build(spec, session_cache, compiler=with_hw)
        plain = bngen.build(spec, session_cache, compiler=with_hw, target=portable)
        assert staged.plan.precision.half_conversion == staging.conversion
        assert staged.plan.staged and not plain.plan.staged
        assert plain.plan.precision.half_conversion == "bits"
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


def _assert_same_bits(got, want, nan_payloads=False):
    for g, w in zip(got, want):
        if g is None or w is None:
            assert g is None and w is None
            continue
        assert g.dtype == w.dtype and g.shape == w.shape
        bits = {2: np.uint16, 4: np.uint32}[g.dtype.itemsize]
        if nan_payloads:
            np.testing.assert_array_equal(g.view(bits), w.view(bits))
            continue
        nan = np.isnan(g.astype(np.float32))
        np.testing.assert_array_equal(nan, np.isnan(w.astype(np.float32)))
        # NaN payloads may differ (hardware conversions quiet them); every other bit may not
        np.testing.assert_array_equal(g.view(bits)[~nan], w.view(bits)[~nan])


def _staging_id(staging):
    return staging.conversion + ("" if staging.isa == "native" else f"-{staging.isa}")


def _case_id(case):
    staging, s = case
    return f"{_staging_id(staging)}-mode{s.mode}-{'train' if s.training else 'infer'}-{s.shape}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_staged_equals_portable(pair, case):
    staging, spec = case
    staged, plain = pair(staging, spec)

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(problems(spec))
    def check(problem):
        x, dy, params = problem
        x_before, dy_before = x.copy(), dy.copy()
        _assert_same_bits(_run(staged, x, dy, params), _run(plain, x, dy, params), staging.nan_payloads)
        np.testing.assert_array_equal(x.view(np.uint16), x_before.view(np.uint16))
        np.testing.assert_array_equal(dy.view(np.uint16), dy_before.view(np.uint16))

    check()


@pytest.mark.parametrize("staging", STAGINGS, ids=_staging_id)
def test_streamed_forward_equals_portable(pair, staging):
    """An output past STREAM_MIN_BYTES, from an odd offset: the staged streaming path
    (plain head, streamed lines, plain tail) writes what the portable one writes."""
    dtype = staging.dtype
    spec = S((None, 2, None), axis=1, dtype=dtype)
    staged, plain = pair(staging, spec)
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
    _assert_same_bits(got, want, staging.nan_payloads)


@pytest.mark.parametrize("staging", [s for s in STAGINGS if s.dtype == "bfloat16"], ids=_staging_id)
def test_block_conversions_equal_the_portable_ones(session_cache, tmp_path, staging):
    """narrow8 against store_half on every float (NaN payloads, infinities, negative
    zero, subnormals, every rounding tie) and widen8 against load_half on every
    bfloat16, bit for bit, in a program of the partial alone."""
    with_hw = _staged_compiler(staging, session_cache)
    plan = make_plan(S((None, 8), dtype=staging.dtype), with_hw.features(session_cache).target(with_hw.flags))
    assert plan.precision.half_conversion == staging.conversion
    conversions = render_template(f"half_{staging.conversion}.c.j2", plan)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEST_C)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, autoescape=False)
    source = tmp_path / "narrow8_check.c"
    source.write_text(env.get_template("narrow8_check.c.j2").render(plan=plan, conversions=conversions))
    program = tmp_path / "narrow8_check"
    built = subprocess.run([with_hw.argv0, *with_hw.flags, *STRICT_WARNINGS, "-o", str(program), str(source)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    run = subprocess.run([str(program)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.endswith("0 mismatches\n"), run.stdout
