"""The training loader's epoch and position keeping: every rank ends an epoch at the same step, the data
checks stop all ranks together, and the position of the last batch a step consumed is what a checkpoint
saves (data/datamodule.py saves and restores it; data/resume.py maps it to another world size).
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from data.pipeline import BAD_SAMPLE_REASONS, SKIP_REASONS, _seed

log = logging.getLogger(__name__)

SHARD_REASONS = tuple(r for r in SKIP_REASONS if r not in BAD_SAMPLE_REASONS)


class DataError(RuntimeError):
    """The training data cannot continue (too many broken samples, or a rank without data)."""


def _stop_workers(loader: DataLoader, owner: int) -> None:
    """Stop ``loader``'s persistent workers, in the process that owns them (a forked worker holds a copy
    of the loader and must not)."""
    iterator = getattr(loader, "_iterator", None)  # where DataLoader keeps persistent workers
    if iterator is not None and os.getpid() == owner:
        iterator._shutdown_workers()
        loader._iterator = None


class RankSyncedLoader:
    """Wraps a DataLoader so that all ranks end an epoch at the same step.

    In epoch mode ranks can hold different numbers of samples (shards of different sizes, more
    shards than ranks). DDP would hang when one rank leaves the epoch while the others enter the
    next gradient all-reduce. Before yielding each batch, every rank contributes "I have a batch" to
    an all-reduce(MIN) on a gloo group (a CPU tensor: no device sync, works beside NCCL); when any
    rank is dry, all stop together and the rest is counted as ``epoch_tail_dropped``.

    The same vote carries the data checks (``checks``, on for training): when the broken samples of an
    epoch pass ``max_bad_fraction`` of those read, or a rank gets no batch at all in an epoch (which
    would otherwise loop over empty epochs forever), every rank raises ``DataError`` together.

    Also the keeper of the data position (see data/pipeline.py). Each batch carries its worker's
    position; the loader remembers, per worker, the position of the last batch the training step
    *consumed* (``mark_consumed``, called as a batch enters the step). Lightning fetches one batch
    ahead, so the position of the last batch *yielded* would skip a batch on resume.
    ``position_state``/``restore`` save and restore it; ``epoch_fn`` gives the epoch whose order the
    next ``iter()`` follows.
    """

    def __init__(
        self,
        loader: DataLoader,
        group: Any | None = None,
        epoch_fn: Any | None = None,
        *,
        checks: bool = False,
        max_bad_fraction: float | None = 0.1,
    ) -> None:
        self.loader = loader
        self.checks, self.max_bad_fraction = checks, max_bad_fraction
        self._resumed = False
        self.group = group
        self.epoch_fn = epoch_fn
        self.worker_states: dict[int, dict] = {}
        self.tail_dropped = 0
        self.consumed: dict[int, dict] = {}  # worker -> state after its last batch a step consumed
        self.last_worker: int | None = None
        self._in_flight: deque[dict] = deque(maxlen=64)  # states of yielded, not yet consumed batches
        self._pending: dict | None = None  # this rank's saved position, applied by the next iter()
        # Persistent workers are stopped when this loader is dropped, not when the garbage collector gets
        # to the DataLoader: by then it may have closed the pipes that tell a worker to stop (each then
        # takes 5 s to be killed), or a worker forked meanwhile may do it from its copy.
        self._finalizer = weakref.finalize(self, _stop_workers, loader, os.getpid())

    def __iter__(self) -> Iterator[dict]:
        self._start_epoch()
        iterator = iter(self.loader)
        yielded = 0
        while True:
            batch = next(iterator, None)
            while batch is not None and not batch["__key__"]:  # state-only record from a finished worker
                self._record(batch["__state__"])
                batch = next(iterator, None)
            state = batch.pop("__state__") if batch is not None else None
            if state is not None:
                self._record(state)
            problem = self._data_problem(dry=batch is None, yielded=yielded) if self.checks else None
            status = self._agree(-1 if problem else 0 if batch is None else 1)
            if status < 0:
                raise DataError(problem or "another rank's training data failed its checks (see its log)")
            if status == 0:
                if batch is not None:  # another rank is dry: drain ours, counting what the epoch leaves out
                    self.tail_dropped += len(batch["__key__"])
                    for rest in iterator:
                        self.tail_dropped += len(rest["__key__"])
                        self._record(rest["__state__"])
                if not self.checks and self.tail_dropped:  # validation in lockstep (ZeRO-3)
                    log.warning(
                        "validation: %d samples of this rank left out after %d batches, where another rank "
                        "ran out of validation data (in step on every rank under ZeRO-3: its forwards gather "
                        "weights); give data.val_shards a multiple of the ranks' count of equal shards",
                        self.tail_dropped,
                        yielded,
                    )
                return
            self._in_flight.append(state)
            yielded += 1
            yield batch

    def _start_epoch(self) -> None:
        ds = self.loader.dataset
        if self.epoch_fn is not None:
            ds.epoch = int(self.epoch_fn())
        # counts are per epoch; a resume within the same epoch starts from the saved ones
        self.worker_states, self.tail_dropped, self.consumed, self.last_worker = {}, 0, {}, None
        self._in_flight.clear()
        ds.start_fresh()  # a new epoch: this rank's own partition, from its start
        pending, self._pending = self._pending, None
        self._resumed = pending is not None and pending["epoch"] == ds.epoch
        if self._resumed:
            streams = {(int(v), int(w)): st for (v, w), st in pending["streams"].items()}
            ds.data_ranks = [int(v) for v in pending.get("data_ranks", [ds.rank])]
            ds.data_world_size = int(pending.get("data_world_size", ds.world_size))
            ds.start_positions = {key: st["position"] for key, st in streams.items()}
            ds.start_skips = {key: dict(st["skips"]) for key, st in streams.items()}
            ds.start_cursors = {key: st["cursor"] for key, st in streams.items() if st.get("cursor")}
            ds.start_splits = {key: tuple(st["split"]) for key, st in streams.items() if st.get("split")}
            for (v, w), st in streams.items():
                record = self.worker_states.setdefault(w, {"worker": w, "streams": {}})
                record["streams"][v] = {**st, "skips": dict(st["skips"])}
            self.consumed = {
                w: {"worker": w, "streams": dict(st["streams"])} for w, st in self.worker_states.items()
            }
            self.last_worker = pending["last_worker"]
            self.tail_dropped = pending.get("tail_dropped", 0)
            n = max(self.loader.num_workers, 1)
            ds.worker_offset = 0 if self.last_worker is None else (self.last_worker + 1) % n
            log.info(
                "data: resuming epoch %d of rank %d (data ranks %s of %d) at stream positions %s",
                ds.epoch,
                ds.rank,
                ds.data_ranks,
                ds.data_world_size,
                ds.start_positions,
            )
            self.close()  # persistent workers hold the fields of their start: new ones take the position
        ds.publish()  # the epoch persistent workers take up
        if self.loader.generator is not None:  # worker seeds: a function of (seed, epoch) only
            self.loader.generator.manual_seed(int(_seed(ds.seed, ds.epoch, "loader")))

    def close(self) -> None:
        """Stop the loader's persistent workers (the next ``iter()`` starts new ones). Nothing to do for
        workers that end with each epoch. Lightning calls it when a fit ends or fails (through
        ``_iterator``, as for a DataLoader), so a pipeline's next stage does not run beside this one's
        idle workers."""
        _stop_workers(self.loader, os.getpid())

    @property
    def _iterator(self):
        """The DataLoader's persistent workers: Lightning's teardown stops a loader's through this name."""
        return getattr(self.loader, "_iterator", None)

    @_iterator.setter
    def _iterator(self, value) -> None:
        if value is None:
            self.close()

    def _record(self, state: dict) -> None:
        epoch = self.loader.dataset.epoch
        if state["epoch"] != epoch:  # a worker that missed the epoch's publication would repeat an order
            raise RuntimeError(
                f"data: loader worker {state['worker']} read epoch {state['epoch']} while the trainer is in "
                f"epoch {epoch}; run with data.persistent_workers=false and report this"
            )
        self.worker_states[state["worker"]] = state

    def mark_consumed(self) -> None:
        """The oldest yielded batch has entered a training step."""
        if self._in_flight:
            state = self._in_flight.popleft()
            self.consumed[state["worker"]] = state
            self.last_worker = state["worker"]

    def position_state(self) -> dict:
        """This rank's data position: what a resume needs to continue with the next unconsumed batch."""
        ds = self.loader.dataset
        return {
            "epoch": ds.epoch,
            "data_ranks": ds.streams,
            "data_world_size": ds.stream_world_size,
            "streams": {  # (data rank, worker) -> position, skips, cursor after its last consumed batch
                (v, w): {**st, "skips": dict(st["skips"])}
                for w, record in self.consumed.items()
                for v, st in record["streams"].items()
            },
            "last_worker": self.last_worker,
            "tail_dropped": self.tail_dropped,
        }

    def restore(self, state: dict) -> None:
        """Continue from ``position_state()`` at the next ``iter()`` (if it is for the same epoch)."""
        self._pending = state

    def _agree(self, status: int) -> int:
        """The ranks' common decision: 1 all have a batch, 0 some rank is dry (end the epoch together),
        -1 some rank's data failed its checks (every rank raises, so none hangs in a collective)."""
        if self.group is None:
            return status
        flag = torch.tensor([status], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)  # collective: every rank, every batch
        return int(flag.item())

    def _data_problem(self, *, dry: bool, yielded: int) -> str | None:
        """Why this rank's training data cannot go on, or None."""
        ds = self.loader.dataset
        counts = self.skip_counts()
        bad = {r: counts.get(r, 0) for r in BAD_SAMPLE_REASONS if counts.get(r, 0)}
        read = sum(st["position"] for _, st in self._streams()) + counts.get("duplicate_key", 0)
        limit = self.max_bad_fraction
        if limit is not None and sum(bad.values()) > limit * max(read, 1) and (read >= 100 or dry):
            return (
                f"rank {ds.rank}: {sum(bad.values())} of the {read} samples read this epoch are broken "
                f"({', '.join(f'{r} {n}' for r, n in bad.items())}), more than data.max_bad_fraction={limit}. "
                f"Check the shards (`python -m data.inspect {ds.spec}`) or raise the limit"
            )
        if dry and yielded == 0 and not self._resumed:
            shard_skips = {r: counts[r] for r in SHARD_REASONS if counts.get(r)}
            return (
                f"rank {ds.rank} of {ds.world_size}: no training batch this epoch from data.train_shards="
                f"{ds.spec!r} ({len(ds.urls)} shards in all; bad shards here: {shard_skips or 'none'}; "
                f"samples skipped: {({r: n for r, n in counts.items() if n}) or 'none'}). Every rank needs "
                "at least one shard with a full batch of good samples"
            )
        return None

    def __len__(self) -> int:
        return len(self.loader)

    def _streams(self) -> Iterator[tuple[tuple[int, int], dict]]:
        """((data rank, worker), latest state) of every stream this rank has heard from this epoch."""
        for w, record in self.worker_states.items():
            for v, st in record["streams"].items():
                yield (v, w), st

    def skip_counts(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for _, state in self._streams():
            for reason, n in state["skips"].items():
                totals[reason] = totals.get(reason, 0) + n
        totals["epoch_tail_dropped"] = self.tail_dropped
        return totals
