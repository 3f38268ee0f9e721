"""launch/gpu_check.sh --cpu: the prepared GPU command, every step at tiny size on the CPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_mode_runs_every_step_and_writes_the_report(tmp_path):
    out = tmp_path / "check"
    env = {
        **os.environ,
        "OUT": str(out),
        "WORK": str(tmp_path / "work"),
        "PYTHON": sys.executable,
        "UNCLIP_LOG_DIR": str(tmp_path / "logs"),
    }
    result = subprocess.run(
        ["bash", "launch/gpu_check.sh", "--cpu"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # the device tool brings back at most 8 files from $OUT, at most 2 folders down, plainly named
    sent = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert sent == ["check.tar.gz", "report.md", "samples.png"], sent
    res = tmp_path / "res"  # everything else, in the archive
    with tarfile.open(out / "check.tar.gz") as tar:
        tar.extractall(res, filter="data")
    report = (out / "report.md").read_text()
    assert report == (res / "report.md").read_text()
    for step in ("tests", "bench", "sync", "anchors", "data", "compiled", "runs", "cascade"):
        assert f"| {step} | 0 |" in report, (step, report[:2000])
    assert " passed" in report and " failed" not in report  # the GPU tier's device-agnostic tests
    bench = json.loads((res / "bench.json").read_text())["rows"]
    assert [r["status"] for r in bench] == ["ok"] * 5
    assert "| clip | 1.1 | 32 |" in report
    anchors = json.loads((res / "anchors.json").read_text())["rows"]
    # each anchor steps at batch 2, or is reported not installed (CI has no [bench] extra and no torchvision;
    # a checkout with launch/gpu_wheels.sh's .whl/ has some of them)
    assert [r["case"] for r in anchors] == [
        "open_clip_b16",
        "open_clip_l14",
        "diffusers_unet64",
        "dalle2_prior",
    ]
    assert all(r["status"] == "ok" or r["status"].startswith("not installed") for r in anchors), anchors
    assert "compile=regional" in report
    assert (
        "## Targets" in report and "targets met;" in report
    )  # tiny CPU cases: the verdicts say not measured
    data = json.loads((res / "data.json").read_text())  # the loaders on this machine's cores
    assert {(r["loader"], r["workers"]) for r in data} == {
        (x, w) for x in ("ours", "webdataset+PIL") for w in (0, 2)
    }
    assert "| 48 | " in report and "48 px, ours: " in report and "needs" in report
    assert "| all_reduce(2) + read |" in report and "| grad norms of 1M + read |" in report
    runs = [line for line in report.splitlines() if line.startswith("| upsampler_1024 | 3 |")]
    assert runs, report[-2000:]
    assert "| sample |" in report and "single/colour_shape" in report  # the preset cascade's benchmark
    assert re.search(r"\| decoder \| \d+ \| 2 \(\d+\) \|", report), report  # steps (seconds allotted)
    assert (res / "cascade" / "samples.png").exists() and (res / "cascade" / "probe.md").exists()
    assert (res / "logs" / "cascade.log").exists() and (out / "samples.png").stat().st_size > 1000
    assert not (out / "datasets").exists() and (tmp_path / "work" / "datasets").exists()  # $OUT stays small


@pytest.mark.slow
def test_gpu_check_budget_cuts_a_step_short_and_skips_the_rest(tmp_path):
    """--budget: the run ends (report written) within the budget, whatever the steps' own timeouts."""
    out = tmp_path / "check"
    env = {**os.environ, "OUT": str(out), "WORK": str(tmp_path / "work"), "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", "launch/gpu_check.sh", "--cpu", "--budget", "40", "--steps", "tests,data"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "| tests | 124 (timed out) |" in report, report  # its 300 s cut to what the budget left
    assert "| data | skipped (budget: 40 s) | 0 |" in report, report
    seconds = sum(
        int(line.split("|")[3]) for line in report.splitlines() if line.startswith(("| tests |", "| data |"))
    )
    assert seconds <= 40 - 30 + 20 + 2  # cut to at most budget - 30 s, plus timeout's 20 s kill grace
    bad = subprocess.run(["bash", "launch/gpu_check.sh", "--budget", "soon"], cwd=REPO, env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "--budget: expected whole seconds, got 'soon'" in bad.stderr


def test_gpu_check_sends_back_few_files_and_refuses_unknown_steps(tmp_path):
    """$OUT holds the report and one archive of the rest: the device tool brings back 8 files at most."""
    out, work = tmp_path / "check", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "WORK": str(work), "PYTHON": sys.executable}
    result = subprocess.run(["bash", "launch/gpu_check.sh", "--cpu", "--steps", "sync"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.rglob("*")) == ["check.tar.gz", "report.md"]
    with tarfile.open(out / "check.tar.gz") as tar:
        names = set(tar.getnames())
        log = tar.extractfile("./logs/sync.log").read().decode()
    assert {"./report.md", "./logs/sync.log"} <= names, names
    assert "| all_reduce(2) + read |" in log
    report = (out / "report.md").read_text()
    assert "| sync | 0 |" in report and "## Targets" in report and "check.tar.gz" in report
    bad = subprocess.run(["bash", "launch/gpu_check.sh", "--cpu", "--steps", "sync,nope"], cwd=REPO,
                         env={**env, "OUT": str(tmp_path / "bad")}, capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "--steps: unknown step 'nope'" in bad.stderr
    assert not (tmp_path / "bad").exists()  # refused before any step ran
