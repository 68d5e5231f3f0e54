"""How many threads a kernel call uses."""

from __future__ import annotations

import os

# The most threads a call may ask for.  OpenMP would try to start any number (and the
# process dies when it cannot: 10**5 crash it), and C takes an int; no machine bngen runs
# on has more CPUs than this.
MAX_THREADS = 1024


def default_threads() -> int:
    """``$OMP_NUM_THREADS`` if set, else the CPUs this process may run on (at most MAX_THREADS)."""
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return min(int(env), MAX_THREADS)
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        count = os.cpu_count() or 1
    return min(count, MAX_THREADS)
