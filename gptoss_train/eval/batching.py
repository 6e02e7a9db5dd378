"""Batch the turns of multi-turn suites on a local model.

Suites such as tau-bench run one sample per thread and call ``backend.generate`` once per agent turn. On a local
model one turn at a time leaves the GPU idle; :class:`MicroBatchingBackend` gathers the turns that the sample
threads ask for at about the same moment and sends them as one ``generate_batch``. A thread waits at most
``max_wait_s`` for companions, and never for threads that are not currently waiting on a turn count beyond the number
of samples in flight, so a lone straggler is not held back.
"""

from __future__ import annotations

import threading
import time

from gptoss_train.eval.core import Backend, GenerationRequest, GenerationResult


class _Slot:
    __slots__ = ("request", "result", "error")

    def __init__(self, request: GenerationRequest):
        self.request = request
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None


class MicroBatchingBackend(Backend):
    def __init__(self, backend: Backend, *, max_batch: int, max_wait_s: float = 0.05):
        self.backend = backend
        self.name = backend.name
        self.max_batch = max(1, int(max_batch))
        self.max_wait_s = max_wait_s
        self._cond = threading.Condition()
        self._pending: list[_Slot] = []
        self._busy = False
        self._active = 0  # samples in flight (threads that may still ask for a turn)
        self.batches: list[int] = []  # sizes of the batches sent, for tests and logs

    def __getattr__(self, name):  # model, describe-related attributes of the wrapped backend
        return getattr(self.backend, name)

    def sample_started(self) -> None:
        with self._cond:
            self._active += 1

    def sample_finished(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def _ready(self, deadline: float) -> bool:
        wanted = min(self.max_batch, max(1, self._active))
        return len(self._pending) >= wanted or time.monotonic() >= deadline

    def generate(self, request: GenerationRequest) -> GenerationResult:
        slot = _Slot(request)
        with self._cond:
            self._pending.append(slot)
            self._cond.notify_all()
            deadline = time.monotonic() + self.max_wait_s
            while slot.result is None and slot.error is None:
                if not self._busy and self._pending and self._ready(deadline):
                    batch = self._pending[: self.max_batch]
                    del self._pending[: len(batch)]
                    self._busy = True
                    self._cond.release()
                    results, error = None, None
                    try:
                        results = self.backend.generate_batch([s.request for s in batch])
                    except BaseException as exc:  # handed to every waiting thread of this batch
                        error = exc
                    finally:
                        self._cond.acquire()
                    for index, waiting in enumerate(batch):
                        if error is not None:
                            waiting.error = error
                        else:
                            waiting.result = results[index]
                    self.batches.append(len(batch))
                    self._busy = False
                    self._cond.notify_all()
                else:
                    remaining = deadline - time.monotonic()
                    self._cond.wait(timeout=max(0.001, remaining) if remaining > 0 else 0.01)
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]

    def generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        return self.backend.generate_batch(requests)

    def describe(self) -> dict:
        return self.backend.describe()
