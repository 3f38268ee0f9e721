"""Shard manifests (data/manifest.py): written from the shards, checked before training."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from data.datamodule import ShardDataModule
from data.loader import DataError
from data.manifest import ManifestError, check_shards, load_manifest, main, write_manifest
from data.shards import expand_shards


def _dm(shards, manifest, **kw) -> ShardDataModule:
    return ShardDataModule(
        train_shards=str(shards),
        global_batch_size=2,
        num_workers=0,
        image_size=8,
        manifest=str(manifest),
        **kw,
    )


def test_write_records_count_size_and_hash_of_every_shard(make_shards, tmp_path):
    directory, keys = make_shards([3, 5, 4])
    assert main(["write", str(directory), "--sizes"]) == 0
    manifest = json.loads((directory / "manifest.json").read_text())["shards"]
    assert sorted(manifest) == ["00000.tar", "00001.tar", "00002.tar"]
    assert [manifest[n]["samples"] for n in sorted(manifest)] == [3, 5, 4]
    for name, entry in manifest.items():
        data = (directory / name).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert json.loads((directory / "sizes.json").read_text()) == {
        "00000.tar": 3,
        "00001.tar": 5,
        "00002.tar": 4,
    }
    assert check_shards(expand_shards(str(directory)), manifest) == []


def test_a_broken_shard_is_not_recorded(make_shards, tmp_path):
    directory, _ = make_shards([3, 4])
    data = (directory / "00001.tar").read_bytes()
    (directory / "00001.tar").write_bytes(data[:700])  # cut inside the first member
    with pytest.raises(ManifestError, match=r"00001.tar.*complete shards only"):
        write_manifest(str(directory), tmp_path / "m.json")
    assert not (tmp_path / "m.json").exists()


def test_training_refuses_shards_that_do_not_match_naming_each(make_shards, tmp_path):
    directory, keys = make_shards([3, 4, 5, 2])
    manifest = tmp_path / "manifest.json"
    write_manifest(str(directory), manifest)
    dm = _dm(directory, manifest)
    dm.setup("fit")  # all match
    assert sum(len(b["__key__"]) for b in dm.train_dataloader()) == 14

    # same size, one byte flipped inside an image; one shard cut short; one missing; one not listed
    data = bytearray((directory / "00000.tar").read_bytes())
    data[1000] ^= 0xFF
    (directory / "00000.tar").write_bytes(bytes(data))
    (directory / "00001.tar").write_bytes((directory / "00001.tar").read_bytes()[:-1024])
    (directory / "00002.tar").unlink()
    shutil.copy(directory / "00003.tar", directory / "00004.tar")
    with pytest.raises(DataError) as err:
        _dm(directory, manifest).setup("fit")
    message = str(err.value)
    assert "data.manifest=" in message and message.startswith("4 shards"), message
    assert "00000.tar: sha256" in message and "00001.tar: bytes" in message
    assert "00002.tar: listed in the manifest, not found" in message
    assert "00004.tar: not in the manifest" in message and "00003.tar" not in message
    # the size check is a stat per shard: it sees the cut shard, not the flipped byte
    with pytest.raises(DataError) as err:
        _dm(directory, manifest, manifest_check="size").setup("fit")
    assert "00001.tar: " in str(err.value) and "00000.tar" not in str(err.value)


def test_a_subset_of_the_listed_shards_is_fine_a_missing_one_is_named(make_shards, tmp_path):
    directory, _ = make_shards([3, 4, 2])
    manifest = tmp_path / "manifest.json"
    write_manifest(str(directory), manifest)
    assert main(["check", str(directory / "0000{0..1}.tar"), str(manifest)]) == 0
    (directory / "00002.tar").unlink()
    assert main(["check", str(directory), str(manifest), "--level", "size"]) == 1


def test_an_unreadable_shard_is_named(make_shards, tmp_path):
    directory, _ = make_shards([3, 4])
    manifest = tmp_path / "manifest.json"
    write_manifest(str(directory), manifest)
    url = str(directory / "00001.tar")
    shutil.move(url, tmp_path / "elsewhere.tar")
    problems = check_shards([str(directory / "00000.tar"), url], load_manifest(manifest))
    assert len(problems) == 1 and problems[0].startswith(url) and "unreadable" in problems[0]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "no such file"),
        ("{not json", "not JSON"),
        ('{"shards": {"a.tar": {"samples": 1}}}', "expected"),
    ],
)
def test_a_bad_manifest_file_is_named(tmp_path, content, match):
    path = tmp_path / "m.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ManifestError, match=rf"data.manifest='{path}'.*{match}"):
        load_manifest(path)


def test_bad_check_level_names_the_option():
    with pytest.raises(ValueError, match="data.manifest_check='md5'"):
        ShardDataModule(train_shards="unused", manifest="m.json", manifest_check="md5")


def _rank_check(rank: int, world: int, port: int, shards: str, manifest: str, out: dict) -> None:
    import os
    from types import SimpleNamespace

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dm = _dm(shards, manifest)
        dm.trainer = SimpleNamespace(world_size=world, global_rank=rank, accumulate_grad_batches=1)
        try:
            dm.setup("fit")
            out[rank] = "no error"
        except DataError as e:
            out[rank] = str(e)
        # (and the DataModule leaves the gloo side group it made, as Lightning's teardown ends each run)
        made = len(dist.distributed_c10d._world.pg_map)
        dm.teardown("fit")
        out[f"groups on rank {rank}"] = (made, len(dist.distributed_c10d._world.pg_map))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_ranks_hash_their_share_and_all_stop_with_every_mismatch(make_shards, tmp_path):
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    directory, _ = make_shards([3, 4, 5, 2])
    manifest = tmp_path / "manifest.json"
    write_manifest(str(directory), manifest)
    for name in ("00000.tar", "00003.tar"):  # one in each rank's share (shards[rank::2])
        data = bytearray((directory / name).read_bytes())
        data[1000] ^= 0xFF
        (directory / name).write_bytes(bytes(data))
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(
            _rank_check,
            args=(2, free_port(), str(directory), str(manifest), out),
            nprocs=2,
            start_method="spawn",
        )
        result = dict(out)
    for rank in (0, 1):
        assert result[rank].startswith("2 shards"), result[rank]
        assert "00000.tar: sha256" in result[rank] and "00003.tar: sha256" in result[rank]
        assert result[f"groups on rank {rank}"] == (2, 1)  # the default group and the side group, then one


def test_manifest_work_reports_progress_with_an_eta(tmp_path, caplog):
    from data.progress import Progress

    progress = Progress(4, "hashing", unit="shards")
    lines = [progress.step(detail=f"shard {i}") for i in range(4)]
    assert lines[0].startswith("hashing: 1/4 shards (shard 0), ") and "ETA 0:00:0" in lines[0]
    assert lines[-1].startswith("hashing: 4/4 shards") and lines[-1].endswith("ETA 0:00:00")
    quiet = Progress(3, "checking", interval=3600)
    assert [quiet.step() for _ in range(3)][:2] == [None, None]  # at most one line per interval, and the last


def test_a_restart_does_not_hash_the_shards_it_verified_before(make_shards, tmp_path, monkeypatch):
    """A requeued job's check costs a stat per shard; a changed shard (size, mtime) is hashed again and
    caught, and a restart on another number of ranks reads every rank's record."""
    import os

    import data.manifest as m

    directory, _ = make_shards([3, 5, 4])
    main(["write", str(directory)])
    manifest_path = directory / "manifest.json"
    manifest = load_manifest(manifest_path)
    urls = expand_shards(str(directory))
    hashed = []
    real = m.describe_shard
    monkeypatch.setattr(m, "describe_shard", lambda url: hashed.append(url) or real(url))
    for rank in (0, 1):  # two ranks, each its share, each its own record
        assert check_shards(urls[rank::2], manifest, cache=m.VerifiedCache(manifest_path, writer=rank)) == []
    assert len(hashed) == 3
    hashed.clear()
    assert check_shards(urls, manifest, cache=m.VerifiedCache(manifest_path, writer=0)) == []  # one rank now
    assert hashed == []
    # a shard rewritten with other bytes of the same size: its mtime moved, so it is hashed and caught
    shard = directory / "00001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    problems = check_shards(urls, manifest, cache=m.VerifiedCache(manifest_path, writer=0))
    assert hashed == [str(shard)] and len(problems) == 1 and "00001.tar: sha256" in problems[0]
    # without the cache every shard is read (the CLI's `check`)
    hashed.clear()
    check_shards(urls, manifest)
    assert len(hashed) == 3
