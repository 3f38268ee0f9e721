"""Crash-safe checkpoint writes.

Single-file checkpoints (DDP, one device): :class:`AtomicCheckpointIO` streams to a hidden temporary
file next to the target, fsyncs it, renames it over the target (atomic on POSIX) and fsyncs the
directory. A crash or a full disk mid-write leaves the previous file as it was, and the temporary file
(``.<name>.tmp-<pid>``) is never picked by ``resume=auto``, and a resumed run deletes it once it is stale
(retention only knows finished files: :func:`remove_interrupted_saves`).

Sharded checkpoints (DeepSpeed, FSDP: a directory written by every rank): the strategies in
train/strategies.py remove the directory's ``COMMITTED`` marker before writing, wait for every rank to
finish, then rank 0 writes the marker (fsynced). ``resume=auto`` only considers marked directories.

Remote paths (``s3://`` and other fsspec URLs) go through Lightning's own writer.

Damage after the write (a failing disk, a copy between clusters cut short) is found by :func:`damage`
before a resume loads anything: ``torch.save`` files are zip archives carrying a CRC-32 of every member,
all checked; a sharded directory's marker records the size of each of its files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

log = logging.getLogger(__name__)
COMMIT_MARKER = "COMMITTED"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` that either fully replaces ``path`` or leaves it untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        # torch's zip writer reports a failed write (full disk, file size limit) as a RuntimeError
        if isinstance(e, (OSError, RuntimeError)):
            first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
            free = shutil.disk_usage(path.parent).free / 1e9
            raise CheckpointWriteError(
                f"could not write checkpoint {path} ({first}; {free:.1f} GB free on that filesystem); "
                "the previous checkpoints are untouched"
            ) from e
        raise


class CheckpointWriteError(OSError):
    pass


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        atomic_torch_save(checkpoint, path)


def uncommit(path: str | Path) -> None:
    (Path(path) / COMMIT_MARKER).unlink(missing_ok=True)


def commit(path: str | Path, global_step: int | None = None) -> None:
    """Mark a sharded checkpoint directory finished, recording the size of each of its files (and the
    step it holds: :func:`saved_step`)."""
    path = Path(path)
    sizes = {
        str(p.relative_to(path)): p.stat().st_size
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != COMMIT_MARKER
    }
    marker = path / COMMIT_MARKER
    with open(marker, "w") as f:
        f.write(
            json.dumps(
                {"files": sizes, **({"global_step": int(global_step)} if global_step is not None else {})},
                indent=1,
            )
        )
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(Path(path))


def is_committed(path: str | Path) -> bool:
    """A finished checkpoint: a file (files only appear whole, by rename) or a marked directory."""
    path = Path(path)
    return path.is_file() or (path.is_dir() and (path / COMMIT_MARKER).is_file())


def written_at(path: Path) -> float:
    """When a checkpoint was completed: its mtime, or its newest file's for a sharded directory."""
    if path.is_dir():
        return max((f.stat().st_mtime for f in path.rglob("*") if f.is_file()), default=0.0)
    return path.stat().st_mtime


def saved_step(path: Path) -> int | None:
    """The training step a finished checkpoint holds: from a periodic checkpoint's name
    (``step0000300.ckpt``), a sharded directory's commit marker, else the file's own record (its pickle
    read memory-mapped: no tensor is read); None when it cannot tell."""
    import re

    named = re.match(r"step(\d+)", path.name)
    if named:
        return int(named.group(1))
    try:
        if path.is_dir():
            return int(json.loads((path / COMMIT_MARKER).read_text())["global_step"])
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    except Exception:  # noqa: BLE001 - a marker without the step, a file of another kind: cannot tell
        return None


def later_than_newest(finished: list[Path], chosen: Path) -> tuple[Path, int, int] | None:
    """A finished checkpoint that holds a later step than ``chosen``, the newest written (its step, and
    ``chosen``'s): modification times order checkpoints, and a copy that reset them (``cp -r``, ``rsync``
    without ``-t``, a download) makes an older one the newest; so does a run rewound to an older
    checkpoint in its own directory (the later ones are another branch). None when none does or the steps
    cannot be read."""
    if len(finished) < 2:
        return None
    own = saved_step(chosen)
    if own is None:
        return None
    later = [
        (step, c) for c in finished if c != chosen and (step := saved_step(c)) is not None and step > own
    ]
    if not later:
        return None
    step, path = max(later, key=lambda x: x[0])
    return path, step, own


def run_checkpoints(run_dir: Path) -> tuple[list[Path], list[Path]]:
    """A run directory's checkpoints, whichever kind wrote them (periodic ``checkpoints/step*.ckpt``,
    ``last.ckpt``, the preemption callback's ``preempt.ckpt``, Lightning's SLURM ``hpc_ckpt_<n>.ckpt``):
    (the finished ones, newest first; the unfinished ones)."""
    found = [*run_dir.glob("checkpoints/*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    finished = sorted((c for c in found if is_committed(c)), key=written_at, reverse=True)
    return finished, [c for c in found if c not in finished]


STALE_AFTER = 300.0  # seconds without a write before a leftover counts as abandoned


def remove_interrupted_saves(run_dir: Path, *, stale_after: float = STALE_AFTER) -> list[tuple[Path, int]]:
    """Delete what killed saves left in a run directory, and say what (paths and bytes): the temporary
    files of single-file saves killed mid-write (``.<name>.tmp-<pid>``) and killed universal conversions
    (``.<name>.universal``, train/strategies.py). Neither can ever be loaded, nor is either removed by
    checkpoint retention, which knows finished checkpoints only: each a whole checkpoint's size, one more
    at every hard kill during a save. For a run that resumes in this directory, on rank 0, once the
    directory is known to be this run's. A leftover written to in the last ``stale_after`` seconds, or
    whose writer is a live process of this machine, is kept (another launch may still be saving there);
    symbolic links are never followed or removed. Sharded directories without their commit marker are
    left alone: one saved before markers existed is finished (``resume=auto`` names them)."""
    now = time.time()
    found = [*run_dir.glob("checkpoints/.*.tmp-*"), *run_dir.glob(".hpc_ckpt_*.tmp-*")]
    found += [p for p in run_dir.glob("checkpoints/.*.universal") if p.is_dir()]
    removed = []
    for path in sorted(found):
        if path.is_symlink():
            continue
        try:
            files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
            newest = max((f.stat().st_mtime for f in files), default=path.stat().st_mtime)
            if now - newest < stale_after or _writer_alive(path):
                continue
            size = sum(f.stat().st_size for f in files)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:  # gone meanwhile (renamed by a save that finished): nothing to remove
            continue
        removed.append((path, size))
    return removed


def _writer_alive(path: Path) -> bool:
    """Whether the process named in a ``.tmp-<pid>`` suffix is alive on this machine."""
    pid = path.name.rpartition(".tmp-")[2]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def damage(path: str | Path, *, crc: bool = True) -> str | None:
    """Why the finished checkpoint ``path`` cannot be loaded, or None when it is intact.

    A file is read whole and every zip member's CRC-32 is checked (``torch.save`` writes zip archives): a
    truncated file has no zip directory, a flipped bit fails its member's CRC. ``crc=False`` reads only the
    zip directory at the file's end: truncation is found, a flipped bit is not (what the ranks other than
    rank 0 check, train/run.py ``resolve_checkpoint``). A sharded directory's files must have the sizes its
    ``COMMITTED`` marker recorded (a stat per file: every rank checks, and none reads the other ranks'
    shards); a directory from before sizes were recorded gets the zip checks."""
    path = Path(path)
    if path.is_dir():
        try:
            recorded = json.loads((path / COMMIT_MARKER).read_text()).get("files", {})
        except (OSError, ValueError):
            recorded = {}  # a marker from before sizes were recorded: zip checks only
        for name, size in recorded.items():
            file = path / name
            if not file.is_file():
                return f"{file} is missing"
            if file.stat().st_size != size:
                return f"{file} has {file.stat().st_size} bytes, {size} when written"
        if recorded:  # every rank runs this before it loads its own shards: no rank reads them all
            return None
        files = [p for p in sorted(path.rglob("*")) if p.is_file() and p.name != COMMIT_MARKER]
    else:
        files = [path]
    for file in files:
        if file is not path and file.suffix not in (".pt", ".pth", ".ckpt", ".bin"):
            continue  # not a torch.save file (a DCP shard, json, the "latest" tag)
        try:
            with zipfile.ZipFile(file) as archive:
                bad = archive.testzip() if crc else None
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            return f"{file} is not a complete checkpoint ({e})"
        if bad is not None:
            return f"{file}: member {bad} fails its CRC-32 check"
    return None
