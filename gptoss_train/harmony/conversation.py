"""OpenAI-style chat messages (or Harmony message dicts) -> an ``openai_harmony.Conversation``.

Training data usually comes in the OpenAI chat shape (``role``/``content``/``tool_calls``/``tool`` results, with the
reasoning in ``thinking``, ``reasoning`` or ``reasoning_content``). gpt-oss speaks Harmony: a system message (model
identity, reasoning effort, channels), a developer message (instructions + function tools as a TypeScript namespace),
and assistant messages on channels. This module only *builds* Harmony messages; every token is produced by
openai-harmony (see :mod:`gptoss_train.harmony.render`).

Mapping (one chat message can become several Harmony messages):

* ``system`` and ``developer`` chat messages -> the developer message's instructions. A ``system`` message carries
  the *developer* prompt, as in the official Hugging Face chat template: Harmony's own system message is reserved
  for the model identity, dates and reasoning effort, which come from the keyword arguments.
* ``user`` -> ``user``.
* ``assistant`` -> ``analysis`` message (the reasoning, if any), then either the tool calls
  (``commentary`` channel, recipient ``functions.NAME``, content type ``<|constrain|>json``, content = the
  arguments JSON) preceded by a ``commentary`` preamble when ``content`` is also set, or a ``final`` message.
* ``tool`` -> a message from ``functions.NAME`` to ``assistant`` on the ``commentary`` channel.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from openai_harmony import (
    Author,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
    TextContent,
    ToolDescription,
)

REASONING_KEYS = ("thinking", "reasoning", "reasoning_content")
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
HARMONY_CHANNELS = ("analysis", "commentary", "final")
FUNCTIONS_NAMESPACE = "functions"
JSON_CONTENT_TYPE = "<|constrain|>json"
_EFFORTS = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}


class ConversationError(ValueError):
    """A conversation that cannot be turned into Harmony.

    ``index`` is the position of the offending chat message (``None`` when the problem is not tied to one message,
    e.g. a bad ``tools`` list); ``reason`` is a short stable code used to count skipped examples.
    """

    def __init__(self, message: str, index: int | None = None, *, reason: str = "invalid conversation"):
        super().__init__(message)
        self.message = message
        self.index = index
        self.reason = reason

    def __str__(self) -> str:
        where = f"message {self.index}: " if self.index is not None else ""
        return f"{where}{self.message}"


# --------------------------------------------------------------------------------------------------------------------
# System and developer messages


def parse_reasoning_effort(value: str | ReasoningEffort | None) -> ReasoningEffort | None:
    """``"low"``/``"medium"``/``"high"`` (any case) or a ``ReasoningEffort`` -> ``ReasoningEffort``; None stays None."""
    if value is None or isinstance(value, ReasoningEffort):
        return value
    effort = _EFFORTS.get(str(value).strip().lower())
    if effort is None:
        raise ConversationError(
            f"reasoning_effort must be one of low, medium, high; got {value!r}", reason="invalid reasoning effort"
        )
    return effort


def system_message(
    reasoning_effort: str | ReasoningEffort | None = "medium", conversation_start_date: str | None = None
) -> Message:
    """Harmony's system message: model identity, knowledge cutoff, optional date, reasoning effort, channels."""
    content = SystemContent.new()
    content.reasoning_effort = parse_reasoning_effort(reasoning_effort)
    if conversation_start_date:
        content = content.with_conversation_start_date(conversation_start_date)
    return Message.from_role_and_content(Role.SYSTEM, content)


def function_tool_descriptions(tools: Sequence[Mapping[str, Any]] | None) -> list[ToolDescription]:
    """OpenAI function tools -> Harmony ``ToolDescription``s.

    Accepts the Chat Completions shape ``{"type": "function", "function": {"name", "description", "parameters"}}`` and
    the flat Responses-API shape ``{"type": "function", "name", "description", "parameters"}``.
    """
    if tools is None:
        return []
    if not isinstance(tools, (list, tuple)):
        raise ConversationError(f"tools must be a list of function tools, got {type(tools).__name__}",
                                reason="invalid tools")
    descriptions: list[ToolDescription] = []
    seen: set[str] = set()
    for position, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ConversationError(f"tools[{position}] must be an object, got {type(tool).__name__}",
                                    reason="invalid tools")
        kind = tool.get("type", "function")
        if kind != "function":
            raise ConversationError(
                f"tools[{position}] has type {kind!r}; only function tools are supported "
                "(built-in browser/python tools belong in the system message and are not produced from chat data)",
                reason="invalid tools",
            )
        spec = tool.get("function", tool)
        if not isinstance(spec, Mapping):
            raise ConversationError(f"tools[{position}].function must be an object", reason="invalid tools")
        name = spec.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConversationError(f"tools[{position}] has no function name", reason="invalid tools")
        if name in seen:
            raise ConversationError(f"tools[{position}]: duplicate tool name {name!r}", reason="invalid tools")
        seen.add(name)
        parameters = spec.get("parameters")
        if parameters is not None and not isinstance(parameters, Mapping):
            raise ConversationError(f"tools[{position}] ({name}): parameters must be a JSON schema object",
                                    reason="invalid tools")
        description = spec.get("description") or ""
        descriptions.append(ToolDescription.new(name, str(description), dict(parameters) if parameters else None))
    return descriptions


def developer_message(instructions: str | None, tools: Sequence[ToolDescription]) -> Message | None:
    """The developer message (instructions and the ``functions`` namespace), or None when there is neither."""
    if not instructions and not tools:
        return None
    content = DeveloperContent.new()
    if instructions:
        content = content.with_instructions(instructions)
    if tools:
        content = content.with_function_tools(list(tools))
    return Message.from_role_and_content(Role.DEVELOPER, content)


# --------------------------------------------------------------------------------------------------------------------
# Chat messages


def _text_of(content: Any, index: int, field: str = "content") -> str:
    """Chat ``content``: a string, None, or a list of text parts (``{"type": "text", "text": ...}``)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for part in content:
            if isinstance(part, str):
                pieces.append(part)
            elif isinstance(part, Mapping) and part.get("type", "text") in ("text", "input_text", "output_text"):
                pieces.append(str(part.get("text", "")))
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ConversationError(f"{field} part of type {kind!r} is not supported (text only)", index,
                                        reason="unsupported content")
        return "".join(pieces)
    raise ConversationError(f"{field} must be a string or a list of text parts, got {type(content).__name__}", index,
                            reason="unsupported content")


def _reasoning_of(message: Mapping[str, Any], index: int) -> str:
    found = [(key, message[key]) for key in REASONING_KEYS if message.get(key) not in (None, "")]
    texts = {_text_of(value, index, key) for key, value in found}
    if len(texts) > 1:
        keys = ", ".join(key for key, _ in found)
        raise ConversationError(f"assistant message has different reasoning in {keys}; keep one", index,
                                reason="conflicting reasoning")
    return texts.pop() if texts else ""


def _arguments_json(raw: Any, name: str, index: int) -> str:
    """Tool-call arguments as the JSON text the model must generate (strings kept verbatim once validated)."""
    if raw is None:
        return "{}"
    if isinstance(raw, str):
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConversationError(
                f"tool call {name!r} has invalid JSON arguments ({exc.msg} at char {exc.pos}): {raw[:80]!r}", index,
                reason="invalid JSON arguments") from None
        if not isinstance(parsed, dict):
            raise ConversationError(f"tool call {name!r}: arguments must be a JSON object, got {raw[:80]!r}", index,
                                    reason="invalid JSON arguments")
        return raw
    if isinstance(raw, Mapping):
        return json.dumps(raw, ensure_ascii=False)
    raise ConversationError(f"tool call {name!r}: arguments must be a JSON string or an object", index,
                            reason="invalid JSON arguments")


def _tool_result_text(content: Any, index: int) -> str:
    if isinstance(content, (dict, list)) and not (
        isinstance(content, list) and all(isinstance(p, (Mapping, str)) and (
            isinstance(p, str) or p.get("type") in ("text", "input_text", "output_text")) for p in content)
    ):
        return json.dumps(content, ensure_ascii=False)
    return _text_of(content, index)


def is_harmony_form(messages: Sequence[Any]) -> bool:
    """True when the messages are Harmony ``Message`` objects or their dicts (they carry channels/recipients)."""
    for message in messages:
        if isinstance(message, Message):
            return True
        if not isinstance(message, Mapping):
            continue
        # Values, not keys: Arrow-backed datasets give every message every key, filled with None.
        if any(message.get(key) is not None for key in ("channel", "recipient", "content_type")):
            return True
        content = message.get("content")
        if isinstance(content, list) and any(
            isinstance(part, Mapping) and part.get("type") in ("system_content", "developer_content") for part in content
        ):
            return True
    return False


def conversation_from_chat(
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    reasoning_effort: str | None = "medium",
    developer_instructions: str | None = None,
    conversation_start_date: str | None = None,
) -> Conversation:
    """Convert OpenAI-style chat messages (or Harmony message dicts) into a Harmony conversation.

    ``reasoning_effort`` (low/medium/high, None for no ``Reasoning:`` line) and ``conversation_start_date`` go into the
    system message. ``developer_instructions`` and any leading ``system``/``developer`` chat messages are joined (in
    that order, blank line between) into the developer message together with ``tools``. When ``tools`` is given,
    every tool call must name one of them. Raises :class:`ConversationError` naming the message index.
    """
    if not isinstance(messages, (list, tuple)):
        raise ConversationError(f"messages must be a list, got {type(messages).__name__}", reason="invalid messages")
    if not messages:
        raise ConversationError("conversation has no messages", reason="empty conversation")
    if is_harmony_form(messages):
        return conversation_from_harmony(
            messages, tools=tools, reasoning_effort=reasoning_effort, developer_instructions=developer_instructions,
            conversation_start_date=conversation_start_date,
        )

    tool_descriptions = function_tool_descriptions(tools)
    known_tools = {tool.name for tool in tool_descriptions} if tools is not None else None

    instructions: list[str] = [developer_instructions] if developer_instructions else []
    body: list[Message] = []
    pending_calls: dict[str, str] = {}  # tool_call id -> function name, calls still waiting for a result
    pending_names: list[str] = []  # names of calls waiting for a result, in call order
    anonymous_ids = 0
    started = False
    has_assistant = False

    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ConversationError(f"message must be an object, got {type(message).__name__}", index,
                                    reason="invalid messages")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise ConversationError(
                f"unknown role {role!r}; expected one of {', '.join(CHAT_ROLES)}", index, reason="unknown role")

        if role in ("system", "developer"):
            if started:
                raise ConversationError(
                    f"{role} message after the conversation started; put system/developer instructions first",
                    index, reason="misplaced system message")
            text = _text_of(message.get("content"), index)
            if text:
                instructions.append(text)
            continue

        if role != "tool" and pending_names:
            raise ConversationError(
                f"{role} message while tool call(s) {', '.join(pending_names)} have no result; "
                "add a tool message for each call first", index, reason="tool call without result")
        started = True

        if role == "user":
            body.append(Message.from_role_and_content(Role.USER, _text_of(message.get("content"), index)))
            continue

        if role == "assistant":
            has_assistant = True
            reasoning = _reasoning_of(message, index)
            content = _text_of(message.get("content"), index)
            tool_calls = message.get("tool_calls") or []
            if not isinstance(tool_calls, list):
                raise ConversationError("tool_calls must be a list", index, reason="invalid tool call")
            if not reasoning and not content.strip() and not tool_calls:
                raise ConversationError("empty assistant turn: no content, reasoning or tool_calls", index,
                                        reason="empty assistant turn")
            if reasoning:
                body.append(Message.from_role_and_content(Role.ASSISTANT, reasoning).with_channel("analysis"))
            if tool_calls:
                if content.strip():
                    # Content next to tool calls is a user-visible preamble (Harmony's commentary channel).
                    body.append(Message.from_role_and_content(Role.ASSISTANT, content).with_channel("commentary"))
                for call in tool_calls:
                    name, arguments, call_id = _tool_call_fields(call, index)
                    if known_tools is not None and name not in known_tools:
                        raise ConversationError(
                            f"tool call to {name!r}, which is not in tools ({', '.join(sorted(known_tools)) or 'none'})",
                            index, reason="unknown tool")
                    if call_id is None:
                        anonymous_ids += 1
                        call_id = f"__anonymous_{anonymous_ids}"
                    pending_calls[call_id] = name
                    pending_names.append(name)
                    body.append(
                        Message.from_role_and_content(Role.ASSISTANT, arguments)
                        .with_channel("commentary")
                        .with_recipient(f"{FUNCTIONS_NAMESPACE}.{name}")
                        .with_content_type(JSON_CONTENT_TYPE)
                    )
            elif content.strip():
                body.append(Message.from_role_and_content(Role.ASSISTANT, content).with_channel("final"))
            elif index + 1 >= len(messages) or (messages[index + 1] or {}).get("role") != "assistant":
                raise ConversationError(
                    "assistant message has reasoning but neither content nor tool_calls", index,
                    reason="empty assistant turn")
            continue

        # role == "tool"
        name = _match_tool_result(message, index, pending_calls, pending_names)
        body.append(
            Message.from_author_and_content(
                Author.new(Role.TOOL, f"{FUNCTIONS_NAMESPACE}.{name}"), _tool_result_text(message.get("content"), index)
            )
            .with_recipient("assistant")
            .with_channel("commentary")
        )

    if not started:
        raise ConversationError("conversation has only system/developer messages", reason="empty conversation")
    del has_assistant  # a prompt-only conversation is valid here; the data layer decides whether it trains anything

    header = [system_message(reasoning_effort, conversation_start_date)]
    developer = developer_message("\n\n".join(instructions) or None, tool_descriptions)
    if developer is not None:
        header.append(developer)
    return Conversation.from_messages(header + body)


def _tool_call_fields(call: Any, index: int) -> tuple[str, str, str | None]:
    if not isinstance(call, Mapping):
        raise ConversationError("each tool call must be an object", index, reason="invalid tool call")
    if call.get("type", "function") != "function":
        raise ConversationError(f"tool call of type {call.get('type')!r}; only function calls are supported", index,
                                reason="invalid tool call")
    function = call.get("function", call)
    if not isinstance(function, Mapping):
        raise ConversationError("tool call has no function object", index, reason="invalid tool call")
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConversationError("tool call has no function name", index, reason="invalid tool call")
    arguments = _arguments_json(function.get("arguments"), name, index)
    call_id = call.get("id")
    return name, arguments, (str(call_id) if call_id not in (None, "") else None)


def _match_tool_result(message: Mapping[str, Any], index: int, pending_calls: dict[str, str],
                       pending_names: list[str]) -> str:
    """Find the call a tool message answers (by ``tool_call_id``, else by ``name``) and mark it answered."""
    call_id = message.get("tool_call_id")
    name = message.get("name")
    if call_id not in (None, ""):
        call_id = str(call_id)
        if call_id not in pending_calls:
            raise ConversationError(
                f"tool result for tool_call_id {call_id!r} without a matching call before it", index,
                reason="tool result without call")
        called = pending_calls.pop(call_id)
        if name not in (None, "") and name != called and name != f"{FUNCTIONS_NAMESPACE}.{called}":
            raise ConversationError(
                f"tool result names {name!r} but tool_call_id {call_id!r} called {called!r}", index,
                reason="tool result without call")
        pending_names.remove(called)
        return called
    if name in (None, ""):
        raise ConversationError("tool message needs tool_call_id or name", index, reason="tool result without call")
    name = str(name)
    if name.startswith(f"{FUNCTIONS_NAMESPACE}."):
        name = name[len(FUNCTIONS_NAMESPACE) + 1:]
    if name not in pending_names:
        raise ConversationError(f"tool result from {name!r} without a matching call before it", index,
                                reason="tool result without call")
    pending_names.remove(name)
    for key, called in list(pending_calls.items()):
        if called == name:
            del pending_calls[key]
            break
    return name


# --------------------------------------------------------------------------------------------------------------------
# Harmony-form input


def conversation_from_harmony(
    messages: Sequence[Mapping[str, Any] | Message],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    reasoning_effort: str | None = "medium",
    developer_instructions: str | None = None,
    conversation_start_date: str | None = None,
) -> Conversation:
    """Messages already in Harmony form (``Message`` objects or ``Message.to_dict()`` dicts) -> ``Conversation``.

    The keyword arguments only fill in what is missing: a system message is prepended when the conversation has
    none, and a developer message (instructions + tools) is inserted after it when there is none.
    """
    parsed: list[Message] = []
    for index, raw in enumerate(messages):
        if isinstance(raw, Message):
            message = raw
        elif isinstance(raw, Mapping):
            role = raw.get("role")
            if role not in CHAT_ROLES:
                raise ConversationError(
                    f"unknown role {role!r}; expected one of {', '.join(CHAT_ROLES)}", index, reason="unknown role")
            if "content" not in raw:
                raise ConversationError("Harmony message has no content", index, reason="invalid harmony message")
            try:
                message = Message.from_dict(dict(raw))
            except Exception as exc:  # pydantic / ValueError on malformed content parts
                raise ConversationError(f"invalid Harmony message: {exc}", index,
                                        reason="invalid harmony message") from None
        else:
            raise ConversationError(f"message must be an object, got {type(raw).__name__}", index,
                                    reason="invalid messages")
        _check_harmony_message(message, index)
        parsed.append(message)

    roles = [message.author.role for message in parsed]
    header: list[Message] = []
    if Role.SYSTEM not in roles:
        header.append(system_message(reasoning_effort, conversation_start_date))
    if Role.DEVELOPER not in roles:
        developer = developer_message(developer_instructions, function_tool_descriptions(tools))
        if developer is not None:
            header.append(developer)
    if parsed and parsed[0].author.role == Role.SYSTEM:
        return Conversation.from_messages(parsed[:1] + header + parsed[1:])
    return Conversation.from_messages(header + parsed)


def _check_harmony_message(message: Message, index: int) -> None:
    role = message.author.role
    if role == Role.ASSISTANT:
        if message.channel not in HARMONY_CHANNELS:
            raise ConversationError(
                f"assistant message needs a channel ({', '.join(HARMONY_CHANNELS)}), got {message.channel!r}", index,
                reason="invalid harmony message")
        if not any(isinstance(part, TextContent) and part.text.strip() for part in message.content):
            raise ConversationError("empty assistant turn: no text content", index, reason="empty assistant turn")
    if role == Role.TOOL and not message.author.name:
        raise ConversationError("tool message needs the tool's name (e.g. functions.lookup)", index,
                                reason="invalid harmony message")
    for part in message.content:
        if isinstance(part, SystemContent) and role != Role.SYSTEM:
            raise ConversationError("system_content outside a system message", index, reason="invalid harmony message")
        if isinstance(part, DeveloperContent) and role != Role.DEVELOPER:
            raise ConversationError("developer_content outside a developer message", index,
                                    reason="invalid harmony message")
