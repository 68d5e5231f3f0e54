"""Shared fixtures: one session-wide temporary cache and a compiler that fails on warnings,
and the markers that say what each test needs.

No test touches the user's cache: BNGEN_CACHE_DIR points at a temporary directory for
the whole session (subprocesses inherit it), and the `build` fixture passes it
explicitly too.  ``BNGEN_TEST_CACHE=DIR`` opts in to a persistent test cache instead,
for fast warm reruns while developing (CI leaves it unset: every run is cold).

Markers (``pytest -m 'not cross'`` and so on): `compiler` (builds C with the host
compiler), `cross` (the aarch64 and arm-none-eabi toolchains and qemu-user), `torch`,
`keras` (the optional frameworks), `slow` (a minute or more of work).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from _emit_support import AARCH64, CORTEX_M, HOST, lazy_programs
from hypothesis import HealthCheck, settings

import bngen
from bngen.jit.compiler import STRICT_WARNINGS, Compiler

settings.register_profile(
    "default",
    deadline=None,  # the first example of a spec may compile (about 0.4 s)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


# The modules that compile nothing; every other one needs the host compiler.
PURE_PYTHON = {"test_spec", "test_frameworks", "test_fold", "test_style"}
# What test modules need beyond the host compiler.
NEEDS = {
    "test_emit_cross": ("cross",),
    "test_emit_half": ("cross",),
    "test_emit_entries": ("cross",),
    "test_torch_parity": ("torch",),
    "test_keras_parity": ("keras",),
    "test_keras_renorm": ("keras",),
    "test_half": ("torch",),
    "test_distributed": ("torch",),  # (its MPI test is marked mpi too)
}
SLOW = {"test_forward", "test_backward", "test_emit_half", "test_emit_entries", "test_distributed"}


def pytest_configure(config):
    for marker, meaning in [("compiler", "builds C with the host compiler"),
                            ("cross", "needs the aarch64 / arm-none-eabi toolchains and qemu-user"),
                            ("torch", "needs PyTorch"), ("keras", "needs Keras 3"),
                            ("mpi", "needs Open MPI's mpiexec and mpi4py"),
                            ("slow", "a minute or more of work")]:
        config.addinivalue_line("markers", f"{marker}: {meaning}")


def pytest_collection_modifyitems(items):
    for item in items:
        module = item.module.__name__.rpartition(".")[2] if item.module else ""
        if module not in PURE_PYTHON:
            item.add_marker("compiler")
        for marker in NEEDS.get(module, ()):
            item.add_marker(marker)
        if module in SLOW:
            item.add_marker("slow")


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """The cache every test builds into; also exported to subprocesses."""
    persistent = os.environ.get("BNGEN_TEST_CACHE")
    if persistent:
        root = Path(persistent).expanduser()
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = tmp_path_factory.mktemp("bngen-cache")
    old = os.environ.get("BNGEN_CACHE_DIR")
    os.environ["BNGEN_CACHE_DIR"] = str(root)
    yield root
    if old is None:
        os.environ.pop("BNGEN_CACHE_DIR", None)
    else:
        os.environ["BNGEN_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def strict_compiler():
    """The default compiler with -Wall -Wextra -Werror: a warning in a template fails."""
    return Compiler(warnings=STRICT_WARNINGS)


@pytest.fixture(scope="session")
def build(session_cache, strict_compiler):
    """`bngen.build` into the session cache with the strict compiler."""

    def _build(spec, **options):
        return bngen.build(spec, session_cache, compiler=strict_compiler, **options)

    return _build


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


# The exported programs of a test module: case id -> (program, baked parameters or None),
# each compiled and linked with the test driver on first use, from the module's
# HOST_CASES, AARCH64_CASES or CORTEX_M_CASES (see `_emit_support.lazy_programs`).
@pytest.fixture(scope="module")
def host_programs(request, tmp_path_factory):
    return lazy_programs(tmp_path_factory, HOST, request.module.HOST_CASES, "host")


@pytest.fixture(scope="module")
def aarch64_programs(request, tmp_path_factory):
    """Run under qemu-aarch64."""
    return lazy_programs(tmp_path_factory, AARCH64, request.module.AARCH64_CASES, "aarch64")


@pytest.fixture(scope="module")
def cortex_m_programs(request, tmp_path_factory):
    """Cortex-M4 code, run under qemu-arm."""
    return lazy_programs(tmp_path_factory, CORTEX_M, request.module.CORTEX_M_CASES, "cortex-m")
