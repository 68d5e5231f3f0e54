"""Bad calls of Kernel.backward: one case per class of error.  Each must raise the right
exception with a message naming the argument, before any C runs, and leave every
caller array untouched.

Specs compiled: 4 (a training kernel with a fused ReLU, a frozen one, a scale/center-off
one and a mode-1 one); one call per case (28 cases).
"""

from __future__ import annotations

import numpy as np
import pytest

import bngen

TRAIN = bngen.Spec((None, 3, 4), axis=1, activation="relu")
FROZEN = bngen.Spec((None, 3, 4), axis=1, training=False)
PLAIN = bngen.Spec((None, 3), center=False, scale=False)
SAMPLEWISE = bngen.Spec((None, 3), mode=1)


def _arrays(spec, rng):
    shape = tuple(2 if d is None else d for d in spec.shape)
    c = spec.channels
    return dict(
        dy=rng.standard_normal(shape).astype(np.float32),
        x=rng.standard_normal(shape).astype(np.float32),
        gamma=rng.standard_normal(c).astype(np.float32),
        beta=rng.standard_normal(c).astype(np.float32),
        mean=rng.standard_normal(c).astype(np.float32),
        variance=rng.random(c).astype(np.float32),
        out=np.full(shape, 7.0, np.float32),
    )


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


# (spec, case id, change to the keyword arguments, exception, words the message must contain)
CASES = [
    (TRAIN, "dy-list", lambda a: dict(a, dy=a["dy"].tolist()), TypeError, "dy"),
    (TRAIN, "dy-dtype", lambda a: dict(a, dy=a["dy"].astype(np.float64)), TypeError, "dy"),
    (TRAIN, "dy-shape", lambda a: dict(a, dy=a["dy"][:1]), ValueError, "dy"),
    (TRAIN, "x-shape", lambda a: dict(a, x=a["x"][:, :2]), ValueError, "x"),
    (TRAIN, "x-dtype", lambda a: dict(a, x=a["x"].astype(np.float16)), TypeError, "x"),
    (TRAIN, "gamma-missing", lambda a: dict(a, gamma=None), TypeError, "gamma"),
    (TRAIN, "gamma-shape", lambda a: dict(a, gamma=a["gamma"][:2]), ValueError, "gamma"),
    (TRAIN, "beta-missing-relu", lambda a: dict(a, beta=None), TypeError, "beta"),
    (TRAIN, "mean-missing", lambda a: dict(a, mean=None), TypeError, "mean"),
    (TRAIN, "mean-dtype", lambda a: dict(a, mean=a["mean"].astype(np.float64)), TypeError, "mean"),
    (TRAIN, "variance-shape", lambda a: dict(a, variance=a["variance"].reshape(3, 1)), ValueError, "variance"),
    (TRAIN, "variance-not-array", lambda a: dict(a, variance=[1.0, 1.0, 1.0]), TypeError, "variance"),
    (TRAIN, "moving-given", lambda a: dict(a, moving_mean=a["mean"]), TypeError, "moving_mean"),
    (TRAIN, "out-readonly", lambda a: dict(a, out=_readonly(a["out"])), ValueError, "out"),
    (TRAIN, "out-dtype", lambda a: dict(a, out=a["out"].astype(np.float64)), TypeError, "out"),
    (TRAIN, "out-shape", lambda a: dict(a, out=a["out"][:1]), ValueError, "out"),
    (TRAIN, "out-noncontiguous", lambda a: dict(a, out=np.zeros((2, 3, 8), np.float32)[:, :, ::2]), ValueError, "out"),
    (TRAIN, "out-is-dy", lambda a: dict(a, out=a["dy"]), ValueError, "out"),
    (TRAIN, "out-is-x", lambda a: dict(a, out=a["x"]), ValueError, "out"),
    (TRAIN, "threads", lambda a: dict(a, threads=0), ValueError, "threads"),
    (FROZEN, "beta-without-relu", lambda a: dict(a, beta=np.ones(3, np.float32)), TypeError, "beta"),
    (FROZEN, "moving-twice", lambda a: dict(a, moving_mean=a["mean"]), TypeError, "moving_mean"),
    (FROZEN, "moving-missing", lambda a: dict(a, variance=None), TypeError, "moving_variance"),
    (PLAIN, "gamma-extra", lambda a: dict(a, gamma=np.ones(3, np.float32)), TypeError, "gamma"),
    (PLAIN, "beta-extra", lambda a: dict(a, beta=np.ones(3, np.float32)), TypeError, "beta"),
    (PLAIN, "stats-wrong-length", lambda a: dict(a, mean=np.zeros(4, np.float32)), ValueError, "mean"),
    (SAMPLEWISE, "mode1-per-feature-stats", lambda a: dict(a, mean=np.zeros(3, np.float32)), ValueError, "mean"),
    (SAMPLEWISE, "mode1-moving-given", lambda a: dict(a, moving_variance=a["variance"]), TypeError, "moving_variance"),
]


@pytest.mark.parametrize("spec,case,change,exc,words", CASES, ids=[c[1] for c in CASES])
def test_bad_backward_call(build, rng, spec, case, change, exc, words):
    kernel = build(spec)
    base = _arrays(spec, rng)
    if not spec.scale:
        base["gamma"] = None
    if not (spec.activation == "relu" and spec.center):
        base["beta"] = None  # backward takes beta only for the ReLU mask
    kw = change(base)
    passed = [(k, v, v.copy()) for k, v in kw.items() if isinstance(v, np.ndarray)]
    args = [kw.pop(k) for k in ("dy", "x", "gamma", "mean", "variance", "out")]
    with pytest.raises(exc) as info:
        kernel.backward(*args, **kw)
    assert words in str(info.value), str(info.value)
    for name, arr, before in passed:
        assert np.array_equal(arr, before), f"{name} was modified"


def test_good_call_for_reference(build, rng):
    """The same arrays, unchanged, are a valid call (so each case above fails for its own reason)."""
    for spec in (TRAIN, FROZEN, PLAIN):
        kernel = build(spec)
        a = _arrays(spec, rng)
        beta = a["beta"] if spec.activation == "relu" else None
        dx, dgamma, dbeta = kernel.backward(a["dy"], a["x"], a["gamma"] if spec.scale else None, a["mean"],
                                            a["variance"], a["out"], beta=beta)
        assert dx is a["out"]
