"""Two nodes simulated for real on localhost: two torchrun agents (``--nnodes=2``, node ranks 0 and 1,
2 processes each, gloo) share one rendezvous and one filesystem, as nodes of a cluster do. Node-rank
wiring, LOCAL_RANK vs RANK confusions and per-node paths show up here and nowhere on one agent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _agents(tmp_path: Path, module_args: list[str]) -> list[subprocess.Popen]:
    """Node ranks 0 and 1, each a torchrun agent with 2 processes, one rendezvous on localhost."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "UNCLIP_DATA_DIR": str(tmp_path / "datasets"),
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
    }
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
            "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}", *module_args,
        ]  # fmt: skip
        log = open(tmp_path / f"node{node}.log", "a")
        procs.append(
            subprocess.Popen(
                cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )
    return procs


def _kill_node(agent: subprocess.Popen) -> None:
    """SIGKILL a node: its workers (torchrun starts them in sessions of their own) and the agent."""
    workers = Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()
    for pid in workers:
        os.kill(int(pid), signal.SIGKILL)
    agent.kill()
    agent.wait()
    for pid in workers:  # gone before the relaunch writes into the same run directory
        while _alive(int(pid)):
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def _wait(procs: list[subprocess.Popen], tmp_path: Path, timeout: float = 400) -> None:
    for p in procs:
        p.wait(timeout=timeout)
    logs = "".join((tmp_path / f"node{n}.log").read_text()[-3000:] for n in (0, 1))
    assert all(p.returncode == 0 for p in procs), logs


def _train(run: Path, probe: Path, *overrides: str) -> list[str]:
    return [
        "-m", "train.run", "debug=fast", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.num_nodes=2",
        "strategy=ddp", "data.global_batch_size=16", f"hydra.run.dir={run}",
        "+callbacks.rank_probe._target_=tests.rank_probe.RankProbe", f"+callbacks.rank_probe.out={probe}",
        *overrides,
    ]  # fmt: skip


def test_two_nodes_train_are_killed_and_resume(tmp_path):
    run, probe = tmp_path / "run", tmp_path / "probe"
    args = _train(run, probe, "trainer.max_steps=400", "trainer.val_check_interval=400",
                  "callbacks.checkpoint.every_n_train_steps=4")  # fmt: skip
    procs = _agents(tmp_path, args)
    first = run / "checkpoints" / "step0000004.ckpt"
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.2)
    assert first.exists(), "".join((tmp_path / f"node{n}.log").read_text()[-3000:] for n in (0, 1))
    for p in procs:  # both nodes lost at once (SIGKILL: no handler, no final checkpoint)
        _kill_node(p)
    starts = [json.loads((probe / f"rank{r}_step0.json").read_text()) for r in range(4)]
    assert sorted(s["rank"] for s in starts) == [0, 1, 2, 3]  # global ranks across nodes, no duplicates
    assert len({s["weights"] for s in starts}) == 1 and len({s["torch"] for s in starts}) == 4

    saved = max(int(p.stem[4:]) for p in (run / "checkpoints").glob("step*.ckpt"))
    end = saved + 6
    _wait(
        _agents(
            tmp_path, _train(run, probe, f"trainer.max_steps={end}", f"trainer.val_check_interval={end}")
        ),
        tmp_path,
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["trainer/global_step"] == end and "val/zeroshot_shape_top1" in metrics
    resumed = [json.loads(p.read_text()) for p in probe.glob(f"rank*_step{saved}.json")]
    assert sorted(r["rank"] for r in resumed) == [0, 1, 2, 3], (
        "every rank of both nodes resumed at the same step"
    )
    log = (tmp_path / "node0.log").read_text() + (tmp_path / "node1.log").read_text()
    assert "resuming from" in log


def test_two_nodes_embed_each_shard_once(clip_run, tmp_path):
    """data.embed on 4 ranks (2 torchrun agents): each shard written once, by one rank (the 2 ranks of one
    agent: tests/test_run.py's pipeline)."""
    from tests.test_embed import _read

    ckpt, val = clip_run
    out = tmp_path / "emb"
    _wait(
        _agents(tmp_path, ["-m", "data.embed", f"ckpt={ckpt}", f"shards={val}", f"out={out}", "batch=16"]),
        tmp_path,
    )
    keys = [k for b in _read(out) for k in b["__key__"]]
    assert len(keys) == len(set(keys)) == 64
    assert len(json.loads((out / "sizes.json").read_text())) == 4  # 4 shards over 4 ranks on 2 nodes
    assert not list(out.glob(".*tmp*")), "no temporary files left"
