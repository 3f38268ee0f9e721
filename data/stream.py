"""One stream of raw samples with a cursor: a restart reads about one shuffle buffer, not the epoch.

A stream (one data rank at one loader worker, data/pipeline.py) reads its shard sequence in order and
passes the samples through a seeded shuffle buffer. Its :meth:`SampleStream.cursor` after any yielded
sample records, at shard granularity:

- ``shard``, ``offset``: the shard being read (its index in the stream's sequence) and how many samples
  of it have entered the buffer;
- ``buffer``: where each sample in the buffer came from, ``(shard index << 32) | sample index``, slot by
  slot (int64, as base64 text), and ``flushing`` once the sequence is exhausted and the buffer drains;
- ``rng``: the shuffle generator's state (the 625 words of Python's Mersenne Twister, as base64 text).

A stream started from a cursor opens only the shards the buffer still holds samples of (read up to the
last one needed) and the shard in progress (re-read up to ``offset``, since a ``pipe:`` cannot seek),
then continues bit-identically. With shards larger than the buffer that is one or two shards whatever
the position in the epoch; the old resume replayed every sample drawn this epoch. A cursor is about
11 bytes per buffer slot plus 3.3 KB.

``read_shard(url, skips, count_from)`` yields ``(index, sample)`` for every kept sample of a shard and
counts skips only from sample ``count_from`` on (what comes before was counted before the restart).
"""

from __future__ import annotations

import base64
import itertools
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import numpy as np

log = logging.getLogger(__name__)

ShardReader = Callable[[str, Counter, int], Iterator[tuple[int, dict]]]


def _text(data: bytes) -> str:
    """Bytes as base64 text. A checkpoint holds text, not bytes: pickle writes an empty ``bytes`` as a call
    of the ``bytes`` global, which ``torch.load(weights_only=True)`` (our exports, Lightning's resume)
    refuses, so a checkpoint taken while a shuffle buffer was empty could not be loaded."""
    return base64.b64encode(data).decode("ascii")


def _bytes(data: str | bytes) -> bytes:
    return data if isinstance(data, bytes) else base64.b64decode(data)  # bytes: a cursor saved before


def _pack(provenance: Iterable[int]) -> str:
    return _text(np.fromiter(provenance, dtype=np.int64).tobytes())


def _unpack(data: str | bytes) -> list[tuple[int, int]]:
    return [(int(p) >> 32, int(p) & 0xFFFFFFFF) for p in np.frombuffer(_bytes(data), dtype=np.int64)]


def rng_state(rng: random.Random) -> str:
    version, words, _ = rng.getstate()
    assert version == 3, version
    return _text(np.asarray(words, dtype=np.uint32).tobytes())


def set_rng_state(rng: random.Random, data: str | bytes) -> None:
    rng.setstate((3, tuple(int(w) for w in np.frombuffer(_bytes(data), dtype=np.uint32)), None))


class SampleStream:
    """Raw samples of a shard sequence through a shuffle buffer of ``buffer_size`` (<= 1: no shuffle).

    ``shard_sequence()`` yields the stream's shard urls in order (finite in epoch mode, endless when
    resampling); it must give the same sequence every call. ``seed`` seeds the shuffle. Iterate once;
    ``cursor()`` is the position after the last sample yielded, ``SampleStream(..., cursor=c)``
    continues from it.
    """

    def __init__(
        self,
        shard_sequence: Callable[[], Iterator[str]],
        read_shard: ShardReader,
        skips: Counter,
        *,
        buffer_size: int,
        seed: int,
        cursor: dict | None = None,
    ) -> None:
        self.shard_sequence, self.read_shard, self.skips = shard_sequence, read_shard, skips
        self.size = buffer_size if buffer_size > 1 else 0
        self.rng = random.Random(seed)
        self.start = cursor
        self.buffer: list[tuple[dict, int]] = []  # (sample, provenance) per slot
        self.shard, self.offset = 0, 0  # next sample to enter the buffer: sample `offset` of shard `shard`
        self.flushing = False
        # a restart: the buffer's slots (shard, sample) until every sample is read back into _found
        self._slots: list[tuple[int, int]] | None = None
        self._found: dict[tuple[int, int], dict] = {}

    def cursor(self) -> dict:
        return {
            "shard": self.shard,
            "offset": self.offset,
            "buffer": _pack(p for _, p in self.buffer),
            "flushing": self.flushing,
            "rng": rng_state(self.rng),
        }

    def __iter__(self) -> Iterator[dict]:
        source = self._restored() if self.start is not None else self._read(0, 0, set())
        if self.size == 0:
            yield from (sample for sample, _ in source)
            return
        if not self.flushing:
            for sample, provenance in source:
                if len(self.buffer) < self.size:
                    self.buffer.append((sample, provenance))
                    continue
                i = self.rng.randrange(len(self.buffer))
                self.buffer[i], (out, _) = (sample, provenance), self.buffer[i]
                yield out
            self.rng.shuffle(self.buffer)
            self.flushing = True
        while self.buffer:
            yield self.buffer.pop(0)[0]

    def _read(self, first: int, offset: int, wanted: set[int]) -> Iterator[tuple[dict, int]]:
        """(sample, provenance) from sample ``offset`` of shard ``first`` on. Samples of that shard before
        ``offset`` are read again (a pipe cannot seek) and kept only if in ``wanted`` (a restart)."""
        end = first
        for index, url in enumerate(itertools.islice(self.shard_sequence(), first, None), first):
            end = index + 1
            start = offset if index == first else 0
            for j, sample in self.read_shard(url, self.skips, start):
                if j < start:
                    if j in wanted:
                        self._found[(index, j)] = sample
                    continue
                self._refill()
                self.shard, self.offset = index, j + 1
                yield sample, (index << 32) | j
        self._refill()
        self.shard, self.offset = end, 0  # the sequence is exhausted

    def _restored(self) -> Iterator[tuple[dict, int]]:
        cursor = self.start
        set_rng_state(self.rng, cursor["rng"])
        self.flushing = bool(cursor["flushing"])
        self.shard, self.offset = int(cursor["shard"]), int(cursor["offset"])
        self._slots = _unpack(cursor["buffer"])
        wanted: dict[int, set[int]] = {}
        for k, j in self._slots:
            wanted.setdefault(k, set()).add(j)
        older = sorted(k for k in wanted if k < self.shard)
        urls = list(itertools.islice(self.shard_sequence(), older[-1] + 1)) if older else []
        for k in older:  # shards behind the cursor: read up to their last buffered sample only
            reader = self.read_shard(urls[k], Counter(), 1 << 62)  # nothing counted: it was before
            for j, sample in reader:
                if j in wanted[k]:
                    self._found[(k, j)] = sample
                if j >= max(wanted[k]):
                    reader.close()
                    break
        if self.flushing:  # the sequence was exhausted: the buffer drains
            self._refill()
            return iter(())
        return self._read(self.shard, self.offset, wanted.get(self.shard, set()))

    def _refill(self) -> None:
        """Put the samples read back into their slots (before the first draw after a restart)."""
        if self._slots is None:
            return
        slots, self._slots = self._slots, None
        missing = [s for s in slots if s not in self._found]
        if missing:  # the data changed under the checkpoint: continue without those samples
            log.warning(
                "data: %d samples held in the shuffle buffer at the checkpoint are no longer in their "
                "shards (first: shard %d of this stream, sample %d); continuing without them",
                len(missing),
                *missing[0],
            )
        self.buffer = [(self._found.pop(s), (s[0] << 32) | s[1]) for s in slots if s in self._found]
        self._found = {}
