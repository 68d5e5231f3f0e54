"""One rank of a synchronized-batch-norm test, launched by tests/layers/test_distributed.py.

    python _sync_rank.py torch PORT RANK WORLD CONFIG OUTDIR   (torch.distributed, gloo, 127.0.0.1)
    python _sync_rank.py mpi CONFIG OUTDIR                     (under mpiexec; mpi4py)
    python _sync_rank.py bench ...                             (see bngen/tools/bench.py)

CONFIG is a JSON file: the layer's spec, the shard sizes of every rank, the seed and the
distribution of the data, the number of training steps, and `behaviour` (normal, or a
fault to show).  Each rank rebuilds the whole batch from the seed, takes its shard, runs
the steps through bngen.BatchNormalization(synchronized=...) and saves what it got to
OUTDIR/rank<r>.npz; the parent compares.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _sync_support import problem

import bngen
import bngen.distributed


def layer_for(spec: bngen.Spec, params: dict, synchronized):
    """The layer whose training kernel is `spec` (shape (None, ...)), with `params` as weights."""
    weights = [params[n] for n in ("gamma", "beta") if params[n] is not None]
    weights += [params["moving_mean"], params["moving_variance"]]
    return bngen.BatchNormalization(
        axis=spec.axis, momentum=spec.momentum, epsilon=spec.epsilon, center=spec.center, scale=spec.scale,
        mode=spec.mode, unbiased=spec.unbiased, activation=spec.activation, dtype=spec.dtype, weights=weights,
        synchronized=synchronized)


def run(comm, rank: int, config: dict, outdir: Path) -> None:
    spec = bngen.Spec.from_json(config["spec"])
    behaviour = config.get("behaviour", "normal")
    if behaviour == "mismatched_features" and rank == config["world"] - 1:
        tail = list(spec.shape[1:])
        tail[spec.axis[0] - 1] += 1
        spec = spec.replace(shape=(None, *tail))
    if behaviour == "mismatched_dtype" and rank == config["world"] - 1:
        spec = spec.replace(dtype="float64")
    xs, dys, params = problem(spec, config["sizes"], config["seed"], config.get("dist", "normal"))
    x, dy = xs[rank], dys[rank]
    layer = layer_for(spec, params, comm)
    try:
        for step in range(config["steps"]):
            if behaviour == "dead_rank" and rank == config["world"] - 1 and step == 1:
                os._exit(17)  # dies between collectives: the others must fail, not hang
            if behaviour == "stalled_rank" and rank == config["world"] - 1 and step == 1:
                time.sleep(config["stall"])  # alive but silent: the others' collective times out
                os._exit(18)
            y = layer(x, training=True)
        dx = layer.backward(dy)
    except bngen.distributed.SynchronizationError as error:
        (outdir / f"rank{rank}.error").write_text(f"SynchronizationError: {error}")
        return
    tape = layer._tape
    result = dict(y=y, mean=tape["mean"], variance=tape["variance"], moving_mean=layer.moving_mean,
                  moving_variance=layer.moving_variance, dx=dx)
    result.update({k: v for k, v in (("dgamma", layer.dgamma), ("dbeta", layer.dbeta)) if v is not None})
    np.savez(outdir / f"rank{rank}.npz", **{k: np.asarray(v, np.float64) for k, v in result.items()})


def main(argv) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if argv[1] == "torch":
        import datetime

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        port, rank, world, config, outdir = int(argv[2]), int(argv[3]), int(argv[4]), argv[5], argv[6]
        config = json.loads(Path(config).read_text())
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=config.get("timeout", 60)))
        try:
            synchronized = True if config.get("synchronized_true") else bngen.distributed.TorchDistributed()
            run(synchronized, rank, config, Path(outdir))
        finally:
            if config.get("behaviour") not in ("dead_rank", "stalled_rank"):
                dist.destroy_process_group()
        return 0
    if argv[1] == "mpi":
        comm = bngen.distributed.MPI()
        config = json.loads(Path(argv[2]).read_text())
        run(comm, comm.rank, config, Path(argv[3]))
        return 0
    raise SystemExit(f"unknown engine {argv[1]!r}")


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
