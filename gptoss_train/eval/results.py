"""Result files of a run: ``results.json`` (config, identities and hashes, metrics with 95% intervals) and
``samples.jsonl`` (one line per sample and effort). Both are written atomically (temp file + rename), so a crash
never leaves a half-written file; the sample cache (cache.py) is what makes the run resumable."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

from gptoss_train.eval.core import FAILURE_KINDS
from gptoss_train.eval.stats import score_interval

RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"
CACHE_FILE = "cache.jsonl"
REPORT_FILE = "report.html"
# Files above this size are fingerprinted by name, size and mtime: hashing 13 GB of weights per eval is too slow.
_HASH_LIMIT = 64 * 1024 * 1024


def fingerprint_path(path: str | os.PathLike) -> str:
    """A short hash identifying a model file or folder (contents of small files, name+size+mtime of large ones)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        relative = file.name if not path.is_dir() else str(file.relative_to(path))
        if relative.startswith(".") or "/." in relative:
            continue
        stat = file.stat()
        digest.update(relative.encode())
        if stat.st_size <= _HASH_LIMIT:
            digest.update(file.read_bytes())
        else:
            digest.update(f"{stat.st_size}:{int(stat.st_mtime)}".encode())
    return digest.hexdigest()[:16]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_results(out_dir: str | os.PathLike, results: dict, records: list[dict]) -> None:
    out_dir = Path(out_dir)
    lines = "".join(json.dumps(record, ensure_ascii=False, default=str) + "\n" for record in records)
    atomic_write_text(out_dir / SAMPLES_FILE, lines)
    atomic_write_text(out_dir / RESULTS_FILE, json.dumps(results, indent=2, ensure_ascii=False, default=str) + "\n")


def read_run(out_dir: str | os.PathLike) -> tuple[dict, list[dict]]:
    out_dir = Path(out_dir)
    results_path = out_dir / RESULTS_FILE
    if not results_path.is_file():
        raise FileNotFoundError(f"{results_path} not found: is {out_dir} the --out folder of a finished gptoss-eval run?")
    results = json.loads(results_path.read_text(encoding="utf-8"))
    records = []
    samples_path = out_dir / SAMPLES_FILE
    if samples_path.is_file():
        with open(samples_path, encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle if line.strip()]
    return results, records


def effort_metrics(suite_metrics: dict, records: list[dict]) -> dict:
    """The suite's own aggregate plus a 95% interval on the score and the failure breakdown."""
    metrics = dict(suite_metrics)
    metrics["score_ci"] = score_interval([float(r["score"]) for r in records])
    failures = Counter(r.get("failure") for r in records if r.get("failure"))
    metrics["failures"] = {kind: failures.get(kind, 0) for kind in FAILURE_KINDS if failures.get(kind)}
    unknown = {kind: count for kind, count in failures.items() if kind not in FAILURE_KINDS}
    metrics["failures"].update(unknown)
    return metrics
