"""DataModule: global batch arithmetic, normalisation on the device, rank-synchronised epochs."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data.datamodule import ShardDataModule, per_device_batch_size
from data.loader import RankSyncedLoader
from data.pipeline import ShardDataset
from data.transforms import CLIP_MEAN, CLIP_STD, Normalize


@pytest.mark.parametrize(
    ("global_batch", "world", "accumulate", "expected"),
    [(128, 1, 1, 128), (128, 2, 1, 64), (128, 4, 2, 16), (96, 3, 1, 32)],
)
def test_per_device_batch_divides(global_batch, world, accumulate, expected):
    assert per_device_batch_size(global_batch, world, accumulate) == expected


def test_per_device_batch_that_does_not_divide_is_an_error_naming_the_options():
    with pytest.raises(
        ValueError,
        match=r"data.global_batch_size=100 is not divisible by world size 3 x "
        r"trainer.accumulate_grad_batches=1 = 3",
    ):
        per_device_batch_size(100, 3, 1)
    with pytest.raises(ValueError, match="must be >= 1"):
        per_device_batch_size(0, 1, 1)


def test_datamodule_batches_are_normalised_on_transfer(make_shards):
    shards, keys = make_shards([6, 5])
    dm = ShardDataModule(
        train_shards=str(shards),
        val_shards=str(shards),
        global_batch_size=4,
        num_workers=0,
        image_size=32,
        normalize="minus_one_one",
        tokenizer=None,
        shuffle_buffer=4,
    )
    dm.setup("fit")
    assert dm.batch_size == 4
    batches = list(dm.train_dataloader())
    # drop_last in training: 11 samples -> 2 full batches of 4, 3 counted as partial_batch_dropped
    assert [len(b["__key__"]) for b in batches] == [4, 4]
    assert dm.skip_counts()["partial_batch_dropped"] == 3
    batch = dm.on_after_batch_transfer(batches[0], 0)
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (4, 3, 32, 32)
    # the fixture's images are uniform (200, 30, 30): [-1, 1] scaling of those values
    torch.testing.assert_close(batch["image"][:, 0].mean(), torch.tensor(200 / 127.5 - 1), atol=0.03, rtol=0)
    # validation keeps every sample (no drop_last, no rank sync)
    val = list(dm.val_dataloader())
    assert sorted(k for b in val for k in b["__key__"]) == sorted(keys)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, shards: str, workers: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ds = ShardDataset(
            shards,
            batch_size=2,
            image_size=None,
            tokenizer=None,
            shuffle_buffer=0,
            require_caption=True,
            seed=3,
            drop_last=True,
        )
        ds.rank, ds.world_size = rank, world
        # Workers forked, as under torchrun or Lightning's launcher (this process was spawned, and spawned
        # processes spawn their workers too: 2 s of imports per epoch)
        context = "fork" if workers else None
        loader = RankSyncedLoader(
            torch.utils.data.DataLoader(
                ds, batch_size=None, num_workers=workers, multiprocessing_context=context
            ),
            dist.new_group(backend="gloo"),
        )
        for _ in range(2):  # two epochs: the vote must not leave a collective dangling between epochs
            keys = [k for batch in loader for k in batch["__key__"]]
            dist.barrier()
        counts = loader.skip_counts()
        out[rank] = {"keys": keys, "dropped": counts["epoch_tail_dropped"] + counts["partial_batch_dropped"]}
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
@pytest.mark.parametrize("workers", [0, 2])
def test_uneven_shards_end_the_epoch_together_without_deadlock(make_shards, workers):
    # Rank 0 gets far more data than rank 1 (shard order is seeded; sizes chosen so the split is uneven).
    shards, keys = make_shards([9, 1, 7, 0, 2, 0])
    world = 2
    with mp.Manager() as manager:
        out = manager.dict()
        ctx = mp.start_processes(
            _rank_main,
            args=(world, _free_port(), str(shards), workers, out),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        for p in ctx.processes:
            p.join(timeout=120)
        alive = [p for p in ctx.processes if p.is_alive()]
        for p in alive:
            p.kill()
        assert not alive, "a rank hung: uneven shards deadlocked the epoch"
        assert all(p.exitcode == 0 for p in ctx.processes), [p.exitcode for p in ctx.processes]
        result = dict(out)
    seen = result[0]["keys"] + result[1]["keys"]
    assert len(result[0]["keys"]) == len(result[1]["keys"]), "ranks must take the same number of steps"
    assert len(seen) == len(set(seen)), "no sample twice in an epoch"
    dropped = result[0]["dropped"] + result[1]["dropped"]
    assert dropped > 0, "the test data must actually be uneven"
    assert len(seen) + dropped == len(keys), "every sample is either seen or counted as dropped"


# ---- exact resume: the data position ------------------------------------------------------------


def _synced(directory, workers: int) -> RankSyncedLoader:
    ds = ShardDataset(str(directory), batch_size=2, image_size=8, shuffle_buffer=3, seed=5)
    return RankSyncedLoader(
        torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, generator=torch.Generator())
    )


def _train_interrupted(directory, workers: int, stops: list[int], consumed_only: bool = True) -> list:
    """Train (consume) batches, stopping after each count in ``stops`` the way a killed run does (the
    trainer's fetcher already holds the next batch) and resuming from the saved position."""
    trained: list[list[str]] = []
    state = None
    for stop_after in [*stops, None]:
        loader = _synced(directory, workers)
        if state is not None:
            loader.restore(state)
        iterator = iter(loader)
        for n, batch in enumerate(iterator, start=1):
            loader.mark_consumed()
            trained.append(batch["__key__"])
            if n == stop_after:
                next(iterator)  # prefetched, never trained
                state = loader.position_state()
                if not consumed_only:  # what saving the loader's latest state would do
                    state["streams"] = {
                        (v, w): {"position": st["position"], "skips": st["skips"]}
                        for w, record in loader.worker_states.items()
                        for v, st in record["streams"].items()
                    }
                break
    return trained


@pytest.mark.parametrize("workers", [0, 2])
def test_interrupted_twice_an_epoch_trains_every_key_once_in_the_uninterrupted_order(make_shards, workers):
    directory, keys = make_shards([7, 5, 6, 4])
    uninterrupted = [b["__key__"] for b in _synced(directory, workers)]
    trained = _train_interrupted(directory, workers, stops=[3, 2])
    assert trained == uninterrupted  # same batches, same round-robin order over workers
    flat = [k for b in trained for k in b]
    assert sorted(flat) == sorted(keys) and len(set(flat)) == len(keys)
    # Negative control: the position of the last batch *fetched* (one ahead of training) loses data.
    lossy = [k for b in _train_interrupted(directory, workers, [3, 2], consumed_only=False) for k in b]
    assert len(lossy) < len(keys) and set(lossy) < set(keys)


# ---- another world size: save on 2 ranks, continue on 1 ---------------------------------------------


def _rank_loader(
    directory, workers: int, rank: int, world: int, batch: int, persistent: bool = False
) -> RankSyncedLoader:
    ds = ShardDataset(
        str(directory), batch_size=batch, image_size=8, shuffle_buffer=3, seed=5, drop_last=True
    )
    ds.rank, ds.world_size = rank, world
    return RankSyncedLoader(
        torch.utils.data.DataLoader(
            ds,
            batch_size=None,
            num_workers=workers,
            generator=torch.Generator(),
            persistent_workers=persistent,
        )
    )


def _epoch(loader: RankSyncedLoader, epoch: int, batches: int | None = None) -> list[list[str]]:
    """The keys of an epoch's batches (the first ``batches`` of them), each consumed by a step."""
    loader.epoch_fn = lambda: epoch
    keys = []
    for batch in loader:
        loader.mark_consumed()
        keys.append(batch["__key__"])
        if len(keys) == batches:
            break
    return keys


def _worker_pids(loader: RankSyncedLoader) -> list[int]:
    return [w.pid for w in loader.loader._iterator._workers]


def test_persistent_workers_play_each_new_epoch_and_a_resume_position(make_shards):
    directory, _ = make_shards([6, 6, 6, 6])
    fresh = [_epoch(_rank_loader(directory, 2, 0, 1, 2), e) for e in range(4)]  # workers started per epoch
    assert len({str(keys) for keys in fresh}) == 4  # each epoch its own order

    loader = _rank_loader(directory, 2, 0, 1, 2, persistent=True)
    assert _epoch(loader, 0) == fresh[0]
    pids = _worker_pids(loader)
    assert _epoch(loader, 1) == fresh[1]  # the same processes, the new epoch's order
    assert _epoch(loader, 2, batches=3) == fresh[2][:3]  # left after 3 batches (a limit, a stop)
    assert _epoch(loader, 3) == fresh[3]
    assert _worker_pids(loader) == pids

    # A resume position: new workers start from it (the old ones hold their start's fields)
    reference = _rank_loader(directory, 2, 0, 1, 2)
    _epoch(reference, 1, batches=5)
    loader.restore(reference.position_state())
    assert _epoch(loader, 1) == fresh[1][5:]
    assert _worker_pids(loader) != pids
    assert _epoch(loader, 2) == fresh[2]  # and the epoch after it from the start

    processes = loader.loader._iterator._workers
    loader.close()
    assert loader.loader._iterator is None and not any(p.is_alive() for p in processes)


def test_persistent_workers_stop_cleanly_when_their_loader_is_dropped_or_a_fit_fails(make_shards):
    """Dropped mid-epoch, a loader's workers exit on their own (exit code 0, not killed) when it is
    collected. A fit that fails stops them (Lightning's teardown, through the loader's ``_iterator``):
    before, they ran on until the garbage collector reached the DataLoader, whose clean-up could then no
    longer tell them to stop (test_embeddings' resume test waited 5 s for each of its workers)."""
    import gc

    import pytorch_lightning as pl

    shards, _ = make_shards([200, 200])  # the workers are still reading when the loader is dropped
    options = dict(train_shards=str(shards), global_batch_size=2, num_workers=2, image_size=8, tokenizer=None)
    dm = ShardDataModule(**options)
    dm.setup("fit")
    loader = dm.train_dataloader()  # the DataModule and its loader refer to each other: a cycle
    iterator = iter(loader)
    next(iterator)
    processes = loader.loader._iterator._workers
    del dm, loader, iterator
    gc.collect()
    for p in processes:
        p.join(timeout=30)
    assert [p.exitcode for p in processes] == [0, 0]

    class Fails(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def training_step(self, batch, batch_idx):
            if self.global_step == 2:
                raise RuntimeError("a failing step")
            return self.w * batch["image"].float().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = ShardDataModule(**options)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    with pytest.raises(RuntimeError, match="a failing step"):
        trainer.fit(Fails(), datamodule=dm)
    assert dm._train_loader.loader._iterator is None


def test_a_datamodule_restored_for_a_second_fit_resumes_in_the_loader_that_fit_makes(make_shards):
    shards, _ = make_shards([6, 6])

    def dm() -> ShardDataModule:
        module = ShardDataModule(train_shards=str(shards), global_batch_size=2, num_workers=0, image_size=8)
        module.setup("fit")
        return module

    epoch = [b["__key__"] for b in dm().train_dataloader()]
    first = dm()
    loader = first.train_dataloader()
    for _, _batch in zip(range(3), loader):
        loader.mark_consumed()
    state = first.state_dict()
    # Lightning restores the DataModule before it asks for the next fit's loader
    first.load_state_dict(state)
    assert [b["__key__"] for b in first.train_dataloader()] == epoch[3:]


def test_the_saved_position_counts_the_batches_that_entered_a_training_step(make_shards):
    """Lightning fetches a batch ahead of the step: the DataModule marks a batch consumed as it enters a
    training step (``on_before_batch_transfer`` while training), not when it is fetched or validated."""
    from types import SimpleNamespace

    shards, _ = make_shards([6, 6])

    def dm() -> ShardDataModule:
        module = ShardDataModule(train_shards=str(shards), global_batch_size=2, num_workers=0, image_size=8)
        module.trainer = SimpleNamespace(training=True, world_size=1, global_rank=0, current_epoch=0,
                                         accumulate_grad_batches=1)  # fmt: skip
        module.setup("fit")
        return module

    epoch = [b["__key__"] for b in dm().train_dataloader()]
    first = dm()
    batches = iter(first.train_dataloader())
    for _ in range(3):
        first.on_before_batch_transfer(next(batches), 0)
    fetched = next(batches)  # fetched, not yet in a step
    first.trainer.training = False  # a validation batch in between
    first.on_before_batch_transfer(fetched, 0)
    second = dm()
    second.load_state_dict(first.state_dict())
    assert [b["__key__"] for b in second.train_dataloader()] == epoch[3:]


def test_a_shard_list_changed_mid_epoch_is_refused_and_a_moved_dataset_resumes(make_shards, tmp_path):
    """The saved positions index the shard list: with a shard deleted (a corrupt one removed from a
    directory spec) the resumed epoch read 6 samples twice and never read 10 others, without a word. A
    changed list is now a layout change (refused, or the epoch restarts); the same shards moved whole to
    another directory resume exactly."""
    import shutil

    from data.resume import shard_list_id

    shards, _ = make_shards([3, 3, 3, 3])

    def dm(path, **kw) -> ShardDataModule:
        module = ShardDataModule(
            train_shards=str(path), global_batch_size=2, num_workers=0, image_size=8, **kw
        )
        module.setup("fit")
        return module

    epoch = [k for b in dm(shards).train_dataloader() for k in b["__key__"]]
    first = dm(shards)
    loader = first.train_dataloader()
    for _, _batch in zip(range(2), loader):
        loader.mark_consumed()
    state = first.state_dict()
    assert state["shards"].startswith("4 shards, crc ")
    moved = tmp_path / "moved"
    shutil.copytree(shards, moved)
    again = dm(moved)
    again.load_state_dict(state)
    assert [k for b in again.train_dataloader() for k in b["__key__"]] == epoch[4:]
    (moved / "00003.tar").unlink()
    with pytest.raises(
        ValueError, match=r"data.train_shards listing 3 shards, crc .* \(saved: 4 shards"
    ) as e:
        dm(moved).load_state_dict(state)
    assert "some of them moved" not in str(e.value)
    # two directories, one of them moved: the same shards, but not relative to one common parent; said so
    parts = tmp_path / "parts"
    for name, files in (("a", ["00000.tar", "00001.tar"]), ("b", ["00002.tar", "00003.tar"])):
        (parts / name).mkdir(parents=True)
        for f in files:
            shutil.copy(shards / f, parts / name / f)
    two = dm(f"{parts / 'a'}::{parts / 'b'}")
    loader = two.train_dataloader()
    for _, _batch in zip(range(2), loader):
        loader.mark_consumed()
    saved_two = two.state_dict()
    shutil.move(parts / "b", tmp_path / "b_moved")
    with pytest.raises(ValueError, match=r"saved: 4 shards.*some of them moved and not the others"):
        dm(f"{parts / 'a'}::{tmp_path / 'b_moved'}").load_state_dict(saved_two)
    restart = dm(moved, on_layout_change="restart_epoch")
    restart.load_state_dict(state)  # warns, and the epoch starts over
    assert restart._resume_state is None
    mixed = ["rel/0.tar", "/abs/1.tar", "pipe:cat 2.tar"]  # no common directory: compared as given
    assert shard_list_id(mixed) != shard_list_id(mixed[::-1]) and shard_list_id(mixed).startswith("3 shards")


def test_the_train_loader_keeps_its_workers_through_the_fit_and_validation_does_not(make_shards):
    shards, _ = make_shards([4, 4])
    options = dict(train_shards=str(shards), val_shards=str(shards), global_batch_size=2, num_workers=2)
    dm = ShardDataModule(**options, image_size=8, tokenizer=None)
    dm.setup("fit")
    train, val = dm.train_dataloader(), dm.val_dataloader()
    assert train.loader.persistent_workers and not val.loader.persistent_workers
    list(train)
    processes = train.loader._iterator._workers
    train._iterator = None  # what Lightning's teardown does at the fit's end
    assert not any(p.is_alive() for p in processes)
    dm = ShardDataModule(**options, image_size=8, tokenizer=None, persistent_workers=False)
    dm.setup("fit")
    assert not dm.train_dataloader().loader.persistent_workers


def _saved_on_two_ranks(directory, workers: int, steps: int) -> tuple[dict, list[list[str]]]:
    """Train ``steps`` steps on 2 ranks (batch 2 each), stopped the way a killed run is (the fetcher holds
    the next batch); the DataModule's checkpoint state and the global batches trained."""
    loaders = [_rank_loader(directory, workers, r, 2, 2) for r in range(2)]
    iterators = [iter(loader) for loader in loaders]
    trained = []
    for _ in range(steps):
        batches = [next(it) for it in iterators]
        for loader in loaders:
            loader.mark_consumed()
        trained.append(batches[0]["__key__"] + batches[1]["__key__"])
    for it in iterators:
        next(it)  # prefetched, never trained
    state = {
        "version": 2,
        "world_size": 2,
        "data_world_size": 2,
        "batch_per_data_rank": 2,
        "num_workers": workers,
        "mode": "epoch",
        "seed": 5,
        "ranks": [loader.position_state() for loader in loaders],
    }
    return state, trained


@pytest.mark.parametrize("workers", [0, 2])
def test_saved_on_two_ranks_the_epoch_continues_on_one_exactly_once_with_the_same_global_batches(
    make_shards, workers
):
    directory, keys = make_shards([6, 6, 6, 6])  # one shard per (rank, worker) with 2 workers
    reference = [
        a["__key__"] + b["__key__"]
        for a, b in zip(_rank_loader(directory, workers, 0, 2, 2), _rank_loader(directory, workers, 1, 2, 2))
    ]
    state, before = _saved_on_two_ranks(directory, workers, steps=2)
    assert before == reference[:2]
    state = torch.load(_roundtrip(state), weights_only=True)  # as a checkpoint stores it
    dm = ShardDataModule(train_shards=str(directory), global_batch_size=4, num_workers=workers, seed=5)
    dm.load_state_dict(state)  # 1 rank, per-device batch 4 = 2 data ranks x 2
    resumed = dm._resume_state
    assert resumed["data_ranks"] == [0, 1] and resumed["data_world_size"] == 2
    loader = _rank_loader(directory, workers, 0, 1, 4)
    loader.restore(resumed)
    after = []
    for batch in loader:
        loader.mark_consumed()
        after.append(batch["__key__"])
    assert after == reference[2:]  # every later step trains the global batch the 2-rank run would have
    flat = [k for b in before + after for k in b]
    assert sorted(flat) == sorted(keys)
    # The data position saved on the 1-rank run names both data ranks, so it can resume again: with the
    # batch of each (2, not the rank's 4), which a later layout is planned from.
    assert {v for v, _ in loader.position_state()["streams"]} == {0, 1}
    dm._train_loader = loader
    saved = dm.state_dict()
    assert (saved["world_size"], saved["data_world_size"], saved["batch_per_data_rank"]) == (1, 2, 2)
    # Negative control: continuing rank 0's saved position as if it were the only rank (the data split
    # of a fresh 1-rank run) trains other batches, and samples twice.
    alone = _rank_loader(directory, workers, 0, 1, 4)
    alone.restore({**state["ranks"][0], "data_ranks": [0], "data_world_size": 1})
    naive = [k for b in before for k in b] + [k for b in alone for k in b["__key__"]]
    assert len(naive) > len(set(naive))


def test_uneven_data_continued_on_fewer_ranks_is_still_trained_exactly_once(make_shards):
    directory, keys = make_shards([7, 5, 6, 4, 3, 9, 1])
    state, before = _saved_on_two_ranks(directory, 2, steps=3)
    dm = ShardDataModule(train_shards=str(directory), global_batch_size=4, num_workers=2, seed=5)
    dm.load_state_dict(state)
    loader = _rank_loader(directory, 2, 0, 1, 4)
    loader.restore(dm._resume_state)
    after = []
    for batch in loader:
        loader.mark_consumed()
        after.append(batch["__key__"])
    flat = [k for b in before + after for k in b]
    dropped = loader.skip_counts()["partial_batch_dropped"]
    assert len(flat) == len(set(flat)), "no sample twice"
    assert len(flat) + dropped == len(keys) and dropped < 4 * 2, (len(flat), dropped)


def _roundtrip(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def _layout_state(**overrides) -> dict:
    rank = {
        "epoch": 0,
        "data_ranks": [0],
        "data_world_size": 2,
        "streams": {(0, 0): {"position": 8, "skips": {}}},
        "last_worker": 0,
        "tail_dropped": 0,
    }
    state = {
        "version": 2,
        "world_size": 2,
        "data_world_size": 2,
        "batch_per_data_rank": 4,
        "num_workers": 2,
        "mode": "epoch",
        "seed": 0,
        "ranks": [rank, {**rank, "data_ranks": [1], "streams": {(1, 0): {"position": 8, "skips": {}}}}],
    }
    return {**state, **overrides}


class _Trainer:
    def __init__(self, world_size: int, global_rank: int = 0) -> None:
        self.world_size, self.global_rank = world_size, global_rank


@pytest.mark.parametrize(
    ("world", "dm_kw", "named"),
    [
        (1, {"num_workers": 3}, "data.num_workers=3 (saved 2)"),
        (1, {"seed": 1}, "data.seed=1 (saved 0)"),
        (3, {"global_batch_size": 12}, "3 ranks (the saved epoch is split into 2 data ranks"),
        (1, {"global_batch_size": 4}, "a per-device batch of 4 (continuing 2 data ranks of 4 each needs 8"),
        (4, {"global_batch_size": 8}, "4 ranks (a checkpoint from before stream cursors)"),
        (
            4,
            {"global_batch_size": 16},
            "a per-device batch of 4 (each of the 2 saved data ranks of 4 continues",
        ),
    ],
)
def test_another_layout_that_cannot_continue_exactly_once_is_refused_naming_it(world, dm_kw, named):
    kw = {"train_shards": "unused", "num_workers": 2, "seed": 0, "global_batch_size": 8, **dm_kw}
    dm = ShardDataModule(**kw)
    dm.trainer = _Trainer(world)
    with pytest.raises(ValueError, match="data.on_layout_change=restart_epoch") as err:
        dm.load_state_dict(_layout_state())
    assert named in str(err.value)
    restart = ShardDataModule(**kw, on_layout_change="restart_epoch")
    restart.trainer = _Trainer(world)
    restart.load_state_dict(_layout_state())  # warns, and the epoch starts over
    assert restart._resume_state is None


# ---- more ranks: save on 2, continue on 4 ----------------------------------------------------------


def _train_ranks(loaders: list[RankSyncedLoader], steps: int | None) -> tuple[list[list[str]], int]:
    """Step the ranks together the way RankSyncedLoader's vote does (all stop when one is dry): the global
    batches trained, and the samples the other ranks still held (counted as dropped). ``steps``: stop
    after that many like a killed run (each rank's fetcher one batch ahead)."""
    iterators = [iter(loader) for loader in loaders]
    trained, dropped = [], 0
    while steps is None or len(trained) < steps:
        batches = [next(it, None) for it in iterators]
        if any(b is None for b in batches):
            dropped += sum(len(b["__key__"]) for b in batches if b is not None)
            dropped += sum(len(b["__key__"]) for it in iterators for b in it)
            return trained, dropped
        for loader in loaders:
            loader.mark_consumed()
        trained.append([k for b in batches for k in b["__key__"]])
    for it in iterators:
        next(it)  # prefetched, never trained
    return trained, dropped


def _state(loaders: list[RankSyncedLoader], batch: int, workers: int, data_world: int) -> dict:
    return {
        "version": 2,
        "world_size": len(loaders),
        "data_world_size": data_world,
        "batch_per_data_rank": batch,
        "num_workers": workers,
        "mode": "epoch",
        "seed": 5,
        "ranks": [loader.position_state() for loader in loaders],
    }


def _resumed_on(
    state: dict, directory, world: int, workers: int, global_batch: int
) -> list[RankSyncedLoader]:
    loaders = []
    for rank in range(world):
        dm = ShardDataModule(
            train_shards=str(directory), global_batch_size=global_batch, num_workers=workers, seed=5
        )
        dm.trainer = _Trainer(world, rank)
        dm.load_state_dict(torch.load(_roundtrip(state), weights_only=True))
        loader = _rank_loader(directory, workers, rank, world, global_batch // world)
        loader.restore(dm._resume_state)
        loaders.append(loader)
    return loaders


@pytest.mark.parametrize("workers", [0, 2])
def test_saved_on_two_ranks_the_epoch_continues_on_four_exactly_once(make_shards, workers):
    directory, keys = make_shards([5 + (7 * i) % 4 for i in range(32)])  # 8 shards a stream, 4-8 samples
    loaders = [_rank_loader(directory, workers, r, 2, 4) for r in range(2)]
    before, _ = _train_ranks(loaders, steps=3)
    state = _state(loaders, 4, workers, 2)
    # On 4 ranks (2 per device, the same global batch of 8): data rank v continues on ranks 2v, 2v+1.
    four = _resumed_on(state, directory, 4, workers, 8)
    assert [ld._pending["data_ranks"] for ld in four] == [[0], [0], [1], [1]]
    middle, _ = _train_ranks(four, steps=2)
    # Stopped again on 4 ranks: that layout resumes as itself.
    again = _resumed_on(_state(four, 4, workers, 2), directory, 4, workers, 8)
    after, dropped = _train_ranks(again, steps=None)
    trained = [k for batch in before + middle + after for k in batch]
    assert len(trained) == len(set(trained)), "a sample trained twice"
    # Every other sample is accounted for: the short last chunks of the streams (drop_last) and what
    # the other ranks still held when the first ran dry (epoch_tail_dropped), both counted.
    partial = sum(ld.skip_counts().get("partial_batch_dropped", 0) for ld in again)
    assert len(keys) - len(trained) == partial + dropped
    assert len(trained) > 0.6 * len(keys)
    # Negative control: continuing on 4 ranks as a fresh 4-rank split of the shards trains samples twice.
    fresh = [_rank_loader(directory, workers, r, 4, 2) for r in range(4)]
    naive, _ = _train_ranks(fresh, steps=None)
    naive_keys = [k for b in before for k in b] + [k for b in naive for k in b]
    assert len(naive_keys) > len(set(naive_keys))


def test_the_same_layout_resumes_its_own_position_and_old_checkpoints_still_load():
    dm = ShardDataModule(train_shards="unused", num_workers=2, seed=0, global_batch_size=8)
    dm.trainer = _Trainer(2, global_rank=1)
    dm.load_state_dict(_layout_state())
    assert dm._resume_state == _layout_state()["ranks"][1]
    version_1 = {
        "version": 1,
        "world_size": 1,
        "num_workers": 2,
        "mode": "epoch",
        "seed": 0,
        "ranks": [{"epoch": 0, "workers": {0: {"position": 8, "skips": {}}}, "last_worker": 0}],
    }
    old = ShardDataModule(train_shards="unused", num_workers=2, seed=0)
    old.load_state_dict(version_1)
    assert old._resume_state["streams"] == {(0, 0): {"position": 8, "skips": {}}}
    assert old._resume_state["data_ranks"] == [0]


# ---- data checks: too many broken samples, a rank without data ------------------------------------


def _dm(shards, **kw) -> ShardDataModule:
    dm = ShardDataModule(
        train_shards=shards, global_batch_size=2, num_workers=0, image_size=8, tokenizer=None, **kw
    )
    dm.setup("fit")
    return dm


def test_too_many_broken_samples_stop_the_run_naming_the_option(tmp_path):
    from data.loader import DataError
    from tests.conftest import simple_sample, write_tar

    samples = []
    for i in range(60):
        samples.append(simple_sample(f"g{i}"))
        if i % 3 == 0:  # 20 undecodable of 80 read: 25%
            samples.append({"__key__": f"b{i}", "jpg": b"<html>Not Found</html>", "txt": "x"})
    write_tar(tmp_path / "0.tar", samples)
    with pytest.raises(DataError, match=r"20 of the 80 samples .*decode_error 20.*data.max_bad_fraction=0.1"):
        list(_dm(str(tmp_path)).train_dataloader())
    # within the limit (or with no limit) the run goes on and counts them
    for limit in (0.3, None):
        dm = _dm(str(tmp_path), max_bad_fraction=limit)
        assert sum(len(b["__key__"]) for b in dm.train_dataloader()) == 60
        assert dm.skip_counts()["decode_error"] == 20


def test_an_epoch_without_any_batch_is_an_error_not_an_endless_loop(tmp_path):
    from data.loader import DataError

    (tmp_path / "0.tar").write_bytes(b"not a tar at all" * 64)
    (tmp_path / "1.tar").write_bytes(b"")
    with pytest.raises(
        DataError, match=r"no training batch this epoch .*truncated_shard.: 1, .corrupt_shard.: 1"
    ):
        list(_dm(str(tmp_path)).train_dataloader())


def test_max_bad_fraction_must_be_a_fraction():
    with pytest.raises(ValueError, match="data.max_bad_fraction=1.5"):
        ShardDataModule(train_shards="unused", max_bad_fraction=1.5)


def test_plan_resume_is_a_pure_function_of_the_saved_state_and_the_layout():
    """data/resume.py without Lightning: 2 saved data ranks continued on 1, 2 and 4 ranks."""
    from data.resume import Layout, plan_resume

    cursor = {"shard": 3, "offset": 5, "buffer": b"", "flushing": False, "rng": b""}
    state = _layout_state()
    for r in state["ranks"]:
        for st in r["streams"].values():
            st["cursor"] = cursor

    def plan(world: int, rank: int, batch: int):
        return plan_resume(
            state, Layout(world=world, rank=rank, num_workers=2, mode="epoch", seed=0, batch=batch)
        )

    assert plan(2, 1, 4) is state["ranks"][1]
    assert plan(1, 0, 8)["data_ranks"] == [0, 1]
    parts = [plan(4, rank, 2) for rank in range(4)]
    assert [p["data_ranks"] for p in parts] == [[0], [0], [1], [1]]
    # worker 0 of data rank 1: part 0 keeps its cursor, part 1 starts fresh at shard 4 (shard 3 is in progress)
    assert parts[2]["streams"][(1, 0)] == {**state["ranks"][1]["streams"][(1, 0)], "split": [4, 2, 0]}
    assert parts[3]["streams"][(1, 0)] == {"position": 0, "skips": {}, "split": [4, 2, 1]}
    assert parts[3]["streams"][(1, 1)]["split"] == [0, 2, 1]  # a worker that never reported: all its shards
    # The epoch's dropped tail is counted once, by whoever plays its data rank (part 0 of it on more ranks).
    for r, dropped in zip(state["ranks"], (1, 2), strict=True):
        r["tail_dropped"] = dropped
    assert plan(1, 0, 8)["tail_dropped"] == 3
    assert [plan(4, rank, 2)["tail_dropped"] for rank in range(4)] == [1, 0, 2, 0]
    four = _layout_state(world_size=4, data_world_size=4, batch_per_data_rank=2)  # 4 data ranks on 2
    four["ranks"] = [
        {
            **four["ranks"][0],
            "data_ranks": [v],
            "data_world_size": 4,
            "streams": {(v, 0): {"position": 8, "skips": {}}},
            "tail_dropped": 2**v,
        }  # fmt: skip
        for v in range(4)
    ]
    halves = [
        plan_resume(four, Layout(world=2, rank=r, num_workers=2, mode="epoch", seed=0, batch=4))
        for r in (0, 1)
    ]
    assert [(p["data_ranks"], p["tail_dropped"]) for p in halves] == [([0, 1], 1 + 2), ([2, 3], 4 + 8)]
    # 2 data ranks on 6: rank r plays part r % 3 of data rank r // 3 (a mutant dividing by the data ranks
    # agreed with this on 4 ranks, where both give r // 2)
    state["batch_per_data_rank"] = 6
    assert [plan(6, rank, 2)["data_ranks"] for rank in range(6)] == [[0]] * 3 + [[1]] * 3


def test_normalize_copies_its_constants_to_a_device_once():
    """Every batch is normalised on the device; a copy of mean/std from host memory per batch would block
    the host on a GPU. Counted here as the copies (aten._to_copy) each call makes, in bf16 on the CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default:
                self.shapes.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    normalize = Normalize("clip")
    first = normalize(images, torch.bfloat16)
    with Copies() as copies:
        again = normalize(images, torch.bfloat16)
    assert copies.shapes == [(2, 3, 4, 4)], copies.shapes  # the images' own cast only (before: + mean, std)
    assert torch.equal(first, again) and again.dtype == torch.bfloat16
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255
    torch.testing.assert_close(normalize(images), (images.float() - mean) / std)
    assert torch.equal(normalize.invert(normalize(images)), images)


def test_a_batch_moves_its_tensors_and_leaves_its_keys_and_captions_alone(monkeypatch):
    """Lightning's default transfer walked every key and caption of a batch (3 ms of host time a step at
    1,024 captions); the data module moves the tensors only."""
    import pytorch_lightning.core.hooks as hooks

    def walk(*args, **kwargs):
        raise AssertionError("Lightning's move_data_to_device walked the batch")

    monkeypatch.setattr(hooks, "move_data_to_device", walk)
    dm = ShardDataModule(train_shards="unused", global_batch_size=2, image_size=8, tokenizer=None)
    captions = ["a red cube"] * 4
    batch = {"image": torch.zeros(4, 3, 8, 8), "tokens": torch.zeros(4, 6, dtype=torch.long),
             "caption": captions, "__key__": list("abcd")}  # fmt: skip
    moved = dm.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert moved["image"].is_meta and moved["tokens"].is_meta and moved["caption"] is captions
