"""Exported kernels on Arm: aarch64 under qemu-aarch64, Cortex-M4 code under qemu-arm,
and Cortex-M4 objects checked with arm-none-eabi-nm.  Each test skips when its
toolchain is not installed (fails under BNGEN_REQUIRE_TOOLCHAINS, as in CI).

Property tests: 3 aarch64 kernels and 3 Cortex-M4 kernels, 8 hypothesis examples each,
every example a batch of 3 draws of every entry point's calls (emit.calls) run by one
emulated process.  Plus: the harness on both emulators, and the symbols of 6 Cortex-M4
objects (kinds x layouts).  tests/aot/test_emit_entries.py runs every kind and dtype.
"""

from __future__ import annotations

import subprocess

import pytest
from _emit_support import (
    AARCH64,
    CORTEX_M,
    CORTEX_M4,
    CORTEX_M_OBJECTS,
    FORBIDDEN,
    STRICT,
    assert_matches,
    draw_cases,
    params_for,
    undefined_symbols,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import bngen
from bngen.aot.emit import emit

EXAMPLES = 8
CASES_PER_RUN = 3

# (id, spec, baked)
AARCH64_CASES = [
    ("baked-nhwc-f32-relu", bngen.Spec((2, 6, 6, 32), training=False, activation="relu", epsilon=1e-5), True),
    ("train-nchw-f32", bngen.Spec((None, 4, 3, 5), axis=1, momentum=0.9, unbiased=True), False),
    ("mode1-f64", bngen.Spec((None, 20), mode=1, dtype="float64"), False),
]
CORTEX_M_CASES = [
    ("baked-nchw-dynamic", bngen.Spec((None, 3, 10), axis=1, training=False, center=False), True),
    ("train-cl-partial-tile", bngen.Spec((None, 40), momentum=0.9, activation="relu"), False),
    ("mode1", bngen.Spec((None, 24), mode=1), False),
]


def _check_batch(program, params, data):
    cases = [case for _ in range(CASES_PER_RUN) for case in draw_cases(data, program.plan, params)]
    for case, outputs in zip(cases, program.run(cases)):
        assert set(outputs) == set(case.expected)
        assert_matches(case, outputs)


@pytest.mark.parametrize("case_id", [c[0] for c in AARCH64_CASES])
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_aarch64_under_qemu_matches_oracle(aarch64_programs, case_id, data):
    _check_batch(*aarch64_programs(case_id), data)


@pytest.mark.parametrize("case_id", [c[0] for c in CORTEX_M_CASES])
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_cortex_m4_code_under_qemu_matches_oracle(cortex_m_programs, case_id, data):
    _check_batch(*cortex_m_programs(case_id), data)


@pytest.mark.parametrize("toolchain,target", [(AARCH64, "aarch64"), (CORTEX_M, "cortex-m")], ids=["aarch64", "cortex-m"])
def test_harness_passes_on_the_emulated_board(tmp_path, toolchain, target):
    toolchain.require()
    spec = bngen.Spec((1, 8, 8, 12), training=False, activation="relu")
    emit(spec, tmp_path, "sensor_bn", params_for(12), target=target, harness=True)
    exe = toolchain.compile([tmp_path / "sensor_bn.c", tmp_path / "sensor_bn_test.c"], tmp_path / "sensor_bn_test",
                            warnings=("-std=c99", "-Wall", "-Wextra", "-Werror"), link=True)
    run = subprocess.run([*toolchain.runner, str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "sensor_bn: every output within tolerance" in run.stdout


# -- what a Cortex-M4 object references ------------------------------------------------------
@pytest.mark.parametrize("kind,spec", [
    ("baked", bngen.Spec((1, 32, 32, 16), training=False, activation="relu")),
    ("baked", bngen.Spec((None, 16, 64), axis=1, training=False)),
    ("inference", bngen.Spec((None, 16, 64), axis=1, training=False)),
    ("training", bngen.Spec((None, 64), momentum=0.9, unbiased=True)),
    ("training", bngen.Spec((None, 16, 8, 8), axis=1)),
    ("mode1", bngen.Spec((None, 50), mode=1)),
], ids=["baked-nhwc", "baked-nchw", "infer-nchw", "train-nhwc", "train-nchw", "mode1"])
def test_cortex_m4_object_is_single_precision_and_needs_no_allocator_or_io(tmp_path, kind, spec):
    """-Os for Cortex-M4 with -Wdouble-promotion: no double helper (__aeabi_d*), no
    allocator, no stdio; baked inference references nothing at all (no sqrtf, no libm)."""
    CORTEX_M_OBJECTS.require()
    emit(spec, tmp_path, "bn", params_for(spec.channels) if kind == "baked" else None, target="cortex-m")
    obj = tmp_path / "bn.o"
    cmd = ["arm-none-eabi-gcc", *CORTEX_M4, "-Os", *STRICT, "-Wdouble-promotion", "-c", str(tmp_path / "bn.c"), "-o", str(obj)]
    subprocess.run(cmd, check=True, capture_output=True)
    undefined = set(undefined_symbols("arm-none-eabi-nm", obj))
    assert not undefined & FORBIDDEN, undefined
    assert not [s for s in undefined if s.startswith("__aeabi_d") or s.startswith("__aeabi_f2d")], undefined
    if kind == "baked":
        assert undefined == set(), undefined
    else:
        # the only libm function is sqrtf (once per feature); GCC's freestanding code
        # may call memset/memcpy.
        assert undefined <= {"sqrtf", "memset", "memcpy"}, undefined
