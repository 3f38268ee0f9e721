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
    def __init__(self, n: int = 3) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        tokens = torch.randint(1, 63, (4, 8), generator=g)
        tokens[:, -1] = 63
        return {"image": torch.randn(4, 3, 32, 32, generator=g), "tokens": tokens}


@pytest.mark.parametrize("grad_checkpointing,patch_dropout", [(False, 0.0), (True, 0.0), (False, 0.5)])
def test_counted_training_flops_are_about_three_forwards(grad_checkpointing, patch_dropout):
    """Model FLOPs: activation checkpointing's recompute (a fourth forward) is not counted. With patch
    dropout the image transformer runs on the kept patches, and the analytic count says so."""
    torch.manual_seed(0)
    net = CLIP(
        embed_dim=32,
        vision={
            "image_size": 32,
            "patch_size": 8,
            "width": 64,
            "layers": 2,
            "heads": 2,
            "patch_dropout": patch_dropout,
        },  # fmt: skip
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


def test_peak_memory_is_each_runs_own(monkeypatch):
    """train.pipeline runs every stage in one process: perf/max_memory_gb is the peak since this run's
    training started, not the process's (here a fake CUDA allocator whose peak was 50 GB before)."""
    peak = {"bytes": 50e9}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: peak.update(bytes=1e9))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peak["bytes"])
    torch.manual_seed(0)
    net = CLIP(
        embed_dim=16,
        vision={"image_size": 32, "patch_size": 8, "width": 16, "layers": 1, "heads": 1},
        text={"context_length": 8, "vocab_size": 64, "width": 16, "layers": 1, "heads": 1},
    )
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[DataStats(count_flops=False)], log_every_n_steps=1)  # fmt: skip
    trainer.fit(ClipModule(net, zeroshot=False), DataLoader(_Batches(), batch_size=None))
    assert float(trainer.callback_metrics["perf/max_memory_gb"]) == 1.0


def test_values_only_the_loggers_read_are_logged_at_the_steps_they_are_written(tmp_path, monkeypatch):
    """The learning rate, the logit scale and the guard's counters are logged (about 0.4 ms of host time
    each) only at the steps Lightning writes to the loggers, every 5 here, and at the last; the loss at
    every step. The CSV file has each of them at those steps, as when they were logged at every step."""
    import collections
    import csv

    from pytorch_lightning.loggers import CSVLogger

    from train.callbacks.numerics import NumericalGuard

    calls = collections.Counter()
    log = pl.LightningModule.log

    def counted(self, name, *args, **kwargs):
        calls[name] += 1
        return log(self, name, *args, **kwargs)

    monkeypatch.setattr(pl.LightningModule, "log", counted)
    torch.manual_seed(0)
    net = CLIP(
        embed_dim=16,
        vision={"image_size": 32, "patch_size": 8, "width": 16, "layers": 1, "heads": 1},
        text={"context_length": 8, "vocab_size": 64, "width": 16, "layers": 1, "heads": 1},
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=12,
        logger=CSVLogger(tmp_path, name="", version=""),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[NumericalGuard()],
        log_every_n_steps=5,
    )
    trainer.fit(ClipModule(net, zeroshot=False), DataLoader(_Batches(20), batch_size=None))
    assert calls["train/loss"] == 12
    for key in ("train/lr", "train/logit_scale", "train/skipped_nonfinite", "train/loss_spikes"):
        assert calls[key] == 3, (key, calls)  # before: 12
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    written = {key: [int(r["step"]) for r in rows if r.get(key)] for key in ("train/loss", "train/lr")}
    assert written == {"train/loss": [4, 9], "train/lr": [4, 9]}, written
    assert float(trainer.callback_metrics["train/skipped_nonfinite"]) == 0.0  # the last step's values too


def test_the_progress_bar_redraws_at_the_logging_steps_only(tmp_path):
    """Each redraw reads the logged loss from the device (a host sync on a GPU): once per logging step."""
    from pytorch_lightning.callbacks import TQDMProgressBar

    from tests.conftest import compose_config
    from train.run import build_callbacks

    out = f"paths.output_dir={tmp_path}"
    cfg = compose_config(
        ["stage=clip", "trainer.log_every_n_steps=25", "trainer.enable_progress_bar=true", out]
    )
    bars = [c for c in build_callbacks(cfg) if isinstance(c, TQDMProgressBar)]
    assert [bar.refresh_rate for bar in bars] == [25]
    assert not any(
        isinstance(c, TQDMProgressBar)
        for c in build_callbacks(compose_config(["stage=clip", "debug=fast", out]))
    )


def test_no_training_metric_is_read_from_the_device_between_logging_steps(tmp_path, monkeypatch):
    """A metric logged with prog_bar=True is converted to a Python number by Lightning after every batch
    (on a GPU: the host waits for the whole step), whether or not the bar redraws. The stages log
    train/loss without it; the bar reads it when it redraws, and still shows it."""
    import pytorch_lightning as pl
    from pytorch_lightning.trainer.connectors.logger_connector import result

    from tests.test_losses import tiny
    from train.callbacks.progress_bar import LossProgressBar
    from train.modules.clip import ClipModule

    reads, convert = [], result.convert_tensors_to_scalars
    monkeypatch.setattr(result, "convert_tensors_to_scalars", lambda data: reads.append(1) or convert(data))
    seen = []

    class Count(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(len(reads))

    g = torch.Generator().manual_seed(0)
    batches = [
        {"image": torch.randn(8, 3, 16, 16, generator=g), "tokens": torch.randint(4, 30, (8, 6), generator=g),
         "caption": ["a red cube"] * 8, "__key__": [str(i) for i in range(8)]}
        for _ in range(12)
    ]  # fmt: skip
    bar = LossProgressBar(refresh_rate=5)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=12, log_every_n_steps=5, callbacks=[bar, Count()], logger=False,
        enable_checkpointing=False, limit_val_batches=0, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(ClipModule(tiny(), zeroshot=False), torch.utils.data.DataLoader(batches, batch_size=None))
    per_step = [b - a for a, b in zip(seen, seen[1:])]
    assert per_step == [0] * 11, per_step  # before: [1] * 11
    assert "loss" in bar.get_metrics(trainer, trainer.lightning_module)


def test_validation_counts_the_held_out_samples_it_skips_and_warns_when_none_is_left(tmp_path, caplog):
    """Held-out samples without a caption (or undecodable) were dropped uncounted, and a val set left with
    no sample at all gave no val/ metric and no word about it."""
    from data.synthetic import ensure_synthetic
    from tests.conftest import compose_config, image_bytes, write_tar
    from train.run import train

    ensure_synthetic(str(tmp_path / "train"), None, train_samples=64, val_samples=0)
    bad = tmp_path / "bad"
    write_tar(bad / "00000.tar", [{"__key__": f"{i:04d}", "jpg": image_bytes()} for i in range(6)])
    cfg = compose_config(
        [
            "debug=fast",
            "data=shards",
            f"data.train_shards={tmp_path / 'train'}",
            f"data.val_shards={bad}",
            "data.tokenizer.kind=bpe",
            "data.tokenizer.vocab_size=1024",
            f"paths.output_dir={tmp_path / 'run'}",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
        ]
    )
    with caplog.at_level("WARNING", logger="train.callbacks.data_stats"):
        metrics = train(cfg)
    assert metrics["data/val_skipped_missing_caption"] == 6
    assert not any(k.startswith("val/") for k in metrics)
    assert (
        f"no held-out batch on any rank, so no val/ metric: every sample of data.val_shards={bad}"
        in caplog.text
    )
    assert "missing_caption 6" in caplog.text


def test_perf_metrics_cover_whole_optimizer_steps_under_gradient_accumulation(
    clip_run, tmp_path, monkeypatch
):
    """With trainer.accumulate_grad_batches=2 both micro-batches of a logging step closed the throughput
    window, and the second one's (half a step) was the value logged."""
    import pytorch_lightning as pl

    from tests.conftest import compose_config
    from train.run import train

    logged = []
    real = pl.LightningModule.log_dict

    def spy(self, metrics, *args, **kwargs):
        if "perf/samples_per_sec" in metrics:
            logged.append(self.trainer.global_step)
        return real(self, metrics, *args, **kwargs)

    monkeypatch.setattr(pl.LightningModule, "log_dict", spy)
    cfg = compose_config(
        [
            "debug=fast",
            f"paths.data_dir={clip_run[0].parent / 'datasets'}",  # (the session's synthetic shards)
            f"paths.output_dir={tmp_path / 'run'}",
            "trainer.accumulate_grad_batches=2",
            "trainer.log_every_n_steps=1",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
        ]
    )
    train(cfg)
    assert logged == [1, 2]  # once per optimizer step, after its second micro-batch


def test_val_check_interval_counts_optimizer_steps_under_gradient_accumulation(clip_run, tmp_path, caplog):
    """trainer.val_check_interval=2 with accumulate_grad_batches=2 validated at every optimizer step:
    Lightning counts batches, the config (and max_steps, every_n_train_steps) optimizer steps."""
    from tests.conftest import compose_config
    from train.run import train

    cfg = compose_config(
        [
            "debug=fast",
            f"paths.data_dir={clip_run[0].parent / 'datasets'}",
            f"paths.output_dir={tmp_path / 'run'}",
            "trainer.accumulate_grad_batches=2",
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
        ]
    )
    with caplog.at_level("INFO", logger="train.callbacks.val_log"):
        train(cfg)
    steps = [r.getMessage().split(" (")[0] for r in caplog.records if r.name == "train.callbacks.val_log"]
    assert steps == ["step 2", "step 4"]
