"""bngen.emit on the host: emitted C compiled strictly with gcc and run against the oracle.

Property tests: 12 exported kernels (baked, runtime-parameter inference, training, modes
1 and 2, the residual fusion; float32/float64/float16; the host and cortex-m arithmetic,
the latter checked on the host with -Wdouble-promotion; with and without OpenMP), 25
hypothesis examples each
(sizes of the dynamic dimensions, data offset and spread, parameters, NULL outputs), one
driver process per example.  Then the header, the includes, byte-identical re-emits,
in-place baked calls, the harness, and one test per class of bad argument.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess

import numpy as np
import pytest
from _emit_support import HOST, assert_matches, baked_params, build_program, draw_cases, params_for, undefined_symbols
from hypothesis import given, settings
from hypothesis import strategies as st

import bngen
from bngen.aot.emit import emit, export_plan, get_target, make_case

EXAMPLES = 25


# (id, spec, target, baked, extra compiler flags)
HOST_CASES = [
    ("baked-nhwc-f32-relu", bngen.Spec((1, 5, 4, 24), training=False, activation="relu", epsilon=1e-5), "host", True, ()),
    ("baked-nchw-f64-dynamic", bngen.Spec((None, 3, 4, None), axis=1, dtype="float64", training=False, scale=False), "host", True, ()),
    ("baked-nhwc-f32-openmp", bngen.Spec((None, 2, 40), training=False), "host", True, ("-fopenmp",)),
    ("infer-cl-f32", bngen.Spec((None, 7), training=False, center=False), "host", False, ()),
    ("train-nchw-f32", bngen.Spec((None, 6, 5, 4), axis=1, momentum=0.9, unbiased=True), "host", False, ()),
    ("train-nhwc-f32-openmp", bngen.Spec((None, 3, 20), activation="relu"), "host", False, ("-fopenmp",)),
    ("train-cl-cortexm-math", bngen.Spec((None, 40), momentum=0.9), "cortex-m", False, ()),
    ("mode1-f64", bngen.Spec((None, 33), mode=1, dtype="float64"), "host", False, ()),
    ("mode2-nchw-cortexm-math", bngen.Spec((None, 5, 6), axis=1, mode=2, training=False), "cortex-m", False, ()),
    # the residual fusion: y = relu(normalised x + residual)
    ("baked-nchw-f32-residual", bngen.Spec((None, 4, 6), axis=1, training=False, residual=True, activation="relu"),
     "host", True, ()),
    ("train-nhwc-f16-residual", bngen.Spec((None, 3, 16), dtype="float16", residual=True, activation="relu"),
     "host", False, ()),
    ("infer-nchw-residual-cortexm-math", bngen.Spec((None, 5, 7), axis=1, training=False, residual=True), "cortex-m",
     False, ()),
]


@pytest.mark.parametrize("case_id", [c[0] for c in HOST_CASES])
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_emitted_kernel_matches_oracle(host_programs, case_id, data):
    """Every entry point of the export (emit.calls), the first with a drawn set of NULL
    arguments, in one driver process per example."""
    program, params = host_programs(case_id)
    cases = draw_cases(data, program.plan, params)
    nullable = [a.name for a in program.entry.args if a.nullable]
    mask = data.draw(st.integers(0, 2 ** len(nullable) - 1), label="null_mask") if nullable else 0
    masks = [mask] + [_mask(program, c) for c in cases[1:]]
    results = program.run(cases, masks)
    skipped = {name for k, name in enumerate(nullable) if mask >> k & 1}
    assert set(results[0]) == set(cases[0].expected) - skipped
    assert_matches(cases[0], results[0])
    for case, outputs in zip(cases[1:], results[1:]):
        assert set(outputs) == set(case.expected)
        assert_matches(case, outputs)


def _mask(program, case):
    """The null_mask of a case's own NULL arguments."""
    nullable = [a.name for a in program.plan.entry(case.entry).args if a.nullable]
    return sum(1 << nullable.index(name) for name in case.null)


def test_constant_channel_gives_exactly_beta(tmp_path):
    """README, Semantics: a constant channel normalises to exactly beta (here on cortex-m maths too)."""
    for target in ("host", "cortex-m"):
        spec = bngen.Spec((None, 4), momentum=0.9)
        program = build_program(tmp_path / target, spec, HOST, target=target)
        x = np.tile(np.array([3.25, -1e4, 0.1, 7.0], np.float32), (37, 1))
        x[:, 3] = np.linspace(-1, 1, 37)
        values = {"gamma": np.full(4, 1.5, np.float32), "beta": np.array([0.5, -2, 3, 1], np.float32),
                  "moving_mean": np.zeros(4, np.float32), "moving_variance": np.ones(4, np.float32)}
        case = make_case(program.plan, x, values)
        (out,) = program.run([case])
        y = out["y"].reshape(37, 4)
        assert np.all(y[:, :3] == values["beta"][:3]), target
        assert np.all(out["variance"][:3] == 0), target


# -- the files ---------------------------------------------------------------------------
def test_baked_signature_is_exact(tmp_path):
    for dtype, ctype in (("float32", "float"), ("float64", "double")):
        spec = bngen.Spec((2, 8, 8, 16), dtype=dtype, training=False)
        emit(spec, tmp_path, "stem_bn", baked_params(spec))
        header = (tmp_path / "stem_bn.h").read_text()
        source = (tmp_path / "stem_bn.c").read_text()
        assert f"void stem_bn(const {ctype} *x, {ctype} *y);" in header
        assert f"void stem_bn(const {ctype} *x, {ctype} *y)\n{{" in source
        # the folded constants are there, exactly, and nothing computes them at run time
        assert "static const" in source and "sqrt" not in source.split("*/", 2)[-1].split("{", 1)[1]
        assert "<math.h>" not in source


def test_baked_constants_are_the_folded_parameters(tmp_path):
    spec = bngen.Spec((3, 4), training=False, epsilon=1e-3)
    p = {"gamma": np.array([1.0, 2.0, -1.0, 0.5]), "beta": np.array([0.0, 1.0, 2.0, -3.0]),
         "moving_mean": np.array([0.0, 1.0, -1.0, 4.0]), "moving_variance": np.array([1.0, 3.999, 0.249, 0.999])}
    emit(spec, tmp_path, "bn", p)
    source = (tmp_path / "bn.c").read_text()
    body = lambda tag: source.split(f"{tag}[CHANNELS] = {{")[1].split("}")[0]  # noqa: E731
    scale = [float.fromhex(t.strip().rstrip("f")) for t in body("SCALE").split(",") if t.strip()]
    shift = [float.fromhex(t.strip().rstrip("f")) for t in body("SHIFT").split(",") if t.strip()]
    a = p["gamma"] / np.sqrt(p["moving_variance"] + 1e-3)
    np.testing.assert_array_equal(scale, a.astype(np.float32))
    np.testing.assert_array_equal(shift, (p["beta"] - p["moving_mean"] * a).astype(np.float32))


def test_only_freestanding_headers_are_included(tmp_path):
    specs = {
        "baked": (bngen.Spec((None, 6), training=False), True),
        "infer": (bngen.Spec((None, 6, 3), axis=1, training=False), False),
        "train": (bngen.Spec((None, 6)), False),
        "mode1": (bngen.Spec((None, 6), mode=1), False),
    }
    for name, (spec, baked) in specs.items():
        emit(spec, tmp_path, name, baked_params(spec) if baked else None)
        c_includes = re.findall(r"^#include (\S+)", (tmp_path / f"{name}.c").read_text(), re.M)
        h_includes = re.findall(r"^#include (\S+)", (tmp_path / f"{name}.h").read_text(), re.M)
        allowed = {f'"{name}.h"', "<stddef.h>", "<stdint.h>"} | (set() if baked else {"<math.h>"})
        assert set(c_includes) <= allowed and set(h_includes) <= {"<stddef.h>", "<stdint.h>"}, name
        assert ("<math.h>" in c_includes) == (not baked), name
        text = (tmp_path / f"{name}.c").read_text()
        assert "#pragma omp" not in text, "pragmas must be guarded by #ifdef _OPENMP"
        assert not re.search(r"\b(malloc|calloc|free|printf|fopen)\b", text), name


def test_baked_object_needs_nothing(tmp_path):
    """Baked inference compiled freestanding references no symbol at all (no libm)."""
    HOST.require()
    spec = bngen.Spec((4, 9, 9, 8), training=False, activation="relu")
    emit(spec, tmp_path, "bn", baked_params(spec))
    obj = HOST.compile([tmp_path / "bn.c"], tmp_path / "bn.o", extra=("-ffreestanding", "-O2"))
    if shutil.which("nm"):
        assert undefined_symbols("nm", obj) == []


def test_emitting_twice_gives_identical_files(tmp_path):
    spec = bngen.Spec((None, 5, 7), axis=1, training=False)
    for kind, params in (("baked", baked_params(spec)), ("runtime", None)):
        for harness in (False, True):
            a = emit(spec, tmp_path / f"{kind}{harness}a", "k", params, harness=harness)
            b = emit(spec, tmp_path / f"{kind}{harness}b", "k", params, harness=harness)
            assert [p.name for p in a] == [p.name for p in b]
            for pa, pb in zip(a, b):
                assert pa.read_bytes() == pb.read_bytes(), pa.name
    # a loaded .npz gives the same file as the dict it was saved from
    np.savez(tmp_path / "p.npz", **baked_params(spec))
    with np.load(tmp_path / "p.npz") as npz:
        c = emit(spec, tmp_path / "npz", "k", npz)
    assert c[0].read_bytes() == (tmp_path / "bakedFalsea" / "k.c").read_bytes()


def test_header_documents_every_entry_and_argument(tmp_path):
    specs = [bngen.Spec((None, 6, 4), axis=1), bngen.Spec((None, 6), training=False), bngen.Spec((None, 6), mode=1),
             bngen.Spec((None, 3, 6), axis=1, mode=2, training=False, scale=False)]
    for i, spec in enumerate(specs):
        emit(spec, tmp_path, f"k{i}")
        header = (tmp_path / f"k{i}.h").read_text()
        plan = export_plan(spec, f"k{i}", get_target("host"))
        for entry in plan.entries:
            doc = header.split(f"/* {plan.symbol(entry)}:")[1].split("*/")[0]
            for arg in entry.args:
                assert re.search(rf"^ \*   {arg.name}\s", doc, re.M), (entry.name, arg.name)
        assert "Layout:" in header and "row-major" in header and "Units:" in header
        assert f"#define K{i}_CHANNELS {spec.channels}" in header


def test_header_compiles_as_cpp(tmp_path):
    if not shutil.which("g++"):
        pytest.skip("g++ not installed")
    spec = bngen.Spec((None, 6))
    emit(spec, tmp_path, "k")
    (tmp_path / "use.cpp").write_text('#include "k.h"\nint main() { return k_CHANNELS == 6 ? 0 : 1; }\n'.replace("k_", "K_"))
    subprocess.run(["g++", "-fsyntax-only", "-Wall", "-Werror", str(tmp_path / "use.cpp")], check=True, cwd=tmp_path)


def test_baked_kernel_runs_in_place(tmp_path):
    """Baked inference may write y over x; checked through ctypes on a shared object."""
    HOST.require()
    spec = bngen.Spec((None, 3, 16), axis=1, training=False)  # channels-first
    params = baked_params(spec)
    emit(spec, tmp_path, "bn", params)
    lib_path = HOST.compile([tmp_path / "bn.c"], tmp_path / "bn.so", extra=("-fPIC", "-shared"), link=True)
    lib = ctypes.CDLL(str(lib_path))
    x = np.random.default_rng(1).standard_normal((5, 3, 16)).astype(np.float32)
    want = bngen.oracle.forward(spec, x, params["gamma"], params["beta"], params["moving_mean"], params["moving_variance"]).y
    buf = x.copy()
    ptr = buf.ctypes.data_as(ctypes.c_void_p)
    lib.bn(ptr, ptr, ctypes.c_ssize_t(5))
    np.testing.assert_allclose(buf, want, rtol=1e-5, atol=1e-5)


# -- the harness ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["baked", "train"])
def test_harness_passes_and_catches_a_wrong_kernel(tmp_path, kind):
    HOST.require()
    spec = bngen.Spec((2, 4, 4, 8), training=False) if kind == "baked" else bngen.Spec((None, 8, 3), axis=1, unbiased=True)
    params = baked_params(spec) if kind == "baked" else None
    paths = emit(spec, tmp_path, "bn", params, harness=True)
    assert [p.name for p in paths] == ["bn.c", "bn.h", "bn_test.c", "bn_test_vectors.h"]
    exe = HOST.compile([tmp_path / "bn.c", tmp_path / "bn_test.c"], tmp_path / "bn_test", link=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout
    assert "every output within tolerance" in run.stdout
    # a kernel that is off by a little more than the tolerance fails
    vectors = tmp_path / "bn_test_vectors.h"
    text = vectors.read_text()
    first = re.search(r"bn_want_y\[\d+\] = \{\n    (\S+?),", text).group(1)
    wrong = float.fromhex(first.rstrip("f")) + 1e-2
    vectors.write_text(text.replace(first, float(np.float32(wrong)).hex() + "f", 1))
    exe = HOST.compile([tmp_path / "bn.c", tmp_path / "bn_test.c"], tmp_path / "bn_test_bad", link=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 1 and "FAILED" in run.stdout


# -- bad arguments: one test per class, nothing written ------------------------------------
def _refused(tmp_path, exc, match, *args, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(exc, match=match):
        emit(*args[:1], out, *args[1:], **kwargs)
    assert not out.exists(), "nothing may be written when emit refuses"


def test_bad_name(tmp_path):
    spec = bngen.Spec((None, 4))
    for bad in ("1bn", "bn-layer", "", "int", "__bn", "_Bn", 3, "bn layer"):
        _refused(tmp_path, (ValueError, TypeError), "name", spec, bad)
    # names the emitted code already uses inside
    baked = bngen.Spec((2, 4), training=False)
    for bad in ("SCALE", "OUTER", "CHANNELS"):
        _refused(tmp_path, ValueError, f"name: '{bad}' gives the C name", baked, bad, params_for(4))
    for bad in ("sqrtf", "memset"):  # the C library's own names
        _refused(tmp_path, ValueError, f"name: '{bad}' is a name of the C standard library", baked, bad, params_for(4))
    _refused(tmp_path, ValueError, "name: 'check' gives the C name", baked, "check", params_for(4), harness=True)


def test_bad_target(tmp_path):
    _refused(tmp_path, ValueError, "target.*cortex-m", bngen.Spec((None, 4)), "bn", target="avr")


def test_float64_on_cortex_m_is_refused(tmp_path):
    _refused(tmp_path, ValueError, "dtype: float64.*cortex-m", bngen.Spec((None, 4), dtype="float64"), "bn", target="cortex-m")


def test_params_for_a_spec_that_cannot_bake(tmp_path):
    p = params_for(4)
    for spec in (bngen.Spec((None, 4)), bngen.Spec((None, 4), mode=2, training=False), bngen.Spec((None, 4), mode=1, training=False)):
        _refused(tmp_path, ValueError, "params: only a mode-0 inference spec", spec, "bn", p)


def test_params_with_missing_unknown_or_unused_arrays(tmp_path):
    spec = bngen.Spec((None, 4), training=False)
    p = params_for(4)
    _refused(tmp_path, ValueError, "params: missing moving_variance", spec, "bn", {k: v for k, v in p.items() if k != "moving_variance"})
    _refused(tmp_path, ValueError, "params: unknown array.*running_std", spec, "bn", {**p, "running_std": p["moving_variance"]})
    _refused(tmp_path, ValueError, "params: gamma given.*scale=False", spec.replace(scale=False), "bn", p)
    _refused(tmp_path, TypeError, "params: expected a mapping", spec, "bn", [1, 2, 3])


def test_params_with_bad_values(tmp_path):
    spec = bngen.Spec((None, 4), training=False)
    p = params_for(4)
    _refused(tmp_path, ValueError, r"params: gamma has shape \(5,\)", spec, "bn", {**p, "gamma": np.ones(5)})
    _refused(tmp_path, ValueError, "params: beta holds NaN", spec, "bn", {**p, "beta": np.array([0, np.nan, 0, 0])})
    _refused(tmp_path, ValueError, "params: moving_variance \\+ epsilon must be > 0", spec, "bn",
             {**p, "moving_variance": np.array([1, -1, 1, 1.0])})
    _refused(tmp_path, TypeError, "params: gamma has dtype", spec, "bn", {**p, "gamma": np.array(["a"] * 4)})
    original = {k: v.copy() for k, v in p.items()}
    emit(spec, tmp_path / "ok", "bn", p)
    for k in p:
        np.testing.assert_array_equal(p[k], original[k])


def test_spec_must_be_a_spec(tmp_path):
    _refused(tmp_path, TypeError, "spec: expected a bngen.Spec", {"shape": [None, 4]}, "bn")


# -- the command ---------------------------------------------------------------------------
def test_emit_command(tmp_path, capsys):
    from bngen.tools.cli import main as cli_main

    spec = bngen.Spec((1, 16, 8), training=False, activation="relu")
    (tmp_path / "spec.json").write_text(spec.to_json())
    np.savez(tmp_path / "p.npz", **baked_params(spec))
    rc = cli_main(["emit", "--spec", str(tmp_path / "spec.json"), "--params", str(tmp_path / "p.npz"), "--name", "imu_bn",
                   "--out", str(tmp_path / "out"), "--target", "cortex-m", "--harness"])
    assert rc == 0
    printed = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[-1] for p in printed] == ["imu_bn.c", "imu_bn.h", "imu_bn_test.c", "imu_bn_test_vectors.h"]
    assert "void imu_bn(const float *x, float *y);" in (tmp_path / "out" / "imu_bn.h").read_text()
    # the same files as the Python call
    same = emit(spec, tmp_path / "py", "imu_bn", baked_params(spec), target="cortex-m", harness=True)
    for path in same:
        assert path.read_bytes() == (tmp_path / "out" / path.name).read_bytes()


def test_emit_command_errors(tmp_path, capsys):
    from bngen.tools.cli import main as cli_main

    (tmp_path / "spec.json").write_text(bngen.Spec((None, 4), dtype="float64").to_json())
    rc = cli_main(["emit", "--spec", str(tmp_path / "spec.json"), "--out", str(tmp_path / "o"), "--target", "cortex-m"])
    assert rc == 2 and "dtype: float64" in capsys.readouterr().err
    rc = cli_main(["emit", "--spec", str(tmp_path / "spec.json"), "--params", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "--params: cannot read" in capsys.readouterr().err
    rc = cli_main(["emit", "--spec", str(tmp_path / "spec.json"), "--name", "9x", "--out", str(tmp_path / "o")])
    assert rc == 2 and "name: '9x'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
