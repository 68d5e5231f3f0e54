"""Batch renormalization: parity with keras.layers.BatchNormalization(renorm=True) (Keras 3,
KERAS_BACKEND=torch unless set).  Skipped when keras is not installed (CI has it).

The bngen layer starts from the Keras layer's seven weights; both see four training
calls (clipping tightened between steps, as papers ramp it) and one inference call:
outputs and all seven weights must agree after every step; then dx, dgamma and dbeta
against torch autograd through the Keras layer.  Configurations: 3 (NHWC with clipping,
NCHW without, 2-D without gamma); specs compiled: 6 (training and inference each).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

import bngen  # noqa: E402

# (input shape, axis, center, scale, clipping per step)
CONFIGS = [
    ((8, 5, 6, 3), -1, True, True, [{"rmax": 3.0, "rmin": 1 / 3, "dmax": 5.0}, {"rmax": 1.2, "rmin": 0.9, "dmax": 0.1},
                                    {"rmax": 1.1}, {"dmax": 0.0}]),
    ((4, 3, 5, 6), 1, True, True, [None] * 4),
    ((16, 7), -1, True, False, [{"rmin": 0.95, "dmax": 0.2}] * 4),
]


def _ids(cfg):
    shape, axis, center, scale, _ = cfg
    return f"{len(shape)}d-axis{axis}-{'c' if center else ''}{'s' if scale else ''}"


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_renorm_layer_matches_keras(cfg, session_cache, strict_compiler):
    shape, axis, center, scale, clips = cfg
    rtol = 1e-5
    rng = np.random.default_rng(sum(shape))
    theirs = keras.layers.BatchNormalization(axis=axis, center=center, scale=scale, momentum=0.8, renorm=True,
                                             renorm_momentum=0.6, renorm_clipping=clips[0])
    theirs.build(shape)
    c = shape[axis]
    names = (["gamma"] if scale else []) + (["beta"] if center else []) + [
        "moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev"]
    assert [w.name for w in theirs.weights] == names  # Keras 3's order, which bngen follows
    start = [(rng.random(c) + 0.5).astype("float32") if "std" in n or "variance" in n or n == "gamma"
             else rng.standard_normal(c).astype("float32") for n in names]
    theirs.set_weights(start)
    ours = bngen.BatchNormalization(axis=axis, center=center, scale=scale, momentum=0.8, renorm=True,
                                    renorm_momentum=0.6, renorm_clipping=clips[0], weights=start,
                                    cache_dir=session_cache, compiler=strict_compiler)
    assert ours.weight_names == names

    def close(a, b, what):
        b = keras.ops.convert_to_numpy(b)
        np.testing.assert_allclose(a, b, rtol=0, atol=rtol * (np.abs(b).max() + 1), err_msg=what)

    for step, clip in enumerate(clips):
        theirs.renorm_clipping = clip or {}
        ours.renorm_clipping = clip
        x = (rng.standard_normal(shape) * (step + 1) + step).astype("float32")
        close(ours(x, training=True), theirs(x, training=True), f"training output, step {step}")
        for a, b, name in zip(ours.get_weights(), theirs.get_weights(), names):
            close(a, b, f"{name} after training step {step}")
    close(ours(x, training=False), theirs(x, training=False), "inference output")

    if keras.backend.backend() == "torch":  # gradients through torch autograd, r and d held constant
        import torch

        weights = ours.get_weights()
        theirs.set_weights(weights)
        dy = rng.standard_normal(shape).astype("float32")
        x_t = torch.tensor(x, requires_grad=True)
        y_t = theirs(x_t, training=True)
        (y_t * torch.tensor(dy)).sum().backward()
        y = ours(x, training=True)
        close(y, y_t.detach(), "training output of the gradient step")
        dx = ours.backward(dy)
        r = 1 / np.sqrt(x.astype(np.float64).var(axis=tuple(a for a in range(len(shape)) if a != axis % len(shape))) + 1e-3)
        g = np.abs(weights[0]).max() * 3 if scale else 3.0  # |gamma * r_renorm|, r at most ~3 here
        np.testing.assert_allclose(dx, x_t.grad.numpy(), rtol=0, atol=10 * rtol * g * r.max() * np.abs(dy).max())
        if scale:
            close(ours.dgamma, theirs.gamma.value.grad, "dgamma")
        if center:
            close(ours.dbeta, theirs.beta.value.grad, "dbeta")


def test_from_keras_renorm_config_builds_a_matching_spec():
    layer = keras.layers.BatchNormalization(renorm=True, renorm_momentum=0.7, renorm_clipping={"rmax": 2.0})
    spec = bngen.Spec.from_keras(layer.get_config(), (None, 4))
    assert spec.renorm and spec.renorm_momentum == 0.7 and not spec.unbiased
