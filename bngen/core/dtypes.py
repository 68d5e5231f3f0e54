"""The NumPy side of the storage dtypes a `Spec` names (their C types: `bngen.plan.plan.Precision`)."""

from __future__ import annotations

import numpy as np


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a spec dtype name (bfloat16 comes from ml_dtypes)."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:  # pragma: no cover - depends on the environment
            raise TypeError("dtype: bfloat16 arrays need the ml_dtypes package (pip install ml_dtypes)") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)
