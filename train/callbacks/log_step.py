"""Keep the step every logger sees equal to the optimizer steps taken, across resumes.

Lightning 2.6 resumes a checkpoint written at the end of a step that also ran validation ("restarted on
last") by replaying that loop iteration without training, but the replay still advances the counter
loggers use as their step (``_batches_that_stepped``). Every metric of the resumed run then lands one
step late: CSV rows, TensorBoard curves and W&B history skip a step and stay shifted, and the shift
grows with each such resume. train/run.py always adds this callback; at the first training batch of
a fit (the replay comes before it) it sets the counter back to ``trainer.global_step``, which it equals
by definition with one optimizer under automatic optimization, as every stage has. Later batches are
left alone.
"""

from __future__ import annotations

import pytorch_lightning as pl


class LoggerStepSync(pl.Callback):
    def __init__(self) -> None:
        self._first = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._first = True

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int
    ) -> None:
        if not self._first:
            return
        self._first = False
        if not pl_module.automatic_optimization or len(trainer.optimizers) != 1:
            return
        loop = trainer.fit_loop.epoch_loop
        if loop._batches_that_stepped != trainer.global_step:
            loop._batches_that_stepped = trainer.global_step
