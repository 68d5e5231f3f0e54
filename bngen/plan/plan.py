"""The decisions between a `Spec` and C text, as plain data.

A `Plan` says how a spec is computed: the canonical ``(outer, C, inner)`` view, which
sizes are compile-time constants, the loop schedule, the C types, whether OpenMP
threads are used, blocking factors, and the runtime signature of every entry point.
Templates only read a plan; they decide nothing of their own.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from ..core.dtypes import PRECISIONS, Precision
from ..core.spec import Spec
from .entries import Arg, Entry, Phase, Role, backward_reads_x, has_split_phases, kernel_entries, runtime_sizes, split_entries
from .target import DEFAULT_TUNING, Target, Tuning

# Half conversions done eight values at a time in vector registers, on staged spans
# (Plan.staged): by conversion instructions, or (avx2bf16) by integer lanes.
STAGED_CONVERSIONS = frozenset({"f16c", "avx512bf16", "avx2bf16"})

__all__ = ["Plan", "Precision", "PRECISIONS", "make_plan", "Arg", "Entry", "Phase", "Role"]


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
    target: Target = Target()
    tuning: Tuning = DEFAULT_TUNING
    # Ahead-of-time export (bngen.emit): pragmas are guarded by `#ifdef _OPENMP`, and the
    # C symbol of an entry starts with `prefix` instead of "bn".
    export: bool = False
    prefix: str = "bn"
    lanes: int = 32  # independent partial sums per reduction (in acc_t)
    grad_lanes: int = 16  # independent partial sums per reduction of the channels-first gradient loops
    streaming: bool = False  # large outputs use streaming stores (hosted builds only)
    stream_min: int = DEFAULT_TUNING.stream_min_bytes
    stream_chunk: int = DEFAULT_TUNING.stream_chunk
    coef_table: bool = False  # channels-first inference: coefficients first, then runs in memory order
    stage: int = DEFAULT_TUNING.stage_values  # values per span a staged plan streams out through L1
    # Entries whose Python calls have a generated fast path (bngen.jit.binder): every entry
    # the JIT calls.  Pinned by a table in the tests.
    fast_entries: Tuple[str, ...] = ()
    # How a channels-first channel is cut into statistics / gradient blocks: "runs" (each
    # run of `inner` values is long enough to be cut on its own), "rows" (blocks of whole
    # runs) or "runtime" (inner is dynamic: the kernel picks one of the two per call).
    blocking: str = "runs"
    # The channels-last schedule's tails: a group of lanes that the channels do not fill
    # (some tile is not a multiple of `lanes`), and a last tile narrower than the others.
    lane_tail: bool = False
    tile_tail: bool = False
    # The gradient reads x: always at batch statistics; a frozen layer only for dgamma or
    # the ReLU mask (bngen.plan.entries.backward_reads_x).
    reads_x: bool = True

    def entry(self, name: str) -> Optional[Entry]:
        return next((e for e in self.entries if e.name == name), None)

    def symbol(self, entry: Entry) -> str:
        """The C name of `entry`: its name with the "bn" prefix replaced by `prefix`."""
        return self.prefix + entry.name[len("bn"):]

    @property
    def forward(self) -> Entry:
        """The forward entry point (``bn_forward`` or ``bn_inference``; ``bn`` when baked)."""
        return self.entries[0]

    @property
    def backward(self) -> Optional[Entry]:
        """The gradient entry point (``bn_backward`` or ``bn_backward_frozen``), if any."""
        return next((e for e in self.entries if e.phase in (Phase.BACKWARD, Phase.BACKWARD_FROZEN)), None)

    @property
    def staged(self) -> bool:
        """True when the loops work on small float arrays that blocks of stored values
        (eight, or a group of lanes) are widened into and narrowed from in registers,
        eight at a time (F16C for float16; AVX512-BF16, or AVX2's integer lanes, for
        bfloat16), instead of converting value by value: GCC does not vectorise a loop
        of scalar hardware conversions, and the portable bit arithmetic costs about 20
        vector operations per value each way (float16; about 14 per eight values to
        narrow bfloat16), woven into every loop that converts."""
        return self.precision.half_conversion in STAGED_CONVERSIONS

    @property
    def row_moments(self) -> bool:
        """True when the channels-last statistics read each block in whole rows, sums in
        stack arrays, prefetching `Tuning.prefetch_bytes` ahead (block_moments), rather than a
        group of LANES channels at a time in registers: on targets that read sequentially
        (`Target.sequential_reads`), where tiles are wider than a group.  Each channel
        adds its rows in the same order either way, so the moments are the same bits."""
        return self.target.sequential_reads and self.schedule == "channels_last" and self.batch_stats \
            and self.channel_tile > self.lanes

    @property
    def sweeps(self) -> bool:
        """True when the channels-first training forward and backward, for inputs of at
        most `Tuning.sweep_max_bytes`, compute every channel's coefficients first and then
        write y (dx) in one sweep of memory in order, as inference does, on targets that
        read sequentially (`Target.sequential_reads`): channel by channel, they write runs
        CHANNELS * inner apart.  The values are the same either way.  The coefficients
        are stack arrays, so at most a channel tile's worth of channels."""
        return self.target.sequential_reads and self.schedule == "channels_first" and self.batch_stats \
            and not self.ghost and self.channels <= self.target.channel_tile

    @property
    def lanes_in_place(self) -> bool:
        """True when the statistics' lane loops (lanes_add_sum, lanes_add_dev) add into
        the caller's lane sums rather than into local copies: staged plans without
        AVX-512.  Built for x86-64-v3, GCC keeps most of the copies on the stack (each
        group then adds to a sum it stored the group before); in place they stay in
        registers, stored back every group.  A run's last len % LANES values then add
        to their lanes directly, as the sums are in memory anyway: the full group of
        other plans costs its zeroing, which GCC's generic tuning does with rep stosq.
        Measured in one process, one thread, x86-64-v3, (8, 256, 14, 14) NCHW training
        forward: bfloat16 0.195 -> 0.175 ms in place, -> 0.157 ms with the tails too;
        float16 0.174 -> 0.148 -> 0.122 ms; (32, 64, 56, 56) float16 2.14 -> 1.45 ms.
        With AVX-512 (and its CPUs' tuning) the copies stay in registers, and in place
        ran 6% slower there (one run per call, before the calls took a block's runs)."""
        return self.staged and not self.target.avx512

    @property
    def stream_isa(self) -> Optional[str]:
        """The instructions of the streaming stores (templates/stream_<isa>.c.j2), None
        without streaming: SSE2's, the only ones `bngen.plan.target.host_target` turns on."""
        return "sse2" if self.streaming else None

    @property
    def streams_gradient(self) -> bool:
        """True when the channels-first training backward writes large dx with streaming
        stores (the plan streams, and stores values directly rather than through staging
        buffers; ghost batch norm's short slices never stream).  A channel's second sweep
        then re-reads x and dy from L2 with dx out of it: (32, 64, 56, 56) float32, one
        thread, 6.0 -> 4.8 ms on the Sapphire Rapids of the README's tables."""
        return self.streaming and self.batch_stats and not self.staged and not self.ghost and self.schedule == "channels_first"

    @property
    def batch_stats(self) -> bool:
        """True when forward normalises with the input's own statistics."""
        return self.spec.uses_batch_stats

    @property
    def ghost(self) -> bool:
        """True for ghost batch norm at batch statistics (statistics per virtual batch of
        spec.virtual_batch_size samples): its entries come from templates/ghost.c.j2."""
        return bool(self.spec.virtual_batch_size) and self.batch_stats

    @property
    def has_gamma(self) -> bool:
        """True when the layer scales by gamma (spec.scale): the entries take gamma and
        the gradients include dgamma."""
        return self.spec.scale

    @property
    def has_beta(self) -> bool:
        """True when the layer adds beta (spec.center): the entries take beta and the
        gradients include dbeta."""
        return self.spec.center

    @property
    def has_params(self) -> bool:
        """True when the layer has gamma or beta: the backward returns their gradients."""
        return self.spec.scale or self.spec.center

    @property
    def relu(self) -> bool:
        """True when a ReLU is fused after the normalisation: the forward clamps its
        output, and the backward masks dy where that output was not positive."""
        return self.spec.activation == "relu"

    @property
    def residual(self) -> bool:
        """True when the forward adds a residual input (shaped like x, read beside it) to
        the normalised values, before the activation."""
        return self.spec.residual

    @property
    def variant(self) -> bool:
        """True when a statistics variant (renorm's r and d, the adjustment's a and b)
        reshapes the normalised values, y = gamma * (x_hat * m + t) + beta: at batch
        statistics only (inference ignores them)."""
        return self.batch_stats and (self.spec.renorm or self.spec.adjustment)

    @property
    def shifted(self) -> bool:
        """True when the forward output has an additive term, which the backward's ReLU
        mask recomputes from per-channel coefficients: beta, or a variant's t, at batch
        statistics; always in the frozen layer (y = x * scale + shift)."""
        return not self.batch_stats or self.spec.center or self.variant

    @property
    def param_grads_read_x(self) -> bool:
        """True when the dgamma / dbeta sums read x: dgamma for x_hat, the ReLU mask for
        the forward output (mode 1's gradients, whose dx always reads x)."""
        return self.spec.scale or self.relu

    @property
    def wide_fallback(self) -> bool:
        """True when a statistics block whose float sums overflow is summed again in
        double: float arithmetic on values with float's range (float32, bfloat16; float16
        cannot overflow them) merged in double, which holds the sums of any finite values
        (std above ~1e19, or values near FLT_MAX).  One test per block on normal data."""
        return (self.batch_stats and self.precision.compute == "float" and self.precision.stat == "double"
                and self.precision.half != "float16")


def make_plan(spec: Spec, target: Optional[Target] = None, tuning: Optional[Tuning] = None, *,
              backward: bool = True, prefix: str = "bn", split: bool = False) -> Plan:
    """Decide how `spec` is computed on `target` (default: a plain host without OpenMP)
    with the block sizes of `tuning`.

    The target decides threads (OpenMP), ``omp simd`` pragmas, streaming stores (for the
    kernels in ``tuning.streaming_kinds``), how float16 and bfloat16 are converted (F16C,
    AVX512-BF16 and AVX2 plans widen and narrow their values in blocks: `Plan.staged`), the type statistics are merged in, the
    channel tile (its stack) and, with the tuning, the number of independent partial sums.
    `backward`: also make the gradient entry point.
    An export target (``target.export``) gives freestanding C whose symbols start with
    `prefix`.  `split`: specs of modes 0 and 2 that normalise with batch statistics also
    get the split phases of a training step (`entries.split_entries`), which synchronized
    batch norm and population statistics drive (JIT kernels only, not exports).
    """
    target = target or Target()
    tuning = tuning or DEFAULT_TUNING
    outer, channels, inner = spec.view
    if spec.mode == 1:
        schedule = "per_sample"
    elif inner == 1:
        schedule = "channels_last"
    else:
        schedule = "channels_first"
    precision = PRECISIONS[spec.dtype]
    conversion = {"float16": target.half_conversion, "bfloat16": target.bfloat16_conversion}.get(precision.half, "bits")
    precision = dataclasses.replace(precision, stat=target.stat, half_conversion=conversion)
    threaded = target.openmp and not target.export
    kind = f"{schedule} {'training' if spec.uses_batch_stats else 'inference'}"
    streaming = target.streaming_stores and threaded and kind in tuning.streaming_kinds
    itemsize = precision.compute_bytes
    lanes = tuning.lane_registers * target.vector_bytes // itemsize
    entries = kernel_entries(spec, outer, inner, threaded, backward, streaming)
    if split and backward and has_split_phases(spec) and not target.export:
        entries += split_entries(spec, runtime_sizes(outer, inner, threaded))
    channel_tile = min(channels, target.channel_tile)
    return Plan(
        spec=spec,
        precision=precision,
        schedule=schedule,
        outer=outer,
        channels=channels,
        inner=inner,
        threaded=threaded,
        pragmas=target.simd_pragmas,
        stat_block=tuning.lane_values * lanes,
        channel_tile=channel_tile,
        row_block=tuning.row_block,
        parallel_min=tuning.parallel_min,
        entries=entries,
        target=target,
        tuning=tuning,
        export=target.export,
        prefix=prefix,
        lanes=lanes,
        grad_lanes=tuning.grad_registers * target.vector_bytes // itemsize,
        streaming=streaming,
        stream_min=tuning.stream_min_bytes,
        stream_chunk=tuning.stream_chunk,
        coef_table=schedule == "channels_first" and not spec.uses_batch_stats and channels <= tuning.coef_table_max,
        stage=tuning.stage_values,
        fast_entries=() if target.export else tuple(e.name for e in entries),
        blocking="runtime" if inner is None else "runs" if inner >= tuning.lane_values * lanes else "rows",
        lane_tail=bool(channels % lanes or channel_tile % lanes),
        tile_tail=channels % channel_tile != 0,
        reads_x=backward_reads_x(spec),
    )
