"""``trainer.max_time``: training stops at the first step after the time is up, on every rank at the same
step, validated and checkpointed there as any stop is. train/run.py gives the key to this callback rather
than to Lightning's Timer.

Lightning's Timer has the ranks agree by broadcasting a Python object at every step, which on GPUs makes
the host wait for the device at every step. Here each rank reads its own clock and the ranks agree in the
numerics guard's all-reduce (train/callbacks/numerics.py), which runs anyway: on CUDA it is read a step
later, so the stop comes a step later too. Without the guard, several processes agree in an all-reduce of
their own at every step.

The time counts from the start of training (``on_train_start``) and is saved in checkpoints, so a resumed
run has what was left (also from a checkpoint that Lightning's Timer wrote).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl

from train.parallel import agree_max

log = logging.getLogger(__name__)


def seconds(max_time: str) -> float:
    """'DD:HH:MM:SS' (Lightning's ``max_time`` string) -> seconds."""
    match = re.fullmatch(r"(\d+):(\d\d):(\d\d):(\d\d)", str(max_time).strip())
    if match is None:
        raise ValueError(f"trainer.max_time={max_time!r}: expected 'DD:HH:MM:SS' (e.g. '00:00:05:00')")
    days, hours, minutes, secs = (int(g) for g in match.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + secs)


class TimeLimit(pl.Callback):
    def __init__(self, max_time: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_time, self.limit, self.clock = max_time, seconds(max_time), clock
        self.carried = False  # set by NumericalGuard: the ranks agree in its all-reduce
        self._offset = 0.0  # time used before this fit (a resumed run's checkpoint)
        self._start: float | None = None
        self._agreed = False

    def elapsed(self) -> float:
        return self._offset + (self.clock() - self._start if self._start is not None else 0.0)

    def due(self) -> bool:
        """This rank's clock says the time is up."""
        return self.elapsed() >= self.limit

    def agree(self, due: bool) -> None:
        """What the ranks agreed on at an optimizer step (from NumericalGuard)."""
        self._agreed = self._agreed or due

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._agreed = self.clock(), False

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx
    ) -> None:
        stop = self._agreed if self.carried else bool(agree_max(float(self.due()), pl_module.device))
        if stop and not trainer.should_stop:
            log.info(
                "trainer.max_time=%s reached (%.0f s of training): stopping at step %d",
                self.max_time,
                self.elapsed(),
                trainer.global_step,
            )
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed": self.elapsed()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._offset = float(state_dict.get("elapsed", 0.0))

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        timer = (checkpoint.get("callbacks") or {}).get("Timer")  # written with Lightning's Timer
        if timer and self.state_key not in checkpoint.get("callbacks", {}):
            self._offset = float(timer.get("time_elapsed", {}).get("train", 0.0))
