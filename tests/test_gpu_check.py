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
import yaml
from PIL import Image

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
    steps = (
        "tests",
        "bench",
        "sync",
        "anchors",
        "layout",
        "data",
        "compiled-tests",
        "compiled",
        "runs",
        "cascade",
    )
    for step in steps:
        assert f"| {step} | 0 |" in report, (step, report[:2000])
    assert " passed" in report and " failed" not in report  # the GPU tier's device-agnostic tests
    assert "test_exact_resume_on_the_device_is_bitwise PASSED" in report  # a line per test (-v)
    # compiled vs eager runs in the compiled step (aot_eager here), not in the tests step's time
    tests_log = (res / "logs" / "tests.log").read_text()
    assert (
        "test_exact_resume_on_the_device_is_bitwise PASSED" in tests_log and "compiled_step" not in tests_log
    )
    assert "test_compiled_step_matches_eager_within_bf16_tolerance[clip] PASSED" in report  # (CPU: CLIP only)
    bench = json.loads((res / "bench.json").read_text())["rows"]
    assert [r["status"] for r in bench] == ["ok"] * 5
    assert "| clip | 1.1 | 32 |" in report
    layout = json.loads((res / "layout.json").read_text())  # the decoder again, in channels_last
    assert layout["meta"]["channels_last"] and [(r["case"], r["status"]) for r in layout["rows"]] == [
        ("decoder", "ok")
    ]
    assert "## Training step, UNets in channels_last" in report
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
    _check_gpu_preset_cascade(next((tmp_path / "work").glob("cascade-*")))


def _check_gpu_preset_cascade(out):
    """The cascade step's run of preset=gpu (conf/preset/gpu.yaml) through every stage, shrunk
    (preset=gpu_smoke): 64 px decoder, 64 -> 256 upsampler trained on the 256 px renders, sampling at
    256 px, the lever, and the time budget reaching every training stage; what a GPU session runs full size."""
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"clip", "embed", "prior", "decoder", "upsampler_256", "sample"}
    decoder = yaml.safe_load((out / "decoder" / "config.yaml").read_text())
    assert decoder["net"]["image_size"] == 64 and decoder["net"]["channel_mult"] == [1, 2, 3, 4]
    up = yaml.safe_load((out / "upsampler_256" / "config.yaml").read_text())
    assert up["net"]["image_size"] == 256 and up["module"]["low_res_size"] == 64
    assert "shapes256px" in up["data"]["train_shards"]
    assert Image.open(out / "sample" / "samples.png").size[0] >= 2 * 256  # 256 px samples, two per row
    assert report["sample"]["bench/n"] == 8 and "probe/renders_at_64_px/shape" in report["sample"]
    # sample.lever: the benchmark again with the prior's guidance changed, compared in report.md
    lever = {k for k in report["sample"] if k.startswith("lever/bench/")}
    assert "lever/bench/n" in lever and {k[6:] for k in lever} <= set(report["sample"]), lever
    lever_png = (out / "sample" / "lever" / "samples.png").read_bytes()  # other images
    assert lever_png != (out / "sample" / "samples.png").read_bytes()
    assert "## lever" in (out / "report.md").read_text()
    for stage in ("clip", "prior", "decoder", "upsampler_256"):  # gpu_check's time_budget (CPU: <= 240 s)
        assert 1 <= report[stage][f"{stage}/seconds_allotted"] <= 240, stage


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


def test_gpu_check_interrupts_a_step_that_leaves_the_host_short_of_memory(tmp_path):
    """The host watch: a step that leaves less memory available than HOST_MIN_MEM_GIB is interrupted within
    seconds, its row says why, and the run goes on to its report (here every machine is short of 10^5 GiB)."""
    out = tmp_path / "check"
    env = {**os.environ, "OUT": str(out), "WORK": str(tmp_path / "work"), "PYTHON": sys.executable,
           "HOST_MIN_MEM_GIB": "100000"}  # fmt: skip
    result = subprocess.run(["bash", "launch/gpu_check.sh", "--cpu", "--steps", "tests,sync"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = (out / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| tests |"))
    assert "(interrupted: host: " in row and "GiB of memory available" in row, row
    assert int(row.split("|")[3]) <= 25, row  # a ~30 s step, stopped at the watch's next look (2 s + grace)
    assert "| sync |" in report and "## Targets" in report  # the next step ran, and the report was written
    with tarfile.open(out / "check.tar.gz") as tar:
        samples = tar.extractfile("./logs/host.log").read().decode().split()
    assert len(samples) >= 8 and len(samples) % 4 == 0  # epoch s, kB in use, kB available, kB of disk free


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
    # the host watch: the step's peak memory in use and least disk free, GiB
    assert re.search(r"\| sync \| 0 \| \d+ \| \d+\.\d \| \d+\.\d \|", report), report
    bad = subprocess.run(["bash", "launch/gpu_check.sh", "--cpu", "--steps", "sync,nope"], cwd=REPO,
                         env={**env, "OUT": str(tmp_path / "bad")}, capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "--steps: unknown step 'nope'" in bad.stderr
    assert not (tmp_path / "bad").exists()  # refused before any step ran


def test_a_test_s_cli_run_keeps_the_carried_wheels_on_its_path(tmp_path, monkeypatch):
    """On the GPU machine hydra, webdataset and deepspeed are carried wheels that gpu_check.sh installs
    with --target and puts on PYTHONPATH. A test's CLI subprocess (the GPU tier's smoke cascade) used to
    replace PYTHONPATH with the checkout alone, and failed there with "No module named 'hydra'"."""
    from tests.conftest import cli_env

    monkeypatch.setenv("PYTHONPATH", "/tmp/unclip-site")
    assert cli_env(tmp_path)["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/tmp/unclip-site"]
    monkeypatch.delenv("PYTHONPATH")
    assert cli_env(tmp_path)["PYTHONPATH"] == str(REPO)
