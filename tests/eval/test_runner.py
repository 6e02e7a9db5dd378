"""Runner: result files, effort sweep, cache/resume (including a real SIGKILL mid-run), report and compare."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gptoss_train.eval import run_suite
from gptoss_train.eval.backends.oracle import FunctionBackend, OracleBackend, canned_turn
from gptoss_train.eval.cache import SampleCache
from gptoss_train.eval.core import FAILURE_KINDS, get_suite

REPO = Path(__file__).resolve().parents[2]


class CountingOracle(OracleBackend):
    def __init__(self, suite):
        super().__init__(suite)
        self.calls = []

    def generate(self, request):
        self.calls.append((request.sample_id, request.reasoning_effort))
        return super().generate(request)


def test_result_files_and_effort_sweep(tmp_path):
    results = run_suite("math500", model="oracle", data="bundled", effort="low,high", out_dir=tmp_path,
                        progress=False)
    assert set(results["metrics"]) == {"low", "high"}
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["metrics"] == json.loads(json.dumps(results["metrics"]))
    assert on_disk["data"]["fingerprint"] and on_disk["data"]["n"] == 6
    assert on_disk["config"]["generation"]["low"]["reasoning_effort"] == "low"
    assert on_disk["model"]["backend"] == "oracle"
    ci = on_disk["metrics"]["low"]["score_ci"]
    assert ci["ci_method"] == "wilson" and 0.5 < ci["ci95"][0] < 1.0 and ci["ci95"][1] == pytest.approx(1.0)
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and {r["effort"] for r in rows} == {"low", "high"}
    row = rows[0]
    for key in ("prompt_hash", "output", "final", "analysis", "tool_calls", "finish_reason"):
        assert key in row["details"]
    assert "<|channel|>final<|message|>" in row["details"]["output"]
    assert row["failure"] is None or row["failure"] in FAILURE_KINDS
    # low and high prompts differ (the effort is in the system message), so their hashes differ
    hashes = {(r["id"], r["effort"]): r["details"]["prompt_hash"] for r in rows}
    assert hashes[(row["id"], "low")] != hashes[(row["id"], "high")]
    html = (tmp_path / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "<svg" in html and "Score vs reasoning effort" in html


def test_rerun_uses_cache_and_changed_settings_miss_it(tmp_path):
    suite = get_suite("gsm8k")
    backend = CountingOracle(suite)
    run_suite(suite, model=backend, data="bundled", out_dir=tmp_path, progress=False)
    assert len(backend.calls) == 6
    backend.calls.clear()
    results = run_suite(suite, model=backend, data="bundled", out_dir=tmp_path, progress=False)
    assert backend.calls == [] and results["run"]["cached"] == 6 and results["metrics"]["medium"]["score"] == 1.0
    run_suite(suite, model=backend, data="bundled", out_dir=tmp_path, progress=False, max_tokens=123)
    assert len(backend.calls) == 6  # a different budget is a different experiment
    backend.calls.clear()
    run_suite(suite, model=backend, data="bundled", out_dir=tmp_path, progress=False, resume=False)
    assert len(backend.calls) == 6


def test_cache_ignores_a_torn_last_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    with SampleCache(path) as cache:
        cache.put("a", {"score": 1})
        cache.put("b", {"score": 0})
    with open(path, "a") as handle:
        handle.write('{"key": "c", "record": {"sco')  # what a SIGKILL mid-write leaves
    with SampleCache(path) as cache:
        assert len(cache) == 2 and cache.ignored_lines == 1 and "c" not in cache
        cache.put("c", {"score": 1})
    with SampleCache(path) as cache:
        assert len(cache) == 3 and cache.get("c") == {"score": 1}


WORKER = textwrap.dedent("""
    import os, sys, time
    from gptoss_train.eval import run_suite
    from gptoss_train.eval.backends.oracle import OracleBackend
    from gptoss_train.eval.core import get_suite

    out_dir, calls_path, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])

    class SlowCountingOracle(OracleBackend):
        def generate(self, request):
            with open(calls_path, "a") as handle:
                handle.write(f"{request.sample_id} {request.reasoning_effort}\\n")
                handle.flush()
                os.fsync(handle.fileno())
            time.sleep(delay)
            return super().generate(request)

    suite = get_suite("gsm8k")
    run_suite(suite, model=SlowCountingOracle(suite), data="bundled", effort="low,medium", out_dir=out_dir,
              progress=False)
    print("FINISHED")
""")


def _calls(path):
    return path.read_text().splitlines() if path.exists() else []


def test_sigkill_mid_run_then_resume_does_not_redo_cached_samples(tmp_path):
    out_dir, first_calls, second_calls = tmp_path / "run", tmp_path / "calls1", tmp_path / "calls2"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    worker = [sys.executable, "-c", WORKER, str(out_dir)]
    process = subprocess.Popen(worker + [str(first_calls), "0.4"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while len(_calls(first_calls)) < 5 and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]

    cached = [json.loads(line) for line in (out_dir / "cache.jsonl").read_text().splitlines() if line.strip()]
    cached_ids = {(r["record"]["id"], r["record"]["effort"]) for r in cached}
    assert 4 <= len(cached) < 12  # killed mid-run, after several samples were done
    assert not (out_dir / "results.json").exists()

    finished = subprocess.run(worker + [str(second_calls), "0"], env=env, capture_output=True, text=True, timeout=120)
    assert "FINISHED" in finished.stdout, finished.stderr[-2000:]
    redone = {tuple(line.split()) for line in _calls(second_calls)}
    assert len(redone) == 12 - len(cached)  # exactly the samples not in the cache
    assert not redone & cached_ids
    results = json.loads((out_dir / "results.json").read_text())
    assert results["metrics"]["low"]["score"] == 1.0 and results["metrics"]["medium"]["score"] == 1.0
    assert results["run"]["cached"] == len(cached)


def test_compare_reports_flips_and_significance(tmp_path):
    suite = get_suite("gsm8k")
    samples = suite.samples(data="bundled")
    gold = {s.id: s.data["answer"] for s in samples}
    ids = sorted(gold)

    def answering(correct_ids):
        return FunctionBackend(lambda r: canned_turn(
            final=f"\\boxed{{{gold[r.sample_id] if r.sample_id in correct_ids else -1}}}"))

    run_suite(suite, model=answering(set(ids[:2])), data="bundled", out_dir=tmp_path / "base", progress=False)
    run_suite(suite, model=answering(set(ids[1:])), data="bundled", out_dir=tmp_path / "tuned", progress=False)
    from gptoss_train.eval.report import compare_runs, render_compare

    comparison = compare_runs(tmp_path / "base", tmp_path / "tuned")
    medium = comparison["efforts"]["medium"]
    assert medium["fixed"] == ids[2:] and medium["broken"] == ids[:1]
    assert medium["base_score"] == pytest.approx(2 / 6) and medium["tuned_score"] == pytest.approx(5 / 6)
    assert medium["mcnemar_p"] == pytest.approx(0.375)  # 4 fixed vs 1 broken: 2 * P(X <= 1 | n=5)
    assert medium["paired_bootstrap"]["delta"] == pytest.approx(0.5)
    html = render_compare(comparison)
    assert ids[2] in html and "McNemar" in html
