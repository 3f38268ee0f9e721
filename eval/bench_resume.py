"""Resume cost against the position in the epoch: the data side of a restart, from a simulated object store.

    python -m eval.bench_resume                        # 48 shards x 250 samples through a throttled pipe:
    python -m eval.bench_resume --rate 2e6 --latency 0.2 --json out.json

Writes synthetic shards, reads them as ``pipe:python -m eval.throttled_cat ...`` (a first-byte latency
and a capped rate per shard, like an object store), runs one epoch through the training loader
(``ShardDataset`` + ``RankSyncedLoader``, the DataModule's loader) at full speed and keeps the data
position a checkpoint would hold at 0%, 50% and 90% of it. For each, a fresh loader restores that
position and the table gives the seconds from building the loader to the first batch (loader workers
started, shards opened, samples read back, the first batch decoded), the shards opened and the bytes
read before that batch, and checks the batch is the one the uninterrupted epoch trained next. The
``replay`` columns resume the same positions without cursors, the way checkpoints from before them
(and the framework before them) resume: every sample drawn this epoch is read again and discarded.
Model and checkpoint loading are not included: their cost does not depend on the position.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from data.datamodule import RankSyncedLoader
from data.pipeline import ShardDataset
from data.synthetic import write_shards


def loader_for(spec: str, args) -> RankSyncedLoader:
    ds = ShardDataset(
        spec,
        batch_size=args.batch,
        image_size=args.image_size,
        shuffle_buffer=args.buffer,
        seed=args.seed,
        drop_last=True,
    )
    return RankSyncedLoader(
        torch.utils.data.DataLoader(
            ds, batch_size=None, num_workers=args.workers, generator=torch.Generator(), prefetch_factor=2
        )
    )


def reference_epoch(spec: str, args, stops: list[int]) -> tuple[list[list[str]], dict[int, dict]]:
    """The uninterrupted epoch's batches (keys) and the position saved after ``stops`` batches."""
    loader = loader_for(spec, args)
    batches, states = [], {0: copy.deepcopy(loader.position_state())}
    for n, batch in enumerate(loader, start=1):
        loader.mark_consumed()
        batches.append(batch["__key__"])
        if n in stops:
            states[n] = copy.deepcopy(loader.position_state())
    return batches, states


def without_cursors(state: dict) -> dict:
    state = copy.deepcopy(state)
    for stream in state["streams"].values():
        stream.pop("cursor", None)
    return state


def first_batch(spec: str, args, state: dict, log_path: Path) -> tuple[float, list[str], int, int]:
    """Seconds to the first batch after restoring ``state``; its keys; shards opened and bytes read."""
    log_path.write_text("")
    loader = loader_for(spec, args)
    start = time.perf_counter()
    loader.restore(state)
    iterator = iter(loader)
    batch = next(iterator)
    seconds = time.perf_counter() - start
    reads = [line.split() for line in log_path.read_text().splitlines()]
    del iterator  # stops the loader workers (their pipes end early)
    return seconds, batch["__key__"], len(reads), sum(int(n) for _, n in reads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.bench_resume", description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=48)
    parser.add_argument("--shard-size", type=int, default=250, help="samples per shard")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--buffer", type=int, default=200, help="shuffle buffer (samples per stream)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="loader workers")
    parser.add_argument("--rate", type=float, default=4e6, help="bytes/s per shard read")
    parser.add_argument("--latency", type=float, default=0.1, help="seconds to the first byte of a shard")
    parser.add_argument("--fractions", default="0,0.5,0.9")
    parser.add_argument("--repeats", type=int, default=3, help="restarts per position (median)")
    parser.add_argument("--no-replay", action="store_true", help="skip the replay columns")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", default=None, help="where to write the shards (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)

    tmp = tempfile.TemporaryDirectory(prefix="bench_resume_")
    root = Path(args.dir or tmp.name)
    shard_dir = root / "shards"
    if not (shard_dir / "sizes.json").exists():
        write_shards(shard_dir, args.shards * args.shard_size, image_size=args.image_size,
                     shard_size=args.shard_size)  # fmt: skip
    tars = sorted(shard_dir.glob("*.tar"))
    log_path = root / "reads.txt"
    last = f"{len(tars) - 1:05d}"
    spec = (
        f"pipe:{sys.executable} -m eval.throttled_cat --rate {args.rate:g} --latency {args.latency:g} "
        f"--log {log_path} {shard_dir}/{{00000..{last}}}.tar"
    )
    total_bytes = sum(p.stat().st_size for p in tars)

    os.environ["UNCLIP_THROTTLE"] = "off"  # the reference epoch at full speed
    fractions = [float(f) for f in args.fractions.split(",")]
    probe, _ = reference_epoch(spec, args, [])
    stops = {f: round(f * len(probe)) for f in fractions}
    batches, states = reference_epoch(spec, args, sorted(set(stops.values()) - {0}))
    if batches != probe:
        raise SystemExit("two uninterrupted epochs differ: the data order is not deterministic")
    os.environ["UNCLIP_THROTTLE"] = "on"

    rows = []
    for fraction in fractions:
        stop = stops[fraction]
        row = {"position": fraction, "batch": stop}
        for name, state in (("cursor", states[stop]), ("replay", without_cursors(states[stop]))):
            if name == "replay" and (args.no_replay or stop == 0):
                continue
            runs = [first_batch(spec, args, state, log_path) for _ in range(args.repeats)]
            if any(keys != batches[stop] for _, keys, _, _ in runs):
                raise SystemExit(f"resuming at batch {stop} ({name}) did not continue with the next batch")
            row[f"{name}_s"] = statistics.median(r[0] for r in runs)
            row[f"{name}_shards"] = runs[0][2]
            row[f"{name}_mb"] = runs[0][3] / 1e6
        rows.append(row)

    base = rows[0]["cursor_s"]
    print(
        f"{len(tars)} shards x {args.shard_size} samples ({total_bytes / 1e6:.1f} MB), {len(batches)} batches "
        f"of {args.batch}; {args.workers} workers, shuffle buffer {args.buffer}; each shard read at "
        f"{args.rate / 1e6:g} MB/s after {args.latency:g} s; median of {args.repeats} restarts\n"
    )
    print(
        "| position | batch | s to first batch | vs 0% | shards opened | MB read | replay: s | shards | MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        replay = (
            f"{r['replay_s']:.2f} | {r['replay_shards']} | {r['replay_mb']:.1f}"
            if "replay_s" in r
            else "- | - | -"
        )
        print(
            f"| {r['position']:.0%} | {r['batch']} | {r['cursor_s']:.2f} | {r['cursor_s'] / base:.2f}x | "
            f"{r['cursor_shards']} | {r['cursor_mb']:.1f} | {replay} |"
        )
    print("\nevery restart continued with the batch the uninterrupted epoch trained next")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
