"""Specs from the layer descriptions of other frameworks, so nobody translates by hand.

Each framework has its own conventions (README, "Conventions of the frameworks users
come from"): PyTorch's momentum is the weight of the NEW value and its running
variance is unbiased; Keras and ONNX keep the OLD value with weight momentum and feed
the biased variance (except tf.keras 2's fused path).  The constructors here turn a
layer (or a plain dict of its settings) into the `Spec` that computes what that
framework computes.

Everything is duck-typed: a `torch.nn.BatchNorm2d`, a Keras layer, an ONNX
``NodeProto`` or a plain mapping with the same names all work, and this module imports
none of those frameworks.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import numpy as np

from .core.spec import Spec, SpecError, check_renorm_clipping

# Keras mixed-precision policies: half storage and arithmetic in float32 with float32
# variables, which is what a bngen float16/bfloat16 spec does.
_KERAS_POLICIES = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _dtype_name(value: Any) -> Optional[str]:
    """'float32' from 'float32', np.float32, torch.float32 ('torch.float32'), a Keras policy."""
    if value is None:
        return None
    if isinstance(value, Mapping):  # a serialised Keras DTypePolicy
        return _dtype_name(_get(value.get("config", {}), "name"))
    name = getattr(value, "name", None) or getattr(value, "__name__", None)
    if not isinstance(name, str):
        name = str(value)
    name = name.replace("torch.", "")
    return {"half": "float16", "float": "float32", "double": "float64"}.get(name, _KERAS_POLICIES.get(name, name))


def _with_feature_size(shape: Sequence, axis: int, size: Optional[int], field: str) -> tuple:
    """`shape` with its feature dimension filled in from (or checked against) `size`."""
    dims = list(shape) if isinstance(shape, (list, tuple)) else None
    if dims is None:
        raise SpecError(f"shape: {shape!r} is not a sequence of sizes")
    if not -len(dims) <= axis < len(dims):
        raise SpecError(f"shape: {list(shape)} has no feature axis {axis}")
    if size is not None:
        if dims[axis] is None:
            dims[axis] = int(size)
        elif dims[axis] != size:
            raise SpecError(f"{field}: {size} does not match the feature size {dims[axis]} of shape {list(shape)}")
    return tuple(dims)


# The packages whose objects are real layers: these must be batch norms by class, not
# merely look like one (a torch InstanceNorm2d has every attribute a BatchNorm2d has).
_FRAMEWORK_PACKAGES = ("torch", "keras", "tensorflow", "tf_keras")


def _framework_object(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] in _FRAMEWORK_PACKAGES


def _class_names(obj: Any) -> list:
    return [c.__name__ for c in type(obj).__mro__]


def _check_keys(kwargs: Mapping, known: Sequence[str], what: str) -> None:
    unknown = sorted(map(str, set(kwargs) - set(known)))
    if unknown:
        raise SpecError(f"{what}: unknown setting(s) {', '.join(map(str, unknown))}; known: {', '.join(known)}")


# -- PyTorch ------------------------------------------------------------------------------
_TORCH_KEYS = ("num_features", "eps", "momentum", "affine", "track_running_stats", "training", "dtype", "device")


def from_torch(module_or_kwargs: Any, shape: Sequence, *, axis: int = 1, training: Optional[bool] = None,
               dtype: Any = None, activation: Optional[str] = None) -> Spec:
    """The spec of a PyTorch ``BatchNorm1d/2d/3d`` (or a dict of its constructor arguments).

    Reads ``num_features``, ``eps`` (1e-5), ``momentum`` (0.1), ``affine`` (True),
    ``track_running_stats`` (True), ``training`` (a module's mode; True for a dict)
    and the dtype of the module's weight or running mean (or ``dtype``).

    * PyTorch's momentum weighs the new value: the spec keeps ``1 - momentum``; the
      running variance is unbiased (``unbiased=True``).
    * ``affine=False``: no gamma and no beta (``scale=center=False``).
    * ``track_running_stats=False``: batch statistics in training and eval alike and no
      running statistics, which is bngen's mode 2.
    * ``momentum=None`` (cumulative moving average): the keep factor changes every call
      (``1 - 1/num_batches_tracked``), so it cannot be compiled in.  The spec gets
      ``momentum=0.0``, right for the first batch only: do not pass running statistics
      to its kernel, but update them after each training forward with
      `cumulative_update` -- or use ``bngen.BatchNormalization(momentum=None)``, which
      does exactly that.

    `shape` is the input shape with ``None`` for dynamic sizes; its feature dimension may
    be None (num_features fills it in).  PyTorch's feature axis is 1; for a
    channels-last array (NHWC, what ``x.permute(0, 2, 3, 1).numpy()`` gives for a
    ``torch.channels_last`` tensor) pass the shape in that order and ``axis=-1``.
    """
    src = module_or_kwargs
    if isinstance(src, Mapping):
        _check_keys(src, _TORCH_KEYS, "torch")
    elif (_framework_object(src) and "_BatchNorm" not in _class_names(src)) or not hasattr(src, "num_features"):
        # LayerNorm, GroupNorm and InstanceNorm normalise over other axes: their kernels would differ
        raise SpecError(f"torch: {type(src).__name__} is not a BatchNorm module (BatchNorm1d/2d/3d, SyncBatchNorm) "
                        "nor a mapping of its arguments")
    momentum = _get(src, "momentum", 0.1)
    track = _get(src, "track_running_stats", True)
    affine = _get(src, "affine", True)
    if training is None:
        training = _get(src, "training", True)
    if momentum is not None and not (isinstance(momentum, numbers.Real) and 0 <= momentum <= 1):
        raise SpecError(f"momentum: {momentum!r} must be None or a number in [0, 1] (PyTorch: weight of the new value)")
    if dtype is None:
        weight = _get(src, "weight") if affine else None
        dtype = getattr(weight, "dtype", None) or getattr(_get(src, "running_mean"), "dtype", None) or _get(src, "dtype")
    shape = _with_feature_size(shape, axis, _get(src, "num_features"), "num_features")
    return Spec(
        shape=shape,
        axis=axis,
        dtype=_dtype_name(dtype) or "float32",
        training=bool(training) if track else True,
        mode=0 if track else 2,
        epsilon=_get(src, "eps", 1e-5),
        momentum=0.0 if momentum is None or not track else 1.0 - float(momentum),
        center=bool(affine),
        scale=bool(affine),
        unbiased=bool(track),
        activation=activation,
    )


def cumulative_update(moving_mean: np.ndarray, moving_variance: np.ndarray, mean: np.ndarray,
                      variance: np.ndarray, num_batches_tracked: int, n: int, unbiased: bool = True) -> None:
    """PyTorch's ``momentum=None``: running statistics that average every batch so far.

    Call after each training forward (whose kernel was given no running statistics)
    with the batch `mean` and biased `variance` it returned, `n` values per feature, and
    `num_batches_tracked` counting this batch (1 on the first).  Updates in place, as
    PyTorch does: ``f = 1 / num_batches_tracked``,
    ``running = (1 - f) * running + f * batch``, the variance fed as ``var * n / (n-1)``
    when `unbiased`.
    """
    if isinstance(num_batches_tracked, bool) or not isinstance(num_batches_tracked, numbers.Integral) or num_batches_tracked < 1:
        raise ValueError(f"num_batches_tracked: {num_batches_tracked!r} must be an int >= 1 (count this batch)")
    if unbiased and n < 2:
        raise ValueError(f"n: {n} value(s) per feature; the unbiased variance n/(n-1) needs at least 2")
    for name, arr in (("moving_mean", moving_mean), ("moving_variance", moving_variance)):
        if not isinstance(arr, np.ndarray) or not arr.flags.writeable:
            raise TypeError(f"{name}: expected a writable numpy.ndarray")
    f = 1.0 / num_batches_tracked
    fed = np.asarray(variance, np.float64) * (n / (n - 1) if unbiased else 1.0)
    moving_mean[...] = (1.0 - f) * moving_mean.astype(np.float64) + f * np.asarray(mean, np.float64)
    moving_variance[...] = (1.0 - f) * moving_variance.astype(np.float64) + f * fed


# -- Keras ------------------------------------------------------------------------------------
# The settings of Keras 1, tf.keras 2 and Keras 3 BatchNormalization configs, and those every
# layer has.  Anything else (Dense's units, LayerNormalization's rms_scaling) is another layer.
_KERAS_KEYS = (
    "axis", "momentum", "epsilon", "center", "scale", "beta_initializer", "gamma_initializer",
    "moving_mean_initializer", "moving_variance_initializer", "beta_regularizer", "gamma_regularizer",
    "beta_constraint", "gamma_constraint", "renorm", "renorm_clipping", "renorm_momentum", "fused",
    "virtual_batch_size", "adjustment", "synchronized", "mode",
    "name", "trainable", "dtype", "batch_input_shape", "batch_shape", "input_shape", "input_dtype", "weights",
)


def from_keras(config_or_layer: Any, shape: Sequence, *, training: bool = True, dtype: Any = None,
               activation: Optional[str] = None, unbiased: Optional[bool] = None) -> Spec:
    """The spec of a Keras ``BatchNormalization`` layer, or of its ``get_config()`` dict.

    Understands Keras 3, tf.keras 2 and Keras 1 configs: ``axis``, ``momentum`` and
    ``epsilon`` (both Keras conventions already), ``center``, ``scale``, ``dtype`` (a
    name or a DTypePolicy; ``mixed_float16`` / ``mixed_bfloat16`` give half specs) and
    Keras 1's ``mode``.  ``trainable=False`` means inference, as in Keras 2.1+.

    The moving variance is fed the biased batch variance, except on tf.keras 2's fused
    path (a config with ``fused`` not False, 4-D or 5-D input, feature axis 1 or last),
    which feeds the unbiased one; `unbiased` overrides.

    Statistics variants: ``renorm`` and ``renorm_momentum`` (Keras 3, tf.keras),
    ``virtual_batch_size`` (tf.keras) become spec fields; ``renorm_clipping`` is checked
    (it is a call-time argument, not part of the spec: pass it to the layer or the
    kernel); a layer's ``adjustment`` callable (never in a config) sets
    ``adjustment=True``.  tf.keras' fused path is never taken with these, so they feed
    the biased variance.
    ``synchronized=True`` is accepted: on one device it is the same computation.
    """
    config = config_or_layer
    if not isinstance(config, Mapping):
        get_config = getattr(config, "get_config", None)
        if get_config is None:
            raise SpecError(f"keras: {type(config).__name__} is neither a layer with get_config() nor a config dict")
        if _framework_object(config) and not any(n.endswith("BatchNormalization") for n in _class_names(config)):
            raise SpecError(f"keras: {type(config).__name__} is not a BatchNormalization layer")
        config = get_config()
        if not isinstance(config, Mapping):
            raise SpecError(f"keras: get_config() of {type(config_or_layer).__name__} returned a "
                            f"{type(config).__name__}, not a config dict")
    _check_keys(config, _KERAS_KEYS, "keras: not a BatchNormalization config")
    renorm = config.get("renorm", False)
    if renorm:
        check_renorm_clipping(config.get("renorm_clipping"))
    adjustment = config.get("adjustment") is not None or getattr(config_or_layer, "adjustment", None) is not None
    variants = dict(renorm=renorm, renorm_momentum=config.get("renorm_momentum", 0.99),
                    virtual_batch_size=config.get("virtual_batch_size"), adjustment=adjustment)
    axis = config.get("axis", -1)
    if isinstance(axis, list):
        axis = tuple(axis)
    if config.get("trainable") is False:
        training = False
    if unbiased is None:
        unbiased = _tf2_fused(config, shape, axis) and not (renorm or adjustment or variants["virtual_batch_size"])
    return Spec(
        shape=tuple(shape) if isinstance(shape, (list, tuple)) else shape,
        axis=axis,
        dtype=_dtype_name(dtype if dtype is not None else config.get("dtype")) or "float32",
        training=training,
        mode=config.get("mode", 0),
        epsilon=config.get("epsilon", 1e-3),
        momentum=config.get("momentum", 0.99),
        center=config.get("center", True),
        scale=config.get("scale", True),
        unbiased=unbiased,
        activation=activation,
        **variants,
    )


def _tf2_fused(config: Mapping, shape: Sequence, axis: Any) -> bool:
    """tf.keras 2's fused kernel (used when it can be) feeds the unbiased variance."""
    if "fused" not in config or config["fused"] is False:  # only tf.keras 2 configs have `fused`
        return False
    try:
        ndim = len(shape)
    except TypeError:
        return False
    axes = axis if isinstance(axis, tuple) else (axis,)
    if ndim not in (4, 5) or len(axes) != 1 or not isinstance(axes[0], numbers.Integral):
        return False
    return axes[0] % ndim in (1, ndim - 1)


# -- ONNX ---------------------------------------------------------------------------------------
_ONNX_FLOAT, _ONNX_INT = 1, 2  # AttributeProto.FLOAT / .INT


def _onnx_attributes(node: Any) -> dict:
    if isinstance(node, Mapping):
        return dict(node)
    op_type = getattr(node, "op_type", None)
    if op_type is not None and op_type != "BatchNormalization":
        raise SpecError(f"onnx: node {getattr(node, 'name', '')!r} is a {op_type}, not a BatchNormalization")
    attrs = getattr(node, "attribute", None)
    if attrs is None:
        raise SpecError(f"onnx: {type(node).__name__} is neither a NodeProto nor a mapping of attributes")
    out = {}
    for attr in attrs:
        kind = getattr(attr, "type", None)
        if kind == _ONNX_FLOAT:
            out[attr.name] = attr.f
        elif kind == _ONNX_INT:
            out[attr.name] = attr.i
        else:  # an attribute of a kind BatchNormalization does not define; keep it for the error below
            out[attr.name] = attr
    return out


def from_onnx(node_or_attrs: Any, shape: Sequence, *, dtype: Any = "float32", activation: Optional[str] = None) -> Spec:
    """The spec of an ONNX ``BatchNormalization`` node (a NodeProto, or a dict of its attributes).

    Attributes: ``epsilon`` (1e-5), ``momentum`` (0.9, weight of the old value, as in
    Keras), ``training_mode`` (opset 14+, 0 = inference with the input mean and var),
    and from older opsets ``is_test`` and ``spatial`` (0: statistics per (C, D1, ...)
    element, over the batch only).  ONNX is channels-first: the feature axis is 1.  The
    running variance is fed the biased batch variance.
    """
    attrs = _onnx_attributes(node_or_attrs)
    known = ("epsilon", "momentum", "training_mode", "spatial", "is_test", "consumed_inputs")
    _check_keys(attrs, known, "onnx")
    try:
        ndim = len(shape)
    except TypeError:
        raise SpecError(f"shape: {shape!r} is not a sequence of sizes") from None
    if ndim < 2:
        raise SpecError(f"shape: {list(shape)}; ONNX BatchNormalization inputs are (N, C, ...)")
    training = bool(attrs.get("training_mode", 0)) or attrs.get("is_test", 1) == 0
    axis = 1 if attrs.get("spatial", 1) else tuple(range(1, ndim))
    return Spec(
        shape=tuple(shape),
        axis=axis,
        dtype=_dtype_name(dtype) or "float32",
        training=training,
        mode=0,
        epsilon=attrs.get("epsilon", 1e-5),
        momentum=attrs.get("momentum", 0.9),
        activation=activation,
    )
