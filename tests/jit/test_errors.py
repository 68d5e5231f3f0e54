"""Bad calls: every class of bad input the README names raises before any C runs, with a
message naming the argument, and leaves every caller array untouched.

Classes covered (each a case below):
  x:      not an ndarray; wrong dtype; wrong number of dimensions; a static size that
          differs from the spec; a zero-sized dynamic dimension
  gamma/beta: missing when the spec uses them; given when it does not; wrong shape;
          wrong dtype; not an ndarray
  moving_mean/moving_variance: missing at mode-0 inference; given to mode 1 or 2;
          read-only or non-contiguous when training must update them; one array passed
          as both; sharing memory with gamma or beta
  out:    not an ndarray; wrong shape; wrong dtype; non-contiguous; read-only; sharing
          memory with x
  other:  a batch of one value per feature with unbiased=True; a bad thread count;
          forward() on a mode-0 inference kernel; an unknown keyword; build() of a
          non-Spec

Specs: 4 kernels; no hypothesis (each case is one deterministic call).
"""

from __future__ import annotations

import numpy as np
import pytest

import bngen

TRAIN = bngen.Spec((None, 4, 3), axis=1, unbiased=True)
INFER = bngen.Spec((None, 4, 3), axis=1, training=False)
MODE2_BARE = bngen.Spec((None, 4, 3), axis=1, mode=2, center=False, scale=False)
MODE1 = bngen.Spec((None, 4), mode=1)


def arrays(spec, batch=2):
    rng = np.random.default_rng(0)
    pd = spec.param_dtype
    c = spec.channels
    shape = (batch,) + tuple(d or 3 for d in spec.shape[1:])
    return dict(
        x=rng.standard_normal(shape).astype(spec.dtype),
        gamma=rng.standard_normal(c).astype(pd),
        beta=rng.standard_normal(c).astype(pd),
        moving_mean=rng.standard_normal(c).astype(pd),
        moving_variance=rng.random(c).astype(pd) + 1,
        out=np.full(shape, 7.0, spec.dtype),
    )


def case(spec, exc, match, method="__call__", **changes):
    return pytest.param(spec, exc, match, method, changes, id=f"{match}")


def _ro(a):
    a = a.copy()
    a.flags.writeable = False
    return a


CASES = [
    case(TRAIN, TypeError, "x: expected a numpy.ndarray", x=[[1.0]]),
    case(TRAIN, TypeError, "x: dtype is float64", x=np.zeros((2, 4, 3))),
    case(TRAIN, ValueError, r"x: shape \(2, 4\) does not match", x=np.zeros((2, 4), np.float32)),
    case(TRAIN, ValueError, r"x: shape \(2, 5, 3\) does not match", x=np.zeros((2, 5, 3), np.float32)),
    case(TRAIN, ValueError, "x: shape .* zero-sized", x=np.zeros((0, 4, 3), np.float32)),
    case(TRAIN, TypeError, r"gamma: required \(scale=True\)", gamma=None),
    case(TRAIN, TypeError, r"beta: required \(center=True\)", beta=None),
    case(MODE2_BARE, TypeError, "gamma: not used by this kernel .*scale=False", gamma="array"),
    case(MODE2_BARE, TypeError, "beta: not used by this kernel .*center=False", beta="array"),
    case(TRAIN, ValueError, r"gamma: shape is \(5,\); expected \(4,\)", gamma=np.ones(5, np.float32)),
    case(TRAIN, ValueError, r"beta: shape is \(1, 4\)", beta=np.ones((1, 4), np.float32)),
    case(TRAIN, TypeError, "gamma: dtype is float64; parameters of a float32 kernel are float32", gamma=np.ones(4)),
    case(TRAIN, TypeError, "beta: expected a numpy.ndarray", beta=[0.0] * 4),
    case(INFER, TypeError, r"moving_mean: required \(inference", moving_mean=None),
    case(INFER, TypeError, r"moving_variance: required \(inference", moving_variance=None),
    case(MODE1, TypeError, "moving_mean: not used by this kernel .*mode 1", moving_mean="array"),
    case(MODE2_BARE, TypeError, "moving_variance: not used by this kernel .*mode 2", moving_variance="array"),
    case(TRAIN, ValueError, "moving_mean: is read-only", moving_mean="readonly"),
    case(TRAIN, ValueError, "moving_variance: must be C-contiguous", moving_variance="strided"),
    case(TRAIN, ValueError, "moving_variance: shares memory with moving_mean", moving_variance="same"),
    case(TRAIN, ValueError, "moving_mean: shares memory with gamma", moving_mean="gamma"),
    case(TRAIN, ValueError, "moving_variance: shares memory with beta", moving_variance="beta"),
    case(TRAIN, TypeError, "out: expected a numpy.ndarray", out=[0.0]),
    case(TRAIN, ValueError, r"out: shape is \(2, 4, 4\)", out=np.zeros((2, 4, 4), np.float32)),
    case(TRAIN, TypeError, "out: dtype is float64", out=np.zeros((2, 4, 3))),
    case(TRAIN, ValueError, "out: must be C-contiguous", out=np.zeros((2, 4, 6), np.float32)[:, :, ::2]),
    case(TRAIN, ValueError, "out: is read-only", out="readonly"),
    case(TRAIN, ValueError, "out: shares memory with x", out="x"),
    case(bngen.Spec((None, 4, None), axis=1, unbiased=True), ValueError, "x: .*one value per feature", x=np.ones((1, 4, 1), np.float32)),
    case(TRAIN, ValueError, "threads: 0 must be an int >= 1", threads=0),
    case(TRAIN, ValueError, "threads: 'two' must be an int", threads="two"),
    case(INFER, TypeError, "forward: this is a mode-0 inference kernel", method="forward"),
    case(TRAIN, TypeError, "unexpected keyword argument 'momentum'", momentum=0.5),
]


@pytest.mark.parametrize("spec, exc, match, method, changes", CASES)
def test_bad_call_raises_and_touches_nothing(build, spec, exc, match, method, changes):
    kernel = build(spec)
    full = arrays(spec)
    args = dict(full)
    if not spec.scale:
        args["gamma"] = None
    if not spec.center:
        args["beta"] = None
    if spec.mode != 0:
        args["moving_mean"] = args["moving_variance"] = None
    for name, value in changes.items():
        if isinstance(value, str):  # a recipe for an array derived from the good ones
            value = {
                "readonly": lambda: _ro(args[name]),
                "strided": lambda: np.repeat(args[name], 2)[::2],
                "same": lambda: args["moving_mean"],
                "x": lambda: args["x"],
                "gamma": lambda: args["gamma"],
                "beta": lambda: args["beta"],
                "array": lambda: full[name],  # a well-formed array the spec does not use
            }.get(value, lambda: value)()
        args[name] = value
    before = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    x = args.pop("x")
    with pytest.raises(exc, match=match):
        getattr(kernel, method)(x, **args)
    args["x"] = x
    for name, value in args.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(value, before[name], err_msg=f"{name} was modified")


def test_build_rejects_a_non_spec():
    with pytest.raises(TypeError, match="spec: expected a bngen.Spec"):
        bngen.build({"shape": [2, 3]})
