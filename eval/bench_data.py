"""Data-pipeline benchmark: samples/s of the streaming pipeline, next to plain webdataset + PIL.

    python -m eval.bench_data [--content shapes|photo] [--samples 4000] [--sizes 64 256] [--crop N]
                              [--workers 0 1 2] [--batch 64] [--seconds S] [--baseline] [--target 3350]
                              [--epochs N [--hold-gb G]] [--json F]

Writes shards once per stored size (into --dir, or a temporary directory), then times full passes of a
DataLoader over them: tar read, shuffle, JPEG decode, resize + random crop, tokenise, batch (uint8).
The first round of batches (worker start-up) is excluded from the timing; ``--seconds`` caps a pass.

``--content shapes``: the synthetic shapes dataset (square, flat colours: it decodes fast).
``--content photo``: photo-like JPEGs whose decode costs what a photo's does: a 1/f^1.3 amplitude
spectrum in three mixed colour channels, stored 4:3 with the shorter side at the --sizes value and
quality 95 (img2dataset's ``resize_mode=keep_ratio`` and its default quality), ~55 KB at 256 px.

``--baseline`` adds the same pass through what users write today: ``webdataset.WebDataset`` with
``.decode("pil")``, a PIL resize of the shorter side + random crop, and the same tokeniser. ``--target``
turns the measured per-worker rate of the row with the most workers into the workers (cores) a
loader needs to feed one GPU at that many samples/s.

``--epochs N`` also times N whole epochs of the first size through the training loader (RankSyncedLoader,
the most workers given), with workers started anew each epoch and with workers that persist
(``data.persistent_workers``): the wait for each epoch's first batch, and the epoch's seconds.
``--hold-gb G`` holds G GB of memory meanwhile, as a training process does: starting workers (a fork
each) costs more in a bigger process.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import random
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data.loader import RankSyncedLoader
from data.pipeline import ShardDataset
from data.shards import iter_captions
from data.synthetic import add_member, caption_for, make_scene, write_shards
from data.tokenizer import train_bpe

PHOTO_ASPECT = 4 / 3
PHOTO_QUALITY = 95  # img2dataset's default encode_quality
PHOTO_EXPONENT = 1.3  # amplitude ~ 1/f^a: 1.0 is noisier than photos (~78 KB at 256 px), 1.4 ~50 KB


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(height, width, 3) uint8: coloured 1/f noise, the spectrum (and so the JPEG size and decode
    cost) of a natural image rather than of flat shapes."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    f = np.hypot(fy, fx)
    f[0, 0] = 1.0
    shape = (3, height, width // 2 + 1)
    spectrum = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / f**PHOTO_EXPONENT
    planes = np.fft.irfft2(spectrum, s=(height, width), axes=(1, 2))
    x = np.einsum("cd,dhw->hwc", rng.dirichlet(np.ones(3), size=3), planes)
    x = (x - x.mean((0, 1))) / (x.std() + 1e-8) * 55 + rng.uniform(80, 170, 3)
    return np.clip(x, 0, 255).astype(np.uint8)


def _write_photo_shard(job: tuple[Path, range, int]) -> tuple[str, int]:
    path, indices, short_side = job
    height, width = short_side, round(short_side * PHOTO_ASPECT)
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in indices:
            rng = np.random.default_rng([short_side, i])
            buf = io.BytesIO()
            Image.fromarray(photo_like(rng, height, width)).save(buf, "JPEG", quality=PHOTO_QUALITY)
            key, caption = f"{i:09d}", caption_for(make_scene(0, i), 0, i)
            meta = {"key": key, "caption": caption, "status": "success", "width": width, "height": height}
            add_member(tar, f"{key}.jpg", buf.getvalue())
            add_member(tar, f"{key}.txt", caption.encode())
            add_member(tar, f"{key}.json", json.dumps(meta).encode())
    os.replace(tmp, path)
    return path.name, len(indices)


def write_photo_shards(out: Path, samples: int, short_side: int, shards: int, processes: int) -> None:
    """Write ``samples`` photo-like samples into ``shards`` tars (img2dataset layout + sizes.json) with
    ``processes`` processes."""
    out.mkdir(parents=True, exist_ok=True)
    per = math.ceil(samples / shards)
    jobs = [
        (out / f"{k:05d}.tar", range(k * per, min(samples, (k + 1) * per)), short_side) for k in range(shards)
    ]
    jobs = [j for j in jobs if len(j[1])]
    with multiprocessing.get_context("spawn").Pool(max(1, min(processes, len(jobs)))) as pool:
        written = pool.map(_write_photo_shard, jobs)
    (out / "sizes.json").write_text(json.dumps(dict(written)))


def mean_jpeg_kb(shards: Path) -> float:
    total = count = 0
    for tar_path in sorted(shards.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    total, count = total + member.size, count + 1
    return total / max(count, 1) / 1024


class PlainTransform:
    """What a webdataset user writes: resize the shorter side (PIL bicubic), random crop, to uint8."""

    def __init__(self, crop: int) -> None:
        self.crop = crop

    def __call__(self, img: Image.Image) -> torch.Tensor:
        w, h = img.size
        scale = self.crop / min(w, h)
        img = img.resize((max(self.crop, round(w * scale)), max(self.crop, round(h * scale))), Image.BICUBIC)
        left = random.randint(0, img.width - self.crop)
        top = random.randint(0, img.height - self.crop)
        img = img.crop((left, top, left + self.crop, top + self.crop))
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


class PlainCollate:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, samples: list) -> dict:
        images, captions = zip(*samples)
        return {"image": torch.stack(images), "tokens": self.tokenizer(list(captions)), "caption": captions}


def plain_webdataset(urls: list[str], batch: int, crop: int, tokenizer):
    import webdataset as wds

    return (
        wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=None)
        .shuffle(1000)
        .decode("pil")
        .to_tuple("jpg", "txt")
        .map_tuple(PlainTransform(crop), lambda t: t)
        .batched(batch, collation_fn=PlainCollate(tokenizer), partial=False)
    )


def time_pass(dataset, workers: int, seconds: float | None = None) -> tuple[int, float]:
    """Samples and seconds of one pass, or of its first ``seconds``. The first round of batches (one per
    worker: start-up, and batches that were ready at once) is not timed."""
    loader = DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None)
    n, start, skip = 0, None, max(1, workers)
    for i, batch in enumerate(loader):
        if i < skip:
            continue
        if start is None:
            start = time.perf_counter()
        n += len(batch["image"])
        if seconds is not None and time.perf_counter() - start >= seconds:
            break
    return n, time.perf_counter() - (start or time.perf_counter())


def time_epochs(dataset, workers: int, epochs: int, persistent: bool) -> list[tuple[float, float]]:
    """(seconds to the first batch, seconds of the epoch) of each of ``epochs`` whole epochs through the
    training loader, the epoch order changing as in training."""
    loader = RankSyncedLoader(
        DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=4 if workers else None,
            persistent_workers=persistent and workers > 0,
            generator=torch.Generator(),
        )
    )
    times = []
    for epoch in range(epochs):
        loader.epoch_fn = lambda epoch=epoch: epoch
        start = time.perf_counter()
        first = None
        for _ in loader:
            first = first or time.perf_counter() - start
        times.append((first or float("nan"), time.perf_counter() - start))
    loader.close()
    return times


def _dataset(content: str, root: Path, size: int, samples: int, shards: int) -> tuple[Path, float]:
    path = root / f"{content}{size}"
    if not (path / "sizes.json").exists():
        if content == "photo":
            write_photo_shards(path, samples, size, shards, os.cpu_count() or 1)
        else:
            write_shards(path, samples, seed=0, image_size=size, shard_size=math.ceil(samples / shards))
    return path, mean_jpeg_kb(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.bench_data", description=__doc__.split("\n")[0])
    p.add_argument("--content", choices=("shapes", "photo"), default="shapes")
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="stored images' shorter side")
    p.add_argument("--crop", type=int, default=None, help="training crop (default: the stored size)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=None, help="time at most this long per pass")
    p.add_argument("--baseline", action="store_true", help="also time plain webdataset + PIL")
    p.add_argument("--target", type=float, default=None, help="samples/s one GPU needs: workers to reach it")
    p.add_argument(
        "--epochs", type=int, default=0, help="time this many whole epochs, workers persisting or not"
    )
    p.add_argument("--hold-gb", type=float, default=0.0, help="memory held while timing --epochs")
    p.add_argument("--dir", type=Path, default=None, help="where to write the shards (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = p.parse_args(argv)
    root = args.dir or Path(tempfile.mkdtemp(prefix="bench_data_"))
    shards = max(8, 2 * max(args.workers))  # at least as many shards as workers, or some idle
    loaders = ["ours", "webdataset+PIL"] if args.baseline else ["ours"]
    rows = []
    for size in args.sizes:
        path, kb = _dataset(args.content, root, size, args.samples, shards)
        crop = args.crop or size
        tokenizer = train_bpe(iter_captions(str(path), 2000), vocab_size=1024, context_length=32)
        urls = [str(t) for t in sorted(path.glob("*.tar"))]
        for loader in loaders:
            for workers in args.workers:
                if loader == "ours":
                    ds = ShardDataset(
                        str(path),
                        batch_size=args.batch,
                        image_size=crop,
                        tokenizer=tokenizer,
                        shuffle_buffer=1000,
                    )
                else:
                    ds = plain_webdataset(urls, args.batch, crop, tokenizer)
                n, seconds = time_pass(ds, workers, args.seconds)
                rate = n / seconds if seconds > 0 else float("nan")
                rows.append(
                    {"content": args.content, "stored": size, "kb": round(kb, 1), "crop": crop, "loader": loader,
                     "workers": workers, "samples": n, "seconds": round(seconds, 3), "samples_per_s": round(rate, 1),
                     "per_worker": round(rate / max(workers, 1), 1)}
                )  # fmt: skip
    print(f"\n{args.content}, batch {args.batch}, {os.cpu_count()} cores (workers 0: the main process loads)")
    print("| stored px | KB/image | crop | loader | workers | samples | seconds | samples/s | per worker |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['stored']} | {r['kb']:.1f} | {r['crop']} | {r['loader']} | {r['workers']} | {r['samples']} | "
            f"{r['seconds']:.2f} | {r['samples_per_s']:,.0f} | {r['per_worker']:,.0f} |"
        )
    if args.target:
        print()
        for size in args.sizes:
            for loader in loaders:
                best = max(
                    (r for r in rows if r["stored"] == size and r["loader"] == loader),
                    key=lambda r: r["workers"],
                )
                need = math.ceil(args.target / best["per_worker"]) if best["per_worker"] > 0 else float("inf")
                print(
                    f"{size} px, {loader}: {best['per_worker']:,.0f} samples/s per worker at {best['workers']} "
                    f"workers -> {args.target:,.0f}/s needs {need} workers"
                )
    epoch_rows = _epoch_rows(args, root, shards) if args.epochs else []
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows + epoch_rows, indent=1))
    return 0


def _epoch_rows(args: argparse.Namespace, root: Path, shards: int) -> list[dict]:
    """--epochs: the epoch boundaries of the first size at the most workers, printed and returned."""
    size, workers = args.sizes[0], max(args.workers)
    path, _ = _dataset(args.content, root, size, args.samples, shards)
    tokenizer = train_bpe(iter_captions(str(path), 2000), vocab_size=1024, context_length=32)
    held = torch.ones(int(args.hold_gb * 1e9) // 4)  # touched: its pages are mapped, as a model's are
    rows = []
    print(
        f"\n{args.epochs} epochs of {args.samples} samples ({size} px, batch {args.batch}, {workers} workers, "
        f"{held.numel() * 4 / 1e9:.1f} GB held)"
    )
    print("| loader workers | epoch | first batch ms | epoch seconds |")
    print("|---|---|---|---|")
    for persistent in (False, True):
        ds = ShardDataset(str(path), batch_size=args.batch, image_size=args.crop or size, tokenizer=tokenizer)
        for epoch, (first, seconds) in enumerate(time_epochs(ds, workers, args.epochs, persistent)):
            kind = "persistent" if persistent else "started each epoch"
            print(f"| {kind} | {epoch} | {first * 1000:.0f} | {seconds:.2f} |")
            rows.append({"epochs": args.epochs, "stored": size, "workers": workers, "persistent": persistent,
                         "hold_gb": args.hold_gb, "epoch": epoch, "first_batch_s": round(first, 4),
                         "epoch_s": round(seconds, 3)})  # fmt: skip
    del held
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
