"""Shared fixtures: one session-wide temporary cache and a compiler that fails on warnings.

No test touches the user's cache: BNGEN_CACHE_DIR points at a temporary directory for
the whole session (subprocesses inherit it), and the `build` fixture passes it
explicitly too.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import bngen
from bngen.compiler import STRICT_WARNINGS, Compiler

settings.register_profile(
    "default",
    deadline=None,  # the first example of a spec may compile (about 0.4 s)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """The cache every test builds into; also exported to subprocesses."""
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
