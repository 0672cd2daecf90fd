"""What an app needs to know about the cluster job it runs in.

- `job_identity`: which SLURM job this process belongs to, stable across requeues (a requeued job
  keeps its id), so that a requeued job may reopen the run folder it claimed (apps/settings.py).
- `process_rank`: this process's global rank (DDP launched by Lightning or by SLURM tasks);
  only rank 0 writes a run's outputs.
- `trainer_plugins`: one signal path. submitit owns preemption and timeouts (SIGUSR2 ->
  checkpoint -> `scontrol requeue`), so Lightning's own SLURM auto-requeue (SIGUSR1) stands down.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.plugins.environments import SLURMEnvironment

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID")  # what Lightning itself reads, in its order


def job_identity() -> str | None:
    """`slurm:<cluster>:<job>` of the SLURM job running this process (array tasks as
    `<array job>_<task>`), or None outside SLURM."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None:
        return None
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array is not None and task is not None:
        job = f"{array}_{task}"
    return f"slurm:{os.environ.get('SLURM_CLUSTER_NAME', '')}:{job}"


def process_rank() -> int:
    """Global rank of this process: 0 unless a DDP launcher (Lightning or SLURM) set one."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name)
        if value is not None:
            return int(value)
    return 0


def trainer_plugins() -> list[Any]:
    """Lightning plugins for this process: under SLURM, the SLURM environment with
    auto-requeue off, so that submitit's USR2 handler alone requeues the job."""
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []
