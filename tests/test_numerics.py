"""NaN/inf steps are skipped (weights and optimizer state untouched), counted, and abort the run after N
in a row; no checkpoint with a non-finite weight is written; loss spikes are counted."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from train.callbacks.numerics import NonFiniteError, NumericalGuard


class Poisoned(pl.LightningModule):
    """A linear regression whose loss is NaN at the steps in ``bad`` (weights snapshotted every step)."""

    def __init__(self, bad: set[int], spike_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(4, 1)
        self.bad, self.spike_at = bad, spike_at
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
        return torch.optim.AdamW(self.parameters(), lr=0.1)


def _fit(module, callbacks, steps=6):
    trainer = pl.Trainer(
        accelerator="cpu",
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


def test_a_nan_step_is_skipped_with_weights_and_adam_state_untouched():
    module, guard = Poisoned(bad={2}), NumericalGuard(max_consecutive=3)
    trainer = _fit(module, [guard])
    assert guard.skipped == 1 and trainer.global_step == 6
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


def test_consecutive_nan_steps_abort_with_a_clear_error_and_no_nan_checkpoint(tmp_path):
    module, guard = Poisoned(bad={3, 4, 5, 6, 7}), NumericalGuard(max_consecutive=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")
    with pytest.raises(NonFiniteError, match="3 consecutive steps with NaN/inf gradients"):
        _fit(module, [guard, ckpt], steps=10)
    saved = sorted(tmp_path.glob("*.ckpt"))
    assert saved, "the checkpoints before the fault were written"
    for path in saved:
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values()), path


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


def test_loss_spikes_are_counted():
    guard = NumericalGuard(spike_warmup=2, spike_factor=3.0)
    _fit(Poisoned(bad=set(), spike_at=4), [guard], steps=6)
    assert guard.spikes == 1
