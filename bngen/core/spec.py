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

from .dtypes import DTYPES
from .errors import SpecError

MODES = (0, 1, 2)
ACTIVATIONS = (None, "relu")



# The most elements a static shape may have: the element index type of the kernels is 64
# bits on every JIT host (export targets with a narrower one check their own limit).
MAX_ELEMENTS = 2**63 - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite_float(value: Any) -> Optional[float]:
    """`value` as a finite float, or None (also for reals too large for a float, like 10**400)."""
    try:
        f = float(value)
    except (OverflowError, ValueError, TypeError):
        return None
    return f if math.isfinite(f) else None


def _short(value: Any) -> str:
    """repr(value), cut short: a hostile value (an int of 10**5 digits) makes no huge message."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to convert to a decimal string
        return f"<{type(value).__name__} too large to print>"
    return text if len(text) <= 80 else text[:60] + "..." + text[-10:]


def _canonical_dtype(value: Any) -> str:
    name = getattr(value, "name", None) or getattr(value, "__name__", None) or value
    if isinstance(name, str) and name in DTYPES:
        return name
    raise SpecError(f"dtype: {_short(value)} is not supported; use one of {', '.join(DTYPES)}")


def _canonical_shape(value: Any) -> Tuple[Optional[int], ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise SpecError(f"shape: {_short(value)} is not a sequence of sizes")
    dims = tuple(value)
    if not dims:
        raise SpecError("shape: () has no dimensions; batch norm needs at least one axis")
    for i, dim in enumerate(dims):
        if dim is None:
            continue
        if not _is_int(dim):
            raise SpecError(f"shape: dimension {i} is {_short(dim)}; sizes must be ints or None")
        if dim < 1:
            raise SpecError(f"shape: dimension {i} is {dim}; sizes must be >= 1")
    dims = tuple(None if d is None else int(d) for d in dims)
    if math.prod(d for d in dims if d is not None) > MAX_ELEMENTS:
        raise SpecError(f"shape: the static sizes of {_short(list(dims))} multiply to more elements than "
                        f"ptrdiff_t can count ({MAX_ELEMENTS})")
    return dims


def canonical_axes(value: Any, ndim: int, name: str = "axis", what: str = "shape", noun: str = "feature axis",
                   error: type = None) -> Tuple[int, ...]:
    """`value` (an int or a sequence of ints, negatives allowed) as sorted, non-negative,
    adjacent axes of an `ndim`-dimensional array; raises `error` (default SpecError)
    naming `name`.  The one statement of the axis rules: specs, the layer and `fold`."""
    error = error or SpecError
    axes = (value,) if _is_int(value) else value
    if isinstance(axes, (str, bytes)) or not hasattr(axes, "__iter__"):
        raise error(f"{name}: {_short(value)} is not an int or a tuple of ints")
    axes = tuple(axes)
    if not axes:
        raise error(f"{name}: () names no {noun}")
    result = []
    for a in axes:
        if not _is_int(a):
            raise error(f"{name}: {_short(value)} holds {_short(a)}, which is not an int")
        if not -ndim <= a < ndim:
            raise error(f"{name}: {_short(a)} is out of range for a {ndim}-D {what}")
        result.append(int(a) % ndim)
    result.sort()
    if len(set(result)) != len(result):
        raise error(f"{name}: {_short(value)} names the same axis twice")
    if result != list(range(result[0], result[0] + len(result))):
        raise error(f"{name}: {_short(value)} is not a run of adjacent axes")
    return tuple(result)


def _canonical_axis(value: Any, shape: Tuple[Optional[int], ...]) -> Tuple[int, ...]:
    result = canonical_axes(value, len(shape), what=f"shape {list(shape)}")
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
    # Statistics variants (README, "Statistics variants").  At their defaults they are
    # left out of `to_dict`/`to_json`, so a plain spec serialises (and its C renders) as
    # before they existed.
    renorm: bool = False  # batch renormalization: r and d from the renorm statistics
    renorm_momentum: float = 0.99  # weight of the OLD renorm_mean / renorm_stddev
    virtual_batch_size: Optional[int] = None  # ghost batch norm: statistics per ghost batch
    adjustment: bool = False  # training output gamma*(x_hat*a + b) + beta, a and b per call
    # A fusion, left out of `to_dict` at its default like the variants: the forward adds a
    # residual input shaped like x to the normalised values, before the activation
    # (ResNet's relu(bn(conv(x)) + shortcut)); such kernels have no gradient entry.
    residual: bool = False

    def __post_init__(self) -> None:
        shape = _canonical_shape(self.shape)
        put = lambda name, v: object.__setattr__(self, name, v)  # noqa: E731
        put("shape", shape)
        put("axis", _canonical_axis(self.axis, shape))
        put("dtype", _canonical_dtype(self.dtype))
        for flag in ("training", "center", "scale", "unbiased", "renorm", "adjustment", "residual"):
            v = getattr(self, flag)
            if not isinstance(v, bool):
                raise SpecError(f"{flag}: {_short(v)} is not a bool")
        if not _is_int(self.mode) or self.mode not in MODES:
            raise SpecError(f"mode: {_short(self.mode)} is not one of 0, 1, 2")
        put("mode", int(self.mode))
        epsilon = _finite_float(self.epsilon) if _is_real(self.epsilon) else None
        if epsilon is None or epsilon <= 0:
            raise SpecError(f"epsilon: {_short(self.epsilon)} must be a finite number > 0")
        put("epsilon", epsilon)
        momentum = _finite_float(self.momentum) if _is_real(self.momentum) else None
        if momentum is None or not 0.0 <= momentum <= 1.0:
            raise SpecError(f"momentum: {_short(self.momentum)} must be a number in [0, 1]")
        put("momentum", momentum)
        if not (self.activation is None or isinstance(self.activation, str) and self.activation in ACTIVATIONS):
            raise SpecError(f"activation: {_short(self.activation)} is not one of None, 'relu'")
        if self.mode == 1 and self.axis[-1] != len(shape) - 1:
            raise SpecError(
                f"axis: {list(self.axis)} with mode=1; sample-wise normalisation needs the "
                f"feature axis to be the last one ({len(shape) - 1})"
            )
        self._check_variants()
        if self.residual and (self.mode == 1 or self.virtual_batch_size is not None):
            raise SpecError(f"residual: True with {'mode=1' if self.mode == 1 else 'virtual_batch_size'}; the "
                            "residual input is fused into the feature-wise schedules of modes 0 and 2 only")
        n = self.values_per_feature
        if n is not None and n < self.min_values_per_feature:
            raise SpecError(
                f"shape: {list(shape)} gives one value per feature, so the unbiased variance "
                "n/(n-1) is undefined; use unbiased=False or a larger batch"
            )

    def _check_variants(self) -> None:
        """The statistics variants: each with mode 0 only, and ghost batch norm alone."""
        put = lambda name, v: object.__setattr__(self, name, v)  # noqa: E731
        m = self.renorm_momentum
        if not _is_real(m) or not 0.0 <= m <= 1.0:
            raise SpecError(f"renorm_momentum: {m!r} must be a number in [0, 1]")
        put("renorm_momentum", float(m))
        for flag in ("renorm", "adjustment"):
            if getattr(self, flag) and self.mode != 0:
                raise SpecError(f"{flag}: True with mode={self.mode}; it changes the batch statistics of mode 0 only")
        if self.renorm and self.unbiased:
            raise SpecError("unbiased: True with renorm=True; renorm derives moving_variance from moving_stddev "
                            "(moving_stddev**2 - epsilon), which no unbiased variance feeds")
        k = self.virtual_batch_size
        if k is None:
            return
        if not _is_int(k):
            raise SpecError(f"virtual_batch_size: {k!r} is not None or an int")
        if k < 1:
            raise SpecError(f"virtual_batch_size: {k} must be >= 1")
        put("virtual_batch_size", int(k))
        if self.mode != 0:
            raise SpecError(f"virtual_batch_size: {k} with mode={self.mode}; ghost batch norm is mode 0 only")
        if 0 in self.axis:
            raise SpecError(f"virtual_batch_size: {k} with feature axis {list(self.axis)}; ghost batches split axis 0, "
                            "the batch axis, which must not be a feature axis")
        if self.unbiased:
            raise SpecError(f"unbiased: True with virtual_batch_size={k}; as tf.keras, ghost batch norm feeds the "
                            "moving variance the mean of the biased ghost-batch variances")
        for other in ("renorm", "adjustment"):
            if getattr(self, other):
                raise SpecError(f"virtual_batch_size: {k} with {other}=True; the two cannot be combined")
        n = self.shape[0]
        if n is not None and n % k:
            raise SpecError(f"virtual_batch_size: {k} does not divide the batch size {n} of shape {list(self.shape)}")

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
        """The fields by name; the statistics variants and the residual fusion only where
        they differ from their defaults (so specs written before they existed read and
        write unchanged)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in _VARIANT_FIELDS or getattr(self, f.name) != f.default}
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
        odd = [k for k in data if not isinstance(k, str)]
        if odd:
            raise SpecError(f"spec: field names must be strings, got {_short(odd[0])}")
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
        """Parse `to_json` output (or a hand-written JSON object with the same fields).

        `text` is a str (or UTF-8 bytes); anything that is not the JSON of a valid spec
        (bad UTF-8, numbers of thousands of digits, deep nesting, ...) is a `SpecError`."""
        if not isinstance(text, (str, bytes, bytearray)):
            raise SpecError(f"spec: expected JSON text (str or bytes), got {type(text).__name__}")
        try:
            data = json.loads(text)
        except UnicodeDecodeError as exc:
            raise SpecError(f"spec: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except RecursionError:
            raise SpecError("spec: JSON nested too deeply") from None
        except ValueError as exc:  # JSONDecodeError, and ints longer than Python converts
            raise SpecError(f"spec: not valid JSON ({_short(str(exc))})") from None
        return cls.from_dict(data)

    # -- other frameworks' layers (bngen.frameworks; duck-typed, imports none of them) --
    @classmethod
    def from_torch(cls, module_or_kwargs: Any, shape, **options: Any) -> "Spec":
        """The spec of a PyTorch BatchNorm module or its arguments; see `frameworks.from_torch`."""
        from ..frameworks import from_torch

        return from_torch(module_or_kwargs, shape, **options)

    @classmethod
    def from_keras(cls, config_or_layer: Any, shape, **options: Any) -> "Spec":
        """The spec of a Keras BatchNormalization layer or config; see `frameworks.from_keras`."""
        from ..frameworks import from_keras

        return from_keras(config_or_layer, shape, **options)

    @classmethod
    def from_onnx(cls, node_or_attrs: Any, shape, **options: Any) -> "Spec":
        """The spec of an ONNX BatchNormalization node or its attributes; see `frameworks.from_onnx`."""
        from ..frameworks import from_onnx

        return from_onnx(node_or_attrs, shape, **options)

    def describe(self) -> str:
        """One line naming every field, used in banners and reports."""
        return ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())


CLIP_KEYS = ("rmax", "rmin", "dmax")


def check_renorm_clipping(value: Any, name: str = "renorm_clipping") -> Tuple[Optional[float], Optional[float], Optional[float]]:
    """``(rmax, rmin, dmax)`` from a Keras ``renorm_clipping`` dict (None: {}), a missing
    key meaning no clip on that side (rmin does NOT default to 1/rmax, as in Keras 3).
    Raises `SpecError` naming `name` for unknown keys, values that are not real numbers
    (NaN included), ``rmax < rmin`` or ``dmax < 0``."""
    if value is None:
        return None, None, None
    if not isinstance(value, Mapping):
        raise SpecError(f"{name}: {value!r} is not a dict with keys among {', '.join(CLIP_KEYS)}")
    unknown = sorted(map(str, set(value) - set(CLIP_KEYS)))
    if unknown:
        raise SpecError(f"{name}: unknown key(s) {', '.join(unknown)}; the keys are {', '.join(CLIP_KEYS)}")
    bounds = []
    for key in CLIP_KEYS:
        v = value.get(key)
        if v is not None and (not _is_real(v) or math.isnan(v)):
            raise SpecError(f"{name}: {key}={v!r} is not a number (leave the key out for no clip)")
        bounds.append(None if v is None else float(v))
    problem = clip_problem(*bounds)
    if problem:
        raise SpecError(f"{name}: {problem[1]}")
    return tuple(bounds)


def clip_problem(rmax: Optional[float], rmin: Optional[float], dmax: Optional[float]) -> Optional[Tuple[str, str]]:
    """``(bound, message)`` when clipping bounds break Keras 3's rules (rmax >= rmin,
    dmax >= 0; None is no bound), else None."""
    if rmax is not None and rmin is not None and rmax < rmin:
        return "rmax", f"rmax={rmax} is less than rmin={rmin}"
    if dmax is not None and dmax < 0:
        return "dmax", f"dmax={dmax} must be >= 0"
    return None


_VARIANT_FIELDS = ("renorm", "renorm_momentum", "virtual_batch_size", "adjustment", "residual")


def _product(dims) -> Optional[int]:
    if any(d is None for d in dims):
        return None
    return math.prod(dims)
