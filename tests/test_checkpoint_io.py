"""Crash-safe checkpoints: a kill or a full disk during a save leaves the previous checkpoint selected
and loadable; unfinished sharded checkpoints are ignored by resume=auto; a resumed run deletes the stale
temporaries of killed saves."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import PicklePayload, compose_config
from train.checkpoint_io import COMMIT_MARKER, AtomicCheckpointIO, atomic_torch_save, commit
from train.run import resolve_checkpoint

REPO = Path(__file__).resolve().parents[1]

# Writes half of the new checkpoint, then the process dies (SIGKILL: no cleanup, no exception handler).
CRASH = """
import os, signal, sys, torch
sys.path.insert(0, {repo!r})
import train.checkpoint_io as io
real_save = torch.save
def dying_save(obj, f):
    f.write(b"x" * 4096); f.flush(); os.kill(os.getpid(), signal.SIGKILL)
io.torch.save = dying_save if {atomic} else None
if {atomic}:
    io.atomic_torch_save({{"step": 2}}, {path!r})
else:  # the negative control: a plain in-place write
    with open({path!r}, "wb") as f:
        dying_save(None, f)
"""

# Writes a checkpoint larger than the file size limit: the write fails with EFBIG.
DISK_FULL = """
import resource, signal, sys, torch
sys.path.insert(0, {repo!r})
from train.checkpoint_io import atomic_torch_save
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
atomic_torch_save({{"state_dict": {{"w": torch.zeros(1_000_000)}}, "step": 2}}, {path!r})
"""


def _previous(tmp_path: Path) -> Path:
    last = tmp_path / "checkpoints" / "last.ckpt"
    atomic_torch_save({"step": 1}, last)
    return last


@pytest.mark.parametrize("atomic", [True, False], ids=["atomic", "negative-control-in-place"])
def test_a_kill_during_a_save_leaves_the_previous_checkpoint_selected(tmp_path, atomic):
    last = _previous(tmp_path)
    script = CRASH.format(repo=str(REPO), atomic=atomic, path=str(last))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -9, result.stderr
    if not atomic:  # what the atomic write prevents: the only checkpoint is now garbage
        with pytest.raises((RuntimeError, EOFError, ValueError, pickle.UnpicklingError)):  # garbage now
            torch.load(last, weights_only=True)
        return
    assert torch.load(last, weights_only=True) == {"step": 1}
    leftovers = list(last.parent.glob(".last.ckpt.tmp-*"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # the half-written temporary file
    assert resolve_checkpoint("auto", tmp_path) == str(last)  # never selected


def test_a_resumed_run_deletes_stale_leftovers_of_killed_saves_and_nothing_else(tmp_path, caplog):
    """A killed save's temporary file (a whole checkpoint's size, one more at every hard kill) and a
    killed ZeRO-3 conversion are deleted once stale. Kept: what was written in the last 5 minutes or whose
    writer is alive here (another launch may be saving), links, and sharded directories without their
    marker (one saved before markers existed is finished)."""
    from train.checkpoint_io import remove_interrupted_saves
    from train.run import remove_leftovers

    ckpts = tmp_path / "checkpoints"
    last = _previous(tmp_path)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    killed = ckpts / f".last.ckpt.tmp-{int(dead.stdout)}"  # its writer has exited
    killed.write_bytes(b"0" * 5000)
    saving = ckpts / f".step0000009.ckpt.tmp-{os.getpid()}"  # a live writer
    saving.write_bytes(b"0" * 10)
    conversion = ckpts / ".step0000005.ckpt.universal" / "global_step5"
    conversion.mkdir(parents=True)
    (conversion / "w.pt").write_bytes(b"0" * 1000)
    unmarked = ckpts / "step0000003.ckpt"
    unmarked.mkdir()
    (unmarked / "shard_0.pt").write_bytes(b"0")
    (ckpts / "elsewhere.ckpt").symlink_to(tmp_path / "gone.ckpt")  # a dangling link
    assert remove_interrupted_saves(tmp_path) == []  # all written just now
    old = time.time() - 600
    for path in (killed, saving, conversion / "w.pt", unmarked / "shard_0.pt"):
        os.utime(path, (old, old))
    with caplog.at_level("WARNING"):
        remove_leftovers(tmp_path)
    assert "removed what 2 killed checkpoint saves left (0.00 GB)" in caplog.text
    assert not killed.exists() and not conversion.parent.exists()
    assert saving.exists() and unmarked.exists() and last.exists() and (ckpts / "elsewhere.ckpt").is_symlink()


def test_a_full_disk_fails_clearly_and_keeps_the_previous_checkpoint(tmp_path):
    last = _previous(tmp_path)
    script = DISK_FULL.format(repo=str(REPO), path=str(last))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"could not write checkpoint {last}" in result.stderr
    assert "the previous checkpoints are untouched" in result.stderr
    assert torch.load(last, weights_only=True) == {"step": 1}
    assert not list(last.parent.glob(".last.ckpt.tmp-*")), "the partial temporary file is removed"


def test_resume_auto_ignores_sharded_checkpoints_without_their_commit_marker(tmp_path, caplog):
    ckpts = tmp_path / "checkpoints"
    good = ckpts / "step0000010.ckpt"
    good.mkdir(parents=True)
    (good / "shard_0.pt").write_bytes(b"0")
    commit(good)
    time.sleep(0.05)
    torn = ckpts / "step0000020.ckpt"  # newer, but its save never finished
    torn.mkdir()
    (torn / "shard_0.pt").write_bytes(b"0")
    with caplog.at_level("WARNING"):
        assert resolve_checkpoint("auto", tmp_path) == str(good)
    assert "ignoring unfinished checkpoints" in caplog.text and str(torn) in caplog.text
    commit(torn)
    assert (torn / COMMIT_MARKER).exists() and resolve_checkpoint("auto", tmp_path) == str(torn)


def test_newest_checkpoint_wins_across_periodic_last_and_preemption(tmp_path):
    old_last = tmp_path / "checkpoints" / "last.ckpt"
    atomic_torch_save({"step": 1}, old_last)
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    atomic_torch_save({"step": 5}, hpc)
    os.utime(old_last, (time.time() - 100, time.time() - 100))
    assert resolve_checkpoint("auto", tmp_path) == str(hpc)
    os.utime(hpc, (time.time() - 200, time.time() - 200))
    assert resolve_checkpoint("auto", tmp_path) == str(old_last)  # Lightning alone would take hpc_ckpt
    # what exports, samples and the frozen CLIP load from a run directory: the same newest one (last.ckpt
    # was taken whenever it existed: a run preempted after its last periodic checkpoint exported that one)
    from train.checkpoint import resolve_run

    preempt = tmp_path / "checkpoints" / "preempt.ckpt"
    atomic_torch_save({"step": 7}, preempt)
    assert resolve_checkpoint("auto", tmp_path) == str(preempt) and resolve_run(tmp_path) == (
        tmp_path,
        preempt,
    )
    os.utime(preempt, (time.time() - 300, time.time() - 300))
    assert resolve_run(tmp_path) == (tmp_path, old_last)


def test_train_run_writes_single_file_checkpoints_atomically(tmp_path):
    from train.run import build_trainer

    cfg = compose_config(["debug=fast", f"paths.output_dir={tmp_path}", "trainer.accelerator=cpu"])
    trainer = build_trainer(cfg, [], [])
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_deepspeed_checkpoints_are_checked_before_deepspeed_unpickles_them(tmp_path):
    from train.checkpoint import consolidate

    ckpt = tmp_path / "last.ckpt"
    (ckpt / "checkpoint").mkdir(parents=True)
    (ckpt / "latest").write_text("checkpoint")
    torch.save({"module": {"net.w": torch.zeros(2)}}, ckpt / "checkpoint" / "mp_rank_00_model_states.pt")
    torch.save(
        {"optimizer_state_dict": PicklePayload()},
        ckpt / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    )
    with pytest.raises(ValueError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt: refused to load"):
        consolidate(ckpt)
    assert not PicklePayload.ran


def _save(path: Path, step: int, age: float = 0.0) -> Path:
    atomic_torch_save({"step": step, "state_dict": {"w": torch.randn(4096)}}, path)
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_damage_finds_truncation_bit_flips_and_short_shards(tmp_path):
    from train.checkpoint_io import damage

    good = _save(tmp_path / "good.ckpt", 1)
    assert damage(good) is None
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(good.read_bytes()[:-3000])  # an interrupted copy
    assert "not a complete checkpoint" in damage(cut)
    flipped = tmp_path / "flipped.ckpt"
    data = bytearray(good.read_bytes())
    data[len(data) // 3] ^= 0x40  # inside the weights' data
    flipped.write_bytes(bytes(data))
    assert "fails its CRC-32" in damage(flipped)
    shards = tmp_path / "sharded.ckpt"
    shards.mkdir()
    (shards / "__0_0.distcp").write_bytes(b"x" * 1000)
    torch.save({"w": torch.zeros(3)}, shards / "meta.pt")
    commit(shards)
    assert damage(shards) is None
    (shards / "__0_0.distcp").write_bytes(b"x" * 10)
    assert "__0_0.distcp has 10 bytes, 1000 when written" in damage(shards)
    (shards / COMMIT_MARKER).write_text("ok\n")  # a marker from before sizes: the zip members are checked
    (shards / "meta.pt").write_bytes(cut.read_bytes())
    assert "meta.pt is not a complete checkpoint" in damage(shards)


def test_resume_auto_skips_a_damaged_newest_checkpoint_and_names_it(tmp_path, caplog):
    from train.run import CheckpointDamagedError

    ckpts = tmp_path / "checkpoints"
    older = _save(ckpts / "step0000004.ckpt", 4, age=20)
    newest = _save(ckpts / "step0000006.ckpt", 6, age=10)
    last = _save(ckpts / "last.ckpt", 6)
    for path in (newest, last):
        path.write_bytes(path.read_bytes()[:-500])
    with caplog.at_level("WARNING"):
        assert resolve_checkpoint("auto", tmp_path) == str(older)
    assert "skipping damaged checkpoint" in caplog.text and "last.ckpt" in caplog.text
    older.write_bytes(older.read_bytes()[:100])
    with pytest.raises(CheckpointDamagedError, match="every checkpoint in .* is damaged") as info:
        resolve_checkpoint("auto", tmp_path)
    assert "step0000004.ckpt" in str(info.value) and "resume=<path>" in str(info.value)
    with pytest.raises(CheckpointDamagedError, match="resume=.*last.ckpt: .*not a complete checkpoint"):
        resolve_checkpoint(str(last), tmp_path)


def test_only_rank_0_reads_checkpoints_whole_and_stops_the_launch_on_a_flip_only_it_finds(
    tmp_path, monkeypatch
):
    """Every rank used to read a single-file checkpoint whole for its CRC-32s before loading it: twice what a
    restart read from shared storage. The other ranks now read its zip directory (truncation), rank 0 the
    CRCs; a flipped bit only rank 0 sees stops the launch with the file moved aside, so that the ranks never
    load different checkpoints, and the next launch continues from the next newest on every rank."""
    import zipfile

    from train.run import CheckpointDamagedError

    ckpts = tmp_path / "checkpoints"
    older = _save(ckpts / "step0000004.ckpt", 4, age=20)
    newest = _save(ckpts / "step0000006.ckpt", 6, age=10)
    data = bytearray(newest.read_bytes())
    data[len(data) // 3] ^= 0x40  # inside the weights' data: the zip directory is intact
    newest.write_bytes(bytes(data))
    read = []
    with monkeypatch.context() as m:
        m.setattr(zipfile.ZipFile, "testzip", lambda self: read.append(self.filename))
        assert resolve_checkpoint("auto", tmp_path, rank=1, world=2) == str(newest)
    assert read == []  # rank 1 read no member
    with pytest.raises(CheckpointDamagedError, match="step0000006.ckpt: member .* fails its CRC-32") as info:
        resolve_checkpoint("auto", tmp_path, rank=0, world=2)
    aside = ckpts / "step0000006.ckpt.damaged"
    assert f"moved it to {aside}" in str(info.value) and f"continues from the next newest, {older}" in str(
        info.value
    )
    assert aside.exists() and not newest.exists()
    assert [resolve_checkpoint("auto", tmp_path, rank=r, world=2) for r in (0, 1)] == [str(older)] * 2
    cut = _save(ckpts / "step0000008.ckpt", 8)
    cut.write_bytes(cut.read_bytes()[:-500])  # truncated: every rank finds it and skips it alike
    assert [resolve_checkpoint("auto", tmp_path, rank=r, world=2) for r in (0, 1)] == [str(older)] * 2
    assert cut.exists()
    with pytest.raises(CheckpointDamagedError, match="fails its CRC-32"):  # resume=<path>: rank 0 refuses
        resolve_checkpoint(str(aside), tmp_path, rank=0, world=2)


@pytest.mark.slow
def test_periodic_checkpoints_keep_the_newest_k_also_in_a_run_directory_that_moved(tmp_path, caplog):
    """A run resumed in a directory it was moved or copied to (restored from a backup, from node-local
    scratch to a shared filesystem) wrote ``last-v1.ckpt`` beside the old ``last.ckpt``, which then held
    stale weights for whatever names it, and never pruned the checkpoints saved before the move: Lightning
    forgets which checkpoints it kept when its directory's path changed."""
    import shutil

    from train.run import train

    def run(out, steps, keep=2):
        train(
            compose_config(
                [
                    "debug=fast",
                    f"paths.output_dir={out}",
                    f"paths.data_dir={tmp_path / 'data'}",
                    "callbacks.checkpoint.every_n_train_steps=1",
                    f"callbacks.checkpoint.save_top_k={keep}",
                    f"trainer.max_steps={steps}",
                ]
            )
        )
        return sorted(p.name for p in (out / "checkpoints").glob("*.ckpt"))

    assert run(tmp_path / "run", 5) == ["last.ckpt", "step0000004.ckpt", "step0000005.ckpt"]
    shutil.copytree(tmp_path / "run", tmp_path / "moved")
    with caplog.at_level(logging.WARNING, logger="train.run"):
        assert run(tmp_path / "moved", 7) == ["last.ckpt", "step0000006.ckpt", "step0000007.ckpt"]
    # the paths under the run directory moved with it: not settings changed (only max_steps is)
    changed = [r.getMessage() for r in caplog.records if "resuming with settings other" in r.getMessage()]
    assert len(changed) == 1 and changed[0].endswith(": trainer.max_steps: 5 -> 7"), changed
    last = torch.load(tmp_path / "moved" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 7
    # Fewer kept on resume: save_top_k 5 -> 1 after 3 saves failed at the first periodic save (KeyError: '',
    # the k-th best of a list short of its k); 3 -> 1 kept every older checkpoint for ever.
    saved = ["last.ckpt", "step0000001.ckpt", "step0000002.ckpt", "step0000003.ckpt"]
    for keep in (5, 3):
        assert run(tmp_path / f"keep{keep}", 3, keep) == saved
        assert run(tmp_path / f"keep{keep}", 5, 1) == ["last.ckpt", "step0000005.ckpt"]


def test_an_older_checkpoint_taken_as_the_newest_written_is_named(tmp_path, caplog):
    """Checkpoints are ordered by when they were written: a copy that reset the files' times (cp -r, rsync
    without -t, a download) made resume=auto, exports and clip_ckpt=<run> take an older checkpoint without a
    word. The one with the later step is named (the order stands: a run rewound to an older checkpoint in
    its own directory continues its new branch)."""
    from train.checkpoint import resolve_run
    from train.run import resolve_checkpoint

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for name, step in (("step0000002.ckpt", 2), ("step0000004.ckpt", 4), ("last.ckpt", 5)):
        torch.save({"global_step": step, "state_dict": {}}, ckpts / name)
        os.utime(ckpts / name, (1000.0 + step,) * 2)
    with caplog.at_level("WARNING"):
        assert resolve_run(tmp_path)[1] == ckpts / "last.ckpt"
        assert resolve_checkpoint("auto", tmp_path) == str(ckpts / "last.ckpt")
    assert "holds step" not in caplog.text
    os.utime(ckpts / "step0000004.ckpt", (2000.0,) * 2)  # copied last
    with caplog.at_level("WARNING"):
        assert resolve_run(tmp_path)[1] == ckpts / "step0000004.ckpt"
        assert resolve_checkpoint("auto", tmp_path) == str(ckpts / "step0000004.ckpt")
    assert caplog.text.count(f"(step 4), the newest written; {ckpts / 'last.ckpt'} holds step 5") == 2
    # a sharded checkpoint (a directory) records its step in its commit marker
    from train.checkpoint_io import commit, saved_step

    sharded = ckpts / "preempt.ckpt"
    sharded.mkdir()
    (sharded / "shard_0.pt").write_bytes(b"x")
    commit(sharded, global_step=9)
    assert saved_step(sharded) == 9 and resolve_run(tmp_path)[1] == sharded
