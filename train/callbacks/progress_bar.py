"""The progress bar, showing the training loss without reading it from the device at every step.

A metric logged with ``prog_bar=True`` is converted to a Python number by Lightning at the end of every
training batch (``_ResultCollection.metrics``), whether the bar redraws then or not, or is shown at all:
on a GPU that is a host read, the host waiting for the whole step to finish, at every step. The stages
log ``train/loss`` without ``prog_bar``; this bar reads it from ``trainer.callback_metrics`` when it
redraws (every ``refresh_rate`` steps: train/run.py sets the logging interval), and shows it as ``loss``.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar


class LossProgressBar(TQDMProgressBar):
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            items["loss"] = f"{float(loss):.4g}"
        return items
