"""One rank of the SyncBatchNorm test (tests/interop/test_torch_sync.py): run as
``python _sync_worker.py RANK WORLD PORT OUT.pt``.

Every rank makes the same full batch from a fixed seed and takes its slice of it; two
training steps (NCHW float64, then channels_last float32) and one eval step of a bngen
SyncBatchNorm; it saves its outputs, input gradients, weight and bias gradients and
running statistics for the parent to compare with torch.nn.BatchNorm2d on the full batch.
"""

import sys

import torch
import torch.distributed as dist

import bngen.torch as bnt


def main(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {}
        for dtype, fmt, name in ((torch.float64, torch.contiguous_format, "nchw"),
                                 (torch.float32, torch.channels_last, "channels_last")):
            g = torch.Generator().manual_seed(7)
            sizes = [3 + r for r in range(world)]  # unequal slices: the merge weighs by count
            x = torch.randn(sum(sizes), 4, 5, 6, generator=g, dtype=torch.float64) * 2 + 1
            dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
            start = sum(sizes[:rank])
            bn = bnt.SyncBatchNorm(4, momentum=0.3, dtype=dtype)
            with torch.no_grad():
                bn.weight.copy_(torch.linspace(0.5, 1.5, 4))
                bn.bias.copy_(torch.linspace(-1, 1, 4))
            local = x[start:start + sizes[rank]].to(dtype).contiguous(memory_format=fmt).requires_grad_()
            y = bn(local)
            y.backward(dy[start:start + sizes[rank]].to(dtype))
            bn.eval()
            results[name] = dict(y=y.detach(), y_last=y.is_contiguous(memory_format=fmt), dx=local.grad,
                                 dweight=bn.weight.grad, dbias=bn.bias.grad, running_mean=bn.running_mean,
                                 running_var=bn.running_var, eval=bn(local.detach()), start=start,
                                 size=sizes[rank])
        torch.save(results, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
