"""bngen.population_statistics and layer.adapt: batches streamed through a compiled float64
moments kernel and merged with Chan's formula, against NumPy's float64 two-pass
statistics of the concatenated data.

Specs compiled: 3 (float64 moments kernels for NCHW, channels-last and 2-D data).  Streams:
120 float32 batches with |mean| = 1e4 x std; 20 hypothesis examples of float64 streams;
float16/bfloat16 streams; a memory test (10 vs 200 batches under tracemalloc); bad batches
mid-stream; adapt; two ranks as threads.
"""

from __future__ import annotations

import threading
import tracemalloc

import numpy as np
import pytest
from _sync_support import ThreadGroup
from hypothesis import given, settings
from hypothesis import strategies as st

import bngen
from bngen.jit.kernel import numpy_dtype


def reference(batches, axis):
    """NumPy's two-pass float64 statistics over a contiguous (C, n) copy of all the data."""
    x = np.concatenate([b.astype(np.float64) for b in batches])
    axes = (axis % x.ndim,)
    groups = np.ascontiguousarray(np.moveaxis(x, axes, (0,)).reshape(x.shape[axes[0]], -1))
    mean = groups.mean(axis=1)
    return mean, ((groups - mean[:, None]) ** 2).mean(axis=1), groups.shape[1]


def ulps(got, want):
    """|got - want| in units of the last place of got's float32 dtype."""
    want32 = want.astype(np.float32)
    spacing = np.spacing(np.abs(want32)).astype(np.float64)
    return np.abs(got.astype(np.float64) - want) / spacing


def offset_batches(rng, count, tail, dtype=np.float32, axis=1):
    c = tail[axis - 1]
    std = 10.0 ** rng.uniform(-2, 2, c)
    shape_c = [1] * (len(tail) + 1)
    shape_c[axis] = c
    center = (1e4 * std * rng.choice([-1, 1], c)).reshape(shape_c)
    std = std.reshape(shape_c)
    return [(center + std * rng.standard_normal((int(rng.integers(0, 9)),) + tail)).astype(dtype) for _ in range(count)]


def test_120_float32_batches_with_a_large_offset_are_correctly_rounded(rng):
    batches = offset_batches(rng, 120, (6, 4, 3), axis=1)
    mean, variance = bngen.population_statistics(iter(batches), axis=1)
    assert mean.dtype == np.float32 and variance.dtype == np.float32 and mean.shape == (6,)
    want_mean, want_var, _ = reference(batches, 1)
    assert ulps(mean, want_mean).max() <= 1 and ulps(variance, want_var).max() <= 1


def test_channels_last_unbiased_and_half_dtypes(rng):
    for dtype in ("float32", "float16", "bfloat16"):
        nd = numpy_dtype(dtype)
        batches = [(rng.standard_normal((int(rng.integers(1, 7)), 5, 11)) * 3 + 7).astype(nd) for _ in range(15)]
        mean, variance = bngen.population_statistics(batches, unbiased=True)
        want_mean, want_var, n = reference(batches, -1)
        assert ulps(mean, want_mean).max() <= 1
        assert ulps(variance, want_var * n / (n - 1)).max() <= 1


@settings(max_examples=20)
@given(st.integers(1, 30), st.integers(0, 2**32 - 1), st.sampled_from([1.0, 1e4]))
def test_float64_streams_within_16_ulps_of_the_two_pass_statistics(batches_count, seed, offset):
    rng = np.random.default_rng(seed)
    batches = [rng.standard_normal((int(rng.integers(0, 40)), 9)) * 2 + offset for _ in range(batches_count)]
    if sum(b.shape[0] for b in batches) == 0:
        batches.append(rng.standard_normal((1, 9)))
    mean, variance = bngen.population_statistics(batches)
    want_mean, want_var, _ = reference(batches, -1)
    std = np.sqrt(want_var)
    tol = 16 * np.spacing(np.abs(want_mean) + std) * (1 + np.abs(want_mean) / np.maximum(std, 1e-300))
    assert np.all(np.abs(mean - want_mean) <= tol)
    ratio = 1 + np.abs(want_mean) / np.maximum(std, 1e-300)
    assert np.all(np.abs(variance - want_var) <= 16 * np.spacing(want_var) * ratio)


def test_memory_does_not_grow_with_the_number_of_batches(rng):
    def stream(count):
        local = np.random.default_rng(1)
        for _ in range(count):
            yield local.standard_normal((64, 32)).astype(np.float32)

    bngen.population_statistics(stream(2))  # compiled and loaded before measuring

    def peak(count):
        tracemalloc.start()
        bngen.population_statistics(stream(count))
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    small, large = peak(10), peak(200)
    assert large < small * 1.5 + 64 * 1024, (small, large)  # a batch is 8 KiB; 200 of them would be 1.6 MB


def test_a_bad_batch_mid_stream_is_named_and_adapt_leaves_the_weights(rng):
    good = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(3)]
    layer = bngen.BatchNormalization()
    layer.build((None, 3))
    before = layer.get_weights()
    for bad, message in ((rng.standard_normal((4, 5)).astype(np.float32), "batch 3 has shape"),
                         (rng.standard_normal((4, 3)), "batch 3 has dtype float64")):
        with pytest.raises(ValueError, match=message):
            bngen.population_statistics(good + [bad] + good)
        with pytest.raises(ValueError, match=message):
            layer.adapt(iter(good + [bad]))
        for a, b in zip(layer.get_weights(), before):
            assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="data: no batches"):
        bngen.population_statistics([])


def test_adapt_sets_the_moving_statistics(rng):
    batches = offset_batches(rng, 30, (4, 5), axis=1)
    layer = bngen.BatchNormalization(axis=1, unbiased=True)
    layer.adapt(batches)
    want_mean, want_var, n = reference(batches, 1)
    assert ulps(layer.moving_mean, want_mean).max() <= 1
    assert ulps(layer.moving_variance, want_var * n / (n - 1)).max() <= 1
    assert layer.built and layer.gamma.shape == (4,)


def test_a_sharded_data_set_gives_the_whole_statistics_on_every_rank(rng):
    batches = offset_batches(rng, 12, (7,), axis=1)
    group, out = ThreadGroup(3), [None] * 3

    def rank(r):
        out[r] = bngen.population_statistics(batches[r::3], communicator=group.communicator(r))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    want_mean, want_var, _ = reference(batches, -1)
    for mean, variance in out:
        assert np.array_equal(mean, out[0][0]) and np.array_equal(variance, out[0][1])
    assert ulps(out[0][0], want_mean).max() <= 1 and ulps(out[0][1], want_var).max() <= 1
