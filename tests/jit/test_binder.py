"""The binder (bngen.jit.binder): which calls have a fast path, that the fast path computes what
the checked path computes, and that each of the checked path's checks breaks a call.

Builds the 7 specs of FAST_PATHS with their split phases (split=True), and one more spec
for the broken calls (about 8 s of compiling); the property test draws 40 examples per
spec, each comparing every method's two paths (the split phases too, where the spec has
them).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import random_params, sized

import bngen
from bngen.core.threads import MAX_THREADS
from bngen.jit import binder

S = bngen.Spec

METHODS = ("__call__", "forward", "backward", "moments", "normalize", "backward_sums", "backward_apply")
SPLIT = {"moments", "normalize", "backward_sums", "backward_apply"}  # built with split=True

# spec -> the methods with a generated fast path (kernels built with split=True).  Every
# training spec and every frozen backward has one, whatever dimensions are dynamic, and
# so has every split phase.
FAST_PATHS = [
    (S((None, 8, None), axis=1), {"__call__", "forward", "backward"} | SPLIT),
    (S((2, None, 8)), {"__call__", "forward", "backward"} | SPLIT),
    (S((None, 6), mode=2, activation="relu"), {"__call__", "forward", "backward"} | SPLIT),
    (S((None, 5, 3), axis=1, training=False), {"__call__", "backward"}),
    (S((None, 5, 3), axis=1, training=False, scale=False), {"__call__", "backward"}),  # frozen: reads no x
    (S((None, 12), mode=1), {"__call__", "forward", "backward"}),  # (mode 1 has no split phases)
    (S((4, 3), unbiased=True), {"__call__", "forward", "backward"} | SPLIT),
]


def _args(spec, rng, sizes):
    """x of `spec` with `sizes` in its dynamic dimensions, and the parameters the spec takes (by name)."""
    x = rng.standard_normal(sized(spec, sizes)).astype(spec.dtype)
    names = ("gamma", "beta", "moving_mean", "moving_variance")
    return x, {n: v for n, v in zip(names, random_params(spec, rng)) if v is not None}


def _never_checked(*args, **kwargs):
    raise AssertionError("the call took the checked path")


@contextlib.contextmanager
def _fast_only(function):
    """Within: a call of `function`, a generated fast path, fails if it takes the checked path."""
    scope = function.__globals__  # the generated function's own scope, its kernel's only
    saved, scope["checked"] = scope["checked"], _never_checked
    try:
        yield
    finally:
        scope["checked"] = saved


def _after_forward(build, spec, seed, sizes):
    """``(kernel, good, p)``: a kernel of `spec`, the keywords of a good backward call after
    its forward of an x with `sizes` in its dynamic dimensions, and the parameters."""
    kernel = build(spec)
    rng = np.random.default_rng(seed)
    x, p = _args(spec, rng, sizes)
    _, mean, variance = kernel.forward(x, **p)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    return kernel, dict(dy=dy, x=x, gamma=p["gamma"], mean=mean, variance=variance), p


@pytest.mark.parametrize("spec, methods", FAST_PATHS, ids=[s.describe()[:60] for s, _ in FAST_PATHS])
def test_fast_path_table(build, spec, methods):
    kernel = build(spec, split=True)
    fast = {name for name in METHODS if name in type(kernel).__dict__}
    assert fast == methods
    assert set(kernel.plan.fast_entries) == {e.name for e in kernel.plan.entries}
    assert set(kernel._faces) == methods


def test_a_plain_kernel_runs_its_split_phases_on_the_fast_path_of_its_companion(build, rng):
    spec = FAST_PATHS[0][0]
    kernel = build(spec)
    assert not SPLIT & set(type(kernel).__dict__)  # a plain build: no split entries of its own
    x = rng.standard_normal((2, 8, 3)).astype(np.float32)
    companion = build(spec, split=True)
    with _fast_only(type(companion).moments):
        moments = kernel.moments(x)
    assert kernel._split_kernel is companion
    np.testing.assert_array_equal(moments, companion.moments(x))


@pytest.mark.parametrize("spec, methods", FAST_PATHS, ids=[s.describe()[:60] for s, _ in FAST_PATHS])
@settings(max_examples=40)
@given(data=st.data())
def test_fast_path_equals_checked_path(build, spec, methods, data):
    kernel = build(spec, split=True)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    sizes = data.draw(st.lists(st.integers(1, 9), min_size=3, max_size=3))
    x, p = _args(spec, rng, sizes)
    threads = data.draw(st.sampled_from([None, 1, 2]))
    use_out = data.draw(st.booleans())
    relu_beta = {"beta": p["beta"]} if spec.activation == "relu" and spec.center else {}

    def twice(method, *args, **kwargs):
        """(fast result, checked result), with the same inputs and fresh copies of the
        arrays a call updates; the fast one must not fall back to the checked path."""
        results = []
        for path in ("fast", "checked"):
            fresh = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
            kw = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in kwargs.items()}
            if path == "fast":
                function = getattr(type(kernel), method)
                with _fast_only(function):
                    results.append((function(kernel, *fresh, **kw), fresh, kw))
            else:
                results.append((getattr(bngen.Kernel, method)(kernel, *fresh, **kw), fresh, kw))
        (fast, fast_args, fast_kw), (slow, slow_args, slow_kw) = results
        for a, b in zip(fast if isinstance(fast, tuple) else (fast,), slow if isinstance(slow, tuple) else (slow,)):
            if a is None:
                assert b is None
            else:
                np.testing.assert_array_equal(a, b)
        for a, b in zip(fast_args + list(fast_kw.values()), slow_args + list(slow_kw.values())):
            if isinstance(a, np.ndarray):
                np.testing.assert_array_equal(a, b)  # (moving statistics updated alike)
        return fast

    out = {"out": np.empty_like(x)} if use_out else {}
    args = (x, p.get("gamma"), p.get("beta"), p.get("moving_mean"), p.get("moving_variance"))
    twice("__call__", *args, threads=threads, **out)
    if "forward" in methods:
        y, mean, variance = twice("forward", *args, threads=threads, **out)
    dy = rng.standard_normal(x.shape).astype(spec.dtype)
    if "backward" in methods:
        if spec.uses_batch_stats:
            twice("backward", dy, x, p.get("gamma"), mean, variance, threads=threads, **relu_beta, **out)
        else:
            twice("backward", dy, x, p.get("gamma"), p["moving_mean"], p["moving_variance"], threads=threads, **out)
            twice("backward", dy, x, p.get("gamma"), moving_mean=p["moving_mean"],
                  moving_variance=p["moving_variance"], threads=threads, **out)
    if "moments" in methods:
        moments = twice("moments", x, threads=threads)
        twice("normalize", *args, moments=moments, threads=threads, **out)
        mean64, variance64 = moments[1].copy(), moments[2] / moments[0]
        mask = {"gamma": p.get("gamma"), **relu_beta} if spec.activation == "relu" else {}
        sums = twice("backward_sums", dy, x, mean64, variance64, threads=threads, **mask)
        count = data.draw(st.sampled_from([float, int]))(moments[0, 0])
        twice("backward_apply", dy, x, p.get("gamma"), mean64, variance64, sums=sums, count=count, threads=threads,
              **relu_beta, **out)


# Each check of the checked path, breaking one call of a kernel whose calls have a fast
# path; the fast path refuses the call, the checked path names the argument, and no
# caller array changes.
BROKEN = [
    ("x", TypeError, lambda x, p: dict(x=x.tolist())),
    ("x", TypeError, lambda x, p: dict(x=x.astype(np.float64))),
    ("x", ValueError, lambda x, p: dict(x=x[:, :7])),
    ("x", ValueError, lambda x, p: dict(x=x[:0])),
    ("x", TypeError, lambda x, p: dict(x=np.ma.masked_array(x, mask=x > 0))),
    ("gamma", TypeError, lambda x, p: dict(gamma=None)),
    ("gamma", ValueError, lambda x, p: dict(gamma=np.ones(9, np.float32))),
    ("gamma", TypeError, lambda x, p: dict(gamma=np.ma.masked_array(p["gamma"]))),
    ("moving_mean", ValueError, lambda x, p: dict(moving_mean=_read_only(p["moving_mean"]))),
    ("moving_variance", ValueError, lambda x, p: dict(moving_variance=np.ones(16, np.float32)[::2])),
    ("out", ValueError, lambda x, p: dict(out=x)),
    ("out", TypeError, lambda x, p: dict(out=np.ma.masked_array(np.empty_like(x)))),
    ("out", ValueError, lambda x, p: dict(out=np.empty_like(x)[::-1])),
    ("threads", ValueError, lambda x, p: dict(threads=0)),
]


def _read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("name, error, change", BROKEN, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BROKEN)])
def test_each_check_breaks_a_call(build, name, error, change):
    spec = S((None, 8, None), axis=1, momentum=0.9)
    kernel = build(spec, split=True)
    rng = np.random.default_rng(7)
    x, p = _args(spec, rng, (3, 4))
    kwargs = dict(x=x, **p)
    kwargs.update(change(x, p))
    before = {k: np.array(v, copy=True) for k, v in kwargs.items() if isinstance(v, np.ndarray)}
    with pytest.raises(error, match=f"^{name}:"):
        kernel.forward(**kwargs)
    for k, v in before.items():
        np.testing.assert_array_equal(np.asarray(kwargs[k]), v)


# Each check of a split phase, breaking one call (method, the argument named, the error,
# the change to a good call made from the context of _split_context).
SPLIT_BROKEN = [
    ("moments", "x", TypeError, lambda c: dict(x=c["x"].astype(np.float64))),
    ("moments", "threads", ValueError, lambda c: dict(threads=0)),
    ("normalize", "moments", TypeError, lambda c: dict(moments=None)),
    ("normalize", "moments", TypeError, lambda c: dict(moments=c["moments"].astype(np.float32))),
    ("normalize", "moments", ValueError, lambda c: dict(moments=c["moments"][:, :4])),
    ("normalize", "moments", ValueError, lambda c: dict(moments=c["moments"][:2])),
    ("normalize", "moments", ValueError, lambda c: dict(moments=_row0(c["moments"], 0.0))),
    ("normalize", "moments", ValueError, lambda c: dict(moments=_row0(c["moments"], -3.0))),
    ("normalize", "moments", ValueError, lambda c: dict(moments=_row0(c["moments"], np.nan))),
    ("normalize", "moments", ValueError, lambda c: dict(moments=_row0(c["moments"], np.inf))),
    ("normalize", "moments", ValueError, lambda c: dict(moving_mean=c["moments"].view(np.float32)[0, :8])),  # aliased
    ("normalize", "moving_variance", ValueError, lambda c: dict(moving_variance=_read_only(c["moving_variance"]))),
    ("normalize", "out", ValueError, lambda c: dict(out=c["x"])),
    ("normalize", "out", ValueError, lambda c: _out_over(c["x"].shape, moments=c["moments"])),
    ("normalize", "threads", ValueError, lambda c: dict(threads=MAX_THREADS + 1)),
    ("backward_sums", "dy", ValueError, lambda c: dict(dy=c["dy"][:, :4])),
    ("backward_sums", "mean", ValueError, lambda c: dict(mean=c["mean"][:4])),
    ("backward_sums", "variance", TypeError, lambda c: dict(variance=c["variance"].astype(np.float16))),
    ("backward_sums", "variance", TypeError, lambda c: dict(variance=None)),
    ("backward_sums", "gamma", TypeError, lambda c: dict(gamma=c["gamma"])),  # no ReLU: no mask
    ("backward_sums", "threads", ValueError, lambda c: dict(threads=True)),
    ("backward_apply", "sums", ValueError, lambda c: dict(sums=c["sums"][0])),
    ("backward_apply", "sums", TypeError, lambda c: dict(sums=c["sums"].astype(np.float32))),
    ("backward_apply", "count", ValueError, lambda c: dict(count=0)),
    ("backward_apply", "count", ValueError, lambda c: dict(count=-6.0)),
    ("backward_apply", "count", ValueError, lambda c: dict(count=float("nan"))),
    ("backward_apply", "count", ValueError, lambda c: dict(count=float("inf"))),
    ("backward_apply", "count", ValueError, lambda c: dict(count=True)),
    ("backward_apply", "count", ValueError, lambda c: dict(count="12")),
    ("backward_apply", "count", ValueError, lambda c: dict(count=c["count"] - 1)),  # fewer than this batch holds
    ("backward_apply", "out", ValueError, lambda c: dict(out=c["dy"])),
    ("backward_apply", "out", ValueError, lambda c: dict(out=c["x"])),
    ("backward_apply", "out", ValueError, lambda c: _out_over(c["x"].shape, sums=c["sums"])),
    ("backward_apply", "threads", ValueError, lambda c: dict(threads=-1)),
]


def _out_over(shape, **statistics):
    """out (float32, `shape`) over the same memory as a copy of the one float64 array of
    `statistics`: both keyword arguments of a call."""
    (name, value), = statistics.items()
    memory = np.zeros(int(np.prod(shape)), np.float32)
    copy = memory.view(np.float64)[: value.size].reshape(value.shape)
    copy[...] = value
    return {name: copy, "out": memory.reshape(shape)}


def _row0(moments, count):
    moments = moments.copy()
    moments[0, 1] = count
    return moments


def _split_context(kernel):
    """A good call of each split phase of `kernel` (spec (None, 8, None), axis 1): the
    context SPLIT_BROKEN's changes read, and the keyword arguments per method."""
    rng = np.random.default_rng(11)
    x, p = _args(kernel.spec, rng, (3, 4))
    dy = rng.standard_normal(x.shape).astype(np.float32)
    moments = kernel.moments(x)
    mean, variance = moments[1].copy(), moments[2] / moments[0]
    sums = kernel.backward_sums(dy, x, mean, variance)
    c = dict(x=x, dy=dy, moments=moments, mean=mean, variance=variance, sums=sums, count=float(moments[0, 0]), **p)
    calls = {
        "moments": dict(x=x),
        "normalize": dict(x=x, gamma=p["gamma"], beta=p["beta"], moving_mean=p["moving_mean"],
                          moving_variance=p["moving_variance"], moments=moments),
        "backward_sums": dict(dy=dy, x=x, mean=mean, variance=variance),
        "backward_apply": dict(dy=dy, x=x, gamma=p["gamma"], mean=mean, variance=variance, sums=sums,
                               count=c["count"]),
    }
    return c, calls


@pytest.mark.parametrize("method, name, error, change", SPLIT_BROKEN,
                         ids=[f"{m}-{n}-{i}" for i, (m, n, _, _) in enumerate(SPLIT_BROKEN)])
def test_each_check_breaks_a_split_phase_call(build, method, name, error, change):
    # the fast path refuses the call (it would have returned), the checked path names the
    # argument, and no caller array changes
    kernel = build(S((None, 8, None), axis=1, momentum=0.9), split=True)
    context, calls = _split_context(kernel)
    kwargs = {**calls[method], **change(context)}
    before = {k: np.array(v, copy=True) for k, v in {**context, **kwargs}.items() if isinstance(v, np.ndarray)}
    with pytest.raises(error, match=f"^{name}:"):
        getattr(kernel, method)(**kwargs)
    for k, v in before.items():
        np.testing.assert_array_equal(np.asarray({**context, **kwargs}[k]), v)


def test_split_calls_of_the_good_context_take_the_fast_path(build):
    kernel = build(S((None, 8, None), axis=1, momentum=0.9), split=True)
    _, calls = _split_context(kernel)
    for method, kwargs in calls.items():
        with _fast_only(getattr(type(kernel), method)):
            getattr(kernel, method)(**kwargs)


def test_unbiased_normalize_refuses_merged_moments_of_one_value(build):
    kernel = build(S((4, 3), unbiased=True), split=True)
    x, p = _args(kernel.spec, np.random.default_rng(12), ())
    merged = kernel.moments(x)
    merged[0] = 1.0  # (a rank holding x alone could not have these; several ranks' could)
    mm = p["moving_mean"].copy()
    with pytest.raises(ValueError, match="^moments: a count .* unbiased"):
        kernel.normalize(x, p["gamma"], p["beta"], mm, p["moving_variance"], moments=merged)
    np.testing.assert_array_equal(mm, p["moving_mean"])


def test_backward_checks_break_a_call(build):
    kernel, good, p = _after_forward(build, S((2, None, 8), momentum=0.9), 8, (5,))
    dy, mean = good["dy"], good["mean"]
    cases = [
        ("dy", ValueError, dict(dy=dy[:, :4])),
        ("dy", TypeError, dict(dy=np.ma.masked_array(dy))),
        ("mean", TypeError, dict(mean=None)),
        ("moving_mean", TypeError, dict(moving_mean=mean)),
        ("beta", TypeError, dict(beta=p["beta"])),
        ("out", ValueError, dict(out=dy)),
    ]
    _each_breaks_backward(kernel, good, cases)


def test_backward_takes_out_on_the_fast_path(build):
    kernel, good, _ = _after_forward(build, S((None, 8, None), axis=1), 9, (2, 3))
    out = np.empty_like(good["x"])
    with _fast_only(type(kernel).backward):
        dx, _, _ = kernel.backward(**good, out=out)
    assert dx is out
    np.testing.assert_array_equal(out, kernel.backward(**good)[0])


def test_faces_cover_every_entry_argument():
    # every C argument of every entry of these specs is filled by the face of some method
    for spec, _ in FAST_PATHS:
        plan = bngen.make_plan(spec, split=True)
        faces = binder.faces(spec, plan.entries)
        for entry in plan.entries:
            filled = {p.arg.name for f in faces.values() if f.entry is entry for p in f.params if p.arg is not None}
            produced = {a.name for a in entry.args
                        if a.role in ("stat_out", "grad_out", "stat64_out", "size", "threads", "flag")}
            assert {a.name for a in entry.args} <= filled | produced, entry.name


def test_mode1_backward_checks_break_a_call(build):
    # per-sample statistics on the fast path: each wrong one is refused there and named by the checked path
    kernel, good, _ = _after_forward(build, S((None, 12), mode=1), 10, (4,))
    dy, mean, variance = good["dy"], good["mean"], good["variance"]
    cases = [
        ("mean", ValueError, dict(mean=mean[:3])),
        ("variance", TypeError, dict(variance=variance.astype(np.float64))),
        ("mean", TypeError, dict(mean=np.ma.masked_array(mean))),
        ("out", ValueError, dict(out=dy)),
    ]
    _each_breaks_backward(kernel, good, cases)


def _each_breaks_backward(kernel, good: dict, cases) -> None:
    """Each (name, error, change) of `cases` applied to the `good` backward call raises
    `error` naming `name`."""
    for name, error, change in cases:
        with pytest.raises(error, match=f"^{name}:"):
            kernel.backward(**{**good, **change})
