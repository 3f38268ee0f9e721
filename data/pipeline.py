"""The streaming pipeline: image-text (or embedding) shards -> batches, split across ranks and workers.

Stages, in order (each a small generator, all in the loader worker):

    shard spec --expand--> shard list --epoch shuffle (seed, epoch)--> split by rank --> split by worker
      --> read tar (own reader: detects truncation) --> group members by key
      --> shuffle buffer (seed, epoch, rank, worker) --> completeness check --> metadata filters
      --> decode (PIL) --> resize + crop (crop offsets seeded by (seed, epoch, key))
      --> batch (uint8 images, tokens from one batched tokeniser call) --> DataLoader (batch_size=None)

Modes
- ``epoch``: every sample exactly once per epoch across all ranks and workers (the shard list is
  partitioned, not sampled). Ranks may get different numbers of samples: :class:`RankSyncedLoader`
  stops every rank at the step where the first rank runs dry, so DDP never deadlocks; the samples a
  longer rank still held are counted as ``data/epoch_tail_dropped``.
- ``resampled``: every worker draws shards with replacement forever (seeded); the epoch length is
  ``num_samples`` (from config, or the sidecar ``sizes.json``), never from reading the data.

Bad data does not stop training: every dropped sample is counted by reason (``SKIP_REASONS`` and one
``filter_<name>`` per configured filter); the counts travel with each batch and are logged by the
DataModule as ``data/skipped_<reason>``. A key seen twice in a shard keeps its first sample; a key
that is an absolute path or has a ``..`` component is dropped (keys name the members we write, e.g.
data.embed's shards). Only known members are ever decoded (images, txt, json, npy without pickle);
anything else, ``.pyd``/``.pickle`` included, stays bytes. Only when the fraction of broken samples
passes ``data.max_bad_fraction`` does the run stop (data/datamodule.py).

Data position (design for exact mid-epoch resume)
- Everything random is seeded from (seed, epoch, data rank, worker) or (seed, epoch, key): the shard
  order, the shuffle buffer, the crops. Nothing depends on pid or time.
- A stream is one (data rank, worker): its shards, its shuffle buffer. Its position is the number of
  raw samples drawn from its shuffle buffer this epoch; each batch carries the positions and skip
  counters of its worker's streams after the batch, and :class:`RankSyncedLoader` keeps the latest
  per worker, per rank (``state_dict``).
- Restoring sets ``start_positions``: each stream replays its raw samples (tar reading + shuffle
  buffer, no decoding) and discards that many, then continues bit-identically. Since crops are keyed
  by sample, not by position, the resumed batches equal the uninterrupted ones. ``worker_offset``
  rotates the streams over the loader's workers so that the round-robin order of batches also
  continues where it stopped.
- Normally a rank's data rank is its rank. Resuming mid-epoch on fewer ranks (k = saved world size /
  new world size), each rank plays k saved data ranks (``data_ranks``): a batch is one chunk of
  ``batch_size / k`` from each, so with the same global batch every step trains the same samples as the
  saved layout would have, in the same order. data/datamodule.py saves and restores all of this.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from data.filters import Filters, json_size
from data.negatives import check_kinds, negative_tokens
from data.shards import ShardError, expand_shards, group_samples, open_shard, read_tar
from data.stream import SampleStream
from data.transforms import Crop, ImageTooLarge, decode_image, resize_crop

log = logging.getLogger(__name__)

# img2dataset writes jpg, png or webp; the others are what a hand-made shard holds (a BMP or GIF was counted as
# missing_image). The first listed that a sample has is its image; a GIF or TIFF gives its first frame.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm")
BAD_SAMPLE_REASONS = (  # a sample whose bytes are broken (filters are choices, not faults)
    "missing_image",
    "missing_caption",
    "bad_json",
    "decode_error",
    "image_too_large",
    "bad_field",
    "duplicate_key",
    "unsafe_key",  # absolute, or with a '..' component: keys name members of the tars we write
)
SKIP_REASONS = (
    *BAD_SAMPLE_REASONS,
    "truncated_shard",
    "corrupt_shard",
    "unreadable_shard",
    "empty_shard",
)


def _seed(*parts: int | str) -> int:
    """A stable 64-bit seed from ints/strings (Python's hash() of str is salted per process)."""
    return zlib.crc32(repr(parts).encode()) | (zlib.adler32(repr(parts).encode()) << 32)


def shards_for(
    urls: Sequence[str],
    *,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    seed: int,
    epoch: int,
    shuffle: bool,
) -> list[str]:
    """Epoch-mode partition: this (rank, worker)'s shards. The union over all ranks and workers is
    every shard exactly once."""
    order = list(urls)
    if shuffle:
        random.Random(_seed(seed, epoch, "shards")).shuffle(order)
    return order[rank::world_size][worker::num_workers]


class StreamPosition:
    """What a streaming dataset (ShardDataset, data/embeddings.py's ClipRetrievalDataset) is told before it
    iterates, by the DataModule, RankSyncedLoader and data/resume.py: its rank and epoch, and where a resume
    starts. A stream is one (data rank, loader worker).

    Loader workers that persist across epochs hold the copy of these fields made when they started, so
    each epoch is also published to shared memory (:meth:`publish`, by RankSyncedLoader before every
    ``iter()``). A worker whose copy is older than the latest publication takes up the published epoch
    from its start (:meth:`worker_streams`). Only an epoch's start travels that way: a resume position
    reaches workers started after it was set (RankSyncedLoader starts new ones for it)."""

    def reset_position(self) -> None:
        self.rank, self.world_size, self.epoch = 0, 1, 0
        # [publication count, epoch]: shared with the loader's workers (a fork or pickle keeps the memory)
        self._published = torch.zeros(2, dtype=torch.int64).share_memory_()
        self._publication = 0  # the publication this copy's fields belong to
        self.start_fresh()

    def start_fresh(self) -> None:
        """From the start of ``self.epoch`` on this rank's own partition: no resume position."""
        # Data ranks: the (rank, world size) the shard partition, shuffle and position follow. Normally
        # this rank's own; a resume on fewer ranks plays k of the saved ones at once (each batch = one
        # chunk of batch_size / k from each), on more ranks a part of one (data/resume.py).
        self.data_ranks: list[int] | None = None
        self.data_world_size: int | None = None
        # (data rank, worker) -> samples drawn before the restart, and the skip counts at that point
        self.start_positions: dict[tuple[int, int], int] = {}
        self.start_skips: dict[tuple[int, int], dict[str, int]] = {}
        # (data rank, worker) -> the stream's cursor (data/stream.py): where a resume starts reading
        self.start_cursors: dict[tuple[int, int], dict] = {}
        # (data rank, worker) -> (first unopened shard, m, part): the epoch continues on m times the ranks
        # (data/resume.py); this stream reads part `part` of the shards from that one on
        self.start_splits: dict[tuple[int, int], tuple[int, int, int]] = {}
        # The DataLoader hands out batches round-robin from worker 0. A resume that stopped after a
        # batch of worker k must continue with worker k+1: loader worker i plays stream (i + offset) % W.
        self.worker_offset = 0

    def publish(self) -> None:
        """Main process, before each ``iter()`` of the loader: the epoch its persistent workers play."""
        self._publication += 1
        self._published[1] = self.epoch
        self._published[0] = self._publication

    def _follow_publication(self) -> None:
        """In a loader worker: an epoch published after this copy was made starts from its beginning."""
        publication = int(self._published[0])
        if publication != self._publication:
            self.epoch = int(self._published[1])
            self.start_fresh()
            self._publication = publication

    @property
    def streams(self) -> list[int]:
        """The data ranks this rank plays (its own rank unless a resume at another world size)."""
        return list(self.data_ranks) if self.data_ranks is not None else [self.rank]

    @property
    def stream_world_size(self) -> int:
        return self.data_world_size if self.data_world_size is not None else self.world_size

    def share(self, items: Sequence, data_rank: int, worker: int, num_workers: int, *, shuffle: bool) -> list:
        """One stream's share of ``items`` (shards, parts) this epoch, in reading order (:func:`shards_for`)."""
        return shards_for(
            items,
            rank=data_rank,
            world_size=self.stream_world_size,
            worker=worker,
            num_workers=num_workers,
            seed=self.seed,
            epoch=self.epoch,
            shuffle=shuffle,
        )

    def worker_streams(self) -> tuple[int, int, list[int]]:
        """(worker, number of workers, data ranks) of the calling loader worker, at the start of its
        iteration (which takes up a newly published epoch first)."""
        self._follow_publication()
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        data_ranks = self.streams
        if self.batch_size % len(data_ranks):
            raise ValueError(
                f"per-device batch {self.batch_size} does not split over the {len(data_ranks)} data ranks "
                f"{data_ranks} this rank continues"
            )
        return (worker + self.worker_offset) % num_workers, num_workers, data_ranks


def key_problem(key: str, seen: set[str]) -> str | None:
    """Why a sample of its shard is skipped for its key, or None (then ``seen`` records it): an unsafe
    key (absolute, or with a '..' component: keys name members of the tars we write) or one seen before
    in the shard."""
    if key.startswith("/") or ".." in key.split("/"):
        return "unsafe_key"
    if key in seen:
        return "duplicate_key"
    seen.add(key)
    return None


class ShardDataset(StreamPosition, IterableDataset):
    """Yields ready batches (dicts) from shards; use with ``DataLoader(batch_size=None)``.

    Batch keys: ``image`` uint8 (B, 3, crop, crop) when ``image_size`` is set, ``tokens`` long (B, L)
    when a tokenizer is given, ``caption`` list[str], ``__key__`` list[str], ``json`` list[dict] when
    ``keep_json``, one tensor (B, ...) per entry of ``npy_fields`` (embedding shards: float32, or int64 for
    integer arrays such as ``tokens.npy``), ``negative_tokens`` long (K * B, L) and ``negative_mask``
    bool (K * B,) for the K kinds of ``hard_negatives`` (data/negatives.py; the CLIP stage's, made here in
    the loader workers rather than on the training process's host at every step), and
    ``__state__`` (after this batch: ``streams``, each data rank's position and skip counts at this
    worker, and ``skips``, their sum).
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        *,
        batch_size: int,
        mode: str = "epoch",
        image_size: int | None = 64,
        crop_size: int | None = None,
        crop: str = "random",
        tokenizer=None,
        filters: Filters | None = None,
        npy_fields: Sequence[str] = (),
        require_caption: bool = True,
        keep_json: bool = False,
        hard_negatives: Sequence[str] = (),
        shuffle_buffer: int = 1000,
        shuffle_shards: bool = True,
        seed: int = 0,
        num_samples: int | None = None,
        drop_last: bool = False,
    ) -> None:
        """Long only by its keyword arguments, one per data option (documented in the class docstring and
        conf/data/shards.yaml), each checked here."""
        if mode not in ("epoch", "resampled"):
            raise ValueError(f"data mode={mode!r}: expected 'epoch' or 'resampled'")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        self.spec = shards
        self.urls = expand_shards(shards)
        self.batch_size = batch_size
        self.mode = mode
        self.image_size = image_size
        self.crop_size = crop_size or image_size
        self.crop = Crop(crop)
        self.tokenizer = tokenizer
        self.filters = filters or Filters()
        self.npy_fields = tuple(npy_fields)
        self.require_caption = require_caption
        self.keep_json = keep_json
        self.hard_negatives = check_kinds(hard_negatives, "hard_negatives")
        if self.hard_negatives and tokenizer is None:
            raise ValueError("hard_negatives needs the tokenizer (the negatives are captions)")
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_shards = shuffle_shards
        self.seed = seed
        self.num_samples = num_samples
        self.drop_last = drop_last
        self.reset_position()
        self.reasons = list(SKIP_REASONS) + self.filters.reasons + ["partial_batch_dropped"]
        if mode == "resampled" and num_samples is None:
            self.num_samples = dataset_size(self.urls)
            if self.num_samples is None:
                raise ValueError(
                    f"resampled mode over {shards!r} needs an epoch length: set data.train_num_samples "
                    "or put a sizes.json (shard name -> sample count) next to the shards"
                )

    # ---- epoch length -------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch for this rank in resampled mode (from num_samples).

        Epoch mode declares no length: filters, bad samples and uneven shards make any figure an
        estimate, and Lightning would end the epoch at that estimate, silently dropping samples.
        """
        if self.mode != "resampled":
            raise TypeError("epoch mode has no declared length")
        per_rank = self.num_samples / self.world_size
        return (
            math.floor(per_rank / self.batch_size)
            if self.drop_last
            else math.ceil(per_rank / self.batch_size)
        )

    # ---- the pipeline ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict]:
        worker, num_workers, data_ranks = self.worker_streams()
        states = {v: self._stream_state(v, worker, num_workers) for v in data_ranks}
        reported = None
        for items, state in self._batches(states, worker):
            reported = state["streams"]
            yield self._collate(items, state)
        final = snapshot(self, states, worker)
        if _counts(final["streams"]) != _counts(reported):  # not when only a cursor moved (nothing new)
            # A state-only record (no samples), so positions and skips after the last batch - or in a
            # worker that never filled a batch - still reach the main process (consumers skip it).
            yield {"__key__": [], "__state__": final}

    def _batches(self, states: dict[int, dict], worker: int) -> Iterator[tuple[list[dict], dict]]:
        """(items, state after them) per batch: :func:`interleave` over this worker's data ranks."""
        chunk = self.batch_size // len(states)
        streams = [(v, self._stream(chunk, st)) for v, st in states.items()]
        for full, chunks in interleave(streams, chunk, self.batch_size, len):
            if full:
                yield [it for _, c in chunks for it in c], snapshot(self, states, worker)
            elif self.drop_last:  # a short batch would break equal-size collectives (the global-batch loss)
                for v, c in chunks:
                    states[v]["skips"]["partial_batch_dropped"] += len(c)
            else:
                pool = [it for _, c in chunks for it in c]
                for start in range(0, len(pool), self.batch_size):
                    yield pool[start : start + self.batch_size], snapshot(self, states, worker)

    def _stream_state(self, data_rank: int, worker: int, num_workers: int) -> dict:
        """One data rank's stream at one worker, from the start of the epoch or its saved cursor."""
        key = (data_rank, worker)
        skips = Counter(self.start_skips.get(key, {}))
        split = self.start_splits.get(key)
        stream = SampleStream(
            lambda: self._shard_sequence(data_rank, worker, num_workers, split),
            self._read_shard,
            skips,
            buffer_size=self.shuffle_buffer,
            # a new part of a split stream shuffles with its own seed; part 0 continues the saved generator
            seed=_seed(
                self.seed, self.epoch, data_rank, worker, "buffer", *(split if split and split[2] else ())
            ),
            cursor=self.start_cursors.get(key),
        )
        return {
            "position": self.start_positions.get(key, 0),
            "skips": skips,
            "stream": stream,
            "split": split,
        }

    def _stream(self, chunk: int, state: dict) -> Iterator[list]:
        """Lists of ``chunk`` processed items of one stream (the last may be shorter). ``state``
        (position, skips) is kept current: read it when a list arrives."""
        skips, stream = state["skips"], state["stream"]
        # A position without a cursor (checkpoints before cursors): replay the raw samples drawn before
        # it, without decoding; shard-level skips seen again during the replay were counted already.
        replay_to = state["position"] if stream.start is None else 0
        saved_skips = dict(skips)
        items: list[dict] = []
        for position, sample in enumerate(stream, start=state["position"] - replay_to + 1):
            if position <= replay_to:
                if position == replay_to:
                    skips.clear()
                    skips.update(saved_skips)
                continue
            state["position"] = position
            item = self._process(sample, skips)
            if item is None:
                continue
            items.append(item)
            if len(items) == chunk:
                yield items
                items = []
        if items:
            yield items

    def _shard_sequence(
        self, data_rank: int, worker: int, num_workers: int, split: tuple[int, int, int] | None = None
    ) -> Iterator[str]:
        """This stream's shards in reading order: its share of the epoch, or endless draws (resampled).
        ``split`` (first unopened shard s, m, part p): part 0 keeps the shards before s (its cursor points
        into them) and every m-th from s; part p > 0 has the p-th of every m from s."""
        if self.mode == "epoch":
            shards = self.share(self.urls, data_rank, worker, num_workers, shuffle=self.shuffle_shards)
            if split is not None:
                first, m, part = split
                shards = (shards[:first] if part == 0 else []) + shards[first + part :: m]
            yield from shards
        else:
            rng = random.Random(_seed(self.seed, self.epoch, data_rank, worker, "resample"))
            while True:
                yield rng.choice(self.urls)

    def _read_shard(self, url: str, skips: Counter, count_from: int = 0) -> Iterator[tuple[int, dict]]:
        """(index, sample) for every kept sample of a shard; skips are counted from sample ``count_from``
        on (a restart reads the part before again). Closing it early (a restart that needs only the
        start of a shard) is silent."""
        n = kept = 0
        seen: set[str] = set()
        replayed: Counter = Counter()
        closed = False
        try:
            with open_shard(url) as stream:
                for sample in group_samples(read_tar(stream)):
                    n += 1
                    counts = skips if kept >= count_from else replayed
                    reason = key_problem(sample["__key__"], seen)
                    if reason:
                        counts[reason] += 1
                        continue
                    sample["__url__"] = url
                    try:
                        yield kept, sample
                    except GeneratorExit:
                        closed = True
                        raise
                    kept += 1
        except ShardError as e:
            (skips if kept >= count_from else replayed)[e.reason] += 1
            log.warning("shard %s: %s (after %d samples); rest of the shard skipped", url, e, n)
            return
        except OSError as e:  # missing file, permission, failed pipe command
            if closed:  # a pipe stopped early exits with an error status
                return
            skips["unreadable_shard"] += 1
            log.warning("shard %s unreadable: %s", url, e)
            return
        if n == 0:
            skips["empty_shard"] += 1

    def _process(self, sample: dict, skips: Counter) -> dict | None:
        """Validate, filter, decode, transform one raw sample; None (and a counted reason) to drop it."""
        reason, item = check_sample(
            sample,
            self.filters,
            need_image=self.image_size is not None,
            need_caption=self.require_caption,
            npy_fields=self.npy_fields,
        )
        if reason is None and self.image_size is not None:
            reason = self._decode_into(sample, item)
        if reason is not None:
            skips[reason] += 1
            return None
        if not self.keep_json:
            item.pop("json", None)
        return item

    def _decode_into(self, sample: dict, item: dict) -> str | None:
        try:
            img, stored_size = decode_image(sample[item.pop("image_ext")], min_side=self.image_size)
        except ImageTooLarge:
            return "image_too_large"
        except Exception:  # noqa: BLE001 - any decoder failure is a bad sample, never a crash
            return "decode_error"
        if json_size(item["json"]) is None:  # (a bad json size was counted before the decode)
            size_reason = self.filters.check_size(*stored_size)
            if size_reason:
                return size_reason
        rng = (
            random.Random(_seed(self.seed, self.epoch, item["__key__"])) if self.crop == Crop.RANDOM else None
        )
        item["image"] = resize_crop(img, self.image_size, self.crop_size, crop=self.crop, rng=rng)
        return None

    def _collate(self, items: list[dict], state: dict) -> dict:
        batch: dict = {
            "__key__": [it["__key__"] for it in items],
            "caption": [it.get("caption") for it in items],
        }
        if self.image_size is not None:
            batch["image"] = torch.stack([it["image"] for it in items])  # (B, 3, H, W) uint8
        if self.tokenizer is not None:
            batch["tokens"] = self.tokenizer(batch["caption"])  # (B, L) long
        for name in self.npy_fields:  # embeddings in float32, token ids as int64 (never rounded)
            try:
                stacked = np.stack([it[name] for it in items])
            except ValueError:
                _same_shapes(name, items)  # names the samples of another shape (np.stack names none)
                raise
            exact = np.issubdtype(stacked.dtype, np.integer) or stacked.dtype == np.bool_
            batch[name] = torch.from_numpy(stacked.astype(np.int64 if exact else np.float32))
        if self.keep_json:
            batch["json"] = [it["json"] for it in items]
        if self.hard_negatives:
            batch["negative_tokens"], batch["negative_mask"] = negative_tokens(
                batch["caption"], self.hard_negatives, self.tokenizer
            )
        batch["__state__"] = state
        return batch


def _same_shapes(name: str, items: list[dict]) -> None:
    """An error naming the samples whose ``name`` array has another shape than most of the batch's:
    embeddings of two CLIPs (two data.embed runs in one spec). Called once np.stack has failed."""
    shapes = Counter(it[name].shape for it in items)
    if len(shapes) == 1:
        return
    common = shapes.most_common(1)[0][0]
    odd = [
        f"{it.get('__url__')}: {it['__key__']} {it[name].shape}" for it in items if it[name].shape != common
    ]
    raise ValueError(
        f"{name}: {len(odd)} of {len(items)} samples of a batch have another shape than {common}: "
        f"{'; '.join(odd[:3])}. The shards mix arrays of different models (embed each set with one CLIP)"
    )


def interleave(
    streams: list[tuple[int, Iterator]], chunk: int, batch_size: int, size
) -> Iterator[tuple[bool, list[tuple[int, object]]]]:
    """Batches built from several data ranks' streams of chunks (``size(chunk)`` items each, the last
    of a stream may be shorter): ``(True, [(data rank, chunk), ...])`` per full batch of
    ``batch_size // chunk`` chunks, one from each data rank in turn (with one data rank: its chunks; a
    data rank that runs dry hands its turn to the next, so the rest of the epoch is still read exactly
    once); then, once, ``(False, leftovers)``: the full chunks of an unfinished batch and each data
    rank's short last chunk. Shared by ShardDataset and data/embeddings.py."""
    active = list(streams)
    full: list[tuple[int, object]] = []
    short: list[tuple[int, object]] = []
    turn = 0
    while active:
        turn %= len(active)
        v, stream = active[turn]
        piece = next(stream, None)
        if piece is None:
            del active[turn]
            continue
        turn += 1
        (full if size(piece) == chunk else short).append((v, piece))
        if len(full) * chunk == batch_size:
            yield True, full
            full = []
    yield False, full + short


def snapshot(dataset, states: dict[int, dict], worker: int) -> dict:
    """The ``__state__`` a batch carries: each data rank's position and skips at this worker, and its
    stream's cursor and split where it has them (data/stream.py, data/resume.py)."""
    streams = {}
    for v, st in states.items():
        streams[v] = {
            "position": st["position"],
            "skips": {r: st["skips"].get(r, 0) for r in dataset.reasons},
        }
        if st.get("stream") is not None:
            streams[v]["cursor"] = st["stream"].cursor()
        if st.get("split"):
            streams[v]["split"] = list(st["split"])
    total = {r: sum(st["skips"][r] for st in streams.values()) for r in dataset.reasons}
    return {
        "rank": dataset.rank,
        "worker": worker,
        "epoch": dataset.epoch,
        "streams": streams,
        "skips": total,
    }


def _counts(streams: dict | None) -> dict | None:
    return None if streams is None else {v: (st["position"], st["skips"]) for v, st in streams.items()}


def check_sample(
    sample: Mapping,
    filters: Filters,
    *,
    need_image: bool = True,
    need_caption: bool = True,
    npy_fields: Sequence[str] = (),
) -> tuple[str | None, dict]:
    """Completeness + metadata checks shared by the pipeline and ``data.inspect``.

    Returns (reason, item): reason is None when the sample is kept; item holds ``__key__``,
    ``caption``, ``json`` (dict), ``image_ext`` and decoded npy fields.
    """
    item: dict = {"__key__": sample["__key__"], "__url__": sample.get("__url__"), "json": {}}
    if need_image:
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None or not sample[ext]:
            return "missing_image", item
        item["image_ext"] = ext
    caption = None
    if "txt" in sample:
        try:
            caption = sample["txt"].decode("utf-8").strip()
        except UnicodeDecodeError:
            return "bad_field", item
    if need_caption and caption is None:
        return "missing_caption", item
    item["caption"] = caption
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "bad_json", item
        if not isinstance(meta, dict):
            return "bad_json", item
        item["json"] = meta
    reason = filters.check_meta(item["json"], caption)
    if reason:
        return reason, item
    try:
        size = json_size(item["json"])
    except (TypeError, ValueError):
        return "bad_json", item
    if size is not None:
        reason = filters.check_size(*size)
        if reason:
            return reason, item
    for name in npy_fields:
        if name not in sample:
            return "bad_field", item
        try:
            item[name] = _load_npy(sample[name])
        except ValueError:
            return "bad_field", item
    return None, item


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool, int]] = {}
# the header dict numpy writes: {'descr': '<f2', 'fortran_order': False, 'shape': (4, 8), }
_NPY_DICT = re.compile(
    r"\{'descr': '([<>|=]?[a-zA-Z]\d*)', 'fortran_order': (True|False), 'shape': \(([\d, ]*)\), \}"
)


def npy_header(text: str) -> tuple[np.dtype, tuple[int, ...], bool] | None:
    """(dtype, shape, fortran order) of an .npy header as numpy writes it, read without ``ast`` (numpy
    parses it as a Python literal: slower, and in a forked loader worker of CPython 3.11 before 3.11.8 it
    can fail with "AST constructor recursion depth mismatch", gh-106905); None for any other form."""
    match = _NPY_DICT.match(text.strip())
    if match is None:
        return None
    try:
        dtype = np.dtype(match.group(1))
    except TypeError:  # '<f3': numpy's reader says ValueError, which callers count as a bad field
        return None
    if dtype.hasobject:
        return None
    shape = tuple(int(n) for n in match.group(3).split(",") if n.strip())
    return dtype, shape, match.group(2) == "True"


def open_npy(path: str | os.PathLike) -> np.ndarray:
    """A memory map of the .npy file at ``path`` (nothing read but its header); numpy's own reader for a
    header it did not write the usual way. Never unpickles."""
    with open(path, "rb") as f:
        head = f.read(12)
        if head[:6] == b"\x93NUMPY" and head[6:7] in (b"\x01", b"\x02", b"\x03"):
            size, start = (int.from_bytes(head[8:10], "little"), 10) if head[6] == 1 else (
                int.from_bytes(head[8:12], "little"), 12)  # fmt: skip
            f.seek(start)
            meta = npy_header(f.read(size).decode("latin1"))
            if meta is not None and math.prod(meta[1]) > 0:
                dtype, shape, fortran = meta
                return np.memmap(path, dtype=dtype, mode="r", offset=start + size, shape=shape,
                                 order="F" if fortran else "C")  # fmt: skip
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _load_npy(data: bytes) -> np.ndarray:
    """An ``.npy`` member's array (never unpickled; ValueError on anything else). The samples of a shard
    repeat a few headers (one per field), and numpy parses each as a Python literal (about 35 us, most
    of an embedding sample's load): each distinct header is parsed once per process."""
    import io

    end = 10 + int.from_bytes(data[8:10], "little") if data[6:7] == b"\x01" else 0
    meta = _NPY_HEADERS.get(data[:end]) if end else None
    if meta is None:
        if not end or not data.startswith(b"\x93NUMPY"):  # other versions: numpy's own reader
            return np.load(io.BytesIO(data), allow_pickle=False)
        parsed = npy_header(data[10:end].decode("latin1"))
        if parsed is not None:
            dtype, shape, fortran = parsed
            offset = end
        else:
            f = io.BytesIO(data)
            np.lib.format.read_magic(f)
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            offset = f.tell()
        if dtype.hasobject:
            raise ValueError("an .npy field of Python objects (it would need unpickling)")
        meta = (dtype, shape, fortran, offset)
        if len(_NPY_HEADERS) < 4096:
            _NPY_HEADERS[data[:end]] = meta
    dtype, shape, fortran, offset = meta
    count = math.prod(shape)
    if len(data) - offset < count * dtype.itemsize:
        raise ValueError(f".npy data is {len(data) - offset} bytes, its header says {count * dtype.itemsize}")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape, order="F" if fortran else "C")


def dataset_size(urls: Iterable[str]) -> int | None:
    """Total samples from ``sizes.json`` sidecars next to the shards (webdataset/open_clip convention);
    None when any shard's directory lacks one. Reads one small file per directory, never the shards."""
    cache: dict[str, dict | None] = {}
    total = 0
    for url in urls:
        if url.startswith("pipe:"):
            return None
        directory, name = os.path.split(url)
        if directory not in cache:
            path = os.path.join(directory, "sizes.json")
            try:
                with open(path) as f:
                    cache[directory] = json.load(f)
            except (OSError, json.JSONDecodeError):
                cache[directory] = None
        sizes = cache[directory]
        if sizes is None or name not in sizes:
            return None
        total += int(sizes[name])
    return total
