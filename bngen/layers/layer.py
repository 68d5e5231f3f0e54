"""A Keras-style batch-normalization layer whose arithmetic is bngen kernels.

The layer owns its weights (gamma, beta, moving mean and variance, in Keras order),
builds a kernel for every input shape it sees (lazily, through the cache), remembers
what its last call needs for `backward`, and follows Keras semantics: momentum is the
weight of the old moving value, ``training=True`` normalises with batch statistics and
updates the moving ones, ``training=False`` uses the moving ones.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import distributed
from ..core.dtypes import numpy_dtype
from ..core.spec import Spec, SpecError, check_renorm_clipping
from ..frameworks import cumulative_update
from ..jit.build import build
from ..jit.kernel import Kernel
from ..statistics import finish
from .population import stream_moments

# Keras initialiser names (and the Keras 1 spellings) for the 1-D weights of this layer.
_INITIALIZERS: Dict[str, Callable[[tuple, np.dtype, np.random.Generator], np.ndarray]] = {
    "zeros": lambda shape, dtype, rng: np.zeros(shape, dtype),
    "ones": lambda shape, dtype, rng: np.ones(shape, dtype),
    "random_normal": lambda shape, dtype, rng: rng.normal(0.0, 0.05, shape).astype(dtype),
    "random_uniform": lambda shape, dtype, rng: rng.uniform(-0.05, 0.05, shape).astype(dtype),
    "truncated_normal": lambda shape, dtype, rng: np.clip(rng.normal(0.0, 0.05, shape), -0.1, 0.1).astype(dtype),
}
_ALIASES = {"zero": "zeros", "one": "ones", "normal": "random_normal", "uniform": "random_uniform"}


def _initializer(value: Any, name: str):
    """An initialiser from a Keras name, a number (a constant) or a callable(shape, dtype)."""
    if isinstance(value, str):
        key = _ALIASES.get(value.lower(), value.lower())
        if key not in _INITIALIZERS:
            raise ValueError(f"{name}: unknown initializer {value!r}; use one of {', '.join(_INITIALIZERS)}, "
                             "a number, or a callable(shape, dtype)")
        return _INITIALIZERS[key]
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return lambda shape, dtype, rng: np.full(shape, value, dtype)
    if callable(value):
        return lambda shape, dtype, rng: np.asarray(value(shape, dtype=dtype), dtype=dtype)
    raise TypeError(f"{name}: {value!r} is not an initializer name, a number or a callable")


class BatchNormalization:
    """Batch normalization over the feature `axis`, computed by compiled bngen kernels.

    ``layer(x, training=False)`` returns y.  ``training=True`` normalises with the
    batch statistics and (mode 0) updates the moving statistics in place; afterwards
    ``layer.backward(dy)`` returns dx and sets ``layer.dgamma`` / ``layer.dbeta``.
    After a ``training=False`` call, `backward` gives the gradients of the frozen layer
    (``dx = dy * gamma / sqrt(moving_variance + eps)``).  `backward` reuses the x of
    the last call: do not modify it in between.

    Arguments follow Keras (momentum = weight of the OLD value); ``mode``, ``unbiased``
    and ``activation`` are those of `bngen.Spec`.  ``momentum=None`` is PyTorch's
    cumulative moving average (the moving statistics average every training batch so
    far; `num_batches_tracked` counts them).  Initialisers are Keras names ("zeros",
    "ones", "random_normal", "random_uniform", "truncated_normal"; Keras 1's "zero" and
    "one"), numbers, or callables ``f(shape, dtype=...)``; ``seed`` seeds the random ones.

    Weights are created at the first call (or `build`), one value per feature (shape
    ``(C,)``, C the product of the feature-axis sizes), float32 for half dtypes.
    `get_weights` returns them in Keras order ``[gamma, beta, moving_mean,
    moving_variance]`` without gamma when ``scale=False`` and without beta when
    ``center=False``; `set_weights` and ``weights=`` take the same list.  That is also
    Keras 1's ``[gamma, beta, running_mean, running_std]``, whose running_std holds the
    variance.  Every mode keeps the moving statistics as weights, as Keras 1 did, though
    only mode 0 uses them.

    Statistics variants, with Keras' argument names (README, "Statistics variants"):

    * ``renorm=True``: batch renormalization as Keras 3.14+, ``renorm_clipping`` a dict
      with keys among rmax, rmin, dmax (a missing key: no clip; it may be replaced between
      calls, ``layer.renorm_clipping = {...}``), ``renorm_momentum`` the weight of the old
      renorm statistics.  The weights are then Keras 3's seven, in its order:
      ``[gamma, beta, moving_mean, moving_variance, moving_stddev, renorm_mean, renorm_stddev]``.
    * ``virtual_batch_size=k``: ghost batch norm as tf.keras (statistics per ghost batch
      of k samples, taken by stride).
    * ``adjustment=fn``: in training, ``fn(x.shape)`` returns per-feature ``(a, b)`` and the
      output is ``gamma * (x_hat * a + b) + beta`` (never called at inference).

    ``trainable=False`` makes training calls inference calls, as in Keras 2.1+.
    ``cache_dir``, ``compiler`` and ``threads`` are passed to `bngen.build` and the kernels.

    ``synchronized``: batch statistics over the union of every process's batch
    (data-parallel training).  A communicator (`bngen.distributed.TorchDistributed`,
    `bngen.distributed.MPI`, or any object with ``allgather(array) -> list of arrays``
    in rank order), or True for torch.distributed's default group (which must be
    initialised by the first training call).  Every rank then gets the same statistics,
    moving averages, dgamma and dbeta, bit for bit; dx is the gradient for this rank's
    x.  Ranks may hold different batch sizes, including none.
    """

    def __init__(self, axis: Any = -1, momentum: Optional[float] = 0.99, epsilon: float = 1e-3, center: bool = True,
                 scale: bool = True, mode: int = 0, unbiased: bool = False, activation: Optional[str] = None,
                 dtype: Any = "float32", weights: Optional[Sequence] = None, *,
                 gamma_initializer: Any = "ones", beta_initializer: Any = "zeros",
                 moving_mean_initializer: Any = "zeros", moving_variance_initializer: Any = "ones",
                 seed: Optional[int] = None, threads: Optional[int] = None, cache_dir: Any = None,
                 compiler: Any = None, renorm: bool = False, renorm_clipping: Optional[dict] = None,
                 renorm_momentum: float = 0.99, virtual_batch_size: Optional[int] = None,
                 adjustment: Optional[Callable] = None, trainable: bool = True, synchronized: Any = None):
        if not (isinstance(axis, numbers.Integral) and not isinstance(axis, bool)) and not (
            isinstance(axis, (tuple, list)) and axis and all(isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in axis)
        ):
            raise SpecError(f"axis: {axis!r} is not an int or a tuple of ints")
        # Every field but the shape is checked now, on a stand-in shape, with the Spec's messages.
        if adjustment is not None and not callable(adjustment):
            raise TypeError(f"adjustment: {adjustment!r} is not None or a callable(shape) -> (scale, bias)")
        if not isinstance(trainable, bool):
            raise TypeError(f"trainable: {trainable!r} is not a bool")
        probe = Spec(shape=(None, 2), axis=-1, dtype=dtype, mode=mode, epsilon=epsilon,
                     momentum=0.0 if momentum is None else momentum, center=center, scale=scale,
                     unbiased=unbiased, activation=activation, renorm=renorm, renorm_momentum=renorm_momentum,
                     virtual_batch_size=virtual_batch_size, adjustment=adjustment is not None)
        if momentum is None and (renorm or virtual_batch_size is not None):
            raise ValueError("momentum: None (PyTorch's cumulative average) cannot be combined with renorm or "
                             "virtual_batch_size; give a number")
        self.renorm, self.renorm_momentum = renorm, probe.renorm_momentum
        self.virtual_batch_size, self.adjustment, self.trainable = probe.virtual_batch_size, adjustment, trainable
        self._clip = (None, None, None)
        self.renorm_clipping = renorm_clipping
        self.axis = tuple(axis) if isinstance(axis, (tuple, list)) else int(axis)
        self.momentum = None if momentum is None else probe.momentum
        self.epsilon, self.center, self.scale, self.mode = probe.epsilon, center, scale, probe.mode
        self.unbiased, self.activation, self.dtype = unbiased, activation, probe.dtype
        self.threads, self.cache_dir, self.compiler = threads, cache_dir, compiler
        if synchronized is not None and not isinstance(synchronized, bool) and not callable(
                getattr(synchronized, "allgather", None)):
            raise TypeError(f"synchronized: {type(synchronized).__name__} has no allgather(array) method; pass None, "
                            "True (torch.distributed) or a communicator such as bngen.distributed.MPI()")
        if synchronized not in (None, False) and probe.mode == 1:
            raise ValueError("synchronized: mode 1 normalises each sample by itself; there is nothing to synchronise")
        if synchronized not in (None, False) and (renorm or virtual_batch_size or adjustment is not None):
            raise ValueError("synchronized: not combinable with renorm, virtual_batch_size or adjustment in bngen; "
                             "their split-phase kernels are not built")
        self.synchronized = synchronized
        self._communicator: Any = None  # resolved at the first training call (synchronized=True)
        self._initializers = {
            "gamma": _initializer(gamma_initializer, "gamma_initializer"),
            "beta": _initializer(beta_initializer, "beta_initializer"),
            "moving_mean": _initializer(moving_mean_initializer, "moving_mean_initializer"),
            "moving_variance": _initializer(moving_variance_initializer, "moving_variance_initializer"),
        }
        if renorm:  # as Keras 3: the stddevs start at the square root of the variance's initial value
            variance_init, mean_init = self._initializers["moving_variance"], self._initializers["moving_mean"]
            stddev_init = lambda shape, dtype, rng: np.sqrt(variance_init(shape, dtype, rng))  # noqa: E731
            self._initializers.update(moving_stddev=stddev_init, renorm_mean=mean_init, renorm_stddev=stddev_init)
        self._init_args = dict(gamma_initializer=gamma_initializer, beta_initializer=beta_initializer,
                               moving_mean_initializer=moving_mean_initializer,
                               moving_variance_initializer=moving_variance_initializer, seed=seed)
        self._rng = np.random.default_rng(seed)
        self._np_dtype = numpy_dtype(self.dtype)
        self._param_dtype = np.dtype(probe.param_dtype)
        self._kernels: Dict[Tuple[tuple, bool], Kernel] = {}  # (shape, batch axis None; training)
        self._weights: Dict[str, np.ndarray] = {}
        self._pending: Optional[List[np.ndarray]] = None
        self._tape: Optional[dict] = None  # what the last call leaves for backward
        self._axes: Optional[Tuple[int, ...]] = None  # canonical feature axes, once built
        self.built = False
        self.num_batches_tracked = 0
        self.dgamma: Optional[np.ndarray] = None
        self.dbeta: Optional[np.ndarray] = None
        if weights is not None:
            self.set_weights(weights, _argument="weights")

    def __repr__(self) -> str:
        return (f"<bngen.BatchNormalization axis={self.axis!r} mode={self.mode} momentum={self.momentum} "
                f"epsilon={self.epsilon} dtype={self.dtype}{' built' if self.built else ''}>")

    # -- weights ---------------------------------------------------------------------------
    @property
    def renorm_clipping(self) -> Optional[dict]:
        """The clipping of renorm's r and d: a dict with keys among rmax, rmin, dmax (None or
        a missing key: no clip on that side).  Checked when set; used from the next call."""
        return self._clipping

    @renorm_clipping.setter
    def renorm_clipping(self, value: Optional[dict]) -> None:
        clip = check_renorm_clipping(value)
        self._clipping = None if value is None else dict(value)
        self._clip = clip

    @property
    def weight_names(self) -> List[str]:
        """The names of `get_weights`' entries, in order (Keras 3's)."""
        names = (["gamma"] if self.scale else []) + (["beta"] if self.center else []) + ["moving_mean", "moving_variance"]
        return names + (["moving_stddev", "renorm_mean", "renorm_stddev"] if self.renorm else [])

    @property
    def gamma(self) -> Optional[np.ndarray]:
        return self._weights.get("gamma")

    @property
    def beta(self) -> Optional[np.ndarray]:
        return self._weights.get("beta")

    @property
    def moving_mean(self) -> Optional[np.ndarray]:
        return self._weights.get("moving_mean")

    @property
    def moving_variance(self) -> Optional[np.ndarray]:
        return self._weights.get("moving_variance")

    def get_weights(self) -> List[np.ndarray]:
        """Copies of the weights in Keras order (an empty list before the layer is built)."""
        if not self.built:
            return []
        return [self._weights[name].copy() for name in self.weight_names]

    def set_weights(self, weights: Sequence, *, _argument: str = "weights") -> None:
        """Sets the weights from a list in `get_weights` order (checked before any is changed).

        Each array has C values, as shape ``(C,)`` or the shape of the feature axes.  On
        a layer not built yet, the list is kept and checked against C at the build.
        """
        names = self.weight_names
        if isinstance(weights, (str, bytes, np.ndarray)) or not hasattr(weights, "__len__"):
            raise TypeError(f"{_argument}: expected a list of arrays [{', '.join(names)}], got {type(weights).__name__}")
        weights = list(weights)
        if len(weights) != len(names):
            raise ValueError(f"{_argument}: got {len(weights)} array(s); this layer's weights are [{', '.join(names)}]")
        arrays = []
        for name, value in zip(names, weights):
            try:
                arr = np.array(value, dtype=self._param_dtype)  # a copy: the caller's array is never aliased
            except (TypeError, ValueError):
                raise TypeError(f"{_argument}: {name} is not an array of numbers ({type(value).__name__})") from None
            arrays.append(arr)
        if not self.built:
            self._pending = arrays
            return
        checked = [self._check_weight(_argument, name, arr) for name, arr in zip(names, arrays)]
        for name, arr in zip(names, checked):
            self._weights[name][...] = arr

    def _check_weight(self, argument: str, name: str, arr: np.ndarray) -> np.ndarray:
        if arr.shape not in ((self._channels,), self._feature_shape):
            raise ValueError(f"{argument}: {name} has shape {arr.shape}; expected ({self._channels},) "
                             f"(or the feature shape {self._feature_shape})")
        return arr.reshape(self._channels)

    # -- building ----------------------------------------------------------------------------
    def build(self, input_shape: Sequence[Optional[int]]) -> None:
        """Creates the weights for inputs of `input_shape` (the batch size may be None)."""
        shape = tuple(input_shape)
        spec = self._spec(tuple(1 if d is None else d for d in shape), training=False)  # checks axis
        unknown = [a for a in spec.axis if shape[a] is None]
        if unknown:  # checked before anything is set: the layer stays unbuilt
            raise SpecError(f"axis: {self.axis!r} makes axis {unknown[0]} of input shape {shape} a feature axis, but "
                            "its size is not known (None; the batch axis); the feature axes must have fixed sizes")
        self._ndim = len(shape)
        self._axes = spec.axis
        self._feature_shape = tuple(shape[a] for a in spec.axis)
        self._channels = spec.channels
        names = self.weight_names
        pending = self._pending
        if pending is not None:
            checked = [self._check_weight("weights", n, a) for n, a in zip(names, pending)]
        c = (self._channels,)
        self._weights = {n: np.ascontiguousarray(self._initializers[n](c, self._param_dtype, self._rng), self._param_dtype)
                         for n in names}
        for n in names:
            if self._weights[n].shape != c:
                raise ValueError(f"{n}_initializer: returned shape {self._weights[n].shape}; expected {c}")
        if pending is not None:
            for n, a in zip(names, checked):
                self._weights[n][...] = a
            self._pending = None
        self.built = True

    def _spec(self, shape: tuple, training: bool) -> Spec:
        keep = 0.0 if self.momentum is None else self.momentum  # momentum=None: updated here, not in C
        # The variants change training only: inference kernels are the plain ones.
        variants = dict(renorm=self.renorm, renorm_momentum=self.renorm_momentum, adjustment=self.adjustment is not None,
                        virtual_batch_size=self.virtual_batch_size) if training and self.mode == 0 else {}
        return Spec(shape=shape, axis=self._axes or self.axis, dtype=self.dtype,
                    training=training, mode=self.mode, epsilon=self.epsilon, momentum=keep, center=self.center,
                    scale=self.scale, unbiased=self.unbiased, activation=self.activation, **variants)

    def kernel(self, shape: Sequence[int], training: bool) -> Kernel:
        """The kernel for inputs of `shape` (built on first use, then remembered).  One
        kernel serves every batch size: the batch axis is dynamic in its spec."""
        training = bool(training) or self.mode != 0  # modes 1 and 2 use batch statistics either way
        shape = tuple(shape)  # (a call with one value per feature and unbiased=True: the kernel refuses it)
        if len(shape) > 1 and 0 not in self._axes:
            shape = (None,) + shape[1:]
        key = (shape, training)
        kernel = self._kernels.get(key)
        if kernel is None:
            split = self.synchronized not in (None, False)  # a synchronized layer runs the split phases
            kernel = self._kernels[key] = build(self._spec(shape, training), self.cache_dir, compiler=self.compiler,
                                                split=split)
        return kernel

    # -- calls -------------------------------------------------------------------------------
    def _as_array(self, name: str, value: Any) -> np.ndarray:
        arr = value if isinstance(value, np.ndarray) else None
        if arr is None:
            try:
                arr = np.asarray(value)
            except (TypeError, ValueError):
                raise TypeError(f"{name}: expected an array of numbers, got {type(value).__name__}") from None
        if arr.dtype != self._np_dtype:
            if arr.dtype.kind not in "fiu" and arr.dtype.name != "bfloat16":
                raise TypeError(f"{name}: dtype {arr.dtype} is not a number type")
            arr = arr.astype(self._np_dtype)  # as Keras casts inputs to the layer's dtype
        return arr

    def __call__(self, x: Any, training: bool = False) -> np.ndarray:
        """Normalises `x`; with ``training=True`` from its own statistics, updating the moving ones."""
        if not isinstance(training, (bool, np.bool_)):
            raise TypeError(f"training: {training!r} is not a bool")
        training = bool(training) and self.trainable  # a frozen layer infers, as in Keras
        x = self._as_array("x", x)
        if not self.built:
            self.build((None,) + x.shape[1:] if x.ndim > 1 else x.shape)
        if x.ndim != self._ndim or tuple(x.shape[a] for a in self._axes) != self._feature_shape:
            raise ValueError(f"x: shape {x.shape} does not fit this layer, built for {self._ndim}-D inputs with "
                             f"feature shape {self._feature_shape} on axis {self._axes}")
        synced = self.synchronized not in (None, False) and (training or self.mode == 2)
        kernel = self.kernel(self._sync_shape(x.shape) if synced else x.shape, training)
        w = self._weights
        gamma, beta = w.get("gamma"), w.get("beta")
        self._tape = None
        tape = dict(kernel=kernel, x=x, gamma=None if gamma is None else gamma.copy(),
                    beta=None if beta is None else beta.copy())
        if synced:
            y = self._synchronized_forward(kernel, x, tape)
        elif self.mode in (1, 2):
            y, tape["mean"], tape["variance"] = kernel.forward(x, gamma, beta, threads=self.threads)
        elif not training:
            y = kernel(x, gamma, beta, w["moving_mean"], w["moving_variance"], threads=self.threads)
            tape["mean"], tape["variance"] = w["moving_mean"].copy(), w["moving_variance"].copy()
        elif self.momentum is None:
            adjust = self._adjust(x.shape) if self.adjustment is not None else {}
            y, tape["mean"], tape["variance"] = kernel.forward(x, gamma, beta, threads=self.threads, **adjust)
            tape.update(adjust)
            self.num_batches_tracked += 1
            n = x.size // self._channels
            cumulative_update(w["moving_mean"], w["moving_variance"], tape["mean"], tape["variance"],
                              self.num_batches_tracked, n, self.unbiased)
        else:
            variants = {}
            if self.adjustment is not None:
                variants.update(self._adjust(x.shape))
                tape.update(variants)
            if self.renorm:
                variants.update({n: w[n] for n in ("moving_stddev", "renorm_mean", "renorm_stddev")})
                variants.update(zip(("rmax", "rmin", "dmax"), self._clip))
            out = kernel.forward(x, gamma, beta, w["moving_mean"], w["moving_variance"], threads=self.threads, **variants)
            y, tape["mean"], tape["variance"] = out[:3]
            if self.renorm:
                tape["r"], tape["d"] = out[3:]
            self.num_batches_tracked += 1
        self._tape = tape
        return y

    def _adjust(self, shape: tuple) -> dict:
        """The adjustment's (a, b) for inputs of `shape`, as the kernel takes them: a number,
        or an array of shape (C,) or the feature shape, each."""
        result = self.adjustment(tuple(int(d) for d in shape))
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            raise TypeError(f"adjustment: returned {type(result).__name__}; expected a pair (scale, bias)")
        arrays = {}
        for name, value in zip(("adjust_scale", "adjust_bias"), result):
            try:
                arr = np.array(value, dtype=self._param_dtype)
            except (TypeError, ValueError):
                raise TypeError(f"adjustment: its {name} is not an array of numbers ({type(value).__name__})") from None
            if arr.shape == ():
                arr = np.full(self._channels, arr, self._param_dtype)
            elif arr.shape in ((self._channels,), self._feature_shape):
                arr = arr.reshape(self._channels)
            else:
                raise ValueError(f"adjustment: returned {name} of shape {arr.shape}; expected ({self._channels},), "
                                 f"the feature shape {self._feature_shape} or a number")
            arrays[name] = arr
        return arrays

    def backward(self, dy: Any) -> np.ndarray:
        """Gradient with respect to the last call's input; sets ``dgamma`` and ``dbeta``.

        After a training call (or any call in mode 2) these are the gradients through
        the batch statistics; after an inference call in mode 0, those of the frozen
        layer; in mode 1, through each sample's statistics.
        """
        tape = self._tape
        if tape is None:
            raise RuntimeError("backward: call the layer first; backward differentiates its last call")
        dy = self._as_array("dy", dy)
        x = tape["x"]
        if dy.shape != x.shape:
            raise ValueError(f"dy: shape {dy.shape} does not match the last call's output shape {x.shape}")
        relu_beta = tape["beta"] if self.activation == "relu" else None
        if "moments" in tape:  # a synchronized step: the gradient sums of every rank
            return self._synchronized_backward(tape, dy, relu_beta)
        variants = {n: tape[n] for n in ("r", "d", "adjust_scale", "adjust_bias") if n in tape}
        dx, self.dgamma, self.dbeta = tape["kernel"].backward(
            dy, x, tape["gamma"], tape["mean"], tape["variance"], beta=relu_beta, threads=self.threads, **variants)
        return dx

    def adapt(self, data: Any) -> None:
        """Sets the moving statistics to the population statistics of `data` (one array
        or an iterable of batches, streamed; see `bngen.population_statistics`) over the
        layer's axis, with its `unbiased`, across ranks when the layer is synchronized.
        Builds the layer from the first batch's shape if needed.  On an error (a batch of
        the wrong shape or dtype, named by its index) the weights are left as they were."""
        if self.built:
            axis = self._axes
        else:
            axis = self.axis
        communicator = None
        if self.synchronized not in (None, False):
            communicator = self._communicator = self._communicator or distributed.resolve(self.synchronized)
        moments, shape, _ = stream_moments(data, axis, communicator, cache_dir=self.cache_dir, compiler=self.compiler)
        if not self.built:
            self.build((None,) + tuple(shape[1:]) if len(shape) > 1 else shape)
        if moments.shape[1] != self._channels:
            raise ValueError(f"data: {moments.shape[1]} features; this layer has {self._channels}")
        if self.unbiased and np.any(moments[0] < 2):
            raise ValueError("data: one value per feature in all; the unbiased variance needs 2 "
                             "(the layer has unbiased=True)")
        mean, variance = finish(moments, self.unbiased)
        self._weights["moving_mean"][...] = mean
        self._weights["moving_variance"][...] = variance
        if self.renorm:  # (renorm_mean and renorm_stddev are left as they were, as in Keras)
            self._weights["moving_stddev"][...] = np.sqrt(variance + self.epsilon)

    # -- synchronized batch norm -----------------------------------------------------------------
    def _sync_shape(self, shape: tuple) -> tuple:
        """The kernel shape of a synchronized call: the batch axis dynamic already, so that
        `kernel` leaves n to the call (a rank's batch of one, with unbiased=True, is valid:
        n is counted over every rank), and one kernel takes every rank's batch, an empty one too."""
        return shape if 0 in self._axes else (None,) + tuple(shape[1:])

    def _synchronized_forward(self, kernel: Kernel, x: np.ndarray, tape: dict) -> np.ndarray:
        if self._communicator is None:
            self._communicator = distributed.resolve(self.synchronized)
        w, comm = self._weights, self._communicator
        local = kernel.moments(x, threads=self.threads)
        merged = distributed.allreduce_moments(comm, kernel.spec, local)
        count = float(merged[0, 0])
        if count == 0:
            raise ValueError("x: every rank's batch is empty; there are no statistics to normalise with")
        if self.mode == 0 and self.unbiased and count == 1:
            raise ValueError("x: the ranks' batches hold one value per feature in all, so the unbiased variance "
                             "n/(n-1) is undefined (the layer has unbiased=True)")
        cumulative = self.mode == 0 and self.momentum is None
        moving = (w["moving_mean"], w["moving_variance"]) if self.mode == 0 and not cumulative else ()
        y, mean, variance = kernel.normalize(x, w.get("gamma"), w.get("beta"), *moving, moments=merged,
                                             threads=self.threads)
        if self.mode == 0:
            self.num_batches_tracked += 1
        if cumulative:
            cumulative_update(w["moving_mean"], w["moving_variance"], mean, variance, self.num_batches_tracked,
                              int(count), self.unbiased)
        # The backward takes the merged statistics in float64 (exact even when |mean| >> std).
        tape.update(mean=mean, variance=variance, moments=merged, count=count, mean64=merged[1].copy(),
                    variance64=np.maximum(merged[2], 0.0) / merged[0], communicator=comm)
        return y

    def _synchronized_backward(self, tape: dict, dy: np.ndarray, relu_beta) -> np.ndarray:
        kernel, x, gamma = tape["kernel"], tape["x"], tape["gamma"]
        mean, variance = tape["mean64"], tape["variance64"]
        relu = self.activation == "relu"
        local = kernel.backward_sums(dy, x, mean, variance, gamma=gamma if relu else None, beta=relu_beta,
                                     threads=self.threads)
        sums = distributed.allreduce_sums(tape["communicator"], kernel.spec, local)
        dx, self.dgamma, self.dbeta = kernel.backward_apply(dy, x, gamma, mean, variance, sums=sums,
                                                            count=tape["count"], beta=relu_beta, threads=self.threads)
        return dx

    # -- configuration -------------------------------------------------------------------------
    def get_config(self) -> dict:
        """The constructor arguments (Keras style); ``BatchNormalization(**config)`` rebuilds it."""
        return dict(axis=self.axis, momentum=self.momentum, epsilon=self.epsilon, center=self.center,
                    scale=self.scale, mode=self.mode, unbiased=self.unbiased, activation=self.activation,
                    dtype=self.dtype, renorm=self.renorm, renorm_clipping=self.renorm_clipping,
                    renorm_momentum=self.renorm_momentum, virtual_batch_size=self.virtual_batch_size,
                    adjustment=self.adjustment, trainable=self.trainable, **self._init_args)
