"""LightningDataModule over shards: global batch arithmetic, tokenizer, rank-synchronised epochs.

The config states the global batch; the per-device batch is ``global / (world x accumulation)``.
Images arrive as uint8 and are normalised on the device (``on_after_batch_transfer``).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from data.filters import Filters
from data.manifest import LEVELS, VerifiedCache, check_shards, load_manifest, missing_shards
from data.pipeline import BAD_SAMPLE_REASONS, SKIP_REASONS, ShardDataset, _seed
from data.resume import Layout, LayoutChangeError, plan_resume
from data.shards import expand_shards, group_samples, open_shard, read_tar
from data.transforms import Normalize

log = logging.getLogger(__name__)


# Configs state the *global* batch (samples per optimizer step over all ranks). The per-device batch is
# derived from the world size and gradient accumulation, so a config means the same optimisation on 1
# GPU or 512.
def per_device_batch_size(global_batch_size: int, world_size: int, accumulate_grad_batches: int = 1) -> int:
    """global = per_device x world_size x accumulation; error if it does not divide."""
    if global_batch_size < 1 or world_size < 1 or accumulate_grad_batches < 1:
        raise ValueError(
            f"data.global_batch_size={global_batch_size}, world size {world_size}, "
            f"trainer.accumulate_grad_batches={accumulate_grad_batches}: all must be >= 1"
        )
    per_step = world_size * accumulate_grad_batches
    if global_batch_size % per_step:
        raise ValueError(
            f"data.global_batch_size={global_batch_size} is not divisible by world size {world_size} x "
            f"trainer.accumulate_grad_batches={accumulate_grad_batches} = {per_step}; choose a global batch "
            f"that is a multiple of {per_step}"
        )
    return global_batch_size // per_step


SHARD_REASONS = tuple(r for r in SKIP_REASONS if r not in BAD_SAMPLE_REASONS)


class DataError(RuntimeError):
    """The training data cannot continue (too many broken samples, or a rank without data)."""


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
        ds.start_positions, ds.start_skips, ds.start_cursors, ds.worker_offset = {}, {}, {}, 0
        ds.start_splits = {}
        ds.data_ranks = ds.data_world_size = None  # a new epoch: this rank's own partition
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
        if self.loader.generator is not None:  # worker seeds: a function of (seed, epoch) only
            self.loader.generator.manual_seed(int(_seed(ds.seed, ds.epoch, "loader")))

    def _record(self, state: dict) -> None:
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


class ShardDataModule(pl.LightningDataModule):
    """Image-text (or embedding) shards -> batches. See data/pipeline.py for the stages.

    Every argument is a config key under ``data.`` (conf/data/*.yaml documents them).
    """

    def __init__(
        self,
        *,
        train_shards: str | Sequence[str],
        val_shards: str | Sequence[str] | None = None,
        global_batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        mode: str = "epoch",
        image_size: int | None = 64,
        crop_size: int | None = None,
        normalize: str | None = "clip",
        train_crop: str = "random",
        tokenizer: Mapping[str, Any] | None = None,
        filters: Mapping[str, Any] | None = None,
        npy_fields: Sequence[str] = (),
        shuffle_buffer: int = 1000,
        seed: int = 0,
        train_num_samples: int | None = None,
        synthetic: Mapping[str, Any] | None = None,
        keep_val_json: bool = True,
        prefetch_factor: int = 4,
        pin_memory: bool | None = None,
        on_layout_change: str = "error",
        max_bad_fraction: float | None = 0.1,
        manifest: str | None = None,
        manifest_check: str = "sha256",
    ) -> None:
        """Long only by its keyword arguments, one per data option (documented in the class docstring and
        conf/data/shards.yaml), each checked here."""
        super().__init__()
        if manifest_check not in LEVELS:
            raise ValueError(f"data.manifest_check={manifest_check!r}: expected one of {LEVELS}")
        self.manifest, self.manifest_check = manifest, manifest_check
        if max_bad_fraction is not None and not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(
                f"data.max_bad_fraction={max_bad_fraction}: expected a fraction in [0, 1] or null"
            )
        self.max_bad_fraction = max_bad_fraction
        if on_layout_change not in ("error", "restart_epoch"):
            raise ValueError(
                f"data.on_layout_change={on_layout_change!r}: expected 'error' or 'restart_epoch'"
            )
        self.on_layout_change = on_layout_change
        self._resume_state: dict | None = None
        self.train_shards, self.val_shards = train_shards, val_shards
        self.global_batch_size = global_batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.mode = mode
        self.image_size, self.crop_size = image_size, crop_size
        # "none": uint8 images reach the module (stages that embed them with a frozen CLIP normalise there)
        self.normalize = None if normalize in (None, "none") else Normalize(normalize)
        self.train_crop = train_crop
        self.tokenizer_cfg = dict(tokenizer or {})
        self.filters = Filters(**dict(filters or {}))
        self.npy_fields = list(npy_fields)
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.train_num_samples = train_num_samples
        self.synthetic = dict(synthetic) if synthetic else None
        self.keep_val_json = keep_val_json
        self.prefetch_factor = prefetch_factor
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.tokenizer = None
        self.batch_size: int | None = None
        self._train_loader: RankSyncedLoader | None = None
        self._group = None

    # ---- preparation ----------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Write the synthetic shards if this dataset is the embedded default and they are missing."""
        if self.synthetic:
            ensure_synthetic(self.train_shards, self.val_shards, **self.synthetic)

    def build_tokenizer(self):
        """Load the tokenizer, or train it on the training captions and save it (config data.tokenizer)."""
        if self.tokenizer is None and self.tokenizer_cfg:
            from data.tokenizer import build_tokenizer

            cfg = dict(self.tokenizer_cfg)
            max_captions = cfg.pop("train_captions", 20000)
            captions = None
            if cfg.get("kind") == "bpe" and not (cfg.get("path") and Path(cfg["path"]).exists()):
                self.prepare_data()
                start = time.monotonic()
                captions = list(iter_captions(self.train_shards, max_captions))
                log.info("tokenizer: training a BPE on %d captions (read in %.1f s)", len(captions),
                         time.monotonic() - start)  # fmt: skip
            self.tokenizer = build_tokenizer(**cfg, captions=captions)
        return self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        world = self.trainer.world_size if self.trainer else 1
        accumulate = self.trainer.accumulate_grad_batches if self.trainer else 1
        self.batch_size = per_device_batch_size(self.global_batch_size, world, accumulate)
        self.build_tokenizer()
        if world > 1 and dist.is_available() and dist.is_initialized() and self._group is None:
            # A gloo side group for the per-batch "have data" vote: CPU tensors even under NCCL.
            self._group = dist.new_group(backend="gloo")
        if self.manifest and stage in (None, "fit"):
            self.check_manifest()
        log.info(
            "data: global batch %d = %d per device x %d ranks x %d accumulation",
            self.global_batch_size,
            self.batch_size,
            world,
            accumulate,
        )

    def check_manifest(self) -> None:
        """Check the training shards against ``data.manifest`` (each rank its share, hashed in parallel);
        every rank raises the same DataError listing every mismatch."""
        world = self.trainer.world_size if self.trainer else 1
        rank = self.trainer.global_rank if self.trainer else 0
        urls = expand_shards(self.train_shards)
        manifest = load_manifest(self.manifest)
        cache = VerifiedCache(self.manifest, writer=rank)  # a restart does not hash verified shards again
        problems = check_shards(urls[rank::world], manifest, level=self.manifest_check, cache=cache)
        if rank == 0:
            problems = missing_shards(urls, manifest) + problems
        if world > 1 and self._group is not None:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, problems, group=self._group)
            problems = [p for part in gathered for p in part]
        if problems:
            shown = "\n  ".join(problems[:20]) + (
                f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            )
            raise DataError(
                f"{len(problems)} shards of data.train_shards={self.train_shards!r} do not match "
                f"data.manifest={self.manifest!r} ({self.manifest_check} check):\n  {shown}"
            )
        log.info("data: %d shards match %s (%s check)", len(urls), self.manifest, self.manifest_check)

    def _dataset(self, shards, *, train: bool) -> ShardDataset:
        ds = ShardDataset(
            shards,
            batch_size=self.batch_size if train else (self.val_batch_size or self.batch_size),
            mode=self.mode if train else "epoch",
            image_size=self.image_size,
            crop_size=self.crop_size,
            crop=self.train_crop if train else "center",
            tokenizer=self.tokenizer,
            filters=self.filters,
            npy_fields=self.npy_fields,
            keep_json=not train and self.keep_val_json,
            shuffle_buffer=self.shuffle_buffer if train else 0,
            shuffle_shards=train,
            seed=self.seed,
            num_samples=self.train_num_samples if train else None,
            drop_last=train,  # every rank steps with the same per-device batch (all-gathered losses)
        )
        if self.trainer is not None:
            ds.rank, ds.world_size = self.trainer.global_rank, self.trainer.world_size
            ds.epoch = self.trainer.current_epoch
        return ds

    def _loader(self, ds: ShardDataset, *, sync: bool, checks: bool = False) -> RankSyncedLoader:
        workers = self.num_workers
        if workers > len(ds.urls) // ds.world_size:
            log.warning(
                "data: %d shards for %d ranks x %d workers: some workers get no shard; use at least as "
                "many shards as ranks x workers",
                len(ds.urls),
                ds.world_size,
                workers,
            )
        loader = DataLoader(
            ds,
            batch_size=None,  # the dataset batches (tokenising a whole batch at once)
            num_workers=workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
            persistent_workers=False,  # workers re-created each epoch so they see the new epoch number
            generator=torch.Generator().manual_seed(self.seed),
        )
        return RankSyncedLoader(
            loader, self._group if sync else None, checks=checks, max_bad_fraction=self.max_bad_fraction
        )

    def train_dataloader(self) -> RankSyncedLoader:
        self._train_loader = self._loader(
            self._dataset(self.train_shards, train=True), sync=True, checks=True
        )
        self._train_loader.epoch_fn = lambda: self.trainer.current_epoch if self.trainer else 0
        if self._resume_state is not None:
            self._train_loader.restore(self._resume_state)
            self._resume_state = None
        return self._train_loader

    def val_dataloader(self) -> RankSyncedLoader | list:
        if not self.val_shards:
            return []
        # Not rank-synchronised: validation runs no collective per step, so every rank evaluates all of
        # its shards (nothing dropped) and the module gathers the results at the end.
        return self._loader(self._dataset(self.val_shards, train=False), sync=False)

    # ---- exact resume: the data position travels in the checkpoint --------------------------------
    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        # Lightning calls this as a batch enters the training step (the fetcher is a batch ahead).
        if self.trainer is not None and self.trainer.training and self._train_loader is not None:
            self._train_loader.mark_consumed()
        return batch

    def state_dict(self) -> dict:
        """Every rank's data position (gathered: Lightning writes rank 0's checkpoint only), with the
        layout it belongs to. Called on every rank whenever a checkpoint is dumped."""
        if self._train_loader is None:
            return {}
        local = self._train_loader.position_state()
        world = self.trainer.world_size if self.trainer else 1
        ranks = [local]
        if world > 1 and dist.is_available() and dist.is_initialized():
            ranks = [None] * world
            dist.all_gather_object(ranks, local, group=self._group)
        ds = self._train_loader.loader.dataset
        return {
            "version": 2,
            "world_size": world,
            "data_world_size": ds.stream_world_size,
            "batch_per_data_rank": ds.batch_size // len(ds.streams),
            "num_workers": self.num_workers,
            "mode": self.mode,
            "seed": self.seed,
            "ranks": ranks,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume where the checkpoint's training step left the data: every rank continues with the next
        batch it had not trained on; on fewer or more ranks the epoch continues exactly once
        (data/resume.py). Another layout mid-epoch is refused, or restarts the epoch with
        ``on_layout_change=restart_epoch``."""
        if not state or "ranks" not in state:
            return
        world = self.trainer.world_size if self.trainer else 1
        layout = Layout(
            world=world,
            rank=self.trainer.global_rank if self.trainer else 0,
            num_workers=self.num_workers,
            mode=self.mode,
            seed=self.seed,
            batch=self.batch_size or per_device_batch_size(self.global_batch_size, world, 1),
        )
        try:
            position = plan_resume(state, layout)
        except LayoutChangeError as e:
            if self.on_layout_change != "restart_epoch":
                raise
            log.warning(
                "data: layout changed mid-epoch %d (%s): the epoch restarts (data.on_layout_change=restart_epoch)",
                e.epoch,
                "; ".join(e.problems),
            )
            return
        if position is None:
            return  # saved at an epoch boundary: the next epoch starts on the new layout
        if state["world_size"] != world:
            log.info(
                "data: epoch %d saved on %d ranks continues on %d: rank %d plays data ranks %s of %d%s",
                position["epoch"],
                state["world_size"],
                world,
                layout.rank,
                position["data_ranks"],
                position["data_world_size"],
                "".join(
                    f" (part {p} of {m} of its unopened shards)"
                    for m, p in {
                        tuple(st["split"][1:]) for st in position["streams"].values() if "split" in st
                    }
                ),
            )
        self._set_resume(position)

    def _set_resume(self, position: dict) -> None:
        self._resume_state = position
        if self._train_loader is not None:  # the loader exists already (a restore after setup)
            self._train_loader.restore(self._resume_state)
            self._resume_state = None

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if self.normalize is not None and "image" in batch and batch["image"].dtype == torch.uint8:
            batch["image"] = self.normalize(batch["image"])  # (B, 3, H, W) float on the device
        return batch

    def skip_counts(self) -> dict[str, int]:
        """Skipped samples by reason on this rank so far this epoch (zeros included: a fixed key set)."""
        keys = [
            *SKIP_REASONS,
            *self.filters.reasons,
            "partial_batch_dropped",
            "epoch_tail_dropped",
        ]  # identical on every rank
        counts = self._train_loader.skip_counts() if self._train_loader is not None else {}
        return {k: counts.get(k, 0) for k in keys}


def iter_captions(shards: str | Sequence[str], limit: int) -> Iterator[str]:
    """Captions of the first ``limit`` samples, reading only the txt members' bytes."""
    n = 0
    for url in expand_shards(shards):
        try:
            with open_shard(url) as stream:
                members = read_tar(stream, skip_data_of=frozenset(("jpg", "jpeg", "png", "webp", "npy")))
                for sample in group_samples(members):
                    if "txt" in sample:
                        yield sample["txt"].decode("utf-8", "replace").strip()
                        n += 1
                        if n >= limit:
                            return
        except Exception as e:  # noqa: BLE001 - a bad shard only shortens the tokenizer corpus
            log.warning("tokenizer corpus: shard %s: %s", url, e)


def ensure_synthetic(
    train_shards,
    val_shards,
    *,
    train_samples: int,
    val_samples: int,
    image_size: int = 64,
    shard_size: int = 1000,
    train_seed: int = 0,
    val_seed: int = 1,
) -> None:
    """Generate the embedded default dataset (data/synthetic.py) into the configured directories, which
    must be new, empty or a dataset it wrote before (its marker file): never into anything else."""
    from data.synthetic import MARKER, is_synthetic_dir, write_shards

    for spec, samples, seed in (
        (train_shards, train_samples, train_seed),
        (val_shards, val_samples, val_seed),
    ):
        if not spec or not isinstance(spec, str | os.PathLike):
            continue
        out = Path(spec)
        if is_synthetic_dir(out) and (out / "sizes.json").exists():
            continue  # generated already
        if out.exists() and (not out.is_dir() or any(out.iterdir())):  # never write into the user's data
            key = "train_shards" if spec == train_shards else "val_shards"
            raise ValueError(
                f"data.{key}={spec} is not a synthetic dataset written by data/synthetic.py (no "
                f"{MARKER}): data=synthetic generates its shards only into a new or empty directory. "
                f"To train on your own shards select data=shards (python -m train.run data=shards "
                f"data.{key}=...)"
            )
        log.info("writing %d synthetic samples (seed %d, %d px) to %s", samples, seed, image_size, out)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        # At least 4 shards (a small held-out split still feeds every loader worker); the samples do not
        # depend on the sharding.
        size = min(shard_size, max(1, -(-samples // 4)))
        write_shards(tmp, samples, seed=seed, image_size=image_size, shard_size=size)
        try:
            os.replace(tmp, out)  # atomic: a half-written dataset is never picked up
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (out / "sizes.json").exists():  # not a concurrent writer that finished first
                raise
