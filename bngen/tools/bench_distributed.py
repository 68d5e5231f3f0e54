"""`bngen bench --distributed N`: a synchronized training step on N local processes.

Each case's batch is split over N processes (torch.distributed, gloo over 127.0.0.1,
one thread each) that run the training forward and backward through the split phases,
as `BatchNormalization(synchronized=...)` does.  Every rank times, step by step, the
kernels (moments, normalize, backward_sums, backward_apply) and the collectives (the
all-gathers of the moments and of the gradient sums, each with its header); the report
gives, per case, the slowest rank's median of each beside the single-process fused
forward + backward on the whole batch (one thread).  The collective moves O(C) values,
so for large tensors it should cost less than the kernels; its time includes waiting in
the all-gather for the slowest rank (each step starts at a barrier).  On one machine the
ranks share its cores, so read the kernel times as a functional check, not a speed-up.

Run as a module, it is one rank: ``python -m bngen.tools.bench_distributed PORT RANK N CONFIG OUT``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Sequence

import numpy as np

from ..core.spec import Spec
from ..jit.build import build
from ..jit.kernel import numpy_dtype
from .bench import Case, measure, summary

# Seconds a launch of N ranks may take before it is killed.
LAUNCH_TIMEOUT = 900
PHASES = ("moments", "allgather moments", "normalize", "backward_sums", "allgather sums", "backward_apply")
COLLECTIVES = ("allgather moments", "allgather sums")


def _spec(case: Case, batch=None) -> Spec:
    """The training spec of a case; batch None: the dynamic batch axis a synchronized layer uses."""
    return Spec(shape=(batch,) + tuple(case.shape[1:]), axis=case.axis, dtype=case.dtype, epsilon=1e-3, momentum=0.9)


def _inputs(case: Case, seed: int = 0):
    rng = np.random.default_rng(seed)
    dtype = numpy_dtype(case.dtype)
    c = case.shape[case.axis]
    pd = np.float64 if case.dtype == "float64" else np.float32
    x = (rng.standard_normal(case.shape) * 2 + 0.5).astype(dtype)
    dy = rng.standard_normal(case.shape).astype(dtype)
    return x, dy, rng.uniform(0.5, 1.5, c).astype(pd), rng.standard_normal(c).astype(pd)


def run(cases: Sequence[Case], ranks: int, repeat: int = 21, cache_dir=None,
        progress: Callable[[str], None] = lambda s: None) -> dict:
    """Times each case on `ranks` processes and in one; returns the report."""
    rows = []
    for case in cases:
        progress(f"{case.name}: single process")
        single = build(_spec(case, case.shape[0]), cache_dir)
        build(_spec(case), cache_dir, split=True)  # compiled here, loaded from the cache by every rank
        x, dy, gamma, beta = _inputs(case)
        mm, mv = np.zeros_like(gamma), np.ones_like(gamma)

        def step():
            _, mean, var = single.forward(x, gamma, beta, mm, mv, threads=1)
            single.backward(dy, x, gamma, mean, var, threads=1)

        fused = summary(measure({"step": step}, repeat)["step"])["median_ms"]
        progress(f"{case.name}: {ranks} processes")
        per_rank = launch(case, ranks, repeat, cache_dir)
        slowest = {phase: max(r[phase] for r in per_rank) for phase in PHASES + ("step",)}
        rows.append(dict(case=case.name, ranks=ranks, single_ms=fused, phases_ms=slowest,
                         kernels_ms=sum(slowest[p] for p in PHASES if p not in COLLECTIVES),
                         collective_ms=sum(slowest[p] for p in COLLECTIVES), step_ms=slowest["step"]))
    return {"ranks": ranks, "repeat": repeat, "rows": rows}


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for torch.distributed's store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(case: Case, ranks: int, repeat: int, cache_dir=None) -> List[dict]:
    """Runs the ranks; returns each one's median milliseconds per phase (and per step)."""
    with tempfile.TemporaryDirectory(prefix="bngen-bench-") as tmp:
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps(dict(name=case.name, shape=list(case.shape), axis=case.axis, dtype=case.dtype,
                                          repeat=repeat, cache_dir=None if cache_dir is None else str(cache_dir))))
        port = free_loopback_port()
        env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")  # every socket on the loopback
        procs = [subprocess.Popen([sys.executable, "-m", "bngen.tools.bench_distributed", str(port), str(rank), str(ranks),
                                   str(config), tmp], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for rank in range(ranks)]
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        try:
            for p in procs:
                out, _ = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
                if p.returncode != 0:
                    raise RuntimeError(f"bench rank failed (exit {p.returncode}):\n{out}")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(ranks)]


def rank_main(port: int, rank: int, ranks: int, config_path: str, out: str) -> None:
    """One rank: its shard of the case, `repeat` timed synchronized steps after two untimed."""
    import datetime

    import torch
    import torch.distributed as dist

    from .. import distributed

    torch.set_num_threads(1)
    config = json.loads(Path(config_path).read_text())
    case = Case(config["name"], tuple(config["shape"]), config["axis"], config["dtype"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ranks,
                            timeout=datetime.timedelta(seconds=300))
    try:
        comm = distributed.TorchDistributed()
        kernel = build(_spec(case), config["cache_dir"], split=True)
        x, dy, gamma, beta = _inputs(case)
        x, dy = np.array_split(x, ranks)[rank], np.array_split(dy, ranks)[rank]
        mm, mv = np.zeros_like(gamma), np.ones_like(gamma)
        spec = kernel.spec
        times = {phase: [] for phase in PHASES + ("step",)}
        for i in range(config["repeat"] + 2):
            dist.barrier()
            t = [time.perf_counter()]
            local = kernel.moments(x, threads=1)
            t.append(time.perf_counter())
            merged = distributed.allreduce_moments(comm, spec, local)
            t.append(time.perf_counter())
            kernel.normalize(x, gamma, beta, mm, mv, moments=merged, threads=1)
            t.append(time.perf_counter())
            mean, var = merged[1], np.maximum(merged[2], 0) / merged[0]
            sums = kernel.backward_sums(dy, x, mean, var, threads=1)
            t.append(time.perf_counter())
            sums = distributed.allreduce_sums(comm, spec, sums)
            t.append(time.perf_counter())
            kernel.backward_apply(dy, x, gamma, mean, var, sums=sums, count=merged[0, 0], threads=1)
            t.append(time.perf_counter())
            if i >= 2:
                for phase, a, b in zip(PHASES, t, t[1:]):
                    times[phase].append(b - a)
                times["step"].append(t[-1] - t[0])
        medians = {phase: summary(v)["median_ms"] for phase, v in times.items()}
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(medians))
    finally:
        dist.destroy_process_group()


def markdown(report: dict) -> str:
    """The report as a markdown table (milliseconds, slowest rank's medians)."""
    n = report["ranks"]
    lines = [f"| case | 1 process, fused fwd+bwd | {n} processes: step | kernels | collective (2 all-gathers) |",
             "|---|---|---|---|---|"]
    for row in report["rows"]:
        lines.append(f"| {row['case']} | {row['single_ms']:.3f} | {row['step_ms']:.3f} | {row['kernels_ms']:.3f} "
                     f"| {row['collective_ms']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    rank_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
