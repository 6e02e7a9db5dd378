"""Multi-turn suites on a batching backend: concurrent sample threads' turns are sent as batches."""

import threading
import time

from gptoss_train.eval import run_suite
from gptoss_train.eval.backends.oracle import canned_turn
from gptoss_train.eval.batching import MicroBatchingBackend
from gptoss_train.eval.core import Backend, GenerationRequest, Sample, SampleResult, Suite


class RecordingBatchBackend(Backend):
    """Stands in for the local backend: has a batch_size, echoes the sample id, records batch sizes."""

    name = "recording"

    def __init__(self, batch_size):
        self.batch_size = batch_size
        self.batches = []
        self._lock = threading.Lock()

    def generate_batch(self, requests):
        with self._lock:
            self.batches.append(len(requests))
        time.sleep(0.02)  # generation takes time: the other threads' turns queue up meanwhile
        return [canned_turn(final=f"{r.sample_id}:{len(r.messages)}") for r in requests]

    def generate(self, request):
        return self.generate_batch([request])[0]


class ThreeTurnSuite(Suite):
    name = "three-turns"

    def samples(self, **_):
        return [Sample(id=f"s{i}", data={}) for i in range(10)]

    def run_sample(self, sample, backend, **options):
        messages = [{"role": "user", "content": "go"}]
        for turn in range(3):
            result = backend.generate(GenerationRequest(messages=list(messages), sample_id=sample.id))
            assert result.final == f"{sample.id}:{len(messages)}"  # each thread gets its own answer back
            messages += [{"role": "assistant", "content": result.final}, {"role": "user", "content": "again"}]
        return SampleResult(id=sample.id, score=1.0, passed=True)


def test_turns_of_concurrent_samples_are_batched(tmp_path):
    backend = RecordingBatchBackend(batch_size=4)
    results = run_suite(ThreeTurnSuite(), model=backend, out_dir=tmp_path, progress=False)
    assert results["metrics"]["medium"]["score"] == 1.0 and results["metrics"]["medium"]["n"] == 10
    assert sum(backend.batches) == 30  # every turn generated exactly once
    assert max(backend.batches) > 1 and max(backend.batches) <= 4
    assert len(backend.batches) < 30


def test_errors_reach_the_waiting_thread():
    class Failing(RecordingBatchBackend):
        def generate_batch(self, requests):
            raise RuntimeError("device lost")

    batcher = MicroBatchingBackend(Failing(2), max_batch=2, max_wait_s=0.01)
    try:
        batcher.generate(GenerationRequest(messages=[{"role": "user", "content": "x"}]))
    except RuntimeError as exc:
        assert "device lost" in str(exc)
    else:
        raise AssertionError("the backend error was swallowed")
