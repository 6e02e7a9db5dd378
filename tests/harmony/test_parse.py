"""parse: strict inverse of rendering (messages round-trip) and a tolerant assistant-turn parser."""

from __future__ import annotations

import pytest
from chat_cases import CASES
from openai_harmony import Conversation, Role, TextContent

from gptoss_train.harmony.conversation import conversation_from_chat
from gptoss_train.harmony.encoding import CALL, RETURN
from gptoss_train.harmony.parse import parse_messages, parse_turn
from gptoss_train.harmony.render import MaskPolicy, render_conversation, render_for_training, render_prompt


def _comparable(message):
    return (message.author.role, message.author.name, message.channel, message.recipient, message.content_type,
            [part.text for part in message.content if isinstance(part, TextContent)])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_messages_round_trip(case, harmony_encoding):
    _, messages, kwargs = case
    conv = conversation_from_chat(messages, **kwargs)
    example = render_for_training(conv, MaskPolicy.ALL_ASSISTANT)  # keeps every message
    parsed = parse_messages(example.input_ids)
    assert len(parsed) == len(conv.messages)
    for (original, begin, end), back in zip(example.spans, parsed):
        if original.author.role in (Role.SYSTEM, Role.DEVELOPER):
            # Structured system/developer content comes back as its rendered text (<|start|>role<|message|>...<|end|>).
            assert back.author.role == original.author.role
            assert back.content[0].text == harmony_encoding.decode(example.input_ids[begin + 3:end - 1])
        else:
            assert _comparable(back) == _comparable(original)
    # Re-rendering the parsed messages gives the same tokens.
    again = render_for_training(Conversation.from_messages(parsed), MaskPolicy.ALL_ASSISTANT)
    assert again.input_ids == example.input_ids


@pytest.mark.parametrize("case", [c for c in CASES if c[1][-1]["role"] == "assistant" and c[0] != "harmony_form"],
                         ids=lambda c: c[0])
def test_parse_turn_reads_the_last_assistant_turn(case, harmony_encoding):
    _, messages, kwargs = case
    last_prompt = max(i for i, m in enumerate(messages) if m["role"] != "assistant")
    # Render without dropping reasoning, and split off the generated part after the last prompt.
    full = render_for_training(conversation_from_chat(messages, **kwargs), MaskPolicy.ALL_ASSISTANT).input_ids
    prefix = conversation_from_chat(messages[: last_prompt + 1], **kwargs)
    prompt = render_prompt(prefix)
    if full[: len(prompt)] != prompt:  # the prompt left out earlier reasoning that the training render keeps
        prompt = render_conversation(prefix, auto_drop_analysis=False) + prompt[-2:]
    assert full[: len(prompt)] == prompt
    turn = parse_turn(full[len(prompt):])
    tail = messages[last_prompt + 1:]
    thinking = [m.get("thinking") or m.get("reasoning") or m.get("reasoning_content") for m in tail]
    assert turn.analysis == ("\n".join(t for t in thinking if t) or None)
    calls = [c for m in tail for c in m.get("tool_calls", [])]
    if calls:
        assert turn.stop == "call" and turn.final is None
        assert [c.name for c in turn.tool_calls] == [c["function"]["name"] for c in calls]
        assert all(c.parsed_arguments is not None for c in turn.tool_calls)
    else:
        content = tail[-1]["content"]
        final = content if isinstance(content, str) else "".join(part["text"] for part in content)
        assert turn.stop == "return" and turn.final == final and turn.tool_calls == []
    assert turn.error is None


def _tokens(encoding, text):
    return encoding.encode(text, allowed_special="all")


def test_truncated(harmony_encoding):
    turn = parse_turn(_tokens(harmony_encoding, "<|channel|>analysis<|message|>Let me thi"))
    assert turn.stop == "truncated" and turn.analysis == "Let me thi" and "truncated" in turn.error


def test_truncated_in_header(harmony_encoding):
    turn = parse_turn(_tokens(harmony_encoding, "<|channel|>fin"))
    assert turn.stop == "truncated" and turn.messages == [] and "header" in turn.error


def test_invalid_json_arguments(harmony_encoding):
    turn = parse_turn(_tokens(harmony_encoding, "<|channel|>commentary to=functions.f <|constrain|>json<|message|>"
                                                "{\"a\": <|call|>"))
    assert turn.stop == "call"
    assert turn.tool_calls[0].name == "f" and turn.tool_calls[0].parsed_arguments is None
    assert "invalid JSON arguments for f" in turn.error


def test_garbage_between_messages(harmony_encoding):
    turn = parse_turn(_tokens(harmony_encoding, "<|channel|>analysis<|message|>ok<|end|>garbage<|start|>assistant"
                                                "<|channel|>final<|message|>x<|return|>"))
    assert turn.analysis == "ok" and turn.final is None and turn.stop == "return"
    assert "unparseable" in turn.error


def test_plain_text_without_header(harmony_encoding):
    turn = parse_turn(_tokens(harmony_encoding, "just some text"))
    assert turn.stop == "truncated" and turn.error


def test_stops_at_first_stop_token_and_stopped_by(harmony_encoding):
    tokens = _tokens(harmony_encoding, "<|channel|>final<|message|>a<|return|><|start|>assistant<|channel|>final"
                                       "<|message|>b<|return|>")
    turn = parse_turn(tokens)
    assert turn.final == "a" and turn.stop == "return" and turn.num_tokens == tokens.index(RETURN) + 1
    stripped = _tokens(harmony_encoding, "<|channel|>commentary to=functions.g <|constrain|>json<|message|>{}")
    turn = parse_turn(stripped, stopped_by=CALL)
    assert turn.stop == "call" and turn.tool_calls[0].parsed_arguments == {}
    assert parse_turn([]).stop == "truncated"


def test_garbage_ids_never_raise():
    assert parse_turn([5, 200006, 200006, 200008, 12]).stop == "truncated"


def test_echoed_prompt_header_and_missing_stop(harmony_encoding):
    turn = parse_turn(_tokens(harmony_encoding, "<|start|>assistant<|channel|>final<|message|>hi<|return|>"))
    assert turn.final == "hi" and turn.stop == "return" and turn.error is None
    turn = parse_turn(_tokens(harmony_encoding, "<|channel|>final<|message|>hi<|end|>"))
    assert turn.final == "hi" and turn.stop == "truncated" and "without <|return|>" in turn.error
