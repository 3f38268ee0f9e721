"""Periodic checkpoints, and ``last.ckpt`` at the step where training ended.

Lightning's ModelCheckpoint writes ``last.ckpt`` when training ends only if it has never written one.
A run whose ``max_steps`` is not a multiple of ``every_n_train_steps`` (270 steps, a checkpoint every
100), or one stopped by ``trainer.max_time``, therefore ended with ``last.ckpt`` at its last periodic
step (200): ``resume=auto`` repeated the steps after it, and the export (``train/checkpoint.py``) took
older weights than the metrics the run reported. This subclass writes ``last.ckpt`` at the final step.

Lightning also forgets which checkpoints it kept (the newest k, ``last.ckpt``) when its directory's path
is not the one saved in the checkpoint: a run moved or copied to another directory (restored from a
backup, from node-local scratch to a shared filesystem) and resumed there wrote ``last-v1.ckpt`` beside
the old ``last.ckpt`` (stale weights for whatever names it) and never pruned the checkpoints saved before
the move. The saved paths are taken as this directory's files.
"""

from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from train.callbacks.preemption import Preemption


class Checkpoint(ModelCheckpoint):
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("dirpath")
        if saved and self.dirpath and saved != self.dirpath:  # the run's directory moved: its files are here

            def here(path: Any) -> Any:
                if isinstance(path, str) and path and os.path.dirname(path) == saved:
                    return os.path.join(self.dirpath, os.path.basename(path))
                return path

            state_dict = {
                **state_dict,
                "dirpath": self.dirpath,
                **{k: here(state_dict[k]) for k in ("best_model_path", "kth_best_model_path", "last_model_path")
                   if k in state_dict},
                "best_k_models": {here(k): v for k, v in (state_dict.get("best_k_models") or {}).items()},
            }  # fmt: skip
        super().load_state_dict(state_dict)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a preemption stop already wrote this step (preempt.ckpt, which resume=auto takes): not twice
        preempted = any(isinstance(c, Preemption) and c.checkpoint is not None for c in trainer.callbacks)
        if self.save_last and not preempted and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)
