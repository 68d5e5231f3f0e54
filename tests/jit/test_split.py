"""The split phases of a training step (Kernel.moments, normalize, backward_sums,
backward_apply) against the float64 oracle, a batch cut into shards as ranks hold it.

Specs compiled: 6, covering channels-first and channels-last schedules, float32, float64,
float16 and bfloat16, modes 0 and 2, unbiased, center/scale off and the fused ReLU.
Examples: 60 per spec (shards of 1-4 ranks, some empty, normal and |mean| = 1e4 x std
data), each checking the merged moments, y, the statistics, the moving averages, dx,
dgamma and dbeta; plus one-shard bit-identity with the fused forward on every spec, and
argument errors: about 2,000 kernel calls in all.
"""

from __future__ import annotations

import numpy as np
import pytest
from _sync_support import K, assert_close, check_backward, check_forward, near_kink, problem, shardings, unit_roundoff
from hypothesis import assume, given, settings

import bngen
from bngen import oracle
from bngen.statistics import merge_moments

S = bngen.Spec
SPECS = [
    S((None, 5, 7), axis=1),  # channels-first float32
    S((None, 13), dtype="float64", activation="relu", unbiased=True, momentum=0.9),  # channels-last, relu, unbiased
    S((None, 3, 4, 4), axis=1, dtype="float16", mode=2, activation="relu"),  # channels-first half, mode 2
    S((None, 2, 3, 9), axis=-1, dtype="bfloat16", center=False),  # channels-last bfloat16, no beta
    S((None, 2, 37), axis=-1, dtype="float16", scale=False, activation="relu", momentum=0.5),  # no gamma
    S((None, 1030), axis=-1, momentum=0.8),  # channels-last over two channel tiles
]


def x_per_sample(spec):
    """Values per feature in one sample (axis-0 entry) of `spec`'s input."""
    return int(np.prod(spec.shape[1:])) // spec.channels


def _ids(spec):
    return f"{spec.dtype}-m{spec.mode}-ax{spec.axis[0]}-C{spec.channels}"


def split_step(kernel, xs, dys, params, steps=1):
    """One synchronized training step done by hand, shard by shard, as ranks would:
    moments, merge, normalize (each shard its own copy of the moving statistics),
    gradient sums, their sum in shard order, apply."""
    spec = kernel.spec
    relu = spec.activation == "relu"
    moving = [(params["moving_mean"].copy(), params["moving_variance"].copy()) for _ in xs]
    for _ in range(steps):
        merged = merge_moments([kernel.moments(x) for x in xs])
        outs = []
        for x, (mm, mv) in zip(xs, moving):
            if spec.updates_moving_stats:
                outs.append(kernel.normalize(x, params["gamma"], params["beta"], mm, mv, moments=merged))
            else:
                outs.append(kernel.normalize(x, params["gamma"], params["beta"], moments=merged))
    count = merged[0, 0]
    mean64, var64 = merged[1], np.maximum(merged[2], 0) / merged[0]
    mask = dict(gamma=params["gamma"] if relu and spec.scale else None,
                beta=params["beta"] if relu and spec.center else None)
    sums = sum(kernel.backward_sums(dy, x, mean64, var64, **mask) for dy, x in zip(dys, xs))
    grads = [kernel.backward_apply(dy, x, params["gamma"], mean64, var64, sums=sums, count=count,
                                   beta=mask["beta"]) for dy, x in zip(dys, xs)]
    return merged, outs, moving, grads


@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_split_phases_match_the_oracle_on_the_concatenated_batch(build, spec):
    kernel = build(spec)
    u = unit_roundoff(spec)

    @settings(max_examples=60)
    @given(*shardings(5))
    def check(sizes, seed, dist, steps):
        assume(sum(sizes) >= 2)
        xs, dys, params = problem(spec, sizes, seed, dist)
        x, dy = np.concatenate(xs), np.concatenate(dys)
        assume(not near_kink(spec, x, params))
        merged, outs, moving, grads = split_step(kernel, xs, dys, params, steps)
        ref = oracle.moments(spec, x)
        assert np.array_equal(merged[0], ref[0])
        std = np.sqrt(ref[2] / ref[0])
        assert_close("merged mean", merged[1], ref[1], K * u * (std + np.abs(ref[1])) + 1e-300)
        merge = K * 2.0**-53 * ref[0] * std * (std + np.abs(ref[1]))  # see check_forward
        assert_close("merged M2", merged[2], ref[2], K * u * ref[2] + merge + 1e-300)
        for _, mean, variance in outs:  # every shard returns the same statistics
            assert np.array_equal(mean, outs[0][1]) and np.array_equal(variance, outs[0][2])
        for mm, mv in moving:  # and ends with the same moving statistics, bit for bit
            assert np.array_equal(mm, moving[0][0]) and np.array_equal(mv, moving[0][1])
        check_forward(spec, x, params, [y for y, _, _ in outs], outs[0][1], outs[0][2], moving[0], steps)
        for _, dgamma, dbeta in grads:
            assert (dgamma is None or np.array_equal(dgamma, grads[0][1])) and (
                dbeta is None or np.array_equal(dbeta, grads[0][2]))
        check_backward(spec, x, dy, params, [dx for dx, _, _ in grads], grads[0][1], grads[0][2])

    check()


@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_one_shard_is_the_fused_forward_bit_for_bit(build, spec, rng):
    """moments then normalize on the whole batch is bn_forward cut in two: the same bits."""
    kernel = build(spec)
    for sizes, dist in (([6], "normal"), ([17], "offset"), ([1], "normal")):
        if spec.unbiased and sizes == [1] and spec.values_per_feature is None and x_per_sample(spec) == 1:
            continue  # one value per feature: the unbiased variance is undefined
        xs, _, params = problem(spec, sizes, int(rng.integers(2**32)), dist)
        x = xs[0]
        mm1, mv1 = params["moving_mean"].copy(), params["moving_variance"].copy()
        mm2, mv2 = params["moving_mean"].copy(), params["moving_variance"].copy()
        moving1 = (mm1, mv1) if spec.updates_moving_stats else (None, None)
        moving2 = (mm2, mv2) if spec.updates_moving_stats else (None, None)
        for threads in (1, 2):
            y1, mean1, var1 = kernel.forward(x, params["gamma"], params["beta"], *moving1, threads=threads)
            y2, mean2, var2 = kernel.normalize(x, params["gamma"], params["beta"], *moving2,
                                               moments=kernel.moments(x, threads=threads), threads=threads)
            for a, b in ((y1, y2), (mean1, mean2), (var1, var2)):
                assert np.array_equal(a.view(np.uint8), b.view(np.uint8))
            # The moving averages are the same expression, but the compiler may contract it
            # into fused multiply-adds differently in the two entry points: a few ulps.
            np.testing.assert_allclose(mm1, mm2, rtol=8 * unit_roundoff(spec), atol=0)
            np.testing.assert_allclose(mv1, mv2, rtol=8 * unit_roundoff(spec), atol=0)


def test_empty_shard_still_updates_the_moving_statistics(build):
    kernel = build(SPECS[0])
    xs, dys, params = problem(SPECS[0], [0, 4], 7)
    assert np.array_equal(kernel.moments(xs[0]), np.zeros((3, 5)))
    merged = merge_moments([kernel.moments(x) for x in xs])
    mm, mv = params["moving_mean"].copy(), params["moving_variance"].copy()
    y, mean, _ = kernel.normalize(xs[0], params["gamma"], params["beta"], mm, mv, moments=merged)
    assert y.shape == (0, 5, 7) and not np.array_equal(mm, params["moving_mean"])
    assert np.array_equal(mean, kernel.forward(xs[1], params["gamma"], params["beta"])[1])


def test_split_phases_refuse_bad_arguments_naming_them(build):
    spec = SPECS[0]
    kernel = build(spec)
    xs, dys, params = problem(spec, [3], 1)
    x, dy, g, b = xs[0], dys[0], params["gamma"], params["beta"]
    m = kernel.moments(x)
    mm = params["moving_mean"].copy()
    with pytest.raises(TypeError, match="moments: required|moments: expected"):
        kernel.normalize(x, g, b, moments=m.tolist())
    with pytest.raises(ValueError, match=r"moments: shape is \(3, 4\)"):
        kernel.normalize(x, g, b, moments=m[:, :4])
    with pytest.raises(TypeError, match="moments: dtype is float32"):
        kernel.normalize(x, g, b, moments=m.astype(np.float32))
    with pytest.raises(ValueError, match="moments: the counts"):
        kernel.normalize(x, g, b, mm, moments=np.zeros((3, 5)))
    assert np.array_equal(mm, params["moving_mean"])  # untouched by the refused call
    with pytest.raises(ValueError, match="count:"):
        kernel.backward_apply(dy, x, g, m[1], m[2] / 3, sums=np.zeros((2, 5)), count=2)
    with pytest.raises(ValueError, match=r"sums: shape is \(5,\)"):
        kernel.backward_apply(dy, x, g, m[1], m[2] / 3, sums=np.zeros(5), count=3)
    with pytest.raises(TypeError, match="mean: dtype is float16"):
        kernel.backward_sums(dy, x, m[1].astype(np.float16), m[2])
    with pytest.raises(TypeError, match="beta: not used"):
        kernel.backward_sums(dy, x, m[1], m[2], beta=b)
    frozen = build(spec.replace(training=False))
    with pytest.raises(TypeError, match="moments: only kernels"):
        frozen.moments(x)


def test_split_phases_are_built_on_first_use(build, rng):
    # a plain build compiles no split phases (they cost a training build ~40% more); the
    # first split call builds the same spec with them, once, with the same compiler and cache
    spec = bngen.Spec((None, 6), epsilon=0.0123)
    kernel = build(spec)
    assert kernel.plan.entry("bn_moments") is None
    x = rng.standard_normal((9, 6)).astype(np.float32)
    moments = kernel.moments(x)
    companion = kernel._split_kernel
    assert companion is not None and companion.plan.entry("bn_moments") is not None
    np.testing.assert_array_equal(kernel.moments(x), moments)
    assert kernel._split_kernel is companion and build(spec, split=True) is companion
    with pytest.raises(TypeError, match="moments: .*mode-0 inference"):
        build(spec.replace(training=False)).moments(x)
