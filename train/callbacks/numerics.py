"""Numerical faults: a step whose loss or gradients are NaN/inf is skipped on every rank, counted, and
the run aborts with a clear error after ``max_consecutive`` of them; no checkpoint with a non-finite
weight is ever written; loss spikes are logged.

Checked after backward, before the optimizer step (``on_before_optimizer_step``): every rank tests its
own gradients (under FSDP only its shard) and the ranks agree with one all-reduce, so all of them skip
or none does. Skipping drops every gradient (``grad = None``): torch optimizers then leave the weights
and their state (Adam moments, step count) untouched. The learning-rate schedule still advances.
DeepSpeed keeps gradients inside its engine (no ``.grad``): there its own overflow check applies, and
this callback only guards checkpoints and logs spikes.

One collective per optimizer step carries both this check and the preemption flag (when the
Preemption callback is configured, it reads the agreed signal from here instead of a second
all-reduce): one small all-reduce and one host sync per step for both.

Logged: ``train/skipped_nonfinite`` (steps skipped so far), ``train/loss_spikes`` (loss above
``spike_factor`` x its running mean after ``spike_warmup`` steps).
"""

from __future__ import annotations

import logging
import math

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from train.callbacks.log_step import logs_this_step
from train.ema import local_shard

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    pass


class NumericalGuard(pl.Callback):
    def __init__(
        self,
        max_consecutive: int = 5,
        spike_factor: float = 3.0,
        spike_warmup: int = 50,
        spike_decay: float = 0.99,
        check_checkpoints: bool = True,
    ) -> None:
        if max_consecutive < 1:
            raise ValueError(f"callbacks.numerics.max_consecutive={max_consecutive}: expected >= 1")
        self.max_consecutive = max_consecutive
        self.spike_factor, self.spike_warmup, self.spike_decay = spike_factor, spike_warmup, spike_decay
        self.check_checkpoints = check_checkpoints
        self.skipped = 0
        self.consecutive = 0
        self.spikes = 0
        self._loss_mean: float | None = None
        self._seen = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from train.callbacks.preemption import Preemption

        self._preemption = next((c for c in trainer.callbacks if isinstance(c, Preemption)), None)
        if self._preemption is not None:
            self._preemption.carried = True  # its flag travels in this callback's all-reduce

    # ---- gradients, before the step ----------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        grads = [
            local_shard(p.grad)
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        preemption = getattr(self, "_preemption", None)
        signum = float((preemption.received or 0) if preemption is not None else 0)
        flags = torch.tensor([0.0, signum], device=pl_module.device)  # [non-finite anywhere, signal]
        if grads:  # one norm per gradient in a few fused kernels: NaN/inf norm <=> NaN/inf entry
            norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
            flags[0] = (~torch.isfinite(norms).all()).float().to(pl_module.device)
        if _world() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad, signum = flags.tolist()  # the one host sync of the step's checks
        if preemption is not None:
            preemption.agree(int(signum))
        if bad == 0:
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        log.warning(
            "step %d: non-finite gradients on at least one rank; step skipped on all ranks "
            "(%d in a row, %d in total)",
            trainer.global_step,
            self.consecutive,
            self.skipped,
        )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{self.consecutive} consecutive steps with NaN/inf gradients (up to step {trainer.global_step}); "
                "stopping. Lower module.optimizer.lr, check the data, or resume from an earlier checkpoint "
                f"(callbacks.numerics.max_consecutive={self.max_consecutive})"
            )

    # ---- the loss: counts and spikes ---------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if torch.is_tensor(loss) and loss.numel() == 1:
            value = float(loss.detach())
            if math.isfinite(value):
                self._track(value, trainer.global_step)
        if logs_this_step(trainer):
            pl_module.log("train/skipped_nonfinite", float(self.skipped), rank_zero_only=True)
            pl_module.log("train/loss_spikes", float(self.spikes), rank_zero_only=True)

    def _track(self, value: float, step: int) -> None:
        self._seen += 1
        if self._loss_mean is None:
            self._loss_mean = value
            return
        if self._seen > self.spike_warmup and value > self.spike_factor * self._loss_mean:
            self.spikes += 1
            log.warning("step %d: loss spike %.4g (running mean %.4g)", step, value, self._loss_mean)
        self._loss_mean = self.spike_decay * self._loss_mean + (1 - self.spike_decay) * value

    # ---- checkpoints -------------------------------------------------------------------------------
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        checkpoint["numerics"] = {
            "skipped": self.skipped,
            "spikes": self.spikes,
            "consecutive": self.consecutive,
            "loss_mean": self._loss_mean,
            "seen": self._seen,
        }
        if not self.check_checkpoints:
            return
        bad = [
            name for name, p in pl_module.named_parameters() if not torch.isfinite(_owned(p).detach()).all()
        ]
        flag = torch.tensor([float(bool(bad))], device=pl_module.device)
        if _world() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            raise NonFiniteError(
                f"refusing to write a checkpoint at step {trainer.global_step}: non-finite weights "
                f"({', '.join(bad[:5]) or 'on another rank'}); the previous checkpoint is kept"
            )

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        state = checkpoint.get("numerics") or {}
        self.skipped = int(state.get("skipped", 0))
        self.spikes = int(state.get("spikes", 0))
        self.consecutive = int(state.get("consecutive", 0))
        self._loss_mean = state.get("loss_mean")
        self._seen = int(state.get("seen", 0))


def _owned(p: torch.Tensor) -> torch.Tensor:
    """The elements of a weight this rank holds. A ZeRO-3 partition is padded to equal size on every
    rank, and the padding is uninitialised memory (a 1-element weight leaves rank 1 nothing but padding):
    checking it would refuse healthy checkpoints at random."""
    local = local_shard(p)
    if hasattr(p, "ds_tensor") and hasattr(p, "ds_numel"):
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        size = local.numel()
        return local.reshape(-1)[: max(0, min(size, p.ds_numel - rank * size))]
    return local


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
