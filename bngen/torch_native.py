"""bngen.torch's native ops: compiled graphs call the training kernels without Python.

In a compiled training step every bngen op call runs Python (the op's implementation, the
dispatcher's way into it), and between two batch norms the activations push that Python's
code and data out of the caches: ~100-200 us a call in place, ~3 ms of a ResNet step.  This
module builds, once per machine and torch version, a small C++ library (rendered from
templates/torch_ops.cpp.j2, compiled against torch's headers, cached like the kernels)
that implements ops ``bngen::native_*``, of the same schemas as the ``bngen::compiled_*``
twins `fuse_relu` puts in graphs: for a channels-last input with affine parameters they
call the kernel's C entry point directly, anything else goes to the Python twin.  The
kernel of a shape class is asked of Python once per process (``bngen::native_entry``),
so no address is ever part of a compiled graph (inductor caches graphs across processes).

``BNGEN_TORCH_NATIVE=0`` turns it off; a machine without a C++ compiler, or where the
build fails, keeps the Python twins (with one warning saying why).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

from .codegen.render import environment
from .core.errors import CompileError
from .jit.cache import Cache, digest, resolve_root
from .jit.compiler import Compiler
from .version import __version__

ENV_VAR = "BNGEN_TORCH_NATIVE"
OBJECT = "bngen_torch_ops.so"
TIMEOUT = 300.0  # seconds the C++ compiler may take (torch's headers are large: ~10 s here)

# The C arguments of the kernel entry point each kind calls, in order (the C++ calls them
# so: a kernel whose entry differs is not called natively).
KINDS = {
    "forward": ("x", "y", "gamma", "beta", "moving_mean", "moving_variance", "mean", "variance", "outer", "nthreads"),
    "forward_residual": ("x", "residual", "y", "gamma", "beta", "moving_mean", "moving_variance", "mean", "variance",
                         "outer", "nthreads"),
    "backward": ("dy", "x", "gamma", "mean", "variance", "dx", "dgamma", "dbeta", "outer", "nthreads"),
    "backward_relu": ("dy", "x", "gamma", "beta", "mean", "variance", "dx", "dgamma", "dbeta", "outer", "nthreads"),
}
# The native ops, by the name of the Python twin (bngen::compiled_<name>) they stand for.
OPS = ("batch_norm_train", "batch_norm_relu_train", "batch_norm_add_train", "batch_norm_train_backward",
       "batch_norm_relu_train_backward")
PREFIX = "native_"

_state: dict = {}
_lock = threading.Lock()


def source() -> str:
    """The C++ translation unit of the library."""
    return environment().get_template("torch_ops.cpp.j2").render(
        ops=[PREFIX + name for name in OPS], kinds=KINDS, version=__version__)


def _compiler() -> Compiler:
    """The C++ compiler: ``$CXX`` or ``c++`` (a CompileError if it is not found)."""
    compiler = Compiler(cc=os.environ.get("CXX", "c++"))
    if shutil.which(compiler.command[0]) is None:
        raise CompileError(f"C++ compiler {compiler.cc!r} (CXX) not found")
    return compiler


def _command(cxx: list, cpp: Path, output: Path, strict: bool = False) -> list:
    """The compile command; `strict`: warnings are errors (the tests' build)."""
    root = Path(torch.__file__).parent
    include, lib = root / "include", root / "lib"
    return cxx + ["-O2", "-std=c++17", "-shared", "-fPIC", "-Wall", "-Wextra"] + (["-Werror"] if strict else []) + [
        f"-isystem{include}", f"-isystem{include / 'torch' / 'csrc' / 'api' / 'include'}", str(cpp), "-o", str(output),
        f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]


def build(cache_dir=None) -> Path:
    """The library's shared object: from the cache, or compiled into it (CompileError if it cannot be)."""
    compiler = _compiler()
    cxx = compiler.command
    text = source()
    key = digest("torch-ops", text, compiler.identity(), torch.__version__, sys.version,
                 " ".join(_command(cxx, Path(), Path())))

    def compile(directory: Path) -> Path:
        output = directory / OBJECT
        try:
            run = subprocess.run(_command(cxx, directory / "torch_ops.cpp", output), capture_output=True, text=True,
                                 timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            raise CompileError(f"C++ compiler {cxx[0]} took more than {TIMEOUT:.0f} s") from None
        if run.returncode != 0:
            raise CompileError(f"C++ compiler {cxx[0]} failed:\n{run.stderr[-4000:]}")
        return output

    return Cache(resolve_root(cache_dir)).fetch(key, compile, {"torch_ops.cpp": text}, object_name=OBJECT)


def available() -> bool:
    """Whether the native ops are loaded (building the library on first call); False, with a
    warning the first time, where they cannot be, or with ``BNGEN_TORCH_NATIVE=0``."""
    if os.environ.get(ENV_VAR, "1") == "0":
        return False
    with _lock:
        if "ok" not in _state:
            try:
                torch.ops.load_library(str(build()))
                _state["ok"] = True
            except (CompileError, OSError, RuntimeError) as exc:
                _state["ok"] = False
                warnings.warn(f"bngen.torch: compiled graphs call the kernels through Python ({exc}); "
                              f"set {ENV_VAR}=0 to not try", RuntimeWarning, stacklevel=3)
    return _state["ok"]


def kind_entry(kernel, kind: str) -> Optional[object]:
    """The entry point of `kernel` that `kind` calls, if its arguments are those `KINDS` says."""
    entry = kernel.plan.backward if kind.startswith("backward") else kernel.plan.forward
    if entry is None or tuple(a.name for a in entry.args) != KINDS[kind]:
        return None
    return entry
