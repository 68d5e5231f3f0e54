"""What a plan is built for: the target machine and the tuning of the loops, as frozen data.

A `Target` is what the machine and its compiler offer (vector width, F16C, AVX-512 and its
BF16/FP16 extensions, NEON, streaming stores, OpenMP, the stack a kernel may use, the
type statistics are merged in).  The JIT reads it off the compiler probe
(`host_target`); `bngen emit` takes one of the `EXPORT_TARGETS` presets.  A `Tuning` holds
the sizes the loops are blocked by; the defaults are measured, and tests and the bench
pass other values to `bngen.build` instead of patching module globals.  Both are part of
the plan, so the generated C (hence the cache key) and the in-process memo follow them.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, FrozenSet


@dataclasses.dataclass(frozen=True)
class Target:
    """A machine (or family of machines) and what its compiler gives the kernels."""

    name: str = "host"
    description: str = "this machine, through the C compiler bngen builds with"
    # The widest vector, in bytes, the compiler's auto-vectoriser uses with its flags:
    # reductions keep this many bytes of independent partial sums per register.  GCC and
    # clang target 256-bit vectors even on AVX-512 CPUs unless told -mprefer-vector-width=512.
    vector_bytes: int = 16
    f16c: bool = False  # x86 vcvtph2ps / vcvtps2ph: float16 widened and narrowed eight at a time
    avx512: bool = False  # AVX-512 F (with BW/VL where the compiler defines them)
    avx512_bf16: bool = False  # vcvtneps2bf16: float -> bfloat16 in one instruction
    avx512_fp16: bool = False  # native float16 arithmetic
    neon: bool = False  # Arm Advanced SIMD
    streaming_stores: bool = False  # non-temporal stores through <emmintrin.h> (hosted x86)
    openmp: bool = False  # OpenMP threads: kernels take a thread count
    simd_pragmas: bool = False  # the compiler understands `omp simd` (-fopenmp or -fopenmp-simd)
    export: bool = False  # freestanding C for another build: pragmas guarded by #ifdef _OPENMP
    # Training forwards read memory in order: on AMD Zen the hardware prefetchers kept up
    # neither with channels-last statistics read a group of LANES channels at a time (each
    # row's lines in strides) nor with a normalisation that takes its blocks last first
    # (Zen 4, one thread, (32, 56, 56, 64) training forward: 7.2 -> 4.3 ms), nor with a
    # channels-first one that writes channel after channel, runs far apart (Plan.sweeps).
    # Measured on Zen 4 only; elsewhere the grouped statistics and the channel-by-channel
    # normalisation stay.
    sequential_reads: bool = False
    channel_tile: int = 1024  # channels per channels-last tile: the stack its work arrays may take
    stat: str = "double"  # C type statistics are merged and coefficients computed in
    single_precision: bool = False  # float only: no double arithmetic, float64 specs refused
    ptrdiff_bits: int = 64  # width of its ptrdiff_t, which indexes the elements
    # float16 conversions: "bits" (portable integer arithmetic), "native" (the compiler's
    # __fp16, one FPU instruction each way, where it has an IEEE one; bits otherwise) or
    # "f16c" (x86 F16C on staged spans).
    half_conversion: str = "bits"
    # bfloat16 conversions: "bits" (a shift to load; a rounding add, a NaN test and a shift
    # to store, about 14 vector operations per eight values), "avx2bf16" (the same
    # arithmetic on staged spans, eight values per vector) or "avx512bf16" (staged spans
    # narrowed by vcvtneps2bf16, eight values per instruction).
    bfloat16_conversion: str = "bits"
    # Export banners only: the compiler and flags the instructions name.
    cc: str = "cc"
    flags: str = ""
    half_flags: str = ""  # flags that give the compiler its IEEE __fp16

    @property
    def pragmas(self) -> bool:
        """Alias of `simd_pragmas` (the export presets' historical name)."""
        return self.simd_pragmas


@dataclasses.dataclass(frozen=True)
class Tuning:
    """The sizes loops are blocked by.  Defaults measured with `bngen bench`."""

    # Values each of a statistics block's lanes adds (their rounding error grows with the
    # count): a block is lane_values * lanes values, 16 KiB of float or double, small
    # enough that its second pass reads L1, large enough that the first pass streams from
    # memory in long runs and the per-block float64 merge costs little.
    lane_values: int = 128
    # Vector registers of independent partial sums per reduction: four hide the latency of
    # vector adds, so reductions vectorise without reassociating a sum.
    lane_registers: int = 4
    # ... and two per reduction in the channels-first gradient loops, which keep two sums.
    grad_registers: int = 2
    # Rows per statistics block in the channels-last schedule: each group of lanes channels
    # of a block is row_block short runs, summed twice while they sit in L1.
    row_block: int = 64
    # Output bytes from which stores stream past the caches (non-temporal): an output this
    # large would evict what the caches hold anyway, and streaming saves the read that a
    # cached store of a line costs.
    stream_min_bytes: int = 16 << 20
    # The kernels whose large outputs stream.  Measured with `bngen bench` (2-core EPYC VM):
    # the channels-first training forward gains ~10% (it re-reads x from L2 while y streams
    # out); inference and channels-last training ran 7-20% slower than with plain stores,
    # which keep part of the next call's input in the L3 cache.
    streaming_kinds: FrozenSet[str] = frozenset({"channels_first training"})
    # Values per L1 buffer that the normalisation fills before it is streamed out.
    stream_chunk: int = 1024
    # Values per span that staged plans narrow into an L1 buffer before streaming it
    # out: a few KiB, and a multiple of a cache line of float16, so spans split no line.
    stage_values: int = 512
    # Channels up to which channels-first inference computes every channel's coefficients
    # first (two stack arrays) and then sweeps memory run after run, in order.
    coef_table_max: int = 4096
    # Elements below which a kernel runs on one thread: waking a team costs microseconds.
    parallel_min: int = 1 << 15
    # How far ahead (bytes) the channels-last statistics prefetch on targets that read
    # sequentially (Target.sequential_reads): 8-32 KiB measured alike on Zen 4, none at
    # all 1.4x-1.9x slower.
    prefetch_bytes: int = 16 << 10
    # Inputs up to which the channels-first training forward and backward on such targets
    # write y (dx) in one sweep of memory after every channel's coefficients (Plan.sweeps),
    # rather than each channel right after its sums: above it, re-reading a channel from L2
    # beats a second sweep (Zen 4, one thread, forward: (32, 64, 32, 32), 8 MiB, 0.91 ->
    # 0.64 ms; 25 MiB 3.0 -> 3.5).
    sweep_max_bytes: int = 8 << 20


DEFAULT_TUNING = Tuning()

# Channels per tile in exported channels-last kernels.  The JIT tile is sized for a
# desktop thread's stack; exported code runs on threads and boards with a few KiB of
# stack, and 128 channels keep the tile's work arrays near 5 KiB.
EXPORT_CHANNEL_TILE = 128

EXPORT_TARGETS: Dict[str, Target] = {
    # Exported lanes are sized as for 256-bit vectors on every preset (what the JIT used
    # before targets were records): the checked-in catalogue stays byte for byte; sizing
    # them per board is a tuning change of its own, to be measured on the boards.
    "host": Target(
        "host", "the machine's own C compiler", vector_bytes=32, simd_pragmas=True, export=True,
        channel_tile=EXPORT_CHANNEL_TILE, cc="cc", flags="-std=c99 -O3 -march=native",
    ),
    # AArch64 always has NEON, __fp16 and FCVT between half and single precision.
    "aarch64": Target(
        "aarch64", "64-bit Arm (Cortex-A, Neoverse) running Linux", vector_bytes=32, neon=True, simd_pragmas=True,
        export=True, channel_tile=EXPORT_CHANNEL_TILE, half_conversion="native", cc="aarch64-linux-gnu-gcc",
        flags="-std=c99 -O3",
    ),
    # Cortex-M4F/M7: a single-precision FPU and a few KiB of stack.  Double arithmetic
    # would be emulated in software, so statistics are merged in float (blocks keep the
    # two-pass accuracy) and the channel tile is small.  Their FPUs (FPv4-SP, FPv5)
    # convert half <-> single with VCVTB; GCC's __fp16 needs -mfp16-format=ieee.
    "cortex-m": Target(
        "cortex-m", "Arm Cortex-M4F/M7 microcontrollers (single-precision FPU)", vector_bytes=32, export=True,
        channel_tile=16, stat="float", single_precision=True, ptrdiff_bits=32, half_conversion="native",
        cc="arm-none-eabi-gcc",
        flags="-std=c99 -mcpu=cortex-m4 -mthumb -mfloat-abi=hard -mfpu=fpv4-sp-d16 -Os",
        half_flags="-mfp16-format=ieee",
    ),
}


# What staged bfloat16 (half_avx512bf16.c.j2) needs the compiler to target.
AVX512_BF16_STAGING = ("__AVX512BF16__", "__AVX512VL__", "__AVX512DQ__")
# ... and the staged bit arithmetic (half_avx2bf16.c.j2), where that is missing.
AVX2_BF16_STAGING = ("__AVX2__",)


def host_target(macros: Dict[str, str], flags, openmp: bool, simd_pragmas: bool, vendor: str = "") -> Target:
    """The JIT target from the compiler's predefined `macros` (``cc -dM -E`` with its
    `flags`), whether it has OpenMP / ``omp simd``, and the CPU's `vendor` (its
    ``vendor_id``: the kernels run where they are built)."""
    avx512 = "__AVX512F__" in macros
    wide = avx512 and any(f == "-mprefer-vector-width=512" for f in flags)
    if wide:
        vector_bytes = 64
    elif "__AVX__" in macros or "__AVX2__" in macros:
        vector_bytes = 32
    else:
        vector_bytes = 16
    f16c = "__F16C__" in macros
    x86 = "__x86_64__" in macros or "__i386__" in macros
    return Target(
        vector_bytes=vector_bytes,
        f16c=f16c,
        avx512=avx512,
        avx512_bf16="__AVX512BF16__" in macros,
        avx512_fp16="__AVX512FP16__" in macros,
        neon="__ARM_NEON" in macros,
        # Streaming stores go through SSE2 intrinsics; a team of threads is what writes
        # outputs large enough to stream, and freestanding builds have neither.
        streaming_stores=x86 and "__SSE2__" in macros and openmp,
        openmp=openmp,
        simd_pragmas=simd_pragmas,
        half_conversion="f16c" if f16c else "bits",
        bfloat16_conversion=_bfloat16_conversion(macros),
        sequential_reads=x86 and vendor == "AuthenticAMD",
    )


def _bfloat16_conversion(macros: Dict[str, str]) -> str:
    """The bfloat16 conversion a compiler with `macros` gets."""
    if "__clang__" in macros:  # both staged partials call GCC's builtins, which clang spells otherwise
        return "bits"
    # the 256-bit vcvtneps2bf16 is AVX512-BF16 with VL; the subnormal test, DQ's vfpclassps
    if all(m in macros for m in AVX512_BF16_STAGING):
        return "avx512bf16"
    # 256-bit integer lanes (vpmovzxwd to widen; the rounding on eight lanes to narrow)
    if all(m in macros for m in AVX2_BF16_STAGING):
        return "avx2bf16"
    return "bits"


def get_export_target(target) -> Target:
    """The export preset called `target` (or `target` itself if it is a `Target`)."""
    if isinstance(target, Target):
        return target
    if not isinstance(target, str) or target not in EXPORT_TARGETS:
        raise ValueError(f"target: {target!r} is not one of {', '.join(EXPORT_TARGETS)}")
    return EXPORT_TARGETS[target]
