"""The float64 NumPy reference of every kernel: slow, plain and obviously right.

Tests and ``bngen demo`` compare compiled kernels against these functions.  Inputs of
any float dtype are upcast to float64; results are float64.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from .core.spec import Spec


class Forward(NamedTuple):
    y: np.ndarray
    mean: Optional[np.ndarray]  # batch (or, in mode 1, per-sample) mean; None at mode-0 inference
    variance: Optional[np.ndarray]  # biased
    moving_mean: Optional[np.ndarray]  # after the update (training, mode 0), else as given
    moving_variance: Optional[np.ndarray]
    # renorm (training): the correction and the other three statistics after the update
    r: Optional[np.ndarray] = None
    d: Optional[np.ndarray] = None
    moving_stddev: Optional[np.ndarray] = None
    renorm_mean: Optional[np.ndarray] = None
    renorm_stddev: Optional[np.ndarray] = None


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def reduce_axes(spec: Spec) -> tuple:
    """The axes statistics are taken over: all but the feature axes (mode 1: the feature axes)."""
    if spec.mode == 1:
        return tuple(spec.axis)
    return tuple(a for a in range(spec.ndim) if a not in spec.axis)


def statistics(spec: Spec, x: np.ndarray):
    """Mean and biased variance, per feature (mode 1: per sample), in float64.

    The values of each group are made contiguous so that NumPy sums them pairwise, and
    the variance is the corrected two-pass formula, so the oracle stays within a few
    units in the last place even when |mean| >> std.
    """
    x = _f64(x)
    if spec.mode == 1:
        groups = x.reshape(int(np.prod(x.shape[: spec.axis[0]], dtype=np.int64)), -1)
    else:
        groups = np.moveaxis(x, spec.axis, range(len(spec.axis))).reshape(spec.channels, -1)
    groups = np.ascontiguousarray(groups)
    n = groups.shape[1]
    first = groups[:, :1]  # shifting by a member keeps a constant group's mean exact
    mean = first[:, 0] + (groups - first).sum(axis=1) / n
    d = groups - mean[:, None]
    var = ((d * d).sum(axis=1) - d.sum(axis=1) ** 2 / n) / n
    return mean, np.maximum(var, 0.0)


def _bshape(spec: Spec, ndim: int):
    """The shape that makes a (C,) per-feature array broadcast against the input."""
    return [spec.shape[a] if a in spec.axis else 1 for a in range(ndim)]


def forward(spec: Spec, x, gamma=None, beta=None, moving_mean=None, moving_variance=None, *, moving_stddev=None,
            renorm_mean=None, renorm_stddev=None, rmax=None, rmin=None, dmax=None, adjust_scale=None,
            adjust_bias=None, residual=None) -> Forward:
    """What the forward kernel of `spec` computes, in float64.

    Training with renorm (Keras 3.14+): ``s = sqrt(var + eps)``, ``s_bar = max(renorm_stddev,
    sqrt(eps))``, ``r = clip(s / s_bar, rmin, rmax)``, ``d = clip((mean - renorm_mean) / s_bar,
    -dmax, dmax)`` (None: no clip), output ``gamma * (x_hat * r + d) + beta``; renorm_mean
    and renorm_stddev move with renorm_momentum, moving_mean and moving_stddev with
    momentum, and ``moving_variance = max(moving_stddev**2 - eps, 0)``.  With the
    adjustment (a, b) the output is ``gamma * (a * (x_hat * r + d) + b) + beta``.
    ``residual=True``: `residual` (shaped like x) is added before the activation.
    """
    if spec.residual != (residual is not None):
        raise TypeError(f"residual: {'required' if spec.residual else 'not used'} with residual={spec.residual}")
    x = _f64(x)
    bshape = _bshape(spec, x.ndim)
    g = _f64(gamma).reshape(bshape) if spec.scale else 1.0
    b = _f64(beta).reshape(bshape) if spec.center else 0.0
    mm, mv = _f64(moving_mean), _f64(moving_variance)
    if spec.mode == 1:
        lead = x.shape[: spec.axis[0]]
        mean, var = statistics(spec, x)
        m = mean.reshape(lead + (1,) * len(spec.axis))
        v = var.reshape(m.shape)
        y = g * (x - m) / (np.sqrt(v + spec.epsilon) + spec.epsilon) + b
        return Forward(_activate(spec, y), mean.reshape(lead), var.reshape(lead), None, None)
    if spec.virtual_batch_size is not None and spec.training:
        return _ghost_forward(spec, x, gamma, beta, mm, mv)
    if spec.uses_batch_stats and (spec.renorm or spec.adjustment) and spec.training:
        return _variant_forward(spec, x, g, b, bshape, mm, mv, _f64(moving_stddev), _f64(renorm_mean),
                                _f64(renorm_stddev), (rmax, rmin, dmax), _f64(adjust_scale), _f64(adjust_bias),
                                residual)
    if spec.uses_batch_stats:
        mean, var = statistics(spec, x)
        m, v = mean.reshape(bshape), var.reshape(bshape)
        y = g * (x - m) / np.sqrt(v + spec.epsilon) + b
        if spec.updates_moving_stats:
            n = x.size // mean.size
            fed = var * (n / (n - 1)) if spec.unbiased and n > 1 else var
            keep = spec.momentum
            mm = None if mm is None else keep * mm + (1 - keep) * mean
            mv = None if mv is None else keep * mv + (1 - keep) * fed
        return Forward(_activate(spec, y, residual), mean, var, mm, mv)
    a = g / np.sqrt(mv.reshape(bshape) + spec.epsilon)
    y = (x - mm.reshape(bshape)) * a + b
    return Forward(_activate(spec, y, residual), None, None, mm, mv)


def ghost_batches(spec: Spec, n: int) -> int:
    """G, the number of ghost batches of a batch of `n` samples (tf.keras: ghost batch j
    holds the samples i with i % G == j, its reshape (k, G, ...) taking them by stride)."""
    k = spec.virtual_batch_size
    if n % k:
        raise ValueError(f"x: batch size {n} is not a multiple of virtual_batch_size={k}")
    return n // k


def _plain(spec: Spec) -> Spec:
    """The spec one ghost batch is normalised with: no ghosts, any batch size."""
    return spec.replace(virtual_batch_size=None, shape=(None,) + spec.shape[1:])


def _ghost_forward(spec, x, gamma, beta, mm, mv) -> Forward:
    """Ghost batch norm: each ghost batch normalised as a batch of its own; mean and
    variance of shape (G, C); the moving statistics move toward their means over ghosts."""
    ghosts = ghost_batches(spec, x.shape[0])
    y = np.empty(x.shape)
    means, variances = [], []
    for j in range(ghosts):
        part = forward(_plain(spec), x[j::ghosts], gamma, beta)
        y[j::ghosts] = part.y
        means.append(part.mean)
        variances.append(part.variance)
    mean, var = np.stack(means), np.stack(variances)
    keep = spec.momentum
    mm = None if mm is None else keep * mm + (1 - keep) * mean.mean(axis=0)
    mv = None if mv is None else keep * mv + (1 - keep) * var.mean(axis=0)
    return Forward(y, mean, var, mm, mv)


def _variant_forward(spec, x, g, b, bshape, mm, mv, msd, rm, rsd, clip, a, adj_b, residual=None) -> Forward:
    """Training with renorm and/or the adjustment (see `forward`)."""
    mean, var = statistics(spec, x)
    eps, keep, rkeep = spec.epsilon, spec.momentum, spec.renorm_momentum
    x_hat = (x - mean.reshape(bshape)) / np.sqrt(var.reshape(bshape) + eps)
    r = d = None
    m, t = np.ones_like(mean), np.zeros_like(mean)
    if spec.renorm:
        rmax, rmin, dmax = clip
        s = np.sqrt(var + eps)
        s_bar = np.where(rsd < np.sqrt(eps), np.sqrt(eps), rsd)  # (a NaN stddev stays NaN)
        r, d = s / s_bar, (mean - rm) / s_bar
        if rmin is not None:
            r = np.where(r < rmin, rmin, r)
        if rmax is not None:
            r = np.where(r > rmax, rmax, r)
        if dmax is not None:
            d = np.where(d < -dmax, -dmax, np.where(d > dmax, dmax, d))
        m, t = r, d
        rm, rsd = rkeep * rm + (1 - rkeep) * mean, rkeep * rsd + (1 - rkeep) * s
        mm = keep * mm + (1 - keep) * mean
        msd = keep * msd + (1 - keep) * s
        mv = np.maximum(msd * msd - eps, 0.0)
    elif mm is not None or mv is not None:
        mm = None if mm is None else keep * mm + (1 - keep) * mean
        n = x.size // mean.size
        fed = var * (n / (n - 1)) if spec.unbiased and n > 1 else var
        mv = None if mv is None else keep * mv + (1 - keep) * fed
    if spec.adjustment:
        m, t = a * m, a * t + adj_b
    y = g * (x_hat * m.reshape(bshape) + t.reshape(bshape)) + b
    return Forward(_activate(spec, y, residual), mean, var, mm, mv, r, d, msd, rm, rsd)


def inference_coefficients(gamma, beta, mean, variance, epsilon: float):
    """The per-feature ``(scale, shift)`` of an inference batch norm, in float64:
    ``scale = gamma / sqrt(variance + epsilon)``, ``shift = beta - mean * scale``, so that
    ``y = x * scale + shift``.  The one statement of the fold: baked exports and
    `bngen.fold` both use it (gamma None: 1; beta None: 0)."""
    variance = _f64(variance)
    gamma = 1.0 if gamma is None else _f64(gamma)
    beta = 0.0 if beta is None else _f64(beta)
    scale = gamma / np.sqrt(variance + float(epsilon))
    return scale, beta - _f64(mean) * scale


def _activate(spec: Spec, y: np.ndarray, residual=None) -> np.ndarray:
    """The output from the normalised values `y`: plus the residual, if any, then the activation."""
    if residual is not None:
        y = y + _f64(residual)
    if spec.activation == "relu":
        return np.where(y < 0, 0.0, y)
    return y


class Backward(NamedTuple):
    dx: np.ndarray
    dgamma: Optional[np.ndarray]  # None when scale=False
    dbeta: Optional[np.ndarray]  # None when center=False


def backward(spec: Spec, dy, x, gamma=None, mean=None, variance=None, *, beta=None, r=None, d=None,
             adjust_scale=None, adjust_bias=None) -> Backward:
    """The gradients `Kernel.backward` computes, in float64.

    Batch-statistics specs (training, modes 1 and 2): `mean` and `variance` default to
    the exact statistics of `x` (the true gradient of the forward); given, they are used
    as they are (mode 1: per sample, shape ``x.shape[:axis]``).  Mode-0 inference (a
    frozen layer): `mean` and `variance` are the moving statistics, and are required.
    `beta` is needed only for a fused ReLU with ``center=True`` (the mask depends on the
    forward's output).  Training with renorm or
    the adjustment: `r`, `d`, `adjust_scale`, `adjust_bias` are held constant; with
    ``m = a * r`` and ``t = a * d + b`` the output is ``gamma * (x_hat * m + t) + beta``.
    """
    if spec.mode == 1:
        return _backward_per_sample(spec, _f64(dy), _f64(x), gamma, mean, variance, beta)
    x, dy = _f64(x), _f64(dy)
    if spec.virtual_batch_size is not None and spec.training:  # each ghost batch as a batch of its own
        ghosts = ghost_batches(spec, x.shape[0])
        dx, parts = np.empty(x.shape), []
        for j in range(ghosts):
            stats = (None, None) if mean is None else (_f64(mean)[j], _f64(variance)[j])
            parts.append(backward(_plain(spec), dy[j::ghosts], x[j::ghosts], gamma, *stats, beta=beta))
            dx[j::ghosts] = parts[-1].dx
        return Backward(dx, sum(p.dgamma for p in parts) if spec.scale else None,
                        sum(p.dbeta for p in parts) if spec.center else None)
    bshape = _bshape(spec, x.ndim)
    g = _f64(gamma).reshape(bshape) if spec.scale else 1.0
    b = _f64(beta).reshape(bshape) if spec.center and spec.activation == "relu" else 0.0
    axes = reduce_axes(spec)
    if spec.uses_batch_stats:
        exact_mean, exact_variance = statistics(spec, x)
        m = _f64(exact_mean if mean is None else mean).reshape(bshape)
        v = _f64(exact_variance if variance is None else variance).reshape(bshape)
    else:
        if mean is None or variance is None:
            raise TypeError("backward: a frozen (mode-0 inference) layer needs the moving mean and variance")
        m, v = _f64(mean).reshape(bshape), _f64(variance).reshape(bshape)
    fm, ft = 1.0, 0.0  # the variants' factors m and t, per feature
    if spec.uses_batch_stats and spec.training and (spec.renorm or spec.adjustment):
        fm, ft = np.ones(spec.channels), np.zeros(spec.channels)
        if spec.renorm:
            fm, ft = _f64(r), _f64(d)
        if spec.adjustment:
            fm, ft = _f64(adjust_scale) * fm, _f64(adjust_scale) * ft + _f64(adjust_bias)
        fm, ft = fm.reshape(bshape), ft.reshape(bshape)
        b = b + g * ft
    rs = 1.0 / np.sqrt(v + spec.epsilon)
    x_hat = (x - m) * rs
    if spec.activation == "relu":
        dy = np.where(g * fm * x_hat + b <= 0, 0.0, dy)
    sum_dy = dy.sum(axis=axes, keepdims=True)
    sum_dy_xhat = (dy * x_hat).sum(axis=axes, keepdims=True)
    if spec.uses_batch_stats:
        n = x.size // spec.channels
        dx = g * fm * rs / n * (n * dy - sum_dy - x_hat * sum_dy_xhat)
    else:
        dx = dy * g * rs
    dgamma = sum_dy_xhat if isinstance(fm, float) else fm * sum_dy_xhat + ft * sum_dy
    return Backward(
        dx,
        np.reshape(dgamma, -1) if spec.scale else None,
        sum_dy.reshape(-1) if spec.center else None,
    )


# -- the split phases of a training step (synchronized batch norm) ----------------------------
def moments(spec: Spec, x) -> np.ndarray:
    """``Kernel.moments``: (3, C) float64, the count, mean and M2 of each feature of `x`
    (zeros for an empty batch)."""
    x = _f64(x)
    n = x.size // spec.channels
    if n == 0:
        return np.zeros((3, spec.channels))
    mean, var = statistics(spec, x)
    return np.stack([np.full(spec.channels, float(n)), mean, var * n])


def normalize(spec: Spec, x, gamma=None, beta=None, moving_mean=None, moving_variance=None, *, moments) -> Forward:
    """``Kernel.normalize``: `forward` with the statistics of `moments` (count, mean, M2
    of the whole batch) instead of x's own."""
    x = _f64(x)
    count, mean = moments[0], moments[1]
    var = np.maximum(moments[2], 0) / count
    bshape = _bshape(spec, x.ndim)
    g = _f64(gamma).reshape(bshape) if spec.scale else 1.0
    b = _f64(beta).reshape(bshape) if spec.center else 0.0
    y = g * (x - mean.reshape(bshape)) / np.sqrt(var.reshape(bshape) + spec.epsilon) + b
    mm, mv = _f64(moving_mean), _f64(moving_variance)
    if spec.updates_moving_stats:
        fed = var * (count / (count - 1)) if spec.unbiased else var
        keep = spec.momentum
        mm = None if mm is None else keep * mm + (1 - keep) * mean
        mv = None if mv is None else keep * mv + (1 - keep) * fed
    return Forward(_activate(spec, y), mean, var, mm, mv)


def backward_sums(spec: Spec, dy, x, mean, variance, *, gamma=None, beta=None) -> np.ndarray:
    """``Kernel.backward_sums``: (2, C) float64, sum(dy) and sum(dy * x_hat) of this batch
    (dy masked by a fused ReLU)."""
    x, dy = _f64(x), _f64(dy)
    bshape = _bshape(spec, x.ndim)
    x_hat = (x - _f64(mean).reshape(bshape)) / np.sqrt(_f64(variance).reshape(bshape) + spec.epsilon)
    dy = _mask(spec, dy, x_hat, gamma, beta, bshape)
    axes = reduce_axes(spec)
    return np.stack([dy.sum(axis=axes).reshape(-1), (dy * x_hat).sum(axis=axes).reshape(-1)])


def backward_apply(spec: Spec, dy, x, gamma=None, mean=None, variance=None, *, sums, count, beta=None) -> Backward:
    """``Kernel.backward_apply``: dx of this batch from the sums and count of the whole one."""
    x, dy = _f64(x), _f64(dy)
    bshape = _bshape(spec, x.ndim)
    r = 1.0 / np.sqrt(_f64(variance).reshape(bshape) + spec.epsilon)
    x_hat = (x - _f64(mean).reshape(bshape)) * r
    dy = _mask(spec, dy, x_hat, gamma, beta, bshape)
    g = _f64(gamma).reshape(bshape) if spec.scale else 1.0
    sum_dy, sum_dy_xhat = (np.asarray(s, np.float64).reshape(bshape) for s in sums)
    dx = g * r / count * (count * dy - sum_dy - x_hat * sum_dy_xhat)
    return Backward(dx, np.array(sums[1], np.float64) if spec.scale else None,
                    np.array(sums[0], np.float64) if spec.center else None)


def _mask(spec: Spec, dy, x_hat, gamma, beta, bshape):
    """dy with a fused ReLU's mask applied (0 where the forward output was <= 0)."""
    if spec.activation != "relu":
        return dy
    g = _f64(gamma).reshape(bshape) if spec.scale else 1.0
    b = _f64(beta).reshape(bshape) if spec.center else 0.0
    return np.where(g * x_hat + b <= 0, 0.0, dy)


def _backward_per_sample(spec: Spec, dy, x, gamma, mean, variance, beta) -> Backward:
    """Mode 1: the gradient of y = gamma * (x - m) / (sqrt(v + eps) + eps) + beta, with m
    and v each sample's mean and biased variance over its n features (Keras 1.2's extra
    epsilon included).  With s = sqrt(v + eps), d = s + eps, u = x - m, gdy = gamma * dy:
    dx = gdy / d - sum(gdy) / (n d) - u sum(gdy u) / (n s d^2), the sums over the sample;
    dgamma = sum(dy * u / d) and dbeta = sum(dy) over the samples."""
    bshape = _bshape(spec, x.ndim)
    lead = x.shape[: spec.axis[0]]
    features = tuple(range(spec.axis[0], x.ndim))  # the feature axes: the trailing ones
    samples = tuple(range(spec.axis[0]))
    exact_mean, exact_variance = statistics(spec, x)
    sshape = lead + (1,) * len(spec.axis)
    m = _f64(exact_mean if mean is None else mean).reshape(sshape)
    v = _f64(exact_variance if variance is None else variance).reshape(sshape)
    g = _f64(gamma).reshape(bshape) if spec.scale else 1.0
    b = _f64(beta).reshape(bshape) if spec.center and spec.activation == "relu" else 0.0
    n = spec.channels
    s = np.sqrt(v + spec.epsilon)
    d = s + spec.epsilon
    u = x - m
    if spec.activation == "relu":
        dy = np.where(g * u / d + b <= 0, 0.0, dy)
    gdy = g * dy
    sum_gdy = gdy.sum(axis=features, keepdims=True)
    sum_gdy_u = (gdy * u).sum(axis=features, keepdims=True)
    dx = gdy / d - sum_gdy / (n * d) - u * sum_gdy_u / (n * s * d * d)
    return Backward(
        dx,
        (dy * u / d).sum(axis=samples).reshape(-1) if spec.scale else None,
        dy.sum(axis=samples).reshape(-1) if spec.center else None,
    )
