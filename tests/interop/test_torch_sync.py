"""bngen.torch.SyncBatchNorm across 2 real processes (gloo on 127.0.0.1) against
torch.nn.BatchNorm2d on the concatenated batch: outputs, input gradients (global), the
sum of the ranks' weight and bias gradients (each rank keeps its own, as torch's
SyncBatchNorm does), running statistics on every rank, and eval outputs.  Two layouts:
NCHW float64 and channels_last float32.  Specs compiled: 4 (shared with other tests).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():  # pragma: no cover - torch built without distributed
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from bngen.tools.bench_distributed import free_loopback_port  # noqa: E402 - after torch is known to be there

WORKER = Path(__file__).with_name("_sync_worker.py")
WORLD = 2
TIMEOUT = 240


def _launch(tmp_path):
    """Runs the WORLD ranks on a free port; ``(procs, logs, outs)``.  Every rank is killed
    if it outlives TIMEOUT."""
    port = free_loopback_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2])] + sys.path),
               OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")  # gloo's pair sockets on the loopback too
    outs = [tmp_path / f"rank{r}.pt" for r in range(WORLD)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), str(WORLD), str(port), str(outs[r])], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(WORLD)]
    try:
        logs = [p.communicate(timeout=TIMEOUT)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return procs, logs, outs


def test_sync_batch_norm_across_two_processes_equals_batch_norm_on_the_whole_batch(tmp_path):
    procs, logs, outs = _launch(tmp_path)
    if any(p.returncode for p in procs) and any("Address already in use" in log for log in logs):
        procs, logs, outs = _launch(tmp_path)  # another test took the free port first: once more, on another
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log}"
    ranks = [torch.load(o) for o in outs]
    for name, dtype, fmt, tol in (("nchw", torch.float64, torch.contiguous_format, 1e-10),
                                  ("channels_last", torch.float32, torch.channels_last, 2e-5)):
        parts = [r[name] for r in ranks]
        g = torch.Generator().manual_seed(7)
        sizes = [p["size"] for p in parts]
        x = torch.randn(sum(sizes), 4, 5, 6, generator=g, dtype=torch.float64) * 2 + 1
        dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
        bn = torch.nn.BatchNorm2d(4, momentum=0.3, dtype=dtype)
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(0.5, 1.5, 4))
            bn.bias.copy_(torch.linspace(-1, 1, 4))
        xx = x.to(dtype).contiguous(memory_format=fmt).requires_grad_()
        y = bn(xx)
        y.backward(dy.to(dtype))
        close = functools.partial(torch.testing.assert_close, atol=tol, rtol=tol)
        close(torch.cat([p["y"] for p in parts]), y.detach())
        close(torch.cat([p["dx"] for p in parts]), xx.grad)
        close(sum(p["dweight"] for p in parts), bn.weight.grad)
        close(sum(p["dbias"] for p in parts), bn.bias.grad)
        assert all(p["y_last"] for p in parts)  # the output keeps the input's memory format
        for p in parts:
            close(p["running_mean"], bn.running_mean)
            close(p["running_var"], bn.running_var)
        bn.eval()
        with torch.no_grad():
            close(torch.cat([p["eval"] for p in parts]), bn(xx.detach()))
