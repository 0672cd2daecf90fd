"""Copy what tokenprune-table reads from a sweep's output folder into a ledger kept in git.

    tokenprune-ledger outputs/methods_table/rt_sentiment-<time> docs/results/runs/rt_sentiment/<name>
    tokenprune-ledger <sweep> docs/results/runs/rt_sentiment/<date>-s3 --seeds 3   # one seed's runs
    tokenprune-table docs/results/runs/rt_sentiment --page docs/results/rt_sentiment.md

A table of every method x 3 seeds needs more compute than one session on one machine, and a
sweep's folder lives on that machine. The ledger keeps the small files the table is built from
(each run's results.json and saved settings, search fronts and ACC's offline tuning, bench
results), so sweeps run in different sessions (other seeds, other methods) add up to one table:
tokenprune-table reads every run below the folder it is given. Checkpoints, W&B files and logs
stay behind. A copy never replaces a file: if the ledger holds a file of the same name with other
contents, nothing is copied. `--seeds` keeps the runs of those seeds (run names `<method>-s<seed>`),
so a seed finished while later ones still run is exported once, in its own folder. The record a
rerun writes for a run it did not repeat (`skip_done`: a results.json with `reused_by`) is left
out when the run it points to is exported too: the table counts that run once either way.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
from pathlib import Path

from tokenprune.apps.options import integer_set, refusals_as_messages
from tokenprune.apps.table import RESULTS, TABLE_INPUTS, saved_run

SETTINGS = Path(".hydra") / "config.yaml"  # a run's resolved settings: its run_name, task, pruner


def of_seeds(folder: Path, seeds: set[int] | None) -> bool:
    """Whether the run in `folder` is one of `seeds` (every run when `seeds` is None)."""
    if seeds is None:
        return True
    run = saved_run(folder)
    return run is not None and run[1] in seeds


def reused_run(results: Path, root: Path) -> Path | None:
    """For a results.json that a rerun wrote for a finished run it did not repeat (`reused_by`),
    that run's results.json relative to `root` when it lies below `root`; else None."""
    try:
        record = json.loads(results.read_text())
    except ValueError:  # being written by a run that is still going
        return None
    if not isinstance(record, dict) or "reused_by" not in record:
        return None
    original, below = Path(record["run_dir"]) / RESULTS, root.resolve()
    return original.relative_to(below) if original.is_relative_to(below) else None


def ledger_files(root: Path, seeds: set[int] | None = None) -> list[Path]:
    """The files tokenprune-table reads under `root`, relative to it: the TABLE_INPUTS and the
    saved settings of the runs that wrote them (of `seeds` only, when given), without the reuse
    records of runs that are exported themselves."""
    runs: set[Path] = set()
    for name in TABLE_INPUTS:
        runs.update(path.relative_to(root) for path in root.glob(f"**/{name}") if of_seeds(path.parent, seeds))
    reuses = {path for path in runs if path.name == RESULTS and reused_run(root / path, root) in runs}
    files: set[Path] = set()
    for path in runs - reuses:
        files.add(path)
        if (root / path.parent / SETTINGS).is_file():
            files.add(path.parent / SETTINGS)
    return sorted(files)


def export(root: Path, ledger: Path, seeds: set[int] | None = None) -> list[Path]:
    """Copy `ledger_files(root, seeds)` into `ledger` (same relative paths); returns the files
    copied (files already there with the same contents are skipped)."""
    files = ledger_files(root, seeds)
    if not files and seeds is not None and ledger_files(root):
        raise FileNotFoundError(f"{root} holds no runs of --seeds {sorted(seeds)} (run names <method>-s<seed>)")
    if not files:
        raise FileNotFoundError(f"{root} holds none of {', '.join(TABLE_INPUTS)}: not a sweep's output folder")
    clashes = [f for f in files if (ledger / f).exists() and not filecmp.cmp(root / f, ledger / f, shallow=False)]
    if clashes:
        raise FileExistsError(
            f"{len(clashes)} files under {ledger} differ from the sweep's (first: {clashes[0]}); nothing was copied: "
            "export into a new folder"
        )
    copied = [f for f in files if not (ledger / f).exists()]
    for relative in copied:
        (ledger / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / relative, ledger / relative)
    return copied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="the sweep's output folder (TOKENPRUNE_OUTPUTS of sweeps/methods_table.sh)")
    parser.add_argument("ledger", help="where the copy goes, e.g. docs/results/runs/<task>/<name>")
    parser.add_argument(
        "--seeds", type=integer_set("--seeds"), help="comma-separated seeds: copy only their runs (default: all)"
    )
    args = parser.parse_args()
    with refusals_as_messages():
        copied = export(Path(args.root), Path(args.ledger), args.seeds)
    print(f"{len(copied)} files copied to {args.ledger}")


if __name__ == "__main__":
    main()
