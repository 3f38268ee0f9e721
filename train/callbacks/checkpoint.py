"""Periodic checkpoints, and ``last.ckpt`` at the step where training ended.

Lightning's ModelCheckpoint writes ``last.ckpt`` when training ends only if it has never written one.
A run whose ``max_steps`` is not a multiple of ``every_n_train_steps`` (270 steps, a checkpoint every
100), or one stopped by ``trainer.max_time``, therefore ended with ``last.ckpt`` at its last periodic
step (200): ``resume=auto`` repeated the steps after it, and the export (``train/checkpoint.py``) took
older weights than the metrics the run reported. This subclass writes ``last.ckpt`` at the final step.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from train.callbacks.preemption import Preemption


class Checkpoint(ModelCheckpoint):
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a preemption stop already wrote this step (preempt.ckpt, which resume=auto takes): not twice
        preempted = any(isinstance(c, Preemption) and c.checkpoint is not None for c in trainer.callbacks)
        if self.save_last and not preempted and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)
