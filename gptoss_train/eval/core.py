"""The evaluation contract: what a backend answers, what a suite asks, what a sample result records.

Every backend (local transformers, OpenAI-compatible server, llama.cpp in process, the ``oracle`` self-test) turns a
:class:`GenerationRequest` into a :class:`GenerationResult`. Every suite yields :class:`Sample` s and scores one sample
at a time with a backend (multi-turn suites such as tau-bench call the backend once per agent turn), so the runner can
cache per sample and resume after a crash.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

# Failure kinds recorded per sample; reports break results down by them (DESIGN.md §4: "no final answer" is counted
# separately from a wrong answer, so models that reason forever are visible).
FAILURE_KINDS = (
    "no_final",  # the turn ended (or was cut) without a final-channel message
    "truncated",  # max_tokens reached
    "parse_error",  # the completion is not valid Harmony / tool arguments are not valid JSON
    "wrong_tool",  # called a tool that does not exist or not the expected one
    "wrong_arguments",
    "wrong_answer",
    "backend_error",  # the server failed after its retries
)


@dataclass
class GenerationRequest:
    """One assistant turn to generate. ``messages`` and ``tools`` are OpenAI chat form (see harmony.conversation)."""

    messages: list[dict]
    tools: list[dict] | None = None
    reasoning_effort: str | None = "medium"
    developer_instructions: str | None = None
    max_tokens: int = 4096
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    # Who is asking: lets the oracle backend find the gold answer, and caches key on it.
    suite: str = ""
    sample_id: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class GenerationResult:
    """What the model produced for one turn, parsed once with the shared Harmony parser."""

    text: str  # the raw completion (Harmony text where the backend gives tokens, else the server's content)
    final: str | None  # final-channel content, None when the turn has none
    analysis: str | None
    tool_calls: list[dict]  # [{"name": str, "arguments": str (JSON), "parsed_arguments": dict | None}]
    finish_reason: str  # "return" | "call" | "truncated" | "error"
    tokens: list[int] | None = None
    usage: dict = field(default_factory=dict)  # prompt_tokens, completion_tokens, seconds
    error: str | None = None


class Backend(abc.ABC):
    """Generates assistant turns. Subclasses may batch: ``generate_batch`` defaults to a loop."""

    name: str = "backend"

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> GenerationResult: ...

    def generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        return [self.generate(request) for request in requests]

    def describe(self) -> dict:
        """Identity recorded in results (model path/URL, adapter, hashes, settings)."""
        return {"backend": self.name}


@dataclass
class Sample:
    id: str
    data: dict


@dataclass
class SampleResult:
    id: str
    score: float  # 0..1
    passed: bool
    failure: str | None = None  # one of FAILURE_KINDS, or None when passed
    details: dict = field(default_factory=dict)  # suite-specific: parsed final, tool calls, trajectory, ...


class Suite(abc.ABC):
    """A benchmark: its samples, how one sample is run and scored, and how results aggregate."""

    name: str = "suite"

    @abc.abstractmethod
    def samples(self, **options: Any) -> Iterable[Sample]: ...

    @abc.abstractmethod
    def run_sample(self, sample: Sample, backend: Backend, **options: Any) -> SampleResult: ...

    def aggregate(self, results: list[SampleResult]) -> dict:
        """Default metrics: mean score and pass rate."""
        n = len(results)
        return {
            "n": n,
            "score": sum(r.score for r in results) / n if n else 0.0,
            "pass_rate": sum(r.passed for r in results) / n if n else 0.0,
        }

    def oracle(self, sample: Sample) -> Backend:
        """A backend that answers this sample with the gold answer/actions (the ``--model oracle`` self-test)."""
        raise NotImplementedError(f"suite {self.name!r} has no oracle")


_SUITES: dict[str, Callable[[], Suite]] = {}


def register_suite(name: str, factory: Callable[[], Suite]) -> None:
    _SUITES[name] = factory


def get_suite(name: str) -> Suite:
    if name not in _SUITES:
        # Suites register on import of gptoss_train.eval.suites.
        import gptoss_train.eval.suites  # noqa: F401
    if name not in _SUITES:
        known = ", ".join(sorted(_SUITES)) or "none"
        raise KeyError(f"unknown suite {name!r}; known suites: {known}")
    return _SUITES[name]()


def suite_names() -> list[str]:
    import gptoss_train.eval.suites  # noqa: F401

    return sorted(_SUITES)
