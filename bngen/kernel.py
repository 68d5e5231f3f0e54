"""The Python callable around a compiled kernel.

Every argument is checked (type, shape, dtype, contiguity, writability, aliasing)
before any C runs, so a bad call raises a message naming the argument and leaves every
caller array untouched.
"""

from __future__ import annotations

import operator
import os
from typing import Any, Optional, Tuple

import numpy as np

from .plan import Entry, Plan
from .spec import Spec

_CTYPES = {"float32": "float", "float64": "double", "float16": "uint16_t", "bfloat16": "uint16_t"}


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a spec dtype name (bfloat16 comes from ml_dtypes)."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:  # pragma: no cover - depends on the environment
            raise TypeError("dtype: bfloat16 arrays need the ml_dtypes package (pip install ml_dtypes)") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def default_threads() -> int:
    """``$OMP_NUM_THREADS`` if set, else the CPUs this process may run on."""
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class Kernel:
    """A compiled batch-normalization kernel for one `Spec`.

    ``kernel(x, gamma, beta, moving_mean, moving_variance, out=None)`` returns y;
    ``kernel.forward(...)`` also returns the batch statistics; ``kernel.backward(dy, x,
    gamma, mean, variance)`` returns ``(dx, dgamma, dbeta)``.  ``kernel.source`` is the
    C that was compiled.  ``threads=`` (default ``$OMP_NUM_THREADS`` or all CPUs) sets
    the thread count of a call; results are identical run to run for a given count.
    """

    def __init__(self, spec: Spec, plan: Plan, source: str, module: Any):
        self.spec = spec
        self.plan = plan
        self.source = source
        self._ffi = module.ffi
        self._lib = module.lib
        self._module = module  # keeps the shared object loaded
        self._dtype = numpy_dtype(spec.dtype)
        self._pdtype = np.dtype(spec.param_dtype)
        self._data_ct = _CTYPES[spec.dtype] + "[]"
        self._param_ct = _CTYPES[spec.param_dtype] + "[]"
        self._forward_entry: Entry = plan.entries[0]
        self._forward_fn = getattr(self._lib, self._forward_entry.name)
        self._backward_entry: Optional[Entry] = plan.backward
        self._backward_fn = self._backward_entry and getattr(self._lib, self._backward_entry.name)
        self._threads = default_threads()
        self._fast_call = _fast_path(self)
        self._fast_backward = _fast_backward_path(self)

    def __repr__(self) -> str:
        return f"<bngen.Kernel {self.spec.describe()}>"

    # -- public calls ------------------------------------------------------------------
    def __call__(self, x, gamma=None, beta=None, moving_mean=None, moving_variance=None, *, out=None, threads=None):
        """Normalise `x`; returns y (written into `out` if given)."""
        done = self._fast_call(x, gamma, beta, moving_mean, moving_variance, out, threads, False)
        if done is not None:
            return done
        y, _, _ = self._run(x, gamma, beta, moving_mean, moving_variance, out, threads, want_stats=False)
        return y

    def forward(self, x, gamma=None, beta=None, moving_mean=None, moving_variance=None, out=None, *, threads=None):
        """Normalise `x` with its own statistics; returns ``(y, mean, variance)``.

        mean and variance are the batch mean and biased batch variance per feature
        (per sample in mode 1, with shape ``x.shape[:axis]``).
        """
        if not self.spec.uses_batch_stats:
            raise TypeError(
                "forward: this is a mode-0 inference kernel, which normalises with moving statistics "
                "and computes none; call kernel(x, gamma, beta, moving_mean, moving_variance) instead"
            )
        done = self._fast_call(x, gamma, beta, moving_mean, moving_variance, out, threads, True)
        if done is not None:
            return done
        return self._run(x, gamma, beta, moving_mean, moving_variance, out, threads, want_stats=True)

    def backward(self, dy, x, gamma=None, mean=None, variance=None, out=None, *, beta=None,
                 moving_mean=None, moving_variance=None, threads=None):
        """Gradients of the forward with respect to x, gamma and beta: ``(dx, dgamma, dbeta)``.

        `dy` is the gradient of the loss with respect to the forward's output y (the
        output after the fused ReLU, if any); `x` is the forward's input.  dx is written
        into `out` if given.  dgamma is None when ``scale=False``, dbeta None when
        ``center=False``.

        Specs that normalise with batch statistics (training, or mode 2): pass the
        ``mean`` and ``variance`` that `forward` returned for this `x`.  The mean's
        rounding to the parameter dtype is corrected from `x` in the same sweep, so float32
        gradients stay accurate when ``|mean| >> std``.  With these,
        ``dbeta = sum(dy)``, ``dgamma = sum(dy * x_hat)`` and
        ``dx = gamma / sqrt(var + eps) / n * (n*dy - sum(dy) - x_hat * sum(dy * x_hat))``.

        Mode-0 inference specs (a frozen layer, as PyTorch's eval mode): the statistics
        are constants, so ``backward(dy, x, gamma, moving_mean, moving_variance)`` --
        the moving statistics in the mean/variance slots, or by keyword -- gives
        ``dx = dy * gamma / sqrt(moving_variance + eps)``,
        ``dgamma = sum(dy * (x - moving_mean) / sqrt(moving_variance + eps))`` and
        ``dbeta = sum(dy)``.

        ``activation="relu"``: dy is first set to 0 where the forward output was not
        positive.  That output depends on beta, so with ``center=True`` pass ``beta=``
        (keyword); it is an error to pass it otherwise.

        Mode 1 (sample-wise) has no backward: TypeError.
        """
        if out is None and self._fast_backward is not None:
            done = self._fast_backward(dy, x, gamma, mean, variance, beta, moving_mean, moving_variance, threads)
            if done is not None:
                return done
        spec, entry = self.spec, self._backward_entry
        if entry is None:
            raise TypeError("backward: mode 1 (sample-wise) kernels have no backward in bngen; use mode 0 or 2")
        x = self._check_x(x)
        dy = self._check_like("dy", dy, x)
        gamma = self._check_param("gamma", gamma, spec.scale, "scale=True" if spec.scale else "the spec has scale=False")
        relu = spec.activation == "relu"
        beta_why = (
            "activation='relu' with center=True: the mask recomputes the forward output, which adds beta; "
            "pass it as beta=" if relu and spec.center
            else "backward needs beta only with activation='relu' and center=True"
        )
        beta = self._check_param("beta", beta, relu and spec.center, beta_why)
        if spec.uses_batch_stats:
            why = f"{'mode 2' if spec.mode == 2 else 'training'} gradients are taken at the statistics forward used"
            self._check_param("moving_mean", moving_mean, False, why + "; pass the batch mean as mean=")
            self._check_param("moving_variance", moving_variance, False, why + "; pass the batch variance as variance=")
            why = "the batch statistics that forward returned"
            mean = self._check_param("mean", mean, True, why)
            variance = self._check_param("variance", variance, True, why)
        else:
            why = "a frozen layer's gradient uses the moving statistics"
            moving_mean = self._check_param("moving_mean", _one_of("moving_mean", moving_mean, "mean", mean), True, why)
            moving_variance = self._check_param(
                "moving_variance", _one_of("moving_variance", moving_variance, "variance", variance), True, why)
        nthreads = self._check_threads(threads)
        dx = self._check_out(out, x.shape)
        _check_no_overlap([("dy", dy), ("out", dx)])
        _check_no_overlap([("x", x), ("out", dx)])

        first, last = spec.axis[0], spec.axis[-1]
        dgamma = np.empty(self.plan.channels, self._pdtype) if spec.scale else None
        dbeta = np.empty(self.plan.channels, self._pdtype) if spec.center else None
        values = {
            "dy": dy, "x": x, "gamma": gamma, "beta": beta, "mean": mean, "variance": variance,
            "moving_mean": moving_mean, "moving_variance": moving_variance, "dx": dx, "dgamma": dgamma,
            "dbeta": dbeta, "outer": int(np.prod(x.shape[:first], dtype=np.int64)),
            "inner": int(np.prod(x.shape[last + 1 :], dtype=np.int64)), "nthreads": nthreads,
        }
        self._backward_fn(*self._bind(entry, values))
        return dx, dgamma, dbeta

    # -- argument checking ---------------------------------------------------------------
    def _check_like(self, name: str, value, x: np.ndarray) -> np.ndarray:
        """An array that must have x's shape and the kernel's dtype (dy)."""
        if not isinstance(value, np.ndarray):
            raise TypeError(f"{name}: expected a numpy.ndarray, got {type(value).__name__}")
        if value.dtype != self._dtype:
            raise TypeError(f"{name}: dtype is {value.dtype}, but the kernel was built for {self.spec.dtype}")
        if value.shape != x.shape:
            raise ValueError(f"{name}: shape {value.shape} does not match the shape of x {x.shape}")
        return value if value.flags.c_contiguous else np.ascontiguousarray(value)

    def _check_x(self, x) -> np.ndarray:
        spec = self.spec
        if not isinstance(x, np.ndarray):
            raise TypeError(f"x: expected a numpy.ndarray, got {type(x).__name__}")
        if x.dtype != self._dtype:
            raise TypeError(f"x: dtype is {x.dtype}, but the kernel was built for {spec.dtype}")
        if x.ndim != spec.ndim or any(
            want is not None and got != want for got, want in zip(x.shape, spec.shape)
        ):
            raise ValueError(f"x: shape {x.shape} does not match the spec's shape {_shape_text(spec.shape)}")
        if x.size == 0:
            raise ValueError(f"x: shape {x.shape} has a zero-sized dimension; every size must be >= 1")
        return x if x.flags.c_contiguous else np.ascontiguousarray(x)

    def _check_param(self, name: str, value, used: bool, why: str, writable: bool = False, required: bool = True):
        if value is None:
            if used and required:
                raise TypeError(f"{name}: required ({why})")
            return None
        if not used:
            raise TypeError(f"{name}: not used by this kernel ({why}); pass None")
        if not isinstance(value, np.ndarray):
            raise TypeError(f"{name}: expected a numpy.ndarray of {self._pdtype}, got {type(value).__name__}")
        if value.dtype != self._pdtype:
            raise TypeError(f"{name}: dtype is {value.dtype}; parameters of a {self.spec.dtype} kernel are {self._pdtype}")
        if value.shape != (self.plan.channels,):
            raise ValueError(f"{name}: shape is {value.shape}; expected ({self.plan.channels},), one value per feature")
        if writable:
            if not value.flags.writeable:
                raise ValueError(f"{name}: is read-only, but training updates it in place")
            if not value.flags.c_contiguous:
                raise ValueError(f"{name}: must be C-contiguous, because training updates it in place")
            return value
        return value if value.flags.c_contiguous else np.ascontiguousarray(value)

    def _check_out(self, out, shape) -> np.ndarray:
        if out is None:
            return np.empty(shape, self._dtype)
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out: expected a numpy.ndarray, got {type(out).__name__}")
        if out.dtype != self._dtype:
            raise TypeError(f"out: dtype is {out.dtype}; expected {self._dtype}")
        if out.shape != tuple(shape):
            raise ValueError(f"out: shape is {out.shape}; expected {tuple(shape)}, the shape of x")
        if not out.flags.c_contiguous:
            raise ValueError("out: must be C-contiguous")
        if not out.flags.writeable:
            raise ValueError("out: is read-only")
        return out

    def _check_threads(self, threads) -> int:
        if threads is None:
            return self._threads
        if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
            raise ValueError(f"threads: {threads!r} must be an int >= 1")
        return int(threads)

    def _run(self, x, gamma, beta, moving_mean, moving_variance, out, threads, want_stats: bool):
        spec, plan = self.spec, self.plan
        x = self._check_x(x)
        gamma = self._check_param("gamma", gamma, spec.scale, "scale=True" if spec.scale else "the spec has scale=False")
        beta = self._check_param("beta", beta, spec.center, "center=True" if spec.center else "the spec has center=False")
        if spec.updates_moving_stats:
            why = "training updates them in place when given"
            moving_mean = self._check_param("moving_mean", moving_mean, True, why, writable=True, required=False)
            moving_variance = self._check_param("moving_variance", moving_variance, True, why, writable=True, required=False)
        elif spec.mode == 0:
            why = "inference normalises with the moving statistics"
            moving_mean = self._check_param("moving_mean", moving_mean, True, why)
            moving_variance = self._check_param("moving_variance", moving_variance, True, why)
        else:
            why = f"mode {spec.mode} keeps no moving statistics"
            self._check_param("moving_mean", moving_mean, False, why)
            self._check_param("moving_variance", moving_variance, False, why)
        nthreads = self._check_threads(threads)

        first, last = spec.axis[0], spec.axis[-1]
        outer = int(np.prod(x.shape[:first], dtype=np.int64))
        inner = int(np.prod(x.shape[last + 1 :], dtype=np.int64))
        if spec.updates_moving_stats and spec.unbiased and outer * inner == 1:
            raise ValueError(
                f"x: shape {x.shape} gives one value per feature, so the unbiased variance n/(n-1) "
                "is undefined (the spec has unbiased=True)"
            )
        y = self._check_out(out, x.shape)
        _check_no_overlap(
            [("x", x), ("gamma", gamma), ("beta", beta), ("out", y), ("moving_mean", moving_mean),
             ("moving_variance", moving_variance)],
            written={"out", "moving_mean", "moving_variance"} if spec.updates_moving_stats else {"out"},
        )

        mean = variance = None
        if want_stats:
            stat_shape = x.shape[:first] if spec.mode == 1 else (plan.channels,)
            mean = np.empty(stat_shape, self._pdtype)
            variance = np.empty(stat_shape, self._pdtype)
        values = {
            "x": x, "y": y, "gamma": gamma, "beta": beta, "moving_mean": moving_mean,
            "moving_variance": moving_variance, "mean": mean, "variance": variance,
            "outer": outer, "inner": inner, "nthreads": nthreads,
        }
        self._forward_fn(*self._bind(self._forward_entry, values))
        return y, mean, variance

    def _bind(self, entry: Entry, values: dict) -> list:
        ffi, args = self._ffi, []
        for arg in entry.args:
            value = values[arg.name]
            if not arg.is_array:
                args.append(value)
            elif value is None:
                args.append(ffi.NULL)
            else:
                ctype = self._data_ct if arg.role in ("data_in", "data_out") else self._param_ct
                args.append(ffi.from_buffer(ctype, value, require_writable=arg.role not in ("data_in", "param_in")))
        return args


# -- the fast path ------------------------------------------------------------------------
# A call whose arrays are all exactly what the kernel needs (arrays of the right dtype and
# shape, C-contiguous, writable where written, no overlap) costs a few identity and tuple
# comparisons plus one ffi.from_buffer per array; from_buffer itself refuses arrays that
# are not C-contiguous and, for written arrays, read-only ones.  Any other call, valid or
# not, takes Kernel._run, whose checks explain what is wrong.  Both run every check before
# any C runs; the fast path only orders them for speed.
def _fast_path(kernel: "Kernel"):
    """The fast-path function of `kernel`: ``(x, gamma, beta, moving_mean,
    moving_variance, out, threads, want_stats)`` -> y (or ``(y, mean, variance)`` with
    want_stats) after running the kernel, or None, having run nothing, when the call
    needs the checked path."""
    spec, plan = kernel.spec, kernel.plan
    layout = _fast_layout(spec)
    if layout is None:
        return lambda *args: None
    first = spec.axis[0]
    ndim = spec.ndim
    lead, tail, static_outer, inner = layout
    dtype, pdtype, cshape = kernel._dtype, kernel._pdtype, (plan.channels,)
    data_ct, param_ct = kernel._data_ct, kernel._param_ct
    from_buffer, null, empty, ndarray = kernel._ffi.from_buffer, kernel._ffi.NULL, np.empty, np.ndarray
    scale, center = spec.scale, spec.center
    moving = "inout" if spec.updates_moving_stats else "in" if spec.mode == 0 else None
    written = moving == "inout"
    unbiased_check = spec.updates_moving_stats and spec.unbiased
    per_sample = spec.mode == 1
    default_threads = kernel._threads
    order = ("x", "y", "gamma", "beta", "moving_mean", "moving_variance", "mean", "variance", "outer", "inner", "nthreads")
    pick = operator.itemgetter(*(order.index(a.name) for a in kernel._forward_entry.args))
    run = kernel._forward_fn

    # Read-only parameter arrays are usually the same objects call after call: the last
    # ones seen are kept (a strong reference, so their memory cannot go away) with their
    # cffi pointers.  Their dtype, shape and contiguity, which can change in place, are
    # checked again on every call; an array's data pointer cannot change while we hold it
    # (NumPy refuses to resize an array referenced elsewhere, unless told refcheck=False,
    # which it documents as unsafe for exactly this reason).
    last = [(None, None, None, None, null, null, null, null)]
    readonly_moving = moving == "in"

    def params(gamma, beta, mm, mv):
        """The cffi pointers of the read-only parameters, or None."""
        for value, used in ((gamma, scale), (beta, center), (mm, readonly_moving), (mv, readonly_moving)):
            if value is None:
                if used:
                    return None
            elif not used or not isinstance(value, ndarray) or value.dtype != pdtype or value.shape != cshape:
                return None
        held = (gamma, beta, mm, mv,
                null if gamma is None else from_buffer(param_ct, gamma),
                null if beta is None else from_buffer(param_ct, beta),
                null if mm is None else from_buffer(param_ct, mm),
                null if mv is None else from_buffer(param_ct, mv))
        last[0] = held  # one store: concurrent callers see an old or a new entry, never a mix
        return held

    share = np.may_share_memory

    def fast(x, gamma, beta, mm, mv, out, threads, want_stats):
        if x.__class__ is not ndarray and not isinstance(x, ndarray):
            return None
        shape = x.shape
        if x.dtype is not dtype and x.dtype != dtype:
            return None
        if (shape != tail) if lead == 0 else (len(shape) != ndim or shape[lead:] != tail):
            return None
        outer = static_outer
        if lead:
            for i in range(lead):
                outer *= shape[i]
        if outer <= 0 or (unbiased_check and outer * inner == 1):
            return None
        if threads is None:
            threads = default_threads
        elif threads.__class__ is not int or threads < 1:
            return None
        try:
            cx = from_buffer(data_ct, x)
            held = last[0]  # one read: a consistent entry even if another thread replaces it
            if gamma is not held[0] or beta is not held[1] or (not written and (mm is not held[2] or mv is not held[3])):
                held = params(gamma, beta, None, None) if written else params(gamma, beta, mm, mv)
                if held is None:
                    return None
            elif not (
                (gamma is None or gamma.dtype is pdtype and gamma.shape == cshape and gamma.flags.c_contiguous)
                and (beta is None or beta.dtype is pdtype and beta.shape == cshape and beta.flags.c_contiguous)
                and (written or mm is None or mm.dtype is pdtype and mm.shape == cshape and mm.flags.c_contiguous)
                and (written or mv is None or mv.dtype is pdtype and mv.shape == cshape and mv.flags.c_contiguous)
            ):
                return None
            if written:  # updated in place: checked afresh every call (writable, no overlap)
                cmm, cmv = _written_params(x, gamma, beta, mm, mv, from_buffer, param_ct, pdtype, cshape, null)
                if cmm is None:
                    return None
            else:
                cmm, cmv = held[6], held[7]
            if out is None:
                y = empty(shape, dtype)
            elif out.__class__ is not ndarray or out.dtype != dtype or out.shape != shape:
                return None
            else:  # written: shares memory with no other argument
                y = out
                for other in (x, gamma, beta, mm, mv):
                    if other is not None and share(y, other):
                        return None
            cy = from_buffer(data_ct, y, True)
        except ValueError:  # not C-contiguous, or read-only where written
            return None
        if want_stats:
            stat_shape = shape[:first] if per_sample else cshape
            mean, variance = empty(stat_shape, pdtype), empty(stat_shape, pdtype)
            cmean, cvar = from_buffer(param_ct, mean, True), from_buffer(param_ct, variance, True)
        else:
            mean = variance = None
            cmean = cvar = null
        run(*pick((cx, cy, held[4], held[5], cmm, cmv, cmean, cvar, outer, inner, threads)))
        return (y, mean, variance) if want_stats else y

    return fast


def _fast_backward_path(kernel: "Kernel"):
    """The fast path of `Kernel.backward` for specs that normalise with batch statistics
    (the training gradient), on the terms of `_fast_path`: ``(dy, x, gamma, mean,
    variance, beta, moving_mean, moving_variance, threads)`` -> ``(dx, dgamma, dbeta)``
    after running the kernel, or None, having run nothing.  None for other specs."""
    spec, plan, entry = kernel.spec, kernel.plan, kernel._backward_entry
    if entry is None or entry.name != "bn_backward":
        return None
    layout = _fast_layout(spec)
    if layout is None:
        return None
    ndim = spec.ndim
    lead, tail, static_outer, inner = layout
    dtype, pdtype, cshape = kernel._dtype, kernel._pdtype, (plan.channels,)
    data_ct, param_ct = kernel._data_ct, kernel._param_ct
    from_buffer, null, empty, ndarray = kernel._ffi.from_buffer, kernel._ffi.NULL, np.empty, np.ndarray
    scale, center = spec.scale, spec.center
    wants_beta = spec.activation == "relu" and center
    default_threads = kernel._threads
    order = ("dy", "x", "gamma", "beta", "mean", "variance", "dx", "dgamma", "dbeta", "outer", "inner", "nthreads")
    pick = operator.itemgetter(*(order.index(a.name) for a in entry.args))
    run = kernel._backward_fn

    def param(value):
        """The pointer to a read-only (C,) parameter, None if it is not one (or None)."""
        if value is None or not isinstance(value, ndarray) or value.dtype != pdtype or value.shape != cshape:
            return None
        return from_buffer(param_ct, value)

    def fast(dy, x, gamma, mean, variance, beta, moving_mean, moving_variance, threads):
        if moving_mean is not None or moving_variance is not None:
            return None
        if not isinstance(x, ndarray) or not isinstance(dy, ndarray):
            return None
        shape = x.shape
        if x.dtype != dtype or dy.dtype != dtype or dy.shape != shape:
            return None
        if (shape != tail) if lead == 0 else (len(shape) != ndim or shape[lead:] != tail):
            return None
        outer = static_outer
        if lead:
            for i in range(lead):
                outer *= shape[i]
        if outer <= 0:
            return None
        if threads is None:
            threads = default_threads
        elif threads.__class__ is not int or threads < 1:
            return None
        if (gamma is None) == scale or (beta is None) == wants_beta:
            return None
        try:
            cdy, cx = from_buffer(data_ct, dy), from_buffer(data_ct, x)
            cg = param(gamma) if scale else null
            cb = param(beta) if wants_beta else null
            cmean, cvar = param(mean), param(variance)
        except ValueError:  # not C-contiguous
            return None
        if cg is None or cb is None or cmean is None or cvar is None:
            return None
        dx = empty(shape, dtype)
        dgamma = empty(cshape, pdtype) if scale else None
        dbeta = empty(cshape, pdtype) if center else None
        run(*pick((cdy, cx, cg, cb, cmean, cvar, from_buffer(data_ct, dx, True),
                   null if dgamma is None else from_buffer(param_ct, dgamma, True),
                   null if dbeta is None else from_buffer(param_ct, dbeta, True), outer, inner, threads)))
        return dx, dgamma, dbeta

    return fast


def _fast_layout(spec: Spec):
    """``(lead, tail, static_outer, inner)`` for the fast paths, which need the spec's
    dynamic sizes to be its leading ones, before the feature axes (x.shape[lead:] must
    equal `tail`, and outer is static_outer times the leading sizes); None for other
    specs, whose calls always take the checked path."""
    first, last = spec.axis[0], spec.axis[-1]
    dynamic = [i for i, d in enumerate(spec.shape) if d is None]
    lead = len(dynamic)
    if dynamic != list(range(lead)) or lead > first:
        return None
    static_outer = int(np.prod(spec.shape[lead:first], dtype=np.int64))
    inner = int(np.prod(spec.shape[last + 1:], dtype=np.int64))
    return lead, spec.shape[lead:], static_outer, inner


def _written_params(x, gamma, beta, mm, mv, from_buffer, ctype, pdtype, cshape, null):
    """Pointers to the moving statistics a training call updates in place (writable,
    sharing memory with nothing else it touches), or (None, None)."""
    out = []
    for value in (mm, mv):
        if value is None:
            out.append(null)
        elif not isinstance(value, np.ndarray) or value.dtype != pdtype or value.shape != cshape:
            return None, None
        else:
            out.append(from_buffer(ctype, value, True))  # ValueError if read-only / not contiguous
    for a, b in ((x, mm), (x, mv), (mm, mv), (gamma, mm), (gamma, mv), (beta, mm), (beta, mv)):
        if a is not None and b is not None and np.may_share_memory(a, b):
            return None, None
    return out[0], out[1]


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
        for name_b, b in present[i + 1 :]:
            if written is not None and name_a not in written and name_b not in written:
                continue
            if np.may_share_memory(a, b):
                raise ValueError(f"{name_b}: shares memory with {name_a}; pass separate arrays")
