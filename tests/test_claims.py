"""Run folders are claimed by one run: a requeued SLURM job may reopen its own, nothing else may."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tokenprune.apps.settings import claimed_by_this_job, claimed_run_dir

OUTPUTS = ("checkpoints", "results.json")


def claim(run_dir, job: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Claim `run_dir` as SLURM job `job` (None: outside SLURM) and leave a run's outputs in it."""
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_CLUSTER_NAME"):
        monkeypatch.delenv(name, raising=False)
    if job is not None:
        monkeypatch.setenv("SLURM_JOB_ID", job)
        monkeypatch.setenv("SLURM_CLUSTER_NAME", "test")
    with claimed_run_dir(run_dir, OmegaConf.create({"seed": 1}), OUTPUTS, "train"):
        (run_dir / "checkpoints").mkdir(exist_ok=True)


def test_the_same_job_requeued_reopens_its_folder(tmp_path, monkeypatch):
    claim(tmp_path, "17", monkeypatch)
    assert claimed_by_this_job(tmp_path)
    claim(tmp_path, "17", monkeypatch)  # the requeue: same job id, same folder


@pytest.mark.parametrize(("first", "second"), [("17", "18"), (None, None), ("17", None), (None, "17")])
def test_any_other_run_is_refused(tmp_path, monkeypatch, first, second):
    claim(tmp_path, first, monkeypatch)
    with pytest.raises(FileExistsError, match="refusing to overwrite an earlier run's outputs"):
        claim(tmp_path, second, monkeypatch)
