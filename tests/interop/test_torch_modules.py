"""bngen.torch against torch.nn: modules, functional form, custom ops, conversion, compile.

Every comparison runs torch.nn's module and bngen's from the same initialisation on the
same data.  Feature counts are mostly 4 (2d/3d inputs 5x6 and 3x5x2) and 5 (1d), so the
kernels built stay few: 35 specs (train and eval, four dtypes, channels-first and
channels-last shape classes, affine or not, two epsilons), plus a few for the tiny
benchmark model.  Batch sizes vary freely: one kernel serves them all (checked).
"""

from __future__ import annotations

import copy
import inspect
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)  # small tensors; pytest -n 2 already uses both cores

import bngen.torch as bnt  # noqa: E402
from bngen import torch_native  # noqa: E402

F = torch.nn.functional
HALF = (torch.float16, torch.bfloat16)
# (atol, rtol) of a comparison with torch per dtype: float32 and float64 agree to rounding; half
# dtypes round y (and the half conv weights) to 11 or 8 bits, a few ulps of which are allowed (on this
# machine the half runs agree with torch exactly)
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.float16: (5e-3, 5e-3),
       torch.bfloat16: (2e-2, 2e-2)}


def _close(ours, theirs, dtype, scale=1.0):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(ours.double(), theirs.double(), atol=atol * scale, rtol=rtol)


def _conv_bn_relu(bn_module, dtype, fmt=torch.contiguous_format, seed=0):
    """conv -> bn -> relu -> conv; half dtypes keep the batch norm's parameters float32 (mixed precision)."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), bn_module(4), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 2, 1))
    conv_dtype = dtype
    model[0].to(conv_dtype).to(memory_format=fmt)
    model[3].to(conv_dtype).to(memory_format=fmt)
    model[1].to(torch.float64 if dtype is torch.float64 else torch.float32)
    with torch.no_grad():  # weights and statistics away from the defaults, so that mistakes show
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 1.5)
    return model


def _train(model, batches, dtype, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for x, target in batches:
        opt.zero_grad()
        loss = F.mse_loss(model(x).double(), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _batches(dtype, fmt, steps=5, sizes=(6, 7, 5, 8, 6), seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes[:steps]:
        x = (torch.randn(n, 3, 5, 6, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)
        out.append((x.contiguous(memory_format=fmt), torch.randn(n, 2, 5, 6, generator=g, dtype=torch.float64)))
    return out


def _compare_models(ours, theirs, dtype, scale=1.0):
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        _close(a.detach(), b.detach(), a.dtype if a.dtype in TOL else dtype, scale)
    for (name, a), (_, b) in zip(ours.named_buffers(), theirs.named_buffers()):
        if a.dtype is torch.int64:
            assert torch.equal(a, b), name
        else:
            _close(a, b, dtype, scale)


# -- training parity: 5 SGD steps (5 configurations x 2 layouts) -------------------------------------
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_sgd_steps_match_torch(dtype, fmt):
    theirs = _conv_bn_relu(torch.nn.BatchNorm2d, dtype, fmt)
    ours = bnt.convert(copy.deepcopy(theirs))
    assert type(ours[1]) is bnt.BatchNorm2d
    batches = _batches(dtype, fmt)
    with torch.no_grad():
        bn_input = ours[0](batches[0][0])
    assert bnt.takes(bn_input, ours[1].running_mean, ours[1].running_var, ours[1].weight, ours[1].bias, True)
    scale = 2.0 if dtype in HALF else 1.0  # half conv weights may drift apart by a rounding per step
    np.testing.assert_allclose(_train(ours, batches, dtype), _train(theirs, batches, dtype),
                               rtol=TOL[dtype][1] * scale, atol=TOL[dtype][0])
    _compare_models(ours, theirs, dtype, scale)
    assert int(ours[1].num_batches_tracked) == 5
    # eval mode: running statistics, output in the input's memory format
    ours.eval(), theirs.eval()
    x = batches[0][0]
    with torch.no_grad():
        y_ours, y_theirs = ours[1](ours[0](x)), theirs[1](theirs[0](x))
    assert y_ours.dtype is dtype and y_ours.is_contiguous(memory_format=fmt)
    _close(y_ours, y_theirs, dtype)


@pytest.mark.parametrize("kwargs", [dict(momentum=None), dict(affine=False), dict(track_running_stats=False),
                                    dict(bias=False), dict(eps=1e-3, momentum=0.3)], ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_module_options_match_torch(kwargs):
    """momentum=None (cumulative average), affine=False, track_running_stats=False, bias=False (torch 2.13+),
    other eps and momentum: 3 training steps (outputs, gradients, state) and eval."""
    if "bias" in kwargs and "bias" not in inspect.signature(torch.nn.BatchNorm2d).parameters:
        pytest.skip("this torch's batch norms have no bias= argument")
    torch.manual_seed(0)
    theirs = torch.nn.BatchNorm2d(4, dtype=torch.float64, **kwargs)
    ours = bnt.BatchNorm2d(4, dtype=torch.float64, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    for step, n in enumerate((3, 5, 4)):
        x = torch.randn(n, 4, 5, 6, dtype=torch.float64) * 3 + 2
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        dy = torch.randn_like(ya)
        ya.backward(dy), yb.backward(dy)
        _close(ya, yb, torch.float64)
        _close(xa.grad, xb.grad, torch.float64)
        for name, p in ours.named_parameters():
            _close(p.grad, getattr(theirs, name).grad, torch.float64)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        if value is not None:
            assert torch.allclose(ours.state_dict()[key].double(), value.double(), atol=1e-12), key
    ours.eval(), theirs.eval()
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    _close(ours(x), theirs(x), torch.float64)


def test_running_statistics_updated_by_the_kernel_only_for_a_fixed_momentum(monkeypatch):
    """A module with a fixed momentum trains on a kernel built for it, which updates the running
    statistics itself (as torch, in double: float32 agrees to an ulp); momentum=None changes its
    factor every step and must not build a kernel per step, nor must the functional form."""
    monkeypatch.setattr(bnt, "_baked_momenta", set())  # (other tests' momenta do not count against the limit)
    torch.manual_seed(1)
    x = torch.randn(6, 3, 4, 5) * 2 + 1
    fixed, cumulative = bnt.BatchNorm2d(3, momentum=0.25), bnt.BatchNorm2d(3, momentum=None)
    theirs = torch.nn.BatchNorm2d(3, momentum=0.25)
    before = set(bnt._kernels)
    for _ in range(3):
        fixed(x), cumulative(x), theirs(x)
        bnt.batch_norm(x, torch.zeros(3), torch.ones(3), training=True, momentum=0.3)
    momenta = {key[-1] for key in set(bnt._kernels) - before}
    assert momenta <= {0.25, None} and 0.25 in momenta
    torch.testing.assert_close(fixed.running_mean, theirs.running_mean, atol=0, rtol=2e-7)
    torch.testing.assert_close(fixed.running_var, theirs.running_var, atol=0, rtol=2e-7)
    assert int(fixed.num_batches_tracked) == 3


def test_a_momentum_changed_every_step_builds_a_bounded_number_of_kernels(monkeypatch):
    """A schedule that changes a module's momentum every step: the first few values get kernels of
    their own, later ones the torch ops (no build per step); the running statistics stay torch's."""
    monkeypatch.setattr(bnt, "_baked_momenta", set())
    torch.manual_seed(2)
    ours, theirs = bnt.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    before = set(bnt._kernels)
    for step in range(bnt._MAX_BAKED_MOMENTA + 3):
        x = torch.randn(5, 3, 2, 3)
        ours.momentum = theirs.momentum = 0.05 + 0.01 * step
        ours(x), theirs(x)
    assert len({key[-1] for key in set(bnt._kernels) - before} - {None}) <= bnt._MAX_BAKED_MOMENTA
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.running_var, theirs.running_var, atol=1e-6, rtol=1e-6)


def test_running_statistics_sharing_memory_are_updated_by_torch_ops(monkeypatch):
    """A kernel updating the running statistics in place must not be handed tensors that share
    memory (with each other or with a parameter): such a module falls back to the torch ops,
    whose results are torch's own."""
    monkeypatch.setattr(bnt, "_baked_momenta", set())
    torch.manual_seed(3)
    x = torch.randn(6, 3, 4, 5) * 2 + 1
    ours, theirs = bnt.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    for bn in (ours, theirs):
        bn.running_var = bn.running_mean  # one buffer for both statistics
    before = set(bnt._kernels)
    for _ in range(2):
        ours(x), theirs(x)
    assert {key[-1] for key in set(bnt._kernels) - before} <= {None}  # no kernel updating them
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, atol=1e-6, rtol=1e-6)


# Each case: an op call with one argument the kernels cannot take, and the argument the error names.
def _bad_op_calls():
    ops = torch.ops.bngen
    x, dy, w, b = torch.randn(4, 3, 5), torch.randn(4, 3, 5), torch.rand(3) + 0.5, torch.randn(3)
    m, v = x.mean((0, 2)), x.var((0, 2), unbiased=False)
    return {
        "weight shape": (lambda: ops.batch_norm_train(x, torch.ones(4), b, 1e-5), "weight", (x, b)),
        "weight dtype": (lambda: ops.batch_norm_relu_train(x, w.double(), b, 1e-5), "weight", (x, b)),
        "bias strided": (lambda: ops.batch_norm_train(x, w, torch.randn(6)[::2], 1e-5), "bias", (x, w)),
        "x integer": (lambda: ops.batch_norm_train(x.long(), None, None, 1e-5), "x", ()),
        "x one dimension": (lambda: ops.batch_norm_eval(torch.randn(3), w, b, m, v, 1e-5), "x", (w, b, m, v)),
        "x empty": (lambda: ops.batch_norm_train(x[:0], w, b, 1e-5), "x", (w, b)),
        "running_var shape": (lambda: ops.batch_norm_eval(x, w, b, m, v[:2], 1e-5), "running_var", (x, w, b, m)),
        "mean dtype": (lambda: ops.batch_norm_train_backward(dy, x, w, m.double(), v, 1e-5, True), "mean",
                       (dy, x, w, v)),
        "dy shape": (lambda: ops.batch_norm_train_backward(dy[:2], x, w, m, v, 1e-5, True), "dy", (x, w, m, v)),
        "residual dtype": (lambda: ops.compiled_batch_norm_add_train(x, dy.double(), w, b, 1e-5, True), "residual",
                           (x, w, b)),
    }


@pytest.mark.parametrize("case", list(_bad_op_calls()))
def test_ops_refuse_what_the_kernels_cannot_take_before_any_c_runs(monkeypatch, case):
    """The ops hand tensors' memory to the C entry points directly, so they check the tensors
    first: a ValueError naming the op and the argument, no C call, no tensor changed."""
    call, argument, inputs = _bad_op_calls()[case]
    before = [t.clone() for t in inputs]
    calls = []
    monkeypatch.setattr(bnt, "_call", lambda *args: calls.append(args))
    with pytest.raises(ValueError, match=rf"^bngen::\w+: {argument} "):
        call()
    assert not calls
    for t, kept in zip(inputs, before):
        torch.testing.assert_close(t, kept, atol=0, rtol=0)


def test_input_changed_in_place_before_the_backward_is_an_error():
    """The eager backward reuses views of the forward's input: autograd must still refuse an
    input modified in place in between, as it does for torch's batch norm."""
    bn = bnt.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    h = x * 2
    y = bn(h)
    h.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("cls,theirs_cls,shape", [
    (bnt.BatchNorm1d, torch.nn.BatchNorm1d, (6, 5)),
    (bnt.BatchNorm1d, torch.nn.BatchNorm1d, (6, 5, 7)),
    (bnt.BatchNorm3d, torch.nn.BatchNorm3d, (3, 4, 3, 5, 2)),
], ids=["1d-2d", "1d-3d", "3d"])
def test_1d_and_3d_modules_match_torch(cls, theirs_cls, shape):
    torch.manual_seed(0)
    theirs = theirs_cls(shape[1])
    ours = cls(shape[1])
    ours.load_state_dict(theirs.state_dict())
    layouts = [torch.contiguous_format] + ([torch.channels_last_3d] if len(shape) == 5 else [])
    for fmt in layouts:
        x = (torch.randn(*shape) * 2 + 1).contiguous(memory_format=fmt)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        assert ya.is_contiguous(memory_format=fmt)
        (ya * ya).sum().backward(), (yb * yb).sum().backward()
        _close(ya, yb, torch.float32)
        _close(xa.grad, xb.grad, torch.float32, scale=5)
    _close(ours.running_var, theirs.running_var, torch.float32)
    assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_no_grad_and_inference_mode(context):
    """Without a gradient to record the kernels run without an autograd.Function: the same outputs
    (which require no gradient, as torch's) and running statistics."""
    torch.manual_seed(0)
    theirs, ours = torch.nn.BatchNorm2d(4), bnt.BatchNorm2d(4)
    x = torch.randn(3, 4, 5, 6, requires_grad=True)
    with context():
        for training in (True, False):
            theirs.train(training), ours.train(training)
            y_ours, y_theirs = ours(x), theirs(x)
            _close(y_ours, y_theirs, torch.float32)
            assert y_ours.requires_grad is y_theirs.requires_grad is False and y_ours.grad_fn is None
    _close(ours.running_var, theirs.running_var, torch.float32)
    _close(ours.running_mean, theirs.running_mean, torch.float32)


def test_eval_mode_with_frozen_input_still_gives_parameter_gradients():
    """Grad mode on, an input that requires no gradient, parameters that do: autograd records
    the call (fine-tuning the affine parameters of a frozen trunk)."""
    torch.manual_seed(3)
    theirs, ours = torch.nn.BatchNorm2d(4).eval(), bnt.BatchNorm2d(4).eval()
    x = torch.randn(3, 4, 5, 6)
    for module in (theirs, ours):
        module(x).pow(2).sum().backward()
    _close(ours.weight.grad, theirs.weight.grad, torch.float32)
    _close(ours.bias.grad, theirs.bias.grad, torch.float32)


# -- errors: torch's own ------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,shape", [(bnt.BatchNorm1d, (2, 3, 4, 5)), (bnt.BatchNorm2d, (2, 3, 4)),
                                       (bnt.BatchNorm3d, (2, 3, 4, 5)), (bnt.SyncBatchNorm, (3,))])
def test_bad_rank_raises_torchs_error(cls, shape):
    theirs_cls = getattr(torch.nn, cls.__name__)
    with pytest.raises(ValueError) as theirs:
        theirs_cls(3)(torch.randn(*shape))
    with pytest.raises(ValueError) as ours:
        cls(3)(torch.randn(*shape))
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1, 1)])
def test_one_value_per_channel_in_training_raises_torchs_error(shape):
    cls = bnt.BatchNorm1d if len(shape) == 2 else bnt.BatchNorm2d
    with pytest.raises(ValueError) as theirs:
        getattr(torch.nn, cls.__name__)(3)(torch.randn(*shape))
    with pytest.raises(ValueError) as ours:
        cls(3)(torch.randn(*shape))
    assert str(ours.value) == str(theirs.value)
    assert cls(3).eval()(torch.randn(*shape)).shape == shape  # eval mode takes it


# -- what the kernels take, and the fallback -----------------------------------------------------------
def test_layouts_taken_without_copy_and_kernels_shared_across_batch_sizes(monkeypatch):
    monkeypatch.setattr(bnt, "_baked_momenta", set())  # (other tests' momenta do not count against the limit)
    bn = bnt.BatchNorm2d(4)
    x = torch.randn(3, 4, 5, 6)
    seen = []  # the data pointers handed to the C entry points
    call = bnt._call
    monkeypatch.setattr(bnt, "_call", lambda kernel, entry, values: seen.append(values) or call(kernel, entry, values))
    for t, last in ((x, False), (x.contiguous(memory_format=torch.channels_last), True)):
        taken, is_last, outer, inner = bnt._input(t)
        assert taken is t and is_last is last and (outer, inner) == ((90, 1) if last else (3, 30))
        y = bn(t)
        assert seen[-1]["x"].data_ptr() == t.data_ptr() and seen[-1]["y"] is y  # no copy in, none out
        assert y.stride() == t.stride()  # the output keeps the input's layout
    before = set(bnt._kernels)
    for n in (1, 2, 7, 16):
        y = bn(torch.randn(n, 4, 5, 6))
        assert y.shape == (n, 4, 5, 6)
        bn(torch.randn(n, 4, 3, 2).contiguous(memory_format=torch.channels_last))  # any H, W: one (N*H*W, C) class
    # (training, dtype, C, inner, eps, scale, center, relu, residual, momentum): one class per layout, whatever
    # N, H and W; the module's momentum is built in (the kernel updates the running statistics)
    expected = {(True, torch.float32, 4, 30, 1e-5, True, True, False, False, 0.1),
                (True, torch.float32, 4, 1, 1e-5, True, True, False, False, 0.1)}
    assert expected <= set(bnt._kernels) and set(bnt._kernels) - before <= expected


def _rows(t: torch.Tensor) -> np.ndarray:
    """t's values as the kernel's NumPy array of its shape class (a copy, for the reference)."""
    a = t.detach()
    a = a.view(torch.int16).numpy().view("bfloat16") if a.dtype is torch.bfloat16 else a.numpy()
    if bnt._channels_last(t):
        return np.ascontiguousarray(a.transpose(0, *range(2, a.ndim), 1)).reshape(-1, a.shape[1])
    return np.ascontiguousarray(a).reshape(a.shape[0], a.shape[1], -1)


def _same_bits(ours: torch.Tensor, want: np.ndarray) -> None:
    got = _rows(ours) if ours.dim() > 1 else ours.numpy()
    width = {2: np.uint16, 4: np.uint32, 8: np.uint64}[want.dtype.itemsize]
    np.testing.assert_array_equal(got.reshape(want.shape).view(width), want.view(width))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last_3d])
def test_ops_give_the_kernels_numpy_results_bit_for_bit(dtype, fmt):
    """The ops call the C entry points on the tensors' memory, arguments mapped by name: their
    results are those of the same kernels through the NumPy API (the binder's mapping), bit for
    bit, for the training forward and backward with the ReLU fused, the inference with a residual
    (given in the other layout: copied into x's) and the frozen layer's backward."""
    ops = torch.ops.bngen
    g = torch.Generator().manual_seed(0)
    pdtype = bnt._param_dtype(dtype)
    x = (torch.randn(3, 4, 2, 3, 5, generator=g) * 2 + 1).to(dtype).contiguous(memory_format=fmt)
    other = torch.channels_last_3d if fmt is torch.contiguous_format else torch.contiguous_format
    residual, dy = (torch.randn(3, 4, 2, 3, 5, generator=g).to(dtype).contiguous(memory_format=f) for f in (other, fmt))
    w, b = (torch.rand(4, generator=g) + 0.5).to(pdtype), torch.randn(4, generator=g).to(pdtype)
    rm, rv = torch.randn(4, generator=g).to(pdtype), (torch.rand(4, generator=g) + 0.5).to(pdtype)
    inner = 1 if bnt._channels_last(x) else 30
    W, B, RM, RV = (t.numpy() for t in (w, b, rm, rv))

    y, mean, var = ops.batch_norm_relu_train(x, w, b, 1e-5)
    kernel = bnt._kernel(True, dtype, 4, inner, 1e-5, True, True, True)
    want = kernel.forward(_rows(x), W, B)
    for ours, theirs in zip((y, mean, var), want):
        _same_bits(ours, theirs)
    grads = ops.batch_norm_relu_train_backward(dy, x, w, b, mean, var, 1e-5)
    for ours, theirs in zip(grads, kernel.backward(_rows(dy), _rows(x), W, want[1], want[2], beta=B)):
        _same_bits(ours, theirs)

    kernel = bnt._kernel(False, dtype, 4, inner, 1e-5, True, True, True, residual=True)
    _same_bits(ops.compiled_batch_norm_add_eval(x, residual, w, b, rm, rv, 1e-5, True),
               kernel(_rows(x), W, B, RM, RV, residual=_rows(residual.contiguous(memory_format=fmt))))
    kernel = bnt._kernel(False, dtype, 4, inner, 1e-5, True, True)
    grads = ops.batch_norm_eval_backward(dy, x, w, rm, rv, 1e-5, True)
    for ours, theirs in zip(grads, kernel.backward(_rows(dy), _rows(x), W, RM, RV)):
        _same_bits(ours, theirs)
    assert y.stride() == x.stride() and grads[0].stride() == x.stride()


@pytest.mark.parametrize("case", ["half_params", "strided", "eps0_eval", "running_stats_float64"])
def test_fallback_to_torch_matches_torch(case):
    """What the kernels do not take runs torch's own batch norm, with torch's results."""
    torch.manual_seed(0)
    theirs = torch.nn.BatchNorm2d(4, eps=0.0 if case == "eps0_eval" else 1e-5).train(case != "eps0_eval")
    x = torch.randn(3, 4, 6, 6)
    if case == "half_params":
        theirs, x = theirs.half(), x.half()  # .half() on the module: half parameters, torch's own kernel
    elif case == "strided":
        x = x[:, :, ::2]
    elif case == "eps0_eval":  # bngen needs eps > 0; torch allows 0 in eval
        theirs.running_var.fill_(2.0)
    else:
        theirs.running_mean = theirs.running_mean.double()
    ours = bnt.convert(copy.deepcopy(theirs))
    assert not bnt.takes(x, ours.running_mean, ours.running_var, ours.weight, ours.bias, ours.training, ours.momentum,
                         ours.eps)
    if case == "running_stats_float64":  # torch refuses it, and so does bngen, with torch's error
        with pytest.raises(RuntimeError) as theirs_error:
            theirs(x)
        with pytest.raises(RuntimeError) as ours_error:
            ours(x)
        assert str(ours_error.value) == str(theirs_error.value)
        return
    ya, yb = ours(x), theirs(x)
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_functional_batch_norm_matches_torch():
    torch.manual_seed(0)
    x = torch.randn(5, 4, 3, 2, dtype=torch.float64)
    w, b = torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    rm, rv = torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    for training in (True, False):
        ya = bnt.batch_norm(x, rm, rv, w, b, training, 0.2, 1e-3)
        yb = F.batch_norm(x, rm2, rv2, w, b, training, 0.2, 1e-3)
        _close(ya, yb, torch.float64)
        _close(rm, rm2, torch.float64)
        _close(rv, rv2, torch.float64)
    # weight without bias and the reverse; training without running statistics
    _close(bnt.batch_norm(x, None, None, w, None, True), F.batch_norm(x, None, None, w, None, True), torch.float64)
    _close(bnt.batch_norm(x, rm, rv, None, b), F.batch_norm(x, rm, rv, None, b), torch.float64)


# -- autograd ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["eager", "custom_op", "relu_op"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_gradcheck(training, affine, fmt, path):
    """float64 gradcheck of the eager path (autograd.Function), of the custom ops'
    autograd registration (what torch.compile records) and of the ops fused with a ReLU
    (what `fuse_relu` puts in a compiled graph)."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5
    params = (torch.rand(4, dtype=torch.float64, requires_grad=True),
              torch.randn(4, dtype=torch.float64, requires_grad=True)) if affine else ()

    def fn(x, *p):
        w, b = p if affine else (None, None)
        if path == "eager":
            return bnt.batch_norm(x, None if training else rm, None if training else rv, w, b, training)
        relu = "relu_" if path == "relu_op" else ""
        if training:
            return getattr(torch.ops.bngen, f"batch_norm_{relu}train")(x, w, b, 1e-5)[0]
        return getattr(torch.ops.bngen, f"batch_norm_{relu}eval")(x, w, b, rm, rv, 1e-5)

    assert torch.autograd.gradcheck(fn, (x,) + params)
    if path == "relu_op":  # the ReLU is there (gradcheck passes for the plain batch norm too)
        y = fn(x.detach(), *(q.detach() for q in params))
        unfused = torch.relu(bnt.batch_norm(x.detach(), None if training else rm, None if training else rv,
                                            *(q.detach() for q in params), training=training))
        assert (y == 0).any() and torch.equal(y, unfused)


def test_custom_ops_pass_opcheck():
    """torch.library.opcheck: schemas, fake implementations, autograd registration."""
    x = torch.randn(3, 4, 5, 6)
    w, b, rm, rv = torch.rand(4), torch.rand(4), torch.rand(4), torch.rand(4) + 0.5
    ops = torch.ops.bngen
    for args in ((x, w, b, 1e-5), (x.contiguous(memory_format=torch.channels_last), None, None, 1e-5)):
        torch.library.opcheck(ops.batch_norm_train.default, args)
    torch.library.opcheck(ops.batch_norm_eval.default, (x, w, b, rm, rv, 1e-5))
    _, mean, var = ops.batch_norm_train(x, w, b, 1e-5)
    dy = torch.randn_like(x)
    torch.library.opcheck(ops.batch_norm_train_backward.default, (dy, x, w, mean, var, 1e-5, True))
    torch.library.opcheck(ops.batch_norm_eval_backward.default, (dy, x, w, rm, rv, 1e-5, True))
    # the ops fused with a ReLU (what `fuse_relu` puts in a compiled graph)
    torch.library.opcheck(ops.batch_norm_relu_train.default, (x, w, b, 1e-5))
    torch.library.opcheck(ops.batch_norm_relu_train.default, (x.contiguous(memory_format=torch.channels_last), w, None, 1e-5))
    torch.library.opcheck(ops.batch_norm_relu_eval.default, (x, w, b, rm, rv, 1e-5))
    torch.library.opcheck(ops.batch_norm_relu_train_backward.default, (dy, x, w, b, mean, var, 1e-5))
    torch.library.opcheck(ops.batch_norm_relu_eval_backward.default, (dy, x, None, b, rm, rv, 1e-5))
    # inductor may hand them channels-last tensors without a copy into the traced layout
    for name in ("batch_norm_train", "batch_norm_eval", "batch_norm_train_backward", "batch_norm_eval_backward",
                 "batch_norm_relu_train", "batch_norm_relu_eval", "batch_norm_relu_train_backward",
                 "batch_norm_relu_eval_backward"):
        assert torch.Tag.flexible_layout in getattr(ops, name).default.tags, name
        assert torch.Tag.flexible_layout in getattr(ops, "compiled_" + name).default.tags, name
    # the twins without autograd (what `fuse_relu` puts in compiled graphs): schema and fake tensors
    twin_checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.compiled_batch_norm_train.default, (x, w, b, 1e-5), test_utils=twin_checks)
    torch.library.opcheck(ops.compiled_batch_norm_relu_eval.default, (x, w, b, rm, rv, 1e-5), test_utils=twin_checks)
    torch.library.opcheck(ops.compiled_batch_norm_relu_train_backward.default, (dy, x, w, b, mean, var, 1e-5),
                          test_utils=twin_checks)
    torch.library.opcheck(ops.compiled_batch_norm_eval_backward.default, (dy, x, w, rm, rv, 1e-5, True),
                          test_utils=twin_checks)
    # the batch norms fused with a residual sum (and the ReLU), also with the residual in another layout
    last = x.contiguous(memory_format=torch.channels_last)
    for xr, r in ((x, torch.randn_like(x)), (last, torch.randn_like(x)), (x, torch.randn_like(last))):
        torch.library.opcheck(ops.compiled_batch_norm_add_train.default, (xr, r, w, b, 1e-5, True), test_utils=twin_checks)
        torch.library.opcheck(ops.compiled_batch_norm_add_eval.default, (xr, r, None, b, rm, rv, 1e-5, False),
                              test_utils=twin_checks)
        assert torch.Tag.flexible_layout in ops.compiled_batch_norm_add_train.default.tags
        y, mean, var = ops.compiled_batch_norm_add_train(xr, r, w, b, 1e-5, True)
        plain_y, plain_mean, plain_var = ops.batch_norm_train(xr, w, b, 1e-5)
        torch.testing.assert_close(y, torch.relu(plain_y + r), atol=1e-6, rtol=1e-6)
        assert torch.equal(mean, plain_mean) and torch.equal(var, plain_var)
        assert y.is_contiguous(memory_format=torch.channels_last if xr is last else torch.contiguous_format)
        torch.testing.assert_close(ops.compiled_batch_norm_add_eval(xr, r, None, b, rm, rv, 1e-5, False),
                                   ops.batch_norm_eval(xr, None, b, rm, rv, 1e-5) + r, atol=1e-6, rtol=1e-6)


# -- torch.compile --------------------------------------------------------------------------------------------
def test_compile_has_no_graph_breaks_and_matches_eager():
    torch.manual_seed(0)
    theirs = _conv_bn_relu(torch.nn.BatchNorm2d, torch.float32)
    eager = bnt.convert(copy.deepcopy(theirs))
    compiled_model = bnt.convert(copy.deepcopy(theirs))
    x = torch.randn(6, 3, 5, 6)
    explanation = torch._dynamo.explain(copy.deepcopy(compiled_model))(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert "bngen.batch_norm_train" in explanation.graphs[0].code  # the custom op, traced as one node
    compiled = torch.compile(compiled_model)
    batches = _batches(torch.float32, torch.contiguous_format, steps=3, sizes=(6, 6, 6))
    np.testing.assert_allclose(_train(compiled, batches, torch.float32), _train(eager, batches, torch.float32),
                               rtol=1e-5)
    _compare_models(compiled_model, eager, torch.float32)
    compiled.eval(), eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), atol=2e-5, rtol=2e-5)


class _ResidualBlock(torch.nn.Module):
    """conv-bn-relu (fusable), then a batch norm whose output also feeds a residual sum (not fusable);
    the masks of the other two ReLUs are recomputed in the backward (one after the last convolution)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.conv2, self.bn2 = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Conv2d(4, 2, 1)

    def forward(self, x):
        a = torch.relu(self.bn1(self.conv1(x)))
        b = self.bn2(self.conv2(a))
        return torch.relu(self.head(torch.relu(b + a) + b))  # (a ReLU after the last convolution, too)


def _op_names(fn) -> list:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    # (an op's dispatch may show as an event nested in one of the same name, and a native op's
    # fallback as its twin nested in it: counted once)
    def twin(name):
        return name.replace("bngen::compiled_", "bngen::").replace("bngen::native_", "bngen::")

    return [twin(e.name) for e in prof.events() if e.name.startswith(("bngen::compiled_", "bngen::native_"))
            and (e.cpu_parent is None or not e.cpu_parent.name.startswith(("bngen::compiled_", "bngen::native_")))]


def _fuse_joint_graph(f, args) -> dict:
    """`f` on `args` through AOTAutograd (inductor's decompositions: the ReLU's backward as
    where(le); no inductor) with `_fuse_relu` run on the joint graph; asserts that the
    partitioned graphs give f's values and gradients.  Returns what the pass did: the
    count it returned, the call targets and the masks' recompute tags of the graph after it."""
    from functorch.compile import aot_function, min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table

    seen = {}

    def partition(joint, inputs, **kwargs):
        seen["fused"] = bnt._fuse_relu(joint.graph)
        joint.graph.lint()  # still in topological order
        ops = torch.ops.bngen  # (a native op counts as the twin it stands for)
        twins = {getattr(ops, "native_" + name).default: getattr(ops, "compiled_" + name).default
                 for name in torch_native.OPS}
        calls = [n.target for n in joint.graph.nodes if n.op == "call_function"]
        seen["targets"] = [twins.get(t, t) for t in calls]
        seen["natives"] = sum(t in twins for t in calls)
        seen["masks"] = [n.meta.get("recompute") for n in joint.graph.nodes if n.target is torch.ops.aten.le.Scalar]
        joint.recompile()
        return min_cut_rematerialization_partition(joint, inputs, **kwargs)

    args = [t.requires_grad_() for t in args]
    compiled = aot_function(f, fw_compiler=lambda gm, _: gm, bw_compiler=lambda gm, _: gm, partition_fn=partition,
                            decompositions=select_decomp_table())
    out = compiled(*args)
    grads = torch.autograd.grad(out.square().sum(), args)
    expected = f(*args)
    expected_grads = torch.autograd.grad(expected.square().sum(), args)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    for ours, theirs in zip(grads, expected_grads):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_native_ops_give_the_python_twins_results_bit_for_bit(dtype):
    """The native ops (C++, calling the kernels without Python) return what the twins they
    stand for return, bit for bit and in the same layout, channels-last 4-d and 5-d; other
    inputs (channels-first, no affine parameters, bad arguments) go to the twins, errors and all."""
    if not torch_native.available():
        pytest.skip("no C++ compiler for the native ops")  # (CI installs one: the test runs there)
    ops = torch.ops.bngen
    g = torch.Generator().manual_seed(0)
    pdtype = bnt._param_dtype(dtype)
    w, b = (torch.rand(4, generator=g) + 0.5).to(pdtype), torch.randn(4, generator=g).to(pdtype)
    for shape, fmt in (((3, 4, 5, 6), torch.channels_last), ((2, 4, 3, 2, 5), torch.channels_last_3d),
                       ((3, 4, 5, 6), torch.contiguous_format)):
        x, r, dy = ((torch.randn(*shape, generator=g) * 2 + 1).to(dtype).contiguous(memory_format=fmt) for _ in range(3))
        r = r.contiguous()  # (a residual in another layout is copied into x's)
        calls = [("batch_norm_train", (x, w, b, 1e-5)), ("batch_norm_relu_train", (x, w, b, 1e-5)),
                 ("batch_norm_train", (x, None, None, 1e-5)), ("batch_norm_add_train", (x, r, w, b, 1e-5, True))]
        _, mean, var = ops.compiled_batch_norm_train(x, w, b, 1e-5)
        calls += [("batch_norm_train_backward", (dy, x, w, mean, var, 1e-5, True)),
                  ("batch_norm_relu_train_backward", (dy, x, w, b, mean, var, 1e-5))]
        for name, args in calls:
            ours, theirs = getattr(ops, "native_" + name)(*args), getattr(ops, "compiled_" + name)(*args)
            for a, t in zip(ours, theirs):
                assert a.stride() == t.stride() and torch.equal(a, t), (name, fmt)
    with pytest.raises(ValueError, match="^bngen::batch_norm_train: weight "):
        ops.native_batch_norm_train(x.contiguous(memory_format=torch.channels_last), torch.ones(3, dtype=pdtype), b, 1e-5)


def test_native_ops_source_compiles_without_warnings(tmp_path):
    """The rendered C++ builds with -Wall -Wextra -Werror (torch's headers as system headers)."""
    try:
        cxx = torch_native._compiler().command
    except Exception:
        pytest.skip("no C++ compiler")
    cpp = tmp_path / "torch_ops.cpp"
    cpp.write_text(torch_native.source())
    run = subprocess.run(torch_native._command(cxx, cpp, tmp_path / "ops.so", strict=True), capture_output=True,
                         text=True, timeout=torch_native.TIMEOUT)
    assert run.returncode == 0, run.stderr[-4000:]


def test_without_a_cxx_compiler_compiled_graphs_keep_the_python_ops(monkeypatch):
    """A C++ compiler that is missing or fails: one warning saying so, and the native ops are not
    used (compiled graphs keep the twins); BNGEN_TORCH_NATIVE=0: not tried, no warning."""
    import warnings

    for cxx in ("/nonexistent/c++", "false"):
        monkeypatch.setattr(torch_native, "_state", {})
        monkeypatch.setenv("CXX", cxx)
        with pytest.warns(RuntimeWarning, match="through Python"):
            assert not torch_native.available()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not torch_native.available()  # (remembered: no second try, no second warning)
    monkeypatch.setattr(torch_native, "_state", {})
    monkeypatch.setenv(torch_native.ENV_VAR, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not torch_native.available()
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    node = graph.call_function(torch.ops.bngen.compiled_batch_norm_train.default, (x, None, None, 1e-5))
    graph.output(node)
    assert bnt._natives(graph) == 0 and node.target is torch.ops.bngen.compiled_batch_norm_train.default


def test_fuse_relu_rewrites_the_joint_graph():
    """The pass on a joint graph from AOTAutograd (inductor's decompositions, no inductor): one batch norm fused with its
    ReLU forward and backward, the other (its output also feeds a sum) not, every op replaced
    by its twin without autograd, the remaining ReLU's mask tagged for recomputation; the
    partitioned graphs compute the gradients of the unfused function."""
    from torch.utils.checkpoint import CheckpointPolicy

    ops, aten = torch.ops.bngen, torch.ops.aten

    def f(x, w, b, w2, b2):
        a = torch.relu(ops.batch_norm_train(x, w, b, 1e-5)[0])
        y = ops.batch_norm_train(a, w2, b2, 1e-5)[0]
        return torch.relu(y + a) * y

    torch.manual_seed(0)
    seen = _fuse_joint_graph(f, [torch.randn(4, 3, 5, 6), torch.rand(3) + 0.5, torch.randn(3), torch.rand(3) + 0.5,
                                 torch.randn(3)])
    assert seen["fused"] == 1
    targets = seen["targets"]
    for name, count in (("batch_norm_relu_train", 1), ("batch_norm_train", 1), ("batch_norm_relu_train_backward", 1),
                        ("batch_norm_train_backward", 1)):
        assert targets.count(getattr(ops, "compiled_" + name).default) == count, name
        assert getattr(ops, name).default not in targets, name
    assert targets.count(aten.relu.default) == 1  # the unfused one
    assert seen["masks"] == [CheckpointPolicy.MUST_RECOMPUTE]
    assert seen["natives"] == (4 if torch_native.available() else 0)  # the training ops: called without Python


def test_fuse_relu_fuses_under_compile_with_the_same_results():
    """`fuse_relu` as inductor's joint-graph pass: relu(bn(x)) runs as one fused op forward
    and backward, a batch norm whose output has another user stays unfused, every op runs
    as its twin without autograd (the profiled names), and 3 SGD steps and eval give what
    the compiled model without the pass gives (2 compiles each)."""
    torch.manual_seed(0)
    base = bnt.convert(_ResidualBlock())
    plain, fused = copy.deepcopy(base), copy.deepcopy(base)
    explanation = torch._dynamo.explain(copy.deepcopy(base))(torch.randn(6, 3, 5, 6))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled_plain = torch.compile(plain)
    compiled_fused = torch.compile(fused, options={"joint_custom_pre_pass": bnt.fuse_relu})
    batches = _batches(torch.float32, torch.contiguous_format, steps=3, sizes=(6, 6, 6))
    np.testing.assert_allclose(_train(compiled_fused, batches, torch.float32),
                               _train(compiled_plain, batches, torch.float32), rtol=1e-6)
    for (name, a), (_, b) in zip(list(fused.named_parameters()) + list(fused.named_buffers()),
                                 list(plain.named_parameters()) + list(plain.named_buffers())):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)

    x, target = batches[0]

    def step():
        F.mse_loss(compiled_fused(x).double(), target).backward()

    names = _op_names(step)
    F.mse_loss(compiled_plain(x).double(), target).backward()  # the same running statistics for eval below
    assert names.count("bngen::batch_norm_relu_train") == 1 and names.count("bngen::batch_norm_train") == 1, names
    assert names.count("bngen::batch_norm_relu_train_backward") == 1, names
    assert names.count("bngen::batch_norm_train_backward") == 1, names
    compiled_fused.eval(), compiled_plain.eval()
    with torch.no_grad():
        compiled_fused(x)  # compiles the inference graph (the compile runs the ops too)
        names = _op_names(lambda: compiled_fused(x))
        assert names.count("bngen::batch_norm_relu_eval") == 1 and names.count("bngen::batch_norm_eval") == 1, names
        torch.testing.assert_close(compiled_fused(x), compiled_plain(x), atol=1e-6, rtol=1e-6)


def test_fuse_relu_fuses_residual_sums_in_the_joint_graph():
    """relu(bn(x) + r) and bn(x) + r become one op each (batch_norm_add_train), also where
    r is computed after the batch norm (a projection shortcut: the graph is reordered);
    the partitioned graphs compute the values and gradients of the unfused function."""
    ops = torch.ops.bngen

    def f(x, w, b, w2, b2, s):
        y = ops.batch_norm_train(x, w, b, 1e-5)[0]
        shortcut = ops.batch_norm_train(x * s, w2, b2, 1e-5)[0]  # traced after y
        out = torch.relu(y + shortcut)  # the shortcut's output feeds the sum too: only y's batch norm fuses
        return ops.batch_norm_train(out, w, None, 1e-5)[0] + out  # no ReLU

    torch.manual_seed(0)
    seen = _fuse_joint_graph(f, [torch.randn(4, 3, 5, 6), torch.rand(3) + 0.5, torch.randn(3), torch.rand(3) + 0.5,
                                 torch.randn(3), torch.rand(1, 3, 1, 1) + 0.5])
    assert seen["fused"] == 2
    assert seen["targets"].count(ops.compiled_batch_norm_add_train.default) == 2
    assert seen["targets"].count(ops.compiled_batch_norm_train.default) == 1  # the shortcut's
    assert torch.ops.aten.relu.default not in seen["targets"]


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_fuse_relu_fuses_resnet_block_outputs_under_compile(fmt):
    """The benchmark's model (tiny): every block's relu(bn2(conv2(.)) + shortcut) runs as one
    op in training and in eval; 3 SGD steps and eval give what the compiled model without
    the pass gives."""
    from bngen.tools import resnet

    torch.manual_seed(0)
    base = bnt.convert(resnet.ResNet(resnet.SIZES["tiny"])).to(memory_format=fmt)
    plain, fused = copy.deepcopy(base), copy.deepcopy(base)
    compiled_plain = torch.compile(plain)
    compiled_fused = torch.compile(fused, options={"joint_custom_pre_pass": bnt.fuse_relu})
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(4, 3, 8, 8, generator=g).contiguous(memory_format=fmt),
                torch.randn(4, 10, generator=g, dtype=torch.float64)) for _ in range(3)]
    np.testing.assert_allclose(_train(compiled_fused, batches, torch.float32),
                               _train(compiled_plain, batches, torch.float32), rtol=1e-5)
    for (name, a), (_, b) in zip(list(fused.named_parameters()) + list(fused.named_buffers()),
                                 list(plain.named_parameters()) + list(plain.named_buffers())):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    x, target = batches[0]
    names = _op_names(lambda: F.mse_loss(compiled_fused(x).double(), target).backward())
    F.mse_loss(compiled_plain(x).double(), target).backward()  # the same running statistics for eval below
    assert names.count("bngen::batch_norm_add_train") == 3, names
    compiled_fused.eval(), compiled_plain.eval()
    with torch.no_grad():
        compiled_fused(x)
        names = _op_names(lambda: compiled_fused(x))
        assert names.count("bngen::batch_norm_add_eval") == 3, names
        torch.testing.assert_close(compiled_fused(x), compiled_plain(x), atol=1e-5, rtol=1e-5)


# -- state_dict, conversion -----------------------------------------------------------------------------------
def test_state_dict_round_trips_both_ways():
    torch.manual_seed(0)
    theirs = torch.nn.BatchNorm2d(4, momentum=0.3)
    theirs(torch.randn(3, 4, 2, 2))
    ours = bnt.BatchNorm2d(4, momentum=0.3)
    ours.load_state_dict(theirs.state_dict())
    ours(torch.randn(3, 4, 2, 2))
    back = torch.nn.BatchNorm2d(4, momentum=0.3)
    back.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert int(back.num_batches_tracked) == 2
    assert [n for n, _ in ours.named_parameters()] == ["weight", "bias"]
    assert isinstance(ours, torch.nn.BatchNorm2d)  # code that looks for torch's batch norms finds bngen's


def test_convert_replaces_every_batch_norm_keeping_parameters_and_buffers():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "one": torch.nn.BatchNorm1d(5), "two": torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)),
        "three": torch.nn.BatchNorm3d(4, affine=False), "sync": torch.nn.SyncBatchNorm(4, momentum=None),
        "untracked": torch.nn.BatchNorm2d(4, track_running_stats=False), "other": torch.nn.LayerNorm(4),
    })
    model["two"][1].eval()
    before = {name: t for name, t in list(model.named_parameters()) + list(model.named_buffers())}
    reference = copy.deepcopy(model)
    converted = bnt.convert(model)
    assert converted is model
    kinds = {name: type(m) for name, m in converted.named_modules()}
    assert kinds["one"] is bnt.BatchNorm1d and kinds["two.1"] is bnt.BatchNorm2d
    assert kinds["three"] is bnt.BatchNorm3d and kinds["sync"] is bnt.SyncBatchNorm
    assert kinds["untracked"] is bnt.BatchNorm2d and kinds["other"] is torch.nn.LayerNorm
    after = {name: t for name, t in list(converted.named_parameters()) + list(converted.named_buffers())}
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)  # the same objects
    assert not converted["two"][1].training and converted["one"].training
    assert converted["sync"].momentum is None and converted["untracked"].running_mean is None
    assert bnt.convert(converted) is converted and type(converted["one"]) is bnt.BatchNorm1d
    assert type(bnt.convert(torch.nn.BatchNorm2d(3))) is bnt.BatchNorm2d  # a batch norm itself
    inputs = {"one": torch.randn(6, 5), "two": torch.randn(2, 3, 4, 4), "three": torch.randn(2, 4, 3, 2, 2),
              "sync": torch.randn(3, 4, 2, 2), "untracked": torch.randn(3, 4, 2, 2)}
    for name, x in inputs.items():
        torch.testing.assert_close(converted[name](x), reference[name](x))
    with pytest.raises(TypeError, match="module"):
        bnt.convert("not a module")


def test_sync_batch_norm_in_one_process_is_batch_norm():
    torch.manual_seed(0)
    theirs = torch.nn.BatchNorm2d(4)
    ours = bnt.SyncBatchNorm(4)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 4, 5, 6)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    converted = bnt.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(4)))
    assert type(converted[0]) is bnt.SyncBatchNorm


# -- import isolation -----------------------------------------------------------------------------------------
def test_import_bngen_does_not_import_torch():
    code = "import sys, bngen; bngen.Spec(shape=(None, 3)); assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- the end-to-end benchmark, functionally ------------------------------------------------------------------
def test_without_batch_norm_leaves_no_batch_norm():
    from bngen.tools.resnet import SIZES, ResNet, without_batch_norm

    model = without_batch_norm(ResNet(SIZES["tiny"]))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, torch.nn.Identity) for m in model.modules()) == 9
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_bench_model_runs_and_losses_agree(tmp_path, capsys):
    """`bngen bench --model` at the tiny size, eager, one thread (no timing conclusions drawn)."""
    import json

    from bngen.tools.cli import main

    out = tmp_path / "model.json"
    assert main(["bench", "--model", "--model-size", "tiny", "--modes", "eager", "--threads", "1", "--repeat", "2",
                 "--steps", "4", "--quiet", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(r["mode"], r["threads"], r["implementation"]) for r in report["rows"]] == [
        ("eager", 1, "torch"), ("eager", 1, "bngen")]
    assert all(r["bn_share"] is not None and 0 < r["bn_share"] < 1 for r in report["rows"])
    # the batch-norm cost is the step against the same model without batch norm, timed alongside
    assert all(r["bn_cost_ms"] == r["step"]["median_ms"] - r["without_bn_ms"] and r["without_bn_ms"] > 0
               for r in report["rows"])
    torch_row, bngen_row = report["rows"]
    assert torch_row["torch_over_bngen"] == 1.0 and torch_row["rounds_faster"] is None  # (paired with itself)
    assert bngen_row["torch_over_bngen"] > 0 and bngen_row["rounds_faster"] in (0.0, 0.5, 1.0)  # of 2 rounds
    assert set(report["losses"]["eager, 1 thread(s)"]) == {"max_relative_difference", "torch", "bngen"}
    losses = report["losses"]["eager, 1 thread(s)"]
    assert len(losses["bngen"]) == 4 and losses["max_relative_difference"] < 1e-4
    assert "| eager | 1 | bngen |" in capsys.readouterr().out
    assert main(["bench", "--model", "--modes", "lazy"]) == 2
    assert "--modes: 'lazy'" in capsys.readouterr().err
