"""Preemption: checkpoint once, at a step boundary, on every rank together, then stop (and requeue
under SLURM).

SLURM sends ``SIGUSR1`` ahead of the time limit (``#SBATCH --signal=USR1@90``), submitit (the Hydra
sweep launcher) ``SIGUSR2``; schedulers, spot instances and ``scancel`` send ``SIGTERM``. The signal
handler only records the signal: nothing is saved from inside a handler, which may interrupt a rank in
the middle of a collective. At every optimizer step the ranks agree (one all-reduce of a flag, the one
NumericalGuard makes anyway when it is configured: a signal that reached a single rank still stops them
all, at the same step); at the end of that step they write one checkpoint together (sharded strategies
need every rank), rank 0 calls ``scontrol requeue $SLURM_JOB_ID`` once when running under SLURM and the
signal is a time limit's (``requeue_signals``: USR1, USR2), and the trainer stops. ``SIGTERM`` is
checkpointed but not requeued: it is ``scancel``'s (a requeue made a job that scancel could not stop), or
a scheduler's preemption, which requeues the job itself where it means to (``PreemptMode=REQUEUE``).
``resume=auto`` picks the checkpoint up on the next start (train/run.py: the newest checkpoint wins).

This replaces Lightning's own SLURM handler, which saves from within the signal handler. Lightning
(2.6) also broadcasts rank 0's SIGTERM flag at every step of a multi-process run, a tensor made from host
memory and read back (on GPUs the host waits for the device at every step); the flag is set by Lightning's
SIGTERM handler, which this one replaces, so while this callback handles SIGTERM that broadcast is
skipped.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

import pytorch_lightning as pl

from train.parallel import agree_max

log = logging.getLogger(__name__)


class Preemption(pl.Callback):
    def __init__(
        self,
        signals: tuple[str, ...] | list[str] = ("SIGUSR1", "SIGUSR2", "SIGTERM"),
        filename: str = "preempt.ckpt",
        dirpath: str | None = None,
        requeue: str | bool = "auto",
        requeue_signals: tuple[str, ...] | list[str] = ("SIGUSR1", "SIGUSR2"),
        max_requeues: int | None = None,
    ) -> None:
        """``dirpath``: where the checkpoint goes (default ``<default_root_dir>/checkpoints``);
        ``requeue``: ``auto`` (under SLURM), true or false, after one of ``requeue_signals``, unless the job
        was requeued ``max_requeues`` times already (``SLURM_RESTART_COUNT``; None: no cap)."""
        self.max_requeues = max_requeues
        self.signals = [_signal(name, "signals") for name in signals]
        self.requeue_signals = {_signal(name, "requeue_signals") for name in requeue_signals}
        self.filename, self.dirpath, self.requeue = filename, dirpath, requeue
        self.received: int | None = None
        self.checkpoint: Path | None = None
        self.carried = False  # set by NumericalGuard: the ranks agree in its per-step all-reduce
        self._agreed: int | None = None
        self._previous: dict[int, object] = {}

    # ---- signals: record only ----------------------------------------------------------------------
    def _handler(self, signum, frame) -> None:
        self.received = signum

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.received, self.checkpoint = None, None
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)
        loop = trainer.fit_loop.epoch_loop
        if signal.SIGTERM in self.signals and hasattr(loop, "_broadcast_sigterm_tensor"):
            loop._broadcast_sigterm_tensor = _no_broadcast  # it could only send 0 (module docstring)
            self._loop = loop

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
        loop = getattr(self, "_loop", None)
        if loop is not None and "_broadcast_sigterm_tensor" in vars(loop):
            del loop._broadcast_sigterm_tensor  # Lightning's again
        self._loop = None

    def agree(self, signum: int) -> None:
        """The signal every rank agreed on at this optimizer step (0: none), from NumericalGuard."""
        self._agreed = signum

    # ---- the step boundary: agree, save once, requeue once, stop -----------------------------------
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx
    ) -> None:
        if self.checkpoint is not None:
            return
        if self.carried:  # agreed at this optimizer step by NumericalGuard (None: not a step boundary)
            signum, self._agreed = self._agreed, None
        else:
            signum = int(agree_max(float(self.received or 0), pl_module.device))
        if not signum:
            return
        dirpath = Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "checkpoints"
        path = dirpath / self.filename
        log.info("rank %d: preemption checkpoint at step %d", trainer.global_rank, trainer.global_step)
        if trainer.is_global_zero:
            log.warning(
                "received %s: saving %s at step %d (all %d ranks), then stopping",
                signal.Signals(signum).name,
                path,
                trainer.global_step,
                trainer.world_size,
            )
        trainer.save_checkpoint(path)
        trainer.strategy.barrier("preemption checkpoint")
        self.checkpoint = path
        job_id = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
        if array := os.environ.get("SLURM_ARRAY_TASK_ID"):
            job_id = f"{job_id}_{array}"
        wants = self.requeue is True or (self.requeue == "auto" and job_id is not None)
        if wants and signum not in self.requeue_signals:
            wants = False
            if trainer.is_global_zero:
                log.warning(
                    "%s is not a time limit's signal (callbacks.preemption.requeue_signals): not requeued; "
                    "resubmitting the job resumes from the newest checkpoint",
                    signal.Signals(signum).name,
                )
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        if wants and self.max_requeues is not None and restarts >= self.max_requeues:
            wants = False
            if trainer.is_global_zero:
                log.warning(
                    "job requeued %d times (callbacks.preemption.max_requeues=%d): not again; resubmitting "
                    "resumes from the newest checkpoint",
                    restarts,
                    self.max_requeues,
                )
        if wants and trainer.is_global_zero:
            if job_id is None:
                log.error("callbacks.preemption.requeue=true but SLURM_JOB_ID is not set: not requeued")
            else:
                result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
                if result.returncode == 0:
                    log.warning(
                        "requeued SLURM job %s; it resumes from the newest checkpoint (%s)", job_id, path
                    )
                else:
                    log.error(
                        "scontrol requeue %s failed (%s): %s",
                        job_id,
                        result.returncode,
                        result.stderr.strip(),
                    )
        trainer.should_stop = True


def _signal(name: str, key: str) -> int:
    if not hasattr(signal, str(name)):
        raise ValueError(f"callbacks.preemption.{key}: unknown signal {name!r} (e.g. SIGUSR1, SIGTERM)")
    return int(getattr(signal, str(name)))


def _no_broadcast() -> None:
    """Stands in for Lightning's per-step broadcast of its SIGTERM flag while Preemption handles SIGTERM."""
