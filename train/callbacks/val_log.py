"""One text-log line per validation: the step, elapsed time and every ``val/*`` metric.

With ``trainer.enable_progress_bar=false`` (pipelines, SLURM logs) this is how a run reports progress;
with the bar on it is the durable record in ``run.log``.
"""

from __future__ import annotations

import logging
import time

import pytorch_lightning as pl

log = logging.getLogger(__name__)


class ValidationLog(pl.Callback):
    def __init__(self, prefix: str = "val/") -> None:
        self.prefix = prefix
        self._start: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {
            k[len(self.prefix) :]: float(v)
            for k, v in sorted(trainer.callback_metrics.items())
            if k.startswith(self.prefix) and v.numel() == 1
        }
        if not metrics:
            return
        elapsed = time.perf_counter() - self._start if self._start is not None else 0.0
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if not k.endswith("_n") and k != "n")
        log.info(f"step {trainer.global_step} ({elapsed:.0f} s): {shown}")
