"""trainer.max_time (train/callbacks/time_limit.py): training stops at the first step after the time is up,
on every rank at the same step, with the ranks agreeing in the numerics guard's all-reduce; the time used
survives a checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from tests.conftest import REPO, free_port
from tests.test_numerics import Poisoned, _fit
from train.callbacks.numerics import NumericalGuard
from train.callbacks.time_limit import TimeLimit, seconds


class Clock(pl.Callback):
    """A clock that moves ``step`` seconds at every training step."""

    def __init__(self, step: float = 10.0) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        return self.now

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.now += self.step


@pytest.mark.parametrize(
    ("guard", "stopped_at"),
    [(None, 4), ({}, 4), ({"defer": True}, 5)],
    ids=["alone", "in_the_guard", "in_the_deferred_guard"],
)
def test_training_stops_at_the_first_step_after_the_time_is_up(guard, stopped_at):
    """Up after 35 s: step 3 (t = 40 s) is the first to see it. Read from the guard's all-reduce at once,
    the run stops at its end; deferred (the guard's way on CUDA), a step later."""
    clock = Clock()
    limit = TimeLimit("00:00:00:35", clock=clock)
    callbacks = [clock, limit, *([NumericalGuard(**guard)] if guard is not None else [])]
    trainer = _fit(Poisoned(bad=set(), fused=bool(guard)), callbacks, steps=10)
    assert trainer.global_step == stopped_at
    assert limit.carried == (guard is not None)
    assert limit.state_dict() == {"elapsed": 10.0 * stopped_at}


def test_a_resumed_run_has_the_time_that_was_left(tmp_path):
    clock = Clock()
    trainer = _fit(Poisoned(bad=set()), [clock, TimeLimit("00:00:00:35", clock=clock)], steps=10)
    trainer.save_checkpoint(tmp_path / "stopped.ckpt")
    resumed = TimeLimit("00:00:01:00", clock=clock)  # a minute in all: 20 s left after the first 40
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=10, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=[clock, resumed],
    )  # fmt: skip
    data = [torch.randn(8, 4, generator=torch.Generator().manual_seed(i)) for i in range(10)]
    trainer.fit(Poisoned(bad=set()), DataLoader(data, batch_size=None), ckpt_path=tmp_path / "stopped.ckpt")
    assert trainer.global_step == 4 + 2  # 20 s more: the second step after the restart reaches 60 s
    # a checkpoint that Lightning's Timer wrote gives its elapsed training time
    legacy = TimeLimit("00:00:01:00")
    legacy.on_load_checkpoint(trainer, None, {"callbacks": {"Timer": {"time_elapsed": {"train": 42.0}}}})
    assert legacy.elapsed() == 42.0


def test_max_time_is_days_hours_minutes_seconds_and_a_wrong_one_is_named():
    assert seconds("01:02:03:04") == ((24 + 2) * 60 + 3) * 60 + 4
    with pytest.raises(ValueError, match=r"trainer.max_time='5min': expected 'DD:HH:MM:SS'"):
        TimeLimit("5min")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ranks_whose_clocks_disagree_stop_at_the_same_step(tmp_path):
    """Rank 1's clock finds the time up at step 1, rank 0's at step 3: both stop after step 1 (read at
    once) or step 2 (deferred), where each stopping at its own step would leave the other in a collective."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         str(REPO / "tests" / "time_limit_ranks.py"), f"--out={tmp_path}"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    stopped = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*_rank*.json")}
    assert stopped == {"host_rank0": 2, "host_rank1": 2, "deferred_rank0": 3, "deferred_rank1": 3}
