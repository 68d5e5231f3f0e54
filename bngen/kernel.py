"""The Python callable around a compiled kernel.

Every argument is checked (type, shape, dtype, contiguity, writability, aliasing)
before any C runs, so a bad call raises a message naming the argument and leaves every
caller array untouched.  The calls themselves are made by `bngen.binder` from the plan's
entry points: a checked path and, for well-formed calls, a generated fast path.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import binder
from .dtypes import numpy_dtype
from .entries import Entry
from .plan import Plan
from .spec import Spec
from .threads import MAX_THREADS, default_threads, max_threads, track

__all__ = ["Kernel", "numpy_dtype", "default_threads", "MAX_THREADS"]


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
        self.ffi = module.ffi
        self._lib = module.lib
        self._module = module  # keeps the shared object loaded
        self.dtype = numpy_dtype(spec.dtype)
        self.param_dtype = np.dtype(spec.param_dtype)
        self.data_ctype = plan.precision.data + "[]"
        self.param_ctype = plan.precision.param + "[]"
        self._threads = default_threads()
        self._max_threads = max_threads()
        self._faces = binder.faces(spec, plan.entries)
        # The fast paths become methods of a class of this kernel's own (Python looks
        # __call__ up on the type): one Python frame per call instead of two, about 0.1 us.
        fast = {name: binder.fast_path(self, face, getattr(Kernel, name))
                for name, face in self._faces.items() if face.entry.name in plan.fast_entries}
        if fast:
            self.__class__ = type("Kernel", (Kernel,), dict(
                fast, __doc__=Kernel.__doc__, __module__=Kernel.__module__, __qualname__=Kernel.__qualname__))
        track(self)  # a forked child rebinds it to one thread (threads.py)

    def _rebind_threads(self) -> None:
        """Takes up a forked child's thread counts (threads.py calls it there): the default,
        and a cap of one thread, as an OpenMP team would hang in the child."""
        self._threads = default_threads()
        self._max_threads = max_threads()

    def __repr__(self) -> str:
        return f"<bngen.Kernel {self.spec.describe()}>"

    def entry_function(self, entry: Entry):
        """The compiled C function of `entry`."""
        return getattr(self._lib, entry.name)

    # -- public calls (the checked path; a kernel's fast path calls these for what it refuses) --
    def __call__(self, x, gamma=None, beta=None, moving_mean=None, moving_variance=None, *, out=None,
                 moving_stddev=None, renorm_mean=None, renorm_stddev=None, rmax=None, rmin=None, dmax=None,
                 adjust_scale=None, adjust_bias=None, threads=None):
        """Normalise `x`; returns y (written into `out` if given).  The keyword-only
        arguments of the statistics variants are those of `forward`."""
        return binder.call_checked(self, self._faces["__call__"], dict(
            x=x, gamma=gamma, beta=beta, moving_mean=moving_mean, moving_variance=moving_variance, out=out,
            moving_stddev=moving_stddev, renorm_mean=renorm_mean, renorm_stddev=renorm_stddev, rmax=rmax, rmin=rmin,
            dmax=dmax, adjust_scale=adjust_scale, adjust_bias=adjust_bias, threads=threads))

    def forward(self, x, gamma=None, beta=None, moving_mean=None, moving_variance=None, out=None, *,
                moving_stddev=None, renorm_mean=None, renorm_stddev=None, rmax=None, rmin=None, dmax=None,
                adjust_scale=None, adjust_bias=None, threads=None):
        """Normalise `x` with its own statistics; returns ``(y, mean, variance)``.

        mean and variance are the batch mean and biased batch variance per feature
        (per sample in mode 1, with shape ``x.shape[:axis]``).

        ``renorm=True`` (training): returns ``(y, mean, variance, r, d)`` and needs all five
        statistics, updated in place: moving_mean, moving_variance, and keyword-only
        moving_stddev, renorm_mean, renorm_stddev.  ``rmax``, ``rmin``, ``dmax`` clip r and
        d (None: no clip on that side).  ``adjustment=True`` (training): keyword-only
        ``adjust_scale`` and ``adjust_bias`` (a, b), one value per feature; the output is
        ``gamma * (x_hat * a + b) + beta`` (with renorm, ``gamma * (a * (x_hat * r + d) + b) + beta``).
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
            dmax=dmax, adjust_scale=adjust_scale, adjust_bias=adjust_bias, threads=threads))

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
            raise TypeError("backward: this kernel was built without a backward")
        return binder.call_checked(self, face, dict(
            dy=dy, x=x, gamma=gamma, beta=beta, mean=mean, variance=variance, moving_mean=moving_mean,
            moving_variance=moving_variance, r=r, d=d, adjust_scale=adjust_scale, adjust_bias=adjust_bias, out=out,
            threads=threads))
