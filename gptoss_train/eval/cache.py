"""Sample-level result cache: an append-only JSONL file, fsync'ed after every sample, so a crashed or killed run
resumes where it stopped.

A line is written only after its sample finished; a line cut by a crash (no trailing newline / invalid JSON) is
ignored on reload, so that sample is simply run again. The key covers everything that changes a sample's outcome:
suite, sample id, model identity, generation settings and effort. Changing any of them misses the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_key(**fields) -> str:
    payload = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


class SampleCache:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._entries: dict[str, dict] = {}
        self.ignored_lines = 0
        if self.path.exists():
            self._load()
        # Opened once in append mode; every record is one write() + fsync.
        self._handle = open(self.path, "a", encoding="utf-8")

    def _load(self) -> None:
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                if not line.endswith("\n"):
                    self.ignored_lines += 1  # the write a crash interrupted
                    continue
                try:
                    entry = json.loads(line)
                    self._entries[entry["key"]] = entry["record"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    self.ignored_lines += 1
        if self.ignored_lines:
            # Make sure the next append starts on a fresh line after a torn write.
            with open(self.path, "rb+") as handle:
                handle.seek(0, os.SEEK_END)
                if handle.tell():
                    handle.seek(-1, os.SEEK_END)
                    if handle.read(1) != b"\n":
                        handle.write(b"\n")

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> dict | None:
        return self._entries.get(key)

    def put(self, key: str, record: dict) -> None:
        line = json.dumps({"key": key, "record": record}, ensure_ascii=False, default=str) + "\n"
        self._handle.write(line)
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._entries[key] = record

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
