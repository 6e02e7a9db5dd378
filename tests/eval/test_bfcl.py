"""The bfcl suite: data loading, OpenAI tool conversion and name mapping, decoding, oracle, failure kinds."""

from __future__ import annotations

import json

import pytest

from gptoss_train.eval.bfcl.data import CATEGORIES, load_category, resolve_categories
from gptoss_train.eval.bfcl.schema import PYTHON_HINT, to_openai_tools
from gptoss_train.eval.core import Backend, GenerationResult, get_suite
from gptoss_train.eval.suites.bfcl import BfclSuite, build_request


def _text(text):
    return GenerationResult(text=text, final=text, analysis=None, tool_calls=[], finish_reason="return")


class Calls(Backend):
    """Answers with fixed tool calls (name as the model would write it, raw argument text)."""

    def __init__(self, calls):
        self.calls, self.requests = calls, []

    def generate(self, request):
        self.requests.append(request)
        return GenerationResult(text="", final=None, analysis=None, finish_reason="call",
                                tool_calls=[{"name": n, "arguments": a, "parsed_arguments": None}
                                            for n, a in self.calls])


def test_categories_load_with_answers():
    sizes = {name: len(load_category(name)) for name in CATEGORIES}
    assert sizes["simple"] == 400 and sizes["multiple"] == 200 and sizes["live_irrelevance"] == 884
    assert sum(sizes.values()) > 3400
    assert resolve_categories("live") == [c for c in CATEGORIES if c.startswith("live_")]
    with pytest.raises(ValueError, match="Java"):
        resolve_categories("simple_java")


def test_tools_follow_the_official_openai_conversion():
    functions = [{"name": "geo.distance", "description": "Distance.", "parameters": {
        "type": "dict", "required": ["points"], "properties": {
            "points": {"type": "array", "items": {"type": "tuple", "items": {"type": "float"}}, "description": "p"},
            "options": {"type": "dict", "description": "o",
                        "properties": {"unit": {"type": "any", "description": "u"}}},
            "scale": {"type": "float", "description": "s"},
            "untyped": {"description": "no type"}}}}]
    tools, name_map = to_openai_tools(functions)
    function = tools[0]["function"]
    assert function["name"] == "geo_distance" and name_map == {"geo_distance": "geo.distance"}
    assert function["description"] == "Distance." + PYTHON_HINT
    properties = function["parameters"]["properties"]
    assert function["parameters"]["type"] == "object"
    assert properties["points"]["items"] == {"type": "array", "items": {"type": "number"}}
    assert properties["options"]["type"] == "object" and properties["options"]["properties"]["unit"]["type"] == "string"
    assert properties["scale"] == {"type": "number", "format": "float", "description": "s This is a float type value."}
    assert properties["untyped"]["type"] == "string"
    assert functions[0]["parameters"]["type"] == "dict"  # the data itself is left alone


def test_system_messages_become_developer_instructions():
    entry = next(e for e in load_category("live_simple") if any(m["role"] == "system" for m in e["question"][0]))
    request, _ = build_request(entry)
    assert request.developer_instructions and all(m["role"] != "system" for m in request.messages)


def test_oracle_passes_every_category():
    suite = get_suite("bfcl")
    samples = suite.samples(per_category=15)
    results = [suite.run_sample(s, suite.oracle(s)) for s in samples]
    metrics = suite.aggregate(results)
    assert metrics["n"] == 15 * len(CATEGORIES) and metrics["score"] == 1.0
    assert set(metrics["categories"]) == set(CATEGORIES)


def test_names_are_mapped_back_before_checking():
    suite = BfclSuite()
    entry = next(e for e in load_category("simple") if "." in e["function"][0]["name"])
    sample = next(s for s in suite.samples(categories="simple") if s.id == entry["id"])
    gold = suite.oracle(sample).generate(build_request(entry)[0])
    backend = Calls([(c["name"], c["arguments"]) for c in gold.tool_calls])
    assert "." not in backend.calls[0][0]
    result = suite.run_sample(sample, backend)
    assert result.passed and "." in next(iter(result.details["calls"][0]))
    assert backend.requests[0].tools[0]["function"]["name"] == backend.calls[0][0]


def test_failure_kinds():
    suite = BfclSuite()
    simple = suite.samples(categories="simple", limit=1)[0]
    irrelevant = suite.samples(categories="irrelevance", limit=1)[0]
    text_only = type("Text", (Backend,), {"generate": lambda self, r: _text("I think it's 25.")})()
    assert suite.run_sample(irrelevant, text_only).passed
    failed = suite.run_sample(simple, text_only)
    assert not failed.passed and failed.failure == "wrong_tool"
    bad_json = suite.run_sample(simple, Calls([("calculate_triangle_area", "{base: 10")]))
    assert bad_json.failure == "parse_error" and bad_json.details["error_type"] == "ast_decoder:decoder_failed"
    # bad JSON decodes to "no call", so it counts as a correct abstention on irrelevance (official behaviour)
    assert suite.run_sample(irrelevant, Calls([("x", "{oops")])).passed
    wrong_value = suite.run_sample(simple, Calls([("calculate_triangle_area", json.dumps({"base": 11, "height": 5}))]))
    assert wrong_value.failure == "wrong_arguments" and wrong_value.details["error_type"] == "value_error:others"
    right = suite.run_sample(simple, Calls([("calculate_triangle_area", json.dumps({"base": 10, "height": 5}))]))
    assert right.passed


def test_requests_render_as_harmony(harmony_encoding):
    from gptoss_train.eval.harmony_io import decode, prompt_tokens

    for category in ("simple", "parallel_multiple", "live_multiple"):
        entry = load_category(category)[3]
        text = decode(prompt_tokens(build_request(entry)[0]))
        assert f"type {to_openai_tools(entry['function'])[0][0]['function']['name']} = " in text


def test_sequential_calls_collect_one_call_per_message():
    suite = BfclSuite()
    sample = next(s for s in suite.samples(categories="parallel") if len(
        next(e for e in load_category("parallel") if e["id"] == s.id)["ground_truth"]) == 2)
    gold = suite.oracle(sample).generate(build_request(next(e for e in load_category("parallel")
                                                            if e["id"] == sample.id))[0]).tool_calls

    class OneAtATime(Backend):
        def __init__(self):
            self.requests = []

        def generate(self, request):
            self.requests.append(request)
            made = sum(len(m.get("tool_calls") or []) for m in request.messages)
            if made < len(gold):
                return GenerationResult(text="", final=None, analysis=None, finish_reason="call",
                                        tool_calls=[gold[made]])
            return _text("Done.")

    assert not suite.run_sample(sample, OneAtATime()).passed  # BFCL's default: first response only
    backend = OneAtATime()
    result = suite.run_sample(sample, backend, sequential_calls=8)
    assert result.passed and result.details["generations"] == 3
    assert backend.requests[1].messages[-1]["role"] == "tool"


def test_a_real_local_model_is_graded(tiny_local_backend):
    suite = BfclSuite()
    sample = suite.samples(categories="simple", limit=1)[0]
    result = suite.run_sample(sample, tiny_local_backend, max_tokens=8, temperature=0.0, reasoning_effort="low")
    assert not result.passed and result.failure in ("truncated", "parse_error", "wrong_tool", "wrong_arguments")
    assert result.details["error_type"]
