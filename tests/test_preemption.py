"""Preemption under fire: 20 randomised trials on 2 processes (tests/preempt_fuzz.py). Each trial sends
SIGUSR1 or SIGTERM to one rank or both, inside a random hook of a random step or from a timer thread
(possibly while the rank is inside a collective). Every trial must stop both ranks at the same step,
right after the signal, with exactly one complete checkpoint holding the weights every rank has, and
exactly one ``scontrol requeue <job>`` after a time limit's signal (a recording scontrol on PATH), none after
SIGTERM - and never hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
TRIALS = 20


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("carrier", ["preemption", "deferred_guard"])
def test_random_preemptions_checkpoint_once_requeue_once_and_never_hang(tmp_path, carrier):
    """``deferred_guard``: the flag travels in the numerics guard's all-reduce and is read a step later
    (the guard's way on CUDA), so the ranks may stop up to two steps later than without it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\necho "$*" >> "$SCONTROL_LOG"\n')
    scontrol.chmod(0o755)
    calls = tmp_path / "scontrol.log"
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "SCONTROL_LOG": str(calls),
        "SLURM_JOB_ID": "4242",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
    }
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={port}",
            str(REPO / "tests" / "preempt_fuzz.py"),
            f"--trials={TRIALS}",
            f"--out={out}",
            *(["--deferred"] if carrier == "deferred_guard" else []),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,  # a hang fails here
    )
    assert result.returncode == 0, result.stderr[-4000:]
    trials = json.loads((out / "results.json").read_text())
    assert len(trials) == TRIALS
    assert {t["plan"]["target"] for t in trials} == {"rank0", "rank1", "all"}
    assert len({t["plan"]["hook"] for t in trials}) >= 4 and {t["plan"]["signal"] for t in trials} == {
        "SIGUSR1",
        "SIGUSR2",  # submitit's time-limit signal (the real SLURM path is tests/test_slurm.py with USR1)
        "SIGTERM",
    }
    for trial in trials:
        stopped = {r["stopped_at"] for r in trial["ranks"]}
        assert len(stopped) == 1, trial  # the ranks agreed on one step
        (step,) = stopped
        sent = min(r["sent_at"] for r in trial["ranks"] if r["sent_at"] is not None)
        # stopped at the end of the step the signal arrived in; deferred, up to two steps after that one
        # (a signal just after a step's check travels in the next step's, read at the step after it)
        assert 0 <= step - sent <= (1 if carrier == "preemption" else 3), trial
        assert step > 0, trial
        assert trial["files"] == ["preempt.ckpt"], trial  # exactly one checkpoint, no temporary left
        assert trial["checkpoint_step"] == step, trial
        assert all(r["weights_match_checkpoint"] for r in trial["ranks"]), trial
    # once per time-limit signal, rank 0 only; SIGTERM (scancel's) is checkpointed, not requeued: a requeue
    # made a job that scancel could not stop
    timed = sum(t["plan"]["signal"] != "SIGTERM" for t in trials)
    assert 0 < timed < TRIALS and calls.read_text().splitlines() == ["requeue 4242"] * timed


@pytest.mark.parametrize(
    ("signum", "restarts", "requeued"),
    [("SIGUSR1", "3", True), ("SIGUSR2", "0", True), ("SIGTERM", "0", False), ("SIGUSR1", "20", False)],
)
def test_only_a_time_limit_signal_requeues_and_at_most_max_requeues_times(
    tmp_path, monkeypatch, signum, restarts, requeued
):
    """scancel's SIGTERM requeued the job, which then could not be stopped; and requeues had no cap
    (submitit's max_num_timeout is not in effect while this callback handles the signal)."""
    import signal
    import subprocess
    from types import SimpleNamespace

    from train.callbacks.preemption import Preemption

    calls = []
    monkeypatch.setattr(
        subprocess, "run", lambda cmd, **kw: calls.append(cmd) or SimpleNamespace(returncode=0)
    )
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_RESTART_COUNT", restarts)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    saved = []
    trainer = SimpleNamespace(
        default_root_dir=str(tmp_path), global_rank=0, global_step=5, world_size=1, is_global_zero=True,
        save_checkpoint=saved.append, strategy=SimpleNamespace(barrier=lambda name: None), should_stop=False,
    )  # fmt: skip
    callback = Preemption(max_requeues=20)
    callback.received = int(getattr(signal, signum))
    callback.on_train_batch_end(trainer, SimpleNamespace(device="cpu"), None, None, 0)
    assert saved == [tmp_path / "checkpoints" / "preempt.ckpt"] and trainer.should_stop
    assert calls == ([["scontrol", "requeue", "7"]] if requeued else [])
