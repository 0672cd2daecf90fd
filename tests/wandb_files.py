"""Read W&B's offline run files (`run-<id>.wandb`) back, to check what a run recorded.

The file is W&B's record log: a 7-byte header (`:W&B`, magic, version), then protobuf `Record`s
in LevelDB log framing (32 KiB blocks; each chunk has a 7-byte header: CRC32, length, type FULL /
FIRST / MIDDLE / LAST)."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
CHUNK_HEADER = 7
FULL, FIRST, LAST = 1, 2, 4


def records(path: Path) -> Iterator[pb.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, pending = CHUNK_HEADER, b""
    while position + CHUNK_HEADER <= len(data):
        room = BLOCK - position % BLOCK
        if room < CHUNK_HEADER:  # block trailer: padding
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + CHUNK_HEADER])
        chunk = data[position + CHUNK_HEADER : position + CHUNK_HEADER + length]
        position += CHUNK_HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


@dataclass
class OfflineRun:
    id: str
    name: str
    group: str
    job_type: str
    tags: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[str] = field(default_factory=list)


def item_key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def complete_run_file(folder: Path, timeout_s: float = 60.0) -> Path:
    """The run file of `folder` once it holds its exit record: `wandb.finish()` can return before
    W&B's core process has written the last records."""
    (path,) = folder.glob("run-*.wandb")
    deadline = time.monotonic() + timeout_s
    while not any(r.WhichOneof("record_type") == "exit" for r in records(path)):
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout_s} s"
        time.sleep(0.5)
    return path


def read_run(folder: Path) -> OfflineRun:
    """The run of one `wandb/offline-run-*` folder."""
    path = complete_run_file(folder)
    run: OfflineRun | None = None
    config: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    artifacts: list[str] = []
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run = OfflineRun(r.run_id, r.display_name, r.run_group, r.job_type, list(r.tags))
            config |= {item_key(i): json.loads(i.value_json) for i in r.config.update}
        elif kind == "config":
            config |= {item_key(i): json.loads(i.value_json) for i in record.config.update}
        elif kind == "history":
            history.append({item_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "artifact":
            artifacts.append(f"{record.artifact.type}:{record.artifact.name}")
    assert run is not None, f"{path} has no run record"
    run.config, run.history, run.artifacts = config, history, artifacts
    return run


def runs_under(root: Path) -> list[OfflineRun]:
    """Every offline W&B run below `root`, in folder order."""
    return [read_run(folder) for folder in sorted(root.rglob("wandb/offline-run-*"))]
