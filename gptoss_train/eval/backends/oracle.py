"""``--model oracle``: answer every sample with its gold answer/actions, to check the harness itself.

The dispatcher asks the suite for a per-sample oracle (``Suite.oracle(sample)``), so each suite decides what "gold"
means (a final answer, a tool call, a replay of gold actions). Oracles answer through real Harmony completions
(see :func:`canned_turn`) so the shared parser is exercised exactly as with a model.
"""

from __future__ import annotations

import threading

from gptoss_train.eval.core import Backend, GenerationRequest, GenerationResult, Sample, Suite
from gptoss_train.eval.harmony_io import harmony_completion_tokens, result_from_tokens


class OracleBackend(Backend):
    name = "oracle"

    def __init__(self, suite: Suite):
        self.suite = suite
        self._samples: dict[str, Sample] = {}
        self._oracles: dict[str, Backend] = {}
        self._lock = threading.Lock()

    def register(self, samples) -> None:
        """The runner hands over the samples it will run, so a request's ``sample_id`` finds its gold answer."""
        for sample in samples:
            self._samples[sample.id] = sample

    def _oracle_for(self, sample_id: str) -> Backend:
        with self._lock:
            if sample_id not in self._oracles:
                if sample_id not in self._samples:
                    raise KeyError(f"oracle: no sample {sample_id!r} registered for suite {self.suite.name!r}")
                self._oracles[sample_id] = self.suite.oracle(self._samples[sample_id])
            return self._oracles[sample_id]

    def generate(self, request: GenerationRequest) -> GenerationResult:
        return self._oracle_for(request.sample_id).generate(request)

    def describe(self) -> dict:
        return {"backend": "oracle", "model": "oracle", "suite": self.suite.name}


def canned_turn(*, final: str | None = None, analysis: str | None = None, tool_call: dict | None = None):
    """A GenerationResult parsed from the Harmony completion a perfect model would emit."""
    return result_from_tokens(harmony_completion_tokens(final=final, analysis=analysis, tool_call=tool_call))


class ScriptedBackend(Backend):
    """Answers each turn with the next canned result from a list (used by per-sample oracles and tests)."""

    name = "scripted"

    def __init__(self, turns):
        self._turns = list(turns)
        self._next = 0

    def generate(self, request: GenerationRequest) -> GenerationResult:
        if self._next >= len(self._turns):
            turn = self._turns[-1]
        else:
            turn = self._turns[self._next]
            self._next += 1
        return turn(request) if callable(turn) else turn


class FunctionBackend(Backend):
    """Answers with ``respond(request) -> GenerationResult``: stateless oracles that look at the conversation so far."""

    name = "function"

    def __init__(self, respond):
        self._respond = respond

    def generate(self, request: GenerationRequest) -> GenerationResult:
        return self._respond(request)
