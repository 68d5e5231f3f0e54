"""The ``bngen`` command line (also ``python -m bngen``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

from ..core.spec import DTYPES, Spec, SpecError
from ..jit.build import build
from ..jit.cache import Cache, resolve_root
from ..jit.compiler import CompileError
from ..version import __version__

DEMO_SHAPE = (None, 64, 56, 56)  # a ResNet stage-1 activation, NCHW
DEMO_BATCH = 16


def _load_spec(path: str) -> Spec:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SpecError(f"--spec: cannot read {path}: {exc.strerror or exc}") from None
    try:
        return Spec.from_json(data)  # bytes: bad UTF-8 is a SpecError too
    except SpecError as exc:
        raise SpecError(f"--spec: {path}: {exc}") from None


def _positive_int(text: str) -> int:
    """argparse type of counts and sizes: an int >= 1 (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def _median_ms(fn, repeat: int) -> float:
    fn()  # warm caches and threads
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def cmd_demo(args) -> int:
    """Build training and inference kernels for a ResNet-style layer, check them against
    the NumPy oracle and time them beside NumPy."""
    from .. import oracle

    rng = np.random.default_rng(0)
    shape = (args.batch,) + DEMO_SHAPE[1:]
    c = DEMO_SHAPE[1]
    x = (rng.standard_normal(shape) * 2.0 + 3.0).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, c).astype(np.float32)
    beta = rng.standard_normal(c).astype(np.float32)
    moving_mean = np.zeros(c, np.float32)
    moving_variance = np.ones(c, np.float32)
    print(f"bngen {__version__} demo: batch norm over NCHW input {shape}, float32, cache {resolve_root(args.cache_dir)}")

    failures = 0
    for training in (True, False):
        spec = Spec(DEMO_SHAPE, axis=1, training=training, momentum=0.9, epsilon=1e-5)
        t = time.perf_counter()
        kernel = build(spec, args.cache_dir)
        built = time.perf_counter() - t
        mm, mv = moving_mean.copy(), moving_variance.copy()
        if training:
            y, mean, var = kernel.forward(x, gamma, beta, mm, mv)
            ref = oracle.forward(spec, x, gamma, beta, moving_mean, moving_variance)
            checks = {"y": (y, ref.y), "mean": (mean, ref.mean), "variance": (var, ref.variance),
                      "moving_mean": (mm, ref.moving_mean), "moving_variance": (mv, ref.moving_variance)}
            run = lambda: kernel(x, gamma, beta)  # noqa: E731

            def numpy_run():
                m = x.mean(axis=(0, 2, 3), keepdims=True)
                v = x.var(axis=(0, 2, 3), keepdims=True)
                return (x - m) / np.sqrt(v + spec.epsilon) * gamma[:, None, None] + beta[:, None, None]
        else:
            y = kernel(x, gamma, beta, mm, mv)
            ref = oracle.forward(spec, x, gamma, beta, mm, mv)
            checks = {"y": (y, ref.y)}
            run = lambda: kernel(x, gamma, beta, mm, mv)  # noqa: E731
            a = (gamma / np.sqrt(mv + spec.epsilon))[:, None, None]
            b = beta[:, None, None] - mm[:, None, None] * a
            numpy_run = lambda: x * a + b  # noqa: E731
        errors = {name: float(np.max(np.abs(got - want))) for name, (got, want) in checks.items()}
        ok = all(e < 1e-4 for e in errors.values())
        failures += not ok
        ms, np_ms = _median_ms(run, args.repeat), _median_ms(numpy_run, args.repeat)
        label = "training forward" if training else "inference"
        print(f"\n{label}: built in {built * 1e3:.0f} ms; max |error| vs float64 oracle: "
              + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()) + ("  OK" if ok else "  FAILED"))
        print(f"  bngen {ms:8.3f} ms   numpy {np_ms:8.3f} ms   speed-up {np_ms / ms:5.1f}x")
    return 1 if failures else 0


def cmd_build(args) -> int:
    """Build (or load from the cache) the kernel of a spec file."""
    spec = _load_spec(args.spec)
    t = time.perf_counter()
    kernel = build(spec, args.cache_dir)
    print(f"built {spec.describe()} in {(time.perf_counter() - t) * 1e3:.0f} ms")
    if args.show_source:
        print(kernel.source)
    return 0


def cmd_bench(args) -> int:
    """Time bngen's kernels beside NumPy and PyTorch (when installed) and against the
    memory-traffic floor, on the preset cases or on a spec file; print a markdown table."""
    from ..core.threads import MAX_THREADS, default_threads
    from . import bench

    if args.model:
        return _bench_model(args)
    if args.spec:
        cases = [bench.case_from_spec(_load_spec(args.spec), args.batch)]
    else:
        dtypes = [d.strip() for d in args.dtypes.split(",")]
        bad = [d for d in dtypes if d not in DTYPES]
        if bad:
            raise SpecError(f"--dtypes: {', '.join(bad)} not among {', '.join(DTYPES)}")
        cases = bench.with_variants(bench.with_dtype(bench.PRESETS, dtypes), (args.variants or "plain").split(","))
    if args.threads:
        try:
            threads = [int(t) for t in args.threads.split(",")]
        except ValueError:
            threads = []
        if not threads or min(threads) < 1 or max(threads) > MAX_THREADS:
            raise SpecError(f"--threads: {args.threads!r} is not a comma-separated list of counts from 1 to {MAX_THREADS}")
    else:
        threads = sorted({1, default_threads()})
    progress = (lambda s: print(f"  {s}", file=sys.stderr)) if not args.quiet else (lambda s: None)
    if args.distributed:  # a synchronized training step on N local processes (torch.distributed)
        from . import bench_distributed

        report = bench_distributed.run(cases, args.distributed, repeat=args.repeat, cache_dir=args.cache_dir,
                                       progress=progress)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
        print(bench_distributed.markdown(report))
        return 0
    kinds = [k for k in bench.KINDS if k in args.kinds.split(",")] if args.kinds else list(bench.KINDS)
    unknown = [k for k in args.kinds.split(",") if k not in bench.KINDS] if args.kinds else []
    if unknown:
        raise SpecError(f"--kinds: {', '.join(map(repr, unknown))} not among {', '.join(bench.KINDS)}")
    isas = [m.strip() for m in args.march.split(",") if m.strip() and m.strip() != "native"] if args.march else []
    for isa in isas:
        if not all(ch.isalnum() or ch in "-_." for ch in isa):
            raise SpecError(f"--march: {isa!r} is not an -march value (e.g. x86-64-v3, skylake-avx512)")
    report = bench.run(cases, threads, repeat=args.repeat, kinds=kinds, cache_dir=args.cache_dir, progress=progress,
                       isas=isas, inductor=args.inductor)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(bench.markdown(report))
    return 0


def _thread_counts(text: str, default) -> list:
    """The thread counts of --threads, or `default` without it."""
    from ..core.threads import MAX_THREADS

    if not text:
        return default
    try:
        threads = [int(t) for t in text.split(",")]
    except ValueError:
        threads = []
    if not threads or min(threads) < 1 or max(threads) > MAX_THREADS:
        raise SpecError(f"--threads: {text!r} is not a comma-separated list of counts from 1 to {MAX_THREADS}")
    return threads


def _bench_model(args) -> int:
    """``bngen bench --model``: a ResNet-style training step with torch.nn.BatchNorm2d and
    with bngen.torch, eager and compiled, at 1 and 2 threads (or --threads)."""
    from . import bench

    try:
        import torch  # noqa: F401
    except ImportError:
        print("bngen bench --model: needs PyTorch (pip install bngen[torch])", file=sys.stderr)
        return 2
    modes = [m.strip() for m in args.modes.split(",")]
    unknown = [m for m in modes if m not in bench.MODEL_MODES]
    if unknown:
        raise SpecError(f"--modes: {', '.join(map(repr, unknown))} not among {', '.join(bench.MODEL_MODES)}")
    threads = _thread_counts(args.threads, [1, 2])
    progress = (lambda s: print(f"  {s}", file=sys.stderr)) if not args.quiet else (lambda s: None)
    report = bench.model_run(args.model_size, threads, modes, repeat=args.model_repeat or args.repeat,
                             steps=args.steps, channels_last=args.channels_last, progress=progress)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(bench.model_markdown(report))
    return 0


def _load_npz(option: str, path: str) -> dict:
    """The arrays of the .npz file at `path`, read in full; a file that is not one (missing,
    empty, a .npy, truncated, holding pickled objects) is an OSError naming `option`."""
    try:
        archive = np.load(path, allow_pickle=False)
        if isinstance(archive, np.ndarray):
            raise OSError(f"{option}: {path} is a .npy file (one array); expected an .npz archive of named arrays")
        with archive:
            return {name: archive[name] for name in archive.files}
    except (ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise OSError(f"{option}: cannot read {path} as .npz ({exc or type(exc).__name__})") from None
    except OSError as exc:
        if str(exc).startswith(option):
            raise
        raise OSError(f"{option}: cannot read {path} as .npz ({exc})") from None


def cmd_emit(args) -> int:
    """Write NAME.c and NAME.h (freestanding C99) for a spec file; with --params, a mode-0
    inference spec gets its folded per-feature scale and shift baked in."""
    from ..aot.emit import emit

    spec = _load_spec(args.spec)
    params = _load_npz("--params", args.params) if args.params else None
    try:
        paths = emit(spec, args.out, args.name, params, target=args.target, harness=args.harness)
    except (ValueError, TypeError) as exc:
        print(f"bngen: error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def cmd_fold(args) -> int:
    """Fold an inference batch norm into the dense or convolution layer before it:
    W' = W * s, b' = (b - mean) * s + beta with s = gamma / sqrt(variance + epsilon)."""
    from ..aot.fold import fold_npz

    try:
        axis = tuple(int(a) for a in args.out_axis.split(","))
    except ValueError:
        print(f"bngen: error: --out-axis: {args.out_axis!r} is not an int or a comma-separated list of ints", file=sys.stderr)
        return 2
    layer, bn = _load_npz("--layer", args.layer), _load_npz("--bn", args.bn)
    try:
        folded = fold_npz(layer, bn, args.epsilon, axis[0] if len(axis) == 1 else axis)
    except (ValueError, TypeError) as exc:
        print(f"bngen: error: {exc}", file=sys.stderr)
        return 2
    # np.savez adds .npz to a name without it: print the file actually written
    out = args.out if str(args.out).endswith(".npz") else f"{args.out}.npz"
    try:
        np.savez(out, **folded)
    except OSError as exc:
        raise OSError(f"--out: cannot write {out} ({exc.strerror or exc})") from None
    print(out)
    return 0


def cmd_catalogue(args) -> int:
    """Regenerate the reference kernels of generated/ (the test suite checks they are current)."""
    from ..aot.catalogue import default_dir, regenerate

    for path in regenerate(args.out or default_dir()):
        print(path)
    return 0


def cmd_cache_info(args) -> int:
    cache = Cache(resolve_root(args.cache_dir))
    entries = cache.entries()
    print(f"cache: {cache.root}")
    print(f"entries: {len(entries)}, {cache.size() / 1e6:.2f} MB")
    return 0


def cmd_cache_clear(args) -> int:
    cache = Cache(resolve_root(args.cache_dir))
    removed, skipped = cache.clear()
    busy = f"; skipped {skipped} being rebuilt by another process" if skipped else ""
    print(f"removed {removed} entries from {cache.root}{busy}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bngen", description="A compiler for batch-normalization kernels.")
    parser.add_argument("--version", action="version", version=f"bngen {__version__}")
    parser.add_argument("--cache-dir", help="cache root (default: $BNGEN_CACHE_DIR or the user cache directory)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("demo", help="build, run and check a ResNet-style layer end to end", description=cmd_demo.__doc__)
    p.add_argument("--batch", type=_positive_int, default=DEMO_BATCH, help=f"batch size (default {DEMO_BATCH})")
    p.add_argument("--repeat", type=_positive_int, default=20, help="timed repetitions (default 20)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("build", help="build the kernel of a spec file into the cache", description=cmd_build.__doc__)
    p.add_argument("--spec", required=True, help="JSON file with the Spec fields")
    p.add_argument("--show-source", action="store_true", help="print the generated C")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("bench", help="time kernels beside NumPy/PyTorch and the memory floor", description=cmd_bench.__doc__)
    p.add_argument("--spec", help="JSON spec file to benchmark instead of the preset cases (its shape, axis and "
                   "dtype; the kernels are the mode-0 training and inference ones, like NumPy's and PyTorch's)")
    p.add_argument("--batch", type=_positive_int, default=32, help="size for the spec's dynamic (None) dimensions (default 32)")
    p.add_argument("--threads", help="comma-separated thread counts (default: 1 and all CPUs)")
    p.add_argument("--repeat", type=_positive_int, default=21, help="timed samples per implementation (default 21)")
    p.add_argument("--kinds", help="comma-separated subset of: inference,training forward,backward")
    p.add_argument("--dtypes", default="float32",
                   help="comma-separated storage dtypes for the preset cases (default float32; e.g. float32,float16,bfloat16)")
    p.add_argument("--variants", metavar="LIST",
                   help="comma-separated statistics variants of bngen's training kernels for the preset cases: plain "
                        "(default), renorm, ghost:K (virtual batch size K; cases whose batch K does not divide are "
                        "left out); NumPy and PyTorch stay plain, so compare bngen's rows of one case. A --spec "
                        "file brings its own (renorm, virtual_batch_size)")
    p.add_argument("--march", metavar="LIST",
                   help="comma-separated -march values to build and time bngen for too, in the same run "
                        "(e.g. x86-64-v3 for the AVX2 build on an AVX-512 machine); one row each")
    p.add_argument("--inductor", action="store_true",
                   help="also time torch.compile (Inductor) of torch's batch norm; compile time reported apart")
    p.add_argument("--json", metavar="FILE", help="also write the full report (all statistics) as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--distributed", type=_positive_int, metavar="N",
                   help="time a synchronized training step (forward and backward) on N local processes "
                        "(torch.distributed, gloo): kernels and collectives apart, beside one process")
    p.add_argument("--model", action="store_true",
                   help="instead: time a ResNet-style training step with torch.nn.BatchNorm2d vs bngen.torch (needs torch)")
    p.add_argument("--model-size", choices=["realistic", "tiny"], default="realistic",
                   help="--model: batch 32 of 32x32 images, widths 32/64/128 (realistic, default) or a seconds-long check (tiny)")
    p.add_argument("--modes", default="eager,compiled", help="--model: comma-separated subset of eager,compiled")
    p.add_argument("--steps", type=_positive_int, default=20, help="--model: training steps whose losses are compared (default 20)")
    p.add_argument("--model-repeat", type=_positive_int, help="--model: timed steps per implementation (default: --repeat)")
    p.add_argument("--channels-last", action="store_true", help="--model: channels_last model and inputs")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("emit", help="write freestanding C99 source and header for a spec", description=cmd_emit.__doc__)
    p.add_argument("--spec", required=True, help="JSON file with the Spec fields")
    p.add_argument("--params", help=".npz with gamma, beta, moving_mean, moving_variance (bakes them in)")
    p.add_argument("--name", default="bn", help="C name of the kernel and its files (default bn)")
    p.add_argument("--out", required=True, help="directory to write NAME.c and NAME.h into")
    p.add_argument("--target", default="host", choices=["host", "aarch64", "cortex-m"],
                   help="host (default), aarch64, or cortex-m (single precision throughout)")
    p.add_argument("--harness", action="store_true", help="also write NAME_test.c and reference vectors")
    p.set_defaults(func=cmd_emit)

    p = sub.add_parser("fold", help="fold a batch norm into the preceding dense/conv layer (.npz)", description=cmd_fold.__doc__)
    p.add_argument("--layer", required=True, help=".npz with weight (or kernel) and optionally bias")
    p.add_argument("--bn", required=True, help=".npz with moving_mean, moving_variance and optionally gamma, beta")
    p.add_argument("--epsilon", required=True, type=float, help="the batch norm's epsilon (Keras 1e-3, PyTorch 1e-5)")
    p.add_argument("--out-axis", default="0", help="output-feature axis of the weight: 0 (PyTorch), 1 (PyTorch transposed "
                   "conv), -1 (Keras), or adjacent axes like 2,3 (default 0)")
    p.add_argument("--out", required=True, help=".npz to write the folded weight and bias to")
    p.set_defaults(func=cmd_fold)

    p = sub.add_parser("catalogue", help="regenerate the reference kernels in generated/", description=cmd_catalogue.__doc__)
    p.add_argument("--out", help="where to write (default: generated/ of the source checkout)")
    p.set_defaults(func=cmd_catalogue)

    p = sub.add_parser("cache", help="inspect or clear the kernel cache")
    cache_sub = p.add_subparsers(dest="cache_command", metavar="ACTION")
    cache_sub.required = True
    cache_sub.add_parser("info", help="where the cache is and what it holds").set_defaults(func=cmd_cache_info)
    cache_sub.add_parser("clear", help="remove every cached kernel").set_defaults(func=cmd_cache_clear)
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SpecError, CompileError, OSError) as exc:
        print(f"bngen: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
