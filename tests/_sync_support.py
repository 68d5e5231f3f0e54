"""What the synchronized-batch-norm tests share: problems split into per-rank shards, and
the comparison of per-rank results with the float64 oracle on the concatenated batch, and
ranks as threads of one process."""

from __future__ import annotations

import threading

import numpy as np
from hypothesis import strategies as st
from strategies import K, assert_close, feature_shape, unit_roundoff

import bngen
from bngen import oracle
from bngen.jit.kernel import numpy_dtype


def shardings(max_batch: int) -> tuple:
    """Hypothesis strategies for the arguments of `problem` and a step count: each rank's
    batch size (1-4 ranks, 0 to `max_batch` samples each), the seed, the distribution and
    the number of training steps (1-3)."""
    return (st.lists(st.integers(0, max_batch), min_size=1, max_size=4), st.integers(0, 2**32 - 1),
            st.sampled_from(["normal", "offset"]), st.integers(1, 3))


def problem(spec: bngen.Spec, sizes, seed: int, dist: str = "normal"):
    """Shards of one batch, their dy, and parameters: ``(xs, dys, params)`` with xs[i] of
    batch size sizes[i] (axis 0), every rank able to rebuild the same from `seed`."""
    rng = np.random.default_rng(seed)
    tail = tuple(d for d in spec.shape[1:])
    assert None not in tail, "shards split axis 0; the rest of the shape is static"
    shape = (sum(sizes),) + tail
    c = spec.channels
    bshape = feature_shape(spec, len(shape))
    std = 10.0 ** rng.uniform(-2, 0.5 if spec.dtype == "float16" else 2)  # float16 ends at 65504
    if dist == "offset":  # |mean| = 1e4 x std: a one-pass sum of squares would lose everything
        centers = 1e4 * std * rng.choice([-1.0, 1.0], c)
    else:
        centers = 3 * std * rng.standard_normal(c)
    x = centers.reshape(bshape) + std * rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    dtype = numpy_dtype(spec.dtype)
    x, dy = x.astype(dtype), dy.astype(dtype)
    pd = spec.param_dtype
    params = dict(
        gamma=rng.uniform(0.5, 2, c).astype(pd) if spec.scale else None,
        beta=rng.uniform(-1, 1, c).astype(pd) if spec.center else None,
        moving_mean=(centers + std * rng.standard_normal(c)).astype(pd),
        moving_variance=(std**2 * rng.uniform(0.5, 2, c)).astype(pd),
    )
    cuts = np.cumsum([0] + list(sizes))
    xs = [x[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    dys = [dy[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    return xs, dys, params


def storage_eps(spec) -> float:
    """The relative spacing of the stored dtype (what rounding y or dx to it costs)."""
    return float(np.finfo(numpy_dtype(spec.dtype)).eps)


def near_kink(spec, x, params) -> bool:
    """True when some forward output (before a fused ReLU) is within rounding of 0, where C
    and the oracle may mask differently; such examples are not comparable."""
    if spec.activation != "relu":
        return False
    plain = spec.replace(activation=None, dtype="float64")
    y = oracle.forward(plain, x.astype(np.float64), params["gamma"], params["beta"]).y
    return bool(np.any((np.abs(y) > 0) & (np.abs(y) < 1e-3 * (np.abs(y).max() + 1))))


def check_forward(spec, x, params, ys, mean, variance, moving=None, steps=1):
    """ys (the shards' outputs, in order), mean and variance against the oracle on the
    concatenated batch x; `moving`: (moving_mean, moving_variance) after `steps` steps
    on this same batch, starting from params'."""
    u, eps = unit_roundoff(spec), storage_eps(spec)
    ref = oracle.forward(spec, x.astype(np.float64), params["gamma"], params["beta"],
                         params["moving_mean"], params["moving_variance"])
    x64 = x.astype(np.float64)
    std = np.sqrt(ref.variance)
    assert_close("mean", mean, ref.mean, K * u * (std + np.abs(ref.mean)) + 1e-300)
    # Chan's merge (in float64) carries the means' rounding, |mean| * 2**-53, into M2 through
    # the squared difference of the parts' means
    merge = K * 2.0**-53 * std * (std + np.abs(ref.mean))
    assert_close("variance", variance, ref.variance, K * u * ref.variance + merge + 1e-300)
    bshape = feature_shape(spec, x.ndim)
    g = np.abs(params["gamma"]).reshape(bshape) if spec.scale else 1.0
    b = np.abs(params["beta"]).reshape(bshape) if spec.center else 0.0
    r = 1 / np.sqrt(ref.variance.reshape(bshape) + spec.epsilon)
    scale = g * (np.abs(x64) + np.abs(ref.mean).reshape(bshape) + std.reshape(bshape)) * r + b
    y = np.concatenate([np.asarray(v, np.float64) for v in ys])
    assert_close("y", y, ref.y, K * u * scale + eps * np.abs(ref.y) + 1e-300)
    if moving is not None and spec.updates_moving_stats:
        mm, mv = params["moving_mean"].astype(np.float64), params["moving_variance"].astype(np.float64)
        n = x.size // spec.channels
        fed = ref.variance * (n / (n - 1)) if spec.unbiased else ref.variance
        for _ in range(steps):
            mm = spec.momentum * mm + (1 - spec.momentum) * ref.mean
            mv = spec.momentum * mv + (1 - spec.momentum) * fed
        assert_close("moving_mean", moving[0], mm, K * steps * u * (np.abs(mm) + np.abs(ref.mean) + std) + 1e-300)
        assert_close("moving_variance", moving[1], mv, K * steps * u * (mv + fed) + 2 * merge + 1e-300)


def check_backward(spec, x, dy, params, dxs, dgamma, dbeta):
    """dxs (the shards' dx, in order), dgamma and dbeta against the oracle's gradient of
    the single-process forward on the concatenated batch."""
    relu_beta = params["beta"] if spec.activation == "relu" else None
    ref = oracle.backward(spec, dy, x, params["gamma"], beta=relu_beta)
    rtol = 1e-12 if spec.dtype == "float64" else 2e-5
    eps = storage_eps(spec)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    axes = oracle.reduce_axes(spec)
    mean, var = x64.mean(axis=axes, keepdims=True), x64.var(axis=axes, keepdims=True)
    r = 1 / np.sqrt(var + spec.epsilon)
    g = np.abs(params["gamma"]).max() if spec.scale else 1.0
    dy_scale = np.abs(dy64).max()
    xhat_scale = np.abs((x64 - mean) * r).max() + 1
    n = x.size // spec.channels
    dx = np.concatenate([np.asarray(v, np.float64) for v in dxs])
    # x_hat's error from the merged mean's float64 rounding (|mean| * 2**-53, a few ulps after
    # Chan's merge), relative to 1: large when |mean| >> std
    merge = 64 * 2.0**-53 * np.max(np.abs(mean) * r)
    tol_dx = (rtol + merge) * g * np.max(r) * dy_scale * (1 + 2 * xhat_scale**2) + eps * np.abs(ref.dx) + 1e-300
    assert_close("dx", dx, ref.dx, tol_dx)
    assert (dgamma is None) == (not spec.scale) and (dbeta is None) == (not spec.center)
    if spec.scale:
        assert_close("dgamma", dgamma, ref.dgamma, (rtol + merge) * n * dy_scale * xhat_scale + 1e-300)
    if spec.center:
        assert_close("dbeta", dbeta, ref.dbeta, rtol * n * dy_scale + 1e-300)


class ThreadGroup:
    """Ranks as threads of this process: all bngen needs of an engine is allgather."""

    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots = [None] * size

    def communicator(self, rank: int):
        group = self

        class Communicator:
            def allgather(self, array):
                group.slots[rank] = np.array(array, copy=True)
                group.barrier.wait()  # every rank has written
                parts = [s.copy() for s in group.slots]
                group.barrier.wait()  # every rank has read: the slots may be reused
                return parts

        return Communicator()
