"""The on-disk cache: hits across processes, concurrent builders, damaged entries,
unusable directories, and the precedence of cache locations.

Specs: 6 small kernels, each in its own temporary cache so the compile counts are
exact; subprocesses run `python -c` with this checkout on PYTHONPATH.  No hypothesis.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import bngen
from bngen.jit import cache as cache_mod
from bngen.jit.compiler import Compiler

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent(
    """
    import sys, time, json
    import numpy as np
    import bngen
    from bngen import oracle
    from bngen.jit.compiler import Compiler
    if "--forbid-compile" in sys.argv:
        def refuse(*a, **k):
            raise SystemExit("compiled although the cache had the kernel")
        Compiler.compile = refuse
    spec = bngen.Spec.from_json(sys.argv[1])
    t = time.perf_counter()
    kernel = bngen.build(spec, sys.argv[2])
    load = time.perf_counter() - t
    x = np.random.default_rng(1).standard_normal((5, spec.channels)).astype(np.float32)
    g, b = np.ones(spec.channels, np.float32), np.zeros(spec.channels, np.float32)
    y = kernel(x, g, b)
    err = float(np.abs(y - oracle.forward(spec, x, g, b).y).max())
    print(json.dumps({"load_ms": load * 1e3, "error": err}))
    """
)


def run_child(spec, cache_dir, *flags, env=None):
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    out = subprocess.run(
        [sys.executable, "-c", CHILD, spec.to_json(), str(cache_dir), *flags],
        capture_output=True, text=True, env=full_env, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def counting_cc(tmp_path, delay=0.0):
    """A compiler wrapper that logs each kernel compile (not probes) to a file."""
    log = tmp_path / "compiles.log"
    script = tmp_path / "cc-counting"
    script.write_text(
        "#!/bin/sh\n"
        f'case "$*" in *-shared*) echo "$$" >> "{log}"; sleep {delay};; esac\n'
        'exec cc "$@"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script, log


def test_hit_in_a_new_process_does_not_compile(tmp_path):
    spec = bngen.Spec((None, 7), momentum=0.5)
    first = run_child(spec, tmp_path)
    second = run_child(spec, tmp_path, "--forbid-compile")
    assert first["error"] < 1e-5 and second["error"] < 1e-5
    assert len(cache_mod.Cache(tmp_path).entries()) == 1


def test_four_processes_compile_one_new_spec_once(tmp_path):
    cc, log = counting_cc(tmp_path, delay=0.5)
    spec = bngen.Spec((None, 9), epsilon=0.25)
    env = dict(os.environ, PYTHONPATH=str(ROOT), CC=str(cc))
    procs = [
        subprocess.Popen([sys.executable, "-c", CHILD, spec.to_json(), str(tmp_path / "cache")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(4)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1])["error"] < 1e-5
    assert len(log.read_text().split()) == 1, "the kernel was compiled more than once"


def test_truncated_shared_object_is_rebuilt(tmp_path):
    spec = bngen.Spec((None, 5), epsilon=0.5)
    run_child(spec, tmp_path)
    (entry,) = cache_mod.Cache(tmp_path).entries()
    manifest = json.loads((entry / "manifest.json").read_text())
    shared = entry / manifest["object"]
    shared.write_bytes(shared.read_bytes()[:1000])
    assert cache_mod.Cache(tmp_path).lookup(entry.name) is None
    assert run_child(spec, tmp_path)["error"] < 1e-5
    assert shared.stat().st_size == manifest["size"]


def test_missing_manifest_means_rebuild(tmp_path):
    spec = bngen.Spec((None, 5), epsilon=0.125)
    run_child(spec, tmp_path)
    (entry,) = cache_mod.Cache(tmp_path).entries()
    (entry / "manifest.json").unlink()
    assert run_child(spec, tmp_path)["error"] < 1e-5
    assert cache_mod.Cache(tmp_path).entries() == [entry]


def test_unusable_cache_directory_falls_back_with_a_warning(tmp_path, strict_compiler):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    spec = bngen.Spec((None, 3), epsilon=0.375)
    with pytest.warns(cache_mod.CacheWarning, match="not usable"):
        kernel = bngen.build(spec, blocker / "cache", compiler=strict_compiler)
    x = np.ones((2, 3), np.float32)
    y = kernel(x, np.ones(3, np.float32), np.zeros(3, np.float32))
    np.testing.assert_array_equal(y, np.zeros((2, 3), np.float32))


def test_read_only_cache_directory_falls_back(tmp_path, strict_compiler):
    """A directory nobody may write into; root ignores modes, so as root (CI) it is one in
    /proc, where not even root creates directories."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    root_user = hasattr(os, "geteuid") and os.geteuid() == 0
    try:
        with pytest.warns(cache_mod.CacheWarning, match="not usable"):
            bngen.build(bngen.Spec((None, 3), epsilon=0.4375), "/proc/bngen-cache" if root_user else ro,
                        compiler=strict_compiler)
    finally:
        ro.chmod(0o700)


def test_repeated_build_is_memoised(tmp_path, strict_compiler):
    spec = bngen.Spec((None, 4), epsilon=0.0625)
    first = bngen.build(spec, tmp_path, compiler=strict_compiler)
    again = bngen.build(bngen.Spec((None, 4), epsilon=0.0625), tmp_path, compiler=strict_compiler)
    assert again is first  # a rebuild (or a reload from disk) would make a new Kernel


def test_key_covers_compiler_flags(tmp_path):
    spec = bngen.Spec((None, 4), epsilon=0.03125)
    a = bngen.build(spec, tmp_path, compiler=Compiler(flags=("-O2",)))
    b = bngen.build(spec, tmp_path, compiler=Compiler(flags=("-O3",)))
    assert a is not b
    assert len(cache_mod.Cache(tmp_path).entries()) == 2


def test_cache_location_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("BNGEN_CACHE_DIR", str(tmp_path / "env"))
    assert cache_mod.resolve_root(tmp_path / "arg") == tmp_path / "arg"
    assert cache_mod.resolve_root() == tmp_path / "env"
    monkeypatch.delenv("BNGEN_CACHE_DIR")
    assert "bngen" in str(cache_mod.resolve_root())


def test_entry_holds_source_and_spec(tmp_path, strict_compiler):
    spec = bngen.Spec((None, 6), epsilon=0.015625)
    kernel = bngen.build(spec, tmp_path, compiler=strict_compiler)
    (entry,) = cache_mod.Cache(tmp_path).entries()
    assert (entry / "kernel.c").read_text() == kernel.source
    assert bngen.Spec.from_json((entry / "spec.json").read_text()) == spec
