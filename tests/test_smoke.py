"""A first end-to-end check: every schedule builds warning-free and matches the oracle."""

import numpy as np
import pytest

import bngen
from bngen import oracle

SPECS = [
    bngen.Spec((None, 6, 5, 4), axis=1),
    bngen.Spec((None, 4, 3, 6), training=False),
    bngen.Spec((None, 12), mode=1),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"mode{s.mode}-{'train' if s.training else 'infer'}")
def test_each_schedule_matches_oracle(build, rng, spec):
    kernel = build(spec)
    x = rng.standard_normal((3,) + spec.shape[1:]).astype(np.float32)
    c = spec.channels
    gamma, beta = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    moving = (rng.standard_normal(c).astype(np.float32), rng.random(c).astype(np.float32) + 0.5) if spec.mode == 0 else (None, None)
    y = kernel(x, gamma, beta, *moving)
    ref = oracle.forward(spec, x, gamma, beta, *moving)
    np.testing.assert_allclose(y, ref.y, rtol=1e-5, atol=1e-5)
