"""The binder (bngen.binder): which calls have a fast path, that the fast path computes what
the checked path computes, and that each of the checked path's checks breaks a call.

Builds the 7 specs of FAST_PATHS (about 4 s of compiling); the property test draws 40
examples per spec.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bngen
from bngen.jit import binder

S = bngen.Spec

# spec -> the methods with a generated fast path.  Every training spec and every frozen
# backward has one, whatever dimensions are dynamic.
FAST_PATHS = [
    (S((None, 8, None), axis=1), {"__call__", "forward", "backward"}),
    (S((2, None, 8)), {"__call__", "forward", "backward"}),
    (S((None, 6), mode=2, activation="relu"), {"__call__", "forward", "backward"}),
    (S((None, 5, 3), axis=1, training=False), {"__call__", "backward"}),
    (S((None, 5, 3), axis=1, training=False, scale=False), {"__call__", "backward"}),  # frozen: reads no x
    (S((None, 12), mode=1), {"__call__", "forward", "backward"}),
    (S((4, 3), unbiased=True), {"__call__", "forward", "backward"}),
]


def _params(spec, rng):
    c = spec.channels
    pd = spec.param_dtype
    return dict(gamma=rng.uniform(0.5, 2, c).astype(pd), beta=rng.uniform(-1, 1, c).astype(pd),
                moving_mean=rng.uniform(-1, 1, c).astype(pd), moving_variance=rng.uniform(0.5, 2, c).astype(pd))


def _concrete(spec, sizes):
    it = iter(sizes)
    return tuple(next(it) if d is None else d for d in spec.shape)


def _args(spec, rng, sizes):
    x = rng.standard_normal(_concrete(spec, sizes)).astype(spec.dtype)
    p = _params(spec, rng)
    if not spec.scale:
        p.pop("gamma")
    if not spec.center:
        p.pop("beta")
    if spec.mode != 0:
        p.pop("moving_mean"), p.pop("moving_variance")
    return x, p


def _never_checked(*args, **kwargs):
    raise AssertionError("the call took the checked path")


@pytest.mark.parametrize("spec, methods", FAST_PATHS, ids=[s.describe()[:60] for s, _ in FAST_PATHS])
def test_fast_path_table(build, spec, methods):
    kernel = build(spec)
    fast = {name for name in ("__call__", "forward", "backward") if name in type(kernel).__dict__}
    assert fast == methods
    assert set(kernel.plan.fast_entries) == {e.name for e in kernel.plan.entries}


@pytest.mark.parametrize("spec, methods", FAST_PATHS, ids=[s.describe()[:60] for s, _ in FAST_PATHS])
@settings(max_examples=40)
@given(data=st.data())
def test_fast_path_equals_checked_path(build, spec, methods, data):
    kernel = build(spec)
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
            function = getattr(type(kernel), method) if path == "fast" else getattr(bngen.Kernel, method)
            if path == "fast":
                scope = function.__globals__  # the generated function's own scope, this kernel's only
                saved, scope["checked"] = scope["checked"], _never_checked
                try:
                    results.append((function(kernel, *fresh, **kw), fresh, kw))
                finally:
                    scope["checked"] = saved
            else:
                results.append((function(kernel, *fresh, **kw), fresh, kw))
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
    if "backward" in methods:
        dy = rng.standard_normal(x.shape).astype(spec.dtype)
        if spec.uses_batch_stats:
            twice("backward", dy, x, p.get("gamma"), mean, variance, threads=threads, **relu_beta, **out)
        else:
            twice("backward", dy, x, p.get("gamma"), p["moving_mean"], p["moving_variance"], threads=threads, **out)
            twice("backward", dy, x, p.get("gamma"), moving_mean=p["moving_mean"],
                  moving_variance=p["moving_variance"], threads=threads, **out)


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
    kernel = build(spec)
    rng = np.random.default_rng(7)
    x, p = _args(spec, rng, (3, 4))
    kwargs = dict(x=x, **p)
    kwargs.update(change(x, p))
    before = {k: np.array(v, copy=True) for k, v in kwargs.items() if isinstance(v, np.ndarray)}
    with pytest.raises(error, match=f"^{name}:"):
        kernel.forward(**kwargs)
    for k, v in before.items():
        np.testing.assert_array_equal(np.asarray(kwargs[k]), v)


def test_backward_checks_break_a_call(build):
    spec = S((2, None, 8), momentum=0.9)
    kernel = build(spec)
    rng = np.random.default_rng(8)
    x, p = _args(spec, rng, (5,))
    _, mean, variance = kernel.forward(x, **p)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    cases = [
        ("dy", ValueError, dict(dy=dy[:, :4])),
        ("dy", TypeError, dict(dy=np.ma.masked_array(dy))),
        ("mean", TypeError, dict(mean=None)),
        ("moving_mean", TypeError, dict(moving_mean=mean)),
        ("beta", TypeError, dict(beta=p["beta"])),
        ("out", ValueError, dict(out=dy)),
    ]
    _each_breaks_backward(kernel, dict(dy=dy, x=x, gamma=p["gamma"], mean=mean, variance=variance), cases)


def test_backward_takes_out_on_the_fast_path(build):
    spec = S((None, 8, None), axis=1)
    kernel = build(spec)
    rng = np.random.default_rng(9)
    x, p = _args(spec, rng, (2, 3))
    _, mean, variance = kernel.forward(x, **p)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    out = np.empty_like(x)
    function = type(kernel).backward
    saved, function.__globals__["checked"] = function.__globals__["checked"], _never_checked
    try:
        dx, _, _ = kernel.backward(dy, x, p["gamma"], mean, variance, out=out)
    finally:
        function.__globals__["checked"] = saved
    assert dx is out
    np.testing.assert_array_equal(out, kernel.backward(dy, x, p["gamma"], mean, variance)[0])


def test_faces_cover_every_entry_argument():
    # every C argument of every entry of these specs is filled by the face of some method
    for spec, _ in FAST_PATHS:
        plan = bngen.make_plan(spec)
        faces = binder.faces(spec, plan.entries)
        for entry in plan.entries:
            filled = {p.arg.name for f in faces.values() if f.entry is entry for p in f.params if p.arg is not None}
            produced = {a.name for a in entry.args if a.role in ("stat_out", "grad_out", "size", "threads", "flag")}
            assert {a.name for a in entry.args} <= filled | produced, entry.name


def test_mode1_backward_checks_break_a_call(build):
    # per-sample statistics on the fast path: each wrong one is refused there and named by the checked path
    spec = S((None, 12), mode=1)
    kernel = build(spec)
    rng = np.random.default_rng(10)
    x, p = _args(spec, rng, (4,))
    _, mean, variance = kernel.forward(x, **p)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    cases = [
        ("mean", ValueError, dict(mean=mean[:3])),
        ("variance", TypeError, dict(variance=variance.astype(np.float64))),
        ("mean", TypeError, dict(mean=np.ma.masked_array(mean))),
        ("out", ValueError, dict(out=dy)),
    ]
    _each_breaks_backward(kernel, dict(dy=dy, x=x, gamma=p["gamma"], mean=mean, variance=variance), cases)


def _each_breaks_backward(kernel, good: dict, cases) -> None:
    """Each (name, error, change) of `cases` applied to the `good` backward call raises
    `error` naming `name`."""
    for name, error, change in cases:
        with pytest.raises(error, match=f"^{name}:"):
            kernel.backward(**{**good, **change})
