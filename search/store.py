"""On-disk cache of evaluated candidates, so an interrupted search resumes without re-evaluating."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class CandidateStore:
    """Append-only JSON-lines file keyed by candidate; every record is flushed and fsynced as
    soon as it is evaluated, so a killed search loses at most the candidate in flight."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, dict[str, Any]] = {}
        if path.exists():
            text = path.read_text()
            if text and not text.endswith("\n"):  # the last record was cut short by a kill
                text = text[: text.rfind("\n") + 1]
                partial = path.with_suffix(".tmp")
                partial.write_text(text)
                partial.replace(path)
            for line in text.splitlines():
                record = json.loads(line)
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.records[key] = record
        self.added += 1
        return record
