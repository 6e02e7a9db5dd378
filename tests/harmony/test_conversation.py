"""conversation_from_chat: the chat -> Harmony mapping and its errors."""

from __future__ import annotations

import pytest
from chat_cases import CASES, TIME_TOOL, WEATHER_TOOL
from openai_harmony import DeveloperContent, Message, ReasoningEffort, Role, SystemContent

from gptoss_train.harmony.conversation import ConversationError, conversation_from_chat


def _headers(conv):
    return [(m.author.role.value, m.author.name, m.channel, m.recipient, m.content_type) for m in conv.messages]


def test_tool_call_mapping():
    _, messages, kwargs = next(case for case in CASES if case[0] == "parallel_calls")
    conv = conversation_from_chat(messages, **kwargs)
    assert _headers(conv) == [
        ("system", None, None, None, None),
        ("developer", None, None, None, None),
        ("user", None, None, None, None),
        ("assistant", None, "analysis", None, None),
        ("assistant", None, "commentary", "functions.get_weather", "<|constrain|>json"),
        ("assistant", None, "commentary", "functions.get_time", "<|constrain|>json"),
        ("tool", "functions.get_weather", "commentary", "assistant", None),
        ("tool", "functions.get_time", "commentary", "assistant", None),
        ("assistant", None, "final", None, None),
    ]
    developer = conv.messages[1].content[0]
    assert isinstance(developer, DeveloperContent)
    assert [tool.name for tool in developer.tools["functions"].tools] == ["get_weather", "get_time"]


def test_system_message_fields():
    conv = conversation_from_chat([{"role": "user", "content": "x"}], reasoning_effort="LOW",
                                  conversation_start_date="2025-01-02")
    system = conv.messages[0].content[0]
    assert isinstance(system, SystemContent)
    assert system.reasoning_effort == ReasoningEffort.LOW and system.conversation_start_date == "2025-01-02"
    assert len(conv.messages) == 2  # no developer message without instructions or tools


def test_harmony_form_passthrough():
    messages = [Message.from_role_and_content(Role.SYSTEM, SystemContent.new()).to_dict(),
                {"role": "user", "content": "hi"},
                {"role": "assistant", "channel": "final", "content": [{"type": "text", "text": "yo"}]}]
    conv = conversation_from_chat(messages, developer_instructions="Be kind")
    assert [m.author.role for m in conv.messages] == [Role.SYSTEM, Role.DEVELOPER, Role.USER, Role.ASSISTANT]
    assert conv.messages[1].content[0].instructions == "Be kind"


def _call(call_id, name, arguments):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


BAD = [
    ("unknown role", [{"role": "robot", "content": "x"}], {}, 0),
    ("tool result without call", [{"role": "user", "content": "q"}, {"role": "tool", "tool_call_id": "x", "content": "r"}], {}, 1),
    ("tool result without call", [{"role": "user", "content": "q"}, {"role": "tool", "name": "get_weather", "content": "r"}], {}, 1),
    ("tool result without call", [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}], {}, 1),
    ("invalid JSON arguments", [{"role": "user", "content": "q"},
                                {"role": "assistant", "tool_calls": [_call("a", "get_weather", "{city: Paris}")]}], {}, 1),
    ("invalid JSON arguments", [{"role": "user", "content": "q"},
                                {"role": "assistant", "tool_calls": [_call("a", "get_weather", "[1, 2]")]}], {}, 1),
    ("empty assistant turn", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}], {}, 1),
    ("empty assistant turn", [{"role": "user", "content": "q"}, {"role": "assistant", "thinking": "hm"}], {}, 1),
    ("unknown tool", [{"role": "user", "content": "q"},
                      {"role": "assistant", "tool_calls": [_call("a", "book_flight", "{}")]}], {"tools": [WEATHER_TOOL]}, 1),
    ("misplaced system message", [{"role": "user", "content": "q"}, {"role": "system", "content": "late"}], {}, 1),
    ("conflicting reasoning", [{"role": "user", "content": "q"},
                               {"role": "assistant", "thinking": "a", "reasoning": "b", "content": "c"}], {}, 1),
    ("tool call without result", [{"role": "user", "content": "q"},
                                  {"role": "assistant", "tool_calls": [_call("a", "get_time", "{}")]},
                                  {"role": "user", "content": "again"}], {}, 2),
    ("invalid tools", [{"role": "user", "content": "q"}], {"tools": [WEATHER_TOOL, WEATHER_TOOL]}, None),
    ("invalid tools", [{"role": "user", "content": "q"}], {"tools": [{"type": "browser"}]}, None),
    ("empty conversation", [], {}, None),
    ("empty conversation", [{"role": "system", "content": "only"}], {}, None),
    ("unsupported content", [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], {}, 0),
    ("invalid reasoning effort", [{"role": "user", "content": "q"}], {"reasoning_effort": "max"}, None),
    ("invalid harmony message", [{"role": "user", "content": "q"}, {"role": "assistant", "channel": "thoughts", "content": "x"}], {}, 1),
    ("tool result without call", [{"role": "user", "content": "q"},
                                   {"role": "assistant", "tool_calls": [_call("a", "get_time", "{}")]},
                                   {"role": "tool", "tool_call_id": "a", "name": "get_weather", "content": "r"}], {}, 2),
]


@pytest.mark.parametrize("reason,messages,kwargs,index", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_errors(reason, messages, kwargs, index):
    with pytest.raises(ConversationError) as info:
        conversation_from_chat(messages, **kwargs)
    assert info.value.reason == reason
    assert info.value.index == index
    if index is not None:
        assert str(info.value).startswith(f"message {index}: ")


def test_tool_result_by_name_and_reasoning_only_followed_by_assistant():
    conv = conversation_from_chat([
        {"role": "user", "content": "q"},
        {"role": "assistant", "thinking": "first think"},
        {"role": "assistant", "tool_calls": [_call(None, "get_time", '{"city": "Oslo"}')]},
        {"role": "tool", "name": "functions.get_time", "content": "noon"},
        {"role": "assistant", "content": "Noon."},
    ], tools=[TIME_TOOL])
    assert [m.channel for m in conv.messages[3:]] == ["analysis", "commentary", "commentary", "final"]


def test_null_filled_harmony_keys_stay_chat_form():
    """Arrow gives every message every key: channel=None must not switch to Harmony form."""
    conv = conversation_from_chat([{"role": "user", "content": "q", "channel": None, "tool_calls": None},
                                   {"role": "assistant", "content": "a", "channel": None, "recipient": None,
                                    "thinking": None, "tool_calls": None}])
    assert [m.channel for m in conv.messages] == [None, None, "final"]
