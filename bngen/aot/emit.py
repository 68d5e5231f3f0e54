"""Ahead-of-time export: a spec as freestanding C99 source and a documented header.

`emit` renders the same templates as the JIT path (common.c.j2, channel.c.j2,
forward_<schedule>.c.j2, macros.j2) with an export variant of the `Plan`: no threads,
`omp simd` pragmas guarded by ``#ifdef _OPENMP``, C symbols named after the user's
`name`, and the arithmetic type of the target.  With `params`, a mode-0 inference spec
gets its per-feature scale and shift folded at generation time and baked in as
constants (templates/baked.c.j2): one multiply-add per element and no libm.
float16/bfloat16 data are uint16_t bit patterns, with float parameters and arithmetic;
the `Target` chooses how float16 is converted (the FPU's __fp16 on Arm, bits elsewhere).

With ``harness=True`` it also writes a test program and reference vectors from the
float64 oracle, so that every entry point can be checked on the board it will run on.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Dict, List, Mapping, NamedTuple, Optional, Tuple

import numpy as np

from .. import oracle
from ..codegen.c_names import LIBRARY, reserved_because
from ..codegen.render import render_template
from ..core.dtypes import numpy_dtype
from ..core.spec import Spec, SpecError
from ..plan.entries import Entry, baked_entry, runtime_sizes
from ..plan.plan import Plan, make_plan
from ..plan.target import Target, get_export_target

PARAM_NAMES = ("gamma", "beta", "moving_mean", "moving_variance")
# Sizes given to dynamic dimensions in the harness (small: the vectors go to flash).
HARNESS_DYNAMIC_SIZE = 3
HARNESS_SEED = 20240501
# Tolerances are this many units in the last place of the data type, times the
# magnitude of the terms that make up a value (see `tolerances`).
TOLERANCE_ULPS = 16

# The longest name: its longest file, NAME_test_vectors.h, must fit in a file name (255
# bytes on every common file system).
MAX_NAME = 255 - len("_test_vectors.h")
# What the files make of the name: the entry points, and the header's macros.
_SYMBOL_SUFFIXES = ("", "_backward")
_MACRO_SUFFIXES = ("_H", "_CHANNELS", "_OUTER", "_INNER", "_SIZE")


def emit(spec: Spec, out_dir, name: str = "bn", params: Optional[Mapping] = None, *, target: str = "host",
         harness: bool = False) -> List[Path]:
    """Write `name`.c and `name`.h for `spec` into `out_dir`; return the written paths.

    `params`: a mapping (dict or loaded ``.npz``) with ``moving_mean``,
    ``moving_variance`` and, as the spec uses them, ``gamma`` and ``beta``.  It bakes the
    folded per-feature scale and shift into a mode-0 inference kernel; with a fully
    static shape the entry point is exactly ``void name(const T *x, T *y);`` (T is
    float, double, or uint16_t holding float16/bfloat16 bit patterns).
    `target`: "host", "aarch64" or "cortex-m" (single precision throughout).
    `harness`: also write `name`_test.c and `name`_test_vectors.h, a self-check of every
    entry point (`calls`) against the float64 oracle that runs on the host or on a board.

    Everything is checked before anything is written; emitting twice gives
    byte-identical files.
    """
    if not isinstance(spec, Spec):
        raise TypeError(f"spec: expected a bngen.Spec, got {type(spec).__name__}")
    name = check_name(name)
    tgt = get_target(target)
    check_exportable(spec, tgt, baked=params is not None)
    coefficients = None if params is None else fold_parameters(spec, params)
    plan = export_plan(spec, name, tgt, baked=coefficients is not None)
    if coefficients is not None:
        check_folded(coefficients, plan.precision.compute)
    files = render_files(plan, tgt, coefficients)
    if harness:
        files.update(render_harness(plan, tgt, params))
    check_no_clash(plan, files)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, text in files.items():
        path = out / filename
        with open(path, "w", encoding="ascii", newline="\n") as f:
            f.write(text)
        written.append(path)
    return written


# -- checks -------------------------------------------------------------------------------
def check_name(name) -> str:
    """`name` if it can prefix C identifiers (symbols, macros, file names): none of the
    identifiers made from it is one C reserves (keywords, library names, _-prefixed names,
    the future library directions) and its files' names fit a file system."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"name: {name!r} is not a C identifier (letters, digits and _, not starting with a digit)")
    if len(name) > MAX_NAME:
        raise ValueError(f"name: {len(name)} characters; at most {MAX_NAME}, so that {name[:8]}..._test_vectors.h "
                         "fits in a file name")
    made = [name + s for s in _SYMBOL_SUFFIXES] + [name.upper() + s for s in _MACRO_SUFFIXES]
    for identifier in made:
        why = reserved_because(identifier)
        if why is not None:
            gives = "" if identifier == name else f" gives {identifier!r}, which is"
            raise ValueError(f"name: {name!r}{gives or ' is'} {why}; choose another name")
    return name


# The names the emitted files define inside (macros, types, helpers, constants).
_INTERNAL = re.compile(
    r"#define (\w+)|typedef [^;]*?(\w+);|^static[^;={]*?\b(\w+)\s*\(|^static const \w+ (\w+)\[|enum \{ (\w+)", re.M
)


def check_no_clash(plan: Plan, files: Mapping[str, str]) -> None:
    """Raises if an entry point's C name is also a name the emitted files use inside
    (a macro, type, helper or constant) or one the C library keeps (`check_name` refuses
    those already; kept here as well so that no path around it emits a clash)."""
    internal = set(LIBRARY)
    for filename, text in files.items():
        if filename.endswith(".c"):
            internal.update(n for groups in _INTERNAL.findall(text) for n in groups if n)
    for entry in plan.entries:
        symbol = plan.symbol(entry)
        if symbol in internal:
            raise ValueError(f"name: {plan.prefix!r} gives the C name {symbol!r}, which the emitted code uses "
                             "for something else; choose another name")


def get_target(target) -> Target:
    """The `Target` preset called `target`."""
    return get_export_target(target)


def check_exportable(spec: Spec, target: Target, baked: bool = False) -> None:
    """Raises if `spec` cannot be exported for `target` (`baked`: with folded parameters,
    which leave epsilon out of the C).  The statistics variants change training only: their
    inference specs export as plain ones; a training export of them is refused (their JIT
    kernels compute them)."""
    if spec.training:
        for field, on in (("renorm", spec.renorm), ("virtual_batch_size", spec.virtual_batch_size is not None),
                          ("adjustment", spec.adjustment)):
            if on:
                raise ValueError(
                    f"spec: {field}={getattr(spec, field)!r} with training=True cannot be exported (bngen emit writes "
                    "the plain training kernels only); export the inference kernel (training=False), which the "
                    "statistics variants do not change, or use bngen.build for training"
                )
    if target.single_precision and spec.dtype == "float64":
        raise ValueError(
            f"dtype: float64 on target {target.name!r}, which is single precision throughout "
            "(doubles would be emulated in software); use dtype='float32' or target='host'/'aarch64'"
        )
    tiny = float(np.finfo(np.float32).tiny)
    if target.stat == "float" and not baked and spec.epsilon < tiny:
        # it would round to 0 (or a subnormal) in float: a constant feature gives 0/0 = NaN, not beta
        raise SpecError(f"epsilon: {spec.epsilon!r} is below the smallest normal float ({tiny:.3g}), which "
                        f"target {target.name!r} computes in; use a larger epsilon (or bake the parameters)")
    elements = math.prod(d for d in spec.shape if d is not None)
    limit = 2 ** (target.ptrdiff_bits - 1) - 1
    if elements > limit:
        raise SpecError(f"shape: {list(spec.shape)} has {elements} elements; target {target.name!r} indexes them "
                        f"with a {target.ptrdiff_bits}-bit ptrdiff_t, which counts at most {limit}")


def check_folded(coefficients: Tuple[np.ndarray, np.ndarray], ctype: str) -> None:
    """Raises if a folded scale or shift overflows `ctype`, the C type it is baked in as
    (it would be written as inf)."""
    dtype = np.float32 if ctype == "float" else np.float64
    biggest = float(np.finfo(dtype).max)
    for what, values in zip(("scale", "shift"), coefficients):
        bad = np.flatnonzero(~(np.abs(values) <= biggest))
        if bad.size:
            raise ValueError(
                f"params: the folded {what} of feature {bad[0]} is {values[bad[0]]:.6g}, beyond the largest "
                f"{ctype} ({biggest:.6g}); gamma / sqrt(moving_variance + epsilon) and beta - moving_mean * scale "
                "must fit the kernel's arithmetic")


def fold_parameters(spec: Spec, params: Mapping) -> Tuple[np.ndarray, np.ndarray]:
    """The per-feature (scale, shift) of a mode-0 inference spec, in float64:
    scale = gamma / sqrt(moving_variance + epsilon), shift = beta - moving_mean * scale."""
    if spec.uses_batch_stats:
        why = "training normalises with batch statistics" if spec.training else f"mode {spec.mode} uses batch statistics"
        raise ValueError(
            f"params: only a mode-0 inference spec (training=False, mode=0) can bake its parameters; "
            f"this spec has training={spec.training}, mode={spec.mode} ({why}); emit it without params"
        )
    p = check_params(spec, params)
    with np.errstate(over="ignore", invalid="ignore"):  # check_folded names what overflows
        return oracle.inference_coefficients(p.get("gamma"), p.get("beta"), p["moving_mean"], p["moving_variance"],
                                             spec.epsilon)


def check_params(spec: Spec, params: Mapping) -> Dict[str, np.ndarray]:
    """The parameter arrays of `params` that `spec` uses, as float64, checked."""
    if not hasattr(params, "keys") or not hasattr(params, "__getitem__"):
        raise TypeError(f"params: expected a mapping (dict or loaded .npz) of arrays, got {type(params).__name__}")
    keys = set(params.keys())
    wanted = {"moving_mean", "moving_variance"} | ({"gamma"} if spec.scale else set()) | ({"beta"} if spec.center else set())
    unknown = sorted(keys - set(PARAM_NAMES))
    if unknown:
        raise ValueError(f"params: unknown array(s) {', '.join(unknown)}; expected {', '.join(sorted(wanted))}")
    for unused, flag in (("gamma", "scale"), ("beta", "center")):
        if unused in keys and unused not in wanted:
            raise ValueError(f"params: {unused} given, but the spec has {flag}=False; leave it out")
    missing = sorted(wanted - keys)
    if missing:
        raise ValueError(f"params: missing {', '.join(missing)}")
    result = {}
    for key in sorted(wanted):
        value = np.asarray(params[key])
        if value.dtype.kind not in "fiu":
            raise TypeError(f"params: {key} has dtype {value.dtype}; expected real numbers")
        if value.shape != (spec.channels,):
            raise ValueError(f"params: {key} has shape {value.shape}; expected ({spec.channels},), one value per feature")
        value = value.astype(np.float64)
        if not np.all(np.isfinite(value)):
            raise ValueError(f"params: {key} holds NaN or infinite values")
        result[key] = value
    if np.any(result["moving_variance"] + spec.epsilon <= 0):
        raise ValueError("params: moving_variance + epsilon must be > 0 for every feature")
    return result


# -- plan and rendering --------------------------------------------------------------------
def export_plan(spec: Spec, name: str, target: Target, baked: bool = False) -> Plan:
    """The plan of `spec` exported for `target`: freestanding, symbols prefixed `name`."""
    plan = make_plan(spec, target, prefix=name)
    if baked:
        plan = dataclasses.replace(plan, entries=(baked_entry(spec, runtime_sizes(plan.outer, plan.inner, plan.threaded)),))
    return plan


def render_files(plan: Plan, target: Target, coefficients=None) -> Dict[str, str]:
    """{file name: text} of the kernel's source and header."""
    name = plan.prefix
    baked = coefficients is not None
    extra = dict(name=name, target=target, baked=baked, uses_math=not baked, kind=kind_text(plan, baked))
    if baked:
        extra.update(scale=[float(v) for v in coefficients[0]], shift=[float(v) for v in coefficients[1]])
    return {
        f"{name}.c": render_template("export.c.j2", plan, **extra),
        f"{name}.h": render_template("export.h.j2", plan, **extra),
    }


def kind_text(plan: Plan, baked: bool) -> str:
    """What the file holds, for its banner."""
    spec = plan.spec
    if baked:
        return "Inference, parameters baked in and folded"
    if not spec.uses_batch_stats:
        return "Inference, runtime parameters"
    if spec.training:
        return "Training forward" + ("" if plan.entry("bn_backward") is None else " and backward")
    return "Forward with batch statistics"


# -- the harness ---------------------------------------------------------------------------
class Case(NamedTuple):
    """One call of an entry point: its inputs, the oracle's outputs and tolerances."""

    outer: int
    inner: int
    inputs: Dict[str, np.ndarray]  # by argument name, in the entry's dtypes
    expected: Dict[str, np.ndarray]  # float64, by output argument name
    tolerance: Dict[str, float]
    entry: Optional[str] = None  # the entry point's name in the plan (None: the first one)
    null: Tuple[str, ...] = ()  # nullable arguments passed as NULL (their outputs are not expected)


def harness_case(plan: Plan, params: Optional[Mapping] = None, seed: int = HARNESS_SEED) -> Case:
    """Deterministic inputs for the first entry point of `plan` and what it must return."""
    return harness_cases(plan, params, seed)[0]


def harness_cases(plan: Plan, params: Optional[Mapping] = None, seed: int = HARNESS_SEED) -> List[Case]:
    """Deterministic calls of every entry point of `plan` (`calls`) and what they must return."""
    spec = plan.spec
    shape = tuple(HARNESS_DYNAMIC_SIZE if d is None else d for d in spec.shape)
    rng = np.random.default_rng(seed)
    c = spec.channels
    dtype = numpy_dtype(spec.dtype)
    pdtype = np.dtype(spec.param_dtype)
    # Per-feature offsets and spreads, so statistics differ between features.
    bshape = [shape[a] if a in spec.axis else 1 for a in range(len(shape))]
    centre = rng.uniform(-2, 2, c).reshape(bshape)
    spread = rng.uniform(0.5, 2, c).reshape(bshape)
    x = (centre + spread * rng.standard_normal(shape)).astype(dtype)
    if params is not None:
        values = check_params(spec, params)  # baked: the float64 values the constants were folded from
    else:
        values = {
            "gamma": rng.uniform(0.5, 1.5, c), "beta": rng.normal(0, 0.5, c),
            "moving_mean": rng.normal(0, 0.5, c), "moving_variance": rng.uniform(0.5, 2, c),
        }
        values = {k: v.astype(pdtype) for k, v in values.items()}
    dy = rng.standard_normal(shape).astype(dtype) if plan.backward else None
    residual = rng.standard_normal(shape).astype(dtype) if spec.residual else None
    return make_cases(plan, x, values, dy, residual)


def calls(plan: Plan) -> List[Tuple[Entry, Tuple[str, ...]]]:
    """The calls that exercise every entry point of `plan`: ``(entry, arguments passed as
    NULL)``, each entry once with every argument, and a training forward a second time
    without its moving statistics."""
    result = []
    for entry in plan.entries:
        result.append((entry, ()))
        moving = tuple(a.name for a in entry.args if a.nullable and a.role == "param_inout")
        if moving:
            result.append((entry, moving))
    return result


def make_cases(plan: Plan, x: np.ndarray, values: Mapping[str, np.ndarray], dy: Optional[np.ndarray] = None,
               residual: Optional[np.ndarray] = None) -> List[Case]:
    """The `Case` of every call in `calls(plan)` on `x`, parameter `values`, (for the
    gradient entry points) the incoming gradient `dy` and (``residual=True``) the `residual`.  With a fused ReLU, dy is zeroed
    where the forward output before the ReLU is within twice its tolerance of 0: there
    the kernel (which recomputes that output) and the oracle may mask differently, and
    with dy = 0 the gradient does not depend on the mask."""
    spec = plan.spec
    if dy is not None and spec.activation == "relu" and plan.backward:
        plain = spec.replace(activation=None)
        gamma, beta = values.get("gamma") if spec.scale else None, values.get("beta") if spec.center else None
        mm, mv = (values.get("moving_mean"), values.get("moving_variance")) if spec.mode == 0 else (None, None)
        ref = oracle.forward(plain, x, gamma, beta, mm, mv)
        edge = np.abs(ref.y) <= 2 * tolerances(spec, x, values, ref)["y"]
        dy = np.where(edge, np.zeros((), dy.dtype), dy)
    return [make_case(plan, x, values, entry=entry.name, dy=dy, null=null, residual=residual)
            for entry, null in calls(plan)]


def make_case(plan: Plan, x: np.ndarray, values: Mapping[str, np.ndarray], entry: Optional[str] = None,
              dy: Optional[np.ndarray] = None, null: Tuple[str, ...] = (), residual: Optional[np.ndarray] = None) -> Case:
    """The `Case` of calling the entry point `entry` (default: the first) of `plan` on `x`
    and parameter `values` (the parameters the entry does not take are ignored), with the
    nullable arguments `null` passed as NULL.  A gradient entry point also takes `dy`,
    and the statistics a training forward returns, rounded to the parameter dtype; a
    forward of ``residual=True`` takes `residual`."""
    spec = plan.spec
    entry_ = plan.entries[0] if entry is None else plan.entry(entry)
    if entry_ is None:
        raise ValueError(f"entry: {entry!r} is not an entry point of this plan")
    first, last = spec.axis[0], spec.axis[-1]
    outer = int(np.prod(x.shape[:first], dtype=np.int64))
    inner = int(np.prod(x.shape[last + 1:], dtype=np.int64))
    ref = oracle.forward(
        spec, x,
        values.get("gamma") if spec.scale else None, values.get("beta") if spec.center else None,
        values.get("moving_mean") if spec.mode == 0 else None, values.get("moving_variance") if spec.mode == 0 else None,
        residual=residual,
    )
    inputs = {}
    for arg in entry_.args:
        if arg.name == "x":
            inputs["x"] = x
        elif arg.name == "residual":
            inputs["residual"] = residual
        elif arg.name == "dy":
            inputs["dy"] = dy
        elif arg.role == "param_in" and arg.name in ("mean", "variance") and entry_.name == "bn_backward":
            inputs[arg.name] = getattr(ref, arg.name).reshape(-1).astype(spec.param_dtype)  # as forward returned them
        elif arg.role in ("param_in", "param_inout"):  # (also when passed as NULL: the driver reads every input)
            inputs[arg.name] = values[arg.name]
    if entry_.name in ("bn_backward", "bn_backward_frozen"):
        beta = values.get("beta") if spec.center and spec.activation == "relu" else None
        gamma = values.get("gamma") if spec.scale else None
        if entry_.name == "bn_backward":  # the kernel corrects the mean's rounding from x: the exact mean
            grads = oracle.backward(spec, dy, x, gamma, None, inputs["variance"], beta=beta)
        else:
            grads = oracle.backward(spec, dy, x, gamma, values["moving_mean"], values["moving_variance"], beta=beta)
        expected = {"dx": grads.dx, "dgamma": grads.dgamma, "dbeta": grads.dbeta}
        tolerance = gradient_tolerances(spec, x, dy, values, grads)
    else:
        expected = {"y": ref.y}
        if spec.uses_batch_stats:
            expected.update(mean=ref.mean, variance=ref.variance)
        if spec.updates_moving_stats:
            expected.update(moving_mean=ref.moving_mean, moving_variance=ref.moving_variance)
        tolerance = tolerances(spec, x, values, ref, residual)
    names = {a.name for a in entry_.args if a.role in OUTPUT_ROLES and a.name not in null}
    expected = {k: v for k, v in expected.items() if k in names}
    return Case(outer, inner, inputs, expected, {k: tolerance[k] for k in expected},
                None if entry is None else entry_.name, tuple(null))


# Roles of the arguments an entry point writes.
OUTPUT_ROLES = ("data_out", "stat_out", "param_inout", "grad_out")


def tolerances(spec: Spec, x, values, ref, residual=None) -> Dict[str, float]:
    """Absolute tolerances: TOLERANCE_ULPS units of the arithmetic's precision times the
    magnitude of the terms each output is made of (so cancellation is allowed for, and
    a formula that loses precision, like a one-pass variance, is not; the residual is
    one more term of y).  Half-precision y adds one unit of its storage type: half for
    the kernel's rounding, half for the expected value's."""
    eps = float(np.finfo(np.dtype(spec.param_dtype)).eps) * TOLERANCE_ULPS
    x = np.asarray(x, np.float64)
    mag_x = float(np.max(np.abs(x)))
    gamma = np.abs(np.asarray(values["gamma"], np.float64)) if spec.scale else np.ones(spec.channels)
    if spec.uses_batch_stats:
        var = np.asarray(ref.variance, np.float64)
        std = float(np.sqrt(np.max(var)))
        # The slope of y in x: gamma / sqrt(var + eps), largest where var is smallest.
        slope = float(np.max(gamma)) / float(np.sqrt(np.min(var) + spec.epsilon))
        mag_y = mag_x * slope + float(np.max(np.abs(ref.y)))
    else:
        a = gamma / np.sqrt(np.asarray(values["moving_variance"], np.float64) + spec.epsilon)
        b = np.abs(np.asarray(values["moving_mean"], np.float64)) * a
        # Folded inference computes x * a + (beta - mean * a): both terms count.
        mag_y = mag_x * float(np.max(a)) + float(np.max(b)) + float(np.max(np.abs(ref.y)))
        var, std = None, 0.0
    if residual is not None:
        mag_y += float(np.max(np.abs(np.asarray(residual, np.float64))))
    tol = {"y": eps * mag_y}
    if spec.dtype in ("float16", "bfloat16"):
        storage = ml_finfo(spec.dtype)
        tol["y"] += float(storage.eps) * mag_y + float(storage.smallest_subnormal)
    if var is not None:
        tol["mean"] = eps * mag_x
        tol["variance"] = eps * (float(np.max(var)) + std * mag_x)
    if spec.updates_moving_stats:
        tol["moving_mean"] = eps * (mag_x + float(np.max(np.abs(ref.moving_mean))))
        tol["moving_variance"] = eps * (float(np.max(ref.moving_variance)) + float(np.max(var)) + std * mag_x)
    return tol


def gradient_tolerances(spec: Spec, x, dy, values, grads) -> Dict[str, float]:
    """Absolute tolerances of dx, dgamma and dbeta, in the manner of `tolerances`: each
    output's terms are at most |gamma| r |dy| (1 + 2 x_hat^2) for dx (r = 1 / sqrt(variance
    + epsilon)), n |dy| |x_hat| for dgamma and n |dy| for dbeta (n values summed); and
    x_hat = (x - mean) * r itself is known to |x| r units of the arithmetic (the mean of
    values far from 0 is rounded like them), which its factors carry into dx and dgamma."""
    eps = float(np.finfo(np.dtype(spec.param_dtype)).eps) * TOLERANCE_ULPS
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    axes = oracle.reduce_axes(spec)
    if spec.uses_batch_stats:
        mean, var = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
    else:
        bshape = [x.shape[a] if a in spec.axis else 1 for a in range(x.ndim)]
        mean = np.asarray(values["moving_mean"], np.float64).reshape(bshape)
        var = np.asarray(values["moving_variance"], np.float64).reshape(bshape)
    r = 1 / np.sqrt(var + spec.epsilon)
    gamma = float(np.max(np.abs(np.asarray(values["gamma"], np.float64)))) if spec.scale else 1.0
    dy_scale = float(np.max(np.abs(dy)))
    xhat_scale = float(np.max(np.abs((x - mean) * r))) + 1
    n = x.size // spec.channels  # values per dgamma and dbeta sum
    xhat_error = float(np.max(np.abs(x) * r)) + 1  # in units of the arithmetic
    tol = {
        "dx": eps * gamma * float(np.max(r)) * dy_scale * (1 + 2 * xhat_scale**2 + 4 * xhat_scale * xhat_error),
        "dgamma": eps * n * dy_scale * (xhat_scale + xhat_error),
        "dbeta": eps * n * dy_scale,
    }
    if spec.dtype in ("float16", "bfloat16"):
        storage = ml_finfo(spec.dtype)
        tol["dx"] += float(storage.eps) * float(np.max(np.abs(grads.dx))) + float(storage.smallest_subnormal)
    return tol


def ml_finfo(dtype: str):
    """`finfo` of a half-precision storage dtype (bfloat16 from ml_dtypes)."""
    import ml_dtypes

    return ml_dtypes.finfo(numpy_dtype(dtype))


def render_harness(plan: Plan, target: Target, params: Optional[Mapping] = None) -> Dict[str, str]:
    """{file name: text} of the test program and its reference vectors: every call of
    `calls(plan)`.  The first call's arrays are NAME_in_ARG, NAME_want_ARG and NAME_tol_ARG;
    a later call's carry its tag (NAME_backward_want_dx, ...), and an input equal to one
    already written is not written again."""
    name = plan.prefix
    half = plan.precision.half
    T, P = plan.precision.data, plan.precision.param
    arrays: List[Tuple[str, list, str]] = []  # (C name, values, C type), in file order
    written: Dict[tuple, str] = {}  # (C type, values) -> the C name of an input already written
    runs = []
    for case, (entry, null) in zip(harness_cases(plan, params), calls(plan)):
        tag = "" if not runs else "_" + call_tag(entry, null)
        inputs = {}
        for key, a in case.inputs.items():
            data = key in ("x", "dy")
            if data and half:  # bit patterns
                values = [int(v) for v in np.asarray(a).view(np.uint16).reshape(-1)]
            else:
                values = [float(v) for v in np.asarray(a).reshape(-1)]
            ctype = T if data else P
            cname = written.get((ctype, tuple(values)))
            if cname is None:
                cname = written[(ctype, tuple(values))] = f"{name}{tag}_in_{key}"
                arrays.append((cname, values, ctype))
            inputs[key] = cname
        expected = {}
        for key, a in case.expected.items():
            if half and key in ("y", "dx"):  # rounded to the storage type (then exact in float)
                a = np.asarray(a).astype(numpy_dtype(half))
            expected[key] = [float(v) for v in np.asarray(a).reshape(-1)]
        runs.append(dict(entry=entry, null=null, tag=tag, case=case, inputs=inputs, expected=expected,
                         note=" (moving statistics NULL)" if null else ""))
    lengths = list(dict.fromkeys(a.name for run in runs for a in run["entry"].args if a.is_array))  # every array, once
    outputs = list({a.name: a for run in runs for a in run["entry"].args if a.role in OUTPUT_ROLES}.values())
    symbols = list(dict.fromkeys(plan.symbol(run["entry"]) for run in runs))
    extra = dict(name=name, target=target, runs=runs, arrays=arrays, case=runs[0]["case"], lengths=lengths,
                 outputs=outputs, symbols=symbols)
    return {
        f"{name}_test.c": render_template("harness.c.j2", plan, **extra),
        f"{name}_test_vectors.h": render_template("harness_vectors.h.j2", plan, **extra),
    }


def call_tag(entry: Entry, null: Tuple[str, ...]) -> str:
    """A C-identifier tag for one call of `calls`: the entry's name after "bn_", and
    "_no_moving" when its moving statistics are NULL."""
    return entry.name[len("bn_"):] + ("_no_moving" if null else "")
