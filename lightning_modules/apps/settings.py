"""What every app checks before it loads a model or data, and how it claims its output folder.

Settings: a small declarative schema per app (setting -> `Rule`), applied to the resolved config,
plus a scan that rejects NaN/inf in every float setting. The objects a config builds (pruners,
searches, modules) check their own ranges with `tokenprune.checks`, also before any work.

Output folders: a run never writes into a folder that holds another run's outputs. Hydra is told
not to write `.hydra/` or a log file itself (`hydra.output_subdir: null`, console-only logging in
the primary configs); `claimed_run_dir` does both once the folder is known to be free, so a refused
run writes nothing at all. The claim (`.hydra/claim.json`) names the SLURM job that made it: the
same job, requeued after preemption or a timeout, may reopen its folder (and resumes from its own
last.ckpt); any other run is refused. DDP ranks other than 0 claim nothing and write nothing there.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from tokenprune.apps.cluster import job_identity, process_rank
from tokenprune.checks import check_range
from tokenprune.config import plain
from tokenprune.engine.kernels import CPU_LINEAR_KERNELS

MISSING = object()


@dataclass(frozen=True)
class Rule:
    """One setting: an int or float (optionally in [low, high], or (low, high] when `low_open`), or
    one of `choices`; None allowed if optional."""

    kind: type = int
    low: float | None = None
    high: float | None = None
    choices: Sequence[str] = ()
    optional: bool = False
    each: bool = False  # the setting is a non-empty list and every entry follows the rule
    low_open: bool = False

    def check(self, name: str, value: Any) -> None:
        if value is None and self.optional:
            return
        if self.each:
            if not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"{name}={value!r} must be a non-empty list")
            for index, item in enumerate(value):
                Rule(self.kind, self.low, self.high, self.choices, low_open=self.low_open).check(
                    f"{name}[{index}]", item
                )
            return
        if self.choices:
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if (str(value) if number else value) not in self.choices:  # `precision=32` arrives as 32
                raise ValueError(f"{name}={value!r} is not one of: {', '.join(map(str, self.choices))}")
            return
        numeric = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, numeric):
            kind = "an integer" if self.kind is int else "a number"
            raise TypeError(f"{name}={value!r} must be {kind}{self._interval()}")
        low = -math.inf if self.low is None else self.low
        check_range(name, value, low, math.inf if self.high is None else self.high, low_open=self.low_open)

    def _interval(self) -> str:
        if self.low is None and self.high is None:
            return ""
        opening = "(" if self.low_open or self.low is None else "["
        return f" {opening}{'-inf' if self.low is None else self.low}, {'inf' if self.high is None else self.high}]"


TRAINER = {
    "seed": Rule(int, 0, 2**32 - 1),
    "threads": Rule(int, 1, optional=True),
    "task.num_labels": Rule(int, 1),
    "task.max_length": Rule(int, 2),
    "data.batch_size": Rule(int, 1),
    "data.eval_batch_size": Rule(int, 1),
    "data.num_workers": Rule(int, 0),
    "trainer.max_epochs": Rule(int, 0, optional=True),  # 0: evaluate (and checkpoint) the starting weights
    "trainer.max_steps": Rule(int, -1),
    "trainer.accumulate_grad_batches": Rule(int, 1),
    "trainer.log_every_n_steps": Rule(int, 1),
    "trainer.num_sanity_val_steps": Rule(int, -1),
    "trainer.gradient_clip_val": Rule(float, 0, optional=True),
    "trainer.limit_train_batches": Rule(float, 0, optional=True),
    "trainer.limit_val_batches": Rule(float, 0, optional=True),
    "trainer.limit_test_batches": Rule(float, 0, optional=True),
    "trainer.check_val_every_n_epoch": Rule(int, 1, optional=True),
    "report_on": Rule(choices=("last", "best")),
    "checkpoints.interval.minutes": Rule(float, 0),  # 0: after every optimizer step
}
SEARCH = {
    "threads": Rule(int, 1),
    "eval_batch_size": Rule(int, 1),
    "device": Rule(choices=("cpu", "cuda", "mps")),
    "compare_constant_ratios": Rule(float, 0, 1, optional=True, each=True, low_open=True),
    "measure.batch_size": Rule(int, 1),
    "measure.warmup": Rule(int, 0),
    "measure.repeats": Rule(int, 1),
    "measure.search_batches": Rule(int, 1),
    "target_speedup": Rule(float, 1),
}
BENCH = {
    "seed": Rule(int, 0, 2**32 - 1),
    "threads": Rule(int, 1),
    "mode": Rule(choices=("infer", "train")),
    "device": Rule(choices=("cpu", "cuda", "mps")),
    "batch_sizes": Rule(int, 1, each=True),
    "warmup": Rule(int, 0),
    "repeats": Rule(int, 1),
    "train_batches": Rule(int, 1),
    "precision": Rule(choices=("32", "bf16", "fp16")),
    "cpu_linear": Rule(choices=CPU_LINEAR_KERNELS),
}


def leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted name, value) of every leaf of a plain nested config."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from leaves(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from leaves(value, f"{prefix[:-1]}[{index}].")
    else:
        yield prefix[:-1], node


def check_settings(cfg: DictConfig, schema: Mapping[str, Rule]) -> None:
    """Every float finite, every scheduled setting of the right type and range (errors name it)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for name, value in leaves(resolved):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name}={value} is not a finite number")
    for name, rule in schema.items():
        value = OmegaConf.select(cfg, name, default=MISSING)
        if value is not MISSING:
            rule.check(name, plain(value))


CLAIM = Path(".hydra") / "claim.json"


def claimed_by_this_job(run_dir: Path) -> bool:
    """True when `run_dir` was claimed by the SLURM job this process runs in: the job was requeued
    (preempted or timed out) and this is its next start."""
    claim = run_dir / CLAIM
    job = job_identity()
    return job is not None and claim.is_file() and json.loads(claim.read_text()).get("job") == job


@contextmanager
def claimed_run_dir(run_dir: Path, cfg: DictConfig, outputs: Sequence[str], app: str) -> Iterator[None]:
    """Refuse a folder holding another run's `outputs` (a requeue of the job that claimed it is
    the same run); otherwise create it, record the claim, save the resolved config (and the
    command's overrides) to `.hydra/`, and log to `<app>.log` in it while the body runs. DDP ranks
    other than 0 only run the body."""
    if process_rank() != 0:
        yield
        return
    if not claimed_by_this_job(run_dir):
        for name in outputs:
            if (run_dir / name).exists():
                raise FileExistsError(f"{run_dir / name} exists; refusing to overwrite an earlier run's outputs")
    saved = run_dir / ".hydra"
    saved.mkdir(parents=True, exist_ok=True)
    (run_dir / CLAIM).write_text(json.dumps({"job": job_identity(), "app": app}))
    OmegaConf.save(cfg, saved / "config.yaml", resolve=True)
    if HydraConfig.initialized():
        OmegaConf.save(HydraConfig.get().overrides.task, saved / "overrides.yaml")
    handler = logging.FileHandler(run_dir / f"{app}.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


@contextmanager
def nothing_left_if_refused(run_dir: Path, stop: Path) -> Iterator[None]:
    """Hydra creates the run folder before the app starts; when the app fails before writing
    anything, remove that folder and its empty parents (up to `stop`) again."""
    try:
        yield
    except BaseException:
        folder = run_dir.resolve()
        stop = stop.resolve()
        while folder != stop and stop in folder.parents and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
        raise
