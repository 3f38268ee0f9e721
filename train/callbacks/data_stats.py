"""Data-path metrics: skipped samples by reason, throughput, and the fraction of time spent waiting
for data. Logged once, from here, as ``data/skipped_<reason>`` (summed over ranks, this epoch so far),
``perf/samples_per_sec`` (all ranks), ``perf/samples_per_sec_per_device`` and ``perf/data_wait_frac``;
the skip counts also go to the text log at every epoch end.
"""

from __future__ import annotations

import logging
import time

import pytorch_lightning as pl

log = logging.getLogger(__name__)


class DataStats(pl.Callback):
    def __init__(self) -> None:
        self._batch_end: float | None = None
        self._wait = 0.0
        self._busy = 0.0
        self._samples = 0
        self._window_start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._batch_end is not None:
            self._wait += now - self._batch_end  # time from the last step's end to this batch's arrival
        self._step_start = now
        if self._window_start is None:
            self._window_start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self._busy += now - self._step_start
        self._batch_end = now
        self._samples += len(batch["__key__"]) if "__key__" in batch else 0
        last = trainer.is_last_batch or 0 < trainer.max_steps <= trainer.global_step
        if trainer.global_step % max(trainer.log_every_n_steps, 1) and not last:
            return
        elapsed = now - self._window_start
        per_device = self._samples / max(elapsed, 1e-9)
        metrics = {
            "perf/samples_per_sec": per_device * trainer.world_size,
            "perf/samples_per_sec_per_device": per_device,
            "perf/data_wait_frac": self._wait / max(self._wait + self._busy, 1e-9),
        }
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "skip_counts"):
            # Fixed key set on every rank (a collective per key): summed over ranks.
            for reason, n in datamodule.skip_counts().items():
                pl_module.log(f"data/skipped_{reason}", float(n), reduce_fx="sum", sync_dist=True)
        pl_module.log_dict(metrics, rank_zero_only=True)
        self._wait = self._busy = 0.0
        self._samples = 0
        self._window_start = now

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "skip_counts"):
            skipped = {k: v for k, v in datamodule.skip_counts().items() if v}
            log.info(
                "epoch %d, rank %d: skipped samples by reason: %s",
                trainer.current_epoch,
                trainer.global_rank,
                skipped or "none",
            )
