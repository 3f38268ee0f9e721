"""The throughput callback's counted FLOPs, against the CLIP's analytic count."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from train.callbacks.data_stats import DataStats
from train.models.clip import CLIP
from train.modules.clip import ClipModule


class _Batches(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        tokens = torch.randint(1, 63, (4, 8), generator=g)
        tokens[:, -1] = 63
        return {"image": torch.randn(4, 3, 32, 32, generator=g), "tokens": tokens}


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_counted_training_flops_are_about_three_forwards(grad_checkpointing):
    """Model FLOPs: activation checkpointing's recompute (a fourth forward) is not counted."""
    torch.manual_seed(0)
    net = CLIP(
        embed_dim=32,
        vision={"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "heads": 2},
        text={"context_length": 8, "vocab_size": 64, "width": 64, "layers": 2, "heads": 2},
        grad_checkpointing=grad_checkpointing,
    )
    stats = DataStats()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[stats],
        log_every_n_steps=1,
    )
    trainer.fit(ClipModule(net, zeroshot=False), DataLoader(_Batches(), batch_size=None))
    ratio = stats.flops_per_sample / net.flops_per_sample()
    assert 2.7 < ratio < 3.3, ratio  # forward + backward (2x forward) of the same matmuls
    metrics = trainer.callback_metrics
    assert float(metrics["perf/tflops_per_device"]) > 0
    assert "perf/mfu" not in metrics  # no known peak on CPU: no made-up utilisation
