"""Where each rank's data continues after a restart, from the saved data position and the new layout.

Pure functions of plain dicts (no Lightning, no torch.distributed): ``ShardDataModule.load_state_dict``
calls :func:`plan_resume` and hands the result to ``RankSyncedLoader.restore``.

A saved position (``ShardDataModule.state_dict``) holds every rank's streams: one per (data rank, loader
worker), each with its position, skip counts and cursor (data/stream.py). Normally a rank's data rank is
its rank. Mid-epoch, the epoch continues exactly once on

- **the same layout**: each rank takes its own saved streams;
- **fewer ranks** (the saved data-rank count a multiple of the new world size, same global batch): each
  rank plays k = saved / new data ranks, a batch being one chunk of batch / k from each, so every step
  trains the samples the saved layout would have, in the same order;
- **more ranks** (the new world size a multiple m of the saved data-rank count, same global batch, epoch
  mode, checkpoints with cursors): data rank v continues on m ranks. Part 0 (rank v*m) continues v's
  streams from their cursors (shuffle buffer and shard in progress) and every m-th of the shards they had
  not opened; part p > 0 reads the p-th of every m of those shards through a new shuffle buffer. Every
  sample still unread is trained once; which step trains it changes. Each stream records its
  ``split`` [first unopened shard, m, p]; that layout resumes as itself until the epoch ends.

Anything else (another ``num_workers``, seed or mode, a world size neither dividing nor a multiple of
the data ranks, another global batch, another list of training shards) raises :class:`LayoutChangeError`
naming it.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass


def shard_list_id(urls: list[str]) -> str:
    """What identifies the training shard list a data position indexes: its length and a CRC-32 of its
    entries, local paths taken relative to their common directory (a dataset moved whole resumes; a
    shard added, removed or reordered does not: the saved positions would point at other shards).
    Called at every checkpoint: linear in the list (200,000 shards: relpath per entry took 1.2 s)."""
    local = [u for u in urls if not u.startswith("pipe:") and "://" not in u]
    try:  # every path lying between two others as strings shares their common directory
        root = (
            os.path.commonpath([min(local), max(local)]) if len(set(local)) > 1 else os.path.dirname(local[0])
        )
    except (ValueError, IndexError):  # absolute and relative paths mixed, or none: compared as given
        root = ""
    cut = len(root) + 1 if root and root != os.sep else len(root)
    names = [u[cut:] if root and u.startswith(root) else u for u in urls]
    return f"{len(urls)} shards, crc {zlib.crc32(chr(10).join(names).encode()):08x}"


@dataclass(frozen=True)
class Layout:
    """The run that resumes: this rank, the world size and the data options that fix the streams."""

    world: int
    rank: int
    num_workers: int
    mode: str
    seed: int
    batch: int  # per device
    shards: str | None = None  # shard_list_id of the training shards (None: not compared)


class LayoutChangeError(ValueError):
    """The saved epoch cannot continue exactly once on this layout."""

    def __init__(self, epoch: int, saved_world: int, problems: list[str]) -> None:
        self.epoch, self.problems = epoch, problems
        super().__init__(
            f"the checkpoint stopped in the middle of data epoch {epoch}, saved with {saved_world} ranks; "
            f"the rest of that epoch cannot continue exactly once with {'; '.join(problems)}. Resume with the "
            "saved layout, or set data.on_layout_change=restart_epoch to restart the epoch (samples of its "
            "first part are seen twice)."
        )


def upgrade(state: dict) -> dict:
    """A version-1 data position (one data rank per rank, positions per worker) in today's form."""
    if state.get("version", 1) >= 2:
        return state
    ranks = [
        {
            "epoch": r["epoch"],
            "data_ranks": [i],
            "data_world_size": state["world_size"],
            "streams": {(i, int(w)): st for w, st in r["workers"].items()},
            "last_worker": r["last_worker"],
            "tail_dropped": r.get("tail_dropped", 0),
        }
        for i, r in enumerate(state["ranks"])
    ]
    return {
        **state,
        "version": 2,
        "data_world_size": state["world_size"],
        "batch_per_data_rank": None,
        "ranks": ranks,
    }


def plan_resume(state: dict, layout: Layout) -> dict | None:
    """This rank's position to restore, or None when the checkpoint is at an epoch boundary on another
    layout (the next epoch simply starts on the new one). Raises LayoutChangeError."""
    state = upgrade(state)
    saved = state["ranks"]
    same_streams = (state["num_workers"], state["mode"], state["seed"]) == (
        layout.num_workers,
        layout.mode,
        layout.seed,
    ) and _same_shards(state, layout)
    if same_streams and state["world_size"] == layout.world:
        return saved[layout.rank]
    if not any(r["streams"] for r in saved):
        return None
    problems = _problems(state, layout)
    if problems:
        raise LayoutChangeError(saved[0]["epoch"], state["world_size"], problems)
    if state["data_world_size"] % layout.world == 0:
        return _fewer(saved, state["data_world_size"], layout)
    return _more(saved, state["data_world_size"], layout)


def _same_shards(state: dict, layout: Layout) -> bool:
    return state.get("shards") is None or layout.shards is None or state["shards"] == layout.shards


def _problems(state: dict, layout: Layout) -> list[str]:
    """Why the saved epoch cannot continue on ``layout`` (empty: it can), each naming the option."""
    saved, data_world = state["ranks"], state["data_world_size"]
    problems = [
        f"data.{key}={now!r} (saved {was!r})"
        for key, was, now in (
            ("num_workers", state["num_workers"], layout.num_workers),
            ("mode", state["mode"], layout.mode),
            ("seed", state["seed"], layout.seed),
        )
        if was != now
    ]
    if not _same_shards(state, layout):
        same_count = str(state["shards"]).split(" shards")[0] == str(layout.shards).split(" shards")[0]
        moved = (
            "; or, the same shards from several directories, some of them moved and not the others: a list "
            "is compared relative to its directories' common parent"
            if same_count
            else ""
        )
        problems.append(
            f"data.train_shards listing {layout.shards} (saved: {state['shards']}; the saved positions index "
            f"the shard list: a shard was added, removed or reordered{moved})"
        )
    per_data_rank = state.get("batch_per_data_rank")
    if any("split" in st for r in saved for st in r["streams"].values()):
        problems.append(
            f"{layout.world} ranks (this epoch already continued on more ranks than it started on; it resumes "
            f"on those {state['world_size']} ranks until it ends)"
        )
    elif per_data_rank is None:
        problems.append(
            f"{layout.world} ranks (a checkpoint from before data version 2 records no batch per data rank)"
        )
    elif data_world % layout.world == 0:
        k = data_world // layout.world
        if layout.batch != k * per_data_rank:
            problems.append(
                f"a per-device batch of {layout.batch} (continuing {k} data ranks of {per_data_rank} each "
                f"needs {k * per_data_rank}: keep data.global_batch_size and trainer.accumulate_grad_batches)"
            )
    elif layout.world % data_world == 0:
        m = layout.world // data_world
        if layout.batch * m != per_data_rank:
            problems.append(
                f"a per-device batch of {layout.batch} (each of the {data_world} saved data ranks of "
                f"{per_data_rank} continues on {m} ranks: {per_data_rank} / {m} each; keep "
                "data.global_batch_size and trainer.accumulate_grad_batches)"
            )
        if layout.mode != "epoch":
            problems.append(f"{layout.world} ranks in data.mode={layout.mode} (more ranks: epoch mode only)")
        if any(st.get("cursor") is None for r in saved for st in r["streams"].values()):
            problems.append(f"{layout.world} ranks (a checkpoint from before stream cursors)")
    else:
        problems.append(
            f"{layout.world} ranks (the saved epoch is split into {data_world} data ranks; it continues on a "
            f"number of ranks that divides {data_world} or is a multiple of it)"
        )
    return problems


def _fewer(saved: list[dict], data_world: int, layout: Layout) -> dict:
    """Rank r plays saved data ranks r*k .. r*k + k-1."""
    k = data_world // layout.world
    mine = list(range(layout.rank * k, (layout.rank + 1) * k))
    first = next(r for r in saved if mine[0] in r["data_ranks"])
    return {
        "epoch": saved[0]["epoch"],
        "data_ranks": mine,
        "data_world_size": data_world,
        "streams": {(v, w): st for r in saved for (v, w), st in r["streams"].items() if v in mine},
        "last_worker": first["last_worker"],
        "tail_dropped": sum(r.get("tail_dropped", 0) for r in saved if r["data_ranks"][0] in mine),
    }


def _more(saved: list[dict], data_world: int, layout: Layout) -> dict:
    """Rank r plays part p = r % m of saved data rank v = r // m (see the module docstring)."""
    m = layout.world // data_world
    v, part = divmod(layout.rank, m)
    source = next(r for r in saved if v in r["data_ranks"])
    streams = {}
    for w in range(max(layout.num_workers, 1)):
        st = source["streams"].get((v, w))
        first_unopened = 0
        if st is not None:
            cursor = st["cursor"]
            first_unopened = int(cursor["shard"]) + (int(cursor["offset"]) > 0)
        if part == 0 and st is not None:
            streams[(v, w)] = {**st, "split": [first_unopened, m, 0]}
        else:
            streams[(v, w)] = {"position": 0, "skips": {}, "split": [first_unopened, m, part]}
    return {
        "epoch": saved[0]["epoch"],
        "data_ranks": [v],
        "data_world_size": data_world,
        "streams": streams,
        "last_worker": source["last_worker"],
        "tail_dropped": source.get("tail_dropped", 0) if part == 0 else 0,
    }
