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


def logs_this_step(trainer: pl.Trainer) -> bool:
    """Whether this training step's on-step values reach the loggers: Lightning writes them every
    ``trainer.log_every_n_steps`` and when stopping; this adds the last step (``max_steps`` or the
    epoch's last batch), so the run's final metrics hold every key. Valid in ``training_step`` and in
    ``on_train_batch_end``.

    A value only the loggers read (the learning rate, a counter, an auxiliary loss) is logged at these
    steps alone: each ``self.log`` costs about 0.4 ms of host time (measured on 2 CPU cores), which
    a GPU step of a few milliseconds waits for. ``train/loss`` is still logged at every step (the
    progress bar, checkpoint monitors).
    """
    if trainer._logger_connector.should_update_logs or trainer.is_last_batch:
        return True
    step = trainer.fit_loop.epoch_loop._batches_that_stepped + 1  # this step's number in both hooks
    return 0 < trainer.max_steps <= step
