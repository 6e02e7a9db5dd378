"""``run_suite``: samples -> backend -> graded results, cached per sample, written to ``out_dir``.

Flow per reasoning effort: every sample whose cache key is already in ``out_dir/cache.jsonl`` is taken from there;
the others run in chunks (batched on the local backend, concurrent on servers), each finished sample appended to the
cache with fsync before the next chunk. After the last effort, ``results.json``, ``samples.jsonl`` and
``report.html`` are (re)written from the cache. Kill the run at any point and run the same command again: it picks
up where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gptoss_train.eval.cache import SampleCache, cache_key
from gptoss_train.eval.core import Backend, Sample, SampleResult, Suite, get_suite
from gptoss_train.eval.results import CACHE_FILE, REPORT_FILE, effort_metrics, write_results
from gptoss_train.eval.suites.base import EFFORTS

logger = logging.getLogger(__name__)

# Settings that change what a sample produces (part of the cache key and of results.json "config").
GENERATION_SETTINGS = ("max_tokens", "temperature", "top_p", "seed", "developer_instructions")


def parse_efforts(effort) -> list[str]:
    if effort is None:
        return ["medium"]
    values = effort.split(",") if isinstance(effort, str) else list(effort)
    values = [v.strip().lower() for v in values if v and v.strip()]
    bad = [v for v in values if v not in EFFORTS]
    if bad or not values:
        raise ValueError(f"reasoning effort must be one or more of {', '.join(EFFORTS)} (comma-separated), got {effort!r}")
    return values


def _sample_hash(sample: Sample) -> str:
    return hashlib.sha256(json.dumps(sample.data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _data_fingerprint(samples: list[Sample]) -> str:
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(sample.id.encode())
        digest.update(_sample_hash(sample).encode())
    return digest.hexdigest()[:16]


def _chunk_size(backend: Backend) -> int:
    """How many samples are in flight at once: a local model's batch, a server's concurrency, else one."""
    return max(1, int(getattr(backend, "batch_size", 0) or getattr(backend, "concurrency", 0) or 1))


def _run_batched(suite, samples: list[Sample], backend: Backend, options: dict, chunk: int, on_done) -> None:
    """Suites with ``run_batch`` (single-turn or staged): one generate_batch per chunk of samples."""
    for start in range(0, len(samples), chunk):
        batch = samples[start : start + chunk]
        for sample, result in zip(batch, suite.run_batch(batch, backend, **options)):
            on_done(sample, result)


def _run_threaded(suite: Suite, samples: list[Sample], backend: Backend, options: dict, workers: int,
                  on_done) -> None:
    """Multi-turn suites: each sample runs in its own thread (up to ``workers`` at once) and is cached as soon as it
    finishes. On a local model the threads' turns are gathered into batches by MicroBatchingBackend."""
    if workers == 1:
        for sample in samples:
            on_done(sample, suite.run_sample(sample, backend, **options))
        return
    from gptoss_train.eval.batching import MicroBatchingBackend

    batcher = MicroBatchingBackend(backend, max_batch=workers) if hasattr(backend, "batch_size") else None
    target = batcher or backend

    def run_one(sample: Sample) -> SampleResult:
        if batcher is not None:
            batcher.sample_started()
        try:
            return suite.run_sample(sample, target, **options)
        finally:
            if batcher is not None:
                batcher.sample_finished()

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(run_one, sample): sample for sample in samples}
        try:
            for future in as_completed(futures):
                on_done(futures[future], future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def _warn_small_budget(suite: Suite, effort: str, max_tokens: int | None, explicit: bool) -> str | None:
    recommended = getattr(suite, "recommended_max_tokens", lambda _e: None)(effort)
    if explicit and recommended and max_tokens and max_tokens < recommended:
        message = (f"{suite.name}: --max-tokens {max_tokens} is below the {recommended} recommended for effort "
                   f"'{effort}'; expect answers cut off before the final channel (counted as 'truncated')")
        logger.warning(message)
        return message
    return None


def _versions() -> dict:
    """Installed versions from package metadata (importing torch/transformers/peft just to read them costs ~10 s)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in ("gptoss-train", "torch", "transformers", "peft", "openai-harmony", "llama-cpp-python"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return versions


def run_suite(suite: str | Suite, *, model: str | Backend, out_dir: str | Path | None = None,
              effort: str | list[str] | None = None, limit: int | None = None, data: str | None = None,
              max_tokens: int | None = None, temperature: float | None = None, top_p: float = 1.0, seed: int = 0,
              developer_instructions: str | None = None, adapter: str | None = None, batch_size: int | None = None,
              resume: bool = True, progress: bool = True, report: bool = True, backend_options: dict | None = None,
              **suite_options: Any) -> dict:
    """Run one suite against one model and return the results dict (also written to ``out_dir``).

    ``model``: a spec (``oracle``, ``http(s)://...`` server, ``*.gguf``, local folder / hub id) or a Backend.
    ``effort``: ``"low"``, ``"low,medium,high"`` or a list: one pass per effort (the effort sweep).
    ``max_tokens`` default: the suite's recommended budget per effort (suite.yaml), else 4096.
    ``temperature`` default: the suite's default (greedy for ``demo``), else 1.0 as OpenAI recommends for gpt-oss.
    Extra keyword arguments go to the suite (``judge``, ``user_model``, ``trials``, ``categories``...).
    """
    from gptoss_train.eval.backends import load_backend

    suite_obj = get_suite(suite) if isinstance(suite, str) else suite
    efforts = parse_efforts(effort)
    started = time.time()

    samples = list(suite_obj.samples(data=data, seed=seed, limit=limit, **suite_options))
    if limit is not None:
        samples = samples[: int(limit)]
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"suite {suite_obj.name}: sample ids are not unique")

    if isinstance(model, Backend):
        backend = model
    else:
        options = dict(backend_options or {})
        if adapter:
            options["adapter"] = adapter
        if batch_size:
            options["batch_size"] = batch_size
        backend = load_backend(str(model), suite=suite_obj, **options)
    if hasattr(backend, "register"):
        backend.register(samples)  # the oracle finds gold answers by sample id
    identity = backend.describe()
    suite_defaults = dict(getattr(suite_obj, "default_options", {}) or {})

    cache = None
    if out_dir is not None:
        if not resume and (Path(out_dir) / CACHE_FILE).exists():
            (Path(out_dir) / CACHE_FILE).unlink()  # --no-resume: start over
        cache = SampleCache(Path(out_dir) / CACHE_FILE)

    # Backends passed as suite options (judge, user model) enter the cache key by identity, not by memory address.
    stable_options = {k: v.describe() if isinstance(v, Backend) else v for k, v in suite_options.items()}
    warnings: list[str] = []
    per_effort: dict[str, dict] = {}
    records: list[dict] = []
    resolved: dict[str, dict] = {}
    counts = {"cached": 0, "generated": 0}
    progress_bar = _progress(progress)
    try:
        with progress_bar:
            for effort_name in efforts:
                recommended = getattr(suite_obj, "recommended_max_tokens", lambda _e: None)(effort_name)
                generation = {
                    "reasoning_effort": effort_name,
                    "max_tokens": max_tokens or suite_defaults.get("max_tokens") or recommended or 4096,
                    "temperature": temperature if temperature is not None else suite_defaults.get("temperature", 1.0),
                    "top_p": top_p,
                    "seed": seed,
                    "developer_instructions": developer_instructions,
                }
                warning = _warn_small_budget(suite_obj, effort_name, max_tokens, explicit=max_tokens is not None)
                if warning:
                    warnings.append(warning)
                resolved[effort_name] = generation
                run_options = {**suite_options, **generation}
                keys = {
                    s.id: cache_key(suite=suite_obj.name, sample=s.id, sample_hash=_sample_hash(s), model=identity,
                                    generation=generation, suite_options=stable_options)
                    for s in samples
                }
                done: dict[str, dict] = {}
                for s in samples:
                    if cache is not None and keys[s.id] in cache:
                        done[s.id] = cache.get(keys[s.id])
                pending = [s for s in samples if s.id not in done]
                counts["cached"] += len(done)
                task = progress_bar.add_task(f"{suite_obj.name} [{effort_name}]", total=len(samples),
                                             completed=len(done))
                def on_done(sample: Sample, result: SampleResult, _keys=keys, _done=done, _effort=effort_name,
                            _task=task) -> None:
                    record = _record(result, _effort)
                    _done[sample.id] = record
                    if cache is not None:
                        cache.put(_keys[sample.id], record)  # runs in the main thread only
                    counts["generated"] += 1
                    progress_bar.update(_task, advance=1)

                if hasattr(suite_obj, "run_batch"):
                    _run_batched(suite_obj, pending, backend, run_options, _chunk_size(backend), on_done)
                else:
                    _run_threaded(suite_obj, pending, backend, run_options, _chunk_size(backend), on_done)
                effort_records = [done[s.id] for s in samples]
                results_for_aggregate = [SampleResult(**{k: r[k] for k in ("id", "score", "passed", "failure",
                                                                         "details")}) for r in effort_records]
                per_effort[effort_name] = effort_metrics(suite_obj.aggregate(results_for_aggregate), effort_records)
                records.extend(effort_records)
    finally:
        if cache is not None:
            cache.close()

    results = {
        "suite": suite_obj.name,
        "model": identity,
        "config": {"efforts": efforts, "generation": resolved, "limit": limit, "data": data or "default",
                   "suite_options": {k: v for k, v in suite_options.items() if _jsonable(v)}},
        "data": {"n": len(samples), "fingerprint": _data_fingerprint(samples),
                 "source": data or (getattr(suite_obj, "definition", {}) or {}).get("source", "suite default")},
        "metrics": per_effort,
        "warnings": warnings,
        "run": {"started": datetime.fromtimestamp(started, timezone.utc).isoformat(),
                "seconds": round(time.time() - started, 3), **counts, "versions": _versions()},
    }
    if out_dir is not None:
        write_results(out_dir, results, records)
        if report:
            from gptoss_train.eval.report import write_report

            write_report(out_dir, results, records, Path(out_dir) / REPORT_FILE)
    return results


def _record(result: SampleResult, effort: str) -> dict:
    record = asdict(result)
    record["effort"] = effort
    return record


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs):
        return 0

    def update(self, *args, **kwargs):
        pass


def _progress(enabled: bool):
    if not enabled:
        return _NoProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), transient=False)
