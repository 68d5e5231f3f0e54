"""Population statistics: the exact mean and variance over a whole data set, streamed
batch by batch through a compiled moments kernel (MATLAB's 'population' statistics,
Keras' `adapt`), and across ranks with a communicator (`bngen.distributed`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import distributed
from ..core.spec import DTYPES, Spec
from ..jit.build import build
from ..statistics import finish, merge_pair


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
    batches = [data] if isinstance(data, np.ndarray) or not hasattr(data, "__iter__") else data
    total = first = kernel = None
    for index, batch in enumerate(batches):
        if not isinstance(batch, np.ndarray):
            try:
                batch = np.asarray(batch)
            except (TypeError, ValueError):
                raise ValueError(f"data: batch {index} is not an array of numbers ({type(batch).__name__})") from None
        if first is None:
            if batch.dtype.name not in DTYPES:
                raise ValueError(f"data: batch {index} has dtype {batch.dtype}; expected float32, float64, float16 "
                                 "or bfloat16")
            probe = Spec(shape=tuple(max(d, 1) for d in batch.shape) or (1,), axis=axis, dtype=batch.dtype.name)
            axes = probe.axis
            first = (batch.shape, tuple(batch.shape[a] for a in axes), batch.dtype)
            # float64 arithmetic whatever the storage: the statistics are rounded once, at the end
            shape = tuple(d if a in axes else None for a, d in enumerate(batch.shape))
            kernel = build(Spec(shape=shape, axis=axes, dtype="float64"), cache_dir, compiler=compiler, split=True)
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
        total = distributed.allreduce_moments(distributed.resolve(communicator), kernel.spec, total)
    if np.any(total[0] == 0):
        raise ValueError("data: the batches hold no values")
    return total, first[0], np.dtype(probe.param_dtype)
