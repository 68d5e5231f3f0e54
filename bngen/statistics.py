"""Moments of batches and their merge: what synchronized batch norm and population
statistics add up across batches and processes.

A batch's moments are a float64 array of shape (3, C): per feature the count, the mean
and M2, the sum of squared deviations from the mean (`Kernel.moments`).  Merging uses
Chan, Golub and LeVeque's pairwise formula in float64, which loses nothing when
``|mean| >> std`` (a sum of squares would), in the order given: the same parts in the
same order give the same bits on every process.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np


def merge_moments(parts: Iterable[np.ndarray]) -> np.ndarray:
    """The moments of the union of the batches whose moments are `parts` ((3, C) float64
    each), merged left to right; parts with count 0 (empty batches) change nothing."""
    total = None
    for part in parts:
        part = np.asarray(part, np.float64)
        if total is None:
            total = part.copy()
            continue
        total = merge_pair(total, part)
    if total is None:
        raise ValueError("parts: no moments to merge")
    return total


def merge_pair(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The moments of two batches' union (Chan's update; b's count 0 leaves a as it is)."""
    count_a, mean_a, m2_a = a
    count_b, mean_b, m2_b = b
    count = count_a + count_b
    with np.errstate(invalid="ignore", divide="ignore"):  # channels where both counts are 0
        w = np.where(count > 0, count_b / count, 0.0)
        cross = np.where(count > 0, count_a * count_b / count, 0.0)
    delta = mean_b - mean_a
    mean = np.where(count_b > 0, mean_a + delta * w, mean_a)
    m2 = np.where(count_b > 0, m2_a + m2_b + delta * delta * cross, m2_a)
    return np.stack([count, mean, m2])


def finish(moments: np.ndarray, unbiased: bool = False):
    """``(mean, variance)`` of `moments`, float64; the variance biased (M2/n) or, with
    `unbiased`, M2/(n-1)."""
    count, mean, m2 = np.asarray(moments, np.float64)
    return mean, np.maximum(m2, 0.0) / (count - 1 if unbiased else count)


def population_statistics(data: Any, axis: Any = -1, unbiased: bool = False, communicator: Any = None, *,
                          cache_dir: Any = None, compiler: Any = None):
    """The mean and variance per feature over every value of every batch of `data`
    (MATLAB's 'population' statistics): ``(mean, variance)`` in the parameter dtype
    (float32 for float32, float16 and bfloat16 data, float64 for float64).

    `data` is one array or an iterable of arrays (batches), streamed: memory stays O(C)
    beside one batch whatever the number of batches.  Batches share the feature sizes,
    the number of dimensions and the dtype; other sizes may differ from batch to batch.
    `axis`: the feature axis (or axes).  The variance is biased (M2/n), or M2/(n-1) with
    `unbiased`.  Each batch's (count, mean, M2) comes from a compiled moments kernel
    working in float64, and they merge with Chan's formula, so the result is the float64
    statistics rounded once to the parameter dtype, even when ``|mean| >> std``.
    `communicator` (see `bngen.distributed`): the moments of every rank's data are merged
    too, so a sharded data set gives the statistics of the whole one, the same on every
    rank.  A batch of the wrong shape or dtype raises ValueError naming its 0-based index.
    """
    if not isinstance(unbiased, (bool, np.bool_)):
        raise TypeError(f"unbiased: {unbiased!r} is not a bool")
    total, _, out_dtype = stream_moments(data, axis, communicator, cache_dir=cache_dir, compiler=compiler)
    count = total[0]
    if unbiased and np.any(count < 2):
        raise ValueError(f"data: {int(count.min())} value(s) per feature in all; the unbiased variance needs 2")
    mean, variance = finish(total, unbiased)
    return mean.astype(out_dtype), variance.astype(out_dtype)


def stream_moments(data: Any, axis: Any = -1, communicator: Any = None, *, cache_dir: Any = None,
                   compiler: Any = None):
    """``(moments, shape, param_dtype)``: the merged moments of `data` (see
    `population_statistics`; across ranks too with `communicator`), the shape of its
    first batch, and the parameter dtype of its storage dtype."""
    from .build import build
    from .spec import Spec

    batches = [data] if isinstance(data, np.ndarray) or not hasattr(data, "__iter__") else data
    total = first = kernel = None
    for index, batch in enumerate(batches):
        if not isinstance(batch, np.ndarray):
            try:
                batch = np.asarray(batch)
            except (TypeError, ValueError):
                raise ValueError(f"data: batch {index} is not an array of numbers ({type(batch).__name__})") from None
        if first is None:
            if batch.dtype.name not in ("float32", "float64", "float16", "bfloat16"):
                raise ValueError(f"data: batch {index} has dtype {batch.dtype}; expected float32, float64, float16 "
                                 "or bfloat16")
            probe = Spec(shape=tuple(max(d, 1) for d in batch.shape) or (1,), axis=axis, dtype=batch.dtype.name)
            axes = probe.axis
            first = (batch.shape, tuple(batch.shape[a] for a in axes), batch.dtype)
            # float64 arithmetic whatever the storage: the statistics are rounded once, at the end
            shape = tuple(d if a in axes else None for a, d in enumerate(batch.shape))
            kernel = build(Spec(shape=shape, axis=axes, dtype="float64"), cache_dir, compiler=compiler)
        first_shape, features, dtype = first
        if batch.ndim != len(first_shape) or tuple(batch.shape[a] for a in axes) != features:
            raise ValueError(f"data: batch {index} has shape {batch.shape}; the batches have {len(first_shape)} "
                             f"dimensions with feature sizes {features} on axis {axes}")
        if batch.dtype != dtype:
            raise ValueError(f"data: batch {index} has dtype {batch.dtype}; batch 0 had {dtype}")
        part = kernel.moments(batch.astype(np.float64, copy=False))
        total = part if total is None else merge_pair(total, part)
    if total is None:
        raise ValueError("data: no batches")
    if communicator is not None:
        from . import distributed

        total = distributed.allreduce_moments(distributed.resolve(communicator), kernel.spec, total)
    if np.any(total[0] == 0):
        raise ValueError("data: the batches hold no values")
    return total, first[0], np.dtype(probe.param_dtype)
