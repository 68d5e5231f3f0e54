"""Hardening (issue 16): what an attacker or a careless user tried, each a test that
failed before its fix.

Compiled specs: a handful of small ones, mostly in their own temporary caches; no
hypothesis here (the fuzz targets are in test_fuzz.py).  Subprocess tests run
`python -c` with this checkout on PYTHONPATH, with a timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import bngen

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, *args: str, timeout: float = 120, env=None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


# -- fork after OpenMP ------------------------------------------------------------------------
FORK_CHILD = """
    import os, sys
    import numpy as np
    import bngen
    from bngen.threads import default_threads
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
    from bngen.cli import main

    monkeypatch.chdir(files)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bngen: error: {option}") and "Traceback" not in err


def test_fold_out_prints_the_file_it_wrote(files, monkeypatch, capsys):
    from bngen.cli import main

    monkeypatch.chdir(files)
    assert main(["fold", "--layer", "layer.npz", "--bn", "bn.npz", "--epsilon", "1e-3", "--out", "folded"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == "folded.npz" and (files / printed).is_file()  # printed "folded" before


# -- exported C that would not compile, or would compute something else -------------------------------
def _emit_refused(tmp_path, match, *args, exc=ValueError, **kwargs):
    from bngen.emit import emit

    out = tmp_path / "out"
    with pytest.raises(exc, match=match):
        emit(*args[:1], out, *args[1:], **kwargs)
    assert not out.exists(), "nothing may be written when emit refuses"


def _params(c, **overrides):
    p = dict(gamma=np.ones(c), beta=np.zeros(c), moving_mean=np.zeros(c), moving_variance=np.ones(c))
    p.update(overrides)
    return p


@pytest.mark.parametrize("name", ["exp", "log", "round", "nan", "isnan", "rand", "stdout", "EOF", "NAN", "tm",
                                  "strlen2", "isok", "toward", "EPIPE2", "SIGBN", "int_fast8_t", "_bn", "errno_bn"])
def test_baked_kernels_named_like_reserved_c_identifiers_are_refused(tmp_path, name):
    """These gave C that did not compile (or linked to the wrong function) before."""
    _emit_refused(tmp_path, f"name: '{name}'.*(C standard|reserved|C keyword)", bngen.Spec((2, 4), training=False),
                  name, _params(4))


def test_overlong_names_get_the_name_error(tmp_path):
    _emit_refused(tmp_path, "name: 300 characters", bngen.Spec((2, 4), training=False), "b" * 300, _params(4))


@pytest.mark.parametrize("dtype, overrides, feature", [
    ("float32", dict(gamma=np.array([1.0, 1e39, 1.0, 1.0])), 1),  # 'inff' in the file before
    ("float32", dict(beta=np.array([1.0, 1.0, -3e38, 1.0]), moving_mean=np.array([0, 0, 1e38, 0.0])), 2),
    ("float16", dict(moving_variance=np.array([1.0, 1.0, 1.0, 1e-90]), gamma=np.array([1, 1, 1, 1e30])), 3),
    ("float64", dict(gamma=np.array([1e308, 1, 1, 1]), moving_variance=np.array([1e-20, 1, 1, 1])), 0),
])
def test_folded_parameters_that_overflow_the_target_type_are_refused(tmp_path, dtype, overrides, feature):
    spec = bngen.Spec((2, 4), training=False, dtype=dtype, epsilon=1e-30)
    _emit_refused(tmp_path, f"params: the folded (scale|shift) of feature {feature}", spec, "bn", _params(4, **overrides))


def test_cortex_m_refuses_an_epsilon_that_float_cannot_hold(tmp_path):
    spec = bngen.Spec((None, 4), epsilon=1e-50)  # rounded to 0 in float: NaN where the spec gives beta, before
    _emit_refused(tmp_path, "epsilon: 1e-50", spec, "bn", target="cortex-m", exc=bngen.SpecError)
    from bngen.emit import emit

    assert emit(spec, tmp_path / "host", "bn")  # the host computes statistics in double: fine there
    assert emit(spec.replace(training=False), tmp_path / "baked", "bn", _params(4), target="cortex-m")  # folded in double


def test_static_shapes_beyond_the_targets_ptrdiff_t_are_refused(tmp_path):
    spec = bngen.Spec((2**16, 2**16, 4), training=False)  # 2**34 elements: more than a 32-bit ptrdiff_t counts
    _emit_refused(tmp_path, "shape.*32-bit ptrdiff_t", spec, "bn", target="cortex-m", exc=bngen.SpecError)
