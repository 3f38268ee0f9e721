"""data/stream.py: a stream restored from its cursor continues bit-identically and reads only about
one shuffle buffer's worth of shards, wherever in the epoch it stopped."""

from __future__ import annotations

import base64
import itertools
import random
from collections import Counter

import pytest
import torch

from data.pipeline import ShardDataset
from data.stream import SampleStream


class FakeShards:
    """In-memory shards; counts the samples each open reads (what a restart costs)."""

    def __init__(self, sizes: list[int]) -> None:
        self.urls = [f"s{k}" for k in range(len(sizes))]
        self.data = {url: [f"{url}/{j}" for j in range(n)] for url, n in zip(self.urls, sizes)}
        self.opened: list[str] = []
        self.read = 0

    def read_shard(self, url: str, skips: Counter, count_from: int = 0):
        self.opened.append(url)
        for j, key in enumerate(self.data[url]):
            self.read += 1
            yield j, {"__key__": key}


def _stream(shards: FakeShards, buffer: int, cursor=None, endless: bool = False) -> SampleStream:
    def sequence():
        if not endless:
            return iter(shards.urls)
        rng = random.Random(3)
        return (rng.choice(shards.urls) for _ in itertools.count())

    return SampleStream(sequence, shards.read_shard, Counter(), buffer_size=buffer, seed=7, cursor=cursor)


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Every shard the pipeline opens, in order (what a restart reads)."""
    import data.pipeline as pipeline

    urls: list[str] = []
    real_open = pipeline.open_shard
    monkeypatch.setattr(pipeline, "open_shard", lambda url: urls.append(url) or real_open(url))
    return urls


@pytest.mark.parametrize("buffer", [0, 1, 5, 40])
def test_a_stream_continued_from_its_cursor_at_every_position_equals_the_uninterrupted_one(buffer):
    shards = FakeShards([13, 0, 9, 21, 4, 17])
    full = [s["__key__"] for s in _stream(shards, buffer)]
    assert sorted(full) == sorted(k for keys in shards.data.values() for k in keys)
    for stop in range(len(full) + 1):
        first = _stream(shards, buffer)
        it = iter(first)
        head = [next(it)["__key__"] for _ in range(stop)]
        cursor = first.cursor()
        rest = [s["__key__"] for s in _stream(shards, buffer, cursor=cursor)]
        assert head + rest == full, stop


def test_an_endless_resampled_stream_continues_from_its_cursor():
    shards = FakeShards([6, 3, 8, 5])
    reference = list(itertools.islice((s["__key__"] for s in _stream(shards, 10, endless=True)), 200))
    first = _stream(shards, 10, endless=True)
    it = iter(first)
    head = [next(it)["__key__"] for _ in range(137)]
    rest = _stream(shards, 10, cursor=first.cursor(), endless=True)
    assert head + [s["__key__"] for s in itertools.islice(rest, 63)] == reference


def test_a_restart_reads_about_one_buffer_not_the_epoch():
    sizes = [100] * 50  # 5,000 samples, buffer 100
    shards = FakeShards(sizes)
    full = [s["__key__"] for s in _stream(shards, 100)]
    costs = {}
    for fraction in (0.1, 0.5, 0.9):
        first = _stream(shards, 100)
        it = iter(first)
        stop = int(fraction * len(full))
        for _ in range(stop):
            next(it)
        shards.read = 0
        resumed = _stream(shards, 100, cursor=first.cursor())
        rest = [s["__key__"] for s in resumed]
        assert full[:stop] + rest == full
        costs[fraction] = shards.read - (len(full) - stop)  # samples read again, beyond the new ones
    # The samples read again: the shard in progress (< 100) plus the starts of the few older shards the
    # buffer still holds samples of; the same at 90% as at 10% of the epoch (replaying read 4,500).
    assert all(cost <= 500 for cost in costs.values()), costs
    assert costs[0.9] < 3 * costs[0.1] + 200, costs


def test_the_cursor_is_small_and_stores_in_a_weights_only_checkpoint(tmp_path):
    shards = FakeShards([50] * 4)
    stream = _stream(shards, 40)
    it = iter(stream)
    for _ in range(60):
        next(it)
    cursor = stream.cursor()
    assert len(cursor["buffer"]) == 428 and len(cursor["rng"]) == 3336  # 8 x 40 and 4 x 625 bytes, base64
    torch.save({"cursor": cursor}, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)["cursor"]
    rest = [s["__key__"] for s in _stream(shards, 40, cursor=loaded)]
    assert len(rest) == 200 - 60
    # a cursor taken when the buffer is empty (before the first sample, or drained) loads too
    empty = _stream(shards, 40).cursor()
    torch.save({"cursor": empty}, tmp_path / "e.pt")
    loaded = torch.load(tmp_path / "e.pt", weights_only=True)["cursor"]
    assert len([s["__key__"] for s in _stream(shards, 40, cursor=loaded)]) == 200
    # a cursor saved as bytes (before the change to text) still restores
    old = {**cursor, "buffer": base64.b64decode(cursor["buffer"]), "rng": base64.b64decode(cursor["rng"])}
    assert [s["__key__"] for s in _stream(shards, 40, cursor=old)] == rest


def test_a_restart_through_the_pipeline_reopens_few_shards_and_replays_none(make_shards, opened):
    """ShardDataset with real tars: resuming at ~90% of the epoch opens 2 shards of 12 for the rest."""
    directory, keys = make_shards([10] * 12)

    def dataset():
        return ShardDataset(str(directory), batch_size=4, image_size=8, shuffle_buffer=6, seed=1)

    full = [b["__key__"] for b in dataset() if b["__key__"]]
    states = []
    ds = dataset()
    for batch in ds:
        if batch["__key__"]:
            states.append(batch["__state__"])
    stop = 27  # of 30 batches
    saved = states[stop - 1]["streams"][0]
    resumed = dataset()
    resumed.start_positions = {(0, 0): saved["position"]}
    resumed.start_skips = {(0, 0): saved["skips"]}
    resumed.start_cursors = {(0, 0): saved["cursor"]}
    opened.clear()
    rest = [b["__key__"] for b in resumed if b["__key__"]]
    assert rest == full[stop:]
    assert len(opened) <= 3, opened
    # Negative control: without the cursor (a checkpoint from before them) every shard is read again.
    resumed.start_cursors = {}
    opened.clear()
    assert [b["__key__"] for b in resumed if b["__key__"]] == full[stop:]
    assert len(opened) == 12


def test_bench_resume_prints_the_table_and_checks_every_restart(tmp_path, capsys):
    """`python -m eval.bench_resume` at a tiny size (CI): restarts through the throttled pipe continue with
    the right batch; at 90% the cursor opens fewer shards and reads fewer bytes than the replay."""
    import json

    from eval.bench_resume import main

    out = tmp_path / "rows.json"
    argv = ["--shards", "8", "--shard-size", "40", "--buffer", "4", "--batch", "8", "--workers", "1"]
    argv += ["--repeats", "1", "--rate", "2e7", "--latency", "0", "--dir", str(tmp_path), "--json", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| 90% |" in text and "every data restart continued" in text
    rows = {r["position"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows[0.9]["cursor_shards"] <= 3 < rows[0.9]["replay_shards"] == 8
    assert rows[0.9]["cursor_mb"] < rows[0.9]["replay_mb"] / 3


def test_a_resampled_stream_resumes_from_its_cursor_through_the_pipeline(make_shards, opened):
    """data.mode=resampled: shards drawn with replacement; a restart continues the same draws exactly and
    opens only the shards its buffer still holds samples of (the replay opened every draw so far)."""
    directory, _ = make_shards([6, 9, 4, 7])

    def dataset():
        return ShardDataset(
            str(directory),
            batch_size=3,
            image_size=8,
            shuffle_buffer=5,
            seed=2,
            mode="resampled",
            num_samples=10**6,
        )

    reference, states = [], []
    for batch in dataset():
        reference.append(batch["__key__"])
        states.append(batch["__state__"]["streams"][0])
        if len(reference) == 40:
            break
    saved = states[24]
    resumed = dataset()
    resumed.start_positions = {(0, 0): saved["position"]}
    resumed.start_skips = {(0, 0): saved["skips"]}
    resumed.start_cursors = {(0, 0): saved["cursor"]}
    opened.clear()
    rest = []
    for batch in resumed:
        rest.append(batch["__key__"])
        if len(rest) == 1:
            reopened = len(opened)
        if len(rest) == 15:
            break
    assert rest == reference[25:]
    assert reopened <= 4 and saved["cursor"]["shard"] >= 10, (reopened, saved["cursor"]["shard"])


def test_the_shuffle_swaps_a_random_slot_of_the_buffer_then_shuffles_what_is_left():
    """The order itself, against the algorithm written out: every slot, the last one too, can be swapped
    out while the shards last; what remains is shuffled once, then drained."""
    shards = FakeShards([13, 0, 9, 21, 4, 17])
    keys = [k for url in shards.urls for k in shards.data[url]]
    rng, buffer, expected = random.Random(7), [], []
    for key in keys:
        if len(buffer) < 5:
            buffer.append(key)
            continue
        i = rng.randrange(len(buffer))
        expected.append(buffer[i])
        buffer[i] = key
    rng.shuffle(buffer)
    expected += buffer
    assert [s["__key__"] for s in _stream(shards, 5)] == expected


class CorruptShards(FakeShards):
    """Every third sample of a shard is corrupt: skipped, and counted from sample ``count_from`` on, as
    data/pipeline.py's reader does."""

    def read_shard(self, url: str, skips: Counter, count_from: int = 0):
        kept = 0
        for n, key in enumerate(self.data[url]):
            if n % 3 == 2:
                if kept >= count_from:
                    skips["corrupt"] += 1
                continue
            yield kept, {"__key__": key}
            kept += 1


def test_a_restored_stream_counts_each_corrupt_sample_once():
    """Shards behind the cursor are read again for the samples still in the buffer: their corrupt ones
    were counted before the restart, and must not be counted again."""
    shards = CorruptShards([7, 5, 8, 3, 9])
    full = _stream(shards, 6)
    keys = [s["__key__"] for s in full]
    assert full.skips["corrupt"] == sum(n // 3 for n in (7, 5, 8, 3, 9)) == 9
    for stop in range(len(keys) + 1):
        first = _stream(shards, 6)
        it = iter(first)
        head = [next(it)["__key__"] for _ in range(stop)]
        rest = _stream(shards, 6, cursor=first.cursor())
        assert head + [s["__key__"] for s in rest] == keys, stop
        assert first.skips["corrupt"] + rest.skips["corrupt"] == 9, stop
