"""Moments of batches and their merge: what synchronized batch norm and population
statistics add up across batches and processes.

A batch's moments are a float64 array of shape (3, C): per feature the count, the mean
and M2, the sum of squared deviations from the mean (`Kernel.moments`).  Merging uses
Chan, Golub and LeVeque's pairwise formula in float64, which loses nothing when
``|mean| >> std`` (a sum of squares would), in the order given: the same parts in the
same order give the same bits on every process.
"""

from __future__ import annotations

from typing import Iterable

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
