"""The code paths added for speed, each against the float64 oracle.

Covers: lane-parallel statistics (runs shorter than, equal to and longer than LANES and
STAT_BLOCK, static and runtime sizes, run tails), the channels-last register groups
(channel counts that leave a tail group, several channel tiles) and the same statistics
read in whole rows (bit for bit), the channels-first training forward's and backward's one
sweep of y and dx (bit for bit with channel by channel), per-sample rows longer than a
statistics block, streaming stores (forced on for small tensors, every alignment of the
output, an unaligned output, and one tensor above the real threshold), threads 1 to 3 and
run-to-run determinism, the large-offset and constant-feature cases on every
schedule, the fast Python call paths of forward and backward (kept parameter sets and their
pointers, sets taking turns, every in-place change of a kept array, kept moving statistics,
overlap with x and out, unchained errors, two threads, every fallback), the memory probes and
`bngen bench` itself (a smoke run, never a timed assertion).

Specs: 47 kernels (10 general, 5 x 2 with the channels-last statistics read in groups
and in rows, 5 x 2 with the channels-first forward and backward writing channel by channel
and in one sweep, 4 with streaming forced on, 2 real-size streaming and a never-streaming twin,
2 x 2 with dx streamed or not (each with its split phases), 4 backward,
2 memory probes, bench's own).  Examples: about 410 drawn calls in all (40 per
hypothesis test) plus ~800 fixed calls (600 of them from two threads).
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import K, assert_close, per_feature, random_params, unit_roundoff

import bngen
from bngen import oracle
from bngen.plan.target import DEFAULT_TUNING, Tuning
from bngen.tools import bench

S = bngen.Spec
EXAMPLES = 40


def _data(shape, dtype, kind, rng, spec=None):
    std = 10.0 ** rng.uniform(-1, 2)
    if kind == "offset":  # |mean| = 1e4 std: a one-pass sum of squares loses everything here
        x = rng.standard_normal(shape) * std + 1e4 * std
    elif kind == "constant" and spec is not None:
        x = rng.standard_normal(shape) * std
        idx = [slice(None)] * len(shape)
        idx[spec.axis[0]] = 0  # the first feature holds one value everywhere
        x[tuple(idx)] = np.float32(rng.uniform(-50, 50))
    else:
        x = rng.standard_normal(shape) * std + rng.uniform(-3, 3) * std
    return x.astype(dtype)


def check(kernel, x, params, threads, out=None):
    """Runs `kernel` on x and compares y (and statistics) with the oracle."""
    spec = kernel.spec
    gamma, beta, mm, mv = params
    u = unit_roundoff(spec)
    ref = oracle.forward(spec, x, gamma, beta, mm, mv)
    if spec.uses_batch_stats:
        mm_k = None if mm is None else mm.copy()
        mv_k = None if mv is None else mv.copy()
        y, mean, var = kernel.forward(x, gamma, beta, mm_k, mv_k, out=out, threads=threads)
        std = np.sqrt(ref.variance)
        assert_close("mean", mean, ref.mean, K * u * (std + np.abs(ref.mean)))
        assert_close("variance", var, ref.variance, K * u * ref.variance + K * 2.0**-53 * np.abs(ref.mean) * std)
        if mm is not None:
            # (the batch mean carries an error relative to std, which the update passes on)
            assert_close("moving_mean", mm_k, ref.moving_mean, K * u * (np.abs(ref.moving_mean) + np.abs(ref.mean) + std))
        # y = gamma * (x - mean) / sd + beta: its error scales with |x - mean| / sd and |beta|
        if spec.mode == 1:
            sshape = x.shape[: spec.axis[0]] + (1,) * len(spec.axis)
            m, v = ref.mean.reshape(sshape), ref.variance.reshape(sshape)
            sd = np.sqrt(v + spec.epsilon) + spec.epsilon
        else:
            m, v = per_feature(spec, ref.mean, x.ndim), per_feature(spec, ref.variance, x.ndim)
            sd = np.sqrt(v + spec.epsilon)
        g = 1.0 if gamma is None else np.abs(per_feature(spec, gamma, x.ndim))
        b = 0.0 if beta is None else np.abs(per_feature(spec, beta, x.ndim))
        # (the mean is carried in double: a float64 input far from zero also carries its rounding)
        terms = K * u * (g * (np.abs(x - m) + np.sqrt(v)) / sd + b + np.abs(ref.y)) + K * 2.0**-53 * g * np.abs(m) / sd
        assert_close("y", y, ref.y, terms)
    else:
        y = kernel(x, gamma, beta, mm, mv, out=out, threads=threads)
        a = (1.0 if gamma is None else np.abs(per_feature(spec, gamma, x.ndim))) / np.sqrt(per_feature(spec, mv, x.ndim) + spec.epsilon)
        terms = (np.abs(x.astype(np.float64)) + np.abs(per_feature(spec, mm, x.ndim))) * a
        terms = terms + (0.0 if beta is None else np.abs(per_feature(spec, beta, x.ndim)))
        assert_close("y", y, ref.y, K * u * (terms + np.abs(ref.y)))
    if out is not None:
        assert y is out
    return y


# -- channels-first: lanes, run tails, blocks of runs, runs split into blocks -------------------
CHANNELS_FIRST = [
    S((None, 5, None), axis=1, momentum=0.9),  # runtime inner: short runs, long runs, tails
    S((None, 3, 40, 41), axis=1, training=False),  # static inner 1640 = 51 lanes-groups + 8
    S((None, 7, 5), axis=1, dtype="float64"),  # static inner shorter than LANES
    S((None, 2, 4200), axis=1, activation="relu", unbiased=True),  # runs longer than a block (4096)
    S((None, 4100, None), axis=1, training=False),  # inference beyond COEF_TABLE_MAX: channel by channel
]


@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_channels_first(build, data):
    spec = data.draw(st.sampled_from(CHANNELS_FIRST), label="spec")
    kernel = build(spec)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    shape = list(spec.shape)
    budget = 80_000
    if shape[2] is None:
        shape[2] = data.draw(st.sampled_from([1, 3, 31, 32, 33, 200, 1025, 4095, 4096, 4097, 5000]), label="inner")
    rest = spec.channels * shape[2]
    shape[0] = data.draw(st.integers(1, max(1, budget // rest)), label="outer")
    if spec.unbiased and shape[0] * shape[2] == 1:
        shape[0] = 2
    kind = data.draw(st.sampled_from(["normal", "offset", "constant"]), label="data")
    x = _data(tuple(shape), spec.dtype, kind, rng, spec)
    threads = data.draw(st.integers(1, 3), label="threads")
    check(kernel, x, random_params(spec, rng), threads)


# -- channels-last: register groups of LANES channels, tail groups, several tiles ----------------
CHANNELS_LAST = [
    S((None, 37)),  # one tile, a tail group of 5
    S((None, 1100), momentum=0.5),  # two tiles (1024 + 76), a tail group in the second
    S((None, 6, 64), axis=-1, training=False),  # inference, rows of 64
    S((None, 3, 3, 16), axis=-1, mode=2, center=False),  # mode 2: batch statistics, 16 channels
]


@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_channels_last(build, data):
    spec = data.draw(st.sampled_from(CHANNELS_LAST), label="spec")
    kernel = build(spec)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    rest = int(np.prod(spec.shape[1:]))
    n = data.draw(st.sampled_from([1, 2, 63, 64, 65, 129, 2000, 5000]), label="outer")
    n = max(1, min(n, 120_000 // rest))
    kind = data.draw(st.sampled_from(["normal", "offset", "constant"]), label="data")
    x = _data((n,) + spec.shape[1:], spec.dtype, kind, rng, S((n,) + spec.shape[1:], axis=spec.axis, mode=spec.mode) if kind == "constant" else None)
    threads = data.draw(st.integers(1, 3), label="threads")
    check(kernel, x, random_params(spec, rng), threads)


# -- the schemes of targets that read sequentially (Target.sequential_reads) -----------------------
def _scheme_pair(build, session_cache, strict_compiler, spec, split=False, tuning=None):
    """`spec` built for this machine's target without and with sequential reads, both with
    `split`, the second with `tuning`.  (The same build options on both sides: GCC may
    contract a statistics merge differently in a build with the split phases, one ulp of a
    variance apart.)"""
    host = strict_compiler.features(session_cache).target(strict_compiler.flags)
    return (build(spec, split=split, target=dataclasses.replace(host, sequential_reads=False)),
            build(spec, split=split, target=dataclasses.replace(host, sequential_reads=True), tuning=tuning))


def _draw_input(data, rng, spec, shape):
    """x of `shape` for `spec`: normal, far off zero, or with a constant channel (half
    precision: no offset of 1e4 std, which overflows float16)."""
    half = spec.dtype in ("float16", "bfloat16")
    kind = data.draw(st.sampled_from(["normal", "constant"] if half else ["normal", "offset", "constant"]), label="data")
    return _data(tuple(shape), spec.dtype, kind, rng, S(tuple(shape), axis=spec.axis) if kind == "constant" else None)


def _draw_pair(data, schemes):
    """A spec of `schemes` (spec -> kernel pair, from `_scheme_pair`), its two kernels and a seeded rng."""
    spec = data.draw(st.sampled_from(list(schemes)), label="spec")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    return (spec, *schemes[spec], rng)


def _assert_same_bits(names, got, want):
    for name, a, b in zip(names, got, want):
        assert (a is None and b is None) or np.array_equal(a.view(np.uint8), b.view(np.uint8)), name


# Channels-last statistics: a block read a group of LANES channels at a time in registers,
# or in whole rows with stack sums and a prefetch (Plan.row_moments, tiles wider than a
# group).  Each channel adds its rows in the same order either way, so every output is the
# same bits, and both match the oracle.
ROW_STATISTICS = [
    S((None, 37)),  # one tile wider than a group of 32 floats
    S((None, 1100), momentum=0.5),  # two tiles (1024 + 76)
    S((None, 5, 70), axis=-1, dtype="float16", activation="relu"),  # staged spans
    S((None, 200), dtype="bfloat16", center=False),
    S((None, 48), virtual_batch_size=8),  # ghost batch norm's tiles
]


@pytest.fixture(scope="module")
def statistics_schemes(build, session_cache, strict_compiler):
    """spec -> (grouped kernel, row-wise kernel), each with its split phases."""
    pairs = {spec: _scheme_pair(build, session_cache, strict_compiler, spec, split=True) for spec in ROW_STATISTICS}
    assert all(not grouped.plan.row_moments and rows.plan.row_moments for grouped, rows in pairs.values())
    return pairs


@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_row_statistics_equal_grouped_ones(statistics_schemes, data):
    spec, grouped, rows, rng = _draw_pair(data, statistics_schemes)
    rest = int(np.prod(spec.shape[1:]))
    n = data.draw(st.sampled_from([1, 2, 63, 64, 65, 129, 2000]), label="outer")
    n = max(1, min(n, 60_000 // rest))
    if spec.virtual_batch_size:
        n = max(8, n // 8 * 8)
    x = _draw_input(data, rng, spec, (n,) + spec.shape[1:])
    threads = data.draw(st.integers(1, 3), label="threads")
    params = random_params(spec, rng)
    # (test_half.py and test_variants.py hold half-precision and ghost kernels to the oracle,
    # with the scheme of the machine they run on)
    if spec.dtype in ("float32", "float64") and not spec.virtual_batch_size:
        check(rows, x, params, threads)
    _assert_same_bits(("y", "mean", "variance"), rows.forward(x, *params, threads=threads),
                      grouped.forward(x, *params, threads=threads))
    if not spec.virtual_batch_size:
        assert np.array_equal(rows.moments(x, threads=threads), grouped.moments(x, threads=threads))


# Channels-first training forward and backward writing in one sweep (Plan.sweeps), the
# sweeping kernel with a threshold of 4 KiB, so that the drawn sizes take both of its
# branches (the sweep below it, channel by channel above).  Same coefficients, same
# formula: the same bits, for y, the statistics, the moving statistics, dx, dgamma and dbeta.
SWEEPS = [
    S((None, 5, None), axis=1, momentum=0.9),
    S((None, 7, 9), axis=1, dtype="float16", activation="relu"),
    S((None, 3, None), axis=1, residual=True),
    S((None, 4, 33), axis=1, dtype="bfloat16", center=False),
    S((None, 6, 10), axis=1, dtype="float64", unbiased=True),
]


@pytest.fixture(scope="module")
def sweep_schemes(build, session_cache, strict_compiler):
    """spec -> (channel-by-channel kernel, sweeping kernel)."""
    small = dataclasses.replace(DEFAULT_TUNING, sweep_max_bytes=1 << 12)
    pairs = {spec: _scheme_pair(build, session_cache, strict_compiler, spec, tuning=small) for spec in SWEEPS}
    assert all(not plain.plan.sweeps and sweeping.plan.sweeps for plain, sweeping in pairs.values())
    return pairs


@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_sweeping_kernels_equal_channel_by_channel(sweep_schemes, data):
    spec, plain, sweeping, rng = _draw_pair(data, sweep_schemes)
    shape = list(spec.shape)
    if shape[2] is None:
        shape[2] = data.draw(st.sampled_from([1, 7, 64, 300]), label="inner")
    shape[0] = data.draw(st.sampled_from([1, 2, 5, 40, 300]), label="outer")
    x = _draw_input(data, rng, spec, shape)
    extra = {"residual": rng.standard_normal(shape).astype(spec.dtype)} if spec.residual else {}
    threads = data.draw(st.integers(1, 3), label="threads")
    gamma, beta, mm, mv = random_params(spec, rng)
    moving = [(None if a is None else a.copy(), None if b is None else b.copy()) for a, b in ((mm, mv), (mm, mv))]
    want = plain.forward(x, gamma, beta, *moving[1], threads=threads, **extra)
    _assert_same_bits(("y", "mean", "variance"), sweeping.forward(x, gamma, beta, *moving[0], threads=threads, **extra), want)
    _assert_same_bits(("moving_mean", "moving_variance"), *moving)
    if spec.residual:  # (forward only)
        return
    dy = rng.standard_normal(shape).astype(spec.dtype)
    mean, var = want[1], want[2]
    beta_arg = {"beta": beta} if spec.activation == "relu" and beta is not None else {}
    _assert_same_bits(("dx", "dgamma", "dbeta"), sweeping.backward(dy, x, gamma, mean, var, threads=threads, **beta_arg),
                      plain.backward(dy, x, gamma, mean, var, threads=threads, **beta_arg))


def test_per_sample_rows_longer_than_a_block(build, rng):
    spec = S((None, 4100), mode=1)
    kernel = build(spec)
    for n, kind in [(1, "normal"), (3, "offset"), (9, "normal")]:
        for threads in (1, 2, 3):
            check(kernel, _data((n, 4100), np.float32, kind, rng), random_params(spec, rng), threads)


# -- streaming stores, forced on for small tensors -----------------------------------------------
STREAMED = [
    S((None, 6, None), axis=1, epsilon=0.00123),
    S((None, 3, None), axis=1, epsilon=0.00123, training=False),
    S((None, None, 19), epsilon=0.00123),
    S((None, 48), epsilon=0.00123, training=False),
]


@pytest.fixture(scope="module")
def streamed_kernels(build):
    """The STREAMED specs built with every output streamed: a tuning with a threshold of
    0 bytes and every schedule and kind streaming (the tuning is part of the memo and
    cache keys, so no kernel built elsewhere is reused)."""
    everything = frozenset(f"{s} {k}" for s in ("channels_first", "channels_last") for k in ("training", "inference"))
    tuning = Tuning(stream_min_bytes=0, streaming_kinds=everything)
    kernels = [build(spec, tuning=tuning) for spec in STREAMED]
    for k in kernels:
        assert "#define STREAM_MIN_BYTES 0" in k.source
        assert k.plan.entries[0].args[-1].name == "may_stream"  # streams only into out=
    return kernels


def _out_at(shape, dtype, offset):
    """An output array starting `offset` elements into a 64-byte aligned buffer."""
    n = int(np.prod(shape))
    raw = np.empty(n + offset + 64, dtype)
    start = (-raw.ctypes.data % 64) // raw.itemsize
    return raw[start + offset: start + offset + n].reshape(shape)


@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_streaming_stores(streamed_kernels, data):
    kernel = data.draw(st.sampled_from(streamed_kernels), label="kernel")
    spec = kernel.spec
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    shape = list(spec.shape)
    for i, d in enumerate(shape):
        if d is None:
            shape[i] = data.draw(st.sampled_from([1, 2, 5, 15, 16, 17, 47, 100, 333]), label=f"dim{i}")
    shape = tuple(shape)
    offset = data.draw(st.sampled_from([None, 0, 1, 3, 7, 8, 15]), label="out offset")
    out = None if offset is None else _out_at(shape, np.float32, offset)
    kind = data.draw(st.sampled_from(["normal", "offset", "constant"]), label="data")
    x = _data(shape, spec.dtype, kind, rng, S(shape, axis=spec.axis))
    check(kernel, x, random_params(spec, rng), data.draw(st.integers(1, 3), label="threads"), out=out)


def test_streaming_into_an_unaligned_output(streamed_kernels, rng):
    """An output that is not even element-aligned is stored plainly, and correctly."""
    for kernel in streamed_kernels:
        spec = kernel.spec
        shape = tuple(7 if d is None else d for d in spec.shape)
        raw = bytearray(4 * int(np.prod(shape)) + 1)
        out = np.frombuffer(raw, np.float32, offset=1).reshape(shape)
        assert not out.flags.aligned
        check(kernel, _data(shape, np.float32, "normal", rng), random_params(spec, rng), 2, out=out)


STREAMED_GRADIENTS = [  # channels-first training backward: dx streamed (Plan.streams_gradient)
    S((None, 6, None), axis=1, epsilon=0.00123),
    S((None, 5, None), axis=1, epsilon=0.00123, activation="relu", center=False),
]


@pytest.fixture(scope="module")
def gradient_pairs(build):
    """Each STREAMED_GRADIENTS spec built twice, with its split phases: with dx streamed for
    every size (a threshold of 0 bytes) and with the default tuning (these small tensors
    never stream)."""
    tuning = Tuning(stream_min_bytes=0)
    pairs = [(build(spec, tuning=tuning, split=True), build(spec, split=True)) for spec in STREAMED_GRADIENTS]
    for streamed, plain in pairs:
        assert streamed.plan.streams_gradient and "stream_lines(dxr + i0, buf, chunk)" in streamed.source
        assert "#define STREAM_MIN_BYTES 0" in streamed.source and plain.plan.stream_min == DEFAULT_TUNING.stream_min_bytes
    return pairs


@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_streamed_gradients_equal_plain_ones(gradient_pairs, data):
    """Streaming moves where dx is written, not what: the backward and the split phases'
    backward_apply of a streamed kernel equal the plain kernel's bit for bit, into new
    arrays and into outputs at every alignment.  2 specs, EXAMPLES examples."""
    streamed, plain = data.draw(st.sampled_from(gradient_pairs), label="pair")
    spec = streamed.spec
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    shape = tuple(data.draw(st.sampled_from([1, 2, 5, 15, 16, 17, 47, 100, 333]), label=f"dim{i}") if d is None else d
                  for i, d in enumerate(spec.shape))
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    gamma, beta, mm, mv = random_params(spec, rng)
    _, mean, var = plain.forward(x, gamma, beta, mm.copy(), mv.copy())
    threads = data.draw(st.integers(1, 3), label="threads")
    offset = data.draw(st.sampled_from([None, 0, 1, 3, 7, 8, 15]), label="out offset")
    beta_mask = beta if spec.activation == "relu" else None
    want = plain.backward(dy, x, gamma, mean, var, beta=beta_mask, threads=threads)
    out = None if offset is None else _out_at(shape, np.float32, offset)
    got = streamed.backward(dy, x, gamma, mean, var, beta=beta_mask, out=out, threads=threads)
    for name, w, g in zip(("dx", "dgamma", "dbeta"), want, got):
        np.testing.assert_array_equal(g, w, err_msg=name)
    mean64, var64 = mean.astype(np.float64), var.astype(np.float64)
    relu = spec.activation == "relu"  # (the sums read gamma only for the ReLU's mask)
    sums = plain.backward_sums(dy, x, mean64, var64, gamma=gamma if relu else None, beta=beta_mask)
    count = float(np.prod(shape) // spec.channels)
    want = plain.backward_apply(dy, x, gamma, mean64, var64, sums=sums, count=count, beta=beta_mask, threads=threads)
    out = None if offset is None else _out_at(shape, np.float32, offset)
    got = streamed.backward_apply(dy, x, gamma, mean64, var64, sums=sums, count=count, out=out, beta=beta_mask,
                                  threads=threads)
    np.testing.assert_array_equal(got[0], want[0], err_msg="backward_apply dx")


def test_streaming_above_the_real_threshold(build, rng):
    """One tensor above STREAM_MIN_BYTES (16 MiB) through both kinds of channels-first
    kernel, and the training one's backward (whose dx streams at this size)."""
    shape = (2, 16, 368, 368)  # 17.3 MB of float32
    assert 4 * np.prod(shape) >= DEFAULT_TUNING.stream_min_bytes
    for training in (True, False):
        spec = S((None, 16, 368, 368), axis=1, training=training)
        x = _data(shape, np.float32, "normal", rng)
        check(build(spec), x, random_params(spec, rng), 2)
        check(build(spec), x, random_params(spec, rng), 2, out=np.empty_like(x))  # streams into out= only
    # the backward streams dx from this size on, into new arrays too: equal to a kernel that never streams
    spec = S((None, 16, 368, 368), axis=1)
    streamed, plain = build(spec), build(spec, tuning=Tuning(stream_min_bytes=1 << 62))
    x, dy = _data(shape, np.float32, "normal", rng), _data(shape, np.float32, "normal", rng)
    gamma, beta, mm, mv = random_params(spec, rng)
    _, mean, var = plain.forward(x, gamma, beta, mm, mv)
    for want, got in zip(plain.backward(dy, x, gamma, mean, var, threads=2), streamed.backward(dy, x, gamma, mean, var, threads=2)):
        np.testing.assert_array_equal(got, want)


# -- threads: determinism, and the accuracy cases on every schedule -------------------------------
@pytest.mark.parametrize("spec", [S((None, 5, 64), axis=1), S((None, 37)), S((None, 300), mode=1)],
                         ids=["channels_first", "channels_last", "per_sample"])
def test_identical_run_to_run_for_a_thread_count(build, rng, spec):
    kernel = build(spec)
    x = _data((2000,) + spec.shape[1:], np.float32, "normal", rng)  # large enough to use threads
    params = random_params(spec, rng)
    for threads in (1, 2, 3):
        runs = [kernel.forward(x, *params[:2], threads=threads) for _ in range(4)]
        for y, mean, var in runs[1:]:
            np.testing.assert_array_equal(y, runs[0][0])
            np.testing.assert_array_equal(mean, runs[0][1])
            np.testing.assert_array_equal(var, runs[0][2])
    if kernel.plan.schedule == "channels_first":  # channels-first: threads take whole channels, so the count does not matter
        one = kernel.forward(x, *params[:2], threads=1)
        three = kernel.forward(x, *params[:2], threads=3)
        np.testing.assert_array_equal(one[0], three[0])


@pytest.mark.parametrize("spec", [S((None, 4, 70), axis=1), S((None, 37)), S((None, 3, None), axis=1, epsilon=0.00123)],
                         ids=["channels_first", "channels_last", "streamed"])
def test_constant_feature_gives_exactly_beta(build, streamed_kernels, rng, spec):
    kernel = streamed_kernels[0] if spec.epsilon == 0.00123 else build(spec)
    spec = kernel.spec
    shape = tuple(1000 if i == 0 else (50 if d is None else d) for i, d in enumerate(spec.shape))
    x = _data(shape, np.float32, "normal", rng)
    idx = [slice(None)] * len(shape)
    idx[spec.axis[0]] = 1
    x[tuple(idx)] = np.float32(12345.678)
    gamma, beta, mm, mv = random_params(spec, rng)
    for threads in (1, 2, 3):
        y, mean, var = kernel.forward(x, gamma, beta, threads=threads)
        assert var[1] == 0
        np.testing.assert_array_equal(y[tuple(idx)], np.float32(beta[1]))


# -- the fast call path ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def infer(build):
    return build(S((None, 8, 5), axis=1, training=False))


def test_cached_parameters_follow_their_contents(infer, rng):
    spec = infer.spec
    x = _data((3, 8, 5), np.float32, "normal", rng)
    params = random_params(spec, rng)
    check(infer, x, params, 1)
    params[0][:] *= 2  # same objects, new values
    params[3][:] += 1
    check(infer, x, params, 1)


def test_cached_parameter_changed_in_place_is_checked_again(infer, rng):
    # A kept parameter is checked again by dtype and strides only (kernel.py explains why that
    # is complete): every in-place change NumPy allows must still give the checked error.
    x = _data((3, 8, 5), np.float32, "normal", rng)
    gamma, beta, mm, mv = random_params(infer.spec, rng)
    before = [a.copy() for a in (x, gamma, beta, mm, mv)]
    infer(x, gamma, beta, mm, mv)
    for shape in ((2, 4), (8, 1), (1, 8)):  # shape setter: other strides
        gamma.shape = shape
        with pytest.raises(ValueError, match="gamma"):
            infer(x, gamma, beta, mm, mv)
    gamma.shape = (8,)
    gamma.dtype = np.int32  # same bytes, another dtype of the same size: same strides
    with pytest.raises(TypeError, match="gamma"):
        infer(x, gamma, beta, mm, mv)
    mv.dtype = np.float16  # another size: 16 values
    with pytest.raises(TypeError, match="moving_variance"):
        infer(x, gamma.view(np.float32), beta, mm, mv)
    mv.dtype = np.float32
    gamma.dtype = np.float32
    for a, b in zip((x, gamma, beta, mm, mv), before):
        np.testing.assert_array_equal(a, b)
    check(infer, x, (gamma, beta, mm, mv), 1)  # back as they were: the fast path again
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            gamma.strides = (0,)  # deprecated, but possible: no longer contiguous
        except (AttributeError, ValueError):  # pragma: no cover - a NumPy without the setter
            pytest.skip("this NumPy cannot set strides")
    check(infer, x, (gamma, beta, mm, mv), 1)


def test_calls_off_the_fast_path_are_still_right(build, infer, rng):
    spec = infer.spec
    params = random_params(spec, rng)
    x = _data((4, 8, 10), np.float32, "normal", rng)[:, :, ::2]  # not contiguous
    check(infer, x, params, 1)
    check(infer, np.asfortranarray(_data((3, 8, 5), np.float32, "normal", rng)), params, 2)

    class Sub(np.ndarray):
        pass

    check(infer, _data((3, 8, 5), np.float32, "normal", rng).view(Sub), params, 1)
    strided = [p.copy() for p in params]
    strided[1] = np.repeat(params[1], 2)[::2]
    check(infer, _data((3, 8, 5), np.float32, "normal", rng), strided, 1)


def test_fast_path_refusals_raise_the_checked_errors(build, rng):
    spec = S((None, 8), momentum=0.9)
    kernel = build(spec)
    x = _data((5, 8), np.float32, "normal", rng)
    gamma, beta, mm, mv = random_params(spec, rng)
    frozen = mm.copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="moving_mean"):
        kernel(x, gamma, beta, frozen, mv)
    both = np.ones(16, np.float32)
    mv_before = mv.copy()
    with pytest.raises(ValueError, match="moving_variance"):
        kernel(x, gamma, beta, both[:8], both[4:12])
    np.testing.assert_array_equal(both, 1)
    np.testing.assert_array_equal(mv, mv_before)
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="threads"):
            kernel(x, gamma, beta, threads=bad)
    with pytest.raises(TypeError, match="gamma"):
        kernel(x, gamma.astype(np.float64), beta)
    with pytest.raises(TypeError, match="x"):
        kernel(x.astype(np.float64), gamma, beta)
    with pytest.raises(ValueError, match="x"):
        kernel(np.ones((0, 8), np.float32), gamma, beta)


def test_kept_moving_statistics_are_checked_again(build, rng):
    # Training keeps the moving statistics it updates like the other parameters: their
    # writability and their overlap with each new x are checked on every call.
    spec = S((None, 8), momentum=0.9)
    kernel = build(spec)
    x = _data((5, 8), np.float32, "normal", rng)
    gamma, beta, mm, mv = random_params(spec, rng)
    kernel(x, gamma, beta, mm, mv)
    mm.flags.writeable = False
    before = mm.copy(), mv.copy()
    with pytest.raises(ValueError, match="moving_mean"):
        kernel(x, gamma, beta, mm, mv)
    mm.flags.writeable = True
    mv.dtype = np.int32
    with pytest.raises(TypeError, match="moving_variance"):
        kernel(x, gamma, beta, mm, mv)
    mv.dtype = np.float32
    np.testing.assert_array_equal(mm, before[0])
    np.testing.assert_array_equal(mv, before[1])
    # x over the memory of a kept moving mean
    buf = _data((48,), np.float32, "normal", rng)
    shared = buf[32:40]
    kernel(x, gamma, beta, shared, mv)
    buf_before, mv_before = buf.copy(), mv.copy()
    with pytest.raises(ValueError, match="moving_mean"):
        kernel(buf[:40].reshape(5, 8), gamma, beta, shared, mv)
    np.testing.assert_array_equal(buf, buf_before)
    np.testing.assert_array_equal(mv, mv_before)
    # and the kept arrays are still updated right
    ref = oracle.forward(spec, x, gamma, beta, mm, mv)
    kernel(x, gamma, beta, mm, mv)
    u = unit_roundoff(spec)
    assert_close("moving_mean", mm, ref.moving_mean, K * u * (np.abs(ref.moving_mean) + np.abs(ref.mean)))


def test_parameter_sets_taking_turns(build, infer, rng):
    # Layers of one spec share a kernel, so a few parameter sets take turns: older kept sets
    # are found again, and what can change in place is checked on them too.
    from bngen.jit.binder import KEPT_SETS

    x = _data((3, 8, 5), np.float32, "normal", rng)
    sets = [random_params(infer.spec, rng) for _ in range(KEPT_SETS + 1)]
    expected = [check(infer, x, p, 1) for p in sets]
    for turn in range(3):  # more sets than are kept, then as many as are kept
        for k, p in enumerate(sets[: KEPT_SETS + (turn == 0)]):
            np.testing.assert_array_equal(infer(x, *p), expected[k])
    older = sets[0]  # kept, but not the newest
    older[3].dtype = np.int32
    with pytest.raises(TypeError, match="moving_variance"):
        infer(x, *older)
    older[3].dtype = np.float32
    older[1].shape = (2, 4)
    with pytest.raises(ValueError, match="beta"):
        infer(x, *older)
    older[1].shape = (8,)
    np.testing.assert_array_equal(infer(x, *older), expected[0])
    # training: an older kept set's moving statistics are checked for writability again
    spec = S((None, 8), momentum=0.9)
    kernel = build(spec)
    xt = _data((5, 8), np.float32, "normal", rng)
    train_sets = [random_params(spec, rng) for _ in range(2)]
    for p in train_sets:
        kernel(xt, *p)
    train_sets[0][2].flags.writeable = False
    before = train_sets[0][2].copy(), train_sets[0][3].copy()
    with pytest.raises(ValueError, match="moving_mean"):
        kernel(xt, *train_sets[0])
    np.testing.assert_array_equal(train_sets[0][2], before[0])
    np.testing.assert_array_equal(train_sets[0][3], before[1])


def test_out_over_a_kept_parameter_is_refused(infer, rng):
    x = _data((5, 8, 5), np.float32, "normal", rng)
    buf = _data((240,), np.float32, "normal", rng)
    gamma = buf[200:208]
    _, beta, mm, mv = random_params(infer.spec, rng)
    infer(x, gamma, beta, mm, mv)  # kept
    buf_before = buf.copy()
    with pytest.raises(ValueError, match="out"):
        infer(x, gamma, beta, mm, mv, out=buf[5:205].reshape(5, 8, 5))  # its end is gamma's start
    with pytest.raises(ValueError, match="out"):
        infer(x, gamma, beta, mm, mv, out=x)
    np.testing.assert_array_equal(buf, buf_before)
    out = buf[:200].reshape(5, 8, 5)  # beside gamma, not over it
    check(infer, x, (gamma, beta, mm, mv), 1, out=out)
    np.testing.assert_array_equal(buf[200:], buf_before[200:])


def test_refused_calls_raise_unchained_errors(build, infer, rng):
    # the checked path runs outside the fast path's exception handler: no internal context
    x = _data((3, 8, 5), np.float32, "normal", rng)
    params = random_params(infer.spec, rng)
    with pytest.raises(TypeError, match="x") as info:
        infer(x.astype(np.float64), *params)
    assert info.value.__context__ is None
    train = build(S((None, 8), momentum=0.9))
    gamma, beta, _, _ = random_params(train.spec, rng)
    xt = _data((4, 8), np.float32, "normal", rng)
    with pytest.raises(ValueError, match="threads") as info:
        train.forward(xt, gamma, beta, threads=0)
    assert info.value.__context__ is None
    _, mean, var = train.forward(xt, gamma, beta)
    with pytest.raises(ValueError, match="dy") as info:
        train.backward(xt[:3], xt, gamma, mean, var)
    assert info.value.__context__ is None


def test_kernel_keeps_its_public_face(build, infer):
    import inspect

    # the fast paths are methods of a class of the kernel's own (see Kernel.__init__)
    train = build(S((None, 8), momentum=0.9))
    for kernel, names in ((infer, ("__call__", "forward")), (train, ("__call__", "forward", "backward"))):
        assert isinstance(kernel, bngen.Kernel) and type(kernel).__name__ == "Kernel"
        for name in names:
            fast, public = getattr(type(kernel), name), getattr(bngen.Kernel, name)
            assert inspect.signature(fast) == inspect.signature(public)
            assert fast.__doc__ == public.__doc__


def test_single_feature_with_odd_strides(build, rng):
    # a (1,) array is C-contiguous whatever its stride; the fast path keeps only stride ==
    # itemsize, so this one takes the checked path, with the same result
    spec = S((None, 1), training=False)
    kernel = build(spec)
    x = _data((4, 1), np.float32, "normal", rng)
    gamma, beta, mm, mv = random_params(spec, rng)
    odd = np.repeat(gamma, 3)[::3]
    assert odd.flags.c_contiguous and odd.strides != (4,)
    np.testing.assert_array_equal(kernel(x, odd, beta, mm, mv), kernel(x, gamma, beta, mm, mv))


def test_fast_path_from_two_threads(infer, rng):
    # Each thread alternates between its own parameter sets, so the kept set changes under
    # the other thread all the time; every result must be the one of its own arguments.
    import threading

    x = _data((3, 8, 5), np.float32, "normal", rng)
    sets = [random_params(infer.spec, rng) for _ in range(4)]
    expected = [infer(x, *p) for p in sets]
    failures = []

    def work(mine):
        for i in range(300):
            k = mine[i % 2]
            if not np.array_equal(infer(x, *sets[k]), expected[k]):
                failures.append(k)

    threads = [threading.Thread(target=work, args=(pair,)) for pair in ((0, 1), (2, 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


# -- memory probes and bench ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,streaming", [("float32", True), ("float64", False), ("float16", True), ("bfloat16", False)])
def test_memory_probes(session_cache, strict_compiler, rng, dtype, streaming):
    plan, module = bench.build_memory_probe(dtype, session_cache, compiler=strict_compiler, streaming=streaming)
    assert plan.streaming == streaming
    data = bench._Inputs(bench.Case("t", (3, 1000, 7), 1, dtype))
    for threads in (1, 2):
        fns = bench._memory_fns(((plan, module), (plan, module)), data, threads)
        assert set(fns) == {"copy", "read", "copy streamed"}
        for fn in fns.values():
            fn()
    # the copy wrote a fresh buffer that matches x exactly; the read summed x
    ffi, lib = module.ffi, module.lib
    y = np.zeros_like(data.x)
    sink = np.zeros(1, plan.precision.param == "double" and np.float64 or np.float32)
    args = (2,) if plan.threaded else ()
    data_ct, param_ct = plan.precision.data + "[]", plan.precision.param + "[]"
    lib.bn_copy(ffi.from_buffer(data_ct, data.x), ffi.from_buffer(data_ct, y, True), data.x.size, *args)
    np.testing.assert_array_equal(y.view(np.uint8), data.x.view(np.uint8))  # (half probes move the bits)
    lib.bn_read(ffi.from_buffer(data_ct, data.x), ffi.from_buffer(param_ct, sink, True), data.x.size, *args)
    if data.x.itemsize == 2:  # half probes sum the bits: memory's traffic, not the conversions'
        want = float(data.x.view(np.uint16).astype(np.float64).sum())
    else:
        want = float(data.x.astype(np.float64).sum())
    assert sink[0] == pytest.approx(want, rel=1e-3, abs=1e-2)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_bench_smoke(session_cache, strict_compiler, dtype):
    case = bench.Case("tiny", (2, 3, 4, 4), 1, dtype)
    report = bench.run([case], [1, 2], repeat=3, cache_dir=session_cache, compiler=strict_compiler)
    kinds = {(r["kind"], r["threads"]) for r in report["rows"]}
    assert {("inference", 1), ("training forward", 2)} <= kinds
    for row in report["rows"]:
        assert row["timings"]["bngen"]["samples"] == 3 and row["floor_ms"] > 0
    table = bench.markdown(report)
    assert table.startswith("| case | kind | threads | bngen ms")
    assert table.count("| tiny |") == len(report["rows"])


def test_bench_other_isa_and_inductor(session_cache, strict_compiler):
    """--march builds a second bngen (here the AVX2 baseline, x86 only) timed in the same
    rounds, one row each; --inductor adds torch.compile's column when torch is there."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64-v3 is an x86 -march value")
    case = bench.Case("tiny", (2, 3, 4, 4), 1)
    report = bench.run([case], [1], repeat=2, kinds=["inference"], cache_dir=session_cache, compiler=strict_compiler,
                       isas=["x86-64-v3"], inductor=False)
    assert [r["isa"] for r in report["rows"]] == ["native", "x86-64-v3"]
    native, avx2 = report["rows"]
    assert native["timings"]["numpy"] is avx2["timings"]["numpy"]  # one set of rounds: peers timed once
    assert native["timings"]["bngen"] is not avx2["timings"]["bngen"]
    assert "| isa |" in bench.markdown(report) and "| x86-64-v3 |" in bench.markdown(report)
    assert "AVX" in report["cpu"] or "scalar" in report["cpu"]


def test_measure_takes_one_sample_each_per_round_in_changing_orders():
    """No implementation always runs right after the same other one (a fixed cycle let
    the second ISA build of a kernel find x in the caches the first had just filled)."""
    import time

    calls = []

    def sample(name):  # slower than a sample's time, so one call per sample
        calls.append(name)
        time.sleep(bench.SAMPLE_SECONDS)

    times = bench.measure({name: (lambda name=name: sample(name)) for name in "abcd"}, 40)
    assert {name: len(samples) for name, samples in times.items()} == dict.fromkeys("abcd", 40)
    samples = calls[8:]  # after two calibration calls each
    assert len(samples) == 4 * 40 and all(sorted(samples[i:i + 4]) == list("abcd") for i in range(0, 160, 4))
    before_b = {prev for prev, name in zip(samples, samples[1:]) if name == "b"}
    assert before_b >= {"a", "c", "d"}


def test_floors_follow_the_least_traffic():
    copy, read = 3.0, 1.0
    assert bench.floor_ms("inference", copy, read, False) == bench.floor_ms("inference", copy, read, True) == 3.0
    assert bench.floor_ms("training forward", copy, read, False) == 3.0  # x read once, re-read from L2
    assert bench.floor_ms("training forward", copy, read, True) == 4.0  # x read twice
    assert bench.floor_ms("backward", copy, read, False) == 4.0  # x and dy once each, dx written
    assert bench.floor_ms("backward", copy, read, True) == 6.0


# -- the fast path of backward ----------------------------------------------------------------------
BACKWARD = [
    S((None, 5, 7), axis=1),
    S((None, 12), activation="relu"),  # the ReLU mask needs beta
    S((None, 3, None), axis=1, scale=False, mode=2),
    S((4, 6, 5), axis=-1, center=False, dtype="float64"),
]


@pytest.mark.parametrize("spec", BACKWARD, ids=lambda s: f"{s.shape}-{s.activation}-{s.mode}")
def test_backward_fast_path_matches_the_checked_path(build, rng, spec):
    kernel = build(spec)
    shape = tuple(6 if d is None else d for d in spec.shape)
    x = _data(shape, spec.dtype, "normal", rng)
    dy = _data(shape, spec.dtype, "normal", rng)
    gamma, beta, _, _ = random_params(spec, rng)
    _, mean, var = kernel.forward(x, gamma, beta)
    relu_beta = beta if spec.activation == "relu" and spec.center else None
    for threads in (None, 1, 3):
        fast = kernel.backward(dy, x, gamma, mean, var, beta=relu_beta, threads=threads)
        checked = kernel.backward(dy, x, gamma, mean, var, beta=relu_beta, threads=threads, out=np.empty_like(x))
        for a, b in zip(fast, checked):
            if a is None:
                assert b is None
            else:
                np.testing.assert_array_equal(a, b)
    # arrays the fast path refuses still give the same answer through the checked path
    strided = np.repeat(dy, 2, axis=-1)[..., ::2]
    np.testing.assert_array_equal(kernel.backward(strided, x, gamma, mean, var, beta=relu_beta)[0], fast[0])


def test_backward_fast_path_refusals_raise_the_checked_errors(build, rng):
    spec = S((None, 12), activation="relu")
    kernel = build(spec)
    x = _data((5, 12), np.float32, "normal", rng)
    gamma, beta, mm, mv = random_params(spec, rng)
    _, mean, var = kernel.forward(x, gamma, beta)
    with pytest.raises(TypeError, match="beta"):
        kernel.backward(x, x, gamma, mean, var)
    with pytest.raises(TypeError, match="moving_mean"):
        kernel.backward(x, x, gamma, mean, var, beta=beta, moving_mean=mm)
    with pytest.raises(TypeError, match="mean"):
        kernel.backward(x, x, gamma, mean.astype(np.float64), var, beta=beta)
    with pytest.raises(ValueError, match="dy"):
        kernel.backward(x[:4], x, gamma, mean, var, beta=beta)
    with pytest.raises(ValueError, match="threads"):
        kernel.backward(x, x, gamma, mean, var, beta=beta, threads=0)


def test_backward_kept_statistics_changed_in_place(build, rng):
    spec = S((None, 12), activation="relu")
    kernel = build(spec)
    x = _data((5, 12), np.float32, "normal", rng)
    dy = _data((5, 12), np.float32, "normal", rng)
    gamma, beta, _, _ = random_params(spec, rng)
    _, mean, var = kernel.forward(x, gamma, beta)
    first = kernel.backward(dy, x, gamma, mean, var, beta=beta)  # kept
    mean.dtype = np.int32
    with pytest.raises(TypeError, match="mean"):
        kernel.backward(dy, x, gamma, mean, var, beta=beta)
    mean.dtype = np.float32
    var.shape = (3, 4)
    with pytest.raises(ValueError, match="variance"):
        kernel.backward(dy, x, gamma, mean, var, beta=beta)
    var.shape = (12,)
    for a, b in zip(kernel.backward(dy, x, gamma, mean, var, beta=beta), first):
        np.testing.assert_array_equal(a, b)


def test_bench_command_line(tmp_path, capsys):
    from bngen.tools import cli

    spec = tmp_path / "spec.json"
    spec.write_text(S((None, 4, 3, 3), axis=1).to_json())
    assert cli.main(["bench", "--spec", str(spec), "--batch", "2", "--repeat", "2", "--threads", "1",
                     "--kinds", "inference,backward", "--quiet", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "| (2, 4, 3, 3) axis=1 (spec file) | inference | 1 |" in out
    assert (tmp_path / "r.json").read_text().startswith("{")
    spec.write_text(S((None, 4, 3, 3), axis=(1, 2)).to_json())
    assert cli.main(["bench", "--spec", str(spec)]) == 2
    assert "one feature axis" in capsys.readouterr().err
    assert cli.main(["bench", "--threads", "0,x"]) == 2


def test_training_call_checks_cached_gamma_again(build, rng):
    spec = S((None, 8), momentum=0.9)
    kernel = build(spec)
    x = _data((5, 8), np.float32, "normal", rng)
    gamma, beta, mm, mv = random_params(spec, rng)
    check(kernel, x, (gamma, beta, mm, mv), 1)
    gamma.dtype = np.int32
    with pytest.raises(TypeError, match="gamma"):
        kernel(x, gamma, beta, mm, mv)
    gamma.dtype = np.float32
    gamma[:] = 3
    check(kernel, x, (gamma, beta, mm, mv), 2)
