"""Our chat_template.jinja (transformers apply_chat_template) against openai-harmony's rendering.

Cases that match token for token (tested): every conversation of the chat suite, as a generation prompt
(add_generation_prompt=True vs render_prompt) and as a full conversation (vs render_conversation_for_training with
openai-harmony's default auto_drop_analysis=True), with and without tools, including the tool schemas below.
Known differences (not tested as equal): tool schemas using ``oneOf`` (harmony renders variants line by line; the
template renders ``any``), non-scalar ``default`` values (JSON spacing), and Harmony-form message dicts (the template
reads chat form only). "Current date:" appears only when ``conversation_start_date`` is passed, exactly as in
harmony; the official Hugging Face template always prints today's date instead.
"""

from __future__ import annotations

import pytest
from chat_cases import CASES

from gptoss_train.harmony.conversation import conversation_from_chat
from gptoss_train.harmony.render import render_prompt
from gptoss_train.harmony.tokenizer import CHAT_TEMPLATE_PATH

TEMPLATE = CHAT_TEMPLATE_PATH.read_text()

RICH_TOOLS = [
    {"type": "function", "function": {
        "name": "search_flights",
        "description": "Search flights.\nReturns at most 10 results.",
        "parameters": {
            "type": "object",
            "description": "Search query",
            "properties": {
                "origin": {"type": "string", "description": "IATA code", "examples": ["CDG", "JFK"]},
                "passengers": {"type": "integer", "default": 1},
                "cabin": {"type": "string", "enum": ["economy", "business"], "default": "economy"},
                "airline": {"type": "string", "default": "any"},
                "flexible": {"type": "boolean", "title": "Flexible dates"},
                "max_price": {"type": ["number", "null"]},
                "note": {"type": "string", "nullable": True},
                "stops": {"type": "array", "items": {"type": "integer"}},
                "tags": {"type": "array"},
                "window": {"type": "object", "properties": {"start": {"type": "string"}, "end": {"type": "string"}},
                           "required": ["start"]},
                "anything": {},
            },
            "required": ["origin", "passengers"],
        },
    }},
    {"type": "function", "function": {"name": "now", "description": "", "parameters": {}}},
    {"type": "function", "name": "flat_tool", "description": "Flat shape",
     "parameters": {"type": "object", "properties": {"x": {"type": "number"}}}},
]


def _template_ids(tokenizer, messages, *, add_generation_prompt, tools=None, **kwargs):
    text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                         tokenize=False, chat_template=TEMPLATE, **kwargs)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


CHAT_CASES = [case for case in CASES if case[0] != "harmony_form"]


@pytest.mark.parametrize("case", CHAT_CASES, ids=[c[0] for c in CHAT_CASES])
def test_generation_prompt_matches_render_prompt(case, hf_tokenizer):
    _, messages, kwargs = case
    kwargs = dict(kwargs)
    tools = kwargs.pop("tools", None)
    last_prompt = max(i for i, m in enumerate(messages) if m["role"] != "assistant")
    prompt_messages = messages[: last_prompt + 1]
    expected = render_prompt(conversation_from_chat(prompt_messages, tools=tools, **kwargs))
    assert _template_ids(hf_tokenizer, prompt_messages, add_generation_prompt=True, tools=tools, **kwargs) == expected


@pytest.mark.parametrize("case", CHAT_CASES, ids=[c[0] for c in CHAT_CASES])
def test_full_conversation_matches_training_render(case, hf_tokenizer, harmony_encoding):
    _, messages, kwargs = case
    kwargs = dict(kwargs)
    tools = kwargs.pop("tools", None)
    conv = conversation_from_chat(messages, tools=tools, **kwargs)
    expected = harmony_encoding.render_conversation_for_training(conv)
    assert _template_ids(hf_tokenizer, messages, add_generation_prompt=False, tools=tools, **kwargs) == expected


def test_tool_schemas_match_harmony(hf_tokenizer, harmony_encoding):
    messages = [{"role": "system", "content": "Book travel."}, {"role": "user", "content": "Flights from Paris?"}]
    expected = render_prompt(conversation_from_chat(messages, tools=RICH_TOOLS, reasoning_effort="high"))
    got = _template_ids(hf_tokenizer, messages, add_generation_prompt=True, tools=RICH_TOOLS, reasoning_effort="high")
    assert harmony_encoding.decode(got) == harmony_encoding.decode(expected)
    assert got == expected


def test_no_effort_and_developer_kwarg(hf_tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    expected = render_prompt(conversation_from_chat(messages, reasoning_effort=None, developer_instructions="Be kind."))
    assert _template_ids(hf_tokenizer, messages, add_generation_prompt=True, reasoning_effort=None,
                         developer_instructions="Be kind.") == expected


def test_template_rejects_orphan_tool_result(hf_tokenizer):
    with pytest.raises(Exception, match="tool message without a matching tool call"):
        hf_tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}],
                                         tokenize=False, chat_template=TEMPLATE)
