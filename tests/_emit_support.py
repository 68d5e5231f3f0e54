"""Compiling and running exported kernels in the tests.

A `Toolchain` compiles the emitted NAME.c strictly (-std=c99 -Wall -Wextra -Wpedantic
-Werror) and links it with the batch driver of tests/c/driver.c.j2; a `Program` runs
it (natively, under qemu-aarch64, or under qemu-arm for Cortex-M4 code) on `Case`s of
any of its entry points and returns the outputs.  Toolchains that are not installed make
the tests skip, except where BNGEN_REQUIRE_TOOLCHAINS is set (CI sets it): there a missing
toolchain fails the test.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import jinja2
import numpy as np
import pytest
from hypothesis import strategies as st
from strategies import feature_shape

from bngen.aot.emit import Case, emit, export_plan, get_target, make_cases
from bngen.jit.kernel import numpy_dtype
from bngen.version import __version__

# C that only the tests use (the batch driver, the Arm system-call shim): not part of bngen.
TEST_C = Path(__file__).parent / "c"
STRICT = ("-std=c99", "-Wall", "-Wextra", "-Wpedantic", "-Werror")
# Symbols a freestanding Cortex-M object must not reference: no allocator, stdio, exit or libm.
FORBIDDEN = {"malloc", "calloc", "realloc", "free", "printf", "fprintf", "puts", "putchar", "fwrite", "fputs",
             "sprintf", "snprintf", "abort", "exit", "sqrt", "pow", "exp", "log"}
CORTEX_M4 = ("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16")
AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"


@dataclasses.dataclass(frozen=True)
class Toolchain:
    """A compiler, its flags, and how to run what it builds."""

    name: str
    cc: str
    flags: Tuple[str, ...]  # code generation, for the kernel and the driver
    link: Tuple[str, ...]  # extra link arguments
    runner: Tuple[str, ...]  # command prefix that runs a built program
    needs: Tuple[str, ...]  # executables (or paths) that must exist
    libs: Tuple[str, ...] = ()  # files the compiler must find (-print-file-name)

    def missing(self) -> List[str]:
        missing = [n for n in self.needs if (shutil.which(n) if "/" not in n else (n if os.path.exists(n) else None)) is None]
        if not missing:
            for lib in self.libs:
                found = subprocess.run([self.cc, f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
                if not os.path.isabs(found):
                    missing.append(lib)
        return missing

    def require(self) -> None:
        """Skips the calling test when a part of this toolchain is not installed (fails
        it instead where BNGEN_REQUIRE_TOOLCHAINS is set, as in CI)."""
        missing = self.missing()
        if missing:
            message = f"{self.name} toolchain not installed (missing {', '.join(missing)})"
            if os.environ.get("BNGEN_REQUIRE_TOOLCHAINS"):
                pytest.fail(message + "; BNGEN_REQUIRE_TOOLCHAINS is set, so it must be")
            pytest.skip(message)

    def require_openmp(self) -> None:
        """`require`, and skips the calling test when this compiler has no OpenMP (-fopenmp)."""
        self.require()
        probe = subprocess.run([self.cc, "-fopenmp", "-E", "-x", "c", "/dev/null"], capture_output=True)
        if probe.returncode != 0:
            pytest.skip(f"the {self.name} compiler has no OpenMP")

    def compile(self, sources: Sequence[Path], output: Path, *, warnings: Sequence[str] = STRICT,
                extra: Sequence[str] = (), link: bool = False) -> Path:
        cmd = [self.cc, *self.flags, *warnings, *extra]
        cmd += [*map(str, sources), "-o", str(output)] + (list(self.link) if link else ["-c"])
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)}\n{result.stderr}")
        return output


HOST_CC = os.environ.get("CC", "gcc") if shutil.which(os.environ.get("CC", "gcc")) else "cc"
HOST = Toolchain("host", HOST_CC, ("-O2",), ("-lm",), (), (HOST_CC,))
AARCH64 = Toolchain(
    "aarch64", "aarch64-linux-gnu-gcc", ("-O2",), ("-lm",), ("qemu-aarch64", "-L", AARCH64_SYSROOT),
    ("aarch64-linux-gnu-gcc", "qemu-aarch64", AARCH64_SYSROOT + "/lib/ld-linux-aarch64.so.1"),
)
# Cortex-M4 code (Thumb-2, FPv4-SP, -Os) run by qemu-arm, the Linux user-mode emulator
# (its default CPU executes the Cortex-M4 instruction set); tests/c/arm_linux_shim.c
# turns newlib's system calls into Linux ones.
CORTEX_M = Toolchain(
    "cortex-m", "arm-none-eabi-gcc", (*CORTEX_M4, "-Os"),
    ("--specs=nosys.specs", "-nostartfiles", str(TEST_C / "arm_linux_shim.c"), "-lm"),
    ("qemu-arm", "-cpu", "max"), ("arm-none-eabi-gcc", "qemu-arm"), libs=("nosys.specs",),
)
# Compiling Cortex-M4 objects and reading their symbols needs no emulator or C library.
CORTEX_M_OBJECTS = Toolchain("cortex-m", "arm-none-eabi-gcc", (*CORTEX_M4, "-Os"), (), (), ("arm-none-eabi-gcc", "arm-none-eabi-nm"))


class Program:
    """An exported kernel linked with its batch driver, which runs any of its entry points."""

    def __init__(self, plan, path: Path, toolchain: Toolchain):
        self.plan = plan
        self.path = path
        self.toolchain = toolchain
        self.entry = plan.entries[0]

    def run(self, cases: Sequence[Case], masks: Optional[Sequence[int]] = None) -> List[Dict[str, np.ndarray]]:
        """The outputs of each case, by argument name (NULL-skipped ones absent).  A case
        runs the entry point it names (`Case.entry`, default the first) with its `null`
        arguments passed as NULL, or those of `masks` (bit k: the k-th nullable argument)."""
        spec = self.plan.spec
        data_dt, param_dt = numpy_dtype(spec.dtype), np.dtype(spec.param_dtype)
        chunks, runs = [], []
        for k, case in enumerate(cases):
            index = 0 if case.entry is None else [e.name for e in self.plan.entries].index(case.entry)
            entry = self.plan.entries[index]
            nullable = [a.name for a in entry.args if a.nullable]
            mask = masks[k] if masks is not None else sum(1 << nullable.index(n) for n in case.null)
            runs.append((entry, nullable, mask))
            chunks.append(np.array([index, case.outer, case.inner, mask], np.int64).tobytes())
            for arg in entry.args:
                if arg.role in ("data_in", "param_in", "param_inout"):
                    dt = data_dt if arg.role == "data_in" else param_dt
                    chunks.append(np.ascontiguousarray(case.inputs[arg.name], dt).tobytes())
        result = subprocess.run([*self.toolchain.runner, str(self.path)], input=b"".join(chunks), capture_output=True)
        if result.returncode != 0:
            raise AssertionError(f"{self.path.name} failed ({result.returncode}): {result.stderr.decode(errors='replace')}")
        out, offset, outputs = result.stdout, 0, []
        for case, (entry, nullable, mask) in zip(cases, runs):
            values = {}
            for arg in entry.args:
                if arg.role not in ("data_out", "stat_out", "param_inout", "grad_out"):
                    continue
                if arg.nullable and mask >> nullable.index(arg.name) & 1:
                    continue
                if arg.role == "data_out":
                    count, dt = case.outer * self.plan.channels * case.inner, data_dt
                else:
                    count = case.outer if (spec.mode == 1 and arg.name in ("mean", "variance")) else self.plan.channels
                    dt = param_dt
                values[arg.name] = np.frombuffer(out, dt, count, offset).astype(np.float64)
                offset += count * dt.itemsize
            outputs.append(values)
        assert offset == len(out), f"driver wrote {len(out)} bytes, expected {offset}"
        return outputs


def render_driver(plan) -> str:
    """A C program that runs any entry point of `plan` on binary cases from stdin and
    writes its outputs to stdout (tests/c/driver.c.j2 says the format)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEST_C)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, autoescape=False)
    return env.get_template("driver.c.j2").render(plan=plan, spec=plan.spec, name=plan.prefix, version=__version__)


def build_program(directory: Path, spec, toolchain: Toolchain, *, name: str = "k", params=None,
                  target: str = "host", extra: Sequence[str] = ()) -> Program:
    """Emit `spec` into `directory`, compile it strictly and link the driver."""
    toolchain.require()
    directory.mkdir(parents=True, exist_ok=True)
    emit(spec, directory, name, params, target=target)
    plan = export_plan(spec, name, get_target(target), baked=params is not None)
    driver = directory / f"{name}_driver.c"
    driver.write_text(render_driver(plan))
    warnings = STRICT + (("-Wdouble-promotion",) if get_target(target).single_precision else ())
    kernel = toolchain.compile([directory / f"{name}.c"], directory / f"{name}.o", warnings=warnings, extra=extra)
    drv = toolchain.compile([driver], directory / f"{name}_driver.o", warnings=("-std=c99", "-Wall", "-Wextra", "-Werror"))
    exe = toolchain.compile([kernel, drv], directory / f"{name}.elf", warnings=(), extra=extra, link=True)
    return Program(plan, exe, toolchain)


def assert_matches(case: Case, outputs: Dict[str, np.ndarray]) -> None:
    """Every output of `outputs` within the case's tolerance of the oracle."""
    for key, got in outputs.items():
        want = np.asarray(case.expected[key], np.float64).reshape(-1)
        err = np.abs(got - want)
        tol = case.tolerance[key]
        bad = ~(err <= tol)
        assert not bad.any(), (
            f"{key}: {int(bad.sum())} of {got.size} values off by up to {np.nanmax(err):.3g} (tolerance {tol:.3g}); "
            f"first at {int(np.argmax(bad))}: got {got[np.argmax(bad)]!r}, want {want[np.argmax(bad)]!r}"
        )


def undefined_symbols(nm: str, obj: Path) -> List[str]:
    """The symbols an object file references but does not define."""
    result = subprocess.run([nm, "-u", str(obj)], capture_output=True, text=True, check=True)
    return sorted(line.split()[-1] for line in result.stdout.splitlines() if line.strip())


def params_for(c, seed=7, scale=True, center=True):
    """Float64 parameters of C features to bake into an export (gamma with either sign)."""
    rng = np.random.default_rng(seed)
    p = {"moving_mean": rng.normal(0, 2, c), "moving_variance": rng.uniform(0.05, 4, c)}
    if scale:
        p["gamma"] = rng.uniform(0.5, 2, c) * rng.choice([-1, 1], c)
    if center:
        p["beta"] = rng.normal(0, 1, c)
    return p


def baked_params(spec):
    """`params_for` the features of `spec`: the parameters its baked export takes."""
    return params_for(spec.channels, scale=spec.scale, center=spec.center)


def draw_case(data, plan, params=None):
    """A `Case` of the first entry point of `plan`: dynamic sizes, data offset and spread
    drawn by hypothesis."""
    return draw_cases(data, plan, params)[0]


def draw_cases(data, plan, params=None):
    """A `Case` of every call of `emit.calls(plan)` (every entry point, a training forward
    also without its moving statistics), all on one x, with dy for the gradients (and a
    residual for a ``residual=True`` forward):
    dynamic sizes, data offset and spread drawn by hypothesis."""
    spec = plan.spec
    shape = [data.draw(st.integers(1, 6), label=f"dim{i}") if d is None else d for i, d in enumerate(spec.shape)]
    if spec.updates_moving_stats and spec.unbiased:
        first, last = spec.axis[0], spec.axis[-1]
        if np.prod(shape[:first]) * np.prod(shape[last + 1:]) < 2:
            shape[next(i for i, d in enumerate(spec.shape) if d is None)] = 2
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    offset = data.draw(st.sampled_from([0.0, 1.0, 100.0, 1e4]), label="offset")
    rng = np.random.default_rng(seed)
    c = spec.channels
    bshape = feature_shape(spec, len(shape))
    centre = offset * rng.uniform(-1, 1, c)
    spread = 10 ** rng.uniform(-2, 1, c)
    x = (centre.reshape(bshape) + spread.reshape(bshape) * rng.standard_normal(shape)).astype(numpy_dtype(spec.dtype))
    if params is None:  # runtime parameters, passed to the kernel in its parameter dtype
        params = {
            "gamma": rng.uniform(0.5, 2, c) * rng.choice([-1, 1], c), "beta": rng.normal(0, 1, c),
            "moving_mean": centre + rng.normal(0, 1, c) * spread, "moving_variance": spread**2 * rng.uniform(0.5, 2, c),
        }
        params = {k: v.astype(spec.param_dtype) for k, v in params.items()}
    dy = (rng.standard_normal(shape) * 10 ** rng.uniform(-2, 2)).astype(numpy_dtype(spec.dtype))
    residual = (rng.standard_normal(shape) * 10 ** rng.uniform(-2, 2)).astype(numpy_dtype(spec.dtype)) \
        if spec.residual else None
    return make_cases(plan, x, params, dy, residual)  # baked: the float64 values its constants were folded from


def lazy_programs(tmp_path_factory, toolchain: "Toolchain", cases, target):
    """A function case_id -> (program, params), building each case's program on first use.

    A case is ``(id, spec, baked)``, ``(id, spec, baked, extra_flags)`` or
    ``(id, spec, target, baked, extra_flags)`` (a target of its own); with ``-fopenmp``
    among its flags it needs a compiler with OpenMP."""
    built = {}

    def get(case_id):
        if case_id not in built:
            case = next(c for c in cases if c[0] == case_id)
            spec = case[1]
            baked, extra = (case[2], ()) if len(case) == 3 else (case[-2], case[-1])
            toolchain.require_openmp() if "-fopenmp" in extra else toolchain.require()
            case_target = case[2] if len(case) == 5 else target
            params = baked_params(spec) if baked else None
            directory = tmp_path_factory.mktemp(f"{toolchain.name}-{case_id}")
            program = build_program(directory, spec, toolchain, params=params, target=case_target, extra=extra)
            built[case_id] = (program, params)
        return built[case_id]

    return get
