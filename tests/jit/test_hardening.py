"""Hardening (issue 16): what an attacker or a careless user tried, each a test that
failed before its fix (the comment or docstring says how).

Compiled specs: about 15 small ones (the fork child's, two cache entries, the fallback
builds, five overflow specs), mostly in their own temporary caches; no hypothesis here
(the fuzz targets are in test_fuzz.py).  Subprocess tests run `python -c` with this
checkout on PYTHONPATH, with a timeout.  As root (CI) the ownership tests chown files to
another uid; as anyone else they use group/other-writable modes, the same refusal.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import bngen
from bngen import oracle
from bngen.core.dtypes import numpy_dtype
from bngen.jit import cache as cache_mod
from bngen.jit.compiler import CompileError, Compiler

ROOT = Path(__file__).resolve().parents[2]


def run_python(code: str, *args: str, timeout: float = 120, env=None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


# -- fork after OpenMP ------------------------------------------------------------------------
FORK_CHILD = """
    import os, sys
    import numpy as np
    import bngen
    from bngen.core.threads import default_threads
    kernel = bngen.build(bngen.Spec((None, 64, 32, 32), axis=1), sys.argv[1])
    x = np.random.default_rng(0).standard_normal((16, 64, 32, 32)).astype(np.float32)
    g, b = np.ones(64, np.float32), np.zeros(64, np.float32)
    want = kernel.forward(x, g, b, threads=2)[0]  # the parent's OpenMP pool is now running
    pid = os.fork()
    if pid == 0:
        # a default-thread call in the child hung forever in libgomp before the fix
        y = kernel.forward(x, g, b)[0]
        y2 = kernel(x, g, b)
        ok = default_threads() == 1 and np.allclose(y, want, atol=1e-5) and np.allclose(y2, want, atol=1e-5)
        try:  # an explicit team would hang in libgomp: a clear error instead
            kernel.forward(x, g, b, threads=2)
            ok = False
        except ValueError as exc:
            ok = ok and str(exc).startswith("threads:") and "fork" in str(exc)
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    print("child exit", os.waitstatus_to_exitcode(status))
    assert default_threads() >= 1
    kernel.forward(x, g, b, threads=2)  # the parent still runs threaded
"""


def test_forked_child_runs_kernels_single_threaded(tmp_path):
    """Before the fix the child hung (the timeout fails the test); now it computes with one thread."""
    out = run_python(FORK_CHILD, str(tmp_path), timeout=90)
    assert out.returncode == 0, out.stderr
    assert "child exit 0" in out.stdout


# -- hostile spec values and JSON ---------------------------------------------------------------
@pytest.mark.parametrize("fields, match", [
    (dict(shape=(4,), epsilon=10**400), "epsilon"),  # OverflowError before
    (dict(shape=(4,), momentum=10**400), "momentum"),
    (dict(shape=(4,), axis=10**5000), "axis"),  # ValueError (int too long to print) before
    (dict(shape=[10**5000]), "shape"),
    (dict(shape=(4,), mode=10**5000), "mode"),
    (dict(shape=(4,), activation=np.array([1, 2])), "activation"),  # ambiguous truth value before
    (dict(shape=(2**40, 2**40)), "ptrdiff_t"),  # more elements than C can index
    (dict(shape=(None, 2**32, 2**32)), "ptrdiff_t"),
])
def test_hostile_spec_values_are_spec_errors(fields, match):
    with pytest.raises(bngen.SpecError, match=match):
        bngen.Spec(**fields)


@pytest.mark.parametrize("text, match", [
    ('{"shape": [4], "epsilon": ' + "1" * 5000 + "}", "not valid JSON"),  # ValueError (digit limit) before
    ('{"shape": [4], "epsilon": 1' + "0" * 400 + "}", "epsilon"),  # OverflowError before
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),  # RecursionError before
    (b'{"shape": [4], "dtype": "\xff"}', "UTF-8"),  # UnicodeDecodeError before
    ('{"shape": [4], "1": 2}', "unknown field"),
    (None, "JSON text"),
])
def test_hostile_json_is_a_spec_error(text, match):
    with pytest.raises(bngen.SpecError, match=match):
        bngen.Spec.from_json(text)


def test_non_string_keys_are_a_spec_error():
    with pytest.raises(bngen.SpecError, match="field names must be strings"):
        bngen.Spec.from_dict({1: 2, "shape": [3]})  # TypeError (sorting int and str) before


# -- importers accept batch norms only -----------------------------------------------------------
def test_from_torch_refuses_other_norm_layers():
    torch = pytest.importorskip("torch")
    for module in (torch.nn.LayerNorm(4), torch.nn.GroupNorm(2, 4), torch.nn.InstanceNorm2d(4)):
        with pytest.raises(bngen.SpecError, match=type(module).__name__):  # accepted before
            bngen.Spec.from_torch(module, (None, 4, 3, 3))
    for module in (torch.nn.BatchNorm2d(4), torch.nn.SyncBatchNorm(4)):
        assert bngen.Spec.from_torch(module, (None, 4, 3, 3)).channels == 4


def test_from_keras_refuses_other_layers_and_their_configs():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    for layer in (keras.layers.Dense(4), keras.layers.LayerNormalization()):
        with pytest.raises(bngen.SpecError, match=type(layer).__name__):  # accepted before
            bngen.Spec.from_keras(layer, (None, 4))
        with pytest.raises(bngen.SpecError, match="not a BatchNormalization config"):
            bngen.Spec.from_keras(layer.get_config(), (None, 4))
    assert bngen.Spec.from_keras(keras.layers.BatchNormalization(), (None, 4)).channels == 4
    assert bngen.Spec.from_keras(keras.layers.BatchNormalization().get_config(), (None, 4)).channels == 4


# -- the layer ---------------------------------------------------------------------------------------
def test_layer_with_the_batch_axis_as_feature_axis_is_refused_and_left_unbuilt(tmp_path):
    layer = bngen.BatchNormalization(axis=0, cache_dir=tmp_path)
    x = np.ones((4, 3), np.float32)
    for _ in range(2):  # before: built with one bogus weight per batch, then every call failed on shape
        with pytest.raises(bngen.SpecError, match="axis"):
            layer(x, training=True)
        assert not layer.built and layer.get_weights() == []


# -- the command line's files ------------------------------------------------------------------------
@pytest.fixture
def files(tmp_path):
    np.savez(tmp_path / "layer.npz", weight=np.ones((4, 3)), bias=np.zeros(4))
    np.savez(tmp_path / "bn.npz", moving_mean=np.zeros(4), moving_variance=np.ones(4))
    np.save(tmp_path / "one.npy", np.ones(4))
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "bad.json").write_bytes(b'{"shape": [4], "dtype": "\xff"}')
    (tmp_path / "spec.json").write_text(bngen.Spec((None, 4), training=False).to_json())
    return tmp_path


@pytest.mark.parametrize("argv, option", [
    (["fold", "--layer", "empty.npz", "--bn", "bn.npz", "--epsilon", "1e-3", "--out", "o.npz"], "--layer"),  # EOFError before
    (["fold", "--layer", "one.npy", "--bn", "bn.npz", "--epsilon", "1e-3", "--out", "o.npz"], "--layer"),  # TypeError before
    (["fold", "--layer", "layer.npz", "--bn", "one.npy", "--epsilon", "1e-3", "--out", "o.npz"], "--bn"),
    (["emit", "--spec", "spec.json", "--params", "one.npy", "--out", "out"], "--params"),  # AttributeError before
    (["emit", "--spec", "spec.json", "--params", "empty.npz", "--out", "out"], "--params"),
    (["build", "--spec", "bad.json"], "--spec"),  # UnicodeDecodeError before
])
def test_cli_file_errors_are_named_with_exit_status_2(files, monkeypatch, capsys, argv, option):
    from bngen.tools.cli import main

    monkeypatch.chdir(files)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bngen: error: {option}") and "Traceback" not in err


def test_fold_out_prints_the_file_it_wrote(files, monkeypatch, capsys):
    from bngen.tools.cli import main

    monkeypatch.chdir(files)
    assert main(["fold", "--layer", "layer.npz", "--bn", "bn.npz", "--epsilon", "1e-3", "--out", "folded"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == "folded.npz" and (files / printed).is_file()  # printed "folded" before


# -- exported C that would not compile, or would compute something else -------------------------------
def _emit_refused(tmp_path, match, *args, exc=ValueError, **kwargs):
    from bngen.aot.emit import emit

    out = tmp_path / "out"
    with pytest.raises(exc, match=match):
        emit(*args[:1], out, *args[1:], **kwargs)
    assert not out.exists(), "nothing may be written when emit refuses"


def _neutral_params(c, **overrides):
    """Baked parameters that fold to scale 1 and shift 0, so that only `overrides` matter."""
    p = dict(gamma=np.ones(c), beta=np.zeros(c), moving_mean=np.zeros(c), moving_variance=np.ones(c))
    p.update(overrides)
    return p


@pytest.mark.parametrize("name", ["exp", "log", "round", "nan", "isnan", "rand", "stdout", "EOF", "NAN", "tm",
                                  "strlen2", "isok", "toward", "EPIPE2", "SIGBN", "int_fast8_t", "_bn", "errno_bn"])
def test_baked_kernels_named_like_reserved_c_identifiers_are_refused(tmp_path, name):
    """These gave C that did not compile (or linked to the wrong function) before."""
    _emit_refused(tmp_path, f"name: '{name}'.*(C standard|reserved|C keyword)", bngen.Spec((2, 4), training=False),
                  name, _neutral_params(4))


def test_overlong_names_get_the_name_error(tmp_path):
    _emit_refused(tmp_path, "name: 300 characters", bngen.Spec((2, 4), training=False), "b" * 300, _neutral_params(4))


@pytest.mark.parametrize("dtype, overrides, feature", [
    ("float32", dict(gamma=np.array([1.0, 1e39, 1.0, 1.0])), 1),  # 'inff' in the file before
    ("float32", dict(beta=np.array([1.0, 1.0, -3e38, 1.0]), moving_mean=np.array([0, 0, 1e38, 0.0])), 2),
    ("float16", dict(moving_variance=np.array([1.0, 1.0, 1.0, 1e-90]), gamma=np.array([1, 1, 1, 1e30])), 3),
    ("float64", dict(gamma=np.array([1e308, 1, 1, 1]), moving_variance=np.array([1e-20, 1, 1, 1])), 0),
])
def test_folded_parameters_that_overflow_the_target_type_are_refused(tmp_path, dtype, overrides, feature):
    spec = bngen.Spec((2, 4), training=False, dtype=dtype, epsilon=1e-30)
    _emit_refused(tmp_path, f"params: the folded (scale|shift) of feature {feature}", spec, "bn", _neutral_params(4, **overrides))


def test_cortex_m_refuses_an_epsilon_that_float_cannot_hold(tmp_path):
    spec = bngen.Spec((None, 4), epsilon=1e-50)  # rounded to 0 in float: NaN where the spec gives beta, before
    _emit_refused(tmp_path, "epsilon: 1e-50", spec, "bn", target="cortex-m", exc=bngen.SpecError)
    from bngen.aot.emit import emit

    assert emit(spec, tmp_path / "host", "bn")  # the host computes statistics in double: fine there
    assert emit(spec.replace(training=False), tmp_path / "baked", "bn", _neutral_params(4), target="cortex-m")  # folded in double


def test_static_shapes_beyond_the_targets_ptrdiff_t_are_refused(tmp_path):
    spec = bngen.Spec((2**16, 2**16, 4), training=False)  # 2**34 elements: more than a 32-bit ptrdiff_t counts
    _emit_refused(tmp_path, "shape.*32-bit ptrdiff_t", spec, "bn", target="cortex-m", exc=bngen.SpecError)


# -- the cache: whose files it runs ----------------------------------------------------------------
OTHER_UID = 54321  # a user that is not us; root (CI) can chown to it, which is what an attacker's file looks like


def test_insecure_names_foreign_owners_and_writable_modes(tmp_path):
    """The trust rule itself, on os.stat results root can produce too."""
    f = tmp_path / "f"
    f.write_text("x")
    os.chmod(f, 0o644)
    assert cache_mod.insecure(f) is None
    os.chmod(f, 0o664)
    assert "writable by group" in cache_mod.insecure(f)
    os.chmod(f, 0o646)
    assert "writable by others" in cache_mod.insecure(f)
    os.chmod(f, 0o644)
    if os.geteuid() == 0:  # only root can give a file away; as anyone else the mode checks above cover the rule
        os.chown(f, OTHER_UID, -1)
        assert f"owned by uid {OTHER_UID}" in cache_mod.insecure(f)
    link = tmp_path / "link"
    link.symlink_to(f)
    assert "symbolic link" in cache_mod.insecure(link, follow=False)


@pytest.mark.parametrize("how", ["others can write", "another user owns"])
def test_an_untrusted_cache_root_is_not_used(tmp_path, strict_compiler, how):
    """Before: a shared or foreign /tmp directory was used as is, so its owner could plant code."""
    root = tmp_path / "shared"
    root.mkdir()
    if how == "others can write":
        os.chmod(root, 0o777)
    elif os.geteuid() == 0:
        os.chown(root, OTHER_UID, -1)
    else:
        os.chmod(root, 0o775)  # group-writable: the same refusal, reachable without root
    spec = bngen.Spec((None, 3), epsilon=0.25)
    with pytest.warns(cache_mod.CacheWarning, match="shared"):
        kernel = bngen.build(spec, root, compiler=strict_compiler)
    assert not any(root.rglob("manifest.json")), "nothing may be built into an untrusted root"
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.isfinite(kernel(x, np.ones(3, np.float32), np.zeros(3, np.float32))).all()
    fallback = cache_mod._FALLBACKS[root]
    assert stat.S_IMODE(os.stat(fallback).st_mode) == 0o700 and os.stat(fallback).st_uid == os.geteuid()


@pytest.fixture(scope="module")
def two_entries(tmp_path_factory):
    """A cache with the entries of two specs (2 compiles), and their keys; built with the
    default compiler, which the subprocesses use too."""
    root = tmp_path_factory.mktemp("two-entries")
    compiler = Compiler()
    specs = [bngen.Spec((None, 5), epsilon=0.125), bngen.Spec((None, 6), epsilon=0.125)]
    for spec in specs:
        bngen.build(spec, root, compiler=compiler)
    entries = sorted(root.glob("??/*/manifest.json"), key=lambda p: json.loads(p.read_text())["object"])
    return root, specs, [p.parent for p in entries]


def _object_name(entry):
    return json.loads((entry / "manifest.json").read_text())["object"]


def test_entries_that_are_not_this_users_alone_are_not_loaded(two_entries, tmp_path):
    """Before: any entry whose manifest matched its object was loaded, whoever wrote it."""
    root, _, (entry, _) = two_entries
    work = tmp_path / "copy"
    shutil.copytree(root, work, symlinks=True)
    entry = work / entry.relative_to(root)
    cache = cache_mod.Cache(work)
    key, name = entry.name, _object_name(entry)
    assert cache.lookup(key, name) == entry / name
    for path in (entry.parent, entry, entry / name, entry / "manifest.json"):
        before = os.stat(path)
        os.chmod(path, before.st_mode | stat.S_IWGRP)
        assert cache.lookup(key, name) is None, f"group-writable {path.name} accepted"
        os.chmod(path, before.st_mode | stat.S_IWOTH)
        assert cache.lookup(key, name) is None, f"world-writable {path.name} accepted"
        os.chmod(path, stat.S_IMODE(before.st_mode))
        if os.geteuid() == 0:
            os.chown(path, OTHER_UID, -1)
            assert cache.lookup(key, name) is None, f"foreign-owned {path.name} accepted"
            os.chown(path, before.st_uid, before.st_gid)
        assert cache.lookup(key, name) == entry / name
    os.chmod(work, 0o777)  # the root itself
    assert cache.lookup(key, name) is None


def test_a_manifest_must_name_this_keys_object_inside_its_entry(two_entries, tmp_path):
    """Before: a manifest naming another key's object, or a path out of the entry, passed."""
    root, _, (entry, other) = two_entries
    work = tmp_path / "copy"
    shutil.copytree(root, work)
    entry, other = work / entry.relative_to(root), work / other.relative_to(root)
    cache = cache_mod.Cache(work)
    key, name = entry.name, _object_name(entry)
    stranger = other / _object_name(other)
    digest = lambda p: {"size": p.stat().st_size, "sha256": cache_mod._file_digest(p)}  # noqa: E731
    for planted in (str(stranger), f"../../{other.parent.name}/{other.name}/{stranger.name}"):
        (entry / "manifest.json").write_text(json.dumps({"object": planted, **digest(stranger)}))
        assert cache.lookup(key, name) is None, planted
    shutil.copyfile(stranger, entry / stranger.name)  # another key's object, inside the entry
    (entry / "manifest.json").write_text(json.dumps({"object": stranger.name, **digest(stranger)}))
    assert cache.lookup(key, name) is None
    os.unlink(entry / name)  # a symbolic link in place of the object
    os.symlink(stranger, entry / name)
    (entry / "manifest.json").write_text(json.dumps({"object": name, **digest(stranger)}))
    assert cache.lookup(key, name) is None


LOAD_CHILD = """
    import sys
    import numpy as np
    import bngen
    spec = bngen.Spec.from_json(sys.argv[1])
    kernel = bngen.build(spec, sys.argv[2])
    x = np.arange(2 * spec.channels, dtype=np.float32).reshape(2, spec.channels)
    y = kernel(x, np.ones(spec.channels, np.float32), np.zeros(spec.channels, np.float32))
    print("ok", float(np.abs(y).max()))
"""


def test_an_entry_whose_object_does_not_import_is_rebuilt(two_entries, tmp_path):
    """Another key's object under this key's name, with a matching manifest: it passes
    verification, then failed to import in every process, forever (ImportError) before."""
    root, specs, (entry, other) = two_entries
    work = tmp_path / "copy"
    shutil.copytree(root, work)
    entry, other = work / entry.relative_to(root), work / other.relative_to(root)
    name, stranger = _object_name(entry), other / _object_name(other)
    os.unlink(entry / name)
    shutil.copyfile(stranger, entry / name)
    os.chmod(entry / name, 0o755)
    (entry / "manifest.json").write_text(json.dumps(
        {"object": name, "size": stranger.stat().st_size, "sha256": cache_mod._file_digest(stranger)}))
    spec = next(s for s in specs if json.loads((entry / "spec.json").read_text()) == json.loads(s.to_json()))
    for _ in range(2):  # the first process rebuilds; the second loads the rebuilt entry
        out = run_python(LOAD_CHILD, spec.to_json(), str(work))
        assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr
    assert cache_mod._file_digest(entry / name) != cache_mod._file_digest(stranger)


LOCK_HOLDER = """
    import sys, filelock, pathlib
    shard, key = pathlib.Path(sys.argv[1]), sys.argv[2]
    with filelock.FileLock(str(shard / f"{key}.lock")):
        (shard / f".{key}-running").mkdir()  # a build's work directory
        print("locked", flush=True)
        sys.stdin.read()  # until the test closes our stdin
"""


def test_cache_clear_skips_keys_being_built_and_removes_stale_work(two_entries, tmp_path):
    """Before: clear deleted every shard, work directories of running builds included."""
    root, _, (entry, other) = two_entries
    work = tmp_path / "copy"
    shutil.copytree(root, work)
    entry, other = work / entry.relative_to(root), work / other.relative_to(root)
    stale = other.parent / f".{other.name}-killed"  # a build that was killed: nobody holds its lock
    stale.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(LOCK_HOLDER), str(entry.parent), entry.name],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        removed, skipped = cache_mod.Cache(work).clear()
        assert (removed, skipped) == (1, 1)
        assert (entry / "manifest.json").is_file() and (entry.parent / f".{entry.name}-running").is_dir()
        assert not other.exists() and not stale.exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert cache_mod.Cache(work).clear() == (1, 0)
    assert not entry.exists() and not (entry.parent / f".{entry.name}-running").exists()


# -- the compiler and its record ---------------------------------------------------------------------
@pytest.mark.parametrize("record", [
    {"openmp": "-B/tmp/evil/", "simd": "-B/tmp/evil/", "macros": []},  # ran another program before
    {"openmp": ["-fopenmp"], "simd": None, "macros": []},  # TypeError in every build before
    {"openmp": "-fopenmp-simd", "simd": "-fopenmp-simd", "macros": []},  # kernels that never load
    {"openmp": None, "simd": "-O0", "macros": []},
    {"openmp": None, "simd": None, "macros": ["-B/tmp/evil/"]},
    {"openmp": None, "simd": None, "macros": "__AVX__"},
    {"openmp": None, "simd": None, "macros": [], "extra": 1},
    ["-fopenmp"],
])
def test_a_compiler_record_not_written_by_the_probe_is_probed_again(tmp_path, record):
    compiler = Compiler()
    probed = compiler.features(tmp_path)
    (path,) = tmp_path.glob("compiler-*.json")
    path.write_text(json.dumps(record))
    assert compiler.features(tmp_path) == probed
    assert json.loads(path.read_text()) == {"openmp": probed.openmp, "simd": probed.simd, "macros": list(probed.macros)}


def test_a_compiler_record_others_can_write_is_probed_again(tmp_path):
    compiler = Compiler()
    probed = compiler.features(tmp_path)
    (path,) = tmp_path.glob("compiler-*.json")
    path.write_text(json.dumps({"openmp": None, "simd": None, "macros": []}))  # a valid record, planted
    os.chmod(path, 0o666)
    assert compiler.features(tmp_path) == probed
    assert cache_mod.insecure(path) is None  # rewritten, this user's alone


FAKE_CC = """#!/bin/sh
case "$*" in
  *--version*) echo "fake cc 1.0"; exit 0 ;;
  *probe.c*) exit 1 ;;
  *" -I "*) sleep "$FAKE_CC_SLEEP"; touch "$FAKE_CC_MARK"; exit 0 ;;  # the cffi wrapper's job
  *) exit 1 ;;  # the kernel's job fails at once
esac
"""


@pytest.fixture
def fake_cc(tmp_path, monkeypatch):
    script = tmp_path / "fake-cc"
    script.write_text(FAKE_CC)
    script.chmod(0o755)
    monkeypatch.setenv("FAKE_CC_MARK", str(tmp_path / "wrapper-finished"))
    return script


def test_when_one_compile_job_fails_the_other_is_waited_for(tmp_path, fake_cc, monkeypatch):
    """Before: the error was raised (and the work directory removed) while the other job ran on."""
    monkeypatch.setenv("FAKE_CC_SLEEP", "1")
    with pytest.raises(CompileError, match="exit 1"):
        bngen.build(bngen.Spec((None, 7)), tmp_path / "cache", compiler=Compiler(cc=str(fake_cc)))
    assert (tmp_path / "wrapper-finished").exists()
    assert not list((tmp_path / "cache").glob("??/.*")), "the failed build's work directory is removed"


def test_a_compiler_that_hangs_is_killed_after_the_timeout(tmp_path, fake_cc, monkeypatch):
    """Before: no timeout; the build waited as long as the compiler did."""
    monkeypatch.setenv("FAKE_CC_SLEEP", "60")
    t = time.monotonic()
    with pytest.raises(CompileError, match="took more than 1 s"):
        bngen.build(bngen.Spec((None, 7)), tmp_path / "cache", compiler=Compiler(cc=str(fake_cc), timeout=1))
    assert time.monotonic() - t < 30
    assert not (tmp_path / "wrapper-finished").exists()  # killed, not finished


@pytest.mark.parametrize("cc, match", [
    ("", "is empty"),  # IndexError before
    ('"gcc', "not a valid command line"),  # ValueError before
    ("true", "wrote no"),  # FileNotFoundError and a misleading CacheWarning before
    ("/nonexistent/cc", "not found"),
])
def test_a_bad_cc_is_a_compile_error_naming_the_compiler(tmp_path, cc, match):
    with warnings.catch_warnings():
        warnings.simplefilter("error", cache_mod.CacheWarning)  # the cache directory is fine
        with pytest.raises(CompileError, match=match) as info:
            bngen.build(bngen.Spec((None, 9)), tmp_path / "cache", compiler=Compiler(cc=cc))
    assert repr(cc) in str(info.value)


# -- statistics of finite float32/bfloat16 data beyond float's sums ------------------------------------
FLT_MAX = float(np.finfo(np.float32).max)


@pytest.mark.parametrize("spec", [
    bngen.Spec((None, 5, 300), axis=1),  # channels-first blocks
    bngen.Spec((None, 5), axis=-1),  # channels-last groups
    bngen.Spec((None, 3, 40), axis=-1, mode=1),  # per-sample statistics
    bngen.Spec((None, 5, 300), axis=1, dtype="bfloat16"),
    bngen.Spec((None, 5), axis=-1, dtype="bfloat16"),
], ids=lambda s: f"{s.dtype}-{s.shape}-mode{s.mode}")
def test_statistics_of_huge_finite_values_match_the_oracle(build, spec):
    """Before: std ~1e19 gave an infinite variance (d * d overflowed float), values near
    FLT_MAX of both signs a NaN mean.  Now the block is summed again in double.  5 specs,
    4 inputs each, every value finite."""
    kernel = build(spec)
    rng = np.random.default_rng(16)
    shape = (600,) + spec.shape[1:]
    c = spec.channels
    gamma, beta = np.ones(c, np.float32), np.full(c, 0.5, np.float32)
    inputs = {
        "std 1e19": rng.standard_normal(shape) * 1e19,
        "std 1e18, offset 1e37": 1e37 + rng.standard_normal(shape) * 1e18,
        "both signs near FLT_MAX": np.where(rng.random(shape) < 0.5, 3e38, -3e38),
        "one huge outlier": np.where(np.arange(np.prod(shape)).reshape(shape) == 7, 3e38, rng.standard_normal(shape)),
    }
    for name, values in inputs.items():
        x = values.astype(numpy_dtype(spec.dtype))
        assert np.isfinite(x.astype(np.float64)).all()
        y, mean, variance = kernel.forward(x, gamma, beta)
        ref = oracle.forward(spec, x, gamma, beta)
        scale = float(np.abs(x.astype(np.float64)).max())
        np.testing.assert_allclose(mean, ref.mean, rtol=0, atol=1e-5 * scale, err_msg=name)
        representable = ref.variance <= FLT_MAX
        np.testing.assert_allclose(variance[representable], ref.variance[representable], rtol=1e-4,
                                   atol=1e-5 * scale * np.sqrt(ref.variance.max()), err_msg=name)
        assert np.isposinf(variance[~representable]).all(), name  # beyond float, as the oracle's rounds
        if representable.all():
            np.testing.assert_allclose(y.astype(np.float64), ref.y, rtol=0, atol=2e-2, err_msg=name)
