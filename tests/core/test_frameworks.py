"""Spec.from_torch / from_keras / from_onnx on plain values and duck-typed objects (no
framework needed), frameworks.cumulative_update, and, when onnx is installed, parity of
a from_onnx kernel with ONNX's reference evaluator in training mode.

Specs compiled: 1 (the ONNX parity test); the rest builds specs only.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import bngen
from bngen import frameworks
from bngen.core.spec import SpecError


# -- PyTorch ------------------------------------------------------------------------------------
def test_from_torch_translates_momentum_and_variance():
    spec = bngen.Spec.from_torch({"num_features": 4, "eps": 1e-5, "momentum": 0.1}, (None, None, 8, 8))
    assert spec.shape == (None, 4, 8, 8) and spec.axis == (1,)
    assert spec.momentum == pytest.approx(0.9) and spec.epsilon == 1e-5 and spec.unbiased
    assert spec.training and spec.mode == 0 and spec.center and spec.scale and spec.dtype == "float32"


def test_from_torch_duck_typed_module():
    module = SimpleNamespace(num_features=3, eps=1e-3, momentum=0.2, affine=False, track_running_stats=False,
                             training=False, weight=None, running_mean=None)
    spec = bngen.Spec.from_torch(module, (None, 3))
    assert spec.mode == 2 and spec.uses_batch_stats and not spec.center and not spec.scale
    evaluating = SimpleNamespace(num_features=3, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                                 training=False, weight=SimpleNamespace(dtype="torch.float64"))
    spec = bngen.Spec.from_torch(evaluating, (None, 3))
    assert spec.training is False and spec.mode == 0 and spec.dtype == "float64"


def test_from_torch_channels_last_and_cumulative_momentum():
    spec = bngen.Spec.from_torch({"num_features": 5, "momentum": None}, (None, 7, 7, None), axis=-1)
    assert spec.shape == (None, 7, 7, 5) and spec.axis == (3,) and spec.momentum == 0.0


@pytest.mark.parametrize("kwargs,shape,field", [
    ({"num_features": 4}, (None, 5, 2), "num_features"),
    ({"num_features": 4, "eps_typo": 1}, (None, 4), "eps_typo"),
    ({"num_features": 4, "momentum": 2.0}, (None, 4), "momentum"),
    ({"num_features": 4, "eps": 0.0}, (None, 4), "epsilon"),
])
def test_from_torch_errors_name_the_field(kwargs, shape, field):
    with pytest.raises(SpecError, match=field):
        bngen.Spec.from_torch(kwargs, shape)


def test_cumulative_update_is_the_running_average():
    rng = np.random.default_rng(0)
    mm, mv = np.zeros(3), np.ones(3)
    means, variances = [], []
    for k in range(1, 5):
        mean, var = rng.standard_normal(3), rng.random(3)
        frameworks.cumulative_update(mm, mv, mean, var, k, n=10)
        means.append(mean)
        variances.append(var * 10 / 9)
    np.testing.assert_allclose(mm, np.mean(means, axis=0))
    np.testing.assert_allclose(mv, np.mean(variances, axis=0))
    with pytest.raises(ValueError, match="num_batches_tracked"):
        frameworks.cumulative_update(mm, mv, mean, var, 0, n=10)
    with pytest.raises(ValueError, match="n"):
        frameworks.cumulative_update(mm, mv, mean, var, 1, n=1)


# -- Keras ---------------------------------------------------------------------------------------
def test_from_keras3_config_with_policy_and_axis_list():
    config = {"name": "bn", "trainable": True, "axis": [3], "momentum": 0.9, "epsilon": 1e-4, "center": False,
              "scale": True, "synchronized": False, "renorm": False, "renorm_clipping": None,
              "dtype": {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "mixed_float16"}}}
    spec = bngen.Spec.from_keras(config, (None, 8, 8, 16))
    assert spec.axis == (3,) and spec.momentum == 0.9 and spec.epsilon == 1e-4
    assert spec.dtype == "float16" and not spec.center and not spec.unbiased and spec.training
    frozen = bngen.Spec.from_keras(dict(config, trainable=False), (None, 8, 8, 16))
    assert frozen.training is False


def test_from_keras1_config_keeps_the_mode():
    spec = bngen.Spec.from_keras({"mode": 2, "axis": 1, "momentum": 0.9, "epsilon": 1e-6}, (None, 3, 4))
    assert spec.mode == 2 and spec.axis == (1,) and spec.momentum == 0.9


def test_from_keras_layer_object_and_tf2_fused_variance():
    layer = SimpleNamespace(get_config=lambda: {"axis": -1, "momentum": 0.99, "epsilon": 1e-3, "fused": None})
    assert bngen.Spec.from_keras(layer, (None, 4, 4, 8)).unbiased  # tf.keras 2 fused path: unbiased
    assert not bngen.Spec.from_keras(layer, (None, 8)).unbiased  # 2-D: the non-fused path, biased
    assert not bngen.Spec.from_keras({"axis": -1, "fused": False}, (None, 4, 4, 8)).unbiased
    assert not bngen.Spec.from_keras({"axis": 2, "fused": None}, (None, 4, 4, 8)).unbiased


def test_from_keras_reads_the_statistics_variants():
    keras3 = {"axis": -1, "renorm": True, "renorm_clipping": {"rmax": 3.0, "dmax": 5.0}, "renorm_momentum": 0.9}
    spec = bngen.Spec.from_keras(keras3, (None, 4))
    assert spec.renorm and spec.renorm_momentum == 0.9 and spec.virtual_batch_size is None and not spec.adjustment
    tf2 = {"axis": -1, "fused": None, "virtual_batch_size": 4, "renorm": False, "renorm_clipping": None}
    ghost = bngen.Spec.from_keras(tf2, (None, 4, 4, 8))
    assert ghost.virtual_batch_size == 4 and not ghost.unbiased  # tf.keras takes the non-fused path then
    layer = SimpleNamespace(get_config=lambda: {"axis": -1}, adjustment=lambda shape: (1.0, 0.0))
    assert bngen.Spec.from_keras(layer, (None, 4)).adjustment


@pytest.mark.parametrize("config,field", [
    ({"renorm": True, "renorm_clipping": {"rmax": 1.0, "rmin": 2.0}}, "renorm_clipping"),
    ({"renorm": True, "renorm_clipping": {"dmax": -1.0}}, "renorm_clipping"),
    ({"renorm": True, "renorm_clipping": {"rmean": 1.0}}, "renorm_clipping"),
    ({"renorm": True, "renorm_momentum": 1.5}, "renorm_momentum"),
    ({"virtual_batch_size": 0}, "virtual_batch_size"),
    ({"renorm": True, "virtual_batch_size": 2}, "virtual_batch_size"),
])
def test_from_keras_rejects_bad_variants(config, field):
    with pytest.raises(SpecError, match=field):
        bngen.Spec.from_keras(config, (None, 4))


def test_from_keras_rejects_other_objects():
    with pytest.raises(SpecError, match="keras"):
        bngen.Spec.from_keras(42, (None, 4))


# -- ONNX ----------------------------------------------------------------------------------------
def _attr(name, kind, value):
    return SimpleNamespace(name=name, type=kind, f=value if kind == 1 else 0.0, i=value if kind == 2 else 0)


def test_from_onnx_node_and_dict():
    node = SimpleNamespace(op_type="BatchNormalization", name="bn0",
                           attribute=[_attr("epsilon", 1, 1e-4), _attr("momentum", 1, 0.8), _attr("training_mode", 2, 1)])
    spec = bngen.Spec.from_onnx(node, (None, 3, 5, 5))
    assert spec.training and spec.axis == (1,) and spec.epsilon == 1e-4 and spec.momentum == 0.8
    assert not spec.unbiased
    spec = bngen.Spec.from_onnx({}, (None, 3, 5, 5))
    assert not spec.training and spec.epsilon == 1e-5 and spec.momentum == 0.9
    spec = bngen.Spec.from_onnx({"spatial": 0, "is_test": 0}, (None, 3, 5, 5))
    assert spec.axis == (1, 2, 3) and spec.training


def test_from_onnx_errors():
    with pytest.raises(SpecError, match="Conv"):
        bngen.Spec.from_onnx(SimpleNamespace(op_type="Conv", name="c", attribute=[]), (None, 3, 4))
    with pytest.raises(SpecError, match="axes"):
        bngen.Spec.from_onnx({"axes": 1}, (None, 3, 4))


def test_from_onnx_matches_the_onnx_reference_in_training(build):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    node = helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y", "running_mean", "running_var"],
                            epsilon=1e-4, momentum=0.7, training_mode=1)
    shape = [4, 3, 5]
    graph = helper.make_graph(
        [node], "bn",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in
         [("x", shape), ("scale", [3]), ("bias", [3]), ("mean", [3]), ("var", [3])]],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "running_mean", "running_var")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal(shape).astype(np.float32), "scale": rng.random(3).astype(np.float32) + 0.5,
             "bias": rng.standard_normal(3).astype(np.float32), "mean": rng.standard_normal(3).astype(np.float32),
             "var": rng.random(3).astype(np.float32) + 0.5}
    y_ref, mean_ref, var_ref = ReferenceEvaluator(model).run(None, feeds)
    kernel = build(bngen.Spec.from_onnx(node, (None, 3, 5)))
    mm, mv = feeds["mean"].copy(), feeds["var"].copy()
    y = kernel(feeds["x"], feeds["scale"], feeds["bias"], mm, mv)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mm, mean_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mv, var_ref, rtol=1e-5, atol=1e-6)
    assert onnx is not None
