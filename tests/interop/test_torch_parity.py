"""Parity with PyTorch: torch.nn.functional.batch_norm (and BatchNorm modules) against
kernels built from `Spec.from_torch`.  Skipped when torch is not installed.

Layouts: NCHW, channels-last (NHWC arrays; torch computes on a channels_last tensor),
2-D, 3-D and 5-D inputs.  Per layout, float64: training output, running statistics over
three steps and autograd gradients (x, weight, bias); eval output and eval-mode
gradients.  Plus float32 NCHW, a fused ReLU, affine=False, track_running_stats=False
and momentum=None.  Mode 1 (no torch module): autograd of its formula written in torch
ops.  Specs compiled: 19.  Examples: 12 per hypothesis test (12 of them,
three steps each in training: about 400 torch/bngen call pairs in all).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
F = torch.nn.functional
torch.set_num_threads(1)  # tiny tensors; pytest -n 2 already uses both cores

import bngen  # noqa: E402

# name: (torch shape without the batch, torch module class, our layout)
LAYOUTS = {
    "nchw": ((3, 5, 6), torch.nn.BatchNorm2d, "first"),
    "channels_last": ((3, 5, 6), torch.nn.BatchNorm2d, "last"),
    "2d": ((5,), torch.nn.BatchNorm1d, "first"),
    "3d": ((3, 7), torch.nn.BatchNorm1d, "first"),
    "5d": ((3, 2, 3, 4), torch.nn.BatchNorm3d, "first"),
}


def _ours(a: np.ndarray, layout: str) -> np.ndarray:
    """Our array for a torch (N, C, ...) array: the same, or channels moved last."""
    return np.ascontiguousarray(np.moveaxis(a, 1, -1)) if layout == "last" else a


def _theirs(a: np.ndarray, layout: str) -> np.ndarray:
    return np.moveaxis(a, -1, 1) if layout == "last" else a


def _kernel(build, name, training, dtype="float64", **module_kw):
    """A torch module of layout `name` in train or eval mode, and the kernel from_torch gives for it."""
    rest, cls, layout = LAYOUTS[name]
    module = cls(rest[0], dtype=getattr(torch, dtype), **module_kw).train(training)
    shape = (None,) + (rest[1:] + rest[:1] if layout == "last" else rest)
    kernel = build(bngen.Spec.from_torch(module, shape, axis=-1 if layout == "last" else 1))
    return module, kernel, layout


def _tensor(a, grad=False, layout="first"):
    t = torch.tensor(a, requires_grad=grad)
    if layout == "last" and t.ndim == 4:
        t = t.detach().contiguous(memory_format=torch.channels_last).requires_grad_(grad)
    return t


def _close(ours, theirs, rtol, scale=None):
    """Equal within rtol of `scale` (default: the largest value)."""
    theirs = theirs.detach().numpy() if hasattr(theirs, "detach") else theirs
    scale = (np.abs(theirs).max() if scale is None else scale) + 1e-30
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=rtol * scale)


batches = st.tuples(st.integers(1, 4), st.integers(0, 2**32 - 1), st.sampled_from([0.1, 1.0, 50.0]))


def _training_parity(module, train, layout, rest, dtype, rtol, relu=False):
    @settings(max_examples=12)
    @given(batches)
    def check(case):
        n, seed, spread = case
        if n * int(np.prod(rest[1:], dtype=int)) < 2:
            n = 2  # PyTorch refuses one value per channel in training
        rng = np.random.default_rng(seed)
        c = rest[0]
        x = (spread * rng.standard_normal((n,) + rest) + rng.standard_normal((1, c) + (1,) * (len(rest) - 1))).astype(dtype)
        dy = rng.standard_normal(x.shape).astype(dtype)
        gamma, beta = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
        rm, rv = rng.standard_normal(c).astype(dtype), (rng.random(c) + 0.5).astype(dtype)
        mm, mv = rm.copy(), rv.copy()
        rm_t, rv_t = torch.tensor(rm), torch.tensor(rv)
        for step in range(3):  # the running statistics accumulate over steps
            xs = x if step == 0 else x * (step + 1) + step
            x_t = _tensor(xs, grad=True, layout=layout)
            w_t, b_t = torch.tensor(gamma, requires_grad=True), torch.tensor(beta, requires_grad=True)
            y_t = F.batch_norm(x_t, rm_t, rv_t, w_t, b_t, training=True, momentum=module.momentum, eps=module.eps)
            if relu:
                y_t = F.relu(y_t)
            (y_t * torch.tensor(dy)).sum().backward()
            xo = _ours(xs, layout)
            y, mean, var = train.forward(xo, gamma, beta, mm, mv)
            _close(_theirs(y, layout), y_t, rtol)
            _close(mm, rm_t, rtol)
            _close(mv, rv_t, rtol)
            dx, dgamma, dbeta = train.backward(_ours(dy, layout), xo, gamma, mean, var, beta=beta if relu else None)
            # dx cancels n*dy against the sums: compare at the scale of its terms, gamma*r*dy.
            r = 1 / np.sqrt(var.astype(np.float64) + module.eps)
            _close(_theirs(dx, layout), x_t.grad, 10 * rtol, scale=np.abs(gamma).max() * r.max() * np.abs(dy).max())
            _close(dgamma, w_t.grad, 10 * rtol)
            _close(dbeta, b_t.grad, 10 * rtol)

    check()


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_training_matches_torch(build, name):
    module, train, layout = _kernel(build, name, True, momentum=0.3)
    _training_parity(module, train, layout, LAYOUTS[name][0], "float64", 1e-10)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_eval_matches_torch(build, name):
    """Eval output, and eval-mode autograd gradients against the frozen backward."""
    module, evaluation, layout = _kernel(build, name, False)
    rest = LAYOUTS[name][0]
    c = rest[0]

    @settings(max_examples=12)
    @given(batches)
    def check(case):
        n, seed, spread = case
        rng = np.random.default_rng(seed)
        x = spread * rng.standard_normal((n,) + rest)
        dy = rng.standard_normal(x.shape)
        gamma, beta = rng.standard_normal(c), rng.standard_normal(c)
        rm, rv = rng.standard_normal(c), rng.random(c) * spread**2 + 0.1
        x_t = _tensor(x, grad=True, layout=layout)
        w_t, b_t = torch.tensor(gamma, requires_grad=True), torch.tensor(beta, requires_grad=True)
        y_t = F.batch_norm(x_t, torch.tensor(rm), torch.tensor(rv), w_t, b_t, training=False, eps=module.eps)
        (y_t * torch.tensor(dy)).sum().backward()
        xo = _ours(x, layout)
        _close(_theirs(evaluation(xo, gamma, beta, rm, rv), layout), y_t, 1e-12)
        dx, dgamma, dbeta = evaluation.backward(_ours(dy, layout), xo, gamma, rm, rv)
        _close(_theirs(dx, layout), x_t.grad, 1e-12)
        _close(dgamma, w_t.grad, 1e-11)
        _close(dbeta, b_t.grad, 1e-12)

    check()


def test_float32_nchw_matches_torch(build):
    module, train, layout = _kernel(build, "nchw", True, dtype="float32")
    _training_parity(module, train, layout, LAYOUTS["nchw"][0], "float32", 2e-5)


def test_fused_relu_matches_relu_after_batch_norm(build):
    rest, cls, _ = LAYOUTS["nchw"]
    module = cls(rest[0], dtype=torch.float64)
    train = build(bngen.Spec.from_torch(module, (None,) + rest, activation="relu"))
    _training_parity(module, train, "first", rest, "float64", 1e-10, relu=True)


def test_affine_false_and_no_running_stats_match_torch(build, rng):
    """affine=False: no gamma/beta.  track_running_stats=False: batch statistics in eval
    too (bngen mode 2), with no running statistics."""
    x = rng.standard_normal((4, 3, 5))
    for kw in (dict(affine=False), dict(track_running_stats=False)):
        module = torch.nn.BatchNorm1d(3, dtype=torch.float64, **kw)
        with torch.no_grad():
            if module.affine:
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-1, 1)
        for mode in ("train", "eval"):
            getattr(module, mode)()
            spec = bngen.Spec.from_torch(module, (None, 3, 5))
            kernel = build(spec)
            gamma = module.weight.detach().numpy().copy() if module.affine else None
            beta = module.bias.detach().numpy().copy() if module.affine else None
            if spec.mode == 0:  # running statistics: updated in training, used in eval
                mm, mv = module.running_mean.numpy().copy(), module.running_var.numpy().copy()
            else:
                mm = mv = None
            y_t = module(torch.tensor(x))
            y = kernel(x, gamma, beta, mm, mv)
            _close(y, y_t, 1e-12)
            if spec.updates_moving_stats:
                _close(mm, module.running_mean, 1e-12)
                _close(mv, module.running_var, 1e-12)
        assert spec.mode == (2 if "track_running_stats" in kw else 0)


def test_momentum_none_cumulative_average_matches_torch(session_cache, strict_compiler, rng):
    """PyTorch momentum=None: running statistics average every batch.  bngen's layer with
    momentum=None does the same (frameworks.cumulative_update under the hood)."""
    module = torch.nn.BatchNorm1d(4, momentum=None, eps=1e-5, dtype=torch.float64)
    layer = bngen.BatchNormalization(axis=1, momentum=None, epsilon=1e-5, unbiased=True, dtype="float64",
                                     cache_dir=session_cache, compiler=strict_compiler)
    for step in range(4):
        x = rng.standard_normal((6, 4)) * (step + 1) + step
        y_t = module(torch.tensor(x))
        y = layer(x, training=True)
        _close(y, y_t, 1e-12)
        _close(layer.moving_mean, module.running_mean, 1e-12)
        _close(layer.moving_variance, module.running_var, 1e-12)
    assert layer.num_batches_tracked == int(module.num_batches_tracked) == 4


def test_from_torch_reads_module_settings():
    module = torch.nn.BatchNorm2d(8, eps=1e-4, momentum=0.25, affine=False)
    spec = bngen.Spec.from_torch(module, (None, None, 7, 7))
    assert spec.shape == (None, 8, 7, 7) and spec.axis == (1,)
    assert spec.epsilon == 1e-4 and spec.momentum == 0.75 and spec.unbiased
    assert not spec.center and not spec.scale and spec.training
    assert bngen.Spec.from_torch(module.eval(), (None, 8, 7, 7)).training is False
    half = torch.nn.BatchNorm2d(8, dtype=torch.float16)
    assert bngen.Spec.from_torch(half, (None, 8, 7, 7)).dtype == "float16"


@pytest.mark.parametrize("dtype,relu", [("float64", False), ("float64", True), ("float32", True)],
                         ids=["f64", "f64-relu", "f32-relu"])
def test_mode1_gradients_match_autograd_of_the_keras1_formula(build, dtype, relu):
    """Mode 1 has no PyTorch module: its forward is written out in torch ops,
    y = gamma * (x - m) / (sqrt(v + eps) + eps) + beta with m, v per sample (Keras 1.2),
    and autograd's gradients of sum(dy * y) are bngen's.  One sample is constant (v = 0).
    3 specs, one call each."""
    rng = np.random.default_rng(11)
    eps = 1e-3
    spec = bngen.Spec((None, 4, 6), axis=(1, 2), mode=1, dtype=dtype, epsilon=eps, activation="relu" if relu else None)
    kernel = build(spec)
    x = (rng.standard_normal((5, 4, 6)) * 3 + 1).astype(dtype)
    x[2] = 0.75
    dy = rng.standard_normal(x.shape).astype(dtype)
    gamma, beta = rng.uniform(0.5, 2, (4, 6)).astype(dtype), rng.standard_normal((4, 6)).astype(dtype)
    tx, tg, tb = (torch.tensor(a, requires_grad=True) for a in (x, gamma, beta))
    m = tx.mean(dim=(1, 2), keepdim=True)
    v = tx.var(dim=(1, 2), unbiased=False, keepdim=True)
    ty = tg * (tx - m) / (torch.sqrt(v + eps) + eps) + tb
    if relu:
        ty = torch.relu(ty)
    (ty * torch.tensor(dy)).sum().backward()
    y, mean, var = kernel.forward(x, gamma.reshape(-1), beta.reshape(-1))
    dx, dgamma, dbeta = kernel.backward(dy, x, gamma.reshape(-1), mean, var, beta=beta.reshape(-1) if relu else None)
    rtol = 1e-10 if dtype == "float64" else 1e-4
    _close(y, ty.detach().numpy(), rtol)
    _close(dx, tx.grad.numpy(), rtol)
    _close(dgamma, tg.grad.numpy().reshape(-1), rtol)
    _close(dbeta, tb.grad.numpy().reshape(-1), rtol)
