"""Statistics variants in the compiled kernels and the layer: batch renormalization, the
adjustment and ghost batch norm against the float64 oracle, forward and backward, their
bad inputs, the layer's arguments, and export.

Specs compiled: 8 renorm/adjustment training kernels and 6 ghost-batch-norm ones over the
channels-first and channels-last schedules, float32, float64, float16 and bfloat16, with
and without gamma/beta and the fused ReLU, plus a few for the layer and bad-input tests.
Examples: 60 per renorm/adjustment spec forward and 30 backward, 60 per ghost spec
(forward and backward): about 1500 kernel calls in all.  Tolerances are K*u scaled by the
size of the terms, as in test_forward; half-precision outputs add a unit of their storage
type.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from strategies import K, assert_close, feature_shape

import bngen
from bngen import oracle
from bngen.core.spec import SpecError
from bngen.jit.kernel import numpy_dtype

S = bngen.Spec
SPECS = [
    S((None, 6, None), axis=1, renorm=True, momentum=0.9, renorm_momentum=0.8),  # channels-first
    S((None, 40), renorm=True, dtype="float64", renorm_momentum=0.5),  # channels-last, a partial tile
    S((None, 3, 5), axis=1, renorm=True, dtype="float16", scale=False),  # staged (F16C) channels-first
    S((None, 9), renorm=True, adjustment=True, dtype="bfloat16", activation="relu"),  # channels-last, both
    S((None, 4, None), axis=1, adjustment=True, center=False),  # adjustment alone
    S((None, 5), adjustment=True, dtype="float64", activation="relu", scale=False),
    S((None, 2, 3, None), axis=(1, 2), renorm=True, adjustment=True, dtype="float64", center=False),
    S((None, 7), adjustment=True, dtype="float16", momentum=0.5),
]
STORAGE_EPS = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


def _ids(spec):
    parts = [spec.dtype, "x".join(map(str, spec.axis))]
    parts += [n for n, on in (("renorm", spec.renorm), ("adjust", spec.adjustment), ("relu", spec.activation)) if on]
    return "-".join(parts)


@st.composite
def problems(draw, spec):
    """x, dy and every per-feature input of a variant training step (dict by argument name)."""
    shape = tuple(draw(st.integers(1, 6)) if d is None else d for d in spec.shape)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    c, pd = spec.channels, spec.param_dtype
    spread = draw(st.sampled_from([1e-2, 1.0, 30.0]))
    offset = draw(st.sampled_from([0.0, 1.0, 100.0]))
    centers = offset * rng.standard_normal(c)
    x = centers.reshape(feature_shape(spec, len(shape))) + spread * rng.standard_normal(shape)
    if draw(st.booleans()):  # the first feature constant: variance exactly 0
        moved = np.moveaxis(x, spec.axis, range(len(spec.axis))).reshape(c, -1)
        moved[0] = centers[0]
        x = np.moveaxis(moved.reshape([shape[a] for a in spec.axis] + [shape[a] for a in range(len(shape))
                                                                       if a not in spec.axis]),
                        range(len(spec.axis)), spec.axis)
    p = dict(x=x.astype(numpy_dtype(spec.dtype)), dy=rng.standard_normal(shape).astype(numpy_dtype(spec.dtype)))
    p["gamma"] = rng.uniform(-2, 2, c).astype(pd) if spec.scale else None
    p["beta"] = rng.uniform(-2, 2, c).astype(pd) if spec.center else None
    p["moving_mean"] = (centers + rng.standard_normal(c)).astype(pd)
    p["moving_variance"] = (spread**2 * rng.uniform(0.2, 2, c)).astype(pd)
    if spec.renorm:
        p["moving_stddev"] = (spread * rng.uniform(0.5, 2, c)).astype(pd)
        p["renorm_mean"] = (centers + spread * rng.standard_normal(c)).astype(pd)
        # some below the sqrt(eps) floor, some zero (the floor then decides r and d)
        p["renorm_stddev"] = (spread * rng.uniform(0.3, 3, c) * (rng.random(c) < 0.8)).astype(pd)
        bound = st.one_of(st.none(), st.floats(1.0, 5.0))
        rmax, rmin, dmax = draw(bound), draw(st.one_of(st.none(), st.floats(0.05, 1.0))), draw(st.one_of(st.none(), st.floats(0.0, 5.0)))
        p.update(rmax=rmax, rmin=rmin, dmax=dmax)
    if spec.adjustment:
        p["adjust_scale"] = rng.uniform(0.5, 1.5, c).astype(pd)
        p["adjust_bias"] = rng.uniform(-0.5, 0.5, c).astype(pd)
    return p


FORWARD_KEYS = ("moving_stddev", "renorm_mean", "renorm_stddev", "rmax", "rmin", "dmax", "adjust_scale", "adjust_bias")


def run_forward(kernel, p):
    """kernel.forward on copies of the statistics it updates; returns (outputs, statistics after)."""
    spec = kernel.spec
    stats = {n: p[n].copy() for n in ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")
             if n in p}
    extra = {n: stats.get(n, p.get(n)) for n in FORWARD_KEYS if n in p}
    out = kernel.forward(p["x"], p["gamma"], p["beta"], stats["moving_mean"], stats["moving_variance"], **extra)
    assert len(out) == (5 if spec.renorm else 3)
    return out, stats


def reference_forward(spec, p):
    extra = {n: p[n] for n in FORWARD_KEYS if n in p}
    return oracle.forward(spec, p["x"], p["gamma"], p["beta"], p["moving_mean"], p["moving_variance"], **extra)


@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_forward_matches_oracle(build, spec):
    kernel = build(spec)
    u = float(np.finfo(spec.param_dtype).eps) / 2

    @settings(max_examples=60)
    @given(problems(spec))
    def check(p):
        originals = {k: v.copy() for k, v in p.items() if isinstance(v, np.ndarray)}
        out, stats = run_forward(kernel, p)
        ref = reference_forward(spec, p)
        y, mean, var = out[:3]
        std = np.sqrt(ref.variance)
        mag = std + np.abs(ref.mean)
        assert_close("mean", mean, ref.mean, K * u * mag)
        assert_close("variance", var, ref.variance, K * u * (ref.variance + std * mag))
        m, t, dtol = np.ones(spec.channels), np.zeros(spec.channels), np.zeros(spec.channels)
        if spec.renorm:
            r, d = out[3:]
            s_bar = np.maximum(p["renorm_stddev"].astype(np.float64), np.sqrt(spec.epsilon))
            dtol = K * u * (np.abs(ref.d) + (mag + np.abs(p["renorm_mean"])) / s_bar)
            assert_close("r", r, ref.r, K * u * (np.abs(ref.r) + std / s_bar))
            assert_close("d", d, ref.d, dtol)
            for name in ("renorm_mean", "moving_mean"):
                assert_close(name, stats[name], getattr(ref, name), K * u * (np.abs(p[name]) + mag))
            for name in ("renorm_stddev", "moving_stddev"):
                assert_close(name, stats[name], getattr(ref, name), K * u * (np.abs(p[name]) + std + np.sqrt(spec.epsilon)))
            sd = np.abs(ref.moving_stddev)
            assert_close("moving_variance", stats["moving_variance"], ref.moving_variance, K * u * (sd * sd + spec.epsilon))
            m, t = np.abs(ref.r), np.abs(ref.d)
        else:  # the adjustment alone moves the statistics as plain training does
            assert_close("moving_mean", stats["moving_mean"], ref.moving_mean, K * u * (np.abs(p["moving_mean"]) + mag))
            assert_close("moving_variance", stats["moving_variance"], ref.moving_variance,
                         K * u * (np.abs(p["moving_variance"]) + ref.variance))
        if spec.adjustment:
            a = np.abs(p["adjust_scale"].astype(np.float64))
            m, t, dtol = a * m, a * t + np.abs(p["adjust_bias"]), a * dtol
        bs = feature_shape(spec, p["x"].ndim)
        g = np.abs(p["gamma"]).reshape(bs) if spec.scale else 1.0
        b = np.abs(p["beta"]).reshape(bs) if spec.center else 0.0
        xhat = np.abs(p["x"] - ref.mean.reshape(bs)) / np.sqrt(ref.variance.reshape(bs) + spec.epsilon)
        terms = g * (m.reshape(bs) * (xhat + 1) + t.reshape(bs)) + b
        tol = K * u * terms + g * dtol.reshape(bs) + 2.0**-40 * g * m.reshape(bs) * np.abs(ref.mean.reshape(bs)) / np.sqrt(
            ref.variance.reshape(bs) + spec.epsilon)
        if spec.dtype in STORAGE_EPS:
            tol = tol + STORAGE_EPS[spec.dtype] * (np.abs(ref.y) + K * u * terms)
        if spec.activation == "relu":  # values within tolerance of 0 may fall either side of it
            tol = tol + np.where(np.abs(ref.y) <= tol, tol, 0)
        assert_close("y", y, ref.y, tol)
        for k, v in originals.items():
            if k not in stats:
                np.testing.assert_array_equal(p[k], v, err_msg=f"{k} changed")

    check()


@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_backward_matches_oracle(build, spec):
    kernel = build(spec)
    rtol = 1e-11 if spec.dtype == "float64" else 2e-5 if spec.dtype == "float32" else 2e-2

    @settings(max_examples=30)
    @given(problems(spec))
    def check(p):
        out, _ = run_forward(kernel, p)
        mean, var = out[1], out[2]
        extra = {n: p[n] for n in ("adjust_scale", "adjust_bias") if n in p}
        if spec.renorm:
            extra.update(r=out[3], d=out[4])
        if spec.activation == "relu":  # outputs near 0 may fall either side of the mask
            ref_y = oracle.forward(spec.replace(activation=None), p["x"], p["gamma"], p["beta"], p["moving_mean"],
                                   p["moving_variance"], **{n: p[n] for n in FORWARD_KEYS if n in p}).y
            assume(not np.any((np.abs(ref_y) > 0) & (np.abs(ref_y) < 1e-3 * (np.abs(ref_y).max() + 1))))
        beta = p["beta"] if spec.activation == "relu" else None
        dx, dgamma, dbeta = kernel.backward(p["dy"], p["x"], p["gamma"], mean, var, beta=beta, **extra)
        ref = oracle.backward(spec, p["dy"], p["x"], p["gamma"], mean, var, beta=beta, **extra)
        n = p["x"].size // spec.channels
        dy = np.abs(p["dy"].astype(np.float64)).max()
        x64 = p["x"].astype(np.float64)
        bs = feature_shape(spec, x64.ndim)
        xhat = (np.abs(x64 - mean.reshape(bs)) / np.sqrt(var.reshape(bs) + spec.epsilon)).max() + 1
        m = np.ones(spec.channels)
        if spec.renorm:
            m = np.abs(out[3].astype(np.float64))
        if spec.adjustment:
            m = m * np.abs(p["adjust_scale"])
        g = np.abs(p["gamma"]).max() if spec.scale else 1.0
        scale = g * m.max() / np.sqrt(var.min() + spec.epsilon)
        # The oracle takes the mean as forward returned it, rounded to the parameter dtype;
        # the kernel corrects that rounding from x, so x_hat differs by up to this much
        # (|mean| >> std: 100 against 0.01 here).
        shift = np.abs(mean.astype(np.float64)).max() * np.finfo(spec.param_dtype).eps / np.sqrt(var.min() + spec.epsilon)
        np.testing.assert_allclose(dx, ref.dx, rtol=0,
                                   atol=rtol * scale * dy * (1 + 2 * xhat**2) + 4 * scale * dy * xhat * shift + 1e-300)
        if spec.scale:
            t = np.abs(ref.dgamma).max() + n * dy * (m.max() * xhat + (np.abs(out[4]).max() if spec.renorm else 0) + 1)
            np.testing.assert_allclose(dgamma, ref.dgamma, rtol=0, atol=rtol * t + 2 * n * dy * m.max() * shift + 1e-300)
        if spec.center:
            np.testing.assert_allclose(dbeta, ref.dbeta, rtol=0, atol=rtol * n * dy + 1e-300)

    check()


# -- bad input: a message naming the argument, every caller array untouched ------------------------
def _step(spec, rng, n=4):
    c, pd = spec.channels, spec.param_dtype
    shape = tuple(n if d is None else d for d in spec.shape)
    p = dict(x=rng.standard_normal(shape).astype(spec.dtype), gamma=rng.uniform(0.5, 1.5, c).astype(pd),
             beta=rng.standard_normal(c).astype(pd), moving_mean=rng.standard_normal(c).astype(pd),
             moving_variance=rng.uniform(0.5, 2, c).astype(pd))
    if spec.renorm:
        p.update(moving_stddev=rng.uniform(0.5, 2, c).astype(pd), renorm_mean=rng.standard_normal(c).astype(pd),
                 renorm_stddev=rng.uniform(0.5, 2, c).astype(pd))
    if spec.adjustment:
        p.update(adjust_scale=rng.uniform(0.5, 1.5, c).astype(pd), adjust_bias=rng.standard_normal(c).astype(pd))
    return p


def _refused(call, p, error, pattern):
    before = {k: v.copy() for k, v in p.items() if isinstance(v, np.ndarray)}
    with pytest.raises(error, match=pattern):
        call()
    for k, v in before.items():
        np.testing.assert_array_equal(p[k], v, err_msg=f"{k} changed by a refused call")


BAD_RENORM = [
    (dict(renorm_stddev=None), TypeError, "^renorm_stddev: required"),
    (dict(moving_stddev=None), TypeError, "^moving_stddev: required"),
    (dict(moving_variance=None), TypeError, "^moving_variance: required"),
    (dict(rmax=0.5, rmin=2.0), ValueError, "^rmax: .*less than rmin"),
    (dict(dmax=-1.0), ValueError, "^dmax: .*>= 0"),
    (dict(rmax=float("nan")), TypeError, "^rmax: nan is not a number"),
    (dict(rmin="1"), TypeError, "^rmin: "),
    (dict(renorm_mean=np.zeros(5, np.float32)), ValueError, "^renorm_mean: shape"),
    (dict(renorm_mean=np.zeros(6)), TypeError, "^renorm_mean: dtype"),
]


@pytest.mark.parametrize("change,error,pattern", BAD_RENORM, ids=[p for _, _, p in BAD_RENORM])
def test_renorm_forward_bad_input(build, rng, change, error, pattern):
    kernel = build(SPECS[0])
    p = _step(SPECS[0], rng)
    args = dict(p, **change)
    extra = {k: args.get(k) for k in FORWARD_KEYS}
    _refused(lambda: kernel.forward(args["x"], args["gamma"], args["beta"], args["moving_mean"], args["moving_variance"],
                                    **extra), p, error, pattern)


def test_renorm_read_only_statistic_is_refused(build, rng):
    kernel = build(SPECS[0])
    p = _step(SPECS[0], rng)
    p["renorm_mean"].flags.writeable = False
    extra = {k: p.get(k) for k in FORWARD_KEYS}
    _refused(lambda: kernel.forward(p["x"], p["gamma"], p["beta"], p["moving_mean"], p["moving_variance"], **extra),
             p, ValueError, "^renorm_mean: is read-only")


def test_renorm_backward_needs_r_and_d(build, rng):
    spec = SPECS[0]
    kernel = build(spec)
    p = _step(spec, rng)
    extra = {k: p.get(k) for k in FORWARD_KEYS}
    _, mean, var, r, d = kernel.forward(p["x"], p["gamma"], p["beta"], p["moving_mean"], p["moving_variance"], **extra)
    p.update(dy=np.ones_like(p["x"]), mean=mean, variance=var, r=r, d=d)
    _refused(lambda: kernel.backward(p["dy"], p["x"], p["gamma"], mean, var, r=r), p, TypeError, "^d: required")
    _refused(lambda: kernel.backward(p["dy"], p["x"], p["gamma"], mean, var, r=r[:3], d=d), p, ValueError, "^r: shape")
    dx, dgamma, dbeta = kernel.backward(p["dy"], p["x"], p["gamma"], mean, var, r=r, d=d)
    assert dx.shape == p["x"].shape and dgamma.shape == dbeta.shape == (spec.channels,)


def test_adjustment_bad_input(build, rng):
    spec = SPECS[4]  # adjustment alone, center=False
    kernel = build(spec)
    p = _step(spec, rng)
    p.pop("beta")
    a, b = p["adjust_scale"], p["adjust_bias"]
    call = lambda **kw: kernel.forward(p["x"], p["gamma"], None, p["moving_mean"], p["moving_variance"],  # noqa: E731
                                       **dict(dict(adjust_scale=a, adjust_bias=b), **kw))
    _refused(lambda: call(adjust_scale=a[:2]), p, ValueError, r"^adjust_scale: shape is \(2,\)")
    _refused(lambda: call(adjust_bias=np.ones((2, 2), np.float32)), p, ValueError, "^adjust_bias: shape")
    _refused(lambda: call(adjust_bias=None), p, TypeError, "^adjust_bias: required")
    _refused(lambda: call(rmax=2.0), p, TypeError, "^rmax: not used by this kernel")
    _refused(lambda: call(renorm_mean=a), p, TypeError, "^renorm_mean: not used .*renorm=False")
    y, mean, var = call()
    dy = np.ones_like(p["x"])
    _refused(lambda: kernel.backward(dy, p["x"], p["gamma"], mean, var, adjust_scale=a), p, TypeError, "^adjust_bias: required")


def test_plain_kernels_refuse_variant_arguments(build, rng):
    spec = S((None, 6))
    kernel = build(spec)
    p = _step(spec, rng)
    ones = np.ones(6, np.float32)
    for name in ("moving_stddev", "renorm_mean", "renorm_stddev", "adjust_scale", "adjust_bias"):
        _refused(lambda: kernel.forward(p["x"], p["gamma"], p["beta"], **{name: ones}), p, TypeError,
                 f"^{name}: not used by this kernel")
    _refused(lambda: kernel(p["x"], p["gamma"], p["beta"], dmax=1.0), p, TypeError, "^dmax: not used")
    _, mean, var = kernel.forward(p["x"], p["gamma"], p["beta"])
    _refused(lambda: kernel.backward(p["x"], p["x"], p["gamma"], mean, var, r=ones), p, TypeError, "^r: not used")


def test_clip_bounds_none_inf_and_ints(build, rng):
    """None and +inf clip nothing; ints are numbers too (the checked path takes them)."""
    spec = SPECS[0]
    kernel = build(spec)
    outs = []
    for bounds in (dict(), dict(rmax=float("inf"), rmin=0, dmax=float("inf"))):
        p = _step(spec, np.random.default_rng(7))
        extra = dict({k: p.get(k) for k in FORWARD_KEYS}, **bounds)
        outs.append(kernel.forward(p["x"], p["gamma"], p["beta"], p["moving_mean"], p["moving_variance"], **extra))
    for a, b in zip(outs[0], outs[1]):
        np.testing.assert_array_equal(a, b)
    p = _step(spec, np.random.default_rng(7))
    extra = dict({k: p.get(k) for k in FORWARD_KEYS}, rmax=1, rmin=1, dmax=0)
    _, _, _, r, d = kernel.forward(p["x"], p["gamma"], p["beta"], p["moving_mean"], p["moving_variance"], **extra)
    assert np.all(r == 1) and np.all(d == 0)


# -- the layer ------------------------------------------------------------------------------------
def test_layer_renorm_weights_config_and_frozen(session_cache, strict_compiler, rng):
    common = dict(cache_dir=session_cache, compiler=strict_compiler)
    layer = bngen.BatchNormalization(renorm=True, renorm_clipping={"rmax": 2.0}, renorm_momentum=0.5, momentum=0.9,
                                     moving_variance_initializer=4.0, **common)
    x = rng.standard_normal((8, 5)).astype(np.float32)
    layer(x, training=True)
    assert layer.weight_names == ["gamma", "beta", "moving_mean", "moving_variance", "moving_stddev", "renorm_mean",
                                  "renorm_stddev"]
    weights = layer.get_weights()
    assert len(weights) == 7
    # the stddevs started at sqrt(4) = 2, as Keras 3 initialises them, then moved
    s = np.sqrt(x.astype(np.float64).var(axis=0) + 1e-3)
    np.testing.assert_allclose(weights[4], 0.9 * 2 + 0.1 * s, rtol=1e-6)
    np.testing.assert_allclose(weights[6], 0.5 * 2 + 0.5 * s, rtol=1e-6)
    np.testing.assert_allclose(weights[3], np.maximum(weights[4].astype(np.float64) ** 2 - 1e-3, 0), rtol=1e-6)
    config = layer.get_config()
    again = bngen.BatchNormalization(**dict(config, **common))
    assert again.get_config() == config and again.renorm_clipping == {"rmax": 2.0}
    again.set_weights(weights)
    frozen = bngen.BatchNormalization(**dict(config, trainable=False, **common))
    frozen.set_weights(weights)
    y = frozen(x, training=True)  # trainable=False: inference, the weights stay
    for a, b in zip(frozen.get_weights(), weights):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(y, again(x, training=False), rtol=1e-6)
    with pytest.raises(ValueError, match="^weights: got 4 array"):
        again.set_weights(weights[:4])


@pytest.mark.parametrize("clipping,pattern", [({"rmax": 0.5, "rmin": 1.0}, "less than rmin"), ({"dmax": -0.1}, "dmax"),
                                              ({"rmaxx": 1.0}, "unknown key"), ("tight", "not a dict")])
def test_layer_bad_clipping(clipping, pattern):
    with pytest.raises(ValueError, match=f"^renorm_clipping: .*{pattern}"):
        bngen.BatchNormalization(renorm=True, renorm_clipping=clipping)
    layer = bngen.BatchNormalization(renorm=True, renorm_clipping={"rmax": 3.0})
    with pytest.raises(ValueError, match="^renorm_clipping: "):
        layer.renorm_clipping = clipping
    assert layer.renorm_clipping == {"rmax": 3.0}  # unchanged by the refused value


def test_layer_adjustment_called_once_per_training_call(session_cache, strict_compiler, rng):
    calls = []

    def adjustment(shape):
        calls.append(shape)
        return np.full(3, 2.0), 0.5

    layer = bngen.BatchNormalization(axis=1, adjustment=adjustment, cache_dir=session_cache, compiler=strict_compiler)
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    y = layer(x, training=True)
    assert calls == [(4, 3, 5)]
    ref = oracle.forward(layer.kernel(x.shape, True).spec, x, np.ones(3), np.zeros(3), adjust_scale=np.full(3, 2.0),
                         adjust_bias=np.full(3, 0.5))
    np.testing.assert_allclose(y, ref.y, atol=1e-5)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx = layer.backward(dy)
    want = oracle.backward(layer.kernel(x.shape, True).spec, dy, x, np.ones(3), adjust_scale=np.full(3, 2.0),
                           adjust_bias=np.full(3, 0.5))
    np.testing.assert_allclose(dx, want.dx, atol=1e-4)
    np.testing.assert_allclose(layer.dgamma, want.dgamma, rtol=1e-4, atol=1e-4)
    layer(x, training=False)
    assert len(calls) == 1  # never at inference
    cumulative = bngen.BatchNormalization(axis=1, momentum=None, adjustment=adjustment, cache_dir=session_cache,
                                          compiler=strict_compiler)
    np.testing.assert_array_equal(cumulative(x, training=True), y)  # PyTorch's cumulative average adjusts too
    assert len(calls) == 2


@pytest.mark.parametrize("returned,error,pattern", [
    ((np.ones(4), 0.0), ValueError, r"adjustment: returned adjust_scale of shape \(4,\)"),
    ((1.0, np.ones((2, 3))), ValueError, "adjustment: returned adjust_bias of shape"),
    ((1.0,), TypeError, "adjustment: returned tuple"),
    (("a", 0.0), TypeError, "adjustment: its adjust_scale"),
])
def test_layer_wrong_adjustment(session_cache, strict_compiler, rng, returned, error, pattern):
    layer = bngen.BatchNormalization(adjustment=lambda shape: returned, cache_dir=session_cache, compiler=strict_compiler)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    layer.build(x.shape)
    before = [w.copy() for w in layer.get_weights()]
    x0 = x.copy()
    with pytest.raises(error, match=pattern):
        layer(x, training=True)
    for a, b in zip(layer.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(x, x0)
    with pytest.raises(TypeError, match="^adjustment: "):
        bngen.BatchNormalization(adjustment="scale")


# -- export ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", [dict(renorm=True), dict(virtual_batch_size=2), dict(adjustment=True)])
def test_emit_variants(tmp_path, variant):
    """Inference exports are the plain ones (only the banner's spec differs); training ones are refused."""
    spec = S((None, 6), training=False, **variant)
    params = {"gamma": np.ones(6), "beta": np.zeros(6), "moving_mean": np.zeros(6), "moving_variance": np.ones(6)}
    for name, p in (("a", None), ("b", params)):
        ours = bngen.emit(spec, tmp_path / "v", name=name, params=p)
        plain = bngen.emit(spec.replace(renorm=False, virtual_batch_size=None, adjustment=False), tmp_path / "p",
                           name=name, params=p)
        for a, b in zip(ours, plain):
            strip = lambda t: [line for line in t.splitlines() if "spec:" not in line]  # noqa: E731
            assert strip(a.read_text()) == strip(b.read_text())
    field = next(iter(variant))
    with pytest.raises(ValueError, match=f"^spec: {field}=.* cannot be exported"):
        bngen.emit(spec.replace(training=True), tmp_path / "t")
    assert not (tmp_path / "t").exists()


# -- ghost batch norm --------------------------------------------------------------------------
GHOSTS = [
    S((None, 6, None), axis=1, virtual_batch_size=2),  # NCHW-like: channels-first
    S((None, 5, 3, 4), axis=2, virtual_batch_size=3, dtype="float64", momentum=0.8),  # several runs per sample
    S((None, 40), virtual_batch_size=4, dtype="float64", activation="relu"),  # channels-last
    S((None, 4, 9), virtual_batch_size=2, activation="relu", center=False),  # channels-last, rows per sample
    S((None, 3, 5), axis=1, virtual_batch_size=2, dtype="float16", scale=False),  # staged channels-first
    S((None, 3, 7), virtual_batch_size=1, dtype="bfloat16"),  # one sample per ghost batch
]


@st.composite
def ghost_problems(draw, spec):
    k = spec.virtual_batch_size
    n = k * draw(st.integers(1, 4))
    shape = (n,) + tuple(draw(st.integers(1, 5)) if d is None else d for d in spec.shape[1:])
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    c, pd = spec.channels, spec.param_dtype
    spread, offset = draw(st.sampled_from([1e-2, 1.0, 30.0])), draw(st.sampled_from([0.0, 1.0, 100.0]))
    x = offset * rng.standard_normal(c).reshape(feature_shape(spec, len(shape))) + spread * rng.standard_normal(shape)
    x[::3] += rng.standard_normal(shape[1:]) * spread  # ghost batches with statistics of their own
    dtype = numpy_dtype(spec.dtype)
    return dict(x=x.astype(dtype), dy=rng.standard_normal(shape).astype(dtype),
                gamma=rng.uniform(-2, 2, c).astype(pd) if spec.scale else None,
                beta=rng.uniform(-2, 2, c).astype(pd) if spec.center else None,
                moving_mean=rng.standard_normal(c).astype(pd), moving_variance=rng.uniform(0.5, 2, c).astype(pd))


@pytest.mark.parametrize("spec", GHOSTS, ids=lambda s: f"{s.dtype}-{'x'.join(map(str, s.axis))}-k{s.virtual_batch_size}")
def test_ghost_matches_oracle(build, spec):
    """60 examples per spec: forward (y, per-ghost statistics, moving statistics) and backward."""
    kernel = build(spec)
    u = float(np.finfo(spec.param_dtype).eps) / 2
    rtol = 1e-11 if spec.dtype == "float64" else 2e-5 if spec.dtype == "float32" else 2e-2

    @settings(max_examples=60)
    @given(ghost_problems(spec))
    def check(p):
        x = p["x"]
        ghosts = x.shape[0] // spec.virtual_batch_size
        mm, mv = p["moving_mean"].copy(), p["moving_variance"].copy()
        x0 = x.copy()
        y, mean, var = kernel.forward(x, p["gamma"], p["beta"], mm, mv)
        ref = oracle.forward(spec, x, p["gamma"], p["beta"], p["moving_mean"], p["moving_variance"])
        assert mean.shape == var.shape == (ghosts, spec.channels)
        std = np.sqrt(ref.variance)
        mag = std + np.abs(ref.mean)
        assert_close("mean", mean, ref.mean, K * u * mag)
        assert_close("variance", var, ref.variance, K * u * (ref.variance + std * mag))
        assert_close("moving_mean", mm, ref.moving_mean, K * u * (np.abs(p["moving_mean"]) + mag.max(axis=0)))
        assert_close("moving_variance", mv, ref.moving_variance,
                     K * u * (np.abs(p["moving_variance"]) + (ref.variance + std * mag).max(axis=0)))
        g = np.abs(p["gamma"]).max() if spec.scale else 1.0
        b = np.abs(p["beta"]).max() if spec.center else 0.0
        xhat = np.abs(np.asarray(ref.y, np.float64)).max() / g + (b + 1) / g + 1
        tol = K * u * (g * xhat + b) + 2.0**-40 * g * (mag / np.sqrt(ref.variance + spec.epsilon)).max()
        if spec.dtype in STORAGE_EPS:
            tol = tol + STORAGE_EPS[spec.dtype] * np.abs(ref.y)
        assert_close("y", y, ref.y, tol)
        np.testing.assert_array_equal(x, x0)
        beta = p["beta"] if spec.activation == "relu" else None
        if spec.activation == "relu":  # outputs near 0 may fall either side of the mask
            pre = oracle.forward(spec.replace(activation=None), x, p["gamma"], p["beta"]).y
            assume(not np.any((np.abs(pre) > 0) & (np.abs(pre) < 1e-3 * (np.abs(pre).max() + 1))))
        dx, dgamma, dbeta = kernel.backward(p["dy"], x, p["gamma"], mean, var, beta=beta)
        want = oracle.backward(spec, p["dy"], x, p["gamma"], mean, var, beta=beta)
        n = x.size // spec.channels
        dy = np.abs(p["dy"].astype(np.float64)).max()
        xh = np.abs(np.asarray(want.dx)).max() + 1
        scale = g / np.sqrt(var.min() + spec.epsilon)
        xhat_max = (np.abs(x.astype(np.float64) - 0).max() + np.abs(mean).max()) / np.sqrt(var.min() + spec.epsilon) + 1
        np.testing.assert_allclose(dx, want.dx, rtol=0, atol=rtol * scale * dy * (1 + 2 * min(xhat_max, 1e4) ** 2) + rtol * xh)
        if spec.scale:
            np.testing.assert_allclose(dgamma, want.dgamma, rtol=0, atol=rtol * n * dy * min(xhat_max, 1e4))
        if spec.center:
            np.testing.assert_allclose(dbeta, want.dbeta, rtol=0, atol=rtol * n * dy + 1e-300)

    check()


def test_ghost_bad_input_and_threads(build, rng):
    spec = GHOSTS[0]
    kernel = build(spec)
    x = rng.standard_normal((5, 6, 4)).astype(np.float32)
    g, b = np.ones(6, np.float32), np.zeros(6, np.float32)
    mm, mv = np.zeros(6, np.float32), np.ones(6, np.float32)
    p = dict(x=x, gamma=g, beta=b, moving_mean=mm, moving_variance=mv)
    _refused(lambda: kernel.forward(x, g, b, mm, mv), p, ValueError, "^x: batch size 5 .* multiple of virtual_batch_size=2")
    _refused(lambda: kernel(x, g, b, mm, mv), p, ValueError, "^x: batch size 5")
    x = rng.standard_normal((8, 6, 4)).astype(np.float32)
    p["x"] = x
    y, mean, var = kernel.forward(x, g, b)
    assert mean.shape == (4, 6)
    dy = np.ones_like(x)
    _refused(lambda: kernel.backward(dy, x, g, mean[0], var), dict(p, mean=mean, var=var), ValueError,
             r"^mean: shape is \(6,\); expected \(4, 6\)")
    _refused(lambda: kernel.backward(dy, x, g, mean, var.astype(np.float64)), dict(p, mean=mean), TypeError, "^variance: dtype")
    out = np.empty_like(x)
    dx, dgamma, dbeta = kernel.backward(dy * x, x, g, mean, var, out=out)
    assert dx is out
    np.testing.assert_array_equal(dx, kernel.backward(dy * x, x, g, mean, var)[0])
    # results do not depend on the thread count (threads take whole channels)
    one = kernel.forward(x, g, b, threads=1)
    two = kernel.forward(x, g, b, threads=2)
    for a, c in zip(one, two):
        np.testing.assert_array_equal(a, c)
    # channels-last: threads take runs of ghost batches; each ghost batch's results are the same
    last = build(GHOSTS[3])
    x = rng.standard_normal((1024, 4, 9)).astype(np.float32)  # above the threads' threshold
    dy = rng.standard_normal(x.shape).astype(np.float32)
    runs = []
    for threads in (1, 2, 3):
        mm, mv = np.zeros(9, np.float32), np.ones(9, np.float32)
        y, mean, var = last.forward(x, g[:1].repeat(9), None, mm, mv, threads=threads)
        runs.append((y, mean, var, mm, mv) + last.backward(dy, x, g[:1].repeat(9), mean, var, threads=threads))
    want = oracle.backward(GHOSTS[3], dy, x, g[:1].repeat(9), runs[0][1], runs[0][2])
    for run in runs[1:]:
        for i in (0, 1, 2, 5):  # y, mean, variance, dx: per ghost batch, whoever computes it
            np.testing.assert_array_equal(run[i], runs[0][i])
        for i in (3, 4, 6):  # moving statistics and dgamma: sums over ghosts, merged in thread order
            np.testing.assert_allclose(run[i], runs[0][i], rtol=1e-5)
    np.testing.assert_allclose(runs[1][6], want.dgamma, rtol=1e-4, atol=1e-2)


def test_ghost_layer_matches_per_ghost_batches(session_cache, strict_compiler, rng):
    """The layer with virtual_batch_size: each strided ghost batch normalised on its own (tf.keras' grouping)."""
    layer = bngen.BatchNormalization(virtual_batch_size=2, momentum=0.5, cache_dir=session_cache, compiler=strict_compiler)
    x = rng.standard_normal((6, 3)).astype(np.float32)
    x[0::3] += 10.0  # ghost batch 0 = samples 0 and 3 (stride G = 3), not samples 0 and 1
    y = layer(x, training=True)
    for j in range(3):
        part = x[j::3].astype(np.float64)
        np.testing.assert_allclose(y[j::3], (part - part.mean(0)) / np.sqrt(part.var(0) + 1e-3), atol=1e-5)
    means = np.stack([x[j::3].astype(np.float64).mean(0) for j in range(3)])
    np.testing.assert_allclose(layer.moving_mean, 0.5 * means.mean(0), rtol=1e-5)
    dx = layer.backward(np.ones_like(x))
    np.testing.assert_allclose(dx, 0, atol=1e-5)  # a constant dy has no gradient through the normalisation
    with pytest.raises(ValueError, match="^x: batch size 5"):
        layer(x[:5], training=True)
    layer(x[:5], training=False)  # inference: no ghosts, any batch size


# -- bench ----------------------------------------------------------------------------------------
def test_bench_times_the_variants(session_cache, strict_compiler, tmp_path, capsys):
    """A functional run (no timing assertion): renorm and ghost rows beside the plain ones."""
    from bngen.tools import bench, cli

    cases = bench.with_variants([bench.Case("tiny", (4, 3, 4, 4), 1), bench.Case("odd", (3, 8), -1)],
                                ["plain", "renorm", "ghost:2"])
    assert [c.name for c in cases] == ["tiny", "tiny renorm", "tiny ghost k=2", "odd", "odd renorm"]
    report = bench.run(cases, [1], repeat=1, kinds=["training forward", "backward"], cache_dir=session_cache,
                       compiler=strict_compiler)
    variants = {(r["case"], r["kind"]): (r["renorm"], r["virtual_batch_size"]) for r in report["rows"]}
    assert variants[("tiny renorm", "backward")] == (True, None)
    assert variants[("tiny ghost k=2", "training forward")] == (False, 2)
    with pytest.raises(SpecError, match="--variants"):
        bench.parse_variant("ghost:0")
    spec = tmp_path / "spec.json"
    spec.write_text(S((None, 5), renorm=True).to_json())
    assert cli.main(["bench", "--spec", str(spec), "--batch", "4", "--repeat", "1", "--threads", "1",
                     "--kinds", "training forward", "--quiet"]) == 0
    assert "(spec file) renorm | training forward" in capsys.readouterr().out
