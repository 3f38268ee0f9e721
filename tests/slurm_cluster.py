"""A real one-node SLURM cluster on localhost for tests: Debian's slurmctld, slurmd, slurm-client and
munge, installed with apt-get if missing, started by hand (no systemd) and stopped afterwards.

What makes it work (and fast) here: munged runs as the munge user with /run/munge owned by it;
``SlurmUser=root``; ``ProctrackType=proctrack/linuxproc`` and ``TaskPlugin=task/none`` (no cgroups);
the node's topology from ``slurmd -C``; ``AuthInfo=cred_expire=5`` (a requeued job waits that long before
it starts again: 120 s by default; 10 s here cost 5 s of CI) and ``sched_interval=1``, so a requeued job
starts again in seconds rather than minutes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


CONF = Path("/etc/slurm/slurm.conf")
MARK = "ClusterName=unclip-test"


def unavailable_reason() -> str | None:
    """Why no local cluster can be started here (None: it can). A machine with its own SLURM is never
    touched: no other slurm.conf is overwritten and no running daemon is stopped."""
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd/munged needs root"
    if CONF.exists() and MARK not in CONF.read_text():
        return f"{CONF} belongs to another SLURM installation; not replacing it"
    if _run(["pgrep", "-x", "slurmctld"]).returncode == 0 or _run(["pgrep", "-x", "slurmd"]).returncode == 0:
        return "a slurmctld/slurmd is already running on this machine"
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    if not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = _run(["apt-get", "install", "-y", "-q", *PACKAGES], env=env, timeout=600)
    if result.returncode != 0:  # the package lists may be missing on a fresh machine
        _run(["apt-get", "update", "-q"], env=env, timeout=600)
        result = _run(["apt-get", "install", "-y", "-q", *PACKAGES], env=env, timeout=600)
    if result.returncode != 0:
        return f"apt-get install {' '.join(PACKAGES)} failed: {result.stderr[-500:]}"
    return None


class LocalSlurm:
    """``with LocalSlurm(tmp) as cluster: cluster.sbatch(...)``; the daemons stop on exit."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = CONF
        self.started_munge = False

    def __enter__(self) -> LocalSlurm:
        state, spool, logs = self.root / "state", self.root / "spool", self.root / "logs"
        for d in (state, spool, logs):
            d.mkdir(parents=True, exist_ok=True)
        node = _run(["slurmd", "-C"]).stdout.splitlines()[0]
        topology = " ".join(
            f"{k}={v}" for k, v in re.findall(r"(\w+)=(\S+)", node) if k not in ("NodeName", "UpTime")
        )
        self.conf.parent.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            "\n".join(
                [
                    MARK,
                    "SlurmctldHost=localhost",
                    "SlurmUser=root",
                    "AuthType=auth/munge",
                    "AuthInfo=cred_expire=5",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "SchedulerParameters=sched_interval=1",
                    "ReturnToService=2",
                    "MpiDefault=none",
                    f"StateSaveLocation={state}",
                    f"SlurmdSpoolDir={spool}",
                    f"SlurmctldPidFile={self.root}/slurmctld.pid",
                    f"SlurmdPidFile={self.root}/slurmd.pid",
                    f"SlurmctldLogFile={logs}/slurmctld.log",
                    f"SlurmdLogFile={logs}/slurmd.log",
                    "SlurmctldTimeout=30",
                    "MinJobAge=600",
                    f"NodeName=localhost NodeAddr=127.0.0.1 {topology} State=UNKNOWN",
                    # FORCE:2: two jobs may share a core, so two 2-task sweep jobs run at once on 2 cores
                    "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2",
                    "",
                ]
            )
        )
        run_munge = Path("/run/munge")
        run_munge.mkdir(parents=True, exist_ok=True)
        shutil.chown(run_munge, "munge", "munge")
        if not Path("/etc/munge/munge.key").exists():
            _run(["mungekey", "--create"], check=True)
            shutil.chown("/etc/munge/munge.key", "munge", "munge")
        if _run(["pgrep", "-x", "munged"]).returncode != 0:
            _run(["runuser", "-u", "munge", "--", "munged", "--force"], check=True)
            self.started_munge = True
        _run(["slurmctld", "-c"], check=True)  # -c: forget any earlier cluster state
        _run(["slurmd", "-N", "localhost"], check=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            out = _run(["sinfo", "-h", "-o", "%T"]).stdout.strip()
            if out in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"the local SLURM node never became idle (sinfo: {out!r}); logs in {logs}")

    def __exit__(self, *exc) -> None:
        _run(["scancel", "--full", "-u", "root"])
        pids = [self.root / "slurmd.pid", self.root / "slurmctld.pid"]
        if self.started_munge:
            pids.append(Path("/run/munge/munged.pid"))
        for pid_file in pids:
            try:
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
            except (FileNotFoundError, ValueError, ProcessLookupError, IndexError):
                pass
        self.conf.unlink(missing_ok=True)
        deadline = time.time() + 10
        while time.time() < deadline and any(
            _run(["pgrep", "-x", n]).returncode == 0 for n in ("slurmd", "slurmctld")
        ):
            time.sleep(0.2)
        # No SLURM daemon ran before we started ours (unavailable_reason), so what is left is ours:
        # a slurmd waiting on a step daemon that never exits, or the step daemons themselves.
        _run(["pkill", "-KILL", "-f", "^slurmstepd"])
        _run(["pkill", "-KILL", "-f", str(self.root)])  # batch scripts of jobs still running (spool/job*/)
        _run(["pkill", "-KILL", "-x", "slurmd"])
        _run(["pkill", "-KILL", "-x", "slurmctld"])

    # ---- jobs --------------------------------------------------------------------------------------
    def sbatch(self, args: list[str], cwd: Path, env: dict[str, str]) -> int:
        result = _run(["sbatch", "--parsable", *args], cwd=cwd, env=env, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {result.stderr}")
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        out = _run(["scontrol", "show", "job", str(job_id), "-o"]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int | str, until: set[str], timeout: float) -> dict[str, str]:
        deadline = time.time() + timeout
        info: dict[str, str] = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id} not in {until} after {timeout} s: {info.get('JobState')}")
