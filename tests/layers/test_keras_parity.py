"""Parity with keras.layers.BatchNormalization (Keras 3, KERAS_BACKEND=torch unless set).
Skipped when keras (or its backend) is not installed.

For each configuration the bngen layer starts from the Keras layer's weights, and both
see the same three training calls and one inference call: outputs and moving statistics
must agree; gradients (Keras through torch autograd) against the bngen layer's
backward; and kernels built by `Spec.from_keras` from the layer and from its config
match it.  Configurations: 4 (NHWC, NCHW, 2-D float64, 3-D; center and scale on and
off).  Specs compiled: 10 (training and inference per configuration, and 2 from_keras
inference specs).  Examples: 5 calls per configuration.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
# Keras' torch backend hands NumPy 2 an __array__ without `copy`; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

import bngen  # noqa: E402

# (input shape, axis, center, scale, dtype)
CONFIGS = [
    ((8, 5, 6, 3), -1, True, True, "float32"),
    ((4, 3, 5, 6), 1, False, True, "float32"),
    ((16, 7), -1, True, False, "float64"),
    ((6, 4, 5), 1, False, False, "float32"),
]


def _ids(cfg):
    shape, axis, center, scale, dtype = cfg
    return f"{len(shape)}d-axis{axis}-{'c' if center else ''}{'s' if scale else ''}-{dtype}"


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_layer_matches_keras(cfg, session_cache, strict_compiler):
    shape, axis, center, scale, dtype = cfg
    # float32 tolerance even for float64: Keras 3.15's BatchNormalization computes in
    # backend.result_type(dtype, "float32"), which is float32 for float64 inputs.
    rtol = 1e-5
    rng = np.random.default_rng(sum(shape))
    theirs = keras.layers.BatchNormalization(axis=axis, center=center, scale=scale, momentum=0.8, dtype=dtype)
    theirs.build(shape)
    c = shape[axis]
    # Non-trivial starting weights, the same on both sides.
    start = [rng.standard_normal(c).astype(dtype) if i < len(theirs.get_weights()) - 1 else (rng.random(c) + 0.5).astype(dtype)
             for i in range(len(theirs.get_weights()))]
    theirs.set_weights(start)
    ours = bngen.BatchNormalization(axis=axis, center=center, scale=scale, momentum=0.8, dtype=dtype,
                                    weights=start, cache_dir=session_cache, compiler=strict_compiler)

    def close(a, b, what):
        b = keras.ops.convert_to_numpy(b)
        np.testing.assert_allclose(a, b, rtol=0, atol=rtol * (np.abs(b).max() + 1), err_msg=what)

    for step in range(3):
        x = (rng.standard_normal(shape) * (step + 1) + step).astype(dtype)
        close(ours(x, training=True), theirs(x, training=True), f"training output, step {step}")
        for a, b, name in zip(ours.get_weights(), theirs.get_weights(), ours.weight_names):
            close(a, b, f"{name} after training step {step}")
    close(ours(x, training=False), theirs(x, training=False), "inference output")

    if keras.backend.backend() == "torch":  # gradients through torch autograd
        import torch

        dy = rng.standard_normal(shape).astype(dtype)
        x_t = torch.tensor(x, requires_grad=True)
        y_t = theirs(x_t, training=True)
        (y_t * torch.tensor(dy)).sum().backward()
        ours(x, training=True)
        dx = ours.backward(dy)
        r = 1 / np.sqrt(x.astype(np.float64).var(axis=tuple(a for a in range(len(shape)) if a != axis % len(shape))) + 1e-3)
        g = np.abs(start[0]).max() if scale else 1.0
        np.testing.assert_allclose(dx, x_t.grad.numpy(), rtol=0, atol=10 * rtol * g * r.max() * np.abs(dy).max())
        if scale:
            close(ours.dgamma, theirs.gamma.value.grad, "dgamma")
        if center:
            close(ours.dbeta, theirs.beta.value.grad, "dbeta")


@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=_ids)
def test_from_keras_kernels_match_keras(cfg, build):
    shape, axis, center, scale, dtype = cfg
    rng = np.random.default_rng(5)
    layer = keras.layers.BatchNormalization(axis=axis, center=center, scale=scale, epsilon=1e-2, momentum=0.7, dtype=dtype)
    layer.build(shape)
    weights = [w + rng.random(w.shape).astype(dtype) for w in layer.get_weights()]
    layer.set_weights(weights)
    dyn = (None,) + shape[1:]
    for source in (layer, layer.get_config()):
        spec = bngen.Spec.from_keras(source, dyn)
        assert (spec.epsilon, spec.momentum, spec.center, spec.scale, spec.dtype) == (1e-2, 0.7, center, scale, dtype)
        infer = build(bngen.Spec.from_keras(source, dyn, training=False))
        x = rng.standard_normal(shape).astype(dtype)
        params = dict(zip(["gamma"] * scale + ["beta"] * center + ["moving_mean", "moving_variance"], weights))
        y = infer(x, params.get("gamma"), params.get("beta"), params["moving_mean"], params["moving_variance"])
        np.testing.assert_allclose(y, keras.ops.convert_to_numpy(layer(x, training=False)), rtol=1e-5, atol=1e-5)
