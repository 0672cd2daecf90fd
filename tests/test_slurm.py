"""A real single-node SLURM cluster (.ci/slurm): sweeps through `hydra/launcher=slurm`, preemption
and requeue, failures.

The module installs Debian's slurm-wlm, slurmdbd, munge and mariadb-server when missing, brings
the cluster up on this host (loopback) and stops exactly the daemons it started, by their PIDs; a
cluster that was already running is used and left running. Without root or apt-get the tests
are skipped. Phase timings are printed in the test log (`slurm cluster: ...`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from apps import FAST, run_cli
from wandb_files import runs_under

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / ".ci" / "slurm"
# 3 epochs of 100 steps with last.ckpt after each: a job has saved a checkpoint well before it ends.
RUN = [*FAST, "trainer.limit_train_batches=100", "trainer.max_epochs=3", "slurm=cpu"]
OFFLINE = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def say(request: pytest.FixtureRequest, line: str) -> None:
    """A line in the test log, whatever the capture mode."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"slurm cluster: {line}")


def shell(command: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)


def timed(request: pytest.FixtureRequest, what: str, command: list[str], env: dict[str, str], timeout: float) -> None:
    """Run a cluster script; fail with its output if it fails; log how long it took."""
    started = time.monotonic()
    done = shell(command, timeout=timeout, env=env)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    say(request, f"{what} {time.monotonic() - started:.1f} s")


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("SLURM cluster tests need root and apt-get to install slurm-wlm, slurmdbd, munge, mariadb-server")
    env = {**os.environ, "PIDS": str(tmp_path_factory.mktemp("slurm") / "pids")}
    timed(request, "install (apt, when missing)", [str(SCRIPTS / "install.sh")], env, timeout=900)
    if "UP" in shell(["scontrol", "ping"]).stdout:
        say(request, "a cluster is already running: using it, leaving it running")
        yield
        return
    timed(request, "bring-up", [str(SCRIPTS / "up.sh")], env, timeout=300)
    try:
        yield
    finally:
        timed(request, "tear-down", [str(SCRIPTS / "down.sh")], env, timeout=300)


def job_id(run_dir: Path) -> str:
    """The SLURM job id recorded in a run folder's claim."""
    return json.loads((run_dir / ".hydra" / "claim.json").read_text())["job"].rsplit(":", 1)[1]


def job_states(job: str, expected: int) -> list[tuple[str, str]]:
    """(State, ExitCode) of every start of `job` in accounting (requeued starts included), once
    `expected` of them are final."""
    rows: list[tuple[str, str]] = []
    for _ in range(60):
        answer = shell(["sacct", "-X", "-D", "-n", "-P", "-j", job, "-o", "State,ExitCode"])
        rows = [tuple(line.split("|")) for line in answer.stdout.split()]  # type: ignore[misc]
        if len(rows) >= expected and not any(state in ("PENDING", "RUNNING") for state, _ in rows):
            break
        time.sleep(1)
    return rows


@pytest.fixture(scope="module")
def sweep_dir(cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A three-job multirun through hydra/launcher=slurm with the cpu preset, logging to W&B (offline)."""
    root = tmp_path_factory.mktemp("sweep")
    run = [o.replace("logger=csv", "logger=wandb") for o in RUN]
    args = ["-m", "hydra/launcher=slurm", *run, "pruner=none,topk,random", f"paths.root={root}"]
    done = run_cli("tokenprune.apps.train", args, root)
    assert done.returncode == 0, done.stderr[-4000:]
    (folder,) = (root / "multirun").iterdir()
    return folder


@pytest.fixture(scope="module")
def sweep(sweep_dir: Path) -> dict[str, dict]:
    """The sweep's results by run name."""
    results = [json.loads(path.read_text()) for path in sorted(sweep_dir.glob("*/results.json"))]
    return {result["run_name"]: result for result in results}


def test_sweep_logs_one_wandb_run_per_job_in_one_group_and_aggregates(sweep_dir):
    runs = runs_under(sweep_dir)
    trains = [r for r in runs if r.job_type == "train"]
    assert len(trains) == 3 and len({r.id for r in trains}) == 3
    assert {r.group for r in runs} == {f"train-{sweep_dir.name}"}
    assert sorted(r.name.split("[")[1] for r in trains) == ["pruner=none]", "pruner=random]", "pruner=topk]"]
    assert [r.job_type for r in runs if r.job_type != "train"] == ["compare"]
    assert sorted(pd.read_csv(sweep_dir / "sweep.csv").pruner) == ["none", "random", "topk"]
    assert (sweep_dir / "fronts.png").is_file() and "Pareto front" in (sweep_dir / "report.md").read_text()


def test_sweep_runs_every_job_named_after_its_run(sweep):
    assert sorted(sweep) == [f"tiny-rt_sentiment-{p}-s42" for p in ("none", "random", "topk")]
    for name, result in sweep.items():
        job = job_id(Path(result["run_dir"]))
        assert shell(["sacct", "-X", "-n", "-P", "-j", job, "-o", "JobName"]).stdout.split() == [name]
        assert job_states(job, 1) == [("COMPLETED", "0:0")]
        assert 0.0 <= result["report"]["report/accuracy"] <= 1.0
    assert sweep["tiny-rt_sentiment-topk-s42"]["report"]["report/flops_ratio"] < 1.0


def test_preempted_job_resumes_from_its_own_checkpoint_to_the_same_result(sweep, tmp_path, request):
    command = [sys.executable, "-m", "tokenprune.apps.train", "-m", *RUN, "pruner=none", f"paths.root={tmp_path}"]
    with open(tmp_path / "launcher.log", "w") as log:
        launcher = subprocess.Popen(command, cwd=tmp_path, env=OFFLINE, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not list(tmp_path.glob("multirun/*/0-*/checkpoints/last.ckpt")):
                assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "launcher.log").read_text()
                time.sleep(0.2)
            (run_dir,) = tmp_path.glob("multirun/*/0-*")
            job = job_id(run_dir)
            shell(["scancel", "--signal=USR2", job], check=True)  # what a preempting scheduler sends
            say(request, f"job {job} preempted (USR2) after its first last.ckpt")
            for _ in range(120):  # SLURM holds a requeued job ~2 min (BeginTime); release it now
                state = shell(["squeue", "-h", "-j", job, "-o", "%T %r"]).stdout.split()
                if state == ["PENDING", "BeginTime"]:
                    shell(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
                    break
                time.sleep(0.5)
            assert launcher.wait(timeout=400) == 0, (tmp_path / "launcher.log").read_text()[-4000:]
        finally:
            if launcher.poll() is None:
                launcher.kill()
    result = json.loads((run_dir / "results.json").read_text())
    assert result["resumed_from"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert job_states(job, 2) == [("REQUEUED", "0:0"), ("COMPLETED", "0:0")]
    uninterrupted = sweep["tiny-rt_sentiment-none-s42"]["report"]
    say(request, f"preempted: {json.dumps(result['report'], sort_keys=True)}")
    say(request, f"uninterrupted: {json.dumps(uninterrupted, sort_keys=True)}")
    assert result["report"] == pytest.approx(uninterrupted, rel=1e-6, abs=1e-9)


def test_failed_jobs_show_failed_and_are_all_reported(cluster, tmp_path):
    args = ["-m", "hydra/launcher=slurm", *RUN, "trainer.accelerator=gpu", "seed=1,2", f"paths.root={tmp_path}"]
    done = run_cli("tokenprune.apps.train", args, tmp_path)  # no GPU here: both jobs raise in Lightning
    assert done.returncode != 0
    assert "2 of 2 SLURM jobs failed" in done.stderr, done.stderr[-4000:]
    jobs = re.findall(r"^  job (\d+) ", done.stderr, flags=re.MULTILINE)
    logs = re.findall(r"^    log: (\S+)$", done.stderr, flags=re.MULTILINE)
    assert len(jobs) == 2 and all(Path(log).is_file() for log in logs) and len(logs) == 2
    assert "No supported gpu backend found" in done.stderr
    for job in jobs:
        assert job_states(job, 1) == [("FAILED", "1:0")]


def test_a_request_no_node_can_run_is_refused_before_submission(cluster, tmp_path):
    done = run_cli("tokenprune.apps.train", ["-m", "slurm=gpu", *FAST, f"paths.root={tmp_path}"], tmp_path)
    assert done.returncode != 0
    assert "SLURM cannot run this request" in done.stderr and "gpus_per_node=1" in done.stderr
    assert not list(tmp_path.glob("multirun/*/.submitit/*"))  # nothing was submitted
