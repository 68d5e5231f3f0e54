"""Regressions from an outside-style conformance audit against the public contract (the README's API).

Each test is one discrepancy the audit found, checked the way an acceptance suite would:
the error type, a message naming the argument, and every caller array left untouched.
  * overlap: `out` (or the moving statistics training updates) sharing memory with a
    NON-contiguous x, gamma or dy was missed (the check looked at contiguous copies);
    backward's `out` was not checked against gamma, beta, mean and variance at all
  * threads: counts the C int cannot hold raised cffi's OverflowError (naming nothing),
    and huge ones crashed the process inside OpenMP; now a ValueError above MAX_THREADS,
    also for a huge $OMP_NUM_THREADS (clamped)
  * build(spec, cache_dir=<not a path>) named no argument
  * misaligned arrays (NumPy views at an odd byte offset) went to C, which may assume
    every float pointer aligned: inputs are now copied, out= is written through an aligned
    array, and misaligned moving statistics (updated in place) are refused
  * command line: --batch/--repeat 0 gave a traceback or NaN timings; unknown --kinds ran
    nothing and exited 0; bench on a batch PyTorch refuses (one value per channel in
    training) died with a traceback

Specs: 2 kernels ((None, 4) float32, inference and training), plus the bench's memory
probes and a 2-row bench in one test; no hypothesis (each case is one deterministic call).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import bngen
from bngen.jit.kernel import MAX_THREADS, default_threads
from bngen.tools import cli

C = 4
INFER = bngen.Spec((None, C), training=False)
TRAIN = bngen.Spec((None, C), momentum=0.5)


@pytest.fixture
def params(rng):
    return dict(gamma=rng.random(C).astype(np.float32) + 0.5, beta=rng.random(C).astype(np.float32),
                moving_mean=rng.random(C).astype(np.float32), moving_variance=rng.random(C).astype(np.float32) + 1)


def _raises_untouched(exc, match, fn, *arrays, **kwargs):
    """fn(**kwargs) raises exc matching `match`, and every array in `arrays` is unchanged."""
    before = [a.copy() for a in arrays]
    with pytest.raises(exc, match=match):
        fn(**kwargs)
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(a, b)


# -- overlap with non-contiguous caller arrays ------------------------------------------------
def test_out_over_a_non_contiguous_x(build, rng, params):
    kernel = build(INFER)
    base = rng.random((3, 2 * C)).astype(np.float32)
    x = base[:, :C]  # rows of x interleave with unused columns: not contiguous
    out = base.reshape(-1)[: 3 * C].reshape(3, C)  # contiguous, over x's memory
    _raises_untouched(ValueError, "out: shares memory with x", lambda **k: kernel(x, **params, **k), base, out=out)


def test_out_over_a_non_contiguous_gamma(build, rng, params):
    kernel = build(INFER)
    base = np.ones(6 * C, np.float32)
    gamma = base[::2][:C]
    out = base[: 3 * C].reshape(3, C)
    x = rng.random((3, C)).astype(np.float32)
    params["gamma"] = gamma
    _raises_untouched(ValueError, "out: shares memory with gamma", lambda: kernel(x, **params, out=out), base, x)


def test_moving_mean_over_a_non_contiguous_x(build, rng, params):
    kernel = build(TRAIN)
    base = rng.random((3, 2 * C)).astype(np.float32)
    x = base[:, C:]
    moving_mean = base[0, C:]  # contiguous: training would update x's first row
    for call in (kernel, kernel.forward):
        _raises_untouched(ValueError, "moving_mean: shares memory with x",
                          lambda: call(x, params["gamma"], params["beta"], moving_mean, params["moving_variance"]),
                          base, params["moving_variance"])


@pytest.mark.parametrize("name", ["gamma", "mean", "variance", "dy"])
def test_backward_out_over_an_input(build, rng, params, name):
    kernel = build(TRAIN)
    x = rng.standard_normal((3, C)).astype(np.float32)
    _, mean, variance = kernel.forward(x, params["gamma"], params["beta"])
    args = dict(dy=rng.standard_normal((3, C)).astype(np.float32), x=x, gamma=params["gamma"], mean=mean,
                variance=variance)
    if name == "dy":  # a non-contiguous dy under a contiguous out
        base = rng.standard_normal((3, 2 * C)).astype(np.float32)
        args["dy"], out = base[:, :C], base.reshape(-1)[: 3 * C].reshape(3, C)
    else:  # the parameter array lies inside out
        base = np.zeros(4 * C, np.float32)
        out = base[: 3 * C].reshape(3, C)
        base[2 * C: 3 * C] = args[name]
        args[name] = base[2 * C: 3 * C]
    _raises_untouched(ValueError, f"out: shares memory with {name}", lambda: kernel.backward(**args, out=out),
                      base, x, mean, variance)


def test_separate_non_contiguous_arrays_still_work(build, rng, params):
    """The checks above refuse only overlap: non-contiguous inputs beside a separate out run."""
    kernel = build(INFER)
    x = rng.random((3, 2 * C)).astype(np.float32)[:, :C]
    out = np.empty((3, C), np.float32)
    assert kernel(x, **params, out=out) is out
    np.testing.assert_array_equal(out, kernel(np.ascontiguousarray(x), **params))


# -- threads -------------------------------------------------------------------------------------
@pytest.mark.parametrize("threads", [MAX_THREADS + 1, 2**31, 2**40])
def test_too_many_threads(build, rng, params, threads):
    infer, train = build(INFER), build(TRAIN)
    x = rng.random((3, C)).astype(np.float32)
    match = f"threads: {threads} must be an int >= 1 and <= {MAX_THREADS}"
    _raises_untouched(ValueError, match, lambda: infer(x, **params, threads=threads), x, *params.values())
    _raises_untouched(ValueError, match, lambda: train(x, **params, threads=threads), x, *params.values())
    _raises_untouched(ValueError, match, lambda: train.forward(x, **params, threads=threads), x, *params.values())
    _, mean, variance = train.forward(x, params["gamma"], params["beta"])
    _raises_untouched(ValueError, match, lambda: train.backward(x, x, params["gamma"], mean, variance, threads=threads),
                      x, mean, variance)


def test_max_threads_is_accepted(build, rng, params):
    infer = build(INFER)
    x = rng.random((3, C)).astype(np.float32)
    np.testing.assert_array_equal(infer(x, **params, threads=MAX_THREADS), infer(x, **params, threads=1))


def test_default_threads_is_capped(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "100000")
    assert default_threads() == MAX_THREADS
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3


# -- build -------------------------------------------------------------------------------------
@pytest.mark.parametrize("cache_dir", [123, ["a"]])
def test_build_names_a_bad_cache_dir(cache_dir):
    with pytest.raises(TypeError, match="cache_dir: expected a path"):
        bngen.build(INFER, cache_dir)


# -- command line ------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, words", [
    (["demo", "--batch", "0"], "argument --batch: 0 must be >= 1"),
    (["demo", "--repeat", "-1"], "argument --repeat: -1 must be >= 1"),
    (["bench", "--batch", "x"], "argument --batch: 'x' is not an int"),
    (["bench", "--repeat", "0"], "argument --repeat: 0 must be >= 1"),
])
def test_cli_counts_must_be_positive(capsys, argv, words):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["bench", "--kinds", "inference,foo", "--quiet"], "--kinds: 'foo' not among"),
    (["bench", "--threads", str(MAX_THREADS + 1), "--quiet"], "--threads"),
    (["bench", "--march", "x86-64-v3;rm", "--quiet"], "--march"),
])
def test_cli_bench_rejects_bad_lists(capsys, argv, words):
    assert cli.main(argv) == 2
    assert words in capsys.readouterr().err


def test_cli_bench_on_a_batch_pytorch_refuses(tmp_path, capsys):
    """One value per channel: PyTorch refuses to train on it, bngen (like Keras) does not;
    the table gets no PyTorch cell for that row instead of a traceback."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"shape": [None, C]}))
    argv = ["bench", "--spec", str(spec), "--batch", "1", "--repeat", "1", "--threads", "1",
            "--kinds", "inference,training forward", "--quiet"]
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    assert "| training forward | 1 |" in table and "| inference | 1 |" in table


# -- misaligned arrays -------------------------------------------------------------------------
def _misaligned(a):
    """A copy of `a` whose data starts one byte past an aligned address."""
    raw = np.zeros(a.nbytes + a.itemsize, np.uint8)
    view = np.ndarray(a.shape, a.dtype, buffer=raw, offset=1)
    view[...] = a
    assert not view.flags.aligned and view.flags.c_contiguous
    return view


def test_misaligned_inputs_are_copied(build, rng, params):
    """x, dy and gamma at odd addresses give the results of aligned ones (C never sees a
    misaligned pointer; first and repeated calls, which take the fast path when aligned),
    and stay untouched."""
    x = rng.standard_normal((5, C)).astype(np.float32)
    dy = rng.standard_normal((5, C)).astype(np.float32)
    mx, mdy, mgamma = _misaligned(x), _misaligned(dy), _misaligned(params["gamma"])
    infer, train = build(INFER), build(TRAIN)
    p = dict(params)
    for _ in range(2):
        np.testing.assert_array_equal(infer(mx, mgamma, p["beta"], p["moving_mean"], p["moving_variance"]),
                                      infer(x, p["gamma"], p["beta"], p["moving_mean"], p["moving_variance"]))
        got = train.forward(mx, mgamma, p["beta"])
        want = train.forward(x, p["gamma"], p["beta"])
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
        _, mean, var = want
        for g, w in zip(train.backward(mdy, mx, mgamma, mean, var), train.backward(dy, x, p["gamma"], mean, var)):
            np.testing.assert_array_equal(g, w)
    np.testing.assert_array_equal(mx, x)
    np.testing.assert_array_equal(mdy, dy)
    np.testing.assert_array_equal(mgamma, params["gamma"])


def test_misaligned_out_gets_the_result(build, rng, params):
    """A misaligned out= receives what an aligned one would (C writes an aligned array,
    copied into it), and is returned."""
    x = rng.standard_normal((5, C)).astype(np.float32)
    dy = rng.standard_normal((5, C)).astype(np.float32)
    infer, train = build(INFER), build(TRAIN)
    out = _misaligned(np.zeros_like(x))
    assert infer(x, **params, out=out) is out
    np.testing.assert_array_equal(out, infer(x, **params))
    y, mean, var = train.forward(x, params["gamma"], params["beta"], out=out)
    assert y is out
    np.testing.assert_array_equal(out, train.forward(x, params["gamma"], params["beta"])[0])
    dx, _, _ = train.backward(dy, x, params["gamma"], mean, var, out)
    assert dx is out
    np.testing.assert_array_equal(out, train.backward(dy, x, params["gamma"], mean, var)[0])


def test_misaligned_moving_statistics_are_refused(build, rng, params):
    """The moving statistics training updates in place cannot be copied: a misaligned one
    is a ValueError naming it, before any C runs."""
    x = rng.standard_normal((5, C)).astype(np.float32)
    mm = _misaligned(params["moving_mean"])
    _raises_untouched(ValueError, "moving_mean: is not aligned", lambda: build(TRAIN).forward(
        x, params["gamma"], params["beta"], mm, params["moving_variance"]), x, mm, params["moving_variance"])
