"""Entry points as data: what each exported C function is and what each argument means.

Every C function bngen generates -- the JIT kernels, the exported ones, the baked
inference kernel and the bench's memory probes -- is an `Entry` made here, and nowhere
else: its `Phase` says what it computes, each `Arg`'s `Role` what the argument is.  The
C prototypes (templates/macros.j2), the cffi declarations, the exported header and the
Python binder (bngen.jit.binder) are all rendered or derived from these records, so the C
argument order of an entry is written down in exactly one place: the functions below.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Optional, Tuple

from ..core.spec import Spec


class Role(str, enum.Enum):
    """What one C argument is.  A str, so templates compare it with plain strings."""

    DATA_IN = "data_in"  # a tensor the entry reads (x, dy)
    DATA_OUT = "data_out"  # a tensor the entry writes (y, dx)
    PARAM_IN = "param_in"  # per-feature values read (gamma, beta, statistics)
    PARAM_INOUT = "param_inout"  # per-feature values updated in place (moving statistics)
    STAT_OUT = "stat_out"  # per-feature (per-sample in mode 1) statistics written
    GRAD_OUT = "grad_out"  # per-feature gradients written (dgamma, dbeta)
    SIZE = "size"  # a runtime extent (ptrdiff_t)
    THREADS = "threads"  # the OpenMP team size (int)
    FLAG = "flag"  # a yes/no hint (int)
    SCALAR = "scalar"  # a call-time number (the parameter type)
    STAT64_IN = "stat64_in"  # statistics read as doubles whatever the dtype (merged across processes)
    STAT64_OUT = "stat64_out"  # statistics written as doubles (a rank's partial moments or sums)
    COUNT = "count"  # a call-time count of values, a double (it may exceed float's exact integers)

    __str__ = str.__str__  # renders as its value in templates and messages

    @property
    def is_array(self) -> bool:
        return self not in (Role.SIZE, Role.THREADS, Role.FLAG, Role.SCALAR, Role.COUNT)

    @property
    def is_data(self) -> bool:
        """A tensor of the storage dtype, shaped like x."""
        return self in (Role.DATA_IN, Role.DATA_OUT)

    @property
    def writes(self) -> bool:
        """The entry writes through this pointer."""
        return self in (Role.DATA_OUT, Role.PARAM_INOUT, Role.STAT_OUT, Role.GRAD_OUT, Role.STAT64_OUT)


class Phase(str, enum.Enum):
    """What an entry point computes."""

    FORWARD = "forward"  # normalise with the batch's own statistics (fused: statistics, then y)
    INFERENCE = "inference"  # normalise with the moving statistics
    BACKWARD = "backward"  # gradients at the batch statistics
    BACKWARD_FROZEN = "backward_frozen"  # gradients of the frozen (inference) layer
    BAKED = "baked"  # inference with the folded parameters compiled in (export)
    PROBE = "probe"  # a memory-traffic probe of the bench
    # The split phases of a training step (synchronized batch norm, population statistics):
    MOMENTS = "moments"  # count, mean and M2 per feature of this batch
    NORMALIZE = "normalize"  # FORWARD with given (merged) moments
    BACKWARD_SUMS = "backward_sums"  # this batch's sum(dy) and sum(dy * x_hat)
    BACKWARD_APPLY = "backward_apply"  # dx, dgamma, dbeta from given (summed) sums and count

    __str__ = str.__str__


@dataclasses.dataclass(frozen=True)
class Arg:
    """One runtime argument of an entry point."""

    name: str
    role: Role
    nullable: bool = False  # the caller may pass NULL (C then skips that work)
    rows: int = 0  # arrays of statistics as doubles (Role.STAT64_*): rows of C values (0: one row, shape (C,))

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", Role(self.role))

    @property
    def is_array(self) -> bool:
        return self.role.is_array


@dataclasses.dataclass(frozen=True)
class Entry:
    """An exported C function: its name, what it computes and its runtime signature."""

    name: str
    args: Tuple[Arg, ...]
    phase: Phase = Phase.FORWARD

    def __post_init__(self) -> None:
        object.__setattr__(self, "phase", Phase(self.phase))

    def arg(self, name: str) -> Optional[Arg]:
        return next((a for a in self.args if a.name == name), None)

    def by_role(self, *roles: Role) -> Tuple[Arg, ...]:
        return tuple(a for a in self.args if a.role in roles)


# -- the entries of a spec --------------------------------------------------------------------------
def runtime_sizes(outer: Optional[int], inner: Optional[int], threaded: bool) -> Tuple[Arg, ...]:
    """The trailing size arguments every kernel of a plan takes: the dynamic extents of the
    (outer, C, inner) view, then the thread count."""
    sizes = []
    if outer is None:
        sizes.append(Arg("outer", Role.SIZE))
    if inner is None:
        sizes.append(Arg("inner", Role.SIZE))
    if threaded:
        sizes.append(Arg("nthreads", Role.THREADS))
    return tuple(sizes)


def kernel_entries(spec: Spec, outer: Optional[int], inner: Optional[int], threaded: bool,
                   with_backward: bool, streaming: bool) -> Tuple[Entry, ...]:
    """The entry points of a JIT or exported kernel: the forward, then its gradient."""
    sizes = runtime_sizes(outer, inner, threaded)
    forward = forward_entry(spec, sizes, streaming)
    backward = backward_entry(spec, sizes) if with_backward and not spec.residual else None
    return (forward,) if backward is None else (forward, backward)


def forward_entry(spec: Spec, sizes: Tuple[Arg, ...], streaming: bool) -> Entry:
    """``bn_forward`` (batch statistics) or ``bn_inference`` (moving statistics)."""
    affine = _affine(spec)
    residual = (Arg("residual", Role.DATA_IN),) if spec.residual else ()
    io = (Arg("x", Role.DATA_IN),) + residual + (Arg("y", Role.DATA_OUT),)
    # Streaming stores into fresh pages (a new output, its pages first touched by this
    # call) measured ~25% slower than plain ones, into resident pages ~7% faster: the
    # caller says whether y is a buffer it reuses.
    flags = (Arg("may_stream", Role.FLAG),) if streaming else ()
    if spec.uses_batch_stats:
        moving = ()
        if spec.renorm:  # r and d come from the renorm statistics: all five are required
            moving = tuple(Arg(n, Role.PARAM_INOUT) for n in RENORM_STATISTICS)
        elif spec.updates_moving_stats:
            moving = (Arg("moving_mean", Role.PARAM_INOUT, True), Arg("moving_variance", Role.PARAM_INOUT, True))
        stats = (Arg("mean", Role.STAT_OUT, True), Arg("variance", Role.STAT_OUT, True))
        stats += tuple(Arg(n, Role.STAT_OUT, True) for n in ("r", "d") if spec.renorm)
        scalars = tuple(Arg(n, Role.SCALAR) for n in CLIP_BOUNDS if spec.renorm)
        return Entry("bn_forward", io + affine + _adjust(spec) + moving + stats + scalars + _ghost(spec, sizes) + flags,
                     Phase.FORWARD)
    moving = (Arg("moving_mean", Role.PARAM_IN), Arg("moving_variance", Role.PARAM_IN))
    return Entry("bn_inference", io + affine + moving + sizes + flags, Phase.INFERENCE)


def has_split_phases(spec: Spec) -> bool:
    """Whether `spec` has split phases: plain specs that normalise with batch statistics
    (modes 0 and 2; the statistics variants and the residual fusion have none)."""
    return spec.uses_batch_stats and spec.mode != 1 and not (
        spec.renorm or spec.virtual_batch_size or spec.adjustment or spec.residual)


def split_entries(spec: Spec, sizes: Tuple[Arg, ...]) -> Tuple[Entry, ...]:
    """The split phases of a training step (modes 0 and 2), cut where statistics and
    gradient sums cross processes: ``bn_moments`` ((3, C) doubles: count, mean, M2),
    ``bn_normalize`` (the forward's arguments plus the merged ``moments``, so the moving
    statistics update as in ``bn_forward``), ``bn_backward_sums`` ((2, C) doubles) and
    ``bn_backward_apply`` (the summed ``sums`` and the total ``count``).  The backward
    phases take mean and variance as doubles: the merged ones, exact."""
    relu = spec.activation == "relu"
    gamma = (Arg("gamma", Role.PARAM_IN),) if spec.scale else ()
    beta = (Arg("beta", Role.PARAM_IN),) if spec.center else ()
    stats = (Arg("mean", Role.STAT64_IN), Arg("variance", Role.STAT64_IN))
    moving = ()
    if spec.updates_moving_stats:
        moving = (Arg("moving_mean", Role.PARAM_INOUT, True), Arg("moving_variance", Role.PARAM_INOUT, True))
    x = (Arg("x", Role.DATA_IN),)
    moments = Entry("bn_moments", x + (Arg("moments", Role.STAT64_OUT, rows=3),) + sizes, Phase.MOMENTS)
    normalize = Entry("bn_normalize", x + (Arg("y", Role.DATA_OUT),) + gamma + beta + moving + (
        Arg("mean", Role.STAT_OUT, True), Arg("variance", Role.STAT_OUT, True), Arg("moments", Role.STAT64_IN, rows=3))
        + sizes, Phase.NORMALIZE)
    mask = (gamma + beta) if relu else ()  # the ReLU mask recomputes the forward output gamma * x_hat + beta
    dy = (Arg("dy", Role.DATA_IN),)
    sums = Entry("bn_backward_sums", dy + x + mask + stats + (Arg("sums", Role.STAT64_OUT, rows=2),) + sizes,
                 Phase.BACKWARD_SUMS)
    grads = ((Arg("dgamma", Role.GRAD_OUT),) if spec.scale else ()) + (
        (Arg("dbeta", Role.GRAD_OUT),) if spec.center else ())
    apply = Entry("bn_backward_apply", dy + x + gamma + (beta if relu else ()) + stats + (
        Arg("sums", Role.STAT64_IN, rows=2), Arg("count", Role.COUNT), Arg("dx", Role.DATA_OUT)) + grads + sizes,
        Phase.BACKWARD_APPLY)
    return moments, normalize, sums, apply


def backward_reads_x(spec: Spec) -> bool:
    """Whether the gradient needs x: always at batch statistics; a frozen layer's
    dx = dy * a needs x (and the moving mean) only for dgamma or the ReLU mask."""
    return spec.uses_batch_stats or spec.scale or spec.activation == "relu"


def backward_entry(spec: Spec, sizes: Tuple[Arg, ...]) -> Optional[Entry]:
    """Gradients of the forward: ``bn_backward`` where it normalises with batch statistics
    (training, modes 1 and 2; mode 1 takes per-sample statistics), ``bn_backward_frozen``
    for mode-0 inference (a frozen layer, whose statistics are constants)."""
    relu = spec.activation == "relu"
    reads_x = backward_reads_x(spec)
    args = [Arg("dy", Role.DATA_IN)] + ([Arg("x", Role.DATA_IN)] if reads_x else [])
    if spec.scale:
        args.append(Arg("gamma", Role.PARAM_IN))
    if relu and spec.center:
        args.append(Arg("beta", Role.PARAM_IN))  # the ReLU mask needs the forward's output
    if spec.uses_batch_stats:
        name, phase = "bn_backward", Phase.BACKWARD
        stats = [Arg("mean", Role.PARAM_IN), Arg("variance", Role.PARAM_IN)]
        stats += [Arg(n, Role.PARAM_IN) for n in ("r", "d") if spec.renorm] + list(_adjust(spec))
    else:
        name, phase = "bn_backward_frozen", Phase.BACKWARD_FROZEN
        stats = [Arg("moving_variance", Role.PARAM_IN)]
        if reads_x:
            stats.insert(0, Arg("moving_mean", Role.PARAM_IN))
    args += stats + [Arg("dx", Role.DATA_OUT)]
    if spec.scale:
        args.append(Arg("dgamma", Role.GRAD_OUT))
    if spec.center:
        args.append(Arg("dbeta", Role.GRAD_OUT))
    return Entry(name, tuple(args) + (_ghost(spec, sizes) if spec.uses_batch_stats else sizes), phase)


def baked_entry(spec: Spec, sizes: Tuple[Arg, ...]) -> Entry:
    """The exported inference kernel with its folded parameters compiled in: ``bn(x, y)``
    (``bn(x, residual, y)`` with the residual fusion) plus the dynamic sizes."""
    residual = (Arg("residual", Role.DATA_IN),) if spec.residual else ()
    return Entry("bn", (Arg("x", Role.DATA_IN),) + residual + (Arg("y", Role.DATA_OUT),) + tuple(sizes), Phase.BAKED)


def probe_entries(threaded: bool) -> Tuple[Entry, ...]:
    """The bench's memory probes: copy n values, and read n values into a sink."""
    sizes = (Arg("n", Role.SIZE),) + ((Arg("nthreads", Role.THREADS),) if threaded else ())
    return (
        Entry("bn_copy", (Arg("x", Role.DATA_IN), Arg("y", Role.DATA_OUT)) + sizes, Phase.PROBE),
        Entry("bn_read", (Arg("x", Role.DATA_IN), Arg("sink", Role.STAT_OUT)) + sizes, Phase.PROBE),
    )


# The per-feature statistics a renorm training forward updates in place, in Keras 3's
# weight order (after gamma and beta).
RENORM_STATISTICS = ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")
# The call-time clipping bounds of renorm's r and d (NaN: no clip).
CLIP_BOUNDS = ("rmax", "rmin", "dmax")


def _ghost(spec: Spec, sizes: Tuple[Arg, ...]) -> Tuple[Arg, ...]:
    """Ghost batch norm's training entries also take the batch size N (axis 0), which the
    (outer, C, inner) view folds into outer: ghost batch j is the samples n with n % (N/k) == j."""
    if spec.virtual_batch_size is None or not spec.training:
        return sizes
    at = len(sizes) - (1 if sizes and sizes[-1].role == Role.THREADS else 0)
    return sizes[:at] + (Arg("batch", Role.SIZE),) + sizes[at:]


def _adjust(spec: Spec) -> Tuple[Arg, ...]:
    """tf.keras' adjustment: per-feature a and b of the training output gamma*(x_hat*a + b) + beta."""
    return (Arg("adjust_scale", Role.PARAM_IN), Arg("adjust_bias", Role.PARAM_IN)) if spec.adjustment and spec.training else ()


def _affine(spec: Spec) -> Tuple[Arg, ...]:
    return ((Arg("gamma", Role.PARAM_IN),) if spec.scale else ()) + ((Arg("beta", Role.PARAM_IN),) if spec.center else ())
