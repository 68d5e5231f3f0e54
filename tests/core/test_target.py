"""The target record read off a compiler's macros, and what the plan takes from it.

Pure data: no compiler runs.  Cases: 10 targets (macro sets) x 4 dtypes; 5 plans for where
the statistics sum; 5 targets x 9 plans for how the training forwards read memory.
"""

from __future__ import annotations

import pytest

import bngen
from bngen.plan.plan import STAGED_CONVERSIONS, make_plan
from bngen.plan.target import AVX2_BF16_STAGING, AVX512_BF16_STAGING, host_target

X86 = {"__x86_64__", "__SSE2__", "__AVX__", "__AVX2__"}
SPR = X86 | {"__F16C__", "__AVX512F__", "__AVX512BW__", "__AVX512DQ__", "__AVX512VL__", "__AVX512BF16__",
             "__AVX512FP16__"}


def _target(macros, flags=("-O3", "-march=native")):
    return host_target(dict.fromkeys(macros, "1"), flags, openmp=True, simd_pragmas=True)


# (macros, float16 conversion, bfloat16 conversion)
TARGETS = [
    (set(X86), "bits", "avx2bf16"),  # an AVX2 machine without F16C
    (X86 | {"__F16C__"}, "f16c", "avx2bf16"),  # -march=x86-64-v3
    (X86 | {"__F16C__", "__clang__"}, "f16c", "bits"),  # clang spells the AVX2 partial's builtins otherwise
    (X86 - {"__AVX2__"} | {"__F16C__"}, "f16c", "bits"),  # AVX without AVX2: no 256-bit integer lanes
    ({"__x86_64__", "__SSE2__"}, "bits", "bits"),  # the x86-64 baseline
    (SPR, "f16c", "avx512bf16"),  # Sapphire Rapids, Zen 4
    (SPR - {"__AVX512VL__"}, "f16c", "avx2bf16"),  # no 256-bit form of vcvtneps2bf16: AVX2's lanes
    (SPR - {"__AVX512DQ__"}, "f16c", "avx2bf16"),  # no vfpclassps for the subnormal test: AVX2's lanes
    (SPR | {"__clang__"}, "f16c", "bits"),  # the bfloat16 partials call GCC's builtins
    ({"__aarch64__", "__ARM_NEON", "__ARM_FP16_FORMAT_IEEE"}, "bits", "bits"),
]


@pytest.mark.parametrize("macros, f16, bf16", TARGETS)
def test_conversions_follow_the_instructions_the_compiler_targets(macros, f16, bf16):
    target = _target(macros)
    assert (target.half_conversion, target.bfloat16_conversion) == (f16, bf16)
    assert target.avx512_bf16 == ("__AVX512BF16__" in macros)
    for dtype, conversion in (("float32", "bits"), ("float64", "bits"), ("float16", f16), ("bfloat16", bf16)):
        plan = make_plan(bngen.Spec((None, 8, 64), axis=1, dtype=dtype), target)
        assert plan.precision.half_conversion == conversion, dtype
        # conversions eight values at a time stage spans; float32/float64 never convert
        assert plan.staged == (conversion in ("f16c", "avx512bf16", "avx2bf16")), dtype


def test_every_staged_conversion_is_one_a_target_can_choose():
    assert STAGED_CONVERSIONS == {"f16c", "avx512bf16", "avx2bf16"}


def test_the_staging_macros_are_ones_the_probe_asks_about():
    from bngen.jit.compiler import TARGET_MACROS

    assert set(AVX512_BF16_STAGING) | set(AVX2_BF16_STAGING) | {"__clang__"} <= set(TARGET_MACROS)


def test_vector_width_follows_the_flags():
    assert _target(SPR).vector_bytes == 32  # GCC prefers 256-bit vectors on AVX-512 unless told
    assert _target(SPR, ("-O3", "-march=native", "-mprefer-vector-width=512")).vector_bytes == 64
    assert _target({"__x86_64__", "__SSE2__"}).vector_bytes == 16


@pytest.mark.parametrize("macros, dtype, in_place", [
    (X86 | {"__F16C__"}, "bfloat16", True),  # staged on AVX2
    (X86 | {"__F16C__"}, "float16", True),
    (X86 | {"__F16C__"}, "float32", False),  # not staged: the lane loops of every other plan
    (SPR, "bfloat16", False),  # AVX-512: the local copies stay in registers
    (SPR, "float16", False),
])
def test_lane_sums_go_in_place_only_in_staged_plans_without_avx512(macros, dtype, in_place):
    plan = make_plan(bngen.Spec((None, 8, 64), axis=1, dtype=dtype), _target(macros))
    assert plan.lanes_in_place == in_place


@pytest.mark.parametrize("macros, vendor, sequential", [
    (SPR, "AuthenticAMD", True),  # Zen 4
    (X86 | {"__F16C__"}, "AuthenticAMD", True),  # an x86-64-v3 build on it: the same memory system
    (SPR, "GenuineIntel", False),
    (SPR, "", False),  # no /proc/cpuinfo
    ({"__aarch64__", "__ARM_NEON"}, "AuthenticAMD", False),  # (not x86: the vendor string means nothing)
])
def test_training_forwards_read_in_order_on_amd(macros, vendor, sequential):
    """AMD x86 targets read channels-last statistics in whole rows where a tile is wider than a
    group of lanes, and normalise channels-first inputs in one sweep; every other target keeps
    the register groups and the channel-by-channel normalisation."""
    target = host_target(dict.fromkeys(macros, "1"), ("-O3",), openmp=True, simd_pragmas=True, vendor=vendor)
    assert target.sequential_reads == sequential
    for channels, wide in ((16, False), (200, True)):
        plan = make_plan(bngen.Spec((None, channels)), target)
        assert plan.row_moments == (sequential and wide)
        assert not make_plan(bngen.Spec((None, channels), training=False), target).row_moments
        assert not make_plan(bngen.Spec((None, channels, 9), axis=1), target).row_moments  # channels-first
        # ... whose training forward sweeps y in memory order instead (not inference: it always does)
        assert make_plan(bngen.Spec((None, channels, 9), axis=1), target).sweeps == sequential
        assert not make_plan(bngen.Spec((None, channels, 9), axis=1, training=False), target).sweeps
        assert not make_plan(bngen.Spec((None, channels), mode=1), target).sweeps
