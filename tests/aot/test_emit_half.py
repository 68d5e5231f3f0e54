"""bngen.emit with half-precision storage (float16, bfloat16): uint16_t bit patterns,
float parameters and arithmetic, one rounding to nearest even on store.

Property tests, held to the tolerance of tests/jit/test_half.py (its helpers): every y within
one unit in the last place of the correctly rounded oracle result plus the float32
arithmetic bound, statistics within the float32 bound.  Each example is a batch of
cases (sizes, data and parameters from test_half's strategy) run by one driver process.
* host gcc, strict: 6 kernels (baked NHWC + ReLU and NCHW with a dynamic inner size,
  runtime-parameter inference, training NCHW, mode 1; the Cortex-M arithmetic in a
  channels-last training kernel with ReLU) x 20 examples x 4 cases;
* aarch64 under qemu-aarch64 (native __fp16 conversions): 3 kernels x 6 examples x 3 cases;
* Cortex-M4 code under qemu-arm: 3 kernels (native VCVTB conversions with
  -mfp16-format=ieee, the portable bits without it, bfloat16) x 6 examples x 3 cases.
Exhaustive conversions: every one of the 65536 bit patterns through a baked kernel whose
scales are 1 (identity), 0.7 (rounding), 3 (overflow), tiny (subnormal results) and
negative, compared exactly with NumPy's float32 arithmetic rounded by NumPy /
ml_dtypes, on 7 builds (host bits, aarch64 native, Cortex-M4 native and bits; bfloat16
on the host, aarch64 and Cortex-M4).  The backward entry points of the same files (host,
through ctypes): 2 specs x 30 examples, to test_half.py's backward bound.  Then: which
conversion each build uses, the files, the harness on the host and both emulators, and
Cortex-M4 objects with nm.
"""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest
from _emit_support import (
    AARCH64,
    CORTEX_M,
    CORTEX_M_OBJECTS,
    FORBIDDEN,
    HOST,
    STRICT,
    baked_params,
    build_program,
    params_for,
    undefined_symbols,
)
from _half_support import assert_within_one_ulp, half_inputs
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import K, per_feature

import bngen
from bngen import oracle
from bngen.aot.emit import Case, emit, export_plan, fold_parameters, get_target, make_case
from bngen.jit.kernel import numpy_dtype

HOST_EXAMPLES = 20
CROSS_EXAMPLES = 6
FP16_IEEE = ("-mfp16-format=ieee",)  # gives arm-none-eabi-gcc its IEEE __fp16
U = 2.0**-24  # unit roundoff of the float32 arithmetic

# (id, spec, target, baked, extra compiler flags)
HOST_CASES = [
    ("f16-baked-nhwc-relu", bngen.Spec((None, 4, 6), dtype="float16", training=False, activation="relu"), "host", True, ()),
    ("bf16-baked-nchw-dynamic", bngen.Spec((None, 3, None), axis=1, dtype="bfloat16", training=False), "host", True, ()),
    ("f16-infer-nchw", bngen.Spec((None, 5, None), axis=1, dtype="float16", training=False, center=False), "host", False, ()),
    ("f16-train-nchw", bngen.Spec((None, 4, 7), axis=1, dtype="float16", momentum=0.9, unbiased=True), "host", False, ()),
    ("bf16-train-nhwc-relu-cortexm-math", bngen.Spec((None, 20), dtype="bfloat16", activation="relu"), "cortex-m", False, ()),
    ("f16-mode1", bngen.Spec((None, 24), mode=1, dtype="float16"), "host", False, ()),
]
AARCH64_CASES = [
    ("f16-baked-nhwc", bngen.Spec((None, 16), dtype="float16", training=False, epsilon=1e-5), True, ()),
    ("f16-train-nchw", bngen.Spec((None, 4, 6), axis=1, dtype="float16", momentum=0.9), False, ()),
    ("bf16-infer-nhwc-relu", bngen.Spec((None, 8), dtype="bfloat16", training=False, activation="relu"), False, ()),
]
CORTEX_M_CASES = [
    ("f16-train-nhwc-native", bngen.Spec((None, 12), dtype="float16", momentum=0.9), False, FP16_IEEE),
    ("f16-baked-nchw-bits", bngen.Spec((None, 3, 8), axis=1, dtype="float16", training=False), True, ()),
    ("bf16-mode1", bngen.Spec((None, 16), mode=1, dtype="bfloat16"), False, ()),
]


# -- against the oracle, to one ulp ------------------------------------------------------------
def _draw_values(data, spec, params, max_values):
    """x (half dtype) and the parameter values the kernel computes with: drawn by
    test_half's strategy, or the float64 values a baked kernel was folded from."""
    x, gamma, beta, mm, mv = half_inputs(data.draw, spec)
    if x.size > max_values:  # emulated runs: keep the first rows
        x = x[: max(1, max_values * x.shape[0] // x.size)]
    if params is not None:
        gamma, beta = params.get("gamma"), params.get("beta")
        mm, mv = params["moving_mean"], params["moving_variance"]
    values = {"gamma": gamma, "beta": beta, "moving_mean": mm, "moving_variance": mv}
    return x, {k: v for k, v in values.items() if v is not None}


def check_outputs(spec, x, values, outputs):
    """`outputs` of one call on `x` and `values` against the oracle: y to one ulp of the
    storage type plus the float32 arithmetic bound (as tests/jit/test_half.py), statistics
    and moving averages to the float32 bound."""
    gamma, beta = values.get("gamma"), values.get("beta")
    mm, mv = values.get("moving_mean"), values.get("moving_variance")
    ref = oracle.forward(spec, x, gamma, beta, mm, mv)
    g = per_feature(spec, gamma, x.ndim) if spec.scale else 1.0
    b = per_feature(spec, beta, x.ndim) if spec.center else 0.0
    if spec.uses_batch_stats:
        std = np.sqrt(ref.variance)
        tol = {"mean": K * U * (std + np.abs(ref.mean)), "variance": K * U * ref.variance}
        if spec.updates_moving_stats:
            n = x.size // spec.channels
            fed = ref.variance * (n / (n - 1) if spec.unbiased else 1.0)
            tol["moving_mean"] = K * U * (np.abs(mm) + np.abs(ref.mean) + std)
            tol["moving_variance"] = K * U * (np.abs(mv) + fed)
        for key, t in tol.items():
            got = outputs[key]
            np.testing.assert_array_less(np.abs(got - getattr(ref, key).reshape(-1)), t.reshape(-1) + 1e-45, err_msg=key)
        xhat = (ref.y - b) / g if spec.scale else ref.y - b
        arithmetic = K * U * (np.abs(g) * (np.abs(xhat) + 1) + np.abs(b))
    else:
        a = g / np.sqrt(per_feature(spec, mv, x.ndim) + spec.epsilon)
        shift = b - per_feature(spec, mm, x.ndim) * a
        arithmetic = K * U * (np.abs(x.astype(np.float64) * a) + np.abs(shift) + np.abs(ref.y))
    y = outputs["y"].reshape(x.shape).astype(numpy_dtype(spec.dtype))
    assert_within_one_ulp(y, ref.y, spec.dtype, arithmetic)


def _check_batch(program, params, data, cases_per_run, max_values):
    spec = program.plan.spec
    drawn = [_draw_values(data, spec, params, max_values) for _ in range(cases_per_run)]
    cases = [make_case(program.plan, x, values) for x, values in drawn]
    for (x, values), outputs in zip(drawn, program.run(cases)):
        check_outputs(spec, x, values, outputs)


@pytest.mark.parametrize("case_id", [c[0] for c in HOST_CASES])
@settings(max_examples=HOST_EXAMPLES)
@given(data=st.data())
def test_host_half_kernel_within_one_ulp(host_programs, case_id, data):
    _check_batch(*host_programs(case_id), data, cases_per_run=4, max_values=20_000)


@pytest.mark.parametrize("case_id", [c[0] for c in AARCH64_CASES])
@settings(max_examples=CROSS_EXAMPLES)
@given(data=st.data())
def test_aarch64_half_kernel_within_one_ulp(aarch64_programs, case_id, data):
    _check_batch(*aarch64_programs(case_id), data, cases_per_run=3, max_values=4_000)


@pytest.mark.parametrize("case_id", [c[0] for c in CORTEX_M_CASES])
@settings(max_examples=CROSS_EXAMPLES)
@given(data=st.data())
def test_cortex_m4_half_kernel_within_one_ulp(cortex_m_programs, case_id, data):
    _check_batch(*cortex_m_programs(case_id), data, cases_per_run=3, max_values=4_000)


# -- the backward pass in the same files ------------------------------------------------------
class SharedObject:
    """An emitted file compiled strictly into a shared object; entries called by name with
    NumPy arrays (ctypes), in the order of the plan's signature."""

    def __init__(self, directory, spec, name="k"):
        import ctypes

        HOST.require()
        emit(spec, directory, name)
        self.plan = export_plan(spec, name, get_target("host"))
        path = HOST.compile([directory / f"{name}.c"], directory / f"{name}.so", extra=("-fPIC", "-shared"), link=True)
        self.lib = ctypes.CDLL(str(path))
        self.ctypes = ctypes

    def call(self, entry_name, outer, inner, **arrays):
        entry = self.plan.entry(entry_name)
        args = []
        for arg in entry.args:
            if arg.role == "size":
                args.append(self.ctypes.c_ssize_t(outer if arg.name == "outer" else inner))
            else:
                array = arrays.get(arg.name)
                args.append(None if array is None else self.ctypes.c_void_p(array.ctypes.data))
        getattr(self.lib, self.plan.symbol(entry))(*args)


@pytest.mark.parametrize("dtype,training,relu", [("float16", True, False), ("bfloat16", False, True)],
                         ids=["f16-train", "bf16-frozen-relu"])
def test_exported_backward_within_one_ulp(tmp_path, dtype, training, relu):
    """NAME_backward / NAME_backward_frozen of a half-precision export (host, strict C99),
    held to tests/jit/test_half.py's backward bound: dx within one ulp of the rounded oracle
    plus the float32 arithmetic bound; dgamma and dbeta float32.  2 specs x 30 examples."""
    from strategies import backward_problems as problems
    from strategies import backward_reference as reference

    spec = bngen.Spec((None, 6, None), axis=1, dtype=dtype, training=training, activation="relu" if relu else None)
    so = SharedObject(tmp_path, spec)

    @settings(max_examples=30)
    @given(problems(spec))
    def check(problem):
        x, dy, p = problem
        outer, inner = x.shape[0], x.shape[2]
        c = spec.channels
        dx, dgamma, dbeta = np.empty_like(x), np.empty(c, np.float32), np.empty(c, np.float32)
        if training:  # the statistics forward returns, as a user would pass them
            mean, var = np.empty(c, np.float32), np.empty(c, np.float32)
            so.call("bn_forward", outer, inner, x=x, y=np.empty_like(x), gamma=p["gamma"], beta=p["beta"], mean=mean, variance=var)
            so.call("bn_backward", outer, inner, dy=dy, x=x, gamma=p["gamma"], mean=mean, variance=var, dx=dx, dgamma=dgamma, dbeta=dbeta)
        else:
            so.call("bn_backward_frozen", outer, inner, dy=dy, x=x, dx=dx, dgamma=dgamma, dbeta=dbeta, **p)
        ref = reference(spec, x, dy, p)
        x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
        n = x.size // c
        if training:
            mean64, var64 = x64.mean(axis=(0, 2), keepdims=True), x64.var(axis=(0, 2), keepdims=True)
        else:
            mean64, var64 = per_feature(spec, p["moving_mean"], 3), per_feature(spec, p["moving_variance"], 3)
        r = 1 / np.sqrt(var64 + spec.epsilon)
        dy_scale = np.abs(dy64).max()
        xhat_scale = np.abs((x64 - mean64) * r).max() + 1
        rtol = 2e-5  # float32 arithmetic, as in test_backward.py and test_half.py
        assert_within_one_ulp(dx, ref.dx, dtype, rtol * np.abs(p["gamma"]).max() * np.max(r) * dy_scale * (1 + 2 * xhat_scale**2))
        np.testing.assert_array_less(np.abs(dgamma - ref.dgamma), rtol * n * dy_scale * xhat_scale + 1e-45)
        np.testing.assert_array_less(np.abs(dbeta - ref.dbeta), rtol * n * dy_scale + 1e-45)

    check()


# -- every bit pattern, exactly ----------------------------------------------------------------
EPSILON = 2.0**-10  # moving_variance 1 - EPSILON: SCALE is gamma exactly, SHIFT 0
GAMMAS = np.array([1.0, 0.7, 3.0, 1.3 * 2.0**-11, -1.7])

# (id, dtype, toolchain, target, extra flags)
BUILDS = [
    ("f16-host-bits", "float16", HOST, "host", ()),
    ("f16-aarch64-native", "float16", AARCH64, "aarch64", ()),
    ("f16-cortex-m-native", "float16", CORTEX_M, "cortex-m", FP16_IEEE),
    ("f16-cortex-m-bits", "float16", CORTEX_M, "cortex-m", ()),
    ("bf16-host", "bfloat16", HOST, "host", ()),
    ("bf16-aarch64", "bfloat16", AARCH64, "aarch64", ()),
    ("bf16-cortex-m", "bfloat16", CORTEX_M, "cortex-m", ()),
]


@pytest.mark.parametrize("build_id,dtype,toolchain,target,extra", BUILDS, ids=[b[0] for b in BUILDS])
def test_every_bit_pattern_converts_exactly(tmp_path, build_id, dtype, toolchain, target, extra):
    """Load, one float multiply, store: bit for bit what NumPy's float32 product rounded
    to nearest even gives (NaN for NaN; -0 may come back +0 from the + SHIFT)."""
    spec = bngen.Spec((None, len(GAMMAS)), dtype=dtype, training=False, center=False, epsilon=EPSILON)
    params = {"gamma": GAMMAS, "moving_mean": np.zeros(len(GAMMAS)), "moving_variance": np.full(len(GAMMAS), 1 - EPSILON)}
    program = build_program(tmp_path, spec, toolchain, params=params, target=target, extra=extra)
    scale, shift = (v.astype(np.float32) for v in fold_parameters(spec, params))
    assert np.all(scale == GAMMAS.astype(np.float32)) and np.all(shift == 0)
    npdt = numpy_dtype(dtype)
    x = np.repeat(np.arange(1 << 16, dtype=np.uint16).view(npdt)[:, None], len(GAMMAS), axis=1)
    (out,) = program.run([Case(x.shape[0], 1, {"x": x}, {"y": None}, {})])
    with np.errstate(over="ignore", invalid="ignore"):  # infinities and NaNs on purpose
        want = (x.astype(np.float32) * scale + shift).astype(npdt).astype(np.float64)
    np.testing.assert_array_equal(out["y"].reshape(x.shape), want)


@pytest.mark.parametrize("toolchain,target,extra,pattern,native", [
    (HOST, "host", (), None, False),
    (AARCH64, "aarch64", (), r"\bfcvt\s+s\d+, h\d+", True),
    (CORTEX_M_OBJECTS, "cortex-m", FP16_IEEE, r"\bvcvtb\.f32\.f16\b", True),
    (CORTEX_M_OBJECTS, "cortex-m", (), r"\bvcvtb\.f32\.f16\b", False),
], ids=["host", "aarch64", "cortex-m-ieee", "cortex-m-no-fp16-format"])
def test_the_target_chooses_the_conversion(tmp_path, toolchain, target, extra, pattern, native):
    """float16 on aarch64 and Cortex-M4 (given -mfp16-format=ieee) converts in the FPU;
    without an IEEE __fp16 the same file falls back to the bit arithmetic; bfloat16 and
    the host target always use the bits."""
    toolchain.require()
    for dtype in ("float16", "bfloat16"):
        spec = bngen.Spec((None, 8), dtype=dtype, training=False)
        emit(spec, tmp_path, f"k_{dtype}", baked_params(spec), target=target)
        source = (tmp_path / f"k_{dtype}.c").read_text()
        uses_native = dtype == "float16" and target != "host"
        assert ("__fp16" in source) == uses_native, (target, dtype)
        assert ("#if defined(__ARM_FP16_FORMAT_IEEE)" in source) == uses_native
        assert "float_to_bits" in source or dtype == "bfloat16"  # the portable code is always there
        asm = tmp_path / f"k_{dtype}.s"
        toolchain.compile([tmp_path / f"k_{dtype}.c"], asm, warnings=STRICT, extra=("-S", *extra))
        text = asm.read_text()
        if pattern:
            assert bool(re.search(pattern, text)) == (native and dtype == "float16"), (target, dtype)


# -- the files ----------------------------------------------------------------------------------
def test_header_and_source(tmp_path):
    for dtype, words in (("float16", "float16 bit patterns\n * (IEEE binary16)"),
                         ("bfloat16", "bfloat16 bit patterns\n * (bfloat16: the top 16 bits of an IEEE binary32)")):
        spec = bngen.Spec((2, 8, 8, 16), dtype=dtype, training=False)
        emit(spec, tmp_path, "stem_bn", baked_params(spec), target="cortex-m")
        header = (tmp_path / "stem_bn.h").read_text()
        source = (tmp_path / "stem_bn.c").read_text()
        assert "void stem_bn(const uint16_t *x, uint16_t *y);" in header
        assert words in header and "rounded once, to nearest even" in header
        assert re.findall(r"^#include (\S+)", header, re.M) == ["<stddef.h>", "<stdint.h>"]
        assert set(re.findall(r"^#include (\S+)", source, re.M)) == {'"stem_bn.h"', "<stddef.h>", "<stdint.h>"}
        # the folded constants are float (the arithmetic type), exactly the folded values
        body = source.split("static const float SCALE[CHANNELS] = {")[1].split("}")[0]
        scale = [float.fromhex(t.strip().rstrip("f")) for t in body.split(",") if t.strip()]
        np.testing.assert_array_equal(scale, fold_parameters(spec, baked_params(spec))[0].astype(np.float32))
        assert "static const uint16_t" not in source
        # runtime parameters and statistics are float, data uint16_t
        emit(bngen.Spec((None, 6), dtype=dtype), tmp_path, "train", target="aarch64")
        header = (tmp_path / "train.h").read_text()
        for declaration in ("const uint16_t *x", "uint16_t *y", "const float *gamma", "float *moving_mean", "float *variance"):
            assert declaration in header, declaration
        assert "<math.h>" in (tmp_path / "train.c").read_text()


def test_emitting_twice_gives_identical_files(tmp_path):
    spec = bngen.Spec((None, 5, 7), axis=1, dtype="float16", training=False)
    for target in ("host", "cortex-m"):
        a = emit(spec, tmp_path / f"{target}a", "k", baked_params(spec), target=target, harness=True)
        b = emit(spec, tmp_path / f"{target}b", "k", baked_params(spec), target=target, harness=True)
        for pa, pb in zip(a, b):
            assert pa.read_bytes() == pb.read_bytes(), pa.name


# -- the harness ---------------------------------------------------------------------------------
HARNESS_SPECS = {
    "baked-f16": (bngen.Spec((2, 4, 4, 8), dtype="float16", training=False, activation="relu"), True),
    "train-bf16": (bngen.Spec((None, 8, 3), axis=1, dtype="bfloat16", unbiased=True), False),
}


@pytest.mark.parametrize("kind", list(HARNESS_SPECS))
def test_harness_passes_and_catches_a_wrong_kernel(tmp_path, kind):
    HOST.require()
    spec, baked = HARNESS_SPECS[kind]
    emit(spec, tmp_path, "bn", baked_params(spec) if baked else None, harness=True)
    vectors = tmp_path / "bn_test_vectors.h"
    assert "static const uint16_t bn_in_x[" in vectors.read_text()
    exe = HOST.compile([tmp_path / "bn.c", tmp_path / "bn_test.c"], tmp_path / "bn_test", link=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0 and "every output within tolerance" in run.stdout, run.stdout
    # an expected y off by twice its tolerance fails
    text = vectors.read_text()
    first = re.search(r"bn_want_y\[\d+\] = \{\n    (\S+?),", text).group(1)
    tol = float.fromhex(re.search(r"bn_tol_y = (\S+);", text).group(1).rstrip("f"))
    wrong = float.fromhex(first.rstrip("f")) + 2 * tol
    vectors.write_text(text.replace(first, float(np.float32(wrong)).hex() + "f", 1))
    exe = HOST.compile([tmp_path / "bn.c", tmp_path / "bn_test.c"], tmp_path / "bn_test_bad", link=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 1 and "FAILED" in run.stdout


@pytest.mark.parametrize("toolchain,target,extra", [(AARCH64, "aarch64", ()), (CORTEX_M, "cortex-m", FP16_IEEE)],
                         ids=["aarch64", "cortex-m"])
def test_harness_passes_on_the_emulated_board(tmp_path, toolchain, target, extra):
    toolchain.require()
    spec = bngen.Spec((1, 8, 8, 12), dtype="float16", training=False, activation="relu")
    emit(spec, tmp_path, "sensor_bn", params_for(12), target=target, harness=True)
    exe = toolchain.compile([tmp_path / "sensor_bn.c", tmp_path / "sensor_bn_test.c"], tmp_path / "sensor_bn_test",
                            warnings=STRICT, extra=extra, link=True)
    run = subprocess.run([*toolchain.runner, str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "sensor_bn: every output within tolerance" in run.stdout


# -- Cortex-M4 objects -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,spec", [
    ("baked", bngen.Spec((1, 32, 32, 16), dtype="float16", training=False, activation="relu")),
    ("baked", bngen.Spec((None, 16, 64), axis=1, dtype="bfloat16", training=False)),
    ("inference", bngen.Spec((None, 16, 64), axis=1, dtype="float16", training=False)),
    ("training", bngen.Spec((None, 64), dtype="float16", momentum=0.9, unbiased=True)),
    ("training", bngen.Spec((None, 16, 8, 8), axis=1, dtype="bfloat16")),
    ("mode1", bngen.Spec((None, 50), mode=1, dtype="float16")),
], ids=["baked-f16-nhwc", "baked-bf16-nchw", "infer-f16-nchw", "train-f16-nhwc", "train-bf16-nchw", "mode1-f16"])
@pytest.mark.parametrize("extra", [FP16_IEEE, ()], ids=["fp16-ieee", "bits"])
def test_cortex_m4_object_needs_no_helpers(tmp_path, kind, spec, extra):
    """-Os, -Wdouble-promotion: no allocator, no stdio, no double helper and no half
    conversion helper (__aeabi_h2f, __gnu_f2h_ieee, ...); baked inference references
    nothing at all."""
    CORTEX_M_OBJECTS.require()
    emit(spec, tmp_path, "bn", params_for(spec.channels) if kind == "baked" else None, target="cortex-m")
    obj = CORTEX_M_OBJECTS.compile([tmp_path / "bn.c"], tmp_path / "bn.o", warnings=STRICT + ("-Wdouble-promotion",), extra=extra)
    undefined = set(undefined_symbols("arm-none-eabi-nm", obj))
    assert not undefined & FORBIDDEN, undefined
    assert not [s for s in undefined if s.startswith(("__aeabi_d", "__aeabi_f2d", "__aeabi_h2f", "__aeabi_f2h", "__gnu_"))], undefined
    if kind == "baked":
        assert undefined == set(), undefined
    else:
        assert undefined <= {"sqrtf", "memset", "memcpy"}, undefined


def test_plan_of_each_target():
    """The conversion is the Target's choice, recorded in the plan; bfloat16 stays bits."""
    for target, f16 in (("host", "bits"), ("aarch64", "native"), ("cortex-m", "native")):
        tgt = get_target(target)
        assert export_plan(bngen.Spec((None, 4), dtype="float16"), "k", tgt).precision.half_conversion == f16
        assert export_plan(bngen.Spec((None, 4), dtype="bfloat16"), "k", tgt).precision.half_conversion == "bits"
        assert export_plan(bngen.Spec((None, 4)), "k", tgt).precision.half is None
