"""A plain (non-editable) install, e.g. `pip install .` or `pip install git+<url>`: the wheel holds every
module and file the entry points read, the Hydra configs included, and runs outside the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGED = ("train", "data", "eval", "conf")


def _build_wheel(tmp_path: Path) -> Path:
    """The wheel of a copy of the checkout (building in place would leave build/ in it), offline."""
    src = tmp_path / "src"
    for name in PACKAGED:
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    done = subprocess.run([*cmd, str(src), "-w", str(tmp_path / "dist")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    return wheel


def test_the_wheel_ships_the_configs_and_runs_outside_the_checkout(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {
        p.relative_to(REPO).as_posix()
        for name in PACKAGED
        for p in (REPO / name).rglob("*")
        if p.is_file() and p.suffix in (".py", ".yaml", ".json") and "__pycache__" not in p.parts
    }
    assert any(n.startswith("conf/") for n in shipped)
    assert sorted(shipped - names) == []  # before: every conf/*.yaml missing
    assert not [n for n in names if "__pycache__" in n or n.startswith("tests/")]

    # Unpacked as site-packages would hold it, imported before the editable install's finder: the Hydra
    # entry point finds conf/ beside train/ (before: "Primary config directory not found").
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import train.run; print(train.run.__file__)"],
        cwd=cwd, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert where.returncode == 0 and where.stdout.strip() == str(site / "train" / "run.py"), where
    job = subprocess.run(
        [sys.executable, "-m", "train.run", "stage=prior", "--cfg", "job"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert job.returncode == 0, job.stderr[-3000:]
    assert "stage_name: prior" in job.stdout, job.stdout[:2000]
