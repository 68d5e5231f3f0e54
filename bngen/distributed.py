"""Synchronized batch norm: statistics over the union of every process's batch.

bngen moves no bytes between processes itself.  Its kernels compute each rank's partial
statistics (`Kernel.moments`, `Kernel.backward_sums`: O(C) float64 values), and a
*communicator* -- an adapter over an engine the program already runs -- gathers them.
A communicator is any object with one method::

    allgather(array) -> list of arrays, one per rank, in rank order

It is collective: every rank calls it in the same order with a float64 NumPy array of
the same shape, so adapters may use fixed-size all-gathers.  `TorchDistributed` and
`MPI` adapt torch.distributed and mpi4py; each imports its engine only when created.

The gathered parts are merged in rank order -- moments with Chan's formula, gradient
sums by addition -- so every rank computes the same statistics, moving averages and
parameter gradients, bit for bit.  Before each exchange the ranks gather a small header
(number of features, dtype, a digest of the layer's spec, which phase this is): ranks
that disagree all raise `SynchronizationError` instead of mixing statistics of
different layers.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, List, Sequence

import numpy as np

from .core.errors import SynchronizationError
from .core.spec import DTYPES, Spec
from .statistics import merge_moments

__all__ = ["TorchDistributed", "MPI", "SynchronizationError", "allreduce_moments", "allreduce_sums", "resolve"]

# The phase a header announces: ranks in different phases (one in a forward, another in a
# backward) would otherwise exchange arrays of different meaning.
_PHASES = {"moments": 1.0, "sums": 2.0}



class TorchDistributed:
    """torch.distributed as a communicator (gloo on CPU; any backend that all-gathers CPU
    tensors).  The process group must be initialised (``init_process_group``); `group`
    is the process group to use, None for the default one."""

    def __init__(self, group: Any = None):
        import torch
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group "
                               "(e.g. backend='gloo') in every process before synchronising batch norm")
        self._torch, self._dist, self.group = torch, dist, group

    @property
    def rank(self) -> int:
        return self._dist.get_rank(self.group)

    @property
    def size(self) -> int:
        return self._dist.get_world_size(self.group)

    def allgather(self, array: np.ndarray) -> List[np.ndarray]:
        """Every rank's `array`, in rank order."""
        tensor = self._torch.from_numpy(np.ascontiguousarray(array))
        parts = [self._torch.empty_like(tensor) for _ in range(self.size)]
        self._dist.all_gather(parts, tensor, group=self.group)
        return [p.numpy() for p in parts]


class MPI:
    """MPI (through mpi4py) as a communicator; `comm` defaults to ``MPI.COMM_WORLD``."""

    def __init__(self, comm: Any = None):
        if comm is None:
            from mpi4py import MPI as mpi

            comm = mpi.COMM_WORLD
        self.comm = comm

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    @property
    def size(self) -> int:
        return self.comm.Get_size()

    def allgather(self, array: np.ndarray) -> List[np.ndarray]:
        """Every rank's `array`, in rank order."""
        array = np.ascontiguousarray(array)
        out = np.empty((self.size,) + array.shape, array.dtype)
        self.comm.Allgather(array, out)
        return list(out)


def resolve(synchronized: Any):
    """The communicator a layer's ``synchronized=`` argument means: None or False for
    none, True for `TorchDistributed` (torch.distributed must be initialised), else the
    object itself, which must have an ``allgather`` method."""
    if synchronized is None or synchronized is False:
        return None
    if synchronized is True:
        try:
            import torch.distributed as dist
        except ImportError:
            raise RuntimeError("synchronized=True uses torch.distributed, but torch is not installed; "
                               "pass a communicator (bngen.distributed.MPI(), or your own)") from None
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("synchronized=True uses torch.distributed, which is not initialised: call "
                               "torch.distributed.init_process_group first, or pass a communicator")
        return TorchDistributed()
    if not callable(getattr(synchronized, "allgather", None)):
        raise TypeError(f"synchronized: {type(synchronized).__name__} has no allgather(array) method; pass None, "
                        "True (torch.distributed) or a communicator such as bngen.distributed.MPI()")
    return synchronized


def allreduce_moments(comm: Any, spec: Spec, moments: np.ndarray) -> np.ndarray:
    """The moments of every rank's batch merged in rank order ((3, C) float64); `moments`
    is this rank's (`Kernel.moments`), `spec` its kernel's."""
    return merge_moments(_gather(comm, spec, "moments", moments))


def allreduce_sums(comm: Any, spec: Spec, sums: np.ndarray) -> np.ndarray:
    """Every rank's gradient sums (`Kernel.backward_sums`), added in rank order."""
    parts = _gather(comm, spec, "sums", sums)
    total = parts[0].copy()
    for part in parts[1:]:
        total += part
    return total


def spec_digest(spec: Spec) -> int:
    """48 bits of a digest of what ranks must share: every field of `spec` but the sizes
    of the axes statistics are taken over (ranks may hold different batches)."""
    fields = spec.to_dict()
    fields["shape"] = [d if a in spec.axis else None for a, d in enumerate(spec.shape)]
    text = json.dumps(fields, sort_keys=True)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:6], "big")


def _gather(comm: Any, spec: Spec, phase: str, array: np.ndarray) -> List[np.ndarray]:
    """`array` of every rank, after every rank has checked, from a fixed-size header, that
    all are in the same phase of the same layer (or raised, all of them)."""
    header = np.array([_PHASES[phase], spec.channels, DTYPES.index(spec.dtype), spec_digest(spec)], np.float64)
    headers = _call(comm, header, (4,))
    if any(not np.array_equal(h, header) for h in headers):
        raise SynchronizationError(f"ranks disagree on the layer they synchronise: {_describe(headers)}")
    return _call(comm, np.ascontiguousarray(array, np.float64), array.shape)


def _call(comm: Any, array: np.ndarray, shape: Sequence[int]) -> List[np.ndarray]:
    parts = comm.allgather(array)
    parts = [np.asarray(p, np.float64).reshape(shape) for p in parts]
    if not parts:
        raise SynchronizationError("the communicator's allgather returned no arrays")
    return parts


def _describe(headers: List[np.ndarray]) -> str:
    phases = {v: k for k, v in _PHASES.items()}
    return "; ".join(
        f"rank {rank}: {phases.get(float(h[0]), '?')}, {int(h[1])} features, "
        f"{DTYPES[int(h[2])] if 0 <= int(h[2]) < len(DTYPES) else '?'}, spec {int(h[3]):012x}"
        for rank, h in enumerate(headers))
