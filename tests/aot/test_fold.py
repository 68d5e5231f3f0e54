"""bngen.fold against the unfolded layer: dense and convolution layers computed with NumPy,
then the batch norm of the float64 oracle, versus the folded layer alone.

Property tests (no compilation): 6 layer kinds (PyTorch dense, Keras dense, PyTorch
conv2d, PyTorch transposed conv2d, Keras conv2d NHWC, Keras depthwise conv2d), 30
hypothesis examples each (shapes, stride, bias or not, gamma/beta or not, parameter
values).  Then the .npz command, and one test per class of bad argument.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view

import bngen
from bngen import oracle
from bngen.aot.fold import fold
from bngen.tools.cli import main as cli_main

EXAMPLES = 30


def conv2d_nchw(x, w, b, stride):
    """PyTorch Conv2d: x (N, Cin, H, W), w (Cout, Cin, kh, kw), valid padding."""
    kh, kw = w.shape[2:]
    win = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]  # N, Cin, Ho, Wo, kh, kw
    return np.einsum("nchwij,ocij->nohw", win, w) + b[None, :, None, None]


def conv_transpose2d_nchw(x, w, b, stride):
    """PyTorch ConvTranspose2d: x (N, Cin, H, W), w (Cin, Cout, kh, kw), no padding."""
    n, cin, h, wd = x.shape
    _, cout, kh, kw = w.shape
    y = np.zeros((n, cout, (h - 1) * stride + kh, (wd - 1) * stride + kw))
    for i in range(h):
        for j in range(wd):
            y[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw] += np.einsum("nc,coij->noij", x[:, :, i, j], w)
    return y + b[None, :, None, None]


def conv2d_nhwc(x, w, b, stride):
    """Keras Conv2D: x (N, H, W, Cin), w (kh, kw, Cin, Cout), valid padding."""
    kh, kw = w.shape[:2]
    win = sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]  # N, Ho, Wo, Cin, kh, kw
    return np.einsum("nhwcij,ijco->nhwo", win, w) + b


def depthwise_nhwc(x, w, b, stride):
    """Keras DepthwiseConv2D: w (kh, kw, C, multiplier); output feature c * multiplier + m."""
    kh, kw, c, mult = w.shape
    win = sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]
    y = np.einsum("nhwcij,ijcm->nhwcm", win, w)
    return y.reshape(y.shape[:3] + (c * mult,)) + b


# kind: (weight shape from (cin, cout, k), out_axis, feature axis of the output, layer)
LAYERS = {
    "torch-dense": (lambda ci, co, k: (co, ci), 0, -1, lambda x, w, b, s: x @ w.T + b),
    "keras-dense": (lambda ci, co, k: (ci, co), -1, -1, lambda x, w, b, s: x @ w + b),
    "torch-conv2d": (lambda ci, co, k: (co, ci, k, k), 0, 1, conv2d_nchw),
    "torch-conv-transpose2d": (lambda ci, co, k: (ci, co, k, k), 1, 1, conv_transpose2d_nchw),
    "keras-conv2d": (lambda ci, co, k: (k, k, ci, co), -1, -1, conv2d_nhwc),
    "keras-depthwise": (lambda ci, co, k: (k, k, ci, 2), (2, 3), -1, depthwise_nhwc),
}


@pytest.mark.parametrize("kind", list(LAYERS))
@settings(max_examples=EXAMPLES)
@given(
    cin=st.integers(1, 4), cout=st.integers(1, 5), k=st.integers(1, 3), stride=st.integers(1, 2),
    with_bias=st.booleans(), with_gamma=st.booleans(), with_beta=st.booleans(), seed=st.integers(0, 2**32 - 1),
    epsilon=st.sampled_from([1e-5, 1e-3, 0.1]),
)
def test_folded_layer_equals_layer_then_batch_norm(kind, cin, cout, k, stride, with_bias, with_gamma, with_beta, seed, epsilon):
    shape_of, out_axis, feature_axis, layer = LAYERS[kind]
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape_of(cin, cout, k))
    c = w.shape[out_axis] if isinstance(out_axis, int) else w.shape[2] * w.shape[3]
    if kind.startswith("keras-depthwise"):
        x = rng.standard_normal((2, 5, 5, cin))
    elif kind.endswith("dense"):
        x = rng.standard_normal((3, cin))
    elif kind.startswith("torch"):
        x = rng.standard_normal((2, cin, 5, 5))
    else:
        x = rng.standard_normal((2, 5, 5, cin))
    bias = rng.standard_normal(c) if with_bias else None
    gamma = rng.uniform(-2, 2, c) if with_gamma else None
    beta = rng.standard_normal(c) if with_beta else None
    mean, variance = rng.standard_normal(c), rng.uniform(0, 3, c)

    z = layer(x, w, bias if bias is not None else np.zeros(c), stride)
    spec = bngen.Spec(z.shape, axis=feature_axis, training=False, epsilon=epsilon, scale=with_gamma,
                      center=with_beta, dtype="float64")
    want = oracle.forward(spec, z, gamma, beta, mean, variance).y

    inputs = [a.copy() if a is not None else None for a in (w, bias, gamma, beta, mean, variance)]
    w2, b2 = fold(w, bias, gamma, beta, mean, variance, epsilon, out_axis=out_axis)
    for before, after in zip(inputs, (w, bias, gamma, beta, mean, variance)):
        if before is not None:
            np.testing.assert_array_equal(before, after)  # the inputs are left alone
    assert w2.shape == w.shape and b2.shape == (c,)
    np.testing.assert_allclose(layer(x, w2, b2, stride), want, rtol=1e-10, atol=1e-10)


def test_dtype_follows_the_weight():
    c = 3
    args = (np.zeros(c), np.ones(c), np.zeros(c), np.ones(c))
    w32, b32 = fold(np.ones((c, 2), np.float32), None, *args, 1e-3)
    assert w32.dtype == np.float32 and b32.dtype == np.float32
    wi, bi = fold(np.ones((c, 2), np.int64), None, *args, 1e-3)
    assert wi.dtype == np.float64 and bi.dtype == np.float64
    w16, _ = fold(np.ones((c, 2), np.float16), None, *args, 1e-3)
    assert w16.dtype == np.float16


def test_the_formula_on_a_small_case():
    w = np.array([[1.0, 2.0], [3.0, 4.0]])
    w2, b2 = fold(w, np.array([1.0, -1.0]), np.array([2.0, 1.0]), np.array([0.5, 0.0]), np.array([1.0, 1.0]),
                  np.array([3.0, 0.0]), 1.0)
    np.testing.assert_allclose(w2, [[1.0, 2.0], [3.0, 4.0]])  # s = [2/2, 1/1]
    np.testing.assert_allclose(b2, [0.5, -2.0])


# -- bad arguments ----------------------------------------------------------------------------
def test_mismatched_shapes_name_the_argument():
    w = np.ones((4, 3))
    ok = dict(bias=None, gamma=np.ones(4), beta=np.zeros(4), mean=np.zeros(4), variance=np.ones(4))
    for name in ("bias", "gamma", "beta", "mean", "variance"):
        args = {**ok, name: np.ones(3)}
        with pytest.raises(ValueError, match=rf"^{name}: shape \(3,\) does not match the 4 output features"):
            fold(w, args["bias"], args["gamma"], args["beta"], args["mean"], args["variance"], 1e-3)
    # along axis 1 the same weight has 3 features
    fold(w, None, np.ones(3), None, np.zeros(3), np.ones(3), 1e-3, out_axis=1)
    with pytest.raises(ValueError, match=r"gamma: shape \(4,\) does not match the 3 output features"):
        fold(w, None, np.ones(4), None, np.zeros(3), np.ones(3), 1e-3, out_axis=1)


def test_bad_epsilon_axis_and_values():
    w = np.ones((4, 3))
    v = dict(gamma=None, beta=None, mean=np.zeros(4), variance=np.ones(4))
    for eps in (0, -1e-3, float("nan"), "1e-3", True):
        with pytest.raises(ValueError, match="epsilon"):
            fold(w, None, v["gamma"], v["beta"], v["mean"], v["variance"], eps)
    for axis in (2, -3):
        with pytest.raises(ValueError, match="out_axis: .* out of range"):
            fold(w, None, None, None, np.zeros(4), np.ones(4), 1e-3, out_axis=axis)
    with pytest.raises(ValueError, match="out_axis: .* adjacent"):
        fold(np.ones((2, 3, 4)), None, None, None, np.zeros(8), np.ones(8), 1e-3, out_axis=(0, 2))
    with pytest.raises(TypeError, match="out_axis"):
        fold(w, None, None, None, np.zeros(4), np.ones(4), 1e-3, out_axis="0")
    with pytest.raises(ValueError, match="variance: variance \\+ epsilon"):
        fold(w, None, None, None, np.zeros(4), np.array([1, 1, -1, 1.0]), 1e-3)
    with pytest.raises(ValueError, match="mean: holds NaN"):
        fold(w, None, None, None, np.array([0, np.inf, 0, 0]), np.ones(4), 1e-3)
    with pytest.raises(TypeError, match="weight"):
        fold("weights", None, None, None, np.zeros(4), np.ones(4), 1e-3)


# -- the command -------------------------------------------------------------------------------
def test_fold_command_over_npz(tmp_path, capsys):
    rng = np.random.default_rng(3)
    w, b = rng.standard_normal((5, 2, 3, 3)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    bn = {"gamma": rng.uniform(0.5, 2, 5), "beta": rng.standard_normal(5), "moving_mean": rng.standard_normal(5),
          "moving_variance": rng.uniform(0.5, 2, 5)}
    np.savez(tmp_path / "conv.npz", weight=w, bias=b)
    np.savez(tmp_path / "bn.npz", **bn)
    out = tmp_path / "folded.npz"
    rc = cli_main(["fold", "--layer", str(tmp_path / "conv.npz"), "--bn", str(tmp_path / "bn.npz"), "--epsilon", "1e-5",
                   "--out", str(out)])
    assert rc == 0
    assert "folded.npz" in capsys.readouterr().out
    with np.load(out) as got:
        want_w, want_b = fold(w, b, bn["gamma"], bn["beta"], bn["moving_mean"], bn["moving_variance"], 1e-5)
        np.testing.assert_array_equal(got["weight"], want_w)
        np.testing.assert_array_equal(got["bias"], want_b)
    # a Keras kernel without bias, folded along the last axis
    np.savez(tmp_path / "dense.npz", kernel=rng.standard_normal((3, 5)))
    rc = cli_main(["fold", "--layer", str(tmp_path / "dense.npz"), "--bn", str(tmp_path / "bn.npz"), "--epsilon", "1e-3",
                   "--out-axis", "-1", "--out", str(tmp_path / "dense_folded.npz")])
    assert rc == 0
    with np.load(tmp_path / "dense_folded.npz") as got:
        assert set(got.keys()) == {"kernel", "bias"}


def test_fold_command_reports_bad_files(tmp_path, capsys):
    np.savez(tmp_path / "conv.npz", weights=np.ones((5, 2)))
    np.savez(tmp_path / "bn.npz", moving_mean=np.zeros(5), moving_variance=np.ones(5))
    rc = cli_main(["fold", "--layer", str(tmp_path / "conv.npz"), "--bn", str(tmp_path / "bn.npz"), "--epsilon", "1e-3",
                   "--out", str(tmp_path / "o.npz")])
    assert rc == 2
    assert "layer: expected the arrays weight (or kernel)" in capsys.readouterr().err
    assert not (tmp_path / "o.npz").exists()
    rc = cli_main(["fold", "--layer", str(tmp_path / "missing.npz"), "--bn", str(tmp_path / "bn.npz"), "--epsilon", "1e-3",
                   "--out", str(tmp_path / "o.npz")])
    assert rc == 2 and "--layer" in capsys.readouterr().err
