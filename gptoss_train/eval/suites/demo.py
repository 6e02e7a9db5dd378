"""The ``demo`` suite: tool use on the bundled demo conversations, small enough to show before/after on a CPU.

Per conversation (OpenAI chat form with tools; ``gptoss_train.data.demo.load_demo_split("test")``):

1. prompt = the conversation up to its first assistant turn; the model must make the gold FIRST TOOL CALL
   (same function name, JSON-equal arguments);
2. if it did, we feed the gold tool result(s) that follow in the conversation and generate the second turn; its
   final-channel answer must match the gold final answer (whitespace- and case-normalised exact match).

A conversation whose first assistant turn is a plain answer (no tool) is scored on that answer alone.
Metrics: ``tool_call_accuracy`` (step 1), ``final_accuracy`` (step 2, over samples that reached it), ``score``
(both steps right). Both steps are batched across samples so the quickstart runs in seconds on a tiny model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from gptoss_train.eval.core import Sample, SampleResult, register_suite
from gptoss_train.eval.suites.base import BatchedSuite, make_request, turn_record, unusable_turn_failure
from gptoss_train.eval.suites.reasoning import DataUnavailableError, read_rows

# The demo is about the tool call and a short answer: small default budget keeps the CPU quickstart fast.
DEFAULT_MAX_TOKENS = 256


def _normalise_text(text: str | None) -> str:
    return " ".join((text or "").split()).casefold()


def _arguments(call: dict) -> Any:
    """Arguments of an OpenAI-form or parsed tool call as a Python value (JSON-equal comparison)."""
    if "function" in call:
        call = call["function"]
    parsed = call.get("parsed_arguments")
    if parsed is not None:
        return parsed
    arguments = call.get("arguments")
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return arguments


def _name(call: dict) -> str:
    return (call.get("function") or call).get("name", "")


class DemoSuite(BatchedSuite):
    """Tool use on the bundled demo conversations: first tool call exact match, then the final answer."""

    name = "demo"
    # Greedy and short unless the caller says otherwise: the quickstart compares two tiny models on CPU.
    default_options = {"temperature": 0.0, "max_tokens": DEFAULT_MAX_TOKENS}

    def samples(self, *, data: str | None = None, **_: Any) -> Iterable[Sample]:
        if data and data != "bundled":
            rows = read_rows(Path(data))
        else:
            try:
                from gptoss_train.data.demo import load_demo_split
            except ImportError as exc:
                raise DataUnavailableError(
                    "the bundled demo data (gptoss_train.data.demo) is not available; pass --data FILE.jsonl "
                    "with OpenAI-chat tool-use conversations"
                ) from exc
            rows = list(load_demo_split("test"))
        samples = []
        for index, row in enumerate(rows):
            sample = self._sample_from_conversation(row, index)
            if sample is not None:
                samples.append(sample)
        if not samples:
            raise DataUnavailableError("demo: no conversation with a user turn followed by an assistant turn")
        return samples

    def _sample_from_conversation(self, row: dict, index: int) -> Sample | None:
        messages = row.get("messages") if isinstance(row, dict) else None
        if not messages:
            raise DataUnavailableError(f"demo row {index}: no 'messages' list")
        first = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), None)
        if first is None or first == 0:
            return None
        gold_turn = messages[first]
        data = {"prompt": messages[:first], "tools": row.get("tools"), "gold_turn": gold_turn}
        tool_calls = gold_turn.get("tool_calls") or []
        if tool_calls:
            data["gold_call"] = {"name": _name(tool_calls[0]), "arguments": _arguments(tool_calls[0])}
            # gold tool results follow the call; then the next assistant message with content is the gold answer
            after = first + 1
            results = []
            while after < len(messages) and messages[after].get("role") == "tool":
                results.append(messages[after])
                after += 1
            if results and after < len(messages) and messages[after].get("role") == "assistant" \
                    and messages[after].get("content") and not messages[after].get("tool_calls"):
                data["tool_results"] = results
                data["gold_final"] = messages[after]["content"]
        else:
            data["gold_final"] = gold_turn.get("content") or ""
        sample_id = str(row.get("id") or f"demo-{index}")
        return Sample(id=sample_id, data=data)

    # ------------------------------------------------------------------ running
    def run_batch(self, samples: list[Sample], backend, **options: Any) -> list[SampleResult]:
        first_requests = [make_request(self, s, list(s.data["prompt"]), options, tools=s.data["tools"])
                          for s in samples]
        first_results = backend.generate_batch(first_requests)
        outcomes: dict[str, SampleResult] = {}
        second: list[tuple[Sample, dict]] = []
        for sample, request, result in zip(samples, first_requests, first_results):
            details = {"turns": [turn_record(request, result)], "tool_call_correct": None, "final_correct": None}
            outcome = SampleResult(id=sample.id, score=0.0, passed=False, details=details)
            outcomes[sample.id] = outcome
            gold_call = sample.data.get("gold_call")
            if gold_call is None:  # plain answer expected
                failure = unusable_turn_failure(result)
                correct = failure is None and _normalise_text(result.final) == _normalise_text(sample.data["gold_final"])
                details["final_correct"] = correct
                outcome.failure = failure or (None if correct else "wrong_answer")
                outcome.score, outcome.passed = float(correct), correct
                continue
            failure = unusable_turn_failure(result, expects_final=False)
            if failure is None:
                failure = self._check_call(result.tool_calls, gold_call)
            details["tool_call_correct"] = failure is None
            if failure is not None:
                outcome.failure = failure
                continue
            if "gold_final" not in sample.data:
                outcome.score, outcome.passed = 1.0, True
                continue
            details["gold_final"] = sample.data["gold_final"]
            second.append((sample, self._second_turn_messages(sample)))
        if second:
            second_requests = [make_request(self, s, messages, options, tools=s.data["tools"])
                               for s, messages in second]
            second_results = backend.generate_batch(second_requests)
            for (sample, _), request, result in zip(second, second_requests, second_results):
                outcome = outcomes[sample.id]
                outcome.details["turns"].append(turn_record(request, result))
                failure = unusable_turn_failure(result)
                correct = failure is None and _normalise_text(result.final) == _normalise_text(sample.data["gold_final"])
                outcome.details["final_correct"] = correct
                outcome.failure = failure or (None if correct else "wrong_answer")
                outcome.score, outcome.passed = float(correct), correct
        return [outcomes[s.id] for s in samples]

    @staticmethod
    def _check_call(tool_calls: list[dict], gold_call: dict) -> str | None:
        if not tool_calls:
            return "wrong_tool"
        call = tool_calls[0]
        if call["name"] != gold_call["name"]:
            return "wrong_tool"
        if call.get("parsed_arguments") is None:
            try:
                arguments = json.loads(call["arguments"])
            except (json.JSONDecodeError, TypeError):
                return "parse_error"
        else:
            arguments = call["parsed_arguments"]
        return None if arguments == gold_call["arguments"] else "wrong_arguments"

    @staticmethod
    def _second_turn_messages(sample: Sample) -> list[dict]:
        gold_turn = dict(sample.data["gold_turn"])
        # The gold call as the model's own previous turn; its reasoning is dropped as Harmony does between turns.
        for key in ("thinking", "reasoning", "reasoning_content"):
            gold_turn.pop(key, None)
        return list(sample.data["prompt"]) + [gold_turn] + list(sample.data["tool_results"])

    def aggregate(self, results: list[SampleResult]) -> dict:
        metrics = super().aggregate(results)
        calls = [r.details.get("tool_call_correct") for r in results if r.details.get("tool_call_correct") is not None]
        finals = [r.details.get("final_correct") for r in results if r.details.get("final_correct") is not None]
        metrics["tool_call_accuracy"] = sum(calls) / len(calls) if calls else None
        metrics["final_accuracy"] = sum(finals) / len(finals) if finals else None
        return metrics

    def oracle(self, sample: Sample):
        """Gold call on the first turn, gold answer once the tool result is in the conversation (stateless, so the
        same oracle serves every effort of a sweep)."""
        from gptoss_train.eval.backends.oracle import FunctionBackend, canned_turn

        def respond(request):
            if "gold_call" in sample.data and request.messages[-1].get("role") != "tool":
                call = sample.data["gold_call"]
                return canned_turn(analysis="I should call the tool.",
                                   tool_call={"name": call["name"], "arguments": json.dumps(call["arguments"])})
            return canned_turn(analysis="The tool answered.", final=sample.data.get("gold_final", ""))

        return FunctionBackend(respond)

    def data_fingerprint(self, samples: list[Sample]) -> str:
        payload = json.dumps([[s.id, s.data] for s in samples], sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


register_suite("demo", DemoSuite)
