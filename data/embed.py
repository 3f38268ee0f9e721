"""Embedding export: a frozen CLIP over image-text shards -> embedding shards for the prior and decoder.

    python -m data.embed ckpt=outputs/clip/RUN shards='data/{00000..00099}.tar' out=embeddings/ [batch=256]
        [workers=8]                 # loader processes decoding whole shards while this one embeds
    torchrun --nproc_per_node=8 -m data.embed ckpt=... shards=... out=...     # each rank its own shards

``ckpt`` is a CLIP run directory (or a checkpoint inside its ``checkpoints/``). For every input shard
``NAME.tar`` the output directory gets ``NAME.tar`` with, per sample (same key)::

    key.img_emb.npy    (D,)   float16, L2-normalised CLIP image embedding
    key.txt_emb.npy    (D,)   float16, L2-normalised CLIP text embedding
    key.txt_feat.npy   (L, W) float16, per-token text features (after ln_final), what the decoder attends to
    key.tokens.npy     (L,)   int32, the caption's token ids (sot ... eot, padding)
    key.txt            the caption;  key.json  the input json (when present)

and ``sizes.json`` (shard -> samples) plus ``embed_info.json``: the CLIP checkpoint, its step, its
weights' digest (a prior trained on the shards checks its ``clip_ckpt`` against it), the image
normalisation, resolution, tokenizer and dimensions. Images are centre-cropped (deterministic).
Shards are split over ranks (torchrun's or srun's, data/ranks.py; else ``RANK``/``WORLD_SIZE`` set by
hand), never within one, so no sample is written twice; each output tar is written to a temporary name
and renamed when complete. Skipped samples are counted by reason as in training.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.pipeline import ShardDataset
from data.progress import Progress
from data.ranks import rank_and_world
from data.shards import expand_shards

log = logging.getLogger(__name__)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(payload), 0
    tar.addfile(info, io.BytesIO(payload))


@torch.no_grad()
def embed_shards(
    ckpt: str,
    shards: str,
    out: str | Path,
    *,
    batch_size: int = 256,
    device: str = "cpu",
    workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
) -> dict[str, Any]:
    """Embed this rank's share of ``shards`` into ``out``; returns counts (samples, skips, shards).
    ``workers``: loader processes that read and decode whole shards (0: this process does), while
    this process embeds and writes; the output does not depend on it."""
    from train.frozen_clip import FrozenClip

    if workers < 0:
        raise ValueError(f"workers={workers}: expected an integer >= 0 (loader processes)")
    env_rank, env_world = rank_and_world()
    rank = env_rank if rank is None else rank
    world = env_world if world_size is None else world_size
    urls = expand_shards(shards)
    names = _output_names(urls)  # every rank checks them all, so that all refuse alike
    clip = FrozenClip(ckpt, map_location=device)
    out = Path(out)
    digest = _check_same_clip(out, clip)
    out.mkdir(parents=True, exist_ok=True)
    totals: Counter = Counter()
    sizes: dict[str, int] = {}
    start = time.time()
    mine = list(range(rank, len(urls), world))
    progress = Progress(len(mine), f"embedding export, rank {rank}", log=log)
    jobs = _ShardJobs(
        [(i, urls[i]) for i in mine], (clip.resize_size, clip.image_size), clip.tokenizer, batch_size
    )
    workers = min(workers, len(mine))
    loader = DataLoader(jobs, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None)
    writing: dict[int, _ShardWriter] = {}  # shards whose batches are arriving (one per loader worker)
    for index, batch in loader:
        if index not in writing:
            writing[index] = _ShardWriter(out, names[index])
        writer = writing[index]
        if batch is not None:
            writer.add(clip, batch)
            continue
        n, skips = writer.close()  # the shard's last record: its tar is complete
        del writing[index]
        totals.update({f"skipped_{k}": v for k, v in skips.items() if v})
        totals["samples"] += n
        totals["shards"] += 1
        sizes[writer.name] = n
        progress.step(detail=f"{urls[index]} -> {out / writer.name}, {n} samples")
    _merge_sizes(out / "sizes.json", sizes)
    if rank == 0:
        _write_info(out, clip, shards, world, digest)
    result = {"rank": rank, "shards": 0, "samples": 0, **totals, "seconds": round(time.time() - start, 2)}
    log.info("embedding export, rank %d: %s", rank, result)
    return result


def _output_names(urls: list[str]) -> list[str]:
    """Each shard's output file: its own file name (``<index>.tar`` for a ``pipe:`` command). Two shards of
    one name (``part1/00000.tar`` and ``part2/00000.tar``: two img2dataset runs) would write one file, the
    last one kept and the other's embeddings lost: refused, naming them."""
    names, first = [], {}
    for index, url in enumerate(urls):
        if url.startswith("pipe:"):
            name = f"{index:05d}.tar"
        else:  # a URL's query (https://host/00001.tar?download=true) is not part of the name
            name = Path(urlparse(url).path if "://" in url else url).name
        name = name if name.endswith(".tar") else name + ".tar"
        if name in first:
            raise ValueError(
                f"shards {urls[first[name]]} and {url} would both be embedded into {name}: embed each set of "
                "shards into its own out= directory, and give the prior both (data.train_shards=DIR1::DIR2)"
            )
        first[name] = index
        names.append(name)
    return names


class _WholeShard(ShardDataset):
    """A ShardDataset read whole by whichever process iterates it: data.embed hands each loader worker
    whole shards, where a ShardDataset would split its shards over the workers."""

    def worker_streams(self) -> tuple[int, int, list[int]]:
        return 0, 1, super().worker_streams()[2]


class _ShardJobs(IterableDataset):
    """This rank's shards for data.embed, ``[(index, url)]``, dealt out whole to the loader workers:
    yields ``(index, batch)`` for each of a shard's batches (centre crops, in order), then
    ``(index, None)`` when the shard is complete."""

    def __init__(
        self, jobs: list[tuple[int, str]], sizes: tuple[int, int], tokenizer, batch_size: int
    ) -> None:
        """``sizes``: (resized to, then the centre crop's), as the CLIP's validation read its images."""
        self.jobs, self.sizes, self.tokenizer, self.batch_size = jobs, sizes, tokenizer, batch_size

    def __iter__(self) -> Iterator[tuple[int, dict | None]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for index, url in self.jobs[worker::workers]:
            ds = _WholeShard(
                url,
                batch_size=self.batch_size,
                image_size=self.sizes[0],
                crop_size=self.sizes[1],
                crop="center",
                tokenizer=self.tokenizer,
                keep_json=True,
                shuffle_buffer=0,
                shuffle_shards=False,
                seed=0,
            )
            for batch in ds:
                yield index, batch
            yield index, None


class _ShardWriter:
    """One output shard, written to a temporary name and moved into place by :meth:`close` (complete
    shards only)."""

    def __init__(self, out: Path, name: str) -> None:
        self.name, self.path = name, out / name
        self.tmp = out / f".{name}.tmp{os.getpid()}"
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.PAX_FORMAT)
        self.n, self.skips = 0, {}

    def add(self, clip, batch: dict) -> None:
        self.skips = batch["__state__"]["skips"]  # cumulative for this shard
        if not batch["__key__"]:
            return
        emb = clip.embed(batch["image"], batch["tokens"])
        img = emb["img_emb"].cpu().numpy().astype(np.float16)
        txt = emb["txt_emb"].cpu().numpy().astype(np.float16)
        feats = emb["txt_feat"].cpu().numpy().astype(np.float16)  # (B, L, W)
        toks = batch["tokens"].numpy().astype(np.int32)
        for i, key in enumerate(batch["__key__"]):
            _add(self.tar, f"{key}.img_emb.npy", _npy(img[i]))
            _add(self.tar, f"{key}.txt_emb.npy", _npy(txt[i]))
            _add(self.tar, f"{key}.txt_feat.npy", _npy(feats[i]))
            _add(self.tar, f"{key}.tokens.npy", _npy(toks[i]))
            _add(self.tar, f"{key}.txt", batch["caption"][i].encode())
            if batch["json"][i]:
                _add(self.tar, f"{key}.json", json.dumps(batch["json"][i]).encode())
        self.n += len(batch["__key__"])

    def close(self) -> tuple[int, dict[str, int]]:
        self.tar.close()
        os.replace(self.tmp, self.path)
        return self.n, dict(self.skips)


def _check_same_clip(out: Path, clip) -> str:
    """``out`` holding another CLIP's embeddings (its embed_info.json) is refused: shards embedded by two
    CLIPs of one width would feed the prior a mix, with an embed_info.json naming only the last. Returns
    the digest to record: the CLIP's, or the one recorded there before the whole weights were hashed (its
    strided values only), which is all the earlier shards were checked by."""
    path = out / "embed_info.json"
    if not path.is_file():
        return clip.digest
    try:
        info = json.loads(path.read_text())
        before = (str(info["checkpoint"]), int(info["global_step"]))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not an embed_info.json written by data.embed ({e})") from e
    now = (str(clip.checkpoint.resolve()), int(clip.global_step))
    # the weights decide where both have a digest (the same CLIP moved or exported embeds on)
    same = clip.has_weights(info["clip_digest"]) if info.get("clip_digest") else before == now
    if not same:
        raise ValueError(
            f"out={out} already holds embeddings of {before[0]} (step {before[1]}); this run embeds with "
            f"{now[0]} (step {now[1]}): give a new out= directory, or delete {out} to replace them"
        )
    recorded = str(info.get("clip_digest") or "")
    return recorded if recorded and "." not in recorded else clip.digest


def _write_info(out: Path, clip, shards: str, world: int, digest: str) -> None:
    """embed_info.json (what made the embeddings; train/run.py reads the checkpoint from it) and the
    CLIP's tokenizer.json beside the shards."""
    info = {
        "checkpoint": str(clip.checkpoint.resolve()),
        "global_step": clip.global_step,
        "clip_digest": digest,  # the weights (train.checkpoint.weights_digest): what later stages compare
        "normalize": clip.normalize.kind,
        "image_size": clip.image_size,
        "resized_to": clip.resize_size,
        "crop": "center",
        "embed_dim": clip.embed_dim,
        "text_width": clip.text_width,
        "context_length": clip.tokenizer.context_length,
        "tokenizer": repr(clip.tokenizer),
        "dtype": "float16",
        "l2_normalised": ["img_emb", "txt_emb"],
        "source_shards": shards,
        "world_size": world,
    }
    (out / "embed_info.json").write_text(json.dumps(info, indent=2))
    clip.tokenizer.save(out / "tokenizer.json")


def _merge_sizes(path: Path, sizes: dict[str, int]) -> None:
    """Each rank adds its shards to sizes.json (read-modify-write under an exclusive lock file)."""
    lock = path.with_suffix(".lock")
    for _ in range(600):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            time.sleep(0.05)
    else:
        raise TimeoutError(f"{lock}: could not take the lock (remove it if no export is running)")
    try:
        merged = json.loads(path.read_text()) if path.exists() else {}
        merged.update(sizes)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(dict(sorted(merged.items())), indent=1))
        os.replace(tmp, path)
    finally:
        os.close(fd)
        os.unlink(lock)


def resolve_device(device: str | None, env: dict[str, str] | None = None, cuda: bool | None = None) -> str:
    """The device of this process: ``device`` (default: CUDA when there is one, else cpu). A bare
    ``cuda`` means this process's own GPU, ``cuda:<LOCAL_RANK>`` (torchrun; SLURM_LOCALID under srun):
    with 8 ranks per node, each embeds on its own GPU instead of all eight on GPU 0."""
    env = os.environ if env is None else env
    cuda = torch.cuda.is_available() if cuda is None else cuda
    device = device or ("cuda" if cuda else "cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise ValueError(f"device={device!r}: expected a torch device (cpu, cuda, cuda:N)") from None
    if device == "cuda":
        local = env.get("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
        device = f"cuda:{int(local)}"
    return device


def parse_args(argv: list[str]) -> dict[str, str]:
    args: dict[str, str] = {}
    for arg in argv:
        key, sep, value = arg.lstrip("-").partition("=")
        if not sep:
            raise ValueError(
                f"argument {arg!r}: expected key=value (ckpt=..., shards=..., out=..., batch=..., device=..., "
                "workers=...)"
            )
        args[key] = value
    unknown = set(args) - {"ckpt", "shards", "out", "batch", "device", "workers"}
    if unknown:
        raise ValueError(
            f"unknown option(s) {sorted(unknown)}; valid: ckpt, shards, out, batch, device, workers"
        )
    missing = {"ckpt", "shards", "out"} - set(args)
    if missing:
        raise ValueError(
            f"missing option(s) {sorted(missing)}: python -m data.embed ckpt=RUN shards=SPEC out=DIR"
        )
    return args


def _integer(args: dict[str, str], key: str, default: int) -> int:
    try:
        return int(args.get(key, default))
    except ValueError:
        raise ValueError(f"{key}={args[key]!r}: expected an integer") from None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        usage = "\n\n".join(__doc__.split("\n\n")[:2])
        print(
            f"{usage}\n\n    options: ckpt=RUN shards=SPEC out=DIR [batch=256] [device=cuda|cpu|cuda:N] "
            "[workers=0]"
        )
        return 0
    try:
        args = parse_args(argv)
        device = resolve_device(args.get("device"))
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        result = embed_shards(
            args["ckpt"],
            args["shards"],
            args["out"],
            batch_size=_integer(args, "batch", 256),
            device=device,
            workers=_integer(args, "workers", 0),
        )
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
