"""`hydra/launcher=slurm`: hydra-submitit-launcher's SLURM launcher with what sweeps on a real
cluster need (presets in conf/slurm/, README "Clusters (SLURM)").

- Before anything is submitted, `sbatch --test-only` checks that the cluster can ever run the
  request; if not, the sweep stops with SLURM's reason and the settings to change, instead of
  jobs waiting PENDING forever. Jobs still PENDING after `pending_report_s` get their reasons logged.
- Every job is submitted on its own, named after its `run_name`.
- A job whose task raises exits non-zero, so `sacct` shows FAILED (Hydra records the exception in
  the job's result and would otherwise let the job end COMPLETED).
- The launcher waits for every job, then reports all failures together, each with its log path.

Preemption and timeouts stay submitit's: SIGUSR2 -> `checkpoint` (resubmit the same job) ->
`scontrol requeue`; the requeued job resumes from its own last.ckpt (apps/settings.py, apps/train.py).
"""

from __future__ import annotations

import logging
import re
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import submitit
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
from omegaconf import OmegaConf

log = logging.getLogger(__name__)
REQUEST = (
    "partition",
    "account",
    "qos",
    "nodes",
    "tasks_per_node",
    "cpus_per_task",
    "gpus_per_node",
    "mem_gb",
    "timeout_min",
)
ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b.*")


class SlurmLauncher(SubmititSlurmLauncher):
    """SLURM launcher: checked requests, one named job per sweep point, failures reported together."""

    def __init__(self, pending_report_s: int = 120, poll_s: float = 2.0, **params: Any) -> None:
        super().__init__(**params)
        tasks = self.params.get("tasks_per_node")
        if isinstance(tasks, bool) or not isinstance(tasks, int) or tasks < 1:
            raise ValueError(
                f"hydra.launcher.tasks_per_node={tasks!r} must be a number of tasks >= 1 "
                "(the slurm presets take it from trainer.devices: set trainer.devices to a number)"
            )
        self.pending_report_s = pending_report_s
        self.poll_s = poll_s

    def __call__(self, *args: Any) -> JobReturn:
        """On the node: run the job; a failed task raises so that the SLURM job exits non-zero."""
        result = super().__call__(*args)
        if result.status == JobStatus.FAILED:
            raise result._return_value
        return result

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None
        executor = self.executor()
        check_request(executor, self.params)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("SLURM sweep output dir: %s", sweep_dir)
        jobs = []
        for index, overrides in enumerate(job_overrides, initial_job_idx):
            name = self.run_name(overrides)
            executor.update_parameters(name=name)
            job = executor.submit(
                self, list(overrides), "hydra.sweep.dir", index, f"job_id_for_{index}", Singleton.get_state()
            )
            log.info("\t#%d : SLURM job %s %s : %s", index, job.job_id, name, " ".join(filter_overrides(overrides)))
            jobs.append((list(overrides), job))
        self.wait([job for _, job in jobs])
        return collect(jobs)

    def executor(self) -> submitit.AutoExecutor:
        """A submitit SLURM executor with this launcher's parameters (as the parent launcher builds it)."""
        params = dict(self.params)
        executor = submitit.AutoExecutor(
            folder=params.pop("submitit_folder"), cluster="slurm", slurm_max_num_timeout=params.pop("max_num_timeout")
        )
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{key if key in shared else f"slurm_{key}": v for key, v in params.items()})
        return executor

    def run_name(self, overrides: Sequence[str]) -> str:
        """The job's `run_name` (its config composed with its overrides), else Hydra's job name."""
        assert self.hydra_context is not None and self.config is not None
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        hydra_config = HydraConfig.instance()
        previous = hydra_config.cfg
        hydra_config.set_config(config)  # `${hydra:runtime.choices...}` in run_name reads the job's choices
        try:
            return str(OmegaConf.select(config, "run_name", default=config.hydra.job.name))
        finally:
            hydra_config.cfg = previous

    def wait(self, jobs: Sequence[submitit.Job[Any]]) -> None:
        """Block until every job has ended; every `pending_report_s`, log the jobs still PENDING and why."""
        reported = time.monotonic()
        while not all(job.done() for job in jobs):
            time.sleep(self.poll_s)
            if time.monotonic() - reported >= self.pending_report_s:
                reported = time.monotonic()
                waiting = pending_reasons([job.job_id for job in jobs])
                if waiting:
                    log.warning("SLURM jobs still PENDING (job: reason): %s", "; ".join(waiting))


def check_request(executor: submitit.AutoExecutor, params: dict[str, Any]) -> None:
    """`sbatch --test-only` with the job script submitit would submit; refuse what no node can run."""
    slurm = executor._executor
    assert isinstance(slurm, submitit.SlurmExecutor)
    script = slurm._make_submission_file_text("true", "test-only")  # the #SBATCH lines of the real submission
    answer = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True, timeout=60)
    if answer.returncode != 0:
        asked = ", ".join(f"{key}={params.get(key)}" for key in REQUEST)
        reason = " ".join(answer.stderr.split()) or f"sbatch exit code {answer.returncode}"
        raise ValueError(
            f"SLURM cannot run this request ({reason}); asked for hydra.launcher: {asked}. "
            "Pick a preset that fits (slurm=cpu|gpu|gpu_node) or change those settings; "
            "`sinfo -o '%P %D %c %m %G %l'` lists what the partitions offer"
        )


def pending_reasons(job_ids: Sequence[str]) -> list[str]:
    """`<job id>: <reason>` for each of `job_ids` still PENDING (squeue)."""
    answer = subprocess.run(
        ["squeue", "-h", "-t", "PENDING", "-o", "%i %r", "-j", ",".join(job_ids)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return [": ".join(line.split(maxsplit=1)) for line in answer.stdout.splitlines() if line.strip()]


def collect(jobs: Sequence[tuple[list[str], submitit.Job[Any]]]) -> list[JobReturn]:
    """Every job's result; raise one error listing every failed job (state, error, log path)."""
    results, failures = [], []
    for overrides, job in jobs:
        try:
            results.append(job.results()[0])
        except Exception as error:  # submitit: FailedJobError (the task raised), UncompletedJobError
            failures.append(
                f"  job {job.job_id} {' '.join(filter_overrides(overrides))}\n"
                f"    {error_line(str(error))}\n    log: {job.paths.stderr}"
            )
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(jobs)} SLURM jobs failed:\n" + "\n".join(failures))
    return results


def error_line(message: str) -> str:
    """The last `SomeError: ...` line of a job's traceback, else the message's first line."""
    lines = [line.strip() for line in message.splitlines()]
    found = [line for line in lines if ERROR_LINE.match(line)]
    return found[-1] if found else lines[0] if lines else "no error message"
