"""bngen.BatchNormalization: a tiny model trained by NumPy SGD through the layer's
backward, lazy per-shape kernels, weights (Keras order, Keras 1 list, initialisers,
get/set with validation), the training flag, the frozen backward, and bad input.

Specs compiled: 12 (one per layer configuration, input shape and training flag used
here).  Examples: fixed inputs; the SGD test runs 40 training steps.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import bngen
from bngen import oracle


@pytest.fixture
def make(session_cache, strict_compiler):
    """BatchNormalization building into the session cache with the strict compiler."""
    return functools.partial(bngen.BatchNormalization, cache_dir=session_cache, compiler=strict_compiler)


def test_sgd_through_backward_lowers_the_loss(make):
    """y = relu(BN(x W1)) W2, squared error, plain SGD on W1, W2, gamma, beta: the loss falls."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    target = (np.sin(x[:, :1] * 2) + x[:, 1:2] * x[:, 2:3]).astype(np.float32)
    w1 = (rng.standard_normal((8, 16)) * 0.5).astype(np.float32)
    w2 = (rng.standard_normal((16, 1)) * 0.2).astype(np.float32)
    bn = make(momentum=0.9, activation="relu")
    lr, losses = 0.2, []
    for _ in range(40):
        h = x @ w1
        a = bn(h, training=True)
        err = a @ w2 - target
        losses.append(float(np.mean(err**2)))
        d_out = 2 * err / len(x)
        d_w2 = a.T @ d_out
        d_h = bn.backward(d_out @ w2.T)
        w1 -= lr * (x.T @ d_h)
        w2 -= lr * d_w2
        bn.gamma[...] -= lr * bn.dgamma
        bn.beta[...] -= lr * bn.dbeta
    assert losses[-1] < 0.5 * losses[0], losses
    # The moving statistics tracked the batches, so inference is close to training mode.
    eval_loss = float(np.mean((bn(x @ w1) @ w2 - target) ** 2))
    assert eval_loss < 0.7 * losses[0]


def test_training_and_inference_match_the_oracle(make):
    rng = np.random.default_rng(1)
    layer = make(axis=1, momentum=0.8, epsilon=1e-3, dtype="float64", gamma_initializer="random_normal", seed=3)
    x = rng.standard_normal((4, 3, 5)) * 2 + 1
    layer.build(x.shape)
    gamma, beta, mm, mv = layer.get_weights()
    y = layer(x, training=True)
    spec = bngen.Spec((4, 3, 5), axis=1, momentum=0.8, dtype="float64")
    ref = oracle.forward(spec, x, gamma, beta, mm, mv)
    np.testing.assert_allclose(y, ref.y, atol=1e-12)
    np.testing.assert_allclose(layer.moving_mean, ref.moving_mean, atol=1e-12)
    np.testing.assert_allclose(layer.moving_variance, ref.moving_variance, atol=1e-12)
    dy = rng.standard_normal(x.shape)
    dx = layer.backward(dy)
    want = oracle.backward(spec, dy, x, gamma)
    np.testing.assert_allclose(dx, want.dx, atol=1e-12)
    np.testing.assert_allclose(layer.dgamma, want.dgamma, atol=1e-12)
    np.testing.assert_allclose(layer.dbeta, want.dbeta, atol=1e-12)

    # Inference: moving statistics, and the frozen layer's gradient.
    before = layer.get_weights()
    y = layer(x)  # training=False by default
    frozen = spec.replace(training=False)
    np.testing.assert_allclose(y, oracle.forward(frozen, x, *layer.get_weights()).y, atol=1e-12)
    for a, b in zip(before, layer.get_weights()):
        np.testing.assert_array_equal(a, b)
    dx = layer.backward(dy)
    want = oracle.backward(frozen, dy, x, gamma, layer.moving_mean, layer.moving_variance)
    np.testing.assert_allclose(dx, want.dx, atol=1e-12)
    np.testing.assert_allclose(layer.dgamma, want.dgamma, atol=1e-12)


def test_kernels_are_built_lazily_one_per_shape_class(make):
    # one kernel per (shape with a dynamic batch size, training): a new batch size builds nothing
    layer = make(axis=-1)
    assert not layer.built and layer.get_weights() == []
    x4, x6 = np.ones((4, 3), np.float32), np.ones((6, 3), np.float32)
    layer(x4, training=True)
    layer(x6, training=True)
    layer(x4, training=True)
    assert layer.kernel((4, 3), True) is layer.kernel((6, 3), True)
    assert layer.kernel((4, 3), True).spec.shape == (None, 3)
    assert layer.kernel((4, 3), False) is not layer.kernel((4, 3), True)
    assert len(layer._kernels) == 2


def test_keras1_weights_list_holds_the_variance(make):
    """Keras 1: weights=[gamma, beta, running_mean, running_std], running_std = variance."""
    c = 4
    gamma, beta = np.full(c, 2.0, np.float32), np.full(c, 0.5, np.float32)
    mean, var = np.arange(c, dtype=np.float32), np.full(c, 4.0, np.float32)
    layer = make(epsilon=1e-3, weights=[gamma, beta, mean, var])
    x = np.tile(np.arange(c, dtype=np.float32) + 2, (3, 1))
    y = layer(x)
    np.testing.assert_allclose(y, 2.0 * 2 / np.sqrt(4.0 + 1e-3) + 0.5, rtol=1e-6)
    for got, want in zip(layer.get_weights(), [gamma, beta, mean, var]):
        np.testing.assert_array_equal(got, want)


def test_initializers_by_name_number_and_callable(make):
    layer = make(gamma_initializer="one", beta_initializer=0.25, moving_mean_initializer="random_uniform",
                 moving_variance_initializer=lambda shape, dtype=None: np.full(shape, 3.0, dtype), seed=0)
    layer.build((None, 5))
    gamma, beta, mm, mv = layer.get_weights()
    np.testing.assert_array_equal(gamma, 1.0)
    np.testing.assert_array_equal(beta, 0.25)
    assert np.all(np.abs(mm) <= 0.05) and np.any(mm != 0)
    np.testing.assert_array_equal(mv, 3.0)
    assert all(w.dtype == np.float32 and w.shape == (5,) for w in layer.get_weights())


def test_weights_follow_center_and_scale_and_feature_shape(make):
    assert make(center=False).weight_names == ["gamma", "moving_mean", "moving_variance"]
    assert make(scale=False, center=False).weight_names == ["moving_mean", "moving_variance"]
    layer = make(axis=(1, 2))
    layer.build((None, 2, 3, 4))
    assert [w.shape for w in layer.get_weights()] == [(6,)] * 4
    layer.set_weights([np.full((2, 3), 2.0)] * 4)  # the feature shape works too
    np.testing.assert_array_equal(layer.gamma, 2.0)
    again = bngen.BatchNormalization(**layer.get_config())
    assert again.get_config() == layer.get_config()


def test_mode2_uses_batch_statistics_in_inference_too(make):
    layer = make(mode=2, dtype="float64")
    x = np.random.default_rng(2).standard_normal((5, 3)) + 4
    y_train, y_infer = layer(x, training=True), layer(x, training=False)
    np.testing.assert_allclose(y_infer, y_train)
    np.testing.assert_allclose(y_infer.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_array_equal(layer.moving_mean, 0)  # Keras 1.2's mode 2 updates nothing
    assert layer.backward(np.ones_like(x)).shape == x.shape


# -- bad input ------------------------------------------------------------------------------
def test_bad_construction_names_the_argument(make):
    with pytest.raises(bngen.SpecError, match="momentum"):
        make(momentum=1.5)
    with pytest.raises(bngen.SpecError, match="axis"):
        make(axis="channels")
    with pytest.raises(ValueError, match="gamma_initializer"):
        make(gamma_initializer="glorot_sideways")
    with pytest.raises(TypeError, match="weights"):
        make(weights=np.ones(4))
    with pytest.raises(ValueError, match="weights"):
        make(weights=[np.ones(4)] * 3)


def test_bad_calls_name_the_argument_and_touch_nothing(make):
    layer = make(axis=1)
    x = np.random.default_rng(4).standard_normal((3, 4, 2)).astype(np.float32)
    with pytest.raises(RuntimeError, match="backward"):
        layer.backward(np.ones_like(x))
    layer(x, training=True)
    weights, x_before = layer.get_weights(), x.copy()
    with pytest.raises(TypeError, match="training"):
        layer(x, training="yes")
    with pytest.raises(ValueError, match="x"):
        layer(x[:, :3], training=True)  # wrong feature size
    with pytest.raises(TypeError, match="x"):
        layer(np.array([["a", "b"]]), training=True)
    dy = np.ones((3, 4, 3), np.float32)
    with pytest.raises(ValueError, match="dy"):
        layer.backward(dy)
    with pytest.raises(ValueError, match="weights"):
        layer.set_weights([np.ones(4)] * 3 + [np.ones(5)])  # last one wrong: none may change
    with pytest.raises(ValueError, match="weights"):
        layer.set_weights([np.ones(4)] * 5)
    np.testing.assert_array_equal(x, x_before)
    for a, b in zip(weights, layer.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_unbiased_with_one_value_per_feature_names_x(make):
    layer = make(unbiased=True)
    with pytest.raises(ValueError, match="x"):
        layer(np.ones((1, 3), np.float32), training=True)
    assert layer(np.ones((2, 3), np.float32), training=True).shape == (2, 3)


def test_mode1_backward_through_the_layer(make):
    """After a mode-1 call, layer.backward(dy) gives the oracle's sample-wise gradients
    (with the extra epsilon of Keras 1.2) and sets dgamma and dbeta."""
    layer = make(mode=1, dtype="float64", epsilon=0.01)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 5)) * 2 + 1
    x[3] = 2.0  # a constant sample
    layer.build((None, 5))
    gamma, beta, mm, mv = layer.get_weights()
    layer.set_weights([rng.uniform(0.5, 2, 5), rng.standard_normal(5), mm, mv])
    for training in (True, False):  # mode 1 uses each sample's statistics either way
        y = layer(x, training=training)
        dy = rng.standard_normal(x.shape)
        dx = layer.backward(dy)
        g, b = layer.get_weights()[:2]
        spec = bngen.Spec((None, 5), mode=1, dtype="float64", epsilon=0.01)
        np.testing.assert_allclose(y, bngen.oracle.forward(spec, x, g, b).y, atol=1e-12)
        ref = bngen.oracle.backward(spec, dy, x, g)
        np.testing.assert_allclose(dx, ref.dx, atol=1e-12)
        np.testing.assert_allclose(layer.dgamma, ref.dgamma, atol=1e-12)
        np.testing.assert_allclose(layer.dbeta, ref.dbeta, atol=1e-12)
