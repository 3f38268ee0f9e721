"""NaN/inf steps are skipped (weights and optimizer state untouched), counted, and abort the run after N
in a row; no checkpoint with a non-finite weight is written; loss spikes are counted.

Each behaviour is checked both ways a step is skipped: on the host (a plain AdamW: the verdict is read
at once and the gradients dropped) and on the device (a fused AdamW with ``defer=True``: the optimizer
skips on the flag, and the host counts it at the next step; CUDA's default, run here on the CPU)."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from train.callbacks.numerics import NonFiniteError, NumericalGuard


class Poisoned(pl.LightningModule):
    """A linear regression whose loss is NaN at the steps in ``bad`` (weights snapshotted every step)."""

    def __init__(self, bad: set[int], spike_at: int | None = None, fused: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 1)
        self.bad, self.spike_at, self.fused = bad, spike_at, fused
        self.after: dict[int, torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        loss = (self.net(batch) - batch.sum(dim=1, keepdim=True)).pow(2).mean()
        if self.global_step in self.bad:
            loss = loss * float("nan")
        if self.global_step == self.spike_at:
            loss = loss * 1000
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.after[self.global_step] = torch.cat([p.detach().flatten() for p in self.parameters()]).clone()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1, fused=self.fused or None)


MODES = {"host": {}, "deferred": {"defer": True}}  # NumericalGuard options; deferred: a fused AdamW


def _setup(mode: str, bad: set[int], **guard) -> tuple[Poisoned, NumericalGuard]:
    return Poisoned(bad=bad, fused=mode == "deferred"), NumericalGuard(**guard, **MODES[mode])


def _fit(module, callbacks, steps=6, accelerator="cpu", precision="32-true"):
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=precision,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        callbacks=callbacks,
    )
    data = [torch.randn(8, 4, generator=torch.Generator().manual_seed(i)) for i in range(steps)]
    trainer.fit(module, DataLoader(data, batch_size=None))
    return trainer


class SeenAtStepEnd(pl.Callback):
    """What the guard had counted at the end of each step (after its own hook)."""

    def __init__(self, guard: NumericalGuard) -> None:
        self.guard, self.skipped = guard, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.skipped[trainer.global_step] = self.guard.skipped


@pytest.mark.parametrize("mode", MODES)
def test_a_nan_step_is_skipped_with_weights_and_adam_state_untouched(mode):
    module, guard = _setup(mode, bad={2}, max_consecutive=3)
    seen = SeenAtStepEnd(guard)
    trainer = _fit(module, [guard, seen])
    assert guard.skipped == 1 and trainer.global_step == 6
    # the host learns of the skip in the step itself, or (deferred) at the next step's check
    assert [seen.skipped[s] for s in (3, 4)] == ([1, 1] if mode == "host" else [0, 1])
    # the NaN step (global step 2 -> 3) left the weights exactly as they were
    assert torch.equal(module.after[3], module.after[2])
    assert not torch.equal(module.after[4], module.after[3])  # and training went on
    assert all(torch.isfinite(w).all() for w in module.after.values())
    state = trainer.optimizers[0].state[module.net.weight]
    assert int(state["step"]) == 5  # 6 steps, one skipped: Adam's moments saw 5 updates
    assert float(trainer.callback_metrics["train/skipped_nonfinite"]) == 1.0


def test_negative_control_without_the_guard_the_weights_become_nan():
    module = Poisoned(bad={2})
    _fit(module, [])
    assert not torch.isfinite(module.after[5]).all()


@pytest.mark.parametrize("mode", MODES)
def test_consecutive_nan_steps_abort_with_a_clear_error_and_no_nan_checkpoint(tmp_path, mode):
    module, guard = _setup(mode, bad={3, 4, 5, 6, 7}, max_consecutive=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    with pytest.raises(NonFiniteError, match="3 consecutive steps with NaN/inf gradients"):
        _fit(module, [guard, ckpt], steps=10)
    assert guard.skipped == 3
    saved = sorted(tmp_path.glob("*.ckpt"))
    assert saved, "the checkpoints before the fault were written"
    for path in saved:
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values()), path
    # a checkpoint holds the counts up to its step, deferred ones included (step 5: steps 3 and 4 skipped)
    assert torch.load(tmp_path / "step=5.ckpt", weights_only=True)["numerics"]["skipped"] == 2


def test_refuses_to_checkpoint_non_finite_weights(tmp_path):
    module, guard = Poisoned(bad=set()), NumericalGuard()
    trainer = _fit(module, [guard], steps=2)
    with torch.no_grad():
        module.net.weight[0, 0] = float("inf")
    with pytest.raises(
        NonFiniteError, match=r"refusing to write a checkpoint at step 2: non-finite weights \(net\.weight\)"
    ):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()


def test_loss_spikes_are_counted_on_the_device_and_survive_a_checkpoint(tmp_path):
    guard = NumericalGuard(spike_warmup=2, spike_factor=3.0)
    trainer = _fit(Poisoned(bad={1}, spike_at=4), [guard], steps=6)
    assert guard.spikes == 1
    seen, mean, spikes = guard._loss.tolist()
    assert (seen, spikes) == (5, 1) and math.isfinite(mean)  # the NaN loss of step 1 is not counted
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    restored = NumericalGuard(spike_warmup=2, spike_factor=3.0)
    restored.on_load_checkpoint(trainer, trainer.lightning_module, torch.load(tmp_path / "last.ckpt"))
    assert restored.spikes == 1 and restored._loss_state() == pytest.approx([seen, mean, spikes])


def test_defer_true_needs_a_fused_adam_and_says_so():
    with pytest.raises(ValueError, match=r"callbacks.numerics.defer=true needs torch's fused Adam/AdamW"):
        _fit(Poisoned(bad=set()), [NumericalGuard(defer=True)], steps=1)
    with pytest.raises(
        ValueError, match="callbacks.numerics.defer='sometimes': expected auto, true or false"
    ):
        NumericalGuard(defer="sometimes")


def test_steps_deepspeed_skips_are_counted_and_stop_the_run():
    """DeepSpeed's engine holds the gradients and skips a step with non-finite ones itself ("OVERFLOW!
    Skipping step"): the guard counted none, so a run at lr=1e30 trained on with an infinite loss and
    exited 0. The engine's skip count is read after each optimizer step (not at a micro-batch of an
    accumulation), and max_consecutive applies. (A real CPU DeepSpeed run at lr=1e30 stops at step 3
    with max_consecutive=2.)"""
    from types import SimpleNamespace

    engine = SimpleNamespace(skipped_steps=4)  # restored with a checkpoint: counted from here
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(deepspeed_engine=engine),
        global_step=10,
        is_last_batch=False,
        _logger_connector=SimpleNamespace(should_update_logs=False),
        max_steps=-1,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=0)),
    )
    guard = NumericalGuard(max_consecutive=2)
    guard.on_train_start(trainer, None)

    def step(skipped: bool, micro_batches: int = 1) -> None:
        trainer.global_step += 1
        engine.skipped_steps += skipped
        for _ in range(micro_batches):  # Lightning calls the hook for each; the engine stepped once
            guard.on_train_batch_end(trainer, None, None, None, 0)

    step(True, micro_batches=3)
    step(False)
    assert (guard.skipped, guard.consecutive) == (1, 0)
    step(True)
    with pytest.raises(NonFiniteError, match="2 consecutive steps with NaN/inf gradients"):
        step(True)
    assert guard.skipped == 3
