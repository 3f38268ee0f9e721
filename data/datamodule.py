"""LightningDataModule over shards: global batch arithmetic, tokenizer, rank-synchronised epochs.

The config states the global batch; the per-device batch is ``global / (world x accumulation)``.
Images arrive as uint8 and are normalised on the device (``on_after_batch_transfer``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from data.filters import Filters
from data.loader import DataError, RankSyncedLoader
from data.manifest import LEVELS, VerifiedCache, check_shards, load_manifest, missing_shards
from data.pipeline import SKIP_REASONS, ShardDataset
from data.resume import Layout, LayoutChangeError, plan_resume, shard_list_id
from data.shards import expand_shards, iter_captions
from data.synthetic import ensure_synthetic
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
        persistent_workers: bool = True,
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
        # data=synthetic's block says generate: debug=fast's sizes merge into every data config's, and a
        # data=shards run given a new path wrote synthetic shapes there and trained on them
        synthetic = dict(synthetic or {})
        self.synthetic = synthetic if synthetic.pop("generate", False) else None
        self.keep_val_json = keep_val_json
        # the CLIP stage's module.hard_negatives (train/run.py sets it): made in the loader workers
        self.hard_negatives: tuple[str, ...] = ()
        self.prefetch_factor = prefetch_factor
        self.persistent_workers = persistent_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.tokenizer = None
        self.batch_size: int | None = None
        self._train_loader: RankSyncedLoader | None = None
        self._val_loader: RankSyncedLoader | None = None
        self._group = None

    # ---- preparation ----------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Write the synthetic shards if this dataset is the embedded default (``data.synthetic.generate``)
        and they are missing."""
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

    def teardown(self, stage: str | None = None) -> None:
        """Leave the gloo side group (Lightning calls this on every rank at the end of each fit, validate
        or test; the next ``setup`` makes a new one). Kept, every training run in one process (the
        pipeline's stages, a sweep's points) left a group of sockets and threads behind on each rank."""
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None

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
            hard_negatives=self.hard_negatives if train else (),
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

    def _loader(self, ds: ShardDataset, *, train: bool) -> RankSyncedLoader:
        """The train loader is rank-synchronised, checks the data and keeps its workers through the fit
        (the epoch reaches them in shared memory: data/pipeline.py StreamPosition). Validation runs no
        collective per step (train/modules/base.py), so every rank evaluates all of its shards (nothing
        dropped) and the module gathers the results at the end, except under ZeRO-3 (val_dataloader);
        its workers live while it runs."""
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
            persistent_workers=train and workers > 0 and self.persistent_workers,
            generator=torch.Generator().manual_seed(self.seed),
        )
        return RankSyncedLoader(
            loader, self._group if train else None, checks=train, max_bad_fraction=self.max_bad_fraction
        )

    def train_dataloader(self) -> RankSyncedLoader:
        self._train_loader = self._loader(self._dataset(self.train_shards, train=True), train=True)
        self._train_loader.epoch_fn = lambda: self.trainer.current_epoch if self.trainer else 0
        if self._resume_state is not None:
            self._train_loader.restore(self._resume_state)
            self._resume_state = None
        return self._train_loader

    def val_dataloader(self) -> RankSyncedLoader | list:
        if not self.val_shards:
            return []
        ds = self._dataset(self.val_shards, train=False)
        if len(ds.urls) < ds.world_size:
            log.warning(
                "data.val_shards=%r: %d shards for %d ranks; a rank with no shard evaluates nothing (and "
                "under ZeRO-3, no rank does: see val_dataloader); use at least as many shards as ranks",
                self.val_shards,
                len(ds.urls),
                ds.world_size,
            )
        loader = self._val_loader = self._loader(ds, train=False)
        if getattr(self.trainer.strategy if self.trainer else None, "zero_stage_3", False):
            # ZeRO-3 gathers weights at every module call, validation's too: a collective per forward, so
            # every rank must run the same validation steps. All stop when one runs out (the rest of the
            # others' shards is left out, with a warning). DDP and FSDP validate without collectives.
            loader.group = self._group
        return loader

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """A batch's tensors to the device (non-blocking: pinned under CUDA); its keys, captions and JSON
        stay as they are. Lightning's default walks every element of every list, 3 ms of host time per
        step at 1,024 captions (measured on this CPU)."""
        if not isinstance(batch, dict):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        return {
            k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
        }

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
            "shards": shard_list_id(ds.urls),
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
            shards=shard_list_id(self.train_urls()) if state.get("shards") else None,
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

    def train_urls(self) -> list[str]:
        """The training shards, in the order the saved positions index them (the train dataset's ``urls``)."""
        return expand_shards(self.train_shards)

    def _set_resume(self, position: dict) -> None:
        # Kept for the next train_dataloader(): Lightning restores a DataModule before it asks for the
        # fit's loader, so an existing loader may be a previous fit's. That one is told as well, in case
        # it is iterated again.
        self._resume_state = position
        if self._train_loader is not None:
            self._train_loader.restore(position)

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

    def val_skip_counts(self) -> dict[str, int]:
        """Held-out samples skipped by reason on this rank in the last validation (the same keys)."""
        counts = self._val_loader.skip_counts() if self._val_loader is not None else {}
        return {k: counts.get(k, 0) for k in self.skip_counts()}
