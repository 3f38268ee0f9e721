"""Per-step agreement cost: what the training step's checks add, per optimizer step.

    torchrun --standalone --nproc_per_node=2 -m eval.bench_sync          # 2 processes (gloo on CPU, NCCL on GPUs)
    python -m eval.bench_sync --params 400e6                            # one process: the host sync alone

Rows (median over ``--iters``, after warm-up):
- ``all_reduce(2) + read``: the one small collective the numerics guard, the preemption flag and the
  time limit share, and the data loader's vote (train/callbacks/numerics.py, data/loader.py
  RankSyncedLoader), each followed by reading the result on the host: what a step costs where the
  guard reads its flags at once (on CUDA with the fused AdamW it reads them a step later, and the data
  vote runs on the CPU);
- ``grad norms + read``: the numerics guard's check of ``--params`` gradient elements (fused per-tensor
  norms, one host read), the part that grows with the model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from train.perf import synchronize


def timed(fn, device: torch.device, iters: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        fn()  # each ends with a host read: the time includes waiting for the device
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.bench_sync", description=__doc__.split("\n")[0])
    parser.add_argument("--params", type=float, default=50e6, help="gradient elements the guard checks")
    parser.add_argument("--tensors", type=int, default=200, help="in this many gradient tensors")
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    flags = torch.zeros(2, device=device)

    def agree() -> None:
        if world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        flags.tolist()

    per = max(int(args.params) // args.tensors, 1)
    grads = [torch.randn(per, device=device) for _ in range(args.tensors)]

    def guard() -> None:
        norms = torch.stack(torch._foreach_norm(grads))
        bool(torch.isfinite(norms).all())

    rows = [
        ("all_reduce(2) + read", timed(agree, device, args.iters)),
        (
            f"grad norms of {per * args.tensors / 1e6:.0f}M + read",
            timed(guard, device, max(args.iters // 10, 5)),
        ),
    ]
    if world == 1 or dist.get_rank() == 0:
        name = torch.cuda.get_device_name(device) if cuda else "cpu"
        print(f"# bench_sync: {world} process(es), {name}, torch {torch.__version__}")
        print("| per optimizer step | µs (median) |\n|---|---|")
        for label, seconds in rows:
            print(f"| {label} | {seconds * 1e6:.0f} |")
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
