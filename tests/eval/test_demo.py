"""The demo suite over the bundled demo conversations (gptoss_train.data.demo)."""

import json

import pytest

from gptoss_train.eval import run_suite
from gptoss_train.eval.backends.oracle import FunctionBackend, canned_turn
from gptoss_train.eval.core import get_suite


@pytest.fixture(scope="module")
def demo_samples():
    return {s.id: s for s in get_suite("demo").samples()}


def test_prompt_stops_before_first_assistant_turn(demo_samples):
    sample = next(iter(demo_samples.values()))
    assert [m["role"] for m in sample.data["prompt"]][-1] == "user"
    assert sample.data["gold_call"]["name"]
    assert isinstance(sample.data["gold_call"]["arguments"], dict)
    assert sample.data["gold_final"]


def test_oracle_scores_one_on_both_turns():
    results = run_suite("demo", model="oracle", limit=12, progress=False)
    metrics = results["metrics"]["medium"]
    assert metrics["score"] == 1.0 and metrics["tool_call_accuracy"] == 1.0 and metrics["final_accuracy"] == 1.0
    assert results["config"]["generation"]["medium"]["temperature"] == 0.0  # greedy by default for the demo


def test_wrong_tool_wrong_arguments_and_wrong_answer(demo_samples):
    def wrong_name(request):
        return canned_turn(tool_call={"name": "no_such_tool", "arguments": "{}"})

    metrics = run_suite("demo", model=FunctionBackend(wrong_name), limit=6, progress=False)["metrics"]["medium"]
    assert metrics["score"] == 0.0 and metrics["failures"] == {"wrong_tool": 6}

    def wrong_arguments(request):
        gold = demo_samples[request.sample_id].data["gold_call"]
        arguments = dict(gold["arguments"], extra_field=1)
        return canned_turn(tool_call={"name": gold["name"], "arguments": json.dumps(arguments)})

    metrics = run_suite("demo", model=FunctionBackend(wrong_arguments), limit=6, progress=False)["metrics"]["medium"]
    assert metrics["score"] == 0.0 and metrics["failures"] == {"wrong_arguments": 6}

    def right_call_wrong_answer(request):
        if request.messages[-1]["role"] == "tool":
            return canned_turn(final="I could not find out.")
        gold = demo_samples[request.sample_id].data["gold_call"]
        # same arguments, different key order and spacing: JSON-equal, so correct
        arguments = json.dumps(dict(reversed(list(gold["arguments"].items()))), indent=1)
        return canned_turn(tool_call={"name": gold["name"], "arguments": arguments})

    results = run_suite("demo", model=FunctionBackend(right_call_wrong_answer), limit=6, progress=False)
    metrics = results["metrics"]["medium"]
    assert metrics["tool_call_accuracy"] == 1.0 and metrics["final_accuracy"] == 0.0
    assert metrics["failures"] == {"wrong_answer": 6}


def test_second_turn_gets_the_gold_tool_result(demo_samples):
    seen = []

    def record(request):
        seen.append(request.messages)
        if request.messages[-1]["role"] == "tool":
            return canned_turn(final=demo_samples[request.sample_id].data["gold_final"])
        gold = demo_samples[request.sample_id].data["gold_call"]
        return canned_turn(tool_call={"name": gold["name"], "arguments": json.dumps(gold["arguments"])})

    run_suite("demo", model=FunctionBackend(record), limit=2, progress=False)
    second = [m for m in seen if m[-1]["role"] == "tool"]
    assert len(second) == 2
    assert second[0][-2]["role"] == "assistant" and second[0][-2]["tool_calls"]
    assert "thinking" not in second[0][-2]  # the call's reasoning is dropped between turns
