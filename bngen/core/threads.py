"""How many threads a kernel call uses by default, and what happens to that across fork().

libgomp's thread pool does not survive ``os.fork()``: a child forked after the parent
ran a multi-threaded kernel (multiprocessing's default start method on Linux, PyTorch
DataLoader workers) hangs forever in its first parallel region.  So, as PyTorch does,
a forked child runs its kernels single-threaded: `default_threads` is 1 there, and the
kernels it inherited are rebound to that default when it starts.
"""

from __future__ import annotations

import os
import weakref

# The most threads a call may ask for.  OpenMP would try to start any number (and the
# process dies when it cannot: 10**5 crash it), and C takes an int; no machine bngen runs
# on has more CPUs than this.
MAX_THREADS = 1024

_forked = False  # True in a process made by fork() from one that imported bngen
_kernels: "weakref.WeakSet" = weakref.WeakSet()  # live kernels, rebound in a forked child


def default_threads() -> int:
    """The thread count of a call without ``threads=``: 1 in a forked child, else
    ``$OMP_NUM_THREADS`` if set, else the CPUs this process may run on (at most MAX_THREADS)."""
    if _forked:
        return 1
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return min(int(env), MAX_THREADS)
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        count = os.cpu_count() or 1
    return min(count, MAX_THREADS)


def max_threads() -> int:
    """The most threads a call may use: 1 in a forked child (libgomp's pool does not
    survive fork, so a team would hang there), else MAX_THREADS."""
    return 1 if _forked else MAX_THREADS


def track(kernel) -> None:
    """Remember `kernel` (an object with a ``_rebind_threads()`` method) so that a forked
    child rebinds it to the child's default thread count."""
    _kernels.add(kernel)


def _after_fork_in_child() -> None:
    global _forked
    _forked = True
    for kernel in list(_kernels):
        kernel._rebind_threads()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)
