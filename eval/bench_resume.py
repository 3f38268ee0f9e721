"""Resume cost against the position in the epoch: the data side of a restart, from a simulated object store.

    python -m eval.bench_resume --end-to-end           # 24 shards x 500 samples through a throttled pipe:
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

``--end-to-end`` adds what a requeued job sees: ``python -m train.run`` (the tiny CLIP) launched from a
checkpoint holding each of those positions, seconds from the process start to its first training batch
(as the run logs it), model, checkpoint and tokenizer loading included.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from data.loader import RankSyncedLoader
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


def reference_epoch(spec: str, args) -> tuple[list[list[str]], list[dict]]:
    """The uninterrupted epoch's batches (keys), and the position a checkpoint holds after each count of
    trained batches (0 .. all)."""
    loader = loader_for(spec, args)
    batches, states = [], [copy.deepcopy(loader.position_state())]
    for batch in loader:
        loader.mark_consumed()
        batches.append(batch["__key__"])
        states.append(copy.deepcopy(loader.position_state()))
    return batches, states


def without_cursors(state: dict) -> dict:
    state = copy.deepcopy(state)
    for stream in state["streams"].values():
        stream.pop("cursor", None)
    return state


def first_batch(spec: str, args, state: dict, log_path: Path) -> tuple[float, list[str], int, int]:
    """Seconds to the first batch after restoring ``state``, its keys, the shards opened before it, and
    the bytes read by the restart (the loader is stopped right after that batch; its prefetch counts)."""
    log_path.write_text("")
    loader = loader_for(spec, args)
    start = time.perf_counter()
    loader.restore(state)
    iterator = iter(loader)
    batch = next(iterator)
    seconds = time.perf_counter() - start
    opened = log_path.read_text().count("open ")
    del iterator  # stops the loader workers; their pipes end early and log what they sent
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = log_path.read_text().splitlines()
        if sum(line.startswith("done ") for line in lines) >= sum(line.startswith("open ") for line in lines):
            break
        time.sleep(0.05)
    sent = sum(int(line.split()[-1]) for line in lines if line.startswith("done "))
    return seconds, batch["__key__"], opened, sent


FIRST_BATCH = re.compile(r"first training batch \(step \d+\) ([0-9.]+) s after the process started")


def end_to_end(spec: str, args, root: Path, states: dict[int, dict]) -> dict[int, float]:
    """Seconds from launch to the first trained batch of ``python -m train.run`` resumed at each position:
    one real checkpoint (a 1-step run) carrying each saved data position in place of its own."""
    overrides = [
        "stage=clip",
        "data=shards",
        f"data.train_shards='{spec}'",  # quoted: braces and spaces
        "data.val_shards=null",
        "data.tokenizer.kind=bpe",
        "data.tokenizer.vocab_size=1024",
        f"data.tokenizer.path={root / 'tokenizer.json'}",
        f"data.num_workers={args.workers}",
        f"data.global_batch_size={args.batch}",
        f"data.shuffle_buffer={args.buffer}",
        f"seed={args.seed}",
        "logger=none",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.val_check_interval=null",
        "trainer.limit_val_batches=0",
        "callbacks.checkpoint.every_n_train_steps=1",
    ]

    def launch(run: str, *extra: str, throttle: str) -> str:
        env = {**os.environ, "UNCLIP_THROTTLE": throttle, "OMP_NUM_THREADS": "1"}
        out = subprocess.run(
            [sys.executable, "-m", "train.run", *overrides, f"paths.output_dir={root / run}", *extra],
            env=env,
            capture_output=True,
            text=True,
        )
        if out.returncode:
            raise SystemExit(f"train.run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return out.stdout + out.stderr

    launch("first", "trainer.max_steps=2", "resume=null", throttle="off")  # saves step 1 mid-epoch
    checkpoint = torch.load(root / "first" / "checkpoints" / "step0000001.ckpt", weights_only=False)
    key = next(
        k for k, v in checkpoint.items() if isinstance(v, dict) and v.get("version") == 2 and "ranks" in v
    )
    seconds = {}
    for stop, state in states.items():
        for name, position in (("cursor", state), ("replay", without_cursors(state))):
            if name == "replay" and (args.no_replay or stop == 0):
                continue
            checkpoint[key] = {**checkpoint[key], "ranks": [position]}
            path = root / f"resume_{stop}_{name}.ckpt"
            torch.save(checkpoint, path)
            runs = []
            for i in range(args.repeats):
                text = launch(f"{name}_{stop}_{i}", f"resume={path}", "trainer.max_steps=2", throttle="on")
                if stop and "data: resuming epoch" not in text:
                    raise SystemExit(f"the run did not resume the data position:\n{text[-3000:]}")
                match = FIRST_BATCH.search(text)
                if match is None:
                    raise SystemExit(f"no 'first training batch' line in the run's log:\n{text[-3000:]}")
                runs.append(float(match.group(1)))
            seconds[stop, name] = statistics.median(runs)
    return seconds


def restarts(spec: str, args, log_path: Path) -> tuple[list[dict], list[list[str]], list[dict]]:
    """One row per position: the data restart with cursors and by replay. Also the uninterrupted epoch's
    batches and the positions saved in it."""
    os.environ["UNCLIP_THROTTLE"] = "off"  # the reference epoch at full speed
    fractions = [float(f) for f in args.fractions.split(",")]
    batches, states = reference_epoch(spec, args)  # each restart below checks it continues this epoch
    stops = {f: round(f * len(batches)) for f in fractions}
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
    return rows, batches, states


def print_table(rows: list[dict], args, header: str) -> None:
    print(header + "\n")
    launch = "launch to first batch (s) | vs 0% | replay | " if args.end_to_end else ""
    print(f"| position | batch | {launch}data: s to first batch | vs 0% | shards opened | MB read | "
          "replay: s | shards | MB |")  # fmt: skip
    print("|---" * (9 + 3 * args.end_to_end) + "|")
    for r in rows:
        replay = "- | - | -"
        if "replay_s" in r:
            replay = f"{r['replay_s']:.2f} | {r['replay_shards']} | {r['replay_mb']:.1f}"
        launch = ""
        if args.end_to_end:
            replayed = f"{r['replay_launch_s']:.1f}" if "replay_launch_s" in r else "-"
            launch = f"{r['launch_s']:.1f} | {r['launch_s'] / rows[0]['launch_s']:.2f}x | {replayed} | "
        print(
            f"| {r['position']:.0%} | {r['batch']} | {launch}{r['cursor_s']:.2f} | "
            f"{r['cursor_s'] / rows[0]['cursor_s']:.2f}x | {r['cursor_shards']} | {r['cursor_mb']:.1f} | {replay} |"
        )
    print("\nevery data restart continued with the batch the uninterrupted epoch trained next")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.bench_resume", description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=24)
    parser.add_argument("--shard-size", type=int, default=500, help="samples per shard")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--buffer", type=int, default=50, help="shuffle buffer (samples per stream)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="loader workers")
    parser.add_argument("--rate", type=float, default=4e6, help="bytes/s per shard read")
    parser.add_argument("--latency", type=float, default=0.1, help="seconds to the first byte of a shard")
    parser.add_argument("--fractions", default="0,0.5,0.9")
    parser.add_argument("--repeats", type=int, default=3, help="restarts per position (median)")
    parser.add_argument("--no-replay", action="store_true", help="skip the replay columns")
    parser.add_argument("--end-to-end", action="store_true", help="also launch train.run from each position")
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
    spec = (
        f"pipe:{sys.executable} -m eval.throttled_cat --rate {args.rate:g} --latency {args.latency:g} "
        f"--log {log_path} {shard_dir}/{{00000..{len(tars) - 1:05d}}}.tar"
    )
    rows, batches, states = restarts(spec, args, log_path)
    if args.end_to_end:
        launches = end_to_end(spec, args, root, {r["batch"]: states[r["batch"]] for r in rows})
        for row in rows:
            row["launch_s"] = launches[row["batch"], "cursor"]
            if (row["batch"], "replay") in launches:
                row["replay_launch_s"] = launches[row["batch"], "replay"]
    megabytes = sum(p.stat().st_size for p in tars) / 1e6
    print_table(
        rows,
        args,
        f"{len(tars)} shards x {args.shard_size} samples ({megabytes:.1f} MB), {len(batches)} batches of "
        f"{args.batch}; {args.workers} workers, shuffle buffer {args.buffer}; each shard read at "
        f"{args.rate / 1e6:g} MB/s after {args.latency:g} s; median of {args.repeats} restarts",
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
