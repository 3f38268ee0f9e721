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
import torch
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
        self._keep_at_most_top_k()

    def _keep_at_most_top_k(self) -> None:
        """The kept checkpoints as ``save_top_k`` says now: a run resumed with fewer kept than it saved
        failed at its first periodic save (Lightning looked up the k-th best of a list short of its k:
        ``KeyError: ''``), or kept every older checkpoint for ever (it removes one for each it saves).
        The best ``save_top_k`` stay (by ``monitor``: the newest steps); the files of the others are removed
        when training starts."""
        if self.save_top_k <= 0 or not self.best_k_models:  # (-1: all kept; 0: none compared nor removed)
            return
        ranked = sorted(
            self.best_k_models, key=lambda p: float(self.best_k_models[p]), reverse=self.mode == "max"
        )
        self._dropped = ranked[self.save_top_k :]
        self.best_k_models = {p: self.best_k_models[p] for p in ranked[: self.save_top_k]}
        if len(self.best_k_models) == self.save_top_k:
            self.kth_best_model_path = ranked[self.save_top_k - 1]
            self.kth_value = self.best_k_models[self.kth_best_model_path]
        else:  # (Lightning compares with the k-th best only once it keeps k)
            self.kth_best_model_path = ""
            self.kth_value = torch.tensor(float("-inf") if self.mode == "max" else float("inf"))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for path in getattr(self, "_dropped", ()):
            if path not in (self.last_model_path, self.best_model_path):
                trainer.strategy.remove_checkpoint(path)  # (rank 0 removes; a missing file is no error)
        self._dropped = []
        super().on_train_start(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a preemption stop already wrote this step (preempt.ckpt, which resume=auto takes): not twice
        preempted = any(isinstance(c, Preemption) and c.checkpoint is not None for c in trainer.callbacks)
        if self.save_last and not preempted and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)
