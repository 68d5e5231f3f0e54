"""bngen inside PyTorch: drop-in ``torch.nn.BatchNorm*`` modules computed by bngen kernels.

``import bngen.torch as bnt`` (``import bngen`` alone never imports torch) gives
`BatchNorm1d`, `BatchNorm2d`, `BatchNorm3d` and `SyncBatchNorm`, subclasses of torch.nn's
with the same arguments, parameters, buffers, state_dict keys, conventions and errors;
`batch_norm`, with the signature of ``torch.nn.functional.batch_norm``; and `convert`,
which swaps the batch norms of a model for these, keeping their parameters and buffers.

The kernels are ``torch.library`` custom ops (``torch.ops.bngen.*``) with fake-tensor
implementations and autograd formulas, so autograd and ``torch.compile`` see them as
single operators.  They take CPU tensors of float32/float64 (parameters of the same
dtype) or float16/bfloat16 (float32 parameters, torch's mixed precision), contiguous or
channels_last, without a copy: a tensor's memory is handed to the kernel's C entry point
as it is (no NumPy in between), seen as one of two shape classes,

* channels-first (a contiguous ``(N, C, ...)`` tensor): ``(N, C, inner)``, feature axis 1,
  ``inner`` the product of the spatial sizes (``(N, C)`` when there are none);
* channels-last (a ``channels_last`` / ``channels_last_3d`` tensor): the NHWC memory as
  ``(N*H*W, C)``, feature axis 1,

with the leading size dynamic, so one compiled kernel serves every batch size (and, for
channels-last, every spatial size).  Outputs keep the input's memory format.  Everything
else (another device or dtype, half parameters, a strided view, an empty batch) is
passed to ``torch.nn.functional.batch_norm``.

In eager training, a module with a fixed momentum leaves its running statistics to the
kernel, built for that momentum (PyTorch's momentum of the new value, unbiased variance);
otherwise (``momentum=None``'s cumulative average, the functional form, compiled graphs)
torch ops update them from the batch statistics the kernel returns.
"""

from __future__ import annotations

import math
import operator
import threading
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import torch_native
from .codegen.render import template_dir
from .core.dtypes import DTYPES
from .core.spec import Spec
from .core.threads import max_threads
from .jit.build import build
from .jit.kernel import Kernel
from .statistics import merge_moments

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "batch_norm", "convert", "takes"]  # and fuse_relu (made on first use)

_DTYPES = {getattr(torch, name): name for name in DTYPES}  # torch spells every spec dtype the same
_LAST_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}

# -- kernels --------------------------------------------------------------------------------
_kernels: Dict[tuple, Kernel] = {}
_kernels_lock = threading.Lock()


def _kernel(training: bool, dtype: torch.dtype, channels: int, inner: int, eps: float, scale: bool,
            center: bool, relu: bool = False, residual: bool = False, momentum: Optional[float] = None) -> Kernel:
    """The kernel of one shape class (see the module docstring), built once per process;
    `relu`: with the ReLU fused (``Spec(activation="relu")``); `residual`: with a residual
    input added before it (``Spec(residual=True)``); `momentum`: a training kernel that
    updates the running statistics it is given with this (PyTorch) momentum, the unbiased
    variance, as torch does (else they are updated by torch ops, and momentum does not matter)."""
    key = (training, dtype, channels, inner, eps, scale, center, relu, residual, momentum)
    kernel = _kernels.get(key)
    if kernel is None:
        with _kernels_lock:
            kernel = _kernels.get(key)
            if kernel is None:
                shape = (None, channels) if inner == 1 else (None, channels, inner)
                spec = Spec(shape=shape, axis=1, dtype=_DTYPES[dtype], training=training, mode=0, epsilon=eps,
                            momentum=0.0 if momentum is None else 1.0 - momentum,  # bngen's: the weight of the old value
                            center=center, scale=scale, unbiased=momentum is not None,
                            activation="relu" if relu else None, residual=residual)
                kernel = _kernels[key] = build(spec)
    return kernel


def _channels_last(x: Tensor) -> bool:
    """True when x is stored channels-last (and is not also plainly contiguous)."""
    fmt = _LAST_FORMATS.get(x.dim())
    return fmt is not None and not x.is_contiguous() and x.is_contiguous(memory_format=fmt)


def _param_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype is torch.float64 else torch.float32


def _input(x: Tensor) -> Tuple[Tensor, bool, int, int]:
    """(x, channels-last, outer, inner): x in a layout the kernels take (itself, or, only when
    an op is called on a strided view directly, which `batch_norm` never does, a contiguous
    copy) and its shape class (see the module docstring) as the kernel's sizes."""
    last = _channels_last(x)
    if not last and not x.is_contiguous():
        x = x.contiguous()
    channels = x.shape[1]
    if last:
        return x, True, x.numel() // channels, 1
    return x, False, x.shape[0], x.numel() // (x.shape[0] * channels)


def _like(t: Tensor, x: Tensor, last: bool) -> Tensor:
    """t (the gradient dy, a residual) in x's memory layout."""
    fmt = _LAST_FORMATS[x.dim()] if last else torch.contiguous_format
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)


def _empty_out(x: Tensor, last: Optional[bool] = None) -> Tensor:
    """The output the ops return for input x (what the fake implementations promise);
    `last`: `_channels_last(x)`, if known."""
    last = _channels_last(x) if last is None else last
    return torch.empty_like(x, memory_format=_LAST_FORMATS[x.dim()] if last else torch.contiguous_format)


def _vector(x: Tensor, size: int) -> Tensor:
    """A new per-feature output of `size` values (0: a gradient the layer does not have)."""
    return x.new_empty((size,), dtype=_param_dtype(x.dtype))


# -- what the kernels take ------------------------------------------------------------------
def _data_refusal(x: Tensor) -> Optional[str]:
    """Why the kernels cannot take data tensor x (whatever its strides), or None."""
    if not isinstance(x, Tensor):
        return f"is a {type(x).__name__}, not a tensor"
    if not x.is_cpu or x.layout != torch.strided:
        return f"is a {x.layout} tensor on {x.device}; the kernels take strided CPU tensors"
    if x.dtype not in _DTYPES:
        return f"has dtype {x.dtype}; the kernels take {', '.join(str(d) for d in _DTYPES)}"
    if x.dim() < 2:
        return f"has {x.dim()} dimension(s); expected (N, C, ...)"
    if x.numel() == 0:
        return "is empty"
    return None


def _vector_refusal(t: Tensor, channels: int, dtype: torch.dtype) -> Optional[str]:
    """Why the kernels cannot take per-feature tensor t for `channels` features of data of
    `dtype`, or None."""
    pdtype = _param_dtype(dtype)
    if not isinstance(t, Tensor) or not t.is_cpu or t.dtype is not pdtype or t.dim() != 1 or t.shape[0] != channels \
            or not t.is_contiguous():
        return f"must be a contiguous CPU tensor of shape ({channels},) and dtype {pdtype}"
    return None


def _overlap(a: Tensor, b: Tensor) -> bool:
    """Whether the memory of contiguous tensors a and b overlaps."""
    return a.data_ptr() < b.data_ptr() + b.nbytes and b.data_ptr() < a.data_ptr() + a.nbytes


def _check(op: str, x: Tensor, like: Optional[dict] = None, vectors: Optional[dict] = None) -> None:
    """Raises ValueError naming op and argument where the kernels cannot take the tensors an op
    is called with: x, the tensors `like` x (name: tensor, same shape and dtype) and the
    per-feature `vectors` (name: tensor or None).  Before any C runs: the kernels are
    called on the tensors' memory directly."""
    reason = _data_refusal(x)
    if reason is not None:
        raise ValueError(f"bngen::{op}: x {reason}")
    for name, t in (like or {}).items():
        if not isinstance(t, Tensor) or not t.is_cpu or t.shape != x.shape or t.dtype is not x.dtype:
            raise ValueError(f"bngen::{op}: {name} must be a CPU tensor of x's shape {tuple(x.shape)} and dtype {x.dtype}")
    for name, t in (vectors or {}).items():
        reason = None if t is None else _vector_refusal(t, x.shape[1], x.dtype)
        if reason is not None:
            raise ValueError(f"bngen::{op}: {name} {reason}")


# -- calling the kernels ---------------------------------------------------------------------
# The kernels' C entry points get the tensors' memory directly: data pointers, sizes and the
# thread count, by argument name.  Through NumPy views and the binder (whose checks `_check`
# and `takes` make here, on the tensors) a call costs ~20-30 us more when warm, and in a
# training step, where the activations have pushed Python's own data out of the caches
# between two batch norms, 100-200 us more: 3 ms of a 90-180 ms ResNet step.
_entries: Dict[tuple, tuple] = {}


def _call(kernel: Kernel, backward: bool, values: dict) -> None:
    """Runs `kernel`'s forward (or inference) entry point, or its backward one, with `values`
    by argument name: tensors as their data pointers (NULL for None or absent), sizes and
    flags as ints."""
    key = (kernel, backward)
    found = _entries.get(key)
    if found is None:
        entry = kernel.plan.backward if backward else kernel.plan.forward
        found = _entries[key] = (kernel.entry_function(entry), tuple((a.name, a.role.is_array) for a in entry.args),
                                 kernel.ffi)
    function, args, ffi = found
    cast, null = ffi.cast, ffi.NULL
    function(*[(null if values.get(name) is None else cast("void *", values[name].data_ptr())) if array
               else values[name] for name, array in args])


def _threads() -> int:
    """torch's intra-op thread count (1 in a forked child, where OpenMP's pool is gone)."""
    return max(1, min(torch.get_num_threads(), max_threads()))


# -- custom ops ------------------------------------------------------------------------------
_LIB = "bngen"
# The ops take any strides (contiguous and channels-last without a copy) and their outputs
# follow the input's layout (the fake implementations say how), so inductor need not copy
# their inputs into the layout of the trace: with its default for custom ops (exact strides),
# a graph whose convolutions inductor switches to channels-last gets two copies per batch norm.
_TAGS = (torch.Tag.flexible_layout,)
# Each op has a twin without autograd, ``bngen::compiled_<name>``, that `fuse_relu` puts in
# compiled graphs: there autograd has already been traced (the graphs run without it), and
# the custom-op wrapper the twin skips costs more than a small kernel (~25 us a call).
_LIBRARY = torch.library.Library(_LIB, "FRAGMENT")
_COMPILED_PREFIX = "compiled_"


def _define(name: str, impl, fake, schema: str):
    """The custom op bngen::`name` (and its twin without autograd, see above)."""
    op = torch.library.custom_op(f"{_LIB}::{name}", impl, mutates_args=(), tags=_TAGS, schema=schema)
    op.register_fake(fake)
    _define_compiled(name, impl, fake, schema)
    return op


def _define_compiled(name: str, impl, fake, schema: str) -> None:
    """The op bngen::compiled_`name`, without autograd: for compiled graphs only (see above);
    for the training ops also bngen::native_`name`, implemented in C++ (bngen/torch_native.py)."""
    twin = _COMPILED_PREFIX + name
    _LIBRARY.define(twin + schema, tags=_TAGS)
    _LIBRARY.impl(twin, impl, "CPU")
    torch.library.register_fake(f"{_LIB}::{twin}", fake, lib=_LIBRARY)
    if name in torch_native.OPS:
        _LIBRARY.define(torch_native.PREFIX + name + schema, tags=_TAGS)
        torch.library.register_fake(f"{_LIB}::{torch_native.PREFIX}{name}", fake, lib=_LIBRARY)


def _native_entry(x: Tensor, kind: int, eps: float, relu: bool, residual: bool) -> list:
    """[address, thread cap] of the C entry point a native op of `kind` (an index into
    torch_native.KINDS) calls for channels-last x, or [] where the kernel has none it can
    call; the kernel is built on first use and kept (the address stays valid)."""
    name = list(torch_native.KINDS)[kind]
    kernel = _kernel(True, x.dtype, x.shape[1], 1, eps, True, True, relu, residual)
    entry = torch_native.kind_entry(kernel, name)
    return [] if entry is None else [kernel.entry_address(entry), max_threads()]


_LIBRARY.define("native_entry(Tensor x, int kind, float eps, bool relu, bool residual) -> int[]")
_LIBRARY.impl("native_entry", _native_entry, "CPU")


def _train_forward(x: Tensor, weight, bias, eps: float, running=None, relu: bool = False,
                   residual: Optional[Tensor] = None) -> tuple:
    """Normalise x with its own statistics (then add `residual`, then the ReLU, if `relu`):
    (y, batch mean, biased batch variance, kernel, `_input(x)`).  With `running` =
    (running_mean, running_var, momentum), the kernel also updates the running statistics in
    place (a kernel per momentum: only for a module's fixed one, see `_bakes`)."""
    taken = x, last, outer, inner = _input(x)
    momentum = None if running is None else running[2]
    kernel = _kernel(True, x.dtype, x.shape[1], inner, eps, weight is not None, bias is not None, relu,
                     residual is not None, momentum)
    if outer * inner < kernel.spec.min_values_per_feature:
        raise ValueError(f"x: shape {tuple(x.shape)} gives one value per channel, so the unbiased variance is undefined")
    y, mean, var = _empty_out(x, last), _vector(x, x.shape[1]), _vector(x, x.shape[1])
    _call(kernel, False, {
        "x": x, "residual": None if residual is None else _like(residual, x, last), "y": y, "gamma": weight,
        "beta": bias, "moving_mean": None if running is None else running[0],
        "moving_variance": None if running is None else running[1], "mean": mean, "variance": var, "outer": outer,
        "inner": inner, "nthreads": _threads(), "may_stream": 0})
    return y, mean, var, kernel, taken


def _eval_forward(x: Tensor, weight, bias, running_mean, running_var, eps: float, relu: bool = False,
                  residual: Optional[Tensor] = None) -> Tensor:
    """Normalise x with the running statistics (then add `residual`, then the ReLU, if `relu`)."""
    x, last, outer, inner = _input(x)
    kernel = _kernel(False, x.dtype, x.shape[1], inner, eps, weight is not None, bias is not None, relu,
                     residual is not None)
    y = _empty_out(x, last)
    _call(kernel, False, {
        "x": x, "residual": None if residual is None else _like(residual, x, last), "y": y, "gamma": weight,
        "beta": bias, "moving_mean": running_mean, "moving_variance": running_var, "outer": outer, "inner": inner,
        "nthreads": _threads(), "may_stream": 0})
    return y


def _gradients(kernel: Kernel, dy: Tensor, taken: tuple, weight, beta, mean, var, has_bias: bool) -> tuple:
    """(dx, dweight, dbias) from `kernel`'s backward at x, `taken` = `_input(x)`; empty
    dweight/dbias when absent.  `beta` only for a fused ReLU (its mask recomputes the output)."""
    x, last, outer, inner = taken
    channels = x.shape[1]
    dx = _empty_out(x, last)
    dweight, dbias = _vector(x, channels if weight is not None else 0), _vector(x, channels if has_bias else 0)
    _call(kernel, True, {
        "dy": _like(dy, x, last), "x": x, "gamma": weight, "beta": beta, "mean": mean, "variance": var,
        "moving_mean": mean, "moving_variance": var, "dx": dx, "dgamma": dweight if weight is not None else None,
        "dbeta": dbias if has_bias else None, "outer": outer, "inner": inner, "nthreads": _threads()})
    return dx, dweight, dbias


def _train_impl(x, weight, bias, eps, relu=False):
    """Normalise x with its own statistics (then the ReLU, if `relu`): (y, batch mean, biased batch variance)."""
    _check(f"batch_norm_{'relu_' * relu}train", x, vectors={"weight": weight, "bias": bias})
    y, mean, var, *_ = _train_forward(x, weight, bias, eps, relu=relu)
    return y, mean, var


def _train_fake(x, weight, bias, eps):
    stat = x.new_empty((x.shape[1],), dtype=_param_dtype(x.dtype))
    return _empty_out(x), stat, torch.empty_like(stat)


_TRAIN_SCHEMA = "(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)"
_train = _define("batch_norm_train", _train_impl, _train_fake, _TRAIN_SCHEMA)


def _relu_train_impl(x, weight, bias, eps):
    """relu(batch_norm_train(...)[0]) in one kernel, and the batch statistics."""
    return _train_impl(x, weight, bias, eps, relu=True)


_relu_train = _define("batch_norm_relu_train", _relu_train_impl, _train_fake, _TRAIN_SCHEMA)


def _eval_impl(x, weight, bias, running_mean, running_var, eps, relu=False):
    """Normalise x with the running statistics (then the ReLU, if `relu`)."""
    _check(f"batch_norm_{'relu_' * relu}eval", x,
           vectors={"weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var})
    return _eval_forward(x, weight, bias, running_mean, running_var, eps, relu)


def _eval_fake(x, weight, bias, running_mean, running_var, eps):
    return _empty_out(x)


_EVAL_SCHEMA = "(Tensor x, Tensor? weight, Tensor? bias, Tensor running_mean, Tensor running_var, float eps) -> Tensor"
_eval = _define("batch_norm_eval", _eval_impl, _eval_fake, _EVAL_SCHEMA)


def _relu_eval_impl(x, weight, bias, running_mean, running_var, eps):
    """relu(batch_norm_eval(...)) in one kernel."""
    return _eval_impl(x, weight, bias, running_mean, running_var, eps, relu=True)


_relu_eval = _define("batch_norm_relu_eval", _relu_eval_impl, _eval_fake, _EVAL_SCHEMA)


def _add_train_impl(x, residual, weight, bias, eps, relu):
    """batch_norm_train's output plus `residual` (then the ReLU, if `relu`) in one kernel, and the batch statistics."""
    _check("batch_norm_add_train", x, like={"residual": residual}, vectors={"weight": weight, "bias": bias})
    y, mean, var, *_ = _train_forward(x, weight, bias, eps, relu=relu, residual=residual)
    return y, mean, var


def _add_eval_impl(x, residual, weight, bias, running_mean, running_var, eps, relu):
    """batch_norm_eval's output plus `residual` (then the ReLU, if `relu`) in one kernel."""
    _check("batch_norm_add_eval", x, like={"residual": residual},
           vectors={"weight": weight, "bias": bias, "running_mean": running_mean, "running_var": running_var})
    return _eval_forward(x, weight, bias, running_mean, running_var, eps, relu, residual)


# Only in compiled graphs, where `fuse_relu` puts them (no autograd: the backward of the
# batch norm stays its own op, fed the gradient through the sum and the ReLU).
_define_compiled("batch_norm_add_train", _add_train_impl,
                 lambda x, residual, weight, bias, eps, relu: _train_fake(x, weight, bias, eps),
                 "(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps, bool relu) -> (Tensor, Tensor, Tensor)")
_define_compiled("batch_norm_add_eval", _add_eval_impl,
                 lambda x, residual, weight, bias, running_mean, running_var, eps, relu: _empty_out(x),
                 "(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, Tensor running_mean, Tensor running_var, "
                 "float eps, bool relu) -> Tensor")


def _backward_impl(training, dy, x, weight, bias, mean, var, eps, has_bias, relu=False):
    """(dx, dweight, dbias); empty dweight/dbias when absent.  `bias` (beta) is read only by the
    ReLU's mask, which recomputes the forward output."""
    _check(f"batch_norm_{'relu_' * relu}{'train' if training else 'eval'}_backward", x, like={"dy": dy},
           vectors={"weight": weight, "bias": bias if relu else None, ("mean" if training else "running_mean"): mean,
                    ("var" if training else "running_var"): var})
    taken = x, _, _, inner = _input(x)
    kernel = _kernel(training, x.dtype, x.shape[1], inner, eps, weight is not None, has_bias, relu)
    return _gradients(kernel, dy, taken, weight, bias if relu else None, mean, var, has_bias)


def _grads_fake(x, weight, has_bias):
    c = x.shape[1]
    pdtype = _param_dtype(x.dtype)
    return (_empty_out(x), x.new_empty((c if weight is not None else 0,), dtype=pdtype),
            x.new_empty((c if has_bias else 0,), dtype=pdtype))


def _train_backward_impl(dy, x, weight, mean, var, eps, has_bias):
    """(dx, dweight, dbias) through the batch statistics; empty dweight/dbias when absent."""
    return _backward_impl(True, dy, x, weight, None, mean, var, eps, has_bias)


def _eval_backward_impl(dy, x, weight, running_mean, running_var, eps, has_bias):
    """(dx, dweight, dbias) of the frozen layer (the running statistics are constants)."""
    return _backward_impl(False, dy, x, weight, None, running_mean, running_var, eps, has_bias)


def _relu_train_backward_impl(dy, x, weight, bias, mean, var, eps):
    """(dx, dweight, dbias) of `batch_norm_relu_train`: dy is the gradient of the ReLU's output."""
    return _backward_impl(True, dy, x, weight, bias, mean, var, eps, bias is not None, relu=True)


def _relu_eval_backward_impl(dy, x, weight, bias, running_mean, running_var, eps):
    """(dx, dweight, dbias) of `batch_norm_relu_eval` (a frozen layer followed by a ReLU)."""
    return _backward_impl(False, dy, x, weight, bias, running_mean, running_var, eps, bias is not None, relu=True)


_train_backward = _define(
    "batch_norm_train_backward", _train_backward_impl,
    lambda dy, x, weight, mean, var, eps, has_bias: _grads_fake(x, weight, has_bias),
    "(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor var, float eps, bool has_bias) -> (Tensor, Tensor, Tensor)")
_eval_backward = _define(
    "batch_norm_eval_backward", _eval_backward_impl,
    lambda dy, x, weight, running_mean, running_var, eps, has_bias: _grads_fake(x, weight, has_bias),
    "(Tensor dy, Tensor x, Tensor? weight, Tensor running_mean, Tensor running_var, float eps, bool has_bias) "
    "-> (Tensor, Tensor, Tensor)")
_relu_train_backward = _define(
    "batch_norm_relu_train_backward", _relu_train_backward_impl,
    lambda dy, x, weight, bias, mean, var, eps: _grads_fake(x, weight, bias is not None),
    "(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor var, float eps) -> (Tensor, Tensor, Tensor)")
_relu_eval_backward = _define(
    "batch_norm_relu_eval_backward", _relu_eval_backward_impl,
    lambda dy, x, weight, bias, running_mean, running_var, eps: _grads_fake(x, weight, bias is not None),
    "(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor running_mean, Tensor running_var, float eps) "
    "-> (Tensor, Tensor, Tensor)")


def _train_setup(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _, mean, var = output
    ctx.save_for_backward(x, weight, bias, mean, var)
    ctx.eps, ctx.has_weight, ctx.has_bias = eps, weight is not None, bias is not None
    ctx.mark_non_differentiable(mean, var)


def _train_grad(ctx, dy, _dmean, _dvar):
    x, weight, _, mean, var = ctx.saved_tensors
    dx, dweight, dbias = _train_backward(dy, x, weight, mean, var, ctx.eps, ctx.has_bias)
    return dx, dweight if ctx.has_weight else None, dbias if ctx.has_bias else None, None


def _relu_train_grad(ctx, dy, _dmean, _dvar):
    x, weight, bias, mean, var = ctx.saved_tensors
    dx, dweight, dbias = _relu_train_backward(dy, x, weight, bias, mean, var, ctx.eps)
    return dx, dweight if ctx.has_weight else None, dbias if ctx.has_bias else None, None


def _eval_setup(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, eps = inputs
    ctx.save_for_backward(x, weight, bias, running_mean, running_var)
    ctx.eps, ctx.has_weight, ctx.has_bias = eps, weight is not None, bias is not None


def _eval_grad(ctx, dy):
    x, weight, _, running_mean, running_var = ctx.saved_tensors
    dx, dweight, dbias = _eval_backward(dy, x, weight, running_mean, running_var, ctx.eps, ctx.has_bias)
    return dx, dweight if ctx.has_weight else None, dbias if ctx.has_bias else None, None, None, None


def _relu_eval_grad(ctx, dy):
    x, weight, bias, running_mean, running_var = ctx.saved_tensors
    dx, dweight, dbias = _relu_eval_backward(dy, x, weight, bias, running_mean, running_var, ctx.eps)
    return dx, dweight if ctx.has_weight else None, dbias if ctx.has_bias else None, None, None, None


_train.register_autograd(_train_grad, setup_context=_train_setup)
_eval.register_autograd(_eval_grad, setup_context=_eval_setup)
_relu_train.register_autograd(_relu_train_grad, setup_context=_train_setup)
_relu_eval.register_autograd(_relu_eval_grad, setup_context=_eval_setup)


# Eager calls skip the custom-op machinery (dispatch, autograd wrapper: several times the
# cost of a small kernel) and run the kernels under an autograd.Function; under
# torch.compile the ops above are what the graph records.
class _BatchNormTrain(torch.autograd.Function):
    """`_train_forward` (y, batch mean, biased batch variance) and its backward, which reuses
    the forward's kernel and batch statistics (kept on ctx): no look-ups."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, running):
        y, mean, var, ctx.kernel, taken = _train_forward(x, weight, bias, eps, running)
        # (saved, so that autograd notices x or weight changed in place before the backward)
        ctx.save_for_backward(taken[0], weight)
        ctx.layout, ctx.stats = taken[1:], (mean, var)
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.set_materialize_grads(False)  # no zero gradients for the statistics, which backward ignores
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        if dy is None:  # (grads are not materialised) nothing reached y
            return None, None, None, None, None
        x, weight = ctx.saved_tensors
        dx, dgamma, dbeta = _gradients(ctx.kernel, dy, (x,) + ctx.layout, weight, None, *ctx.stats, ctx.has_bias)
        return dx, dgamma if ctx.has_weight else None, dbeta if ctx.has_bias else None, None, None


class _BatchNormEval(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps):
        _eval_setup(ctx, (x, weight, bias, running_mean, running_var, eps), None)
        return _eval_forward(x, weight, bias, running_mean, running_var, eps)

    @staticmethod
    def backward(ctx, dy):
        x, weight, _, running_mean, running_var = ctx.saved_tensors
        dx, dweight, dbias = _eval_backward_impl(dy, x, weight, running_mean, running_var, ctx.eps, ctx.has_bias)
        return dx, dweight if ctx.has_weight else None, dbias if ctx.has_bias else None, None, None, None


# -- batch norm + ReLU fusion under torch.compile ----------------------------------------------------
# Inductor fuses its own batch norm with the ReLU after it; bngen's ops are opaque to it, so
# without help the ReLU is a pass of its own over the activations (and, in the backward, the
# mask of its gradient another).  `fuse_relu` rewrites the joint (forward + backward) graph:
#   relu(batch_norm_*(x)[0])                     -> batch_norm_relu_*(x)[0]
#   batch_norm_*_backward(mask(g, relu_out), x, ...) -> batch_norm_relu_*_backward(g, x, ..., bias, ...)
# The fused kernels compute the same output (the ReLU applied to the same value) and recompute
# the mask from x and the statistics, so results are bit-identical to the unfused graph.
# Then every bngen op in the graph becomes its twin without autograd (see _define), and the
# masks of the other ReLUs are recomputed in the backward (_recomputed_masks).
def _fusions():
    ops = torch.ops.bngen
    return {ops.batch_norm_train.default: (ops.batch_norm_relu_train.default, ops.batch_norm_train_backward.default,
                                           ops.batch_norm_relu_train_backward.default),
            ops.batch_norm_eval.default: (ops.batch_norm_relu_eval.default, ops.batch_norm_eval_backward.default,
                                          ops.batch_norm_relu_eval_backward.default)}


def _unalias(node):
    """`node` without the alias and detach views (functionalisation's, autograd's) in front of it."""
    while isinstance(node, torch.fx.Node) and node.target in (torch.ops.aten.alias.default, torch.ops.aten.detach.default):
        node = node.args[0]
    return node


def _is_zero(arg) -> bool:
    if isinstance(arg, torch.fx.Node):
        return arg.target is torch.ops.aten.scalar_tensor.default and arg.args[0] == 0
    return isinstance(arg, (int, float)) and arg == 0


def _masked_gradient(dy, relu):
    """g when `dy` is the gradient through `relu` (threshold_backward(g, relu, 0), or its
    decomposition where(relu <= 0, 0, g)); else None."""
    aten = torch.ops.aten
    if dy.target is aten.threshold_backward.default:
        g, out, threshold = dy.args
        return g if _unalias(out) is relu and threshold == 0 else None
    if dy.target is aten.where.self:
        cond, zero, g = dy.args
        if cond.target is aten.le.Scalar and _unalias(cond.args[0]) is relu and cond.args[1] == 0 and _is_zero(zero):
            return g
    return None


def _same_layer(forward, backward, training: bool) -> bool:
    """Whether `backward` differentiates the batch norm `forward` (same x, weight, statistics, eps)."""
    b = backward.args
    if training:
        stats = {u.args[1]: u for u in forward.users if u.target is operator.getitem}
        x, weight, _, eps = forward.args
        return b[1] is x and b[2] is weight and b[3] is stats.get(1) and b[4] is stats.get(2) and b[5] == eps
    x, weight, _, running_mean, running_var, eps = forward.args
    return b[1] is x and b[2] is weight and b[3] is running_mean and b[4] is running_var and b[5] == eps


def _same_type(a, b) -> bool:
    """Whether graph nodes `a` and `b` hold tensors of the same shape, dtype and device (their fake values)."""
    va, vb = a.meta.get("val"), b.meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape \
        and va.dtype is vb.dtype and va.device == vb.device


def _fuse_residuals(graph: torch.fx.Graph) -> int:
    """Rewrite `graph` in place: a batch norm whose output only goes to a sum with another
    tensor of its type, relu(batch_norm_*(x)[0] + r) (ResNet's block output) or without the
    ReLU, becomes one op, batch_norm_add_*(x, r, ..., relu); the number rewritten.  The
    backward is unchanged: it masks its gradient with the ReLU's output, which the fused
    op now computes (the same values), and differentiates the batch norm as before."""
    aten, ops = torch.ops.aten, torch.ops.bngen
    fused_ops = {ops.batch_norm_train.default: ops.compiled_batch_norm_add_train.default,
                 ops.batch_norm_eval.default: ops.compiled_batch_norm_add_eval.default}
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in fused_ops:
            continue
        training = node.target is ops.batch_norm_train.default
        outputs = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0] if training else [node]
        if len(outputs) != 1 or len(outputs[0].users) != 1:
            continue
        y = outputs[0]
        add = next(iter(y.users))
        if add.target is not aten.add.Tensor or len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
            continue
        r = add.args[1] if add.args[0] is y else add.args[0]
        if r is y or not isinstance(r, torch.fx.Node) or not _same_type(r, y) or not _same_type(add, y):
            continue
        relu = next(iter(add.users)) if len(add.users) == 1 else None
        relu = relu if relu is not None and relu.target is aten.relu.default else None
        out = relu or add
        args = (node.args[0], r) + tuple(node.args[1:]) + (relu is not None,)
        with graph.inserting_before(add):  # after both y and r
            fused = graph.call_function(fused_ops[node.target], args)
        fused.meta.update(node.meta)
        if training:  # the statistics and the output come from the fused op: y's getitem becomes the sum's
            for u in list(node.users):
                u.args = (fused, u.args[1])
            out.replace_all_uses_with(y)
            y.meta["val"] = out.meta.get("val")
        else:
            out.replace_all_uses_with(fused)
        for dead in (relu, add, node):
            if dead is not None:
                graph.erase_node(dead)
        count += 1
    if count:
        from torch._inductor.pattern_matcher import stable_topological_sort

        stable_topological_sort(graph)  # the statistics' users now follow the fused op
    return count


def _fuse_relu(graph: torch.fx.Graph) -> int:
    """Rewrite `graph` in place (see above), and put the ops' twins without autograd in it;
    the number of batch norms fused with their ReLU (or with a residual sum)."""
    fused = _fuse_residuals(graph)
    fusions = _fusions()
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in fusions:
            continue
        fused_forward, backward_op, fused_backward = fusions[node.target]
        training = node.target is torch.ops.bngen.batch_norm_train.default
        outputs = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0] if training else [node]
        if len(outputs) != 1 or len(outputs[0].users) != 1:
            continue  # the output is used elsewhere too (a residual): it must stay the value before the ReLU
        y = outputs[0]
        relu = next(iter(y.users))
        if relu.op != "call_function" or relu.target is not torch.ops.aten.relu.default:
            continue
        for backward in [u for u in node.args[0].users if u.target is backward_op]:
            g = _masked_gradient(backward.args[0], relu)
            if g is not None and _same_layer(node, backward, training):
                backward.target = fused_backward
                backward.args = (g,) + backward.args[1:3] + (node.args[2],) + backward.args[3:6]
        node.target = fused_forward
        relu.replace_all_uses_with(y)
        graph.erase_node(relu)
        fused += 1
    if fused:
        graph.eliminate_dead_code()  # the masks of the fused backwards
    twins = _twins()
    if not any(node.target in twins for node in graph.nodes):
        return fused
    for node in graph.nodes:
        if node.op == "call_function" and node.target in twins:
            node.target = twins[node.target]
    _recomputed_masks(graph)
    _natives(graph)
    return fused


def _natives(graph: torch.fx.Graph) -> int:
    """Each training twin in `graph` -> its native op (same schema, no Python per call; see
    bngen/torch_native.py), where the native ops can be loaded; the number replaced."""
    if not torch_native.available():
        return 0
    ops, count = torch.ops.bngen, 0
    natives = {getattr(ops, _COMPILED_PREFIX + name).default: getattr(ops, torch_native.PREFIX + name).default
               for name in torch_native.OPS}
    for node in graph.nodes:
        if node.op == "call_function" and node.target in natives:
            node.target = natives[node.target]
            count += 1
    return count


def _recomputed_masks(graph: torch.fx.Graph) -> int:
    """ReLU masks of the backward (``relu_out <= 0``) recomputed there from the saved ReLU
    output, as in torch's own graphs, instead of saved as 1-byte tensors; the number of masks.

    With bngen's ops in a graph the partitioner saves the mask (a bool is smaller than a
    float), and inductor's code for a 4-d bool store is slow here (3 ms for the last block's
    256K values, 10x the float store).  A ReLU after the model's last convolution (the last
    block's, before the pooling) is outside inductor's channels-last layout, so what is
    saved of it is a channels-last copy, made in the kernel that computes it.
    """
    from torch._inductor import config
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    convolutions = [n for n in graph.nodes if n.target is aten.convolution.default]
    after_convolutions, seen = set(), False  # the nodes after the last convolution, in graph order
    for n in graph.nodes:
        seen = seen or bool(convolutions) and n is convolutions[-1]
        if seen:
            after_convolutions.add(n)
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.le.Scalar or node.args[1] != 0:
            continue
        relu = _unalias(node.args[0])
        if not _is_relu_output(relu) or not all(u.target is aten.where.self for u in node.users):
            continue
        saved = relu
        val = relu.meta.get("val")
        if config.layout_optimization and relu in after_convolutions and isinstance(val, torch.Tensor) \
                and val.dim() == 4 and val.is_contiguous() and not val.is_contiguous(memory_format=torch.channels_last):
            with graph.inserting_after(relu):
                saved = graph.call_function(aten.clone.default, (relu,), {"memory_format": torch.channels_last})
            saved.meta["val"] = val.clone(memory_format=torch.channels_last)
        node.args = (saved, 0)
        saved.meta["recompute"] = CheckpointPolicy.MUST_SAVE
        node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        count += 1
    return count


def _is_relu_output(node) -> bool:
    """Whether graph node `node` is a ReLU's output: aten.relu, or a batch norm fused with
    a residual sum and the ReLU (`_fuse_residuals`)."""
    ops = torch.ops.bngen
    if node.target is torch.ops.aten.relu.default:
        return True
    if node.target is operator.getitem and node.args[1] == 0:
        node = node.args[0]
    return node.target in (ops.compiled_batch_norm_add_train.default, ops.compiled_batch_norm_add_eval.default) \
        and node.args[-1] is True


def _twins() -> dict:
    """Each bngen op -> its twin without autograd (see _define)."""
    ops = torch.ops.bngen
    names = ("batch_norm_train", "batch_norm_eval", "batch_norm_relu_train", "batch_norm_relu_eval",
             "batch_norm_train_backward", "batch_norm_eval_backward", "batch_norm_relu_train_backward",
             "batch_norm_relu_eval_backward")
    return {getattr(ops, name).default: getattr(ops, _COMPILED_PREFIX + name).default for name in names}


def _fusion_pass():
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class FuseRelu(CustomGraphPass):
        """Inductor graph pass fusing bngen's batch norms with the ReLU after them
        (``torch.compile(model, options={"joint_custom_pre_pass": bngen.torch.fuse_relu})``)."""

        def __call__(self, graph: torch.fx.Graph) -> None:
            _fuse_relu(graph)

        def uuid(self):  # compiled graphs are cached under it: it changes with this module and the native ops
            files = (__file__, torch_native.__file__, str(template_dir() / "torch_ops.cpp.j2"))
            return get_hash_for_files(files) + (b"native" if torch_native.available() else b"python")

    return FuseRelu()


def __getattr__(name: str):
    # `fuse_relu` is made on first use: its base class is inductor's, whose import takes seconds
    if name == "fuse_relu":
        globals()[name] = _fusion_pass()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- the functional form -----------------------------------------------------------------------
def takes(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
          weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
          momentum=0.1, eps: float = 1e-5) -> bool:
    """True when `batch_norm` runs bngen's kernels for these arguments (else torch's)."""
    if not (isinstance(eps, float) and 0.0 < eps < math.inf):  # torch's errors for eps <= 0; eval allows eps=0
        return False
    if _data_refusal(input) is not None or not input.is_contiguous() and not _channels_last(input):
        return False
    if not training and (running_mean is None or running_var is None):
        return False
    channels, dtype = input.shape[1], input.dtype
    return all(t is None or _vector_refusal(t, channels, dtype) is None
               for t in (weight, bias, running_mean, running_var))


def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum=0.1, eps: float = 1e-5) -> Tensor:
    """``torch.nn.functional.batch_norm`` computed by bngen kernels (torch's for what they do not take).

    In training the batch statistics normalise the input and, when given, the running
    statistics move toward them in place: ``running = (1 - momentum) * running +
    momentum * batch``, with the unbiased batch variance.  Otherwise the running
    statistics normalise it.  Raises torch's ValueError when training sees one value per
    channel.
    """
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, False)


def _records(input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> bool:
    """Whether autograd records the call (grad mode on, a tensor requiring a gradient); without
    it (no_grad, inference_mode, or an input and parameters that require none) the kernels
    run without an autograd.Function, whose machinery costs more than a small kernel."""
    return torch.is_grad_enabled() and (input.requires_grad or weight is not None and weight.requires_grad
                                        or bias is not None and bias.requires_grad)


# Momenta built into kernels so far.  A module's momentum is usually fixed; one changed by a
# schedule every few epochs gets a kernel per value, but past this many values the running
# statistics go back to torch ops, so that a momentum changed every step costs no build a step.
_MAX_BAKED_MOMENTA = 4
_baked_momenta: set = set()


def _apart(running_mean: Optional[Tensor], running_var: Optional[Tensor], *read: Optional[Tensor]) -> bool:
    """Whether both running statistics are given and share memory with neither each other
    nor the tensors `read` (a kernel updating them in place needs it; torch ops do not)."""
    if running_mean is None or running_var is None or _overlap(running_mean, running_var):
        return False
    return not any(t is not None and (_overlap(t, running_mean) or _overlap(t, running_var)) for t in read)


def _bakes(momentum) -> bool:
    """True when a kernel may update the running statistics with `momentum` (see above)."""
    if momentum.__class__ is not float or not 0.0 <= momentum <= 1.0:
        return False
    if momentum not in _baked_momenta:
        if len(_baked_momenta) >= _MAX_BAKED_MOMENTA:
            return False
        _baked_momenta.add(momentum)
    return True


def _batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                weight: Optional[Tensor], bias: Optional[Tensor], training: bool, momentum, eps: float,
                fixed: bool) -> Tensor:
    """`batch_norm`; `fixed`: `momentum` is a module's, the same every step, so an eager
    training call may leave the running statistics to a kernel built for it (no torch ops
    after the kernel; a momentum that changes each step would build a kernel each step)."""
    if training:
        F._verify_batch_size(input.size())
    if not takes(input, running_mean, running_var, weight, bias, training, momentum, eps):
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    compiling = torch.compiler.is_compiling()
    if not training:
        if compiling:
            return torch.ops.bngen.batch_norm_eval(input, weight, bias, running_mean, running_var, eps)
        if not _records(input, weight, bias):
            return _eval_forward(input, weight, bias, running_mean, running_var, eps)
        return _BatchNormEval.apply(input, weight, bias, running_mean, running_var, eps)
    running = running_mean is not None or running_var is not None
    if compiling:
        y, mean, var = torch.ops.bngen.batch_norm_train(input, weight, bias, eps)
    else:
        baked = running and fixed and _apart(running_mean, running_var, weight, bias) and _bakes(momentum)
        args = (input, weight, bias, eps, (running_mean, running_var, momentum) if baked else None)
        if _records(input, weight, bias):
            y, mean, var = _BatchNormTrain.apply(*args)
        else:
            y, mean, var, *_ = _train_forward(*args)
        if baked:
            return y
    if running:
        n = input.numel() // input.shape[1]
        with torch.no_grad():
            if running_mean is not None:
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            if running_var is not None:
                running_var.mul_(1 - momentum).add_(var.to(running_var.dtype), alpha=momentum * n / (n - 1))
    return y


# -- modules -------------------------------------------------------------------------------------
class _Forward:
    """The forward of torch.nn's batch norms (torch.nn.modules.batchnorm._BatchNorm), on `batch_norm`."""

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        tracked = not self.training or self.track_running_stats
        if bn_training and self.training and self._synchronised():
            return self._sync_forward(input, factor)
        return _batch_norm(input, self.running_mean if tracked else None, self.running_var if tracked else None,
                           self.weight, self.bias, bn_training, factor, self.eps, self.momentum is not None)

    def _synchronised(self) -> bool:
        return False


class BatchNorm1d(_Forward, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` (same arguments, parameters, buffers and errors) on bngen kernels."""


class BatchNorm2d(_Forward, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` (same arguments, parameters, buffers and errors) on bngen kernels."""


class BatchNorm3d(_Forward, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` (same arguments, parameters, buffers and errors) on bngen kernels."""


class SyncBatchNorm(_Forward, torch.nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` on bngen kernels, for CPU tensors too.

    Without a process group of more than one rank (or in eval mode) it is `BatchNorm2d`
    for any input rank.  With one, in training, each rank's (count, mean, M2) per
    channel is all-gathered in float64 and merged in rank order (Chan's formula: exact,
    and identical on every rank); the input gradient uses the all-reduced sums of dy and
    dy * x_hat, while the weight and bias gradients stay this rank's (DistributedDataParallel
    all-reduces them), as in torch.
    """

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)  # torch's SyncBatchNorm checks this too, after the rank
        return super().forward(input)

    def _group(self):
        return self.process_group if self.process_group else torch.distributed.group.WORLD

    def _synchronised(self) -> bool:
        dist = torch.distributed
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self._group()) > 1

    def _sync_forward(self, input: Tensor, factor: float) -> Tensor:
        tracked = self.track_running_stats
        return _SyncBatchNormFunction.apply(input, self.weight, self.bias, self.running_mean if tracked else None,
                                            self.running_var if tracked else None, self.eps, factor, self._group())

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        """Like torch's: every BatchNorm*D (torch's or bngen's) becomes a bngen SyncBatchNorm."""
        return _convert(module, lambda m: cls if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) else None,
                        process_group=process_group)


# -- SyncBatchNorm across ranks --------------------------------------------------------------------
def _broadcast_shape(x: Tensor) -> tuple:
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Training forward and backward of SyncBatchNorm over a process group of several ranks.

    Forward: local statistics (the training kernel), all-gathered (count, mean, M2), merged;
    the output from the inference kernel with the merged statistics as the running ones.
    Backward: the frozen-layer kernel gives dy * gamma / std, sum(dy) and sum(dy * x_hat)
    at the merged statistics; the sums are all-reduced and dx corrected with them.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        dist = torch.distributed
        x = _input(x)[0]
        pdtype, channels = _param_dtype(x.dtype), x.shape[1]
        count = x.numel() // channels
        _, mean, var = torch.ops.bngen.batch_norm_train(x, None, None, eps)
        local = torch.cat([torch.tensor([float(count)], dtype=torch.float64), mean.double(), var.double() * count])
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local, group=group)
        merged = merge_moments(np.stack([np.full(channels, p[0]), p[1:1 + channels], p[1 + channels:]])
                               for p in torch.stack(parts).numpy())  # in rank order: the same bits on every rank
        n, gmean, m2 = merged[0, 0], merged[1], merged[2]
        if n < 2:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(n)} across the ranks")
        mean = torch.from_numpy(gmean).to(pdtype)
        var = torch.from_numpy(m2 / n).to(pdtype)
        with torch.no_grad():
            if running_mean is not None:
                running_mean.mul_(1 - momentum).add_(torch.from_numpy(gmean).to(running_mean.dtype), alpha=momentum)
            if running_var is not None:
                running_var.mul_(1 - momentum).add_(torch.from_numpy(m2 / (n - 1)).to(running_var.dtype),
                                                    alpha=momentum)
        gamma = weight.detach() if weight is not None else torch.ones(channels, dtype=pdtype)
        beta = bias.detach() if bias is not None else torch.zeros(channels, dtype=pdtype)
        y = _eval(x, gamma, beta, mean, var, eps)
        ctx.save_for_backward(x, gamma, mean, var)
        ctx.eps, ctx.n, ctx.group = eps, n, group
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        dist = torch.distributed
        x, gamma, mean, var = ctx.saved_tensors
        # frozen-layer gradients at the merged statistics: dy * gamma / std, sum(dy * x_hat), sum(dy)
        dx_frozen, dgamma, dbeta = _eval_backward(dy, x, gamma, mean, var, ctx.eps, True)
        sums = torch.cat([dbeta.double(), dgamma.double()])
        dist.all_reduce(sums, group=ctx.group)
        channels = x.shape[1]
        sum_dy, sum_dy_xhat = sums[:channels], sums[channels:]
        r = (var.double() + ctx.eps).rsqrt()
        a = gamma.double() * r / ctx.n
        # dx = dx_frozen - a * (sum_dy + x_hat * sum_dy_xhat), x_hat = (x - mean) * r: per channel k1 * x + k0
        k1 = -a * r * sum_dy_xhat
        k0 = -a * sum_dy - k1 * mean.double()
        shape = _broadcast_shape(x)
        work = torch.float64 if x.dtype is torch.float64 else torch.float32
        dx = (dx_frozen.to(work) + x.to(work) * k1.to(work).view(shape) + k0.to(work).view(shape)).to(x.dtype)
        dx = dx.contiguous(memory_format=_LAST_FORMATS[x.dim()] if _channels_last(x) else torch.contiguous_format)
        return (dx, dgamma if ctx.has_weight else None, dbeta if ctx.has_bias else None, None, None, None, None,
                None)


# -- conversion ---------------------------------------------------------------------------------------
_REPLACEMENTS = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d,
                 torch.nn.BatchNorm3d: BatchNorm3d, torch.nn.SyncBatchNorm: SyncBatchNorm}


def _convert(module: torch.nn.Module, target, process_group=None) -> torch.nn.Module:
    cls = target(module)
    result = module
    if cls is not None and type(module) is not cls:
        kwargs = dict(eps=module.eps, momentum=module.momentum, affine=module.affine,
                      track_running_stats=module.track_running_stats, device="meta")
        if issubclass(cls, torch.nn.SyncBatchNorm):
            kwargs["process_group"] = process_group if process_group is not None else getattr(module, "process_group", None)
        result = cls(module.num_features, **kwargs)
        # the same Parameter and buffer objects: optimisers and other references stay valid
        for name in ("weight", "bias"):
            setattr(result, name, getattr(module, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            result._buffers[name] = module._buffers.get(name)
        result.train(module.training)
        if hasattr(module, "qconfig"):
            result.qconfig = module.qconfig
    for name, child in module.named_children():
        converted = _convert(child, target, process_group)
        if converted is not child:
            result.add_module(name, converted)
    return result


def convert(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with every torch.nn ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` replaced by bngen's.

    The replacements hold the same Parameter and buffer objects (and training mode), so
    an optimiser built before the conversion keeps working.  Children are replaced in
    place; the result is `module` itself unless `module` is a batch norm.  Subclasses of
    torch's batch norms (bngen's among them) are left alone.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
    return _convert(module, lambda m: _REPLACEMENTS.get(type(m)))
