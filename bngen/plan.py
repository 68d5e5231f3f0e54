"""The decisions between a `Spec` and C text, as plain data.

A `Plan` says how a spec is computed: the canonical ``(outer, C, inner)`` view, which
sizes are compile-time constants, the loop schedule, the C types, whether OpenMP
threads are used, blocking factors, and the runtime signature of every entry point.
Templates only read a plan; they decide nothing of their own.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from .spec import Spec

# Values each of a statistics block's LANES partial sums adds (their rounding error grows
# with the count): a block is LANE_VALUES * LANES values, 16 KiB of float or double, small
# enough that its second pass reads L1, large enough that the first pass streams from
# memory in long runs and the per-block float64 merge costs little.
LANE_VALUES = 128
# Channels per tile in the channels-last schedule: the tile's per-channel work arrays
# (tens of KiB) stay on the stack however many channels the layer has.
CHANNEL_TILE = 1024
# Rows per statistics block in the channels-last schedule: each group of LANES channels
# of a block is ROW_BLOCK short runs, summed twice while they sit in L1.
ROW_BLOCK = 64
# Bytes of independent partial sums per reduction: four 256-bit registers, enough to
# hide the latency of vector adds, so reductions vectorise without reassociating a sum.
LANE_BYTES = 128
# Output bytes from which stores stream past the caches (non-temporal): an output this
# large would evict what the caches hold anyway, and streaming saves the read that a
# cached store of a line costs.
STREAM_MIN_BYTES = 16 << 20
# The kernels whose large outputs stream.  Measured with `bngen bench` (2-core EPYC VM):
# the channels-first training forward gains ~10% (it re-reads x from L2 while y streams
# out); inference and channels-last training ran 7-20% slower than with plain stores,
# which keep part of the next call's input in the L3 cache.
STREAMING_KINDS = frozenset({"channels_first training"})
# Values per L1 buffer that the normalisation fills before it is streamed out.
STREAM_CHUNK = 1024
# Values per span that staged (F16C) plans narrow into an L1 buffer before streaming it out:
# a few KiB, and a multiple of a cache line of float16, so that spans split no streamed line.
STAGE_VALUES = 512
# Channels up to which channels-first inference computes every channel's coefficients
# first (two stack arrays of this many values) and then sweeps memory in order, run after
# run, instead of channel after channel.
COEF_TABLE_MAX = 4096
# Elements below which a kernel runs on one thread: waking a team costs microseconds.
PARALLEL_MIN = 1 << 15


@dataclasses.dataclass(frozen=True)
class Precision:
    """C types for one storage dtype."""

    dtype: str  # storage dtype of x / y / dy / dx
    data: str  # C type holding one stored element
    param: str  # C type of gamma, beta, statistics
    compute: str  # C type the arithmetic is done in
    half: Optional[str] = None  # "float16" / "bfloat16" when storage needs conversion
    stat: str = "double"  # C type statistics are merged and per-channel coefficients computed in
    # float16 conversions: "bits" (portable integer arithmetic), "native" (the compiler's
    # __fp16 where it has one, bits otherwise; exported Arm code, see emit.Target) or
    # "f16c" (x86 vcvtph2ps/vcvtps2ph, eight values at a time, see Plan.staged).
    half_conversion: str = "bits"

    @property
    def suffix(self) -> str:
        """The C literal suffix of the compute type."""
        return "f" if self.compute == "float" else ""

    @property
    def sqrt(self) -> str:
        """The libm square root of the `stat` type (sqrtf keeps float math in float)."""
        return "sqrtf" if self.stat == "float" else "sqrt"


_ITEMSIZE = {"float": 4, "double": 8}  # bytes of a C compute type

PRECISIONS = {
    "float32": Precision("float32", "float", "float", "float"),
    "float64": Precision("float64", "double", "double", "double"),
    "float16": Precision("float16", "uint16_t", "float", "float", half="float16"),
    "bfloat16": Precision("bfloat16", "uint16_t", "float", "float", half="bfloat16"),
}


@dataclasses.dataclass(frozen=True)
class Arg:
    """One runtime argument of an entry point."""

    name: str
    role: str  # data_in | data_out | param_in | param_inout | stat_out | grad_out | size | threads | flag
    #            | stat64_in | stat64_out (double arrays whatever the dtype) | count (a double scalar)
    nullable: bool = False  # the Python side may pass NULL (C then skips that work)

    @property
    def is_array(self) -> bool:
        return self.role not in ("size", "threads", "flag", "count")


@dataclasses.dataclass(frozen=True)
class Entry:
    """An exported C function: its name and its runtime signature."""

    name: str
    args: Tuple[Arg, ...]

    def arg(self, name: str) -> Optional[Arg]:
        return next((a for a in self.args if a.name == name), None)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every decision that shapes the generated C for one spec."""

    spec: Spec
    precision: Precision
    schedule: str  # channels_first | channels_last | per_sample
    outer: Optional[int]  # None: a runtime argument
    channels: int
    inner: Optional[int]  # None: a runtime argument
    threaded: bool  # OpenMP threads, the count a runtime argument
    pragmas: bool  # "omp simd" pragmas on inner loops (the compiler takes -fopenmp[-simd])
    stat_block: int
    channel_tile: int
    row_block: int
    parallel_min: int
    entries: Tuple[Entry, ...]
    # Ahead-of-time export (bngen.emit): pragmas are guarded by `#ifdef _OPENMP`, and the
    # C symbol of an entry starts with `prefix` instead of "bn".
    export: bool = False
    prefix: str = "bn"
    target: str = "host"
    lanes: int = 32  # independent partial sums per reduction (in acc_t)
    streaming: bool = False  # large outputs use streaming stores (hosted builds only)
    stream_min: int = STREAM_MIN_BYTES
    stream_chunk: int = STREAM_CHUNK
    coef_table: bool = False  # channels-first inference: coefficients first, then runs in memory order
    stage: int = STAGE_VALUES  # values per span a staged plan streams out through L1

    def entry(self, name: str) -> Optional[Entry]:
        return next((e for e in self.entries if e.name == name), None)

    def symbol(self, entry: Entry) -> str:
        """The C name of `entry`: its name with the "bn" prefix replaced by `prefix`."""
        return self.prefix + entry.name[len("bn"):]

    @property
    def grad_lanes(self) -> int:
        """Independent partial sums per reduction in the channels-first gradient loops: two
        256-bit vectors of the compute type, so the sums vectorise without reassociation."""
        return 16 if self.precision.compute == "float" else 8

    @property
    def backward(self) -> Optional[Entry]:
        """The gradient entry point (``bn_backward`` or ``bn_backward_frozen``), if any."""
        return self.entry("bn_backward") or self.entry("bn_backward_frozen")

    @property
    def staged(self) -> bool:
        """True when the loops work on small float arrays that blocks of stored values
        (eight, or a group of lanes) are widened into and narrowed from in registers,
        eight at a time in hardware (F16C), instead of converting value by value: GCC
        does not vectorise a loop of scalar F16C conversions, and the portable bit
        arithmetic costs about 20 vector operations per value each way."""
        return self.precision.half_conversion == "f16c"

    @property
    def batch_stats(self) -> bool:
        """True when forward normalises with the input's own statistics."""
        return self.spec.uses_batch_stats


def make_plan(spec: Spec, *, threaded: bool = True, pragmas: bool = True, backward: bool = True,
              streaming: Optional[bool] = None, f16c: bool = False, split: bool = False) -> Plan:
    """Decide how `spec` is computed.

    `threaded`: the compiler has OpenMP, so kernels take a thread count.  `pragmas`: it
    understands the "omp simd" pragma (with -fopenmp or -fopenmp-simd).  `backward`: also
    export the gradient entry point where the spec has one (modes 0 and 2).  `streaming`:
    large outputs bypass the caches with x86 streaming stores (needs <emmintrin.h>, so only
    for hosted builds; default: for the kinds in STREAMING_KINDS when `threaded`, which
    freestanding exports turn off).  `f16c`: the target converts float16 in hardware,
    so float16 plans widen and narrow their values in blocks (`Plan.staged`).  `split`: the
    specs of modes 0 and 2 that normalise with batch statistics also export the split phases
    of training (`SPLIT_ENTRIES`, see `_split_entries`), which synchronized batch norm drives.
    """
    outer, channels, inner = spec.view
    if spec.mode == 1:
        schedule = "per_sample"
    elif inner == 1:
        schedule = "channels_last"
    else:
        schedule = "channels_first"
    precision = PRECISIONS[spec.dtype]
    if f16c and precision.half == "float16":
        precision = dataclasses.replace(precision, half_conversion="f16c")
    if streaming is None:
        streaming = threaded and f"{schedule} {'training' if spec.uses_batch_stats else 'inference'}" in STREAMING_KINDS
    return Plan(
        spec=spec,
        precision=precision,
        schedule=schedule,
        outer=outer,
        channels=channels,
        inner=inner,
        threaded=threaded,
        pragmas=pragmas,
        stat_block=LANE_VALUES * (LANE_BYTES // _ITEMSIZE[PRECISIONS[spec.dtype].compute]),
        channel_tile=min(channels, CHANNEL_TILE),
        row_block=ROW_BLOCK,
        parallel_min=PARALLEL_MIN,
        entries=_entries(spec, outer, inner, threaded, backward, streaming)
        + (_split_entries(spec, outer, inner, threaded) if split and backward and spec.uses_batch_stats and spec.mode != 1 else ()),
        lanes=LANE_BYTES // _ITEMSIZE[PRECISIONS[spec.dtype].compute],
        streaming=streaming,
        stream_min=STREAM_MIN_BYTES,
        coef_table=schedule == "channels_first" and not spec.uses_batch_stats and channels <= COEF_TABLE_MAX,
    )


def _entries(spec: Spec, outer, inner, threaded, with_backward: bool, streaming: bool) -> Tuple[Entry, ...]:
    sizes = []
    if outer is None:
        sizes.append(Arg("outer", "size"))
    if inner is None:
        sizes.append(Arg("inner", "size"))
    if threaded:
        sizes.append(Arg("nthreads", "threads"))
    affine = []
    if spec.scale:
        affine.append(Arg("gamma", "param_in"))
    if spec.center:
        affine.append(Arg("beta", "param_in"))

    io = [Arg("x", "data_in"), Arg("y", "data_out")]
    # Streaming stores into fresh pages (a new output, its pages first touched by this
    # call) measured ~25% slower than plain ones, into resident pages ~7% faster: the
    # caller says whether y is a buffer it reuses.
    flags = [Arg("may_stream", "flag")] if streaming else []
    if spec.uses_batch_stats:
        moving = []
        if spec.updates_moving_stats:
            moving = [Arg("moving_mean", "param_inout", True), Arg("moving_variance", "param_inout", True)]
        stats = [Arg("mean", "stat_out", True), Arg("variance", "stat_out", True)]
        forward = Entry("bn_forward", tuple(io + affine + moving + stats + sizes + flags))
    else:
        moving = [Arg("moving_mean", "param_in"), Arg("moving_variance", "param_in")]
        forward = Entry("bn_inference", tuple(io + affine + moving + sizes + flags))
    backward = _backward_entry(spec, sizes) if with_backward else None
    return (forward,) if backward is None else (forward, backward)


def _backward_entry(spec: Spec, sizes) -> Optional[Entry]:
    """Gradients of the forward: ``bn_backward`` where it normalises with batch statistics
    (modes 0 and 2), ``bn_backward_frozen`` for mode-0 inference (a frozen layer, whose
    statistics are constants).  Mode 1 has none."""
    if spec.mode == 1:
        return None
    relu = spec.activation == "relu"
    # A frozen layer's dx = dy * a needs x (and the moving mean) only for dgamma or the mask.
    reads_x = spec.uses_batch_stats or spec.scale or relu
    args = [Arg("dy", "data_in")] + ([Arg("x", "data_in")] if reads_x else [])
    if spec.scale:
        args.append(Arg("gamma", "param_in"))
    if relu and spec.center:
        args.append(Arg("beta", "param_in"))  # the ReLU mask needs the forward's output
    if spec.uses_batch_stats:
        name, stats = "bn_backward", [Arg("mean", "param_in"), Arg("variance", "param_in")]
    else:
        name, stats = "bn_backward_frozen", [Arg("moving_variance", "param_in")]
        if reads_x:
            stats.insert(0, Arg("moving_mean", "param_in"))
    args += stats + [Arg("dx", "data_out")]
    if spec.scale:
        args.append(Arg("dgamma", "grad_out"))
    if spec.center:
        args.append(Arg("dbeta", "grad_out"))
    return Entry(name, tuple(args + list(sizes)))


# The split phases of a training step, for statistics merged across processes: local
# moments, normalisation with given (merged) moments, the gradient's local sums, and dx
# from given (merged) sums.  Statistics cross as double arrays whatever the dtype.
SPLIT_ENTRIES = ("bn_moments", "bn_normalize", "bn_backward_sums", "bn_backward_apply")


def _split_entries(spec: Spec, outer, inner, threaded) -> Tuple[Entry, ...]:
    """The entries of `SPLIT_ENTRIES`.  ``bn_normalize`` takes the forward's per-feature
    arguments (so the moving statistics update as in ``bn_forward``) plus ``moments``,
    (3, C) doubles: count, mean and M2 of the whole batch; the backward entries take the
    mean and variance as doubles (the merged ones, exact)."""
    sizes = []
    if outer is None:
        sizes.append(Arg("outer", "size"))
    if inner is None:
        sizes.append(Arg("inner", "size"))
    if threaded:
        sizes.append(Arg("nthreads", "threads"))
    relu = spec.activation == "relu"
    gamma = [Arg("gamma", "param_in")] if spec.scale else []
    beta = [Arg("beta", "param_in")] if spec.center else []
    stats = [Arg("mean", "stat64_in"), Arg("variance", "stat64_in")]
    moving = []
    if spec.updates_moving_stats:
        moving = [Arg("moving_mean", "param_inout", True), Arg("moving_variance", "param_inout", True)]
    moments = Entry("bn_moments", (Arg("x", "data_in"), Arg("moments", "stat64_out"), *sizes))
    normalize = Entry("bn_normalize", (
        Arg("x", "data_in"), Arg("y", "data_out"), *gamma, *beta, *moving,
        Arg("mean", "stat_out", True), Arg("variance", "stat_out", True), Arg("moments", "stat64_in"), *sizes))
    # the ReLU mask recomputes the forward output: gamma * x_hat + beta
    mask = (gamma if relu else []) + (beta if relu else [])
    sums = Entry("bn_backward_sums", (
        Arg("dy", "data_in"), Arg("x", "data_in"), *mask, *stats, Arg("sums", "stat64_out"), *sizes))
    grads = ([Arg("dgamma", "grad_out")] if spec.scale else []) + ([Arg("dbeta", "grad_out")] if spec.center else [])
    apply = Entry("bn_backward_apply", (
        Arg("dy", "data_in"), Arg("x", "data_in"), *gamma, *(beta if relu else []), *stats,
        Arg("sums", "stat64_in"), Arg("count", "count"), Arg("dx", "data_out"), *grads, *sizes))
    return moments, normalize, sums, apply
