"""Data-pipeline benchmark: samples/s of the streaming pipeline on synthetic shards.

    python -m eval.bench_data [--samples 4000] [--sizes 64 256] [--workers 0 1 2] [--batch 64]

Writes synthetic shards (once per size, into --dir or a temporary directory), then times full passes of
ShardDataset + DataLoader (tar read, shuffle, JPEG decode, resize + random crop, tokenise, batch) and
prints a table. The first batch (worker start-up) is excluded from the timing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader

from data.pipeline import ShardDataset
from data.shards import iter_captions
from data.synthetic import write_shards
from data.tokenizer import train_bpe


def time_pass(ds: ShardDataset, workers: int) -> tuple[int, float]:
    loader = DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None)
    n, start = 0, None
    for batch in loader:
        if start is None:
            start = time.perf_counter()  # exclude worker start-up and the first batch
            continue
        n += len(batch["__key__"])
    return n, time.perf_counter() - (start or time.perf_counter())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.bench_data", description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dir", type=Path, default=None, help="where to write the shards (default: a temp dir)")
    args = p.parse_args(argv)
    root = args.dir or Path(tempfile.mkdtemp(prefix="bench_data_"))
    rows = []
    for size in args.sizes:
        shards = root / f"shapes{size}"
        if not (shards / "sizes.json").exists():
            write_shards(shards, args.samples, seed=0, image_size=size, shard_size=max(1, args.samples // 8))
        tokenizer = train_bpe(iter_captions(str(shards), 2000), vocab_size=1024, context_length=32)
        for workers in args.workers:
            ds = ShardDataset(
                str(shards), batch_size=args.batch, image_size=size, tokenizer=tokenizer, shuffle_buffer=1000
            )
            n, seconds = time_pass(ds, workers)
            rows.append((size, workers, n, seconds, n / seconds))
    print(f"\n{'image px':>8} {'workers':>7} {'samples':>8} {'seconds':>8} {'samples/s':>10}")
    for size, workers, n, seconds, rate in rows:
        print(f"{size:>8} {workers:>7} {n:>8} {seconds:>8.2f} {rate:>10.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
