"""Synchronized batch norm across processes: bngen.BatchNormalization(synchronized=...) on
real torch.distributed (gloo over 127.0.0.1) and MPI (mpiexec, mpi4py) processes, and on
an in-process communicator of threads.

Every run compares each rank's y, the statistics, the moving averages after several
steps, dx and dgamma/dbeta with the float64 oracle on the concatenated batch, and checks
that the statistics, moving averages and parameter gradients are identical bit for bit
on every rank.  Specs compiled: 4 (in the parent, into the session cache, from which the
workers load them).  Processes launched: 2 + 3 + 4 (gloo) and 3 (MPI) ranks for the
comparisons, plus 2-rank runs for mismatched features, mismatched dtypes, a stalled rank
(gloo's timeout), synchronized=True and `bngen bench --distributed 2`, and 3 ranks with a
dead one; threads: 30 hypothesis examples on each of 2 specs, mismatched specs, and
one-sample ranks with unbiased=True and the cumulative moving average.  Every launch has
a timeout and kills its processes on failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _sync_support import ThreadGroup, check_backward, check_forward, near_kink, problem, shardings
from hypothesis import assume, given, settings

import bngen
import bngen.distributed
from bngen.tools.bench_distributed import free_loopback_port

HERE = Path(__file__).resolve().parents[1]  # tests/, where the rank script lives
WORKER = HERE / "_sync_rank.py"
ROOT = HERE.parent
S = bngen.Spec
TIMEOUT = 240  # seconds per launch: torch's import alone takes seconds on a loaded 2-core machine


def _layer_kernel(spec):
    """Compiles, into the session cache, the kernel a synchronized layer of `spec` builds
    (with the default compiler, as the workers do), so that workers only load it."""
    from _sync_rank import layer_for

    _, _, params = problem(spec, [1], 0)
    layer = layer_for(spec, params, None)
    layer.build((None,) + tuple(spec.shape[1:]))
    kernel = layer.kernel((None,) + tuple(spec.shape[1:]), True)
    assert kernel.spec == spec
    return kernel


# -- launching ---------------------------------------------------------------------------------
def worker_env() -> dict:
    # GLOO_SOCKET_IFNAME=lo: gloo's pair sockets on the loopback too, not the hostname's address
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=os.pathsep.join(
        [str(ROOT), str(HERE)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.setdefault("BNGEN_CACHE_DIR", os.environ["BNGEN_CACHE_DIR"])
    return env


def wait_all(procs, timeout: float, finished=None):
    """Waits for every process; kills them all if any exceeds the deadline.  Returns
    [(returncode, output)], or raises AssertionError on timeout (after the kill).
    `finished`: a list that gets each process's end, in seconds from now (within 0.2 s)."""
    start = time.monotonic()
    deadline = start + timeout
    results = []
    try:
        if finished is not None:  # poll, so that each end is seen when it happens
            ends = {}
            while len(ends) < len(procs):
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired("ranks", timeout)
                for i, p in enumerate(procs):
                    if i not in ends and p.poll() is not None:
                        ends[i] = time.monotonic() - start
                time.sleep(0.2)
            finished.extend(ends[i] for i in range(len(procs)))
        for p in procs:
            out, _ = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            results.append((p.returncode, out))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"ranks still running after {timeout} s (a hang); killed") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def launch_torch(tmp_path: Path, config: dict, timeout: float = TIMEOUT, finished=None):
    world = config["world"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    port = free_loopback_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), "torch", str(port), str(rank), str(world),
                               str(tmp_path / "config.json"), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=worker_env())
             for rank in range(world)]
    return wait_all(procs, timeout, finished)


def mpiexec() -> list:
    """The mpiexec command line; skips without Open MPI and mpi4py, except where
    BNGEN_REQUIRE_TOOLCHAINS is set (CI, which installs them): there it fails."""
    path = shutil.which("mpiexec")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        path = None
    if path is None:
        message = "mpiexec or mpi4py not found (CI installs openmpi-bin and mpi4py)"
        if os.environ.get("BNGEN_REQUIRE_TOOLCHAINS"):
            pytest.fail(message + "; BNGEN_REQUIRE_TOOLCHAINS is set, so they must be")
        pytest.skip(message)
    return [path, "--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])


def launch_mpi(tmp_path: Path, config: dict, timeout: float = TIMEOUT):
    (tmp_path / "config.json").write_text(json.dumps(config))
    cmd = mpiexec() + ["-n", str(config["world"]), sys.executable, str(WORKER), "mpi",
                       str(tmp_path / "config.json"), str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=worker_env(),
                            start_new_session=True)
    try:
        return wait_all([proc], timeout)
    finally:
        if proc.poll() is None:  # pragma: no cover - wait_all killed mpiexec; its ranks are in its session
            os.killpg(proc.pid, 9)


def results(tmp_path: Path, world: int, launched):
    for code, out in launched:
        assert code == 0, f"a rank failed (exit {code}):\n{out}"
    return [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(world)]


# -- comparing -----------------------------------------------------------------------------------
def check_ranks(spec, config, ranks):
    """Every rank's results against the oracle on the concatenated batch, and against each other."""
    xs, dys, params = problem(spec, config["sizes"], config["seed"], config.get("dist", "normal"))
    x, dy = np.concatenate(xs), np.concatenate(dys)
    for name in ("mean", "variance", "moving_mean", "moving_variance", "dgamma", "dbeta"):
        if name in ranks[0]:
            for r, res in enumerate(ranks[1:], 1):
                assert np.array_equal(res[name], ranks[0][name]), f"{name} differs between rank 0 and rank {r}"
    for res, part in zip(ranks, xs):
        assert res["y"].shape == part.shape and res["dx"].shape == part.shape
    moving = (ranks[0]["moving_mean"], ranks[0]["moving_variance"]) if spec.updates_moving_stats else None
    check_forward(spec, x, params, [r["y"] for r in ranks], ranks[0]["mean"], ranks[0]["variance"], moving,
                  config["steps"])
    check_backward(spec, x, dy, params, [r["dx"] for r in ranks], ranks[0].get("dgamma"), ranks[0].get("dbeta"))


def config_for(spec, sizes, seed=1, dist="normal", steps=3, **extra):
    return dict(spec=spec.to_json(), sizes=list(sizes), world=len(sizes), seed=seed, dist=dist, steps=steps, **extra)


# Few specs: each is compiled once, in the parent.
NCHW = S((None, 3, 4, 5), axis=1)  # float32 channels-first
NHWC_F16 = S((None, 2, 2, 6), axis=-1, dtype="float16", activation="relu", unbiased=True, momentum=0.9)
DENSE_F64 = S((None, 7), dtype="float64", scale=False, momentum=0.8)
MODE2 = S((None, 5, 3), axis=1, mode=2, center=False)

TORCH_RUNS = [  # (spec, per-rank batch sizes, data)
    (NCHW, [3, 5], "offset"),  # |mean| = 1e4 x std
    (NHWC_F16, [2, 0, 3], "normal"),  # an empty rank
    (DENSE_F64, [1, 4, 2, 6], "offset"),  # 4 ranks, different sizes
]


@pytest.mark.parametrize("spec,sizes,dist", TORCH_RUNS, ids=lambda v: str(v) if not isinstance(v, S) else v.dtype)
def test_torch_distributed_gloo_matches_the_single_process_oracle(tmp_path, spec, sizes, dist):
    pytest.importorskip("torch")
    _layer_kernel(spec)
    config = config_for(spec, sizes, seed=sum(sizes), dist=dist)
    xs, _, params = problem(spec, sizes, config["seed"], dist)
    assert not near_kink(spec, np.concatenate(xs), params)  # (the seed is fixed: a comparable problem)
    check_ranks(spec, config, results(tmp_path, len(sizes), launch_torch(tmp_path, config)))


def test_synchronized_true_uses_torch_distributed(tmp_path):
    pytest.importorskip("torch")
    _layer_kernel(MODE2)
    config = config_for(MODE2, [2, 3], synchronized_true=True)
    check_ranks(MODE2, config, results(tmp_path, 2, launch_torch(tmp_path, config)))


@pytest.mark.mpi
def test_mpi_matches_the_single_process_oracle(tmp_path):
    cmd = mpiexec()
    assert cmd
    _layer_kernel(NCHW)
    config = config_for(NCHW, [4, 1, 3], dist="offset")
    check_ranks(NCHW, config, results(tmp_path, 3, launch_mpi(tmp_path, config)))


@pytest.mark.parametrize("behaviour", ["mismatched_features", "mismatched_dtype"])
def test_ranks_that_disagree_all_raise(tmp_path, behaviour):
    pytest.importorskip("torch")
    _layer_kernel(DENSE_F64)
    _layer_kernel(DENSE_F64.replace(shape=(None, 8)))
    _layer_kernel(DENSE_F64.replace(dtype="float64"))
    config = config_for(DENSE_F64 if behaviour == "mismatched_features" else DENSE_F64.replace(dtype="float32"),
                        [2, 3], behaviour=behaviour)
    if behaviour == "mismatched_dtype":
        _layer_kernel(DENSE_F64.replace(dtype="float32"))
    launched = launch_torch(tmp_path, config)
    for code, out in launched:
        assert code == 0, out
    for rank in range(2):
        error = (tmp_path / f"rank{rank}.error").read_text()
        assert "SynchronizationError: ranks disagree" in error
        assert ("7 features" in error and "8 features" in error) if behaviour == "mismatched_features" else (
            "float32" in error and "float64" in error)


def test_a_dead_rank_makes_the_others_fail_within_the_timeout(tmp_path):
    pytest.importorskip("torch")
    _layer_kernel(DENSE_F64)
    config = config_for(DENSE_F64, [2, 2, 2], behaviour="dead_rank", timeout=15)
    start = time.monotonic()
    launched = launch_torch(tmp_path, config, timeout=TIMEOUT)
    assert time.monotonic() - start < TIMEOUT
    codes = [code for code, _ in launched]
    assert codes[-1] == 17  # the rank that died
    for code, out in launched[:-1]:  # the others: the engine's error, not a hang and not success
        assert code != 0, out
        assert "RuntimeError" in out, out  # gloo: connection closed or reset by the dead peer


def test_a_stalled_rank_makes_the_others_fail_after_the_gloo_timeout(tmp_path):
    """A rank alive but silent: the others' all-gather gives up after init_process_group's
    timeout (10 s here) with the engine's error, instead of waiting forever."""
    pytest.importorskip("torch")
    _layer_kernel(DENSE_F64)
    config = config_for(DENSE_F64, [2, 2], behaviour="stalled_rank", timeout=10, stall=30)
    finished = []
    launched = launch_torch(tmp_path, config, finished=finished)
    (code0, out0), (code1, _) = launched
    assert code1 == 18 and code0 != 0 and "RuntimeError" in out0, out0
    assert finished[0] < finished[1] - 10, finished  # rank 0 ended well before the stalled rank woke up


def test_importing_bngen_distributed_imports_no_engine():
    code = "import sys, bngen, bngen.distributed; print(sorted(m for m in sys.modules if m in ('torch', 'mpi4py')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=worker_env(), timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_synchronized_true_without_torch_distributed_raises_at_the_first_training_call():
    pytest.importorskip("torch")
    layer = bngen.BatchNormalization(synchronized=True)
    x = np.ones((4, 3), np.float32)
    layer(x, training=False)  # inference needs no communicator
    with pytest.raises(RuntimeError, match="torch.distributed"):
        layer(x, training=True)


def test_a_communicator_without_allgather_is_refused():
    with pytest.raises(TypeError, match="synchronized: object has no allgather"):
        bngen.BatchNormalization(synchronized=object())
    with pytest.raises(ValueError, match="synchronized: mode 1"):
        bngen.BatchNormalization(mode=1, synchronized=True)


# -- an in-process communicator: threads ---------------------------------------------------------
def run_threads(spec, sizes, seed, dist, steps, tweak=None):
    """Each rank in a thread; returns per-rank result dicts (or the exception a rank raised)."""
    from _sync_rank import layer_for

    group = ThreadGroup(len(sizes))
    xs, dys, params = problem(spec, sizes, seed, dist)
    out = [None] * len(sizes)

    def rank_main(rank):
        try:
            x, dy, rank_spec = xs[rank], dys[rank], spec
            if tweak is not None:
                rank_spec, x, dy = tweak(rank, spec, x, dy)
            layer = layer_for(rank_spec, {k: None if v is None else v.copy() for k, v in params.items()},
                              group.communicator(rank))
            for _ in range(steps):
                y = layer(x, training=True)
            dx = layer.backward(dy)
            out[rank] = dict(y=y, mean=layer._tape["mean"], variance=layer._tape["variance"],
                             moving_mean=layer.moving_mean, moving_variance=layer.moving_variance, dx=dx,
                             **{k: v for k, v in (("dgamma", layer.dgamma), ("dbeta", layer.dbeta)) if v is not None})
        except Exception as error:  # reported to the test
            out[rank] = error

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(len(sizes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return out


@pytest.mark.parametrize("spec", [NCHW, NHWC_F16], ids=lambda s: s.dtype)
def test_thread_ranks_match_the_single_process_oracle(spec):
    _layer_kernel(spec)

    @settings(max_examples=30)
    @given(*shardings(4))
    def check(sizes, seed, dist, steps):
        assume(sum(sizes) >= 2)
        xs, _, params = problem(spec, sizes, seed, dist)
        assume(not near_kink(spec, np.concatenate(xs), params))
        ranks = run_threads(spec, sizes, seed, dist, steps)
        for r in ranks:
            if isinstance(r, Exception):
                raise r
        check_ranks(spec, dict(sizes=sizes, seed=seed, dist=dist, steps=steps), ranks)

    check()


def test_thread_ranks_with_another_spec_all_raise():
    _layer_kernel(NCHW)
    eps_spec = NCHW.replace(epsilon=1e-5)
    _layer_kernel(eps_spec)

    def tweak(rank, spec, x, dy):
        return (eps_spec if rank == 1 else spec), x, dy

    ranks = run_threads(NCHW, [2, 2, 2], 3, "normal", 1, tweak)
    for r in ranks:
        assert isinstance(r, bngen.distributed.SynchronizationError), r
        assert "ranks disagree" in str(r)


def test_bench_distributed_runs_a_synchronized_step_on_n_processes(tmp_path):
    """`bngen bench --distributed 2` runs functionally (no timing is asserted: the machine is shared)."""
    pytest.importorskip("torch")
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(S((None, 8, 6, 6), axis=1).to_json())
    report = tmp_path / "report.json"
    paths = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), GLOO_SOCKET_IFNAME="lo")
    done = subprocess.run([sys.executable, "-m", "bngen", "bench", "--distributed", "2", "--spec", str(spec_file),
                           "--batch", "5", "--repeat", "3", "--json", str(report), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert "| 2 processes: step |" in done.stdout
    row = json.loads(report.read_text())["rows"][0]
    assert row["ranks"] == 2 and row["collective_ms"] > 0 and row["kernels_ms"] > 0 and row["single_ms"] > 0


def test_thread_ranks_one_sample_each_unbiased_and_cumulative_moving_average():
    """momentum=None (PyTorch's cumulative average) and unbiased=True count n over every
    rank: ranks of one sample each (n = 1 locally, undefined alone) work together."""
    from _sync_rank import layer_for

    spec = S((None, 7), dtype="float64", unbiased=True)
    _layer_kernel(spec)
    xs, dys, params = problem(spec, [1, 1, 0, 1], 5)
    group, out = ThreadGroup(4), [None] * 4

    def rank_main(rank):
        layer = layer_for(spec, {k: None if v is None else v.copy() for k, v in params.items()},
                          group.communicator(rank))
        layer.momentum = None  # the cumulative average, as BatchNormalization(momentum=None)
        for _ in range(2):
            layer(xs[rank], training=True)
        out[rank] = (layer.moving_mean, layer.moving_variance, layer.num_batches_tracked)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    x = np.concatenate(xs)
    for mm, mv, tracked in out:
        assert tracked == 2 and np.array_equal(mm, out[0][0]) and np.array_equal(mv, out[0][1])
    np.testing.assert_allclose(out[0][0], x.mean(axis=0), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(out[0][1], x.var(axis=0, ddof=1), rtol=1e-12)
