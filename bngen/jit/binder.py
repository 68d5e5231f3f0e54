"""Python calls onto compiled entry points: one binder for every entry.

A `Face` says how one public method of a `Kernel` fills one entry point: which Python
parameter feeds which C argument (by the argument's `Role`), what it returns, and why a
parameter is required or unused.  `bind` makes the method from the face:

* the checked path (`call_checked`): every argument validated, a message naming it,
  inputs that C cannot take as they are (strided, misaligned) copied, before any C runs;
* the fast path: a function generated from the entry's roles, with the method's own
  signature, for well-formed calls (arrays of the right dtype and shape, C-contiguous,
  aligned, writable where written, no overlap).  It costs a few identity and tuple
  comparisons plus one ``ffi.from_buffer`` per new array.  Any other call, valid or not,
  is refused, having run nothing, and takes the checked path, whose checks explain
  what is wrong.  Both check everything before any C runs; the fast path only orders
  the checks for speed.

Per-feature arrays are usually the same objects call after call (one kernel serves every
layer of its spec, so a few sets take turns): the last KEPT_SETS sets seen are kept, each
with its C pointers and what its full check established.  On a later call with the same
objects only what can change in place is checked again:
* dtype and strides.  An array's dtype, shape and strides have setters, but none of them
  changes its byte length, so an array that had shape (C,) and the parameter dtype when
  checked in full, and still has that dtype and strides (itemsize,), is still
  one-dimensional with C values, C-contiguous.
* writability of the arrays updated in place (flags.writeable has a setter).
* overlap with the data arrays, which are new on every call.  Overlap among the kept
  arrays cannot change: their data pointers are fixed while we hold them (NumPy refuses to
  resize an array referenced elsewhere; resize(refcheck=False) and __setstate__ are the
  documented exceptions, which leave NumPy's own views dangling too).
Overlap checks compare C pointers to the arrays' first and one-past-last values (cffi
orders pointers by address): for C-contiguous arrays that is exactly the bounds check
np.may_share_memory makes, at a fraction of its cost.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from operator import is_
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..core.spec import Spec, clip_problem
from ..core.threads import MAX_THREADS
from ..plan.entries import CLIP_BOUNDS, RENORM_STATISTICS, Arg, Entry, Phase, Role

KEPT_SETS = 4  # a few layers sharing one kernel take turns without a full check each

DATA, PARAM, OUT, THREADS, SCALAR, GHOST = "data", "param", "out", "threads", "scalar", "ghost"
SAMPLE = "sample"  # one value per sample, shape x.shape[:axis]: mode 1's statistics
STAT64, COUNT = "stat64", "count"  # the split phases' float64 statistics, and their count of values


@dataclasses.dataclass(frozen=True)
class Param:
    """One Python parameter of a kernel method."""

    name: str
    kind: str  # DATA (shaped like x) | PARAM (one value per feature) | SAMPLE | OUT | THREADS | SCALAR (a number;
    #            None: NaN) | GHOST (one value per ghost batch and feature, shape (G, C), read) | STAT64 (float64,
    #            shape (arg.rows, C) or (C,), read) | COUNT (a number of values per feature, >= this batch's)
    arg: Optional[Arg] = None  # the C argument it fills; None: checked only (or unused)
    used: bool = True  # False: the kernel takes no such value; it must be None
    required: bool = True
    why: str = ""  # why it is required, optional or unused (for messages)
    alias: Optional[str] = None  # another parameter that may carry its value (not both)
    converts: bool = False  # STAT64: the parameter dtype is taken too, converted (on the checked path)
    counted: bool = False  # STAT64: row 0 holds counts of values, each finite and >= Spec.min_values_per_feature


@dataclasses.dataclass(frozen=True)
class Face:
    """How a public method fills an entry point."""

    method: str
    entry: Entry
    params: Tuple[Param, ...]
    results: Tuple[str, ...]  # C argument names returned, in order ("" or absent: None)
    single: bool = False  # return results[0] alone
    lasting: bool = True  # the per-feature arrays are kept weights, used call after call
    # x is one process's share of a batch (the split phases): it may be empty, and the rule
    # of Spec.min_values_per_feature applies to the count of the whole batch, not to x
    partial: bool = False

    def param(self, name: str) -> Optional[Param]:
        return next((p for p in self.params if p.name == name), None)


class _Refused(Exception):
    """Raised inside a fast path for a call that needs the checked path."""


# -- the faces of a kernel ---------------------------------------------------------------------------
def faces(spec: Spec, entries: Tuple[Entry, ...]) -> Dict[str, Face]:
    """The public methods of a kernel with these entry points, as faces."""
    result = {}
    for entry in entries:
        if entry.phase in (Phase.FORWARD, Phase.INFERENCE):
            result["__call__"] = _forward_face(spec, entry, "__call__")
            if entry.phase == Phase.FORWARD:
                result["forward"] = _forward_face(spec, entry, "forward")
        elif entry.phase in (Phase.BACKWARD, Phase.BACKWARD_FROZEN):
            result["backward"] = _backward_face(spec, entry)
        elif entry.phase in _SPLIT_FACES:
            face = _SPLIT_FACES[entry.phase](spec, entry)
            result[face.method] = face
    return result


def _gamma(spec: Spec, entry: Entry) -> Param:
    return Param("gamma", PARAM, entry.arg("gamma"), used=spec.scale, required=spec.scale,
                 why="scale=True" if spec.scale else "the spec has scale=False")


def _mask_beta(spec: Spec, entry: Entry, method: str) -> Param:
    """beta of a gradient, which needs it only for the mask of a fused ReLU."""
    relu = spec.activation == "relu"
    return Param("beta", PARAM, entry.arg("beta"), used=relu and spec.center, required=relu and spec.center,
                 why="activation='relu' with center=True: the mask recomputes the forward output, which adds beta; "
                     "pass it as beta=" if relu and spec.center
                 else f"{method} needs beta only with activation='relu' and center=True")


def _moving_params(spec: Spec, entry: Entry) -> list:
    if spec.updates_moving_stats:
        why, used, required = "training updates them in place when given", True, False
    elif spec.mode == 0:
        why, used, required = "inference normalises with the moving statistics", True, True
    else:
        why, used, required = f"mode {spec.mode} keeps no moving statistics", False, False
    if spec.renorm and entry.phase == Phase.FORWARD:
        why, used, required = "renorm training takes r and d from them and updates them in place", True, True
    return [Param(n, PARAM, entry.arg(n), used=used, required=required, why=why) for n in ("moving_mean", "moving_variance")]


def _tail(entry: Entry, out: Optional[str]) -> list:
    """The trailing keyword parameters: ``out`` (filling C argument `out`, if any) and ``threads``."""
    return ([Param("out", OUT, entry.arg(out), required=False)] if out else []) + [
        Param("threads", THREADS, entry.arg("nthreads"), required=False)]


def _normalising_params(spec: Spec, entry: Entry) -> list:
    """x, gamma, beta and the moving statistics of a forward (fused, or with given moments)."""
    return [
        Param("x", DATA, entry.arg("x")),
        _gamma(spec, entry),
        Param("beta", PARAM, entry.arg("beta"), used=spec.center, required=spec.center,
              why="center=True" if spec.center else "the spec has center=False"),
    ] + _moving_params(spec, entry)


def _forward_face(spec: Spec, entry: Entry, method: str) -> Face:
    a = entry.arg
    residual = Param("residual", DATA, a("residual"), used=spec.residual, required=spec.residual,
                     why="the spec has residual=True: y = activation(normalised x + residual)" if spec.residual
                     else "the spec has residual=False")
    params = _normalising_params(spec, entry) + [residual] + _variant_params(spec, entry) + _tail(entry, "y")
    if method == "forward":
        return Face(method, entry, tuple(params), ("y", "mean", "variance") + (("r", "d") if a("r") else ()))
    return Face(method, entry, tuple(params), ("y",), single=True)


def _variant_params(spec: Spec, entry: Entry) -> list:
    """The keyword-only parameters of the statistics variants: every kernel has them, and
    those its spec does not use must be None (a message says why)."""
    a = entry.arg
    renorm = a("renorm_mean") is not None
    why = ("renorm training takes r and d from them and updates them in place" if renorm else
           "the spec has renorm=False" if not spec.renorm else "a renorm kernel uses them in training only")
    params = [Param(n, PARAM, a(n), used=renorm, required=renorm, why=why) for n in RENORM_STATISTICS[2:]]
    why = ("None: no clip on that side" if renorm else "clipping bounds are renorm training's")
    params += [Param(n, SCALAR, a(n), used=renorm, required=False, why=why) for n in CLIP_BOUNDS]
    params += _adjust_params(spec, entry)
    return params


def _adjust_params(spec: Spec, entry: Entry) -> list:
    a = entry.arg
    used = a("adjust_scale") is not None
    why = ("the spec has adjustment=True" if used else "the spec has adjustment=False" if not spec.adjustment
           else "the adjustment changes training only")
    return [Param(n, PARAM, a(n), used=used, required=used, why=why) for n in ("adjust_scale", "adjust_bias")]


def _backward_face(spec: Spec, entry: Entry) -> Face:
    a = entry.arg
    params = [
        Param("dy", DATA, a("dy")),
        Param("x", DATA, a("x")),  # (a frozen layer without dgamma or a mask reads only its shape)
        _gamma(spec, entry),
        _mask_beta(spec, entry, "backward"),
    ]
    if entry.phase == Phase.BACKWARD:
        unused = f"{f'mode {spec.mode}' if spec.mode else 'training'} gradients are taken at the statistics forward used"
        why = "the batch statistics that forward returned"
        kind = SAMPLE if spec.mode == 1 else GHOST if spec.virtual_batch_size is not None and spec.training else PARAM
        if spec.mode == 1:
            why = "the per-sample statistics that forward returned"
        params += [
            Param("mean", kind, a("mean"), why=why),
            Param("variance", kind, a("variance"), why=why),
            Param("moving_mean", PARAM, used=False, required=False, why=unused + "; pass the batch mean as mean="),
            Param("moving_variance", PARAM, used=False, required=False,
                  why=unused + "; pass the batch variance as variance="),
        ]
        renorm = a("r") is not None
        params += [Param(n, PARAM, a(n), used=renorm, required=renorm,
                         why="the renorm correction that forward returned (held constant)" if renorm
                         else "the spec has renorm=False") for n in ("r", "d")]
    else:
        why = "a frozen layer's gradient uses the moving statistics"
        params += [
            Param("moving_mean", PARAM, a("moving_mean"), why=why, alias="mean"),
            Param("moving_variance", PARAM, a("moving_variance"), why=why, alias="variance"),
        ]
    if entry.phase != Phase.BACKWARD:
        params += [Param(n, PARAM, used=False, required=False, why="the spec has renorm=False" if not spec.renorm
                         else "a frozen layer's gradient has no renorm correction") for n in ("r", "d")]
    params += _adjust_params(spec, entry) + _tail(entry, "dx")
    # a training step passes the statistics of its own forward: new arrays at every step
    return Face("backward", entry, tuple(params), ("dx", "dgamma", "dbeta"), lasting=entry.phase != Phase.BACKWARD)


# The split phases of a training step (statistics merged across processes): x is this
# process's share of the batch; the statistics that cross processes are float64.
def _moments_face(spec: Spec, entry: Entry) -> Face:
    return Face("moments", entry, (Param("x", DATA, entry.arg("x")),) + tuple(_tail(entry, None)), ("moments",),
                single=True, partial=True)


def _normalize_face(spec: Spec, entry: Entry) -> Face:
    merged = Param("moments", STAT64, entry.arg("moments"), counted=True)
    return Face("normalize", entry, tuple(_normalising_params(spec, entry) + [merged] + _tail(entry, "y")),
                ("y", "mean", "variance"), partial=True)


def _statistics64(entry: Entry) -> list:
    """mean and variance of the split gradients: float64 (the merged ones, exact), or the parameter dtype."""
    return [Param(n, STAT64, entry.arg(n), converts=True) for n in ("mean", "variance")]


def _backward_sums_face(spec: Spec, entry: Entry) -> Face:
    relu = spec.activation == "relu"
    why = ("activation='relu': the mask recomputes the forward output" if relu
           else "backward_sums needs it only for the mask of activation='relu'")
    params = [Param("dy", DATA, entry.arg("dy")), Param("x", DATA, entry.arg("x"))]
    params += [Param(n, PARAM, entry.arg(n), used=relu and used, required=relu and used, why=why)
               for n, used in (("gamma", spec.scale), ("beta", spec.center))]
    return Face("backward_sums", entry, tuple(params + _statistics64(entry) + _tail(entry, None)), ("sums",),
                single=True, partial=True)


def _backward_apply_face(spec: Spec, entry: Entry) -> Face:
    params = [Param("dy", DATA, entry.arg("dy")), Param("x", DATA, entry.arg("x")), _gamma(spec, entry),
              _mask_beta(spec, entry, "backward_apply")] + _statistics64(entry)
    params += [Param("sums", STAT64, entry.arg("sums")), Param("count", COUNT, entry.arg("count"))]
    return Face("backward_apply", entry, tuple(params + _tail(entry, "dx")), ("dx", "dgamma", "dbeta"), partial=True)


_SPLIT_FACES = {Phase.MOMENTS: _moments_face, Phase.NORMALIZE: _normalize_face,
                Phase.BACKWARD_SUMS: _backward_sums_face, Phase.BACKWARD_APPLY: _backward_apply_face}


# -- the checked path ----------------------------------------------------------------------------------
def call_checked(kernel, face: Face, values: Dict[str, Any]):
    """Runs `face`'s entry on `values` (Python parameter -> value) after checking every
    argument; raises naming the first bad one, before any C runs."""
    spec, plan = kernel.spec, kernel.plan
    values = dict(values)
    for p in face.params:
        if p.alias is not None:
            values[p.name] = _one_of(p.name, values.get(p.name), p.alias, values.pop(p.alias, None))
    # The caller's arrays, before any copy: those written must share no memory with them.
    given = [(p.name, values.get(p.name)) for p in face.params if p.kind not in (THREADS, SCALAR, COUNT)]
    data = [p for p in face.params if p.kind == DATA]
    checked: Dict[str, Any] = {"x": check_x(kernel, values["x"], allow_empty=face.partial)}
    x = checked["x"]
    ghosts = check_ghosts(spec, x)
    for p in data:
        if p.name == "x":
            continue
        value = values.get(p.name)
        if not p.used or value is None:  # (a used data array is a required one)
            if p.used:
                raise TypeError(f"{p.name}: required ({p.why})")
            if value is not None:
                raise TypeError(f"{p.name}: not used by this kernel ({p.why}); pass None")
            checked[p.name] = None
            continue
        checked[p.name] = check_like(kernel, p.name, value, x)
    written = {"out"}
    for p in face.params:
        if p.kind == PARAM:
            writes = p.arg is not None and p.arg.role == Role.PARAM_INOUT
            if writes:
                written.add(p.name)
            checked[p.name] = check_param(kernel, p.name, values.get(p.name), p.used, p.why, writable=writes,
                                          required=p.required)
    first, last = spec.axis[0], spec.axis[-1]
    for p in face.params:
        if p.kind == GHOST:
            checked[p.name] = check_stat(kernel, p.name, values.get(p.name), p.why, (ghosts, plan.channels),
                                         f"one value per ghost batch and feature (virtual_batch_size={spec.virtual_batch_size})")
        elif p.kind == SAMPLE:
            checked[p.name] = check_stat(kernel, p.name, values.get(p.name), p.why, x.shape[:first],
                                         "one value per sample (x.shape[:axis])")
        elif p.kind == SCALAR:
            checked[p.name] = check_scalar(p.name, values.get(p.name), p.used, p.why)
        elif p.kind == STAT64:
            checked[p.name] = check_stat64(kernel, p.name, values.get(p.name), stat64_shape(p.arg, plan.channels),
                                           param_ok=p.converts)
            if p.counted:
                check_counts(spec, p.name, checked[p.name])
        elif p.kind == COUNT:
            checked[p.name] = check_count(p.name, values.get(p.name), x.size // plan.channels)
    if all(face.param(n) is not None and face.param(n).used for n in CLIP_BOUNDS):
        check_clip_bounds(*(values.get(n) for n in CLIP_BOUNDS))
    nthreads = check_threads(kernel, values.get("threads"))
    outer = int(np.prod(x.shape[:first], dtype=np.int64))
    inner = int(np.prod(x.shape[last + 1:], dtype=np.int64))
    if outer * inner < spec.min_values_per_feature and not face.partial:
        raise ValueError(
            f"x: shape {x.shape} gives one value per feature, so the unbiased variance n/(n-1) "
            "is undefined (the spec has unbiased=True)"
        )
    out_param = face.param("out")
    out = check_out(kernel, values.get("out"), x.shape) if out_param else None
    _check_no_overlap([(n, out if n == "out" else v) for n, v in given], written=written)

    target = None if out is None else _aligned_target(out)
    stat_shape = x.shape[:first] if spec.mode == 1 else (plan.channels,) if ghosts is None else (ghosts, plan.channels)
    # may_stream: C writes the caller's buffer, not a new array's fresh pages
    streams = values.get("out") is not None and target is out
    c_values = {"outer": outer, "inner": inner, "nthreads": nthreads, "may_stream": int(streams), "batch": x.shape[0]}
    for p in face.params:
        if p.arg is not None and p.kind in (DATA, PARAM, SAMPLE, SCALAR, GHOST, STAT64, COUNT):
            c_values[p.arg.name] = checked[p.name]
    results: Dict[str, Any] = {}
    if out_param:
        c_values[out_param.arg.name] = target
        results[out_param.arg.name] = out
    for arg in face.entry.args:
        if arg.role in (Role.STAT_OUT, Role.GRAD_OUT):
            wanted = arg.name in face.results
            c_values[arg.name] = results[arg.name] = (
                np.empty(stat_shape if arg.role == Role.STAT_OUT else (plan.channels,), kernel.param_dtype)
                if wanted else None)
        elif arg.role == Role.STAT64_OUT:
            c_values[arg.name] = results[arg.name] = np.zeros(stat64_shape(arg, plan.channels))
    kernel.entry_function(face.entry)(*_c_arguments(kernel, face.entry, c_values))
    if target is not out:
        out[...] = target
    if face.single:
        return results[face.results[0]]
    return tuple(results.get(name) for name in face.results)


def _c_arguments(kernel, entry: Entry, values: Dict[str, Any]) -> list:
    ffi, args = kernel.ffi, []
    for arg in entry.args:
        value = values[arg.name]
        if not arg.is_array:
            args.append(value)
        elif value is None:
            args.append(ffi.NULL)
        else:
            ctype = kernel.data_ctype if arg.role.is_data else \
                "double[]" if arg.role in (Role.STAT64_IN, Role.STAT64_OUT) else kernel.param_ctype
            args.append(ffi.from_buffer(ctype, value, require_writable=arg.role.writes))
    return args


def _plain_array(name: str, value, of: str = "") -> None:
    """Raises unless `value` is an ndarray and not a masked one (`of`: the dtypes wanted, for the message)."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray{of and ' of ' + of}, got {type(value).__name__}")
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(f"{name}: is a numpy.ma.MaskedArray, whose mask bngen would ignore; "
                        "pass a plain ndarray (e.g. np.ma.filled(value, fill))")


def check_x(kernel, x, allow_empty: bool = False) -> np.ndarray:
    """x: an ndarray of the kernel's dtype and the spec's shape, as C can read it;
    `allow_empty`: a zero-sized batch is valid (the split phases: another process may
    hold the whole batch)."""
    spec = kernel.spec
    _plain_array("x", x)
    if x.dtype != kernel.dtype:
        raise TypeError(f"x: dtype is {x.dtype}, but the kernel was built for {spec.dtype}")
    if x.ndim != spec.ndim or any(want is not None and got != want for got, want in zip(x.shape, spec.shape)):
        raise ValueError(f"x: shape {x.shape} does not match the spec's shape {_shape_text(spec.shape)}")
    if x.size == 0 and not allow_empty:
        raise ValueError(f"x: shape {x.shape} has a zero-sized dimension; every size must be >= 1")
    return _c_array(x)


def check_like(kernel, name: str, value, x: np.ndarray) -> np.ndarray:
    """An array that must have x's shape and the kernel's dtype (dy)."""
    _plain_array(name, value)
    if value.dtype != kernel.dtype:
        raise TypeError(f"{name}: dtype is {value.dtype}, but the kernel was built for {kernel.spec.dtype}")
    if value.shape != x.shape:
        raise ValueError(f"{name}: shape {value.shape} does not match the shape of x {x.shape}")
    return _c_array(value)


def check_param(kernel, name: str, value, used: bool, why: str, writable: bool = False, required: bool = True):
    """A per-feature array (or None where allowed), as C can read (or update) it."""
    if value is None:
        if used and required:
            raise TypeError(f"{name}: required ({why})")
        return None
    if not used:
        raise TypeError(f"{name}: not used by this kernel ({why}); pass None")
    pdtype, channels = kernel.param_dtype, kernel.plan.channels
    _plain_array(name, value, str(pdtype))
    if value.dtype != pdtype:
        raise TypeError(f"{name}: dtype is {value.dtype}; parameters of a {kernel.spec.dtype} kernel are {pdtype}")
    if value.shape != (channels,):
        raise ValueError(f"{name}: shape is {value.shape}; expected ({channels},), one value per feature")
    if writable:
        if not value.flags.writeable:
            raise ValueError(f"{name}: is read-only, but training updates it in place")
        if not value.flags.c_contiguous:
            raise ValueError(f"{name}: must be C-contiguous, because training updates it in place")
        if not value.flags.aligned:
            raise ValueError(f"{name}: is not aligned to its {value.itemsize}-byte values, which training updates in place")
        return value
    return _c_array(value)


def check_stat(kernel, name: str, value, why: str, shape, per: str) -> np.ndarray:
    """Statistics that forward returned with a shape of their own: mode 1's per sample
    (x.shape[:axis]), ghost batch norm's per ghost batch and feature ((G, C)); `per` says
    which, for the message."""
    if value is None:
        raise TypeError(f"{name}: required ({why})")
    _plain_array(name, value, str(kernel.param_dtype))
    if value.dtype != kernel.param_dtype:
        raise TypeError(f"{name}: dtype is {value.dtype}; statistics of a {kernel.spec.dtype} kernel are {kernel.param_dtype}")
    if value.shape != tuple(shape):
        raise ValueError(f"{name}: shape is {value.shape}; expected {tuple(shape)}, {per}")
    return _c_array(value)


def stat64_shape(arg: Arg, channels: int) -> Tuple[int, ...]:
    """The shape of a float64 statistics argument (Role.STAT64_*): (rows, C), or (C,)."""
    return (arg.rows, channels) if arg.rows else (channels,)


def check_stat64(kernel, name: str, value, shape, param_ok: bool = False) -> np.ndarray:
    """A float64 array of `shape` for the split phases (moments, sums; with `param_ok`,
    statistics in the parameter dtype too, converted), C-contiguous for C."""
    kinds = "float64" + (f" (or {kernel.param_dtype})" if param_ok and kernel.param_dtype != np.float64 else "")
    if value is None:
        raise TypeError(f"{name}: required, a numpy.ndarray of {kinds} with shape {shape}")
    _plain_array(name, value, kinds)
    if value.dtype != np.float64 and not (param_ok and value.dtype == kernel.param_dtype):
        raise TypeError(f"{name}: dtype is {value.dtype}; expected {kinds}")
    if value.shape != tuple(shape):
        raise ValueError(f"{name}: shape is {value.shape}; expected {tuple(shape)}")
    return _c_array(value.astype(np.float64, copy=False))


def check_counts(spec: Spec, name: str, value: np.ndarray) -> None:
    """Row 0 of merged moments: counts of values per feature, each finite and above
    ``Spec.min_values_per_feature - 1`` (the merged batch is not empty, nor one value
    where the unbiased variance needs two)."""
    count = value[0]
    if not (np.all(np.isfinite(count)) and np.all(count > 0)):
        raise ValueError(f"{name}: the counts (row 0) must be finite and > 0: the merged batch is empty")
    if np.any(count <= spec.min_values_per_feature - 1):  # (counts are whole numbers)
        raise ValueError(f"{name}: a count (row 0) of 1 value per feature leaves the unbiased variance "
                         "n/(n-1) undefined (the spec has unbiased=True)")


def check_count(name: str, value, local: int) -> float:
    """The values per feature over every process: a number > 0, and at least `local`
    (this process's values per feature)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or value <= 0 or value < local:
        raise ValueError(f"{name}: {value!r} must be a number > 0 and at least this batch's {local} values "
                         "per feature (the values per feature over every process)")
    return float(value)


def check_out(kernel, out, shape) -> np.ndarray:
    """out: a new array, or the caller's, of x's shape and dtype, C-contiguous and writable."""
    if out is None:
        return np.empty(shape, kernel.dtype)
    _plain_array("out", out)
    if out.dtype != kernel.dtype:
        raise TypeError(f"out: dtype is {out.dtype}; expected {kernel.dtype}")
    if out.shape != tuple(shape):
        raise ValueError(f"out: shape is {out.shape}; expected {tuple(shape)}, the shape of x")
    if not out.flags.c_contiguous:
        raise ValueError("out: must be C-contiguous")
    if not out.flags.writeable:
        raise ValueError("out: is read-only")
    return out


def check_ghosts(spec: Spec, x: np.ndarray) -> Optional[int]:
    """G, the number of ghost batches of a ghost-batch-norm training call (else None)."""
    k = spec.virtual_batch_size
    if k is None or not spec.training:
        return None
    if x.shape[0] % k:
        raise ValueError(f"x: batch size {x.shape[0]} (axis 0 of shape {x.shape}) is not a multiple of "
                         f"virtual_batch_size={k}")
    return x.shape[0] // k


def check_scalar(name: str, value, used: bool, why: str) -> float:
    """A call-time number (a renorm clipping bound): a real number, inf allowed; None is
    NaN in C, which the kernel reads as no bound."""
    if value is None:
        return math.nan
    if not used:
        raise TypeError(f"{name}: not used by this kernel ({why}); pass None")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or math.isnan(value):
        raise TypeError(f"{name}: {value!r} is not a number ({why})")
    return float(value)


def check_clip_bounds(rmax, rmin, dmax) -> None:
    """The renorm clipping bounds as Keras 3 checks them (rmax >= rmin, dmax >= 0)."""
    problem = clip_problem(rmax, rmin, dmax)
    if problem:
        raise ValueError(f"{problem[0]}: {problem[1]}")


def check_threads(kernel, threads) -> int:
    """The thread count of a call: `threads`, or the kernel's default."""
    if threads is None:
        return kernel._threads
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"threads: {threads!r} must be an int >= 1 and <= {MAX_THREADS}")
    if threads > kernel._max_threads:
        raise ValueError(f"threads: {threads!r} in a process forked from one that had imported bngen; OpenMP's thread "
                         "pool does not survive fork(), so a team would hang here: use 1 thread, or start workers with "
                         "the 'spawn' or 'forkserver' method of multiprocessing")
    return int(threads)


def _c_array(value: np.ndarray) -> np.ndarray:
    """`value` if C-contiguous and aligned to its values (as C requires of a pointer: NumPy
    allows misaligned views, e.g. frombuffer at an odd offset), else such a copy."""
    flags = value.flags
    return value if flags.c_contiguous and flags.aligned else np.array(value, order="C")


def _aligned_target(out: np.ndarray) -> np.ndarray:
    """Where C writes a result meant for `out`: `out` itself, or, if NumPy marks it
    misaligned, a new array the caller copies into `out` afterwards."""
    return out if out.flags.aligned else np.empty(out.shape, out.dtype)


def _one_of(name: str, value, alias: str, alias_value):
    """The value given under `name` or, positionally, under `alias`; not both."""
    if value is not None and alias_value is not None:
        raise TypeError(f"{name}: given twice (as {name}= and in the {alias} slot); pass it once")
    return alias_value if value is None else value


def _shape_text(shape: Tuple[Optional[int], ...]) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _check_no_overlap(arrays, written=None) -> None:
    """Raises if an array the kernel writes shares memory with another argument.

    `arrays` is a list of (name, array or None); `written` names the ones written (all of
    them when None).  Arrays that are only read may share memory with each other.
    """
    present = [(n, a) for n, a in arrays if a is not None]
    for i, (name_a, a) in enumerate(present):
        for name_b, b in present[i + 1:]:
            if written is not None and name_a not in written and name_b not in written:
                continue
            if np.may_share_memory(a, b):
                raise ValueError(f"{name_b}: shares memory with {name_a}; pass separate arrays")


# -- kept parameter sets -----------------------------------------------------------------------------
class KeptSets:
    """The per-feature arrays of the last KEPT_SETS well-formed calls of one fast path.

    `slots` are ``(passed, required, written)`` per kept parameter: whether C receives it
    (else it is only checked), whether it may be None, whether C updates it.  ``last[0]``
    is the tuple of the sets kept, newest first, each ``(array, ..., pointers, spans)``,
    which the fast path reads itself; `recall` finds a set among the older ones and checks
    what can have changed in place, or checks a new set in full and keeps it, returning
    ``(pointers, spans)``: the C arguments of the passed parameters in order (NULL for one
    not given) and ``(first, one-past-last)`` pointers of those updated in place.  It
    raises `_Refused` when the call needs the checked path.  `lasting`: the sets are used
    again (weights, moving statistics), so their pointers are made plain ``param_t *``,
    which cost ~0.13 us each to make and save ~10 ns each in every call that passes them.
    """

    def __init__(self, kernel, slots, lasting: bool):
        self.slots = tuple(slots)
        self.pdtype, self.channels = kernel.param_dtype, kernel.plan.channels
        self.ffi = kernel.ffi
        self.param_ct = self.ffi.typeof(kernel.param_ctype)
        self.param_ptr = self.ffi.typeof(kernel.plan.precision.param + " *")
        self.lasting = lasting
        self.last = [((object(),) * len(self.slots) + ((), ()),)]  # a set that no call passes

    def recall(self, *given):
        k = len(self.slots)
        for kept in self.last[0][1:]:
            if all(map(is_, kept[:k], given)):
                for value, (_, _, writes) in zip(given, self.slots):  # what can change in place
                    if value is not None and (value.dtype is not self.pdtype or value.strides != (self.pdtype.itemsize,)
                                              or writes and not value.flags.writeable):
                        raise _Refused
                return kept[k:]
        return self._remember(given)

    def _remember(self, given):
        pdtype, channels, null = self.pdtype, self.channels, self.ffi.NULL
        pointers, spans, bounds = [], [], []
        for value, (passed, required, writes) in zip(given, self.slots):
            if value is None:
                if required:
                    raise _Refused
                if passed:
                    pointers.append(null)
                continue
            if value.__class__ is not np.ndarray or value.dtype is not pdtype or value.shape != (channels,) \
                    or not value.flags.aligned:  # (fixed while kept: the data pointer is)
                raise _Refused
            try:
                pointer = self.ffi.from_buffer(self.param_ct, value, writes)
            except ValueError:  # not C-contiguous, or read-only where written
                raise _Refused from None
            if self.lasting:  # (the kept set holds the array, so its memory stays)
                pointer = self.ffi.cast(self.param_ptr, pointer)
            bounds.append(pointer)
            if passed:
                pointers.append(pointer)
            if writes:
                spans.append((pointer, pointer + channels))
        for start, end in spans:  # an array written shares memory with no other one
            for other in bounds:
                if other is not start and other < end and start < other + channels:
                    raise _Refused
        kept = tuple(given) + (tuple(pointers), tuple(spans))
        self.last[0] = (kept,) + self.last[0][: KEPT_SETS - 1]  # one store: readers see an old or a new tuple
        return kept[len(self.slots):]


# -- the fast path -------------------------------------------------------------------------------------
def fast_path(kernel, face: Face, checked):
    """The fast method of `face`: a function with the signature of `checked` (the public
    method, which it calls itself for the calls it refuses), generated from the entry's
    roles for this kernel's spec."""
    spec, plan, entry = kernel.spec, kernel.plan, face.entry
    signature = inspect.signature(checked)
    names = [n for n in signature.parameters if n != "self"]
    first, last = spec.axis[0], spec.axis[-1]
    lines = []
    emit = lines.append

    def local(p: Param) -> str:  # the variable holding a parameter's value after aliases
        return f"v_{p.name}" if p.alias else p.name

    for p in face.params:
        if not p.used:
            emit(f"if {p.name} is not None: raise _Refused")
        if p.alias:
            emit(f"if {p.alias} is None: v_{p.name} = {p.name}")
            emit(f"elif {p.name} is None: v_{p.name} = {p.alias}")
            emit("else: raise _Refused")
    scalars = [p for p in face.params if p.kind == SCALAR and p.used]
    for p in scalars:  # None: NaN, which C reads as no bound; ints and NaN take the checked path
        emit(f"if {p.name} is None: s_{p.name} = nan")
        emit(f"elif {p.name}.__class__ is float and {p.name} == {p.name}: s_{p.name} = {p.name}")
        emit("else: raise _Refused")
    if {p.name for p in scalars} >= set(CLIP_BOUNDS):  # (NaN compares false: no bound, no refusal)
        emit("if s_rmax < s_rmin or s_dmax < 0: raise _Refused")
    for n in names:  # parameters of the signature that no face parameter takes
        if face.param(n) is None and not any(p.alias == n for p in face.params):
            emit(f"if {n} is not None: raise _Refused")
    # x: its shape gives the sizes
    emit("if x.__class__ is not ndarray: raise _Refused")
    emit("shape = x.shape")
    emit("if x.dtype is not dtype and x.dtype != dtype: raise _Refused")
    static = [f"shape[{i}] != {d}" for i, d in enumerate(spec.shape) if d is not None]
    emit(f"if len(shape) != {spec.ndim}{''.join(' or ' + c for c in static)}: raise _Refused")
    sizes = {}
    for name, dims in (("outer", range(first)), ("inner", range(last + 1, spec.ndim))):
        dynamic = [f"shape[{i}]" for i in dims if spec.shape[i] is None]
        static_part = math.prod(spec.shape[i] for i in dims if spec.shape[i] is not None)
        if dynamic:
            sizes[name] = " * ".join(dynamic + ([str(static_part)] if static_part != 1 else []))
    for name, expr in sizes.items():
        emit(f"{name} = {expr}")
    ghost = entry.arg("batch") is not None
    if ghost:  # ghost batch norm: N a multiple of k, else the checked path says so
        emit("batch = shape[0]")
        emit(f"if batch % {spec.virtual_batch_size}: raise _Refused")
    dyn = [f"shape[{i}]" for i, d in enumerate(spec.shape) if d is None]
    if dyn:
        emit(f"if not ({' and '.join(dyn)}): raise _Refused")  # a zero-sized dimension
    if spec.min_values_per_feature > 1 and not face.partial:
        n_expr = " * ".join([sizes.get("outer", str(plan.outer)), sizes.get("inner", str(plan.inner))])
        emit(f"if {n_expr} < {spec.min_values_per_feature}: raise _Refused")
    others = [p for p in face.params if p.kind == DATA and p.name != "x" and p.used]
    for p in others:
        emit(f"if {p.name}.__class__ is not ndarray or ({p.name}.dtype is not dtype and {p.name}.dtype != dtype) "
             f"or {p.name}.shape != shape: raise _Refused")
    emit("if threads is not None and (threads.__class__ is not int or not 0 < threads <= self._max_threads): raise _Refused")
    # the per-feature arrays, through the kept sets
    kept = [p for p in face.params if p.kind == PARAM and p.used]
    slots = [(p.arg is not None, p.required, p.arg is not None and p.arg.role == Role.PARAM_INOUT) for p in kept]
    memory = KeptSets(kernel, slots, face.lasting)
    k = len(kept)
    if kept:
        emit("kept = last[0][0]")
        same = " or ".join(f"{local(p)} is not kept[{i}]" for i, p in enumerate(kept))
        emit(f"if {same}:")
        emit(f"    pointers, spans = recall({', '.join(local(p) for p in kept)})")
        emit("else:")
        emit(f"    pointers, spans = kept[{k}], kept[{k + 1}]")
        stable = " and ".join(
            f"({local(p)} is None or {local(p)}.dtype is pdtype and {local(p)}.strides == cstrides)"
            if not p.required else f"{local(p)}.dtype is pdtype and {local(p)}.strides == cstrides" for p in kept)
        emit(f"    if not ({stable}): raise _Refused")
        for p, (_, _, writes) in zip(kept, slots):
            if writes:
                emit(f"    if {local(p)} is not None and not {local(p)}.flags.writeable: raise _Refused")
    else:
        emit("pointers, spans = (), ()")
    # the data arrays: C pointers (from_buffer raises ValueError unless C-contiguous)
    data = [p for p in face.params if p.kind == DATA and p.used]
    for p in data:
        emit(f"if not {p.name}.flags.aligned: raise _Refused")
        emit(f"c_{p.name} = from_buffer(data_ct, {p.name})")
    # per-sample statistics (mode 1's backward), per-ghost ones (ghost batch norm's, shape (G, C)) and the
    # split phases' float64 ones: new arrays every step, checked inline
    samples = [p for p in face.params if p.kind in (SAMPLE, GHOST, STAT64)]
    for p in samples:
        if p.kind == STAT64:
            want, ptype, ct = str(stat64_shape(p.arg, plan.channels)), "f64", "double_ct"
        else:
            want = f"shape[:{first}]" if p.kind == SAMPLE else f"(batch // {spec.virtual_batch_size}, channels)"
            ptype, ct = "pdtype", "param_ct"
        emit(f"if {p.name}.__class__ is not ndarray or {p.name}.dtype is not {ptype} or {p.name}.shape != {want} "
             f"or not {p.name}.flags.aligned: raise _Refused")
        emit(f"c_{p.name} = from_buffer({ct}, {p.name})")
        if p.counted:  # (NaN compares false: refused)
            emit(f"if not (least({p.name}[0]) > {spec.min_values_per_feature - 1} and most({p.name}[0]) < inf): "
                 "raise _Refused")
    for p in face.params:
        if p.kind == COUNT:  # (NaN compares false: refused; ints and NumPy's float64 pass as they are)
            emit(f"if {p.name}.__class__ is not float and {p.name}.__class__ is not int and {p.name}.__class__ is not "
                 f"float64 or not (0 < {p.name} < inf and {p.name} >= x.size // channels): raise _Refused")
    out = face.param("out")
    y = out.arg.name if out else None
    if out:
        emit("if out is None:")
        emit(f"    {y} = empty(shape, dtype)")
        emit(f"    c_{y} = from_buffer(data_ct, {y})  # writable: it is new")
        emit("elif out.__class__ is not ndarray or (out.dtype is not dtype and out.dtype != dtype) "
             "or out.shape != shape or not out.flags.aligned:")
        emit("    raise _Refused")
        emit("else:")
        emit(f"    {y} = out")
        emit(f"    c_{y} = from_buffer(data_ct, {y}, True)  # ValueError if read-only")
    # an array written shares memory with no other argument
    emit("if spans or out is not None:" if out else "if spans:")
    emit("    size = x.size")
    for p in data:
        emit(f"    e_{p.name} = c_{p.name} + size")
    emit("    for start, end in spans:")
    emit(f"        if {' or '.join(f'start < e_{p.name} and c_{p.name} < end' for p in data)}: raise _Refused")
    for p in samples:
        emit(f"        if start < c_{p.name} + {p.name}.size and c_{p.name} < end: raise _Refused")
    if out:
        emit("    if out is not None:")
        emit(f"        e_{y} = c_{y} + size")
        emit(f"        if {' or '.join(f'c_{y} < e_{p.name} and c_{p.name} < e_{y}' for p in data)}: raise _Refused")
        emit("        for start in pointers:")
        emit(f"            if start is not null and start < e_{y} and c_{y} < start + channels: raise _Refused")
        for p in samples:
            emit(f"        if c_{p.name} < e_{y} and c_{y} < c_{p.name} + {p.name}.size: raise _Refused")
    body = ["    try:"] + ["        " + line for line in lines]
    body += ["    except (_Refused, ValueError):  # ValueError: from_buffer's refusals",
             "        pass  # the checked path runs below, outside this handler, so its errors chain to nothing",
             "    else:", "        if threads is None: threads = self._threads"]
    # results and the C call, in entry order
    results = {}
    stat_shape = f"shape[:{first}]" if spec.mode == 1 else f"(batch // {spec.virtual_batch_size}, channels)" if ghost else "cshape"
    call, kept_args = [], [p.arg.name for p in kept if p.arg is not None]
    contiguous = kept_args == [a.name for a in entry.args if a.name in kept_args] and _adjacent(entry, kept_args)
    for arg in entry.args:
        if arg.role.is_data:
            call.append(f"c_{arg.name}")
        elif any(p.arg is arg for p in samples):
            call.append(f"c_{arg.name}")
        elif arg.role in (Role.PARAM_IN, Role.PARAM_INOUT):
            if contiguous:
                if arg.name == kept_args[0]:
                    call.append("*pointers")
            else:
                call.append(f"pointers[{kept_args.index(arg.name)}]")
        elif arg.role in (Role.STAT_OUT, Role.GRAD_OUT):
            if arg.name in face.results:
                shape_expr = stat_shape if arg.role == Role.STAT_OUT else "cshape"
                body.append(f"        {arg.name} = empty({shape_expr}, pdtype)")
                call.append(f"from_buffer(param_ct, {arg.name})")
                results[arg.name] = arg.name
            else:
                call.append("null")
        elif arg.role == Role.STAT64_IN:
            call.append(f"c_{arg.name}")
        elif arg.role == Role.STAT64_OUT:
            body.append(f"        {arg.name} = zeros({stat64_shape(arg, plan.channels)})")
            call.append(f"from_buffer(double_ct, {arg.name})")
            results[arg.name] = arg.name
        elif arg.role == Role.COUNT:
            call.append(arg.name)
        elif arg.role == Role.SIZE:
            call.append(arg.name)
        elif arg.role == Role.THREADS:
            call.append("threads")
        elif arg.role == Role.SCALAR:
            call.append(f"s_{arg.name}")
        elif arg.role == Role.FLAG:  # may_stream: into the caller's buffer, not a new array's fresh pages
            call.append("out is not None")
        else:  # pragma: no cover - a role the binder does not know yet
            raise NotImplementedError(f"binder: role {arg.role} of {entry.name}")
    if out:
        results[y] = y
    body.append(f"        run({', '.join(call)})")
    returned = [results.get(name, "None") for name in face.results]
    body.append(f"        return {returned[0] if face.single else '(' + ', '.join(returned) + ',)'}")
    body.append(f"    return checked(self, {', '.join(f'{n}={n}' for n in names)})")
    header = f"def {face.method if face.method != '__call__' else 'call'}{_signature_text(signature)}:"
    source = "\n".join([header] + body) + "\n"
    scope = {
        "_Refused": _Refused, "ndarray": np.ndarray, "MAX_THREADS": MAX_THREADS, "dtype": kernel.dtype,
        "pdtype": kernel.param_dtype, "cshape": (plan.channels,), "cstrides": (kernel.param_dtype.itemsize,),
        "channels": plan.channels, "last": memory.last, "recall": memory.recall, "from_buffer": kernel.ffi.from_buffer,
        "data_ct": kernel.ffi.typeof(kernel.data_ctype), "param_ct": kernel.ffi.typeof(kernel.param_ctype),
        "empty": np.empty, "zeros": np.zeros, "null": kernel.ffi.NULL, "nan": math.nan, "inf": math.inf,
        "f64": np.dtype(np.float64), "float64": np.float64, "double_ct": kernel.ffi.typeof("double[]"),
        "least": np.minimum.reduce, "most": np.maximum.reduce, "run": kernel.entry_function(entry), "checked": checked,
    }
    exec(compile(source, f"<bngen fast {face.method} of {entry.name}>", "exec"), scope)
    function = scope["call" if face.method == "__call__" else face.method]
    function.__name__, function.__qualname__, function.__doc__ = checked.__name__, checked.__qualname__, checked.__doc__
    function.__source__ = source  # for people debugging a refusal
    return function


def _adjacent(entry: Entry, names) -> bool:
    positions = [i for i, a in enumerate(entry.args) if a.name in names]
    return positions == list(range(positions[0], positions[0] + len(positions))) if positions else True


def _signature_text(signature: inspect.Signature) -> str:
    """`signature` as source, defaults written as literals (every default is None)."""
    parts, star = [], False
    for p in signature.parameters.values():
        if p.kind == p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        if p.default is p.empty:
            parts.append(p.name)
        else:
            assert p.default is None, p  # the generated text writes None
            parts.append(f"{p.name}=None")
    return "(" + ", ".join(parts) + ")"
