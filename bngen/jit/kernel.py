"""The Python callable around a compiled kernel.

Every argument is checked (type, shape, dtype, contiguity, writability, aliasing)
before any C runs, so a bad call raises a message naming the argument and leaves every
caller array untouched.  The calls themselves are made by `bngen.jit.binder` from the plan's
entry points: a checked path and, for well-formed calls, a generated fast path.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..core.dtypes import numpy_dtype
from ..core.spec import Spec
from ..core.threads import MAX_THREADS, default_threads, max_threads, track
from ..plan.entries import Entry, has_split_phases
from ..plan.plan import Plan
from . import binder

__all__ = ["Kernel", "numpy_dtype", "default_threads", "MAX_THREADS"]


class Kernel:
    """A compiled batch-normalization kernel for one `Spec`.

    ``kernel(x, gamma, beta, moving_mean, moving_variance, out=None)`` returns y;
    ``kernel.forward(...)`` also returns the batch statistics; ``kernel.backward(dy, x,
    gamma, mean, variance)`` returns ``(dx, dgamma, dbeta)``.  ``kernel.source`` is the
    C that was compiled.  ``threads=`` (default ``$OMP_NUM_THREADS`` or all CPUs; at most
    `MAX_THREADS`) sets the thread count of a call; results are identical run to run for
    a given count.

    Kernels of training specs (modes 0 and 2) also have the split phases of a training
    step, for statistics merged across processes (`bngen.distributed`): `moments`,
    `normalize`, `backward_sums` and `backward_apply`.
    """

    def __init__(self, spec: Spec, plan: Plan, source: str, module: Any):
        self.spec = spec
        self.plan = plan
        self.source = source
        self.ffi = module.ffi
        self._lib = module.lib
        self._module = module  # keeps the shared object loaded
        self.dtype = numpy_dtype(spec.dtype)
        self.param_dtype = np.dtype(spec.param_dtype)
        self.data_ctype = plan.precision.data + "[]"
        self.param_ctype = plan.precision.param + "[]"
        self._threads = default_threads()
        self._max_threads = max_threads()
        # build(spec, ...) of the same spec and options with other keywords (set by
        # bngen.build), and the kernel with the split phases it builds on first use
        self.rebuild: Optional[Any] = None
        self._split_kernel: Optional["Kernel"] = None
        self._faces = binder.faces(spec, plan.entries)
        # The fast paths become methods of a class of this kernel's own (Python looks
        # __call__ up on the type): one Python frame per call instead of two, about 0.1 us.
        fast = {name: binder.fast_path(self, face, getattr(Kernel, name))
                for name, face in self._faces.items() if face.entry.name in plan.fast_entries}
        if fast:
            self.__class__ = type("Kernel", (Kernel,), dict(
                fast, __doc__=Kernel.__doc__, __module__=Kernel.__module__, __qualname__=Kernel.__qualname__))
        track(self)  # a forked child rebinds it to one thread (core/threads.py)

    def _rebind_threads(self) -> None:
        """Takes up a forked child's thread counts (core/threads.py calls it there): the default,
        and a cap of one thread, as an OpenMP team would hang in the child."""
        self._threads = default_threads()
        self._max_threads = max_threads()

    def __repr__(self) -> str:
        return f"<bngen.Kernel {self.spec.describe()}>"

    def entry_function(self, entry: Entry):
        """The compiled C function of `entry`."""
        return getattr(self._lib, entry.name)

    def entry_address(self, entry: Entry) -> int:
        """The address of the compiled C function of `entry`, for callers outside Python
        (bngen.torch's native ops); valid while this kernel is alive."""
        return int(self.ffi.cast("uintptr_t", self.ffi.addressof(self._lib, entry.name)))

    # -- public calls (the checked path; a kernel's fast path calls these for what it refuses) --
    def __call__(self, x, gamma=None, beta=None, moving_mean=None, moving_variance=None, *, out=None,
                 moving_stddev=None, renorm_mean=None, renorm_stddev=None, rmax=None, rmin=None, dmax=None,
                 adjust_scale=None, adjust_bias=None, residual=None, threads=None):
        """Normalise `x`; returns y (written into `out` if given).  The keyword-only
        arguments of the statistics variants and `residual` are those of `forward`."""
        return binder.call_checked(self, self._faces["__call__"], dict(
            x=x, gamma=gamma, beta=beta, moving_mean=moving_mean, moving_variance=moving_variance, out=out,
            moving_stddev=moving_stddev, renorm_mean=renorm_mean, renorm_stddev=renorm_stddev, rmax=rmax, rmin=rmin,
            dmax=dmax, adjust_scale=adjust_scale, adjust_bias=adjust_bias, residual=residual, threads=threads))

    def forward(self, x, gamma=None, beta=None, moving_mean=None, moving_variance=None, out=None, *,
                moving_stddev=None, renorm_mean=None, renorm_stddev=None, rmax=None, rmin=None, dmax=None,
                adjust_scale=None, adjust_bias=None, residual=None, threads=None):
        """Normalise `x` with its own statistics; returns ``(y, mean, variance)``.

        mean and variance are the batch mean and biased batch variance per feature
        (per sample in mode 1, with shape ``x.shape[:axis]``).

        ``renorm=True`` (training): returns ``(y, mean, variance, r, d)`` and needs all five
        statistics, updated in place: moving_mean, moving_variance, and keyword-only
        moving_stddev, renorm_mean, renorm_stddev.  ``rmax``, ``rmin``, ``dmax`` clip r and
        d (None: no clip on that side).  ``adjustment=True`` (training): keyword-only
        ``adjust_scale`` and ``adjust_bias`` (a, b), one value per feature; the output is
        ``gamma * (x_hat * a + b) + beta`` (with renorm, ``gamma * (a * (x_hat * r + d) + b) + beta``).
        ``residual=True`` specs: keyword-only ``residual``, an array like x added to the
        normalised values before the activation (so ``relu(bn(x) + residual)``).
        """
        face = self._faces.get("forward")
        if face is None:
            raise TypeError(
                "forward: this is a mode-0 inference kernel, which normalises with moving statistics "
                "and computes none; call kernel(x, gamma, beta, moving_mean, moving_variance) instead"
            )
        return binder.call_checked(self, face, dict(
            x=x, gamma=gamma, beta=beta, moving_mean=moving_mean, moving_variance=moving_variance, out=out,
            moving_stddev=moving_stddev, renorm_mean=renorm_mean, renorm_stddev=renorm_stddev, rmax=rmax, rmin=rmin,
            dmax=dmax, adjust_scale=adjust_scale, adjust_bias=adjust_bias, residual=residual, threads=threads))

    def backward(self, dy, x, gamma=None, mean=None, variance=None, out=None, *, beta=None,
                 moving_mean=None, moving_variance=None, r=None, d=None, adjust_scale=None, adjust_bias=None,
                 threads=None):
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

        Statistics variants (training): ``renorm=True`` takes the ``r=`` and ``d=`` that
        forward returned, ``adjustment=True`` the same ``adjust_scale=`` and
        ``adjust_bias=``, all held constant: with ``m = a * r`` and ``t = a * d + b``
        (r = 1, d = 0 without renorm; a = 1, b = 0 without adjustment),
        ``dgamma = m * sum(dy * x_hat) + t * sum(dy)`` and dx is that of a layer whose
        gamma is ``gamma * m``.

        Mode 1 (sample-wise): ``mean`` and ``variance`` are the per-sample statistics
        `forward` returned (shape ``x.shape[:axis]``), and the gradients are those of
        ``y = gamma * (x - m) / (sqrt(v + eps) + eps) + beta`` (Keras 1.2's extra epsilon)
        with m and v each sample's mean and variance.
        """
        face = self._faces.get("backward")
        if face is None:
            if self.spec.residual:
                raise TypeError("backward: a residual=True kernel has no backward; the gradient of x is the "
                                "backward of the same spec with residual=False, fed dy masked by the activation "
                                "(relu: dy where y > 0), which is also the residual's gradient")
            raise TypeError("backward: this kernel was built without a backward")
        return binder.call_checked(self, face, dict(
            dy=dy, x=x, gamma=gamma, beta=beta, mean=mean, variance=variance, moving_mean=moving_mean,
            moving_variance=moving_variance, r=r, d=d, adjust_scale=adjust_scale, adjust_bias=adjust_bias, out=out,
            threads=threads))

    # -- split phases: a training step cut where statistics cross processes ----------------------
    def moments(self, x, *, threads=None) -> np.ndarray:
        """This batch's moments per feature: a float64 array of shape (3, C) holding the
        count, the mean and M2 (the sum of squared deviations from the mean), computed
        with the blocked accuracy of `forward`.  Moments of several batches merge with
        Chan's formula (`bngen.statistics.merge_moments`) into those of their union;
        `normalize` takes the merged ones.  x may have an empty batch (count 0).
        """
        return self._split_call("moments", dict(x=x, threads=threads))

    def normalize(self, x, gamma=None, beta=None, moving_mean=None, moving_variance=None, *, moments,
                  out=None, threads=None):
        """`forward` with the statistics of `moments` (shape (3, C), float64: count,
        mean, M2, e.g. merged over every process's batch) instead of x's own; returns
        ``(y, mean, variance)`` (the merged mean and biased variance, in the parameter
        dtype).  Mode 0 training updates `moving_mean` / `moving_variance` in place when
        given, ``unbiased=True`` with the merged count.  x may have an empty batch: the
        moving statistics are still updated, as on every other process.
        """
        return self._split_call("normalize", dict(
            x=x, gamma=gamma, beta=beta, moving_mean=moving_mean, moving_variance=moving_variance, moments=moments,
            out=out, threads=threads))

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
        return self._split_call("backward_sums", dict(
            dy=dy, x=x, mean=mean, variance=variance, gamma=gamma, beta=beta, threads=threads))

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
        return self._split_call("backward_apply", dict(
            dy=dy, x=x, gamma=gamma, mean=mean, variance=variance, sums=sums, count=count, out=out, beta=beta,
            threads=threads))

    def _split_call(self, method: str, values: dict):
        """Runs split phase `method` here (the checked path) or, for a kernel built without
        the split phases, on the same spec built with them on first use (its fast path)."""
        face = self._faces.get(method)
        if face is not None:
            return binder.call_checked(self, face, values)
        if not has_split_phases(self.spec):
            kind = ("mode 1" if self.spec.mode == 1 else "mode-0 inference" if not self.spec.uses_batch_stats
                    else "a residual=True kernel" if self.spec.residual
                    else "a statistics variant (renorm, virtual_batch_size or adjustment)")
            raise TypeError(f"{method}: only kernels of plain specs that normalise with batch statistics (training, "
                            f"or mode 2) have split phases; this one is {kind}")
        if self._split_kernel is None:
            if self.rebuild is None:
                raise TypeError(f"{method}: this kernel was not made by bngen.build, which builds the split phases")
            self._split_kernel = self.rebuild(split=True)
        return getattr(self._split_kernel, method)(**values)
