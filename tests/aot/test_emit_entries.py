"""Every entry point of every exported kind, in every dtype, on the host, under
qemu-aarch64 and under qemu-arm (Cortex-M4 code), against the float64 oracle.

Kinds: baked inference, inference with runtime parameters (NAME_inference and
NAME_backward_frozen), training (NAME_forward with and without its moving statistics,
NAME_backward), mode 2 and mode 1 (NAME_forward, NAME_backward); dtypes float32,
float64 (not on the Cortex-M4, which refuses it), float16 and bfloat16.  That is 20
exports built for the host, 20 for aarch64 and 15 for the Cortex-M4.

* Driver (tests/c/driver.c.j2, which runs any entry point): per export, 3 hypothesis
  examples, each a batch of every call of `emit.calls` on drawn sizes, data and dy run
  by one process; every output within the oracle's tolerance, and each output's check
  fails when one expected value is moved just outside it.
* Harness (`emit(..., harness=True)`, the self-test users run on their boards): every
  kind on the host and both emulated boards (dtypes rotating through the kinds) passes,
  and fails, naming the output, when any one expected array is perturbed: every array
  on the host, the training export's every array on the boards.

Each test skips when its toolchain is missing, except under BNGEN_REQUIRE_TOOLCHAINS
(set by CI), where it fails.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from _emit_support import AARCH64, CORTEX_M, HOST, STRICT, assert_matches, baked_params, build_program, draw_cases
from hypothesis import given, settings
from hypothesis import strategies as st

import bngen
from bngen.aot.emit import emit

EXAMPLES = 3
FP16_IEEE = ("-mfp16-format=ieee",)  # arm-none-eabi-gcc's IEEE __fp16: the FPU conversions

S = bngen.Spec
# kind: spec of a dtype; layouts, static/dynamic sizes and options vary between kinds.
KINDS = {
    "baked": lambda dt: S((None, 3, 4), axis=1, dtype=dt, training=False, activation="relu"),
    "inference": lambda dt: S((None, 5, None), axis=1, dtype=dt, training=False, activation="relu"),
    "training": lambda dt: S((None, 6, 3), axis=1 if dt in ("float32", "float16") else -1, dtype=dt,
                             momentum=0.9, unbiased=True),
    "mode2": lambda dt: S((None, 4, 3), axis=1, dtype=dt, mode=2, training=False, center=False),
    "mode1": lambda dt: S((None, 2, 10), axis=(1, 2), dtype=dt, mode=1, activation="relu"),
}
DTYPES = ("float32", "float64", "float16", "bfloat16")
# board: (toolchain, target, dtypes)
BOARDS = {
    "host": (HOST, "host", DTYPES),
    "aarch64": (AARCH64, "aarch64", DTYPES),
    "cortex-m": (CORTEX_M, "cortex-m", ("float32", "float16", "bfloat16")),
}
EXPORTS = [(board, kind, dt) for board, (_, _, dtypes) in BOARDS.items() for kind in KINDS for dt in dtypes]


def _flags(board, dtype):
    return FP16_IEEE if board == "cortex-m" and dtype == "float16" else ()


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """(board, kind, dtype) -> (program, baked parameters or None), built on first use."""
    built = {}

    def get(board, kind, dtype):
        key = (board, kind, dtype)
        if key not in built:
            toolchain, target, _ = BOARDS[board]
            spec = KINDS[kind](dtype)
            params = baked_params(spec) if kind == "baked" else None
            directory = tmp_path_factory.mktemp(f"{board}-{kind}-{dtype}")
            built[key] = (build_program(directory, spec, toolchain, params=params, target=target,
                                        extra=_flags(board, dtype)), params)
        return built[key]

    return get


def assert_perturbation_fails(case, outputs):
    """Each output's check fails when one of its expected values moves just outside the tolerance."""
    for key, got in outputs.items():
        i = len(got) // 2
        want = np.array(case.expected[key], np.float64).reshape(-1)
        want[i] = got[i] + 1.5 * case.tolerance[key] + abs(got[i]) * 1e-15 + 1e-300  # (a tolerance may be 0)
        moved = case._replace(expected={**case.expected, key: want})
        with pytest.raises(AssertionError, match=key):
            assert_matches(moved, {key: got})


@pytest.mark.parametrize("board,kind,dtype", EXPORTS, ids=["-".join(e) for e in EXPORTS])
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_every_entry_point_matches_oracle(programs, board, kind, dtype, data):
    program, params = programs(board, kind, dtype)
    cases = draw_cases(data, program.plan, params)
    assert {c.entry or program.plan.entries[0].name for c in cases} == {e.name for e in program.plan.entries}
    for case, outputs in zip(cases, program.run(cases)):
        assert set(outputs) == set(case.expected), case.entry
        assert_matches(case, outputs)
        assert_perturbation_fails(case, outputs)


def test_the_exports_have_the_entry_points_of_their_kind():
    """What the matrix above runs: the gradient of every kind but baked inference, and a
    training forward twice (moving statistics given, then NULL)."""
    from bngen.aot.emit import calls, export_plan, get_target

    def names(kind):
        plan = export_plan(KINDS[kind]("float32"), "k", get_target("host"), baked=kind == "baked")
        return [(e.name, null) for e, null in calls(plan)]

    assert names("baked") == [("bn", ())]
    assert names("inference") == [("bn_inference", ()), ("bn_backward_frozen", ())]
    assert names("training") == [("bn_forward", ()), ("bn_forward", ("moving_mean", "moving_variance")),
                                 ("bn_backward", ())]
    assert names("mode2") == names("mode1") == [("bn_forward", ()), ("bn_backward", ())]


# -- the harness ------------------------------------------------------------------------------
HARNESS_DTYPES = {"baked": "float16", "inference": "bfloat16", "training": "float32", "mode2": "float64", "mode1": "float16"}
HARNESS = [(board, kind) for board in BOARDS for kind in KINDS]


def _harness_dtype(board, kind):
    dtype = HARNESS_DTYPES[kind]
    return "float32" if dtype == "float64" and board == "cortex-m" else dtype


def _run_harness(toolchain, directory, kernel_obj, flags):
    exe = toolchain.compile([kernel_obj, directory / "bn_test.c"], directory / "bn_test",
                            warnings=("-std=c99", "-Wall", "-Wextra", "-Werror"), extra=flags, link=True)
    return subprocess.run([*toolchain.runner, str(exe)], capture_output=True, text=True)


@pytest.mark.parametrize("board,kind", HARNESS, ids=["-".join(h) for h in HARNESS])
def test_harness_checks_every_entry_point(tmp_path, board, kind):
    toolchain, target, _ = BOARDS[board]
    toolchain.require()
    dtype = _harness_dtype(board, kind)
    spec = KINDS[kind](dtype)
    emit(spec, tmp_path, "bn", baked_params(spec) if kind == "baked" else None, target=target, harness=True)
    flags = _flags(board, dtype)
    kernel = toolchain.compile([tmp_path / "bn.c"], tmp_path / "bn.o", warnings=STRICT, extra=flags)
    run = _run_harness(toolchain, tmp_path, kernel, flags)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "bn: every output within tolerance" in run.stdout
    from bngen.aot.emit import calls, export_plan, get_target

    plan = export_plan(spec, "bn", get_target(target), baked=kind == "baked")
    for entry, null in calls(plan):  # every call ran and reported
        assert re.search(rf"^{plan.symbol(entry)}{' [(]moving statistics NULL[)]' if null else ''}: ", run.stdout, re.M)
    vectors = (tmp_path / "bn_test_vectors.h").read_text()
    wanted = re.findall(r"static const \w+ (bn\w*_want_(\w+))\[\d+\] = \{\n    (\S+?),", vectors)
    assert len(wanted) == run.stdout.count(": ok")  # one check per expected array
    if board != "host" and kind != "training":
        wanted = wanted[:1]  # the boards perturb one array per kind, and every array of the training export
    for array, output, first in wanted:
        tol = float.fromhex(re.search(rf"{array.replace('_want_', '_tol_')} = (\S+);", vectors).group(1).rstrip("f"))
        wrong = float.fromhex(first.rstrip("f")) + 2 * tol + 1e-6 * abs(float.fromhex(first.rstrip("f")))
        literal = float(np.float32(wrong)).hex() + ("f" if first.endswith("f") else "")
        head = re.search(rf"{array}\[\d+\] = \{{\n    ", vectors).group(0)
        perturbed = vectors.replace(head + first + ",", head + literal + ",", 1)
        assert perturbed != vectors
        bad = tmp_path / array  # the test program again, beside its perturbed vectors
        bad.mkdir()
        for file in ("bn_test.c", "bn.h"):
            shutil.copy(tmp_path / file, bad)
        (bad / "bn_test_vectors.h").write_text(perturbed)
        run = _run_harness(toolchain, bad, kernel, flags)
        assert run.returncode == 1, (array, run.stdout)
        failed = [line.split()[0] for line in run.stdout.splitlines() if line.endswith("FAILED") and line.startswith("  ")]
        assert failed == [output], (array, run.stdout)


def test_a_missing_toolchain_fails_where_it_is_required(monkeypatch):
    """Locally a missing toolchain skips its tests; with BNGEN_REQUIRE_TOOLCHAINS (CI) it fails them."""
    from _emit_support import Toolchain

    absent = Toolchain("absent", "no-such-cc", (), (), (), ("no-such-cc",))
    monkeypatch.delenv("BNGEN_REQUIRE_TOOLCHAINS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="absent toolchain not installed"):
        absent.require()
    monkeypatch.setenv("BNGEN_REQUIRE_TOOLCHAINS", "1")
    with pytest.raises(pytest.fail.Exception, match="BNGEN_REQUIRE_TOOLCHAINS"):
        absent.require()
