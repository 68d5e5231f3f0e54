"""The pipeline: Spec -> Plan -> C -> cache (compile on a miss) -> loaded Kernel.

The only module that chains the steps.  An in-process memo makes a repeated build of
an equal spec cost a dictionary lookup.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Optional

from ..codegen.render import render_cdef, render_source
from ..core.spec import Spec
from ..plan.entries import has_split_phases
from ..plan.plan import make_plan
from ..plan.target import Target, Tuning
from .cache import Cache, digest, resolve_root
from .compiler import Compiler, extension_filename, load_module
from .kernel import Kernel

_memo: dict = {}
_memo_lock = threading.Lock()


def build(spec: Spec, cache_dir=None, *, compiler: Optional[Compiler] = None, target: Optional[Target] = None,
          tuning: Optional[Tuning] = None, split: bool = False) -> Kernel:
    """Compile (or load from the cache) the kernel for `spec`.

    The cache root is `cache_dir`, else ``$BNGEN_CACHE_DIR``, else the user cache
    directory.  `compiler` defaults to ``$CC`` (or ``cc``) with optimisation for this
    machine.  `target` (a `bngen.plan.target.Target`) defaults to what the compiler's probe
    says the machine has; `tuning` (a `bngen.plan.target.Tuning`) to the measured block sizes.
    Both shape the generated C, so kernels built with other values are other cache entries.
    `split`: also compile the split phases of a training step (`Kernel.moments` & co.);
    without it a kernel builds them on first use, so that a plain build pays nothing for them.
    """
    if not isinstance(spec, Spec):
        raise TypeError(f"spec: expected a bngen.Spec, got {type(spec).__name__}")
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir: expected a path (str or os.PathLike) or None, got {type(cache_dir).__name__}")
    if target is not None and not isinstance(target, Target):
        raise TypeError(f"target: expected a bngen.plan.target.Target or None, got {type(target).__name__}")
    if tuning is not None and not isinstance(tuning, Tuning):
        raise TypeError(f"tuning: expected a bngen.plan.target.Tuning or None, got {type(tuning).__name__}")
    compiler = compiler or Compiler()
    root = resolve_root(cache_dir)
    split = bool(split) and has_split_phases(spec)
    memo_key = (spec, str(root), compiler, target, tuning, split)
    kernel = _memo.get(memo_key)
    if kernel is not None:
        return kernel
    with _memo_lock:
        kernel = _memo.get(memo_key)
        if kernel is None:
            kernel = _memo[memo_key] = _build(spec, Cache(root), compiler, target, tuning, split)
            kernel.rebuild = functools.partial(build, spec, cache_dir, compiler=compiler, target=target, tuning=tuning)
    return kernel


def _build(spec: Spec, cache: Cache, compiler: Compiler, target: Optional[Target], tuning: Optional[Tuning],
           split: bool) -> Kernel:
    features = compiler.features(cache.root)
    plan = make_plan(spec, target or features.target(compiler.flags), tuning, split=split)
    source = render_source(plan)
    module = load_source(source, render_cdef(plan), cache, compiler, features, spec.to_json())
    return Kernel(spec, plan, source, module)


def load_source(source: str, cdef: str, cache: Cache, compiler: Compiler, features, spec_json: str):
    """The extension module of generated C `source` (entry points declared by `cdef`):
    from the cache, compiling it on a miss.  An entry whose object does not import
    (another key's object, a damaged file that matched its manifest) is discarded and
    rebuilt."""
    key = digest(source, cdef, compiler.fingerprint(features))
    module_name = f"_bngen_{key[:24]}"
    object_name = extension_filename(module_name)

    def fetch():
        return cache.fetch(
            key,
            lambda directory: compiler.compile(source, cdef, module_name, directory, features),
            files={"kernel.c": source, "spec.json": spec_json},
            object_name=object_name,
        )

    try:
        return load_module(module_name, fetch())
    except ImportError:
        cache.discard(key)
    # The damaged object may stay mapped in this process under the entry's path (the
    # dynamic loader knows libraries by path), so the rebuilt one is loaded from a copy.
    shared = fetch()
    with tempfile.TemporaryDirectory(prefix="bngen-load-") as private:
        copy = Path(private) / object_name
        shutil.copyfile(shared, copy)
        return load_module(module_name, copy)  # mapped now: the file can go
