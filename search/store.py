"""On-disk cache of evaluated candidates, so an interrupted search resumes without re-evaluating."""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class CandidateStore:
    """Append-only JSON-lines file keyed by candidate. Each record is appended under an exclusive
    lock, flushed and fsynced as soon as it is evaluated: a killed search loses at most the
    candidate in flight, and searches sharing a cache (parallel jobs) never lose each other's
    records. A line cut short by a kill is skipped, with a warning, when the file is read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        if path.exists():
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                try:
                    record = json.loads(line)
                except ValueError:
                    log.warning("%s line %d is not a whole record (cut short by a kill?): skipped", path, number)
                    continue
                self.records[record["key"]] = record
        self.hits = 0  # lookups answered from the file in this process
        self.added = 0  # records evaluated (and appended) in this process

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def get(self, key: str) -> dict[str, Any]:
        self.hits += 1
        return self.records[key]

    def add(self, key: str, record: dict[str, Any]) -> dict[str, Any]:
        record = {"key": key, **record}
        line = (json.dumps(record) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
            size = handle.seek(0, os.SEEK_END)
            if size:
                handle.seek(size - 1)
                if handle.read(1) != b"\n":  # a record cut short by a kill: end its line (skipped on reading)
                    line = b"\n" + line
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self.records[key] = record
        self.added += 1
        return record
