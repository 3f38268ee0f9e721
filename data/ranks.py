"""Which process of a launch this one is, read before any Trainer or process group exists.

The launcher's environment is chosen as Lightning's Trainer chooses it, so that code which runs before
the Trainer (the pipeline's waits, ``data.embed``'s split of the shards, the config's batch check) and
the Trainer agree: torchrun's variables first, then SLURM's. Two places where they disagree with the truth
are refused or ignored here:

- An allocation's shell is not a launch: a SLURM job named ``bash`` or ``interactive`` (``salloc``,
  ``srun --pty bash``) sets ``SLURM_NTASKS`` and ``SLURM_PROCID`` for a process that is one of one.
- A process in an ``sbatch`` script of several tasks that ``srun`` did not start has ``SLURM_NTASKS=N``
  and ``SLURM_PROCID=0`` but no ``SLURM_STEP_ID``: it is one process that would take itself for rank 0
  of N (embedding a 1/N share of the shards and reporting success, or waiting for N-1 ranks that never
  come). That is refused, with the ``srun`` to use.
"""

from __future__ import annotations

import os
from typing import Any


class LaunchError(ValueError):
    pass


def launch_environment() -> Any:
    """Lightning's ClusterEnvironment of the launcher that started several processes (torchrun's, then
    srun's), else one made from ``RANK``/``WORLD_SIZE``/``MASTER_PORT`` (another launcher, e.g.
    DeepSpeed's); None: this process is one of one."""
    from lightning_fabric.plugins.environments import (
        LightningEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    if TorchElasticEnvironment.detect():
        return TorchElasticEnvironment()
    # (asked only under SLURM: where srun is installed, Lightning's detect() warns that it is not used)
    if "SLURM_NTASKS" in os.environ and SLURMEnvironment.detect():
        tasks = os.environ.get("SLURM_NTASKS", "1")
        if tasks.isdigit() and int(tasks) > 1 and "SLURM_STEP_ID" not in os.environ:
            raise LaunchError(
                f"SLURM_NTASKS={tasks} (job {os.environ.get('SLURM_JOB_ID', '?')}) but srun did not start this "
                "process (no SLURM_STEP_ID): in an sbatch script, start each task with `srun python -m ...` "
                "(launch/slurm.sbatch); for one process, ask for --ntasks=1 or name the job interactive"
            )
        return SLURMEnvironment()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and "MASTER_PORT" in os.environ:
        environment = LightningEnvironment()
        environment.set_world_size(int(os.environ["WORLD_SIZE"]))
        environment.set_global_rank(int(os.environ.get("RANK", 0)))
        return environment
    return None


def rank_and_world() -> tuple[int, int]:
    """(global rank, world size) of this process: the launcher's, else ``RANK``/``WORLD_SIZE`` when both are
    set (a split made by hand, e.g. a job array), else (0, 1)."""
    environment = launch_environment()
    if environment is not None:
        return environment.global_rank(), environment.world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def is_global_zero() -> bool:
    """Whether this process is (or will be) the launch's rank 0. Besides the launchers above, Lightning's
    own launcher starts a child per extra device (``LOCAL_RANK`` set) on every node (``NODE_RANK``)."""
    rank, _ = rank_and_world()
    local = os.environ.get("LOCAL_RANK", "0")
    node = os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0"))
    return rank == 0 and local in ("", "0") and node in ("", "0")
