"""Data-path and speed metrics: skipped samples by reason, throughput, the fraction of time spent
waiting for data, model FLOPs utilisation and peak memory. Logged as ``data/skipped_<reason>`` (summed
over ranks, this epoch so far), ``perf/samples_per_sec`` (all ranks), ``perf/samples_per_sec_per_device``,
``perf/data_wait_frac``, ``perf/tflops_per_device``, ``perf/mfu`` (when the device's peak is known) and
``perf/max_memory_gb`` (CUDA: this run's peak since its training started, not the process's, so that the
stages of one ``train.pipeline`` process each report their own); the skip counts also go to the text log
at every epoch end. Each validation logs the held-out samples it skipped, ``data/val_skipped_<reason>``
(summed over ranks; only reasons that occurred), and warns, naming ``data.val_shards``, when no rank got
a single batch (every held-out sample skipped: no ``val/`` metric would be logged at all).

FLOPs are counted, not estimated: the first training step runs under ``train.perf.ModelFlopCounter``
(forward, backward and everything else the step computes, e.g. a frozen CLIP's embeddings, but not
activation-checkpoint recompute), giving FLOPs per sample; ``tflops_per_device`` = that x samples/s
per device. ``mfu`` divides by the device's dense peak for the run's precision (``peak_tflops``
overrides; train/perf.py has a table of common NVIDIA GPUs).
"""

from __future__ import annotations

import logging
import time

import pytorch_lightning as pl
import torch

from train.callbacks.log_step import logs_this_step
from train.parallel import all_sum
from train.perf import ModelFlopCounter, peak_tflops, process_age

log = logging.getLogger(__name__)


class DataStats(pl.Callback):
    def __init__(self, peak_tflops: float | None = None, count_flops: bool = True) -> None:
        self.peak_tflops = peak_tflops
        self.count_flops = count_flops
        self.flops_per_sample: float | None = None
        self._counter = self._eager = None
        self._batch_end: float | None = None
        self._wait = 0.0
        self._busy = 0.0
        self._samples = 0
        self._window_start: float | None = None
        self._val_batches = 0

    def on_train_start(self, trainer, pl_module) -> None:
        if torch.cuda.is_available():  # the peak of this stage, not of the stages before it in this process
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._batch_end is not None:
            self._wait += now - self._batch_end  # time from the last step's end to this batch's arrival
        self._step_start = now
        if self._window_start is None:
            self._window_start = now
            age = process_age()  # launch (or requeue) to the first batch: what a restart costs
            if age is not None and trainer.is_global_zero:
                log.info(
                    "first training batch (step %d) %.1f s after the process started",
                    trainer.global_step,
                    age,
                )
        if self.count_flops and self.flops_per_sample is None and self._counter is None:
            # The counted step runs eagerly: a compiled region first entered under a dispatch mode is
            # skipped by dynamo for good (trainer.compile would silently do nothing).
            self._eager = torch.compiler.set_stance("force_eager")
            self._eager.__enter__()
            self._counter = ModelFlopCounter(display=False)
            self._counter.__enter__()

    # The count travels in checkpoints: a resumed run does not count again. Counting runs the step under a
    # dispatch mode, which can change kernels' rounding in the last bit; an exact resume must not.
    def state_dict(self) -> dict:
        return {"flops_per_sample": self.flops_per_sample}

    def load_state_dict(self, state_dict: dict) -> None:
        self.flops_per_sample = state_dict.get("flops_per_sample")

    def _stop_counting(self) -> None:
        self._counter.__exit__(None, None, None)
        self._eager.__exit__(None, None, None)
        self._counter = self._eager = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self._counter is not None:
            self._stop_counting()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = _batch_len(batch)
        if self._counter is not None:
            self.flops_per_sample = self._counter.get_total_flops() / max(n, 1)
            self._stop_counting()
        now = time.perf_counter()
        self._busy += now - self._step_start
        self._batch_end = now
        self._samples += n
        if not logs_this_step(trainer) or trainer.fit_loop.epoch_loop._should_accumulate():
            # the window runs on to the next optimizer step the loggers write (with accumulation every
            # micro-batch of a logging step passed the first test: the logged window was the last one's)
            return
        elapsed = now - self._window_start
        per_device = self._samples / max(elapsed, 1e-9)
        metrics = {
            "perf/samples_per_sec": per_device * trainer.world_size,
            "perf/samples_per_sec_per_device": per_device,
            "perf/data_wait_frac": self._wait / max(self._wait + self._busy, 1e-9),
        }
        if self.flops_per_sample:
            tflops = self.flops_per_sample * per_device / 1e12
            metrics["perf/tflops_per_device"] = tflops
            peak = self.peak_tflops or peak_tflops(str(trainer.precision))
            if peak:
                metrics["perf/mfu"] = tflops / peak
        if torch.cuda.is_available():
            metrics["perf/max_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "skip_counts"):
            # The same keys on every rank, summed over ranks in one collective (a sync_dist log per key
            # was 17 all-reduces at every logging step)
            counts = datamodule.skip_counts()
            for reason, n in zip(counts, all_sum(list(counts.values()), pl_module.device)):
                pl_module.log(f"data/skipped_{reason}", n, rank_zero_only=True)
        pl_module.log_dict(metrics, rank_zero_only=True)
        self._wait = self._busy = 0.0
        self._samples = 0
        self._window_start = now

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._val_batches = 0

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._val_batches += 1

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        datamodule = trainer.datamodule
        if trainer.sanity_checking or datamodule is None or not hasattr(datamodule, "val_skip_counts"):
            return
        counts = datamodule.val_skip_counts()
        # one collective: every rank validates, so every rank calls it
        batches, *skipped = all_sum([self._val_batches, *counts.values()], pl_module.device)
        skipped = {reason: int(n) for reason, n in zip(counts, skipped) if n}
        for reason, n in skipped.items():
            pl_module.log(f"data/val_skipped_{reason}", float(n), rank_zero_only=True)
        if batches == 0 and trainer.is_global_zero:
            log.warning(
                "validation at step %d: no held-out batch on any rank, so no val/ metric: every sample of "
                "data.val_shards=%s was skipped (%s); check them with python -m data.inspect",
                trainer.global_step,
                getattr(datamodule, "val_shards", None),
                ", ".join(f"{k} {v}" for k, v in skipped.items()) or "no sample read",
            )

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


def _batch_len(batch) -> int:
    if isinstance(batch, dict):
        if "__key__" in batch:
            return len(batch["__key__"])
        for value in batch.values():
            if torch.is_tensor(value) and value.dim() > 0:
                return int(value.shape[0])
    return 0
