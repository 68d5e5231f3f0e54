"""Folding an inference batch norm into the layer before it (dense or convolution).

With ``s = gamma / sqrt(variance + epsilon)`` (README, "Folding into the layer before"):
``W'[o, ...] = W[o, ...] * s[o]`` and ``b' = (b - mean) * s + beta``, where `o` runs
along the weight's output-feature axis: 0 for PyTorch dense and convolution weights,
1 for PyTorch transposed convolutions, -1 for Keras kernels.  The layer then computes
the batch norm's output by itself, and the batch norm disappears from the model.
"""

from __future__ import annotations

import math
import numbers
from typing import Tuple

import numpy as np

from ..core.spec import canonical_axes
from ..oracle import inference_coefficients


def fold(weight, bias, gamma, beta, mean, variance, epsilon: float, out_axis=0) -> Tuple[np.ndarray, np.ndarray]:
    """The (weight, bias) of the preceding layer with the batch norm folded in.

    `weight`: the layer's weight array; `out_axis` (an int, negatives allowed, or a tuple
    of adjacent ints whose flattened size is the feature count, e.g. ``(2, 3)`` for a
    Keras depthwise kernel ``(kh, kw, C, multiplier)``) is its output-feature axis.
    `bias`: ``(C,)`` or None (no bias: 0).  `gamma` / `beta`: ``(C,)`` or None (1 / 0,
    as with ``scale=False`` / ``center=False``).  `mean` / `variance`: the moving
    statistics, ``(C,)``.  Arithmetic in float64; the results take the weight's dtype
    (float64 for integer weights).  The inputs are not modified.
    """
    w = np.asarray(weight)
    if w.dtype.kind not in "fiu" or w.ndim == 0:
        kind = getattr(weight, "dtype", type(weight).__name__)
        raise TypeError(f"weight: expected a real array with at least one axis, got {kind} of shape {w.shape}")
    axes = _axes(out_axis, w.ndim)
    channels = math.prod(w.shape[a] for a in axes)
    if not isinstance(epsilon, numbers.Real) or isinstance(epsilon, bool) or not math.isfinite(epsilon) or epsilon <= 0:
        raise ValueError(f"epsilon: {epsilon!r} must be a finite number > 0")
    mean = _vector("mean", mean, channels, out_axis, w.shape)
    variance = _vector("variance", variance, channels, out_axis, w.shape)
    gamma = np.ones(channels) if gamma is None else _vector("gamma", gamma, channels, out_axis, w.shape)
    beta = np.zeros(channels) if beta is None else _vector("beta", beta, channels, out_axis, w.shape)
    b = np.zeros(channels) if bias is None else _vector("bias", bias, channels, out_axis, w.shape)
    if np.any(variance + epsilon <= 0):
        raise ValueError("variance: variance + epsilon must be > 0 for every feature")

    s, shift = inference_coefficients(gamma, beta, mean, variance, epsilon)
    shape = [1] * w.ndim
    for a in axes:
        shape[a] = w.shape[a]
    dtype = w.dtype if w.dtype.kind == "f" else np.dtype(np.float64)
    folded_weight = (w.astype(np.float64) * s.reshape(shape)).astype(dtype)
    folded_bias = (b * s + shift).astype(dtype)
    return folded_weight, folded_bias


def _axes(out_axis, ndim: int) -> Tuple[int, ...]:
    if not (isinstance(out_axis, numbers.Integral) or isinstance(out_axis, (tuple, list))) or isinstance(out_axis, bool):
        raise TypeError(f"out_axis: {out_axis!r} is not an int or a tuple of ints")
    if isinstance(out_axis, (tuple, list)) and not all(isinstance(a, numbers.Integral) and not isinstance(a, bool)
                                                      for a in out_axis):
        raise TypeError(f"out_axis: {out_axis!r} is not an int or a tuple of ints")
    return canonical_axes(out_axis, ndim, "out_axis", "weight", "output-feature axis", error=ValueError)


def _vector(name: str, value, channels: int, out_axis, weight_shape) -> np.ndarray:
    v = np.asarray(value)
    if v.dtype.kind not in "fiu":
        raise TypeError(f"{name}: expected real numbers, got dtype {v.dtype}")
    if v.shape != (channels,):
        raise ValueError(
            f"{name}: shape {v.shape} does not match the {channels} output features of the weight "
            f"(shape {tuple(weight_shape)}, out_axis={out_axis!r}); expected ({channels},)"
        )
    v = v.astype(np.float64)
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name}: holds NaN or infinite values")
    return v


def fold_npz(layer, bn, epsilon: float, out_axis=0) -> dict:
    """`fold` over the arrays of two loaded ``.npz`` files (or dicts): `layer` with
    ``weight`` (or ``kernel``) and optionally ``bias``; `bn` with ``moving_mean``,
    ``moving_variance`` and optionally ``gamma``, ``beta``.  Returns the folded layer's
    arrays under the same names."""
    keys = set(layer.keys())
    weight_key = "weight" if "weight" in keys else "kernel" if "kernel" in keys else None
    if weight_key is None or keys - {weight_key, "bias"}:
        raise ValueError(f"layer: expected the arrays weight (or kernel) and optionally bias, found {', '.join(sorted(keys)) or 'none'}")
    bn_keys = set(bn.keys())
    allowed = {"gamma", "beta", "moving_mean", "moving_variance"}
    if not {"moving_mean", "moving_variance"} <= bn_keys or bn_keys - allowed:
        raise ValueError(
            f"bn: expected the arrays moving_mean, moving_variance and optionally gamma, beta, found {', '.join(sorted(bn_keys)) or 'none'}"
        )
    get = lambda d, k: d[k] if k in d.keys() else None  # noqa: E731
    weight, bias = fold(layer[weight_key], get(layer, "bias"), get(bn, "gamma"), get(bn, "beta"),
                        bn["moving_mean"], bn["moving_variance"], epsilon, out_axis)
    return {weight_key: weight, "bias": bias}


__all__ = ["fold", "fold_npz"]
