"""The storage dtypes a `Spec` may name, in one table: each one's C types (`Precision`)
and its NumPy dtype (`numpy_dtype`)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class Precision:
    """C types for one storage dtype."""

    dtype: str  # storage dtype of x / y / dy / dx
    data: str  # C type holding one stored element
    param: str  # C type of gamma, beta, statistics
    compute: str  # C type the arithmetic is done in
    half: Optional[str] = None  # "float16" / "bfloat16" when storage needs conversion
    stat: str = "double"  # C type statistics are merged and per-channel coefficients computed in
    # How half storage is converted: "bits" (portable integer arithmetic), "native" (the
    # compiler's __fp16 where it has one, float16), "f16c" (x86 vcvtph2ps/vcvtps2ph, float16),
    # "avx512bf16" (x86 vcvtneps2bf16, bfloat16) or "avx2bf16" (the bit arithmetic on AVX2's
    # eight integer lanes, bfloat16), the last three eight values at a time, see
    # Plan.staged: the target's choice (bngen.plan.target.Target), set by the plan.
    half_conversion: str = "bits"

    @property
    def suffix(self) -> str:
        """The C literal suffix of the compute type."""
        return "f" if self.compute == "float" else ""

    @property
    def sqrt(self) -> str:
        """The libm square root of the `stat` type (sqrtf keeps float math in float)."""
        return "sqrtf" if self.stat == "float" else "sqrt"

    @property
    def compute_bytes(self) -> int:
        """The size of one value of the compute type, which vector lanes hold."""
        return {"float": 4, "double": 8}[self.compute]


PRECISIONS = {
    "float32": Precision("float32", "float", "float", "float"),
    "float64": Precision("float64", "double", "double", "double"),
    "float16": Precision("float16", "uint16_t", "float", "float", half="float16"),
    "bfloat16": Precision("bfloat16", "uint16_t", "float", "float", half="bfloat16"),
}

DTYPES = tuple(PRECISIONS)  # the names a spec accepts, in the order errors list them


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a spec dtype name (bfloat16 comes from ml_dtypes)."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:  # pragma: no cover - depends on the environment
            raise TypeError("dtype: bfloat16 arrays need the ml_dtypes package (pip install ml_dtypes)") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)
