"""``bfcl``: BFCL v4 single-turn function calling (Python categories, live included), graded by AST checking.

Options (keyword, optional):
  categories="all"    comma list or list of categories / groups: all, non_live, live, ast, simple, multiple,
                      parallel, parallel_multiple, irrelevance, live_simple, live_multiple, live_parallel,
                      live_parallel_multiple, live_irrelevance, live_relevance
  per_category=None   take the first N entries of each category; limit=N caps the total
  sequential_calls=1  generations per entry: >1 lets a model that makes one call per message (gpt-oss) make
                      parallel calls one after another, each answered with a placeholder result
  reasoning_effort="medium", temperature=1.0, top_p=1.0, max_tokens=4096, seed=0

Multi-turn, Java, JavaScript and the agentic BFCL v4 categories are not graded here (see evals/bfcl/README.md).
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from typing import Any

from gptoss_train.eval.bfcl.checker import Verdict, check_entry
from gptoss_train.eval.bfcl.data import load_category, resolve_categories
from gptoss_train.eval.bfcl.gold import gold_calls
from gptoss_train.eval.bfcl.schema import sanitize_name, to_openai_tools
from gptoss_train.eval.core import (Backend, GenerationRequest, GenerationResult, Sample, SampleResult,
                                    register_suite)
from gptoss_train.eval.suites.base import DefinedSuite


def _entry(sample: Sample) -> dict:
    category, entry_id = sample.data["category"], sample.data["id"]
    return next(entry for entry in load_category(category) if entry["id"] == entry_id)


def build_request(entry: dict, *, reasoning_effort: str | None = "medium", temperature: float = 1.0,
                  top_p: float = 1.0, max_tokens: int = 4096, seed: int | None = 0,
                  sample_id: str = "") -> tuple[GenerationRequest, dict[str, str]]:
    """The first turn of the entry as a request; BFCL's system messages become developer instructions (Harmony's
    place for them), the functions become OpenAI tools."""
    turn = entry["question"][0]
    system = [m["content"] for m in turn if m.get("role") == "system" and m.get("content")]
    messages = [{"role": m["role"], "content": m["content"]} for m in turn if m.get("role") != "system"]
    tools, name_map = to_openai_tools(entry["function"])
    request = GenerationRequest(
        messages=messages, tools=tools, developer_instructions="\n\n".join(system) or None,
        reasoning_effort=reasoning_effort, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
        suite="bfcl", sample_id=sample_id, extra={"category": entry["category"]},
    )
    return request, name_map


def decode_calls(result: GenerationResult, name_map: dict[str, str]) -> tuple[list[dict] | None, str | None]:
    """Tool calls -> BFCL's ``[{name: params}]`` (names mapped back). None, with the reason, when the answer has no
    decodable calls: BFCL's FC decoder fails on a text answer and on arguments that are not JSON."""
    if not result.tool_calls:
        return None, "no function call"
    calls = []
    for call in result.tool_calls:
        arguments = call.get("parsed_arguments")
        if arguments is None:
            try:
                arguments = json.loads(call.get("arguments") or "")
            except (json.JSONDecodeError, TypeError) as exc:
                return None, f"arguments of {call.get('name')!r} are not JSON: {exc}"
        name = call.get("name", "")
        calls.append({name_map.get(name, name): arguments})
    return calls, None


def _failure(verdict: Verdict, result: GenerationResult, decode_error: str | None) -> str | None:
    if verdict.valid:
        return None
    if result.finish_reason == "error":  # the backend failed; result.error alone is a Harmony parse problem
        return "backend_error"
    if result.finish_reason == "truncated" and not result.tool_calls:
        return "truncated"
    if (decode_error and result.tool_calls) or (result.error and not result.tool_calls):
        return "parse_error"
    kind = verdict.error_type or ""
    if any(tag in kind for tag in ("wrong_func_name", "wrong_count", "cannot_find_match", "relevance", "decoder")):
        return "wrong_tool"
    return "wrong_arguments"


PLACEHOLDER_RESULT = '{"status": "recorded"}'


def _continued(request: GenerationRequest, result: GenerationResult, step: int) -> GenerationRequest:
    """The request after ``result``'s tool calls, each answered with a placeholder (for ``sequential_calls``)."""
    messages = list(request.messages)
    calls = [{"id": f"call_{step}_{i}", "type": "function",
              "function": {"name": c.get("name", ""), "arguments": c.get("arguments") or "{}"}}
             for i, c in enumerate(result.tool_calls)]
    assistant = {"role": "assistant", "content": None, "tool_calls": calls}
    if result.analysis:
        assistant["thinking"] = result.analysis
    messages.append(assistant)
    messages += [{"role": "tool", "tool_call_id": c["id"], "name": c["function"]["name"],
                  "content": PLACEHOLDER_RESULT} for c in calls]
    return dataclasses.replace(request, messages=messages, extra={**request.extra, "step": step})


class BfclOracle(Backend):
    """Answers one entry with its gold calls (first accepted values); (ir)relevance: no call / a call."""

    name = "oracle"

    def __init__(self, entry: dict):
        self.entry = entry

    def generate(self, request: GenerationRequest) -> GenerationResult:
        category = self.entry["category"]
        if "irrelevance" in category:
            text = "None of the available functions can answer this."
            return GenerationResult(text=text, final=text, analysis=None, tool_calls=[], finish_reason="return")
        if "relevance" in category:  # live_relevance has no possible answer: any call to a given function counts
            function = self.entry["function"][0]
            calls = [{function["name"]: {}}]
        else:
            calls = gold_calls(self.entry["ground_truth"], self.entry["function"])
        tool_calls = []
        for call in calls:
            name, arguments = next(iter(call.items()))
            text = json.dumps(arguments)
            tool_calls.append({"name": sanitize_name(name), "arguments": text, "parsed_arguments": arguments})
        return GenerationResult(text=json.dumps(calls), final=None, analysis=None, tool_calls=tool_calls,
                                finish_reason="call")

    def describe(self) -> dict:
        return {"backend": "oracle", "suite": "bfcl", "entry": self.entry["id"]}


def _check_data_option(data) -> None:
    # The real data ships in the bfcl-eval wheel and is always local: there is no other file to point at.
    if data not in (None, "default", "bundled"):
        raise ValueError(f"--data {data}: this suite reads the real data from the installed 'bfcl-eval' package; "
                         "leave --data out")


class BfclSuite(DefinedSuite):
    name = "bfcl"

    def samples(self, *, categories="all", per_category: int | None = None, limit: int | None = None,
                data: str | None = None, **_: Any) -> list[Sample]:
        _check_data_option(data)
        per_category = None if per_category is None else int(per_category)  # --option per_category=N is a string
        samples = []
        for category in resolve_categories(categories):
            entries = load_category(category)
            if per_category is not None:
                entries = entries[:per_category]
            samples += [Sample(id=entry["id"], data={"category": category, "id": entry["id"]}) for entry in entries]
        return samples[:limit] if limit is not None else samples

    def oracle(self, sample: Sample) -> Backend:
        return BfclOracle(_entry(sample))

    def run_sample(self, sample: Sample, backend: Backend, *, reasoning_effort: str | None = "medium",
                   temperature: float = 1.0, top_p: float = 1.0, max_tokens: int = 4096, seed: int | None = 0,
                   sequential_calls: int = 1, **_: Any) -> SampleResult:
        entry = _entry(sample)
        request, name_map = build_request(entry, reasoning_effort=reasoning_effort, temperature=temperature,
                                          top_p=top_p, max_tokens=max_tokens, seed=seed, sample_id=sample.id)
        result = backend.generate(request)
        responses = [result]
        # gpt-oss ends its turn at each tool call (<|call|> is a stop token), so it can only make "parallel" calls
        # one after another. sequential_calls > 1 lets it: each call gets a placeholder result and the model is
        # asked again, until it stops calling. Off by default: BFCL grades the first response only.
        while result.tool_calls and len(responses) < int(sequential_calls):
            request = _continued(request, result, len(responses))
            result = backend.generate(request)
            responses.append(result)
        merged = GenerationResult(
            text="".join(r.text for r in responses), final=responses[-1].final, analysis=responses[-1].analysis,
            tool_calls=[call for r in responses for call in r.tool_calls],
            finish_reason=next((r.finish_reason for r in responses if r.finish_reason == "error"),
                               responses[-1].finish_reason),
            error=next((r.error for r in responses if r.error), None))
        calls, decode_error = decode_calls(merged, name_map)
        verdict = check_entry(entry, calls)
        details = {
            "category": entry["category"],
            "calls": calls,
            "decode_error": decode_error,
            "error_type": verdict.error_type,
            "errors": verdict.errors,
            "final": merged.final,
            "tool_calls": merged.tool_calls,
            "finish_reason": merged.finish_reason,
            "generations": len(responses),
            "backend_error": merged.error,
        }
        return SampleResult(sample.id, 1.0 if verdict.valid else 0.0, verdict.valid,
                            _failure(verdict, merged, decode_error), details)

    def aggregate(self, results: list[SampleResult]) -> dict:
        metrics = super().aggregate(results)
        by_category: dict[str, list[bool]] = defaultdict(list)
        for result in results:
            by_category[result.details.get("category", "?")].append(result.passed)
        metrics["categories"] = {name: {"n": len(v), "accuracy": sum(v) / len(v)} for name, v in by_category.items()}
        # BFCL's summary rows are unweighted means over categories, not over entries.
        metrics["category_mean"] = (sum(c["accuracy"] for c in metrics["categories"].values())
                                    / len(metrics["categories"])) if metrics["categories"] else 0.0
        errors = defaultdict(int)
        for result in results:
            if not result.passed:
                errors[result.details.get("error_type") or "unknown"] += 1
        metrics["error_types"] = dict(errors)
        return metrics


register_suite("bfcl", BfclSuite)
