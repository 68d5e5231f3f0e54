"""The layer description: a frozen, validated, canonical `Spec`.

A `Spec` holds the compile-time parameters of a batch-normalization kernel.  It is
validated once, here, and put in canonical form (feature axes positive and sorted), so
that equal layers compare and hash equal and nothing downstream validates again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from typing import Any, Mapping, Optional, Tuple

DTYPES = ("float32", "float64", "float16", "bfloat16")
MODES = (0, 1, 2)
ACTIVATIONS = (None, "relu")


class SpecError(ValueError):
    """An invalid layer description; the message names the field and the value."""


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _canonical_dtype(value: Any) -> str:
    name = getattr(value, "name", None) or getattr(value, "__name__", None) or value
    if isinstance(name, str) and name in DTYPES:
        return name
    raise SpecError(f"dtype: {value!r} is not supported; use one of {', '.join(DTYPES)}")


def _canonical_shape(value: Any) -> Tuple[Optional[int], ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise SpecError(f"shape: {value!r} is not a sequence of sizes")
    dims = tuple(value)
    if not dims:
        raise SpecError("shape: () has no dimensions; batch norm needs at least one axis")
    for i, dim in enumerate(dims):
        if dim is None:
            continue
        if not _is_int(dim):
            raise SpecError(f"shape: dimension {i} is {dim!r}; sizes must be ints or None")
        if dim < 1:
            raise SpecError(f"shape: dimension {i} is {dim}; sizes must be >= 1")
    return tuple(None if d is None else int(d) for d in dims)


def _canonical_axis(value: Any, shape: Tuple[Optional[int], ...]) -> Tuple[int, ...]:
    ndim = len(shape)
    axes = (value,) if _is_int(value) else value
    if isinstance(axes, (str, bytes)) or not hasattr(axes, "__iter__"):
        raise SpecError(f"axis: {value!r} is not an int or a tuple of ints")
    axes = tuple(axes)
    if not axes:
        raise SpecError("axis: () names no feature axis")
    result = []
    for a in axes:
        if not _is_int(a):
            raise SpecError(f"axis: {value!r} holds {a!r}, which is not an int")
        if not -ndim <= a < ndim:
            raise SpecError(f"axis: {a} is out of range for a {ndim}-D shape {list(shape)}")
        result.append(int(a) % ndim)
    result.sort()
    if len(set(result)) != len(result):
        raise SpecError(f"axis: {value!r} names the same axis twice")
    if result != list(range(result[0], result[0] + len(result))):
        raise SpecError(f"axis: {value!r} is not a run of adjacent axes")
    for a in result:
        if shape[a] is None:
            raise SpecError(
                f"axis: feature axis {a} has an unknown size (None) in shape {list(shape)}; "
                "the number of features must be known when the kernel is built"
            )
    return tuple(result)


@dataclasses.dataclass(frozen=True)
class Spec:
    """A batch-normalization layer, as a kernel is compiled for it.

    Defaults are the Keras ones.  ``axis`` is canonicalised to a sorted tuple of
    non-negative axes; ``shape`` to a tuple where ``None`` marks a size known only at
    call time.  Raises `SpecError` naming the field and the value on any invalid input.
    """

    shape: Tuple[Optional[int], ...]
    axis: Any = -1
    dtype: str = "float32"
    training: bool = True
    mode: int = 0
    epsilon: float = 1e-3
    momentum: float = 0.99
    center: bool = True
    scale: bool = True
    unbiased: bool = False
    activation: Optional[str] = None

    def __post_init__(self) -> None:
        shape = _canonical_shape(self.shape)
        put = lambda name, v: object.__setattr__(self, name, v)  # noqa: E731
        put("shape", shape)
        put("axis", _canonical_axis(self.axis, shape))
        put("dtype", _canonical_dtype(self.dtype))
        for flag in ("training", "center", "scale", "unbiased"):
            v = getattr(self, flag)
            if not isinstance(v, bool):
                raise SpecError(f"{flag}: {v!r} is not a bool")
        if not _is_int(self.mode) or self.mode not in MODES:
            raise SpecError(f"mode: {self.mode!r} is not one of 0, 1, 2")
        put("mode", int(self.mode))
        if not _is_real(self.epsilon) or not math.isfinite(self.epsilon) or self.epsilon <= 0:
            raise SpecError(f"epsilon: {self.epsilon!r} must be a finite number > 0")
        put("epsilon", float(self.epsilon))
        if not _is_real(self.momentum) or not 0.0 <= self.momentum <= 1.0:
            raise SpecError(f"momentum: {self.momentum!r} must be a number in [0, 1]")
        put("momentum", float(self.momentum))
        if self.activation not in ACTIVATIONS:
            raise SpecError(f"activation: {self.activation!r} is not one of None, 'relu'")
        if self.mode == 1 and self.axis[-1] != len(shape) - 1:
            raise SpecError(
                f"axis: {list(self.axis)} with mode=1; sample-wise normalisation needs the "
                f"feature axis to be the last one ({len(shape) - 1})"
            )
        n = self.values_per_feature
        if n is not None and n < self.min_values_per_feature:
            raise SpecError(
                f"shape: {list(shape)} gives one value per feature, so the unbiased variance "
                "n/(n-1) is undefined; use unbiased=False or a larger batch"
            )

    # -- derived facts (no state of their own) ------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def channels(self) -> int:
        """C, the number of features: the product of the feature-axis sizes."""
        return math.prod(self.shape[a] for a in self.axis)

    @property
    def view(self) -> Tuple[Optional[int], int, Optional[int]]:
        """The canonical ``(outer, C, inner)`` view; None where a size is dynamic."""
        first, last = self.axis[0], self.axis[-1]
        return (_product(self.shape[:first]), self.channels, _product(self.shape[last + 1 :]))

    @property
    def values_per_feature(self) -> Optional[int]:
        """n, the number of values a batch statistic averages (None if dynamic)."""
        outer, _, inner = self.view
        if self.mode == 1:
            return self.channels
        return None if outer is None or inner is None else outer * inner

    @property
    def min_values_per_feature(self) -> int:
        """The smallest batch statistic a call may take: 2 where the moving variance is
        fed the unbiased n/(n-1) variance, which one value leaves undefined; else 1."""
        return 2 if self.updates_moving_stats and self.unbiased else 1

    @property
    def param_dtype(self) -> str:
        """dtype of gamma, beta, the moving and returned statistics and their gradients."""
        return "float64" if self.dtype == "float64" else "float32"

    @property
    def uses_batch_stats(self) -> bool:
        """True when the forward pass normalises with statistics of the input itself."""
        return self.training or self.mode != 0

    @property
    def updates_moving_stats(self) -> bool:
        return self.training and self.mode == 0

    # -- conversion ---------------------------------------------------------------------
    def replace(self, **changes: Any) -> "Spec":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["shape"] = list(self.shape)
        d["axis"] = list(self.axis)
        return d

    def to_json(self) -> str:
        """JSON text; ``shape`` is a list with null for dynamic sizes."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Spec":
        if not isinstance(data, Mapping):
            raise SpecError(f"spec: expected an object with the spec fields, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise SpecError(f"spec: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        if "shape" not in data:
            raise SpecError("shape: missing; every spec needs the input shape")
        fields = dict(data)
        if isinstance(fields.get("axis"), list):
            fields["axis"] = tuple(fields["axis"])
        return cls(**fields)

    @classmethod
    def from_json(cls, text: str) -> "Spec":
        """Parse `to_json` output (or a hand-written JSON object with the same fields)."""
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise SpecError(f"spec: not valid JSON ({exc})") from None
        return cls.from_dict(data)

    # -- other frameworks' layers (bngen.frameworks; duck-typed, imports none of them) --
    @classmethod
    def from_torch(cls, module_or_kwargs: Any, shape, **options: Any) -> "Spec":
        """The spec of a PyTorch BatchNorm module or its arguments; see `frameworks.from_torch`."""
        from .frameworks import from_torch

        return from_torch(module_or_kwargs, shape, **options)

    @classmethod
    def from_keras(cls, config_or_layer: Any, shape, **options: Any) -> "Spec":
        """The spec of a Keras BatchNormalization layer or config; see `frameworks.from_keras`."""
        from .frameworks import from_keras

        return from_keras(config_or_layer, shape, **options)

    @classmethod
    def from_onnx(cls, node_or_attrs: Any, shape, **options: Any) -> "Spec":
        """The spec of an ONNX BatchNormalization node or its attributes; see `frameworks.from_onnx`."""
        from .frameworks import from_onnx

        return from_onnx(node_or_attrs, shape, **options)

    def describe(self) -> str:
        """One line naming every field, used in banners and reports."""
        return ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())


def _product(dims) -> Optional[int]:
    if any(d is None for d in dims):
        return None
    return math.prod(dims)
