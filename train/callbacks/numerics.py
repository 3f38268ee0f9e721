"""Numerical faults: a step whose loss or gradients are NaN/inf is skipped on every rank, counted, and
the run aborts with a clear error after ``max_consecutive`` of them; no checkpoint with a non-finite
weight is ever written; loss spikes are logged.

Checked after backward, before the optimizer step (``on_before_optimizer_step``): every rank tests its
own gradients (under FSDP only its shard) and the ranks agree with one all-reduce, so all of them skip
or none does. DeepSpeed keeps gradients inside its engine (no ``.grad``): there its own overflow check
skips the step, on every rank, and this callback counts the engine's skipped steps after each step
(``train/skipped_nonfinite``) and stops the run after ``max_consecutive`` of them, as elsewhere (it
trained on with an infinite loss and exited 0).

How a step is skipped, and when the host learns of it (``defer``):

- **On the device** (torch's fused Adam/AdamW, our optimizer on CUDA; ``defer=auto`` there): the agreed
  flag goes to the optimizer as ``found_inf``, and the fused kernel leaves the weights and their state
  (moments, step count) untouched when it is set, as it does for a GradScaler. Nothing in the step
  waits for the GPU: the flag is copied to pinned host memory behind the step and read at the next
  step's check (or at a checkpoint, or the end of training), where it is counted, logged, and stops the
  run after ``max_consecutive``, one step later than it happened.
- **On the host** (any other optimizer, a GradScaler, FSDP's sharded tensors, the CPU; ``defer=false``):
  the flag is read at once (a host sync) and a bad step drops every gradient (``grad = None``), so the
  optimizer skips its update.

The learning-rate schedule advances either way. One collective per optimizer step carries this check,
the preemption flag and the time limit's (when the Preemption and TimeLimit callbacks are configured,
they read the ranks' agreement from here instead of making their own; deferred, one step later).

Loss spikes (a loss above ``spike_factor`` x its running mean after ``spike_warmup`` steps) are counted
on the device too, and read when they are logged: ``train/skipped_nonfinite`` (steps skipped so far)
and ``train/loss_spikes``, at the logging steps.
"""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from train.callbacks.log_step import logs_this_step
from train.callbacks.preemption import Preemption
from train.callbacks.time_limit import TimeLimit
from train.ema import local_shard
from train.parallel import world_size

log = logging.getLogger(__name__)

DEFER = ("auto", True, False)


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
        defer: str | bool = "auto",
    ) -> None:
        if max_consecutive < 1:
            raise ValueError(f"callbacks.numerics.max_consecutive={max_consecutive}: expected >= 1")
        if defer not in DEFER:
            raise ValueError(f"callbacks.numerics.defer={defer!r}: expected auto, true or false")
        self.max_consecutive = max_consecutive
        self.spike_factor, self.spike_warmup, self.spike_decay = spike_factor, spike_warmup, spike_decay
        self.check_checkpoints = check_checkpoints
        self.defer = defer
        self.skipped = 0
        self.consecutive = 0
        # [losses seen (finite), running mean, spikes] on the training device, read when logged or saved
        self._loss: torch.Tensor | None = None
        self._loss_saved: list[float] = [0.0, 0.0, 0.0]
        self._spikes_logged = 0
        self._pending: tuple[int, torch.Tensor, torch.cuda.Event | None] | None = None
        self._host: torch.Tensor | None = None  # pinned: where a deferred verdict lands

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._preemption = next((c for c in trainer.callbacks if isinstance(c, Preemption)), None)
        self._time_limit = next((c for c in trainer.callbacks if isinstance(c, TimeLimit)), None)
        for carried in (self._preemption, self._time_limit):
            if carried is not None:
                carried.carried = True  # its flag travels in this callback's all-reduce

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ds_step = None  # DeepSpeed: the engine's skip count from here (restored with its checkpoint)
        self._ds_skipped = 0
        self._count_deepspeed(trainer)

    # ---- gradients, before the step ----------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's torch optimizer
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [local_shard(p.grad) for p in params if p.grad is not None]
        preemption = getattr(self, "_preemption", None)
        time_limit = getattr(self, "_time_limit", None)
        signum = (preemption.received or 0) if preemption is not None else 0
        # [non-finite anywhere, signal, time is up]: made on the device, not copied from the host
        flags = torch.zeros(3, device=pl_module.device)
        if signum:
            flags[1] = float(signum)
        if time_limit is not None and time_limit.due():
            flags[2] = 1.0
        if grads:  # one norm per gradient in a few fused kernels: NaN/inf norm <=> NaN/inf entry
            norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
            flags[0] = (~torch.isfinite(norms).all()).float().to(flags.device)
        if world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if self._defers(trainer, optimizer, params, flags.device):
            self._settle()  # the previous step's verdict
            optimizer.found_inf = flags[0]  # the fused kernel skips the update when it is 1
            self._pending = (trainer.global_step, *self._to_host(flags))
            return
        bad, signum, due = flags.tolist()  # the step's one host sync, for every check
        if bad:
            for p in params:
                p.grad = None
        engine = getattr(trainer.strategy, "deepspeed_engine", None)  # its own check decides: after its step
        self._verdict(None if engine is not None else bool(bad), int(signum), bool(due), trainer.global_step)

    def _defers(self, trainer: pl.Trainer, optimizer, params: list, device: torch.device) -> bool:
        """Whether the optimizer can skip a step on the device (see the module docstring); decided once
        for each optimizer."""
        if self.defer is False:
            return False
        cached = getattr(self, "_decided", None)
        if cached is not None and cached[0] is optimizer:
            return cached[1]
        fused = isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and all(
            g.get("fused") for g in optimizer.param_groups
        )
        plain = all(type(p.data) is torch.Tensor for p in params)  # not DTensor shards (FSDP2)
        scaler = getattr(trainer.precision_plugin, "scaler", None) is not None  # it sets found_inf itself
        able = fused and plain and not scaler
        if self.defer is True and not able:
            raise ValueError(
                "callbacks.numerics.defer=true needs torch's fused Adam/AdamW over plain tensors and no "
                f"GradScaler (got {type(optimizer).__name__}, fused={fused}, plain tensors={plain}, "
                f"GradScaler={scaler}); use defer=auto or false"
            )
        self._decided = (optimizer, able and (self.defer is True or device.type == "cuda"))
        return self._decided[1]

    def _to_host(self, flags: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        if flags.device.type != "cuda":
            return flags, None
        if self._host is None:
            self._host = torch.empty(3, pin_memory=True)
        self._host.copy_(flags, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return self._host, event

    def _settle(self) -> None:
        """Count the deferred verdict of the last step (waiting for it if the GPU has not got there)."""
        if self._pending is None:
            return
        step, values, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        bad, signum, due = values.tolist()
        self._verdict(bool(bad), int(signum), bool(due), step)

    def _verdict(self, bad: bool | None, signum: int, due: bool, step: int) -> None:
        """The ranks' agreed flags of a step; ``bad`` None: not known here (DeepSpeed's, counted by
        :meth:`_count_deepspeed` after the engine's step)."""
        preemption, time_limit = getattr(self, "_preemption", None), getattr(self, "_time_limit", None)
        if preemption is not None:
            preemption.agree(signum)
        if time_limit is not None:
            time_limit.agree(due)
        if bad is not None:
            self._count(bad, step)

    def _count_deepspeed(self, trainer: pl.Trainer) -> None:
        """The engine's skipped steps (its overflow check, already read on the host) since the last
        optimizer step: each is a skipped step here."""
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        if engine is None or trainer.global_step == getattr(self, "_ds_step", None):
            return  # not DeepSpeed, or a micro-batch of an accumulation (no step yet)
        skipped = int(getattr(engine, "skipped_steps", 0))
        if getattr(self, "_ds_step", None) is not None:
            self._count(skipped > self._ds_skipped, trainer.global_step)
        self._ds_step, self._ds_skipped = trainer.global_step, skipped

    def _count(self, bad: bool, step: int) -> None:
        if not bad:
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        log.warning(
            "step %d: non-finite gradients on at least one rank; step skipped on all ranks "
            "(%d in a row, %d in total)",
            step,
            self.consecutive,
            self.skipped,
        )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(
                f"{self.consecutive} consecutive steps with NaN/inf gradients (up to step {step}); "
                "stopping. Lower module.optimizer.lr, check the data, or resume from an earlier checkpoint "
                f"(callbacks.numerics.max_consecutive={self.max_consecutive})"
            )

    # ---- the loss: counts and spikes ---------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx
    ) -> None:
        self._count_deepspeed(trainer)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if torch.is_tensor(loss) and loss.numel() == 1:
            self._track(loss.detach().reshape(()).to(torch.float64))
        if logs_this_step(trainer):
            spikes = self.spikes  # a host read, at the logging steps only
            if spikes > self._spikes_logged:
                log.warning(
                    "step %d: %d loss spike(s) since the last report (above %.3g x the running mean, now %.4g)",
                    trainer.global_step,
                    spikes - self._spikes_logged,
                    self.spike_factor,
                    self._loss_state()[1],
                )
                self._spikes_logged = spikes
            pl_module.log("train/skipped_nonfinite", float(self.skipped), rank_zero_only=True)
            pl_module.log("train/loss_spikes", float(spikes), rank_zero_only=True)

    def _track(self, value: torch.Tensor) -> None:
        """Count the loss and update its running mean, on its device (no host sync)."""
        if self._loss is None or self._loss.device != value.device:
            self._loss = torch.tensor(self._loss_state(), dtype=torch.float64).to(value.device)
        seen, mean, spikes = self._loss.unbind()
        finite = torch.isfinite(value)
        spike = finite & (seen > 0) & (seen + 1 > self.spike_warmup) & (value > self.spike_factor * mean)
        updated = torch.where(seen > 0, self.spike_decay * mean + (1 - self.spike_decay) * value, value)
        self._loss = torch.stack([seen + finite, torch.where(finite, updated, mean), spikes + spike])

    def _loss_state(self) -> list[float]:
        return self._loss.tolist() if self._loss is not None else list(self._loss_saved)

    @property
    def spikes(self) -> int:
        return int(self._loss_state()[2])

    # ---- checkpoints -------------------------------------------------------------------------------
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._settle()

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        self._settle()  # the counts up to this step
        seen, mean, spikes = self._loss_state()
        checkpoint["numerics"] = {
            "skipped": self.skipped,
            "spikes": int(spikes),
            "consecutive": self.consecutive,
            "loss_mean": mean if seen else None,
            "seen": int(seen),
        }
        if not self.check_checkpoints:
            return
        named = [(name, _owned(p).detach()) for name, p in pl_module.named_parameters()]
        finite = [torch.isfinite(t).all() for _, t in named if t.numel()]  # on the device: one read below
        flag = torch.zeros(1, device=pl_module.device)
        if finite:
            flag[0] = (~torch.stack([f.to(flag.device) for f in finite]).all()).float()
        if world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            bad = [name for name, t in named if not torch.isfinite(t).all()]  # which: read only when refused
            raise NonFiniteError(
                f"refusing to write a checkpoint at step {trainer.global_step}: non-finite weights "
                f"({', '.join(bad[:5]) or 'on another rank'}); the previous checkpoint is kept"
            )

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict
    ) -> None:
        state = checkpoint.get("numerics") or {}
        self.skipped = int(state.get("skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))
        mean = state.get("loss_mean")
        self._loss_saved = [float(state.get("seen", 0)), float(mean or 0.0), float(state.get("spikes", 0))]
        self._loss = None
        self._spikes_logged = int(self._loss_saved[2])


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
