"""`bngen bench`: bngen's kernels timed beside NumPy and PyTorch, and against memory.

For each case (an input shape and feature axis) and kernel kind (inference, training
forward, backward when the kernel has one) every implementation takes one sample per
round, in a new order every round (`measure`), so that a slow spell of a shared machine
hits all of them alike and none always follows the one that warmed the caches for it;
the report gives medians.  In the same rounds run bngen's own memory probes (templates/memory.c.j2): a
copy (read x, write y) and a read of the same size, with the same threads and the same
store policy as the kernels.  From them comes each kind's memory-traffic floor: the least
traffic the kind can get away with, timed (a copy is timed with plain and with streaming
stores, and the faster counts):

* inference reads x and writes y: one copy;
* channels-first training forward: x is read from memory once and y written once (a
  channel's slice is re-read from L2 for the normalisation): one copy;
* channels-last training forward: every feature's statistics need the whole tensor before
  the first output, so x is read twice unless it stays in the last-level cache: one copy
  plus one read;
* channels-first backward: x and dy read once (re-read from L2), dx written: one copy
  plus one read;
* channels-last backward: x and dy read twice each, dx written: one copy plus three reads.

``bngen / floor`` is the kernel's time over that floor: 1.0 means it runs at the speed of
memory.  Other peers are opt-in: ``isas`` builds and times bngen for other -march values
in the same rounds (an AVX2 build on an AVX-512 machine, say), ``inductor`` times
torch.compile's generated C++ (its compile time reported apart).
"""

from __future__ import annotations

import dataclasses
import json
import random
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..codegen.render import render_cdef, render_template
from ..core.dtypes import numpy_dtype
from ..core.spec import Spec, SpecError
from ..jit.build import build, load_source
from ..jit.cache import Cache, resolve_root
from ..jit.compiler import Compiler
from ..plan.entries import probe_entries
from ..plan.plan import make_plan
from ..plan.target import DEFAULT_TUNING

KINDS = ("inference", "training forward", "backward")
# Floors: (reads of the input-sized arrays, writes) by kind and layout, see the module docstring.
PASSES = {
    ("inference", False): (1, 1), ("inference", True): (1, 1),
    ("training forward", False): (1, 1), ("training forward", True): (2, 1),
    ("backward", False): (2, 1), ("backward", True): (4, 1),
}
# A timed sample is one call, or as many back-to-back calls as fill this many seconds,
# so that the clock's resolution and the loop's own cost do not show in tiny kernels.
SAMPLE_SECONDS = 2e-3


@dataclasses.dataclass(frozen=True)
class Case:
    """One input: its name, shape, feature axis and dtype."""

    name: str
    shape: Tuple[int, ...]
    axis: int
    dtype: str = "float32"
    # statistics variant of bngen's training kernels (NumPy and PyTorch stay plain)
    renorm: bool = False
    virtual_batch_size: Optional[int] = None

    @property
    def channels_last(self) -> bool:
        return self.axis in (-1, len(self.shape) - 1) and len(self.shape) > 2

    @property
    def channels_last_layout(self) -> bool:
        """The kernels' channels-last schedule (features innermost, dense (N, C) included)."""
        return self.axis in (-1, len(self.shape) - 1)


PRESETS = (
    Case("(32, 64, 56, 56) NCHW", (32, 64, 56, 56), 1),
    Case("(32, 56, 56, 64) channels-last", (32, 56, 56, 64), -1),
    Case("(8, 256, 14, 14) NCHW", (8, 256, 14, 14), 1),
    Case("(256, 1024)", (256, 1024), -1),
    Case("(1, 32, 8, 8) NCHW", (1, 32, 8, 8), 1),
)


def with_dtype(cases: Sequence[Case], dtypes: Sequence[str]) -> List[Case]:
    """Each case once per dtype (the name says the dtype unless it is float32)."""
    return [dataclasses.replace(c, dtype=d, name=c.name if d == "float32" else f"{c.name} {d}")
            for c in cases for d in dtypes]


VARIANTS = ("plain", "renorm", "ghost:K")


def parse_variant(text: str) -> Tuple[bool, Optional[int]]:
    """``(renorm, virtual_batch_size)`` of a variant name: plain, renorm or ghost:K."""
    text = text.strip()
    if text in ("plain", "renorm"):
        return text == "renorm", None
    if text.startswith("ghost:") and text[6:].isdigit() and int(text[6:]) >= 1:
        return False, int(text[6:])
    raise SpecError(f"--variants: {text!r} is not one of plain, renorm, ghost:K (K >= 1, the virtual batch size)")


def with_variants(cases: Sequence[Case], variants: Sequence[str]) -> List[Case]:
    """Each case once per statistics variant (plain, renorm, ghost:K); a ghost variant
    only where K divides the case's batch size."""
    result = []
    for c in cases:
        for text in variants:
            renorm, k = parse_variant(text)
            if k is not None and c.shape[0] % k:
                continue
            suffix = " renorm" if renorm else f" ghost k={k}" if k is not None else ""
            result.append(dataclasses.replace(c, name=c.name + suffix, renorm=renorm, virtual_batch_size=k))
    return result


def case_from_spec(spec: Spec, fill: int = 32) -> Case:
    """A bench case for a spec file: its shape (dynamic sizes become `fill`), feature axis
    and dtype, and its statistics variant (renorm, virtual_batch_size) for bngen's training
    kernels.  The other fields are not used: every case times the mode-0 inference and
    training kernels, which are what NumPy and PyTorch are timed doing."""
    if len(spec.axis) != 1:
        raise SpecError(f"axis: bench compares one feature axis with NumPy and PyTorch; the spec has {list(spec.axis)}")
    shape = tuple(fill if d is None else d for d in spec.shape)
    k = spec.virtual_batch_size
    if k is not None and shape[0] % k:
        raise SpecError(f"--batch: {shape[0]} is not a multiple of the spec's virtual_batch_size={k}")
    variant = " renorm" if spec.renorm else f" ghost k={k}" if k is not None else ""
    return Case(f"{shape} axis={spec.axis[0]} (spec file){variant}", shape, spec.axis[0], spec.dtype,
                renorm=spec.renorm, virtual_batch_size=k)


# -- timing --------------------------------------------------------------------------------
ORDER_SEED = 2026  # the rounds' orders (measure)


def _calls_per_sample(fn: Callable[[], object]) -> int:
    fn()
    t = time.perf_counter()
    fn()
    once = time.perf_counter() - t
    return max(1, min(10000, int(SAMPLE_SECONDS / max(once, 1e-7))))


def measure(fns: Dict[str, Callable[[], object]], repeat: int) -> Dict[str, List[float]]:
    """Seconds per call of each function: `repeat` samples each, one of each per round,
    in a new order every round (a fixed seed, so runs repeat).  A fixed cycle would
    always run an implementation right after the same other one: a kernel that follows
    the one that just read x into the caches (an ISA build of the same kernel, say)
    looked up to 20% faster than it is."""
    loops = {name: _calls_per_sample(fn) for name, fn in fns.items()}
    times: Dict[str, List[float]] = {name: [] for name in fns}
    order = list(fns)
    shuffle = random.Random(ORDER_SEED).shuffle
    for _ in range(repeat):
        shuffle(order)
        for name in order:
            fn, n = fns[name], loops[name]
            t = time.perf_counter()
            for _ in range(n):
                fn()
            times[name].append((time.perf_counter() - t) / n)
    return times


def summary(samples: Sequence[float]) -> dict:
    """Median, quartiles and minimum of `samples` (seconds), in milliseconds."""
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return {"median_ms": statistics.median(samples) * 1e3, "q1_ms": q[0] * 1e3, "q3_ms": q[2] * 1e3,
            "min_ms": min(samples) * 1e3, "samples": len(samples)}


# -- the implementations -----------------------------------------------------------------------
class _Inputs:
    def __init__(self, case: Case, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.dtype = numpy_dtype(case.dtype)
        self.x = (rng.standard_normal(case.shape) * 2 + 0.5).astype(self.dtype)
        self.dy = rng.standard_normal(case.shape).astype(self.dtype)
        c = case.shape[case.axis]
        pd = np.float64 if case.dtype == "float64" else np.float32
        self.gamma = rng.uniform(0.5, 1.5, c).astype(pd)
        self.beta = rng.standard_normal(c).astype(pd)
        self.moving_mean = rng.standard_normal(c).astype(pd) * 0.1
        self.moving_variance = rng.uniform(0.5, 2.0, c).astype(pd)


def _bngen_fns(case: Case, data: _Inputs, threads: int, cache_dir, compiler) -> Dict[str, Callable]:
    fns = {}
    base = dict(shape=case.shape, axis=case.axis, dtype=case.dtype, epsilon=1e-3, momentum=0.9)
    variant = dict(renorm=case.renorm, virtual_batch_size=case.virtual_batch_size)
    infer = build(Spec(training=False, **base), cache_dir, compiler=compiler)
    train = build(Spec(training=True, **base, **variant), cache_dir, compiler=compiler)
    x, g, b, mm, mv = data.x, data.gamma, data.beta, data.moving_mean, data.moving_variance
    mm_t, mv_t = mm.copy(), mv.copy()
    extra = {}
    if case.renorm:  # the stddevs near sqrt(moving_variance); clipping as papers start it
        extra = dict(moving_stddev=np.sqrt(mv), renorm_mean=mm.copy(), renorm_stddev=np.sqrt(mv), rmax=3.0,
                     rmin=1 / 3, dmax=5.0)
    fns["inference"] = lambda: infer(x, g, b, mm, mv, threads=threads)
    fns["training forward"] = lambda: train(x, g, b, mm_t, mv_t, threads=threads, **extra)
    if hasattr(train, "backward"):
        out = train.forward(x, g, b, mm.copy(), mv.copy(), threads=threads,
                            **{k: v.copy() if isinstance(v, np.ndarray) else v for k, v in extra.items()})
        mean, var = out[1], out[2]
        held = dict(r=out[3], d=out[4]) if case.renorm else {}
        dy = data.dy
        fns["backward"] = lambda: _call_backward(train, dy, x, g, mean, var, threads, held)
    return fns


def _call_backward(kernel, dy, x, gamma, mean, variance, threads, held=None):
    held = held or {}
    try:
        return kernel.backward(dy, x, gamma, mean, variance, threads=threads, **held)
    except TypeError:  # a backward without a threads= argument
        return kernel.backward(dy, x, gamma, mean, variance, **held)


def _numpy_fns(case: Case, data: _Inputs) -> Dict[str, Callable]:
    axis = case.axis % len(case.shape)
    axes = tuple(a for a in range(len(case.shape)) if a != axis)
    bshape = [1] * len(case.shape)
    bshape[axis] = case.shape[axis]
    x, dy, eps = data.x, data.dy, 1e-3
    g, b = data.gamma.reshape(bshape), data.beta.reshape(bshape)
    mm, mv = data.moving_mean.reshape(bshape), data.moving_variance.reshape(bshape)
    n = x.size // case.shape[axis]
    # Half-precision reductions in float32, as a NumPy user would write them (float16 sums
    # overflow); every output in the storage dtype.
    acc = np.float32 if x.dtype.itemsize < 4 else None
    out = x.dtype

    def inference():
        a = g / np.sqrt(mv + eps)
        return (x * a + (b - mm * a)).astype(out, copy=False)

    def training():
        m = x.mean(axis=axes, keepdims=True, dtype=acc)
        v = x.var(axis=axes, keepdims=True, dtype=acc)
        return ((x - m) * (g / np.sqrt(v + eps)) + b).astype(out, copy=False)

    m = x.mean(axis=axes, keepdims=True, dtype=acc)
    r = 1 / np.sqrt(x.var(axis=axes, keepdims=True, dtype=acc) + eps)

    def backward():
        xhat = (x - m) * r
        d = dy if acc is None else dy.astype(acc)  # (n * dy overflows float16)
        sdy = d.sum(axis=axes, keepdims=True)
        sdyx = (d * xhat).sum(axis=axes, keepdims=True)
        dx = (g * r / n * (n * d - sdy - xhat * sdyx)).astype(out, copy=False)
        return dx, sdyx.ravel(), sdy.ravel()

    return {"inference": inference, "training forward": training, "backward": backward}


def _inductor_fns(case: Case, data: _Inputs, threads: int) -> Tuple[Optional[Dict[str, Callable]], float]:
    """torch.compile'd (Inductor, CPU C++) batch norm of each kind, and the seconds its
    compiles took; (None, 0) without torch."""
    try:
        import torch
    except ImportError:
        return None, 0.0
    eager = _torch_fns(case, data, threads)
    if eager is None:
        return None, 0.0
    # Every case compiles the same lambdas of _torch_fns anew: without a reset, dynamo's
    # per-code recompile limit (8) would make later cases run eagerly under its name.
    torch._dynamo.reset()
    fns, spent = {}, 0.0
    for kind, fn in eager.items():
        compiled = torch.compile(fn, dynamic=False)
        t = time.perf_counter()
        try:
            with torch.no_grad():
                compiled()
        except Exception:  # (any: a kind Inductor cannot compile here gets no column)
            continue
        spent += time.perf_counter() - t
        fns[kind] = compiled
    return fns, spent


def _torch_fns(case: Case, data: _Inputs, threads: int) -> Optional[Dict[str, Callable]]:
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    axis = case.axis % len(case.shape)

    def as_torch(a):
        if a.dtype.name == "bfloat16":  # ml_dtypes' bfloat16: share the bits, reinterpret
            t = torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(a)
        if axis != 1:  # PyTorch wants features on dim 1: a permuted view (channels_last strides)
            order = (0, axis) + tuple(d for d in range(1, len(case.shape)) if d != axis)
            t = t.permute(*order)
        return t

    x, dy = as_torch(data.x), as_torch(data.dy)
    g, b = torch.from_numpy(data.gamma), torch.from_numpy(data.beta)
    mm, mv = torch.from_numpy(data.moving_mean), torch.from_numpy(data.moving_variance)
    mm_t, mv_t = mm.clone(), mv.clone()
    F = torch.nn.functional
    _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(x, g, b, mm.clone(), mv.clone(), True, 0.1, 1e-3)
    fns = {
        "inference": lambda: F.batch_norm(x, mm, mv, g, b, False, 0.1, 1e-3),
        "training forward": lambda: F.batch_norm(x, mm_t, mv_t, g, b, True, 0.1, 1e-3),
        "backward": lambda: torch.ops.aten.native_batch_norm_backward(
            dy, x, g, mm, mv, save_mean, save_invstd, True, 1e-3, [True, True, True]),
    }
    with torch.no_grad():
        for kind, fn in list(fns.items()):
            try:
                fn()
            except (RuntimeError, ValueError):  # this torch build lacks the kernel for the dtype, or
                # refuses the case (training on one value per channel): no column
                del fns[kind]
    return fns


def torch_version() -> Optional[str]:
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


# -- the memory floor ------------------------------------------------------------------------------
def build_memory_probe(dtype: str, cache_dir=None, *, compiler: Optional[Compiler] = None, streaming: bool = False):
    """The compiled copy / read probes for `dtype`: bngen's own code path, same flags and
    thread split as its kernels; `streaming`: large copies use streaming stores."""
    compiler = compiler or Compiler()
    cache = Cache(resolve_root(cache_dir))
    features = compiler.features(cache.root)
    # (half probes move and sum the values' bits: their floor is memory's, not the conversions')
    spec = Spec((None, 1), axis=1, dtype=dtype, training=True)
    target = features.target(compiler.flags)
    plan = make_plan(spec, dataclasses.replace(target, streaming_stores=streaming and target.streaming_stores),
                     dataclasses.replace(DEFAULT_TUNING, streaming_kinds=frozenset({"channels_last training"})))
    plan = dataclasses.replace(plan, entries=probe_entries(plan.threaded), fast_entries=())
    module = load_source(render_template("memory.c.j2", plan), render_cdef(plan), cache, compiler, features,
                         json.dumps({"probe": "memory", "dtype": dtype}))
    return plan, module


def _memory_fns(probes, data: _Inputs, threads: int) -> Dict[str, Callable]:
    fns = {}
    for probe, suffix in zip(probes, ("", " streamed")):
        for name, fn in _probe_fns(*probe, data, threads).items():
            if suffix and name == "read":
                continue
            fns[name + suffix] = fn
    return fns


def _probe_fns(plan, module, data: _Inputs, threads: int) -> Dict[str, Callable]:
    ffi, lib = module.ffi, module.lib
    ctype = plan.precision.data + "[]"
    x = data.x
    y = np.empty_like(x)
    sink = np.zeros(1, np.float64 if plan.precision.param == "double" else np.float32)
    px, py = ffi.from_buffer(ctype, x), ffi.from_buffer(ctype, y, require_writable=True)
    psink = ffi.from_buffer(plan.precision.param + "[]", sink, require_writable=True)
    extra = (threads,) if plan.threaded else ()
    n = x.size
    return {"copy": lambda: lib.bn_copy(px, py, n, *extra), "read": lambda: lib.bn_read(px, psink, n, *extra)}


def floor_ms(kind: str, copy_ms: float, read_ms: float, channels_last: bool = False) -> float:
    """The time of the memory passes `kind` cannot avoid in its layout (see the module
    docstring); `copy_ms` is the faster of the plain and the streamed copy."""
    reads, writes = PASSES[kind, channels_last]
    return writes * copy_ms + (reads - writes) * read_ms


def march_compiler(isa: str, base: Optional[Compiler] = None) -> Compiler:
    """`base` (default: the default compiler) building for ``-march=isa`` instead."""
    base = base or Compiler()
    flags = tuple(f for f in base.flags if not f.startswith("-march="))
    return dataclasses.replace(base, flags=flags + (f"-march={isa}",))


# -- the run ---------------------------------------------------------------------------------------
def keep_freed_memory() -> bool:
    """Asks glibc's malloc to keep freed memory for reuse (large allocations from the heap,
    no trimming), so that no implementation pays page faults for another's frees: without
    it, NumPy's large temporaries leave malloc returning memory to the kernel, and
    PyTorch's next 25 MB output costs ~6000 page faults (12 ms).  Like a warm training
    loop.  Returns False where there is no glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    ok = mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest: below it, allocations come from the heap
    return bool(mallopt(M_TRIM_THRESHOLD, 1 << 30) and ok)


def run(cases: Sequence[Case], threads: Sequence[int], repeat: int = 21, kinds: Sequence[str] = KINDS,
        cache_dir=None, compiler: Optional[Compiler] = None, progress: Callable[[str], None] = lambda s: None,
        isas: Sequence[str] = (), inductor: bool = False) -> dict:
    """Benchmarks every case x kind x thread count; returns a JSON-ready report.

    `isas`: other ``-march`` values to build bngen for and time in the same rounds
    (one row each); `inductor`: also time torch.compile (Inductor) of torch's batch norm."""
    warm_malloc = keep_freed_memory()
    rows = []
    probes = {}
    builds = {"native": compiler, **{isa: march_compiler(isa, compiler) for isa in isas}}
    compile_seconds = {}
    for case in cases:
        data = _Inputs(case)
        if case.dtype not in probes:
            probes[case.dtype] = tuple(build_memory_probe(case.dtype, cache_dir, compiler=compiler, streaming=s)
                                       for s in (False, True))
        numpy_fns = _numpy_fns(case, data)
        for nthreads in threads:
            bngen_fns = {isa: _bngen_fns(case, data, nthreads, cache_dir, c) for isa, c in builds.items()}
            torch_fns = _torch_fns(case, data, nthreads)
            inductor_fns = None
            if inductor:
                inductor_fns, spent = _inductor_fns(case, data, nthreads)
                compile_seconds[f"{case.name} | {nthreads}"] = spent
            memory = _memory_fns(probes[case.dtype], data, nthreads)
            for kind in kinds:
                if kind not in bngen_fns["native"]:
                    continue
                progress(f"{case.name} | {kind} | {nthreads} thread(s)")
                fns = {_bngen_name(isa): f[kind] for isa, f in bngen_fns.items()}
                fns.update({"numpy": numpy_fns[kind], **memory})
                if torch_fns is not None and kind in torch_fns:  # (a kind torch refused has no column)
                    fns["torch"] = torch_fns[kind]
                if inductor_fns is not None and kind in inductor_fns:
                    fns["inductor"] = inductor_fns[kind]
                if torch_fns is not None:
                    import torch

                    with torch.no_grad():
                        times = measure(fns, repeat)
                else:
                    times = measure(fns, repeat)
                stats = {name: summary(t) for name, t in times.items()}
                med = {name: s["median_ms"] for name, s in stats.items()}
                floor = floor_ms(kind, min(med["copy"], med["copy streamed"]), med["read"], case.channels_last_layout)
                for isa in builds:
                    mine = med[_bngen_name(isa)]
                    timings = {k: v for k, v in stats.items() if not k.startswith("bngen")}
                    timings["bngen"] = stats[_bngen_name(isa)]
                    rows.append({
                        "case": case.name, "shape": list(case.shape), "axis": case.axis, "dtype": case.dtype,
                        "renorm": case.renorm, "virtual_batch_size": case.virtual_batch_size,
                        "isa": isa, "kind": kind, "threads": nthreads, "timings": timings, "floor_ms": floor,
                        "torch_over_bngen": med["torch"] / mine if "torch" in med else None,
                        "inductor_over_bngen": med["inductor"] / mine if "inductor" in med else None,
                        "numpy_over_bngen": med["numpy"] / mine,
                        "bngen_over_floor": mine / floor,
                        "bytes": int(data.x.nbytes),
                    })
    return {"repeat": repeat, "threads": list(threads), "torch": torch_version(), "numpy": np.__version__,
            "malloc_keeps_freed_memory": warm_malloc, "isas": ["native", *isas], "inductor": inductor,
            "inductor_compile_seconds": compile_seconds, "cpu": cpu_name(), "rows": rows}


def _bngen_name(isa: str) -> str:
    return "bngen" if isa == "native" else f"bngen {isa}"


def cpu_name() -> str:
    """The CPU's model name and its widest vector extension, for the report."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "NEON" if "asimd" in flags else "scalar/SSE"
    return f"{model} ({isa})"


def _ms(v: float) -> str:
    return f"{v:.4f}" if v < 0.1 else f"{v:.3f}" if v < 10 else f"{v:.1f}"


def markdown(report: dict) -> str:
    """The report as a markdown table (median milliseconds per call)."""
    has_torch = report["torch"] is not None
    has_isa = len(report.get("isas", ["native"])) > 1
    has_inductor = bool(report.get("inductor"))
    head = ["case", "kind", "threads"] + (["isa"] if has_isa else []) + ["bngen ms", "spread", "numpy ms"]
    if has_torch:
        head += ["torch ms", "torch / bngen"]
    if has_inductor:
        head += ["inductor ms", "inductor / bngen"]
    head += ["floor ms", "bngen / floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["rows"]:
        t = row["timings"]
        b = t["bngen"]
        spread = (b["q3_ms"] - b["q1_ms"]) / b["median_ms"]
        cells = [row["case"], row["kind"], str(row["threads"])] + ([row.get("isa", "native")] if has_isa else [])
        cells += [_ms(b["median_ms"]), f"{spread:.0%}", _ms(t["numpy"]["median_ms"])]
        if has_torch and "torch" in t:
            cells += [_ms(t["torch"]["median_ms"]), f"{row['torch_over_bngen']:.2f}x"]
        elif has_torch:  # a case torch refuses (training on one value per channel)
            cells += ["-", "-"]
        if has_inductor and "inductor" in t:
            cells += [_ms(t["inductor"]["median_ms"]), f"{row['inductor_over_bngen']:.2f}x"]
        elif has_inductor:
            cells += ["-", "-"]
        cells += [_ms(row["floor_ms"]), f"{row['bngen_over_floor']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        f"{report.get('cpu', 'unknown CPU')}. Median of {report['repeat']} samples per cell, implementations timed "
        "in rounds, each in a new order; spread = interquartile range of bngen's samples over its median. "
        f"NumPy {report['numpy']}" + (f", PyTorch {report['torch']}" if has_torch else ", PyTorch not installed") + ". "
        "floor = the kind's least memory traffic timed with bngen's copy/read probes "
        "(inference 1 copy; training forward 1 copy channels-first, 1 copy + 1 read channels-last; "
        "backward 1 copy + 1 read channels-first, 1 copy + 3 reads channels-last; "
        "the faster of a plain and a streamed copy)."
        + (" isa: which build of bngen's kernels the row times (native: tuned to this machine's processor)." if has_isa else "")
        + (" inductor: torch.compile of the same torch call; compile times are in the JSON report."
           if has_inductor else "")
        + (" malloc keeps freed memory (no page faults from one implementation's frees)."
           if report.get("malloc_keeps_freed_memory") else ""),
    ]
    return "\n".join(lines + notes)


# -- the end-to-end training step (bngen bench --model) -----------------------------------------------
MODEL_MODES = ("eager", "compiled")
NO_BATCH_NORM = "without batch norm"  # the reference model of the batch-norm cost


def _is_batch_norm(name: str) -> bool:
    """torch's aten::*batch_norm* ops and NativeBatchNormBackward nodes, bngen's custom ops
    (bngen::batch_norm_*) and eager autograd Functions (_BatchNormTrain, ...Backward)."""
    return "batchnorm" in name.lower().replace("_", "")


def _bn_ms(prof) -> float:
    """Milliseconds the profiled steps spent in batch norm: the CPU time of every
    batch-norm event (`_is_batch_norm`) not inside another one."""
    total = 0.0
    for event in prof.events():
        if not _is_batch_norm(event.name):
            continue
        parent = event.cpu_parent
        while parent is not None and not _is_batch_norm(parent.name):
            parent = parent.cpu_parent
        if parent is None:
            total += event.cpu_time_total
    return total / 1e3


def model_run(size: str = "realistic", threads: Sequence[int] = (1, 2), modes: Sequence[str] = MODEL_MODES,
              repeat: int = 10, steps: int = 20, profiled: int = 3, channels_last: bool = False,
              progress: Callable[[str], None] = lambda s: None) -> dict:
    """One training step (forward, backward, SGD) of `bngen.tools.resnet.ResNet` with
    torch.nn.BatchNorm2d and with ``bngen.torch.convert`` of the same model, eager and
    compiled, per thread count; JSON-ready.

    Per cell: the median step time of `repeat` steps (the models' steps alternate, in a
    new order each round); the batch-norm cost, the median minus that of the same model
    without batch norm (`resnet.without_batch_norm`, timed in the same rounds): what batch
    norm adds to a step where it runs, caches and all; and the share of a step spent in
    batch norm over `profiled` steps under torch.profiler (None where no batch-norm
    operator is left to see: inductor compiles torch's own batch norm into its generated
    code).  Before timing, both models are trained `steps` steps from the same
    initialisation on the same batches; the largest relative difference of their losses
    is reported.
    """
    import copy

    import torch

    from .. import torch as bnt
    from . import resnet

    warm_malloc = keep_freed_memory()  # as in `run`: a warm training loop reuses freed memory
    dims = resnet.SIZES[size]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(dims.batch, 3, dims.image, dims.image, generator=g).contiguous(memory_format=fmt),
                torch.randint(0, dims.classes, (dims.batch,), generator=g)) for _ in range(4)]
    old_threads = torch.get_num_threads()
    rows, agreement = [], {}
    try:
        for mode in modes:
            for nthreads in threads:
                torch.set_num_threads(nthreads)
                torch.manual_seed(0)
                base = resnet.ResNet(dims).to(memory_format=fmt)
                models = {"torch": base, "bngen": bnt.convert(copy.deepcopy(base)),
                          NO_BATCH_NORM: resnet.without_batch_norm(copy.deepcopy(base))}
                if mode == "compiled":
                    torch._dynamo.reset()  # each thread count compiles afresh
                    # bngen's model with its batch norm + ReLU fusion, as the README tells users to compile it
                    models = {k: torch.compile(m, options={"joint_custom_pre_pass": bnt.fuse_relu} if k == "bngen" else None)
                              for k, m in models.items()}
                opts = {k: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for k, m in models.items()}

                def step(name, batch):
                    x, target = batch
                    opts[name].zero_grad(set_to_none=True)
                    loss = torch.nn.functional.cross_entropy(models[name](x), target)
                    loss.backward()
                    opts[name].step()
                    return loss.item()

                progress(f"model {size} | {mode} | {nthreads} thread(s): {steps} steps for the loss check")
                losses = {k: [step(k, batches[i % len(batches)]) for i in range(steps)] for k in models}
                del losses[NO_BATCH_NORM]  # trained too (so that it is warm), but not compared
                diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses["bngen"], losses["torch"]))
                agreement[f"{mode}, {nthreads} thread(s)"] = {"max_relative_difference": diff,
                                                               "torch": losses["torch"], "bngen": losses["bngen"]}
                progress(f"model {size} | {mode} | {nthreads} thread(s): timing")
                times = measure({k: (lambda k=k: step(k, batches[0])) for k in models}, repeat)
                shares = {}
                for name in ("torch", "bngen"):
                    # one step with the profiler on but not recording: its start-up is not in the share
                    schedule = torch.profiler.schedule(wait=0, warmup=1, active=profiled, repeat=1)
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                schedule=schedule) as prof:
                        step(name, batches[0])
                        prof.step()
                        start = time.perf_counter()
                        for _ in range(profiled):
                            step(name, batches[0])
                            prof.step()
                        wall = (time.perf_counter() - start) * 1e3
                    bn = _bn_ms(prof)
                    shares[name] = (bn / profiled, bn / wall) if bn > 0 else (None, None)
                without = summary(times[NO_BATCH_NORM])["median_ms"]
                for name in ("torch", "bngen"):
                    stats = summary(times[name])
                    rows.append({"mode": mode, "threads": nthreads, "implementation": name, "step": stats,
                                 "bn_cost_ms": stats["median_ms"] - without, "without_bn_ms": without,
                                 "bn_ms": shares[name][0], "bn_share": shares[name][1],
                                 "torch_over_bngen": _paired_ratio(times["torch"], times[name]),
                                 "rounds_faster": None if name == "torch" else
                                 sum(t > b for t, b in zip(times["torch"], times[name])) / len(times[name])})
    finally:
        torch.set_num_threads(old_threads)
    return {"model": "bngen.tools.resnet.ResNet", "size": dataclasses.asdict(dims), "size_name": size,
            "channels_last": channels_last, "repeat": repeat, "steps": steps, "torch": torch.__version__,
            "malloc_keeps_freed_memory": warm_malloc,
            "rows": rows, "losses": agreement}


def _paired_ratio(reference: Sequence[float], other: Sequence[float]) -> float:
    """The median over rounds of reference / other within each round: this VM's speed drifts
    by 10-40% between rounds, and within one both steps see the same machine, so the
    paired ratio moves much less than the ratio of the two medians."""
    return statistics.median(r / o for r, o in zip(reference, other))


def model_markdown(report: dict) -> str:
    """The model report as a markdown table (median step time)."""
    lines = ["| mode | threads | batch norm | step ms | spread | BN cost ms | profiled BN ms | BN share | torch / this "
             "| rounds faster |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        s = row["step"]
        spread = (s["q3_ms"] - s["q1_ms"]) / s["median_ms"]
        bn = "-" if row["bn_ms"] is None else _ms(row["bn_ms"])
        share = "-" if row["bn_share"] is None else f"{row['bn_share']:.0%}"
        lines.append(f"| {row['mode']} | {row['threads']} | {row['implementation']} | {_ms(s['median_ms'])} | "
                     f"{spread:.0%} | {_ms(row['bn_cost_ms'])} | {bn} | {share} | {row['torch_over_bngen']:.2f}x | "
                     f"{'-' if row['rounds_faster'] is None else format(row['rounds_faster'], '.0%')} |")
    size = report["size"]
    worst = max((v["max_relative_difference"] for v in report["losses"].values()), default=0.0)
    lines += ["", f"ResNet-style CNN ({report['size_name']}: batch {size['batch']}, {size['image']}x{size['image']} "
              f"images, widths {tuple(size['widths'])}{', channels_last' if report['channels_last'] else ''}), "
              f"one SGD training step; median of {report['repeat']} steps, the models alternating; "
              f"PyTorch {report['torch']}. BN cost: the step minus the step of the same model without batch norm "
              "(identities in its place, timed in the same rounds). "
              "torch / this: the median over rounds of the ratio of the two steps within a round; rounds faster: "
              "the share of rounds in which this step beat torch's. "
              "Profiled BN ms/share: batch-norm operators under torch.profiler "
              "('-': none left to see, inductor compiled torch's batch norm into its own code). "
              f"Losses over {report['steps']} steps from the same initialisation agree to {worst:.1e} "
              "(largest relative difference)."]
    return "\n".join(lines)
