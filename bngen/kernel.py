"""The Python callable around a compiled kernel.

Every argument is checked (type, shape, dtype, contiguity, writability, aliasing)
before any C runs, so a bad call raises a message naming the argument and leaves every
caller array untouched.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Tuple

import numpy as np

from .plan import Entry, Plan
from .spec import Spec

_CTYPES = {"float32": "float", "float64": "double", "float16": "uint16_t", "bfloat16": "uint16_t"}
# The most threads a call may ask for.  OpenMP would try to start any number (and the
# process dies when it cannot: 10**5 crash it), and C takes an int; no machine bngen runs
# on has more CPUs than this.
MAX_THREADS = 1024


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
    """``$OMP_NUM_THREADS`` if set, else the CPUs this process may run on (at most MAX_THREADS)."""
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return min(int(env), MAX_THREADS)
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        count = os.cpu_count() or 1
    return min(count, MAX_THREADS)


class Kernel:
    """A compiled batch-normalization kernel for one `Spec`.

    ``kernel(x, gamma, beta, moving_mean, moving_variance, out=None)`` returns y;
    ``kernel.forward(...)`` also returns the batch statistics; ``kernel.backward(dy, x,
    gamma, mean, variance)`` returns ``(dx, dgamma, dbeta)``.  ``kernel.source`` is the
    C that was compiled.  ``threads=`` (default ``$OMP_NUM_THREADS`` or all CPUs; at most
    `MAX_THREADS`) sets the thread count of a call; results are identical run to run for
    a given count.
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
        self._fast_forward = _fast_path(self, want_stats=True) if spec.uses_batch_stats else None
        # The fast paths of __call__ and backward become methods of a class of this kernel's own
        # (Python looks __call__ up on the type): one Python frame per call instead of two, about
        # 0.1 us.  The calls they refuse take the checked path, as before.
        fast = {"__call__": _fast_path(self, want_stats=False), "backward": _fast_backward_path(self)}
        fast = {name: method for name, method in fast.items() if method is not None}
        if fast:
            self.__class__ = type("Kernel", (Kernel,), dict(
                fast, __doc__=Kernel.__doc__, __module__=Kernel.__module__, __qualname__=Kernel.__qualname__))

    def __repr__(self) -> str:
        return f"<bngen.Kernel {self.spec.describe()}>"

    # -- public calls ------------------------------------------------------------------
    def __call__(self, x, gamma=None, beta=None, moving_mean=None, moving_variance=None, *, out=None, threads=None):
        """Normalise `x`; returns y (written into `out` if given)."""
        # The checked path; a kernel with a fast path calls that instead (see __init__).
        y, _, _ = self._run(x, gamma, beta, moving_mean, moving_variance, out, threads, want_stats=False)
        return y

    def forward(self, x, gamma=None, beta=None, moving_mean=None, moving_variance=None, out=None, *, threads=None):
        """Normalise `x` with its own statistics; returns ``(y, mean, variance)``.

        mean and variance are the batch mean and biased batch variance per feature
        (per sample in mode 1, with shape ``x.shape[:axis]``).
        """
        if self._fast_forward is not None:  # it takes the checked path itself when needed
            return self._fast_forward(self, x, gamma, beta, moving_mean, moving_variance, out=out, threads=threads)
        if not self.spec.uses_batch_stats:
            raise TypeError(
                "forward: this is a mode-0 inference kernel, which normalises with moving statistics "
                "and computes none; call kernel(x, gamma, beta, moving_mean, moving_variance) instead"
            )
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
        # The checked path; a kernel with a fast path calls that instead (see __init__).
        spec, entry = self.spec, self._backward_entry
        if entry is None:
            raise TypeError("backward: mode 1 (sample-wise) kernels have no backward in bngen; use mode 0 or 2")
        # The caller's arrays, before any contiguous copy: out must not share memory with them.
        given = [("dy", dy), ("x", x), ("gamma", gamma), ("beta", beta), ("mean", mean), ("variance", variance),
                 ("moving_mean", moving_mean), ("moving_variance", moving_variance)]
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
        _check_no_overlap(given + [("out", dx)], written={"out"})

        first, last = spec.axis[0], spec.axis[-1]
        dgamma = np.empty(self.plan.channels, self._pdtype) if spec.scale else None
        dbeta = np.empty(self.plan.channels, self._pdtype) if spec.center else None
        values = {
            "dy": dy, "x": x, "gamma": gamma, "beta": beta, "mean": mean, "variance": variance,
            "moving_mean": moving_mean, "moving_variance": moving_variance, "dx": _aligned_target(dx), "dgamma": dgamma,
            "dbeta": dbeta, "outer": int(np.prod(x.shape[:first], dtype=np.int64)),
            "inner": int(np.prod(x.shape[last + 1 :], dtype=np.int64)), "nthreads": nthreads,
        }
        self._backward_fn(*self._bind(entry, values))
        if values["dx"] is not dx:
            dx[...] = values["dx"]
        return dx, dgamma, dbeta

    # -- split phases: a training step cut where statistics cross processes ----------------------
    def moments(self, x, *, threads=None) -> np.ndarray:
        """This batch's moments per feature: a float64 array of shape (3, C) holding the
        count, the mean and M2 (the sum of squared deviations from the mean), computed
        with the blocked accuracy of `forward`.  Moments of several batches merge with
        Chan's formula (`bngen.distributed.merge_moments`) into those of their union;
        `normalize` takes the merged ones.  x may have an empty batch (count 0).
        """
        entry = self._split_entry("bn_moments", "moments")
        x = self._check_x(x, allow_empty=True)
        nthreads = self._check_threads(threads)
        moments = np.zeros((3, self.plan.channels), np.float64)
        values = dict(self._split_sizes(x), x=x, moments=moments, nthreads=nthreads)
        self._lib_call(entry, values)
        return moments

    def normalize(self, x, gamma=None, beta=None, moving_mean=None, moving_variance=None, *, moments,
                  out=None, threads=None):
        """`forward` with the statistics of `moments` (shape (3, C), float64: count,
        mean, M2, e.g. merged over every process's batch) instead of x's own; returns
        ``(y, mean, variance)`` (the merged mean and biased variance, in the parameter
        dtype).  Mode 0 training updates `moving_mean` / `moving_variance` in place when
        given, ``unbiased=True`` with the merged count.  x may have an empty batch: the
        moving statistics are still updated, as on every other process.
        """
        spec = self.spec
        entry = self._split_entry("bn_normalize", "normalize")
        given = [("x", x), ("gamma", gamma), ("beta", beta), ("out", out), ("moving_mean", moving_mean),
                 ("moving_variance", moving_variance)]
        x = self._check_x(x, allow_empty=True)
        gamma = self._check_param("gamma", gamma, spec.scale, "scale=True" if spec.scale else "the spec has scale=False")
        beta = self._check_param("beta", beta, spec.center, "center=True" if spec.center else "the spec has center=False")
        if spec.updates_moving_stats:
            why = "training updates them in place when given"
            moving_mean = self._check_param("moving_mean", moving_mean, True, why, writable=True, required=False)
            moving_variance = self._check_param("moving_variance", moving_variance, True, why, writable=True, required=False)
        else:
            why = f"mode {spec.mode} keeps no moving statistics"
            self._check_param("moving_mean", moving_mean, False, why)
            self._check_param("moving_variance", moving_variance, False, why)
        moments = self._check_stat64("moments", moments, (3, self.plan.channels))
        count = moments[0]
        if not (np.all(np.isfinite(count)) and np.all(count > 0)):
            raise ValueError("moments: the counts (row 0) must be finite and > 0: the merged batch is empty")
        if spec.updates_moving_stats and spec.unbiased and np.any(count <= 1):
            raise ValueError("moments: a count (row 0) of 1 value per feature leaves the unbiased variance "
                             "n/(n-1) undefined (the spec has unbiased=True)")
        nthreads = self._check_threads(threads)
        y = self._check_out(out, x.shape)
        _check_no_overlap(given, written={"out", "moving_mean", "moving_variance"})
        mean = np.empty(self.plan.channels, self._pdtype)
        variance = np.empty(self.plan.channels, self._pdtype)
        target = _aligned_target(y)
        values = dict(self._split_sizes(x), x=x, y=target, gamma=gamma, beta=beta, moving_mean=moving_mean,
                      moving_variance=moving_variance, mean=mean, variance=variance, moments=moments,
                      nthreads=nthreads)
        self._lib_call(entry, values)
        if target is not y:
            y[...] = target
        return y, mean, variance

    def backward_sums(self, dy, x, mean, variance, *, gamma=None, beta=None, threads=None) -> np.ndarray:
        """This batch's share of the gradient sums: a float64 array of shape (2, C) with
        sum(dy) and sum(dy * x_hat), ``x_hat = (x - mean) / sqrt(variance + eps)``.
        Summed over every process (in a fixed order), they go to `backward_apply`.

        `mean` and `variance`: the statistics `normalize` used, as it returned them or,
        more exactly, as float64 arrays (the merged mean and M2 / count): float32
        gradients then stay accurate when ``|mean| >> std``.  With
        ``activation="relu"`` dy is masked where the forward output was not positive,
        which needs ``gamma=`` (with ``scale=True``) and ``beta=`` (with ``center=True``).
        """
        spec = self.spec
        entry = self._split_entry("bn_backward_sums", "backward_sums")
        relu = spec.activation == "relu"
        given = [("dy", dy), ("x", x)]
        x = self._check_x(x, allow_empty=True)
        dy = self._check_like("dy", dy, x)
        why = "activation='relu': the mask recomputes the forward output" if relu else \
            "backward_sums needs it only for the mask of activation='relu'"
        gamma = self._check_param("gamma", gamma, relu and spec.scale, why)
        beta = self._check_param("beta", beta, relu and spec.center, why)
        mean = self._check_stat64("mean", mean, (self.plan.channels,), param_ok=True)
        variance = self._check_stat64("variance", variance, (self.plan.channels,), param_ok=True)
        nthreads = self._check_threads(threads)
        sums = np.zeros((2, self.plan.channels), np.float64)
        del given  # nothing is written but `sums`, which is new
        values = dict(self._split_sizes(x), dy=dy, x=x, gamma=gamma, beta=beta, mean=mean, variance=variance,
                      sums=sums, nthreads=nthreads)
        self._lib_call(entry, values)
        return sums

    def backward_apply(self, dy, x, gamma=None, mean=None, variance=None, *, sums, count, out=None, beta=None,
                       threads=None):
        """dx of this batch, dgamma and dbeta from the gradient sums of the whole batch:
        `sums` (2, C) float64, sum(dy) and sum(dy * x_hat) added over every process, and
        `count`, the number of values per feature over every process.  Returns ``(dx,
        dgamma, dbeta)`` as `backward` does, with ``dgamma = sums[1]`` and ``dbeta = sums[0]``
        in the parameter dtype and ``dx = gamma * r / n * (n*dy - sum(dy) - x_hat *
        sum(dy*x_hat))`` with n = count.  `mean` and `variance` as in `backward_sums`;
        ``beta=`` for a fused ReLU with ``center=True``.
        """
        spec = self.spec
        entry = self._split_entry("bn_backward_apply", "backward_apply")
        relu = spec.activation == "relu"
        given = [("dy", dy), ("x", x), ("gamma", gamma), ("beta", beta)]
        x = self._check_x(x, allow_empty=True)
        dy = self._check_like("dy", dy, x)
        gamma = self._check_param("gamma", gamma, spec.scale, "scale=True" if spec.scale else "the spec has scale=False")
        beta_why = ("activation='relu' with center=True: the mask recomputes the forward output, which adds beta; "
                    "pass it as beta=" if relu and spec.center
                    else "backward_apply needs beta only with activation='relu' and center=True")
        beta = self._check_param("beta", beta, relu and spec.center, beta_why)
        mean = self._check_stat64("mean", mean, (self.plan.channels,), param_ok=True)
        variance = self._check_stat64("variance", variance, (self.plan.channels,), param_ok=True)
        sums = self._check_stat64("sums", sums, (2, self.plan.channels))
        local = x.size // self.plan.channels
        if isinstance(count, bool) or not isinstance(count, (int, float, np.integer, np.floating)) \
                or not math.isfinite(count) or count <= 0 or count < local:
            raise ValueError(f"count: {count!r} must be a number > 0 and at least this batch's {local} values "
                             "per feature (the values per feature over every process)")
        nthreads = self._check_threads(threads)
        dx = self._check_out(out, x.shape)
        _check_no_overlap(given + [("out", dx)], written={"out"})
        dgamma = np.empty(self.plan.channels, self._pdtype) if spec.scale else None
        dbeta = np.empty(self.plan.channels, self._pdtype) if spec.center else None
        target = _aligned_target(dx)
        values = dict(self._split_sizes(x), dy=dy, x=x, gamma=gamma, beta=beta, mean=mean, variance=variance,
                      sums=sums, count=float(count), dx=target, dgamma=dgamma, dbeta=dbeta, nthreads=nthreads)
        self._lib_call(entry, values)
        if target is not dx:
            dx[...] = target
        return dx, dgamma, dbeta

    def _split_entry(self, name: str, method: str) -> Entry:
        entry = self.plan.entry(name)
        if entry is None:
            raise TypeError(f"{method}: only kernels of specs that normalise with batch statistics (training, or "
                            "mode 2) built by bngen.build have split phases; this one is "
                            f"{'mode 1' if self.spec.mode == 1 else 'mode-0 inference'}")
        return entry

    def _split_sizes(self, x: np.ndarray) -> dict:
        first, last = self.spec.axis[0], self.spec.axis[-1]
        return {"outer": int(np.prod(x.shape[:first], dtype=np.int64)),
                "inner": int(np.prod(x.shape[last + 1:], dtype=np.int64))}

    def _check_stat64(self, name: str, value, shape, param_ok: bool = False) -> np.ndarray:
        """A float64 array of `shape` (with `param_ok`, one in the parameter dtype too,
        converted), C-contiguous for C."""
        kinds = "float64" + (f" (or {self._pdtype})" if param_ok and self._pdtype != np.float64 else "")
        if value is None:
            raise TypeError(f"{name}: required, a numpy.ndarray of {kinds} with shape {shape}")
        if not isinstance(value, np.ndarray):
            raise TypeError(f"{name}: expected a numpy.ndarray of {kinds}, got {type(value).__name__}")
        if value.dtype != np.float64 and not (param_ok and value.dtype == self._pdtype):
            raise TypeError(f"{name}: dtype is {value.dtype}; expected {kinds}")
        if value.shape != tuple(shape):
            raise ValueError(f"{name}: shape is {value.shape}; expected {tuple(shape)}")
        return _c_array(value.astype(np.float64, copy=False))

    def _lib_call(self, entry: Entry, values: dict) -> None:
        getattr(self._lib, entry.name)(*self._bind(entry, values))

    # -- argument checking ---------------------------------------------------------------
    def _check_like(self, name: str, value, x: np.ndarray) -> np.ndarray:
        """An array that must have x's shape and the kernel's dtype (dy)."""
        if not isinstance(value, np.ndarray):
            raise TypeError(f"{name}: expected a numpy.ndarray, got {type(value).__name__}")
        if value.dtype != self._dtype:
            raise TypeError(f"{name}: dtype is {value.dtype}, but the kernel was built for {self.spec.dtype}")
        if value.shape != x.shape:
            raise ValueError(f"{name}: shape {value.shape} does not match the shape of x {x.shape}")
        return _c_array(value)

    def _check_x(self, x, allow_empty: bool = False) -> np.ndarray:
        """x as C needs it; `allow_empty`: a zero batch is valid (the split phases, where
        another process may hold the whole batch)."""
        spec = self.spec
        if not isinstance(x, np.ndarray):
            raise TypeError(f"x: expected a numpy.ndarray, got {type(x).__name__}")
        if x.dtype != self._dtype:
            raise TypeError(f"x: dtype is {x.dtype}, but the kernel was built for {spec.dtype}")
        if x.ndim != spec.ndim or any(
            want is not None and got != want for got, want in zip(x.shape, spec.shape)
        ):
            raise ValueError(f"x: shape {x.shape} does not match the spec's shape {_shape_text(spec.shape)}")
        if x.size == 0 and not allow_empty:
            raise ValueError(f"x: shape {x.shape} has a zero-sized dimension; every size must be >= 1")
        return _c_array(x)

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
            if not value.flags.aligned:
                raise ValueError(f"{name}: is not aligned to its {value.itemsize}-byte values, "
                                 "which training updates in place")
            return value
        return _c_array(value)

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
        if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or not 1 <= threads <= MAX_THREADS:
            raise ValueError(f"threads: {threads!r} must be an int >= 1 and <= {MAX_THREADS}")
        return int(threads)

    def _run(self, x, gamma, beta, moving_mean, moving_variance, out, threads, want_stats: bool):
        spec, plan = self.spec, self.plan
        # The caller's arrays, before any contiguous copy: those written must share no memory with them.
        given = [("x", x), ("gamma", gamma), ("beta", beta), ("out", out), ("moving_mean", moving_mean),
                 ("moving_variance", moving_variance)]
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
            given,
            written={"out", "moving_mean", "moving_variance"} if spec.updates_moving_stats else {"out"},
        )

        mean = variance = None
        if want_stats:
            stat_shape = x.shape[:first] if spec.mode == 1 else (plan.channels,)
            mean = np.empty(stat_shape, self._pdtype)
            variance = np.empty(stat_shape, self._pdtype)
        target = _aligned_target(y)
        values = {
            "x": x, "y": target, "gamma": gamma, "beta": beta, "moving_mean": moving_mean,
            "moving_variance": moving_variance, "mean": mean, "variance": variance, "outer": outer,
            "inner": inner, "nthreads": nthreads,
            "may_stream": int(target is out),  # the caller's buffer: not a new array's fresh pages
        }
        self._forward_fn(*self._bind(self._forward_entry, values))
        if values["y"] is not y:
            y[...] = values["y"]
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
                ctype = self._data_ct if arg.role in ("data_in", "data_out") else \
                    "double[]" if arg.role in ("stat64_in", "stat64_out") else self._param_ct
                args.append(ffi.from_buffer(ctype, value, require_writable=arg.role not in ("data_in", "param_in", "stat64_in")))
        return args


# -- the fast path ------------------------------------------------------------------------
# A call whose arrays are all exactly what the kernel needs (arrays of the right dtype and
# shape, C-contiguous, writable where written, no overlap) costs a few identity and tuple
# comparisons plus one ffi.from_buffer per new array; from_buffer itself refuses arrays
# that are not C-contiguous and, for written arrays, read-only ones.  Any other call, valid
# or not, is refused, having run nothing, and takes the checked path (`Kernel._run`, or
# the body of `Kernel.backward`), whose checks explain what is wrong.  Both run every check before any C runs; the fast
# path only orders them for speed.
#
# Parameter arrays are usually the same objects call after call (and one kernel serves every
# layer of its spec, so a few sets take turns): the last KEPT_SETS sets seen are kept, each
# with its C pointers and what its full check established, as a tuple
#     (gamma, beta, moving_mean, moving_variance, pointers, tail, written_spans)
# (strong references, so their memory cannot go away; see _param_memory for the rest).  On
# a later call with the same objects, only what can change in place is checked again:
# * dtype and strides.  An array's dtype, shape and strides have setters, but none of them
#   changes its byte length: the shape and strides setters keep the size and dtype, and the
#   dtype setter rescales the last axis to keep its bytes.  So an array that had shape (C,)
#   and the parameter dtype when checked in full, and still has that dtype and strides
#   (itemsize,), is still one-dimensional (one stride) with C values (the same bytes at the
#   same itemsize), C-contiguous: shape and contiguity need no check of their own.
# * writability of the arrays updated in place (flags.writeable has a setter).
# * overlap with x and out, which are new arrays on every call.  Overlap among the kept
#   arrays cannot change: their data pointers are fixed while we hold them (NumPy refuses to
#   resize an array referenced elsewhere; resize(refcheck=False) and __setstate__, pickle's
#   hook, are the documented exceptions, which leave NumPy's own views dangling too) and,
#   by the above, so are their byte lengths.
# The overlap checks compare C pointers to the arrays' first and one-past-last values (cffi
# orders pointers by address): for C-contiguous arrays that is exactly the bounds check
# np.may_share_memory makes, at a fraction of its cost.
# A set seen for the first time (a training step's new batch statistics, say) is checked in
# full about as cheaply as before any of this was kept.

KEPT_SETS = 4  # a few layers sharing one kernel take turns without a full check each


class _Refused(Exception):
    """Raised inside a fast path for a call that needs the checked path."""


def _param_memory(kernel: "Kernel", slots, suffix=(), lasting=True):
    """``(last, recall)`` for a fast path whose four parameter positions are `slots`,
    ``(used, required, written)`` each.  ``last[0]`` is the tuple of the sets kept, newest
    first, which the fast path looks at itself; ``recall(a, b, c, d)`` finds the set among
    the older ones and checks what can have changed in place, or checks a new set in full
    and keeps it, and returns its ``(pointers, tail, written_spans)``; it raises `_Refused`
    when the call needs the checked path.  `pointers`: the C arguments of the entry's
    parameters, in entry order (NULL for an optional one not given); `tail`: `pointers`
    followed by `suffix`; `written_spans`: ``(first, one-past-last)`` pointers of the arrays
    the kernel updates.  `lasting`: the sets are expected to be used again (weights, moving
    statistics), so their pointers are made plain ``param_t *``, which cost ~0.13 us each to
    make and save ~10 ns each in every call that passes them (cffi converts them faster)."""
    pdtype, channels = kernel._pdtype, kernel.plan.channels
    cshape, cstrides = (channels,), (pdtype.itemsize,)
    ffi = kernel._ffi
    from_buffer, null, ndarray, param_ct = ffi.from_buffer, ffi.NULL, np.ndarray, ffi.typeof(kernel._param_ct)
    cast, param_ptr = ffi.cast, ffi.typeof(_CTYPES[kernel.spec.param_dtype] + " *")
    any_written = any(writes for _, _, writes in slots)
    last = [((object(),) * 4 + ((), (), ()),)]  # a set that no call passes

    def recall(*given):
        for entry in last[0][1:]:
            if entry[0] is given[0] and entry[1] is given[1] and entry[2] is given[2] and entry[3] is given[3]:
                for value, (_, _, writes) in zip(given, slots):  # what can change in place (see above)
                    if value is not None and (value.dtype is not pdtype or value.strides != cstrides
                                              or writes and not value.flags.writeable):
                        raise _Refused
                return entry[4:]
        return remember(given)

    def remember(given):
        pointers, written_spans = [], []
        for value, (used, required, writes) in zip(given, slots):
            if value is None:
                if required:
                    raise _Refused
                if used:
                    pointers.append(null)
            elif not used or not isinstance(value, ndarray) or value.dtype is not pdtype or value.shape != cshape \
                    or not value.flags.aligned:  # (fixed while kept: the data pointer is)
                raise _Refused
            else:
                try:
                    pointer = from_buffer(param_ct, value, writes)
                except ValueError:  # not C-contiguous, or read-only where written
                    raise _Refused from None
                if lasting:  # (the kept set holds the array, so its memory stays)
                    pointer = cast(param_ptr, pointer)
                pointers.append(pointer)
                if writes:
                    written_spans.append((pointer, pointer + channels))
        if any_written:  # an array written shares memory with no other one
            for start, end in written_spans:
                for other in pointers:
                    if other is not start and other is not null and other < end and start < other + channels:
                        raise _Refused
        pointers = tuple(pointers)
        entry = given + (pointers, pointers + suffix, tuple(written_spans))
        last[0] = (entry,) + last[0][: KEPT_SETS - 1]  # one store: readers see an old or a new tuple
        return entry[4:]

    return last, recall


def _fast_path(kernel: "Kernel", want_stats: bool):
    """The fast `__call__` of `kernel` (with `want_stats`, the body of its `forward`), with
    the signature of `Kernel.__call__`; None for specs whose calls always take the checked
    path.  It runs the checked path itself for the calls it refuses."""
    spec, plan, entry = kernel.spec, kernel.plan, kernel._forward_entry
    layout = _fast_layout(spec)
    if layout is None:
        return None
    lead, tail, static_outer, inner = layout
    moving = "inout" if spec.updates_moving_stats else "in" if spec.mode == 0 else None
    written = moving == "inout"
    # (used, required, written) of gamma, beta, moving_mean, moving_variance
    moving_slot = (moving is not None, moving == "in", written)
    slots = ((spec.scale, spec.scale, False), (spec.center, spec.center, False), moving_slot, moving_slot)
    names = [a.name for a in entry.args]
    has_stats, threaded = "mean" in names, "nthreads" in names
    # The C arguments are passed by position: x, y, the parameters, the statistics, the sizes.
    expected = ["x", "y"] + [n for n, (used, _, _) in zip(("gamma", "beta", "moving_mean", "moving_variance"), slots) if used]
    streams = "may_stream" in names  # streaming stores only into out= (see plan._entries)
    expected += ["mean", "variance"] * has_stats + ["outer"] * (lead > 0) + ["nthreads"] * threaded
    expected += ["may_stream"] * streams
    if names != expected:
        return None
    ffi = kernel._ffi
    null, default_threads = ffi.NULL, kernel._threads
    no_stats = (null, null) if has_stats else ()  # the statistics are optional outputs of training kernels
    # What follows x and y in a call without statistics, of a spec without dynamic sizes, with
    # the default thread count: kept with each parameter set, so that such a call builds one tuple.
    suffix = no_stats + (default_threads,) * threaded + (0,) * streams
    last, recall = _param_memory(kernel, slots, suffix)
    first, per_sample = spec.axis[0], spec.mode == 1
    unbiased_check = spec.updates_moving_stats and spec.unbiased
    dtype, pdtype, channels = kernel._dtype, kernel._pdtype, plan.channels
    cshape, cstrides = (channels,), (pdtype.itemsize,)
    data_ct, param_ct = ffi.typeof(kernel._data_ct), ffi.typeof(kernel._param_ct)
    from_buffer, empty, ndarray, run = ffi.from_buffer, np.empty, np.ndarray, kernel._forward_fn
    plain = not want_stats and not lead  # with the default thread count, the C arguments are x, y, tail_args

    def call(self, x, gamma=None, beta=None, moving_mean=None, moving_variance=None, *, out=None, threads=None):
        try:
            if x.__class__ is not ndarray and not isinstance(x, ndarray):
                raise _Refused
            shape = x.shape
            if x.dtype is not dtype and x.dtype != dtype:
                raise _Refused
            if lead:
                if shape[lead:] != tail:  # (also when x has another number of dimensions)
                    raise _Refused
                outer = static_outer * shape[0] if lead == 1 else static_outer * math.prod(shape[:lead])
                if outer <= 0 or (unbiased_check and outer * inner == 1):
                    raise _Refused
            elif shape != tail:
                raise _Refused
            if threads is not None and (threads.__class__ is not int or not 0 < threads <= MAX_THREADS):
                raise _Refused
            # the newest kept set (last[0] is read once: a consistent tuple even if another thread replaces it)
            kept_gamma, kept_beta, kept_mm, kept_mv, pointers, tail_args, written_spans = last[0][0]
            if gamma is not kept_gamma or beta is not kept_beta or moving_mean is not kept_mm \
                    or moving_variance is not kept_mv:
                pointers, tail_args, written_spans = recall(gamma, beta, moving_mean, moving_variance)
            elif not (  # what can change in place (see above), as recall checks it, unrolled for speed
                (gamma is None or gamma.dtype is pdtype and gamma.strides == cstrides)
                and (beta is None or beta.dtype is pdtype and beta.strides == cstrides)
                and (moving_mean is None or moving_mean.dtype is pdtype and moving_mean.strides == cstrides)
                and (moving_variance is None or moving_variance.dtype is pdtype and moving_variance.strides == cstrides)
            ) or written and not ((moving_mean is None or moving_mean.flags.writeable)
                                  and (moving_variance is None or moving_variance.flags.writeable)):
                raise _Refused
            if not x.flags.aligned:
                raise _Refused
            cx = from_buffer(data_ct, x)  # ValueError if not C-contiguous
            if out is None:
                y = empty(shape, dtype)
                cy = from_buffer(data_ct, y)  # writable: it is new
            elif out.__class__ is not ndarray or (out.dtype is not dtype and out.dtype != dtype) or out.shape != shape \
                    or not out.flags.aligned:
                raise _Refused
            else:
                y = out
                cy = from_buffer(data_ct, y, True)  # ValueError if read-only or not C-contiguous
            if written_spans or out is not None:  # an array written shares memory with no other argument
                size = x.size
                x_end = cx + size
                for start, end in written_spans:
                    if start < x_end and cx < end:
                        raise _Refused
                if out is not None:
                    y_end = cy + size
                    if cy < x_end and cx < y_end:
                        raise _Refused
                    for start in pointers:
                        if start is not null and start < y_end and cy < start + channels:
                            raise _Refused
        except (_Refused, ValueError):  # ValueError: from_buffer's refusals
            pass  # the checked path runs below, outside this handler, so its errors chain to nothing
        else:
            if plain and threads is None and (out is None or not streams):
                run(*((cx, cy) + tail_args))
                return y
            if threads is None:
                threads = default_threads
            if threaded:
                sizes = (outer, threads) if lead else (threads,)
            else:
                sizes = (outer,) if lead else ()
            if streams:
                sizes += (int(out is not None),)
            if not want_stats:
                run(*((cx, cy) + pointers + no_stats + sizes))
                return y
            stat_shape = shape[:first] if per_sample else cshape
            mean, variance = empty(stat_shape, pdtype), empty(stat_shape, pdtype)  # new, so writable
            run(*((cx, cy) + pointers + (from_buffer(param_ct, mean), from_buffer(param_ct, variance)) + sizes))
            return y, mean, variance
        y, mean, variance = self._run(x, gamma, beta, moving_mean, moving_variance, out, threads, want_stats)
        return (y, mean, variance) if want_stats else y

    public = Kernel.forward if want_stats else Kernel.__call__
    call.__name__, call.__qualname__, call.__doc__ = public.__name__, public.__qualname__, public.__doc__
    return call


def _fast_backward_path(kernel: "Kernel"):
    """The fast `backward` of `kernel`, for specs that normalise with batch statistics (the
    training gradient), on the terms of `_fast_path`, with the signature of
    `Kernel.backward`; None for other specs.  It runs the checked path (`Kernel.backward`)
    itself for the calls it refuses, which include every call with ``out=``."""
    spec, plan, entry = kernel.spec, kernel.plan, kernel._backward_entry
    if entry is None or entry.name != "bn_backward":
        return None
    layout = _fast_layout(spec)
    if layout is None:
        return None
    lead, tail, static_outer, _ = layout
    scale, center = spec.scale, spec.center
    wants_beta = spec.activation == "relu" and center
    # (used, required, written) of gamma, beta, mean, variance
    slots = ((scale, scale, False), (wants_beta, wants_beta, False), (True, True, False), (True, True, False))
    names = [a.name for a in entry.args]
    threaded = "nthreads" in names
    # The C arguments are passed by position: dy, x, the parameters, the gradients, the sizes.
    expected = ["dy", "x"] + ["gamma"] * scale + ["beta"] * wants_beta + ["mean", "variance", "dx"]
    expected += ["dgamma"] * scale + ["dbeta"] * center + ["outer"] * (lead > 0) + ["nthreads"] * threaded
    if names != expected:
        return None
    # a training step passes the statistics of its own forward: new arrays at every step
    last, recall = _param_memory(kernel, slots, lasting=False)
    dtype, pdtype, channels = kernel._dtype, kernel._pdtype, plan.channels
    cshape, cstrides = (channels,), (pdtype.itemsize,)
    ffi = kernel._ffi
    data_ct, param_ct = ffi.typeof(kernel._data_ct), ffi.typeof(kernel._param_ct)
    from_buffer, empty, ndarray = ffi.from_buffer, np.empty, np.ndarray
    default_threads, run, checked = kernel._threads, kernel._backward_fn, Kernel.backward

    def backward(self, dy, x, gamma=None, mean=None, variance=None, out=None, *, beta=None,
                 moving_mean=None, moving_variance=None, threads=None):
        try:
            if out is not None or moving_mean is not None or moving_variance is not None:
                raise _Refused
            if (x.__class__ is not ndarray and not isinstance(x, ndarray)) or (
                    dy.__class__ is not ndarray and not isinstance(dy, ndarray)):
                raise _Refused
            shape = x.shape
            if (x.dtype is not dtype and x.dtype != dtype) or (dy.dtype is not dtype and dy.dtype != dtype) \
                    or dy.shape != shape:
                raise _Refused
            if lead:
                if shape[lead:] != tail:  # (also when x has another number of dimensions)
                    raise _Refused
                outer = static_outer * shape[0] if lead == 1 else static_outer * math.prod(shape[:lead])
                if outer <= 0:
                    raise _Refused
            elif shape != tail:
                raise _Refused
            if threads is not None and (threads.__class__ is not int or not 0 < threads <= MAX_THREADS):
                raise _Refused
            kept_gamma, kept_beta, kept_mean, kept_variance, pointers, _, _ = last[0][0]  # as in _fast_path
            if gamma is not kept_gamma or beta is not kept_beta or mean is not kept_mean \
                    or variance is not kept_variance:
                pointers, _, _ = recall(gamma, beta, mean, variance)
            elif not (  # what can change in place, as in _fast_path
                (gamma is None or gamma.dtype is pdtype and gamma.strides == cstrides)
                and (beta is None or beta.dtype is pdtype and beta.strides == cstrides)
                and mean.dtype is pdtype and mean.strides == cstrides
                and variance.dtype is pdtype and variance.strides == cstrides
            ):
                raise _Refused
            if not (x.flags.aligned and dy.flags.aligned):
                raise _Refused
            cdy, cx = from_buffer(data_ct, dy), from_buffer(data_ct, x)  # ValueError if not C-contiguous
        except (_Refused, ValueError):
            pass  # the checked path runs below, outside this handler, so its errors chain to nothing
        else:
            dx = empty(shape, dtype)  # new arrays, so from_buffer need not ask for writable ones
            dgamma = empty(cshape, pdtype) if scale else None
            dbeta = empty(cshape, pdtype) if center else None
            grads = ((from_buffer(param_ct, dgamma),) if scale else ()) + ((from_buffer(param_ct, dbeta),) if center else ())
            if threads is None:
                threads = default_threads
            if threaded:
                sizes = (outer, threads) if lead else (threads,)
            else:
                sizes = (outer,) if lead else ()
            run(*((cdy, cx) + pointers + (from_buffer(data_ct, dx),) + grads + sizes))
            return dx, dgamma, dbeta
        return checked(self, dy, x, gamma, mean, variance, out, beta=beta, moving_mean=moving_mean,
                       moving_variance=moving_variance, threads=threads)

    backward.__qualname__, backward.__doc__ = checked.__qualname__, checked.__doc__
    return backward


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
        for name_b, b in present[i + 1 :]:
            if written is not None and name_a not in written and name_b not in written:
                continue
            if np.may_share_memory(a, b):
                raise ValueError(f"{name_b}: shares memory with {name_a}; pass separate arrays")
