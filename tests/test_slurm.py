"""launch/slurm.sbatch on a real one-node SLURM cluster started on localhost (tests/slurm_cluster.py):
a 2-task CPU run completes; then preemption: ``scancel --signal=USR1`` -> one checkpoint at a step
boundary on both ranks -> ``scontrol requeue`` -> the requeued job resumes from it and finishes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import LocalSlurm, unavailable_reason

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess, pytest.mark.slurm]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no local SLURM cluster: {reason}")
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def _env(tmp_path: Path, run_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # `python` is this interpreter
        "PYTHONPATH": str(REPO),
        "UNCLIP_DATA_DIR": str(tmp_path / "datasets"),
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
        "RUN_DIR": str(run_dir),
    }


def _submit(cluster: LocalSlurm, tmp_path: Path, run_dir: Path, *overrides: str) -> tuple[int, Path]:
    """sbatch the template as the README documents it (its own log path), resources scaled down."""
    job = cluster.sbatch(
        [
            "--ntasks-per-node=2",  # the template's resources, scaled to this machine
            "--cpus-per-task=1",
            "--gpus-per-node=0",
            "--time=10",
            str(REPO / "launch" / "slurm.sbatch"),
            "debug=fast",
            "trainer.accelerator=cpu",
            "strategy=ddp",
            *overrides,
        ],
        cwd=tmp_path,
        env=_env(tmp_path, run_dir),
    )
    return job, tmp_path / f"unclip-{job}.out"  # the template's --output=%x-%j.out, in the submit directory


def test_sbatch_template_runs_two_tasks(cluster, tmp_path):
    run_dir = tmp_path / "run"
    job, log = _submit(cluster, tmp_path, run_dir)
    info = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=300)
    assert info["JobState"] == "COMPLETED", log.read_text()[-4000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["trainer/global_step"] == 5
    assert "global batch 16 = 8 per device x 2 ranks" in log.read_text()


def test_signal_checkpoints_requeues_and_the_job_resumes(cluster, tmp_path, sig="USR1"):
    # USR1: sbatch --signal. USR2 (submitit's time-limit signal) takes the same handler, in
    # tests/test_preemption.py's fuzz: a second requeue cycle here would cost 40 s of CI.
    run_dir = tmp_path / "run"
    steps = 100  # long enough to be signalled mid-run (it lands within a few steps); each step is tens of ms
    job, log = _submit(
        cluster,
        tmp_path,
        run_dir,
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "callbacks.checkpoint.every_n_train_steps=20",
    )
    first = run_dir / "checkpoints" / "step0000020.ckpt"
    deadline = time.time() + 240
    while not first.exists() and time.time() < deadline:
        assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), log.read_text()[
            -3000:
        ]
        time.sleep(0.5)
    assert first.exists(), log.read_text()[-3000:]
    subprocess.run(["scancel", f"--signal={sig}", str(job)], check=True)

    info = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=300)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert int(info["Restarts"]) == 1, "requeued exactly once"
    # one preemption checkpoint, saved once (both ranks at the same step boundary), then the restart
    saved = re.findall(rf"received SIG{sig}: saving (\S+) at step (\d+)", text)
    assert len(saved) == 1, text[-4000:]
    path, step = saved[0][0], int(saved[0][1])
    assert 20 <= step < steps and path.endswith("checkpoints/preempt.ckpt")
    ranks = re.findall(r"rank (\d): preemption checkpoint at step (\d+)", text)
    assert sorted(ranks) == [("0", str(step)), ("1", str(step))], "both ranks stop at the same step"
    assert "restart 1" in text and f"resuming from {path}" in text
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["trainer/global_step"] == steps and "trainer/preempted" not in metrics


def test_hydra_sweep_through_submitit_runs_each_point_as_a_two_task_job(cluster, tmp_path):
    """hydra/launcher=slurm (conf/hydra/launcher/slurm.yaml): one SLURM job per sweep point (a job
    array), each a 2-process DDP run, the two running at the same time on the one node (so each job's
    rendezvous port must be its own: a shared one fails the second job's store)."""
    sweep = tmp_path / "sweep"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "train.run",
            "--multirun",
            "hydra/launcher=slurm",
            "hydra.launcher.tasks_per_node=2",
            "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.timeout_min=10",
            f"hydra.sweep.dir={sweep}",
            "debug=fast",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "strategy=ddp",
            "module.optimizer.lr=1e-3,2e-3",
        ],
        cwd=tmp_path,
        env=_env(tmp_path, tmp_path / "unused"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for point, lr in (("0", 1e-3), ("1", 2e-3)):
        metrics = json.loads((sweep / point / "metrics.json").read_text())
        assert metrics["trainer/global_step"] == 5
        assert f"lr: {lr}" in (sweep / point / "config.yaml").read_text()
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.out"))
    assert logs.count("global batch 16 = 8 per device x 2 ranks") == 4  # 2 jobs x 2 ranks
    jobs = sorted(p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert len(jobs) == 2, jobs
    spans = []
    for job in jobs:
        info = cluster.wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=60)  # epilog lag
        assert info["JobState"] == "COMPLETED", info
        spans.append((info["StartTime"], info["EndTime"]))
    (start_a, end_a), (start_b, end_b) = spans
    assert start_b < end_a and start_a < end_b, f"the sweep jobs did not overlap: {spans}"
