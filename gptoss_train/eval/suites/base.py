"""Shared machinery of our suites: building requests from run options, batched single-turn scoring, and the
classification of a turn that produced no usable answer into core.FAILURE_KINDS."""

from __future__ import annotations

import abc
from typing import Any

from gptoss_train.eval.core import GenerationRequest, GenerationResult, Sample, SampleResult, Suite
from gptoss_train.eval.definitions import DefinitionError, load_definition
from gptoss_train.eval.harmony_io import prompt_hash

EFFORTS = ("low", "medium", "high")


def make_request(suite: Suite, sample: Sample, messages: list[dict], options: dict,
                 tools: list[dict] | None = None, max_tokens: int | None = None) -> GenerationRequest:
    """A request carrying the run's generation settings (effort, sampling, budget, seed)."""
    return GenerationRequest(
        messages=messages,
        tools=tools,
        reasoning_effort=options.get("reasoning_effort", "medium"),
        developer_instructions=options.get("developer_instructions"),
        max_tokens=int(max_tokens or options.get("max_tokens") or 4096),
        temperature=float(options.get("temperature", 1.0)),
        top_p=float(options.get("top_p", 1.0)),
        seed=options.get("seed"),
        suite=suite.name,
        sample_id=sample.id,
    )


def turn_record(request: GenerationRequest, result: GenerationResult) -> dict:
    """What samples.jsonl keeps of one generated turn."""
    return {
        "prompt_hash": prompt_hash(request),
        "output": result.text,
        "final": result.final,
        "analysis": result.analysis,
        "tool_calls": result.tool_calls,
        "finish_reason": result.finish_reason,
        "usage": result.usage,
        "error": result.error,
    }


def unusable_turn_failure(result: GenerationResult, *, expects_final: bool = True) -> str | None:
    """The failure kind of a turn that has no answer to grade, or None when it can be graded."""
    if result.finish_reason == "error":
        return "backend_error"
    if expects_final and result.final is None:
        if result.finish_reason == "truncated":
            return "truncated"
        if result.error:
            return "parse_error"
        return "no_final"
    return None


class DefinedSuite(Suite):
    """A suite described by ``evals/<name>/suite.yaml`` (description, source, token budgets per effort)."""

    @property
    def definition(self) -> dict:
        """The parsed suite.yaml, read once; empty when this installation has no evals/ folder."""
        if self.__dict__.get("_definition") is None:
            try:
                self.__dict__["_definition"] = load_definition(self.name)
            except DefinitionError:
                self.__dict__["_definition"] = {}
        return self.__dict__["_definition"]

    def recommended_max_tokens(self, effort: str) -> int | None:
        return (self.definition.get("max_tokens") or {}).get(effort)


class BatchedSuite(DefinedSuite):
    """A suite whose samples can be generated together (the local backend batches, servers run concurrently).

    The runner calls ``run_batch`` when a suite has it; ``run_sample`` stays available for single samples.
    """

    def run_sample(self, sample: Sample, backend, **options: Any) -> SampleResult:
        return self.run_batch([sample], backend, **options)[0]

    @abc.abstractmethod
    def run_batch(self, samples: list[Sample], backend, **options: Any) -> list[SampleResult]: ...


class SingleTurnSuite(BatchedSuite):
    """One request per sample, graded on the final channel."""

    @abc.abstractmethod
    def build_request(self, sample: Sample, **options: Any) -> GenerationRequest: ...

    @abc.abstractmethod
    def grade(self, sample: Sample, final: str) -> tuple[bool, dict]:
        """(correct, details) from the final-channel text only."""

    def run_batch(self, samples: list[Sample], backend, **options: Any) -> list[SampleResult]:
        requests = [self.build_request(sample, **options) for sample in samples]
        results = backend.generate_batch(requests)
        return [self.score(sample, request, result) for sample, request, result in zip(samples, requests, results)]

    def score(self, sample: Sample, request: GenerationRequest, result: GenerationResult) -> SampleResult:
        details = turn_record(request, result)
        failure = unusable_turn_failure(result)
        if failure is not None:
            return SampleResult(id=sample.id, score=0.0, passed=False, failure=failure, details=details)
        correct, grading = self.grade(sample, result.final)
        details.update(grading)
        return SampleResult(id=sample.id, score=1.0 if correct else 0.0, passed=correct,
                            failure=None if correct else "wrong_answer", details=details)
