"""Generated tokens -> Harmony messages / a parsed assistant turn.

``parse_turn`` reads what a model generated after a prompt ending in ``<|start|>assistant`` and never raises on model
garbage: it feeds openai-harmony's ``StreamableParser`` token by token (non-strict), keeps every message completed
before a problem, records the problem in ``error``, and reports how the turn stopped. ``parse_messages`` is the
strict inverse of rendering a whole conversation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from openai_harmony import Author, Message, Role, StreamableParser, StreamState, TextContent

from gptoss_train.harmony.encoding import CALL, RETURN, load_harmony_encoding

FUNCTIONS_PREFIX = "functions."


@dataclass
class ToolCall:
    """One tool call of the assistant. ``name`` drops the ``functions.`` prefix of function tools."""

    name: str
    arguments: str
    parsed_arguments: dict | None
    recipient: str = ""
    channel: str | None = None
    error: str | None = None


@dataclass
class ParsedTurn:
    """An assistant turn. ``stop``: "return" (final answer), "call" (tool call) or "truncated" (no stop token)."""

    messages: list[Message]
    analysis: str | None
    final: str | None
    tool_calls: list[ToolCall]
    stop: str
    error: str | None = None
    commentary: str | None = None  # preamble text shown to users before tool calls
    num_tokens: int = 0  # tokens consumed, up to and including the stop token
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


def _text(message: Message) -> str:
    return "".join(part.text for part in message.content if isinstance(part, TextContent))


def _tool_call(message: Message) -> ToolCall:
    recipient = message.recipient or ""
    name = recipient[len(FUNCTIONS_PREFIX):] if recipient.startswith(FUNCTIONS_PREFIX) else recipient
    arguments = _text(message)
    parsed: dict | None = None
    error: str | None = None
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError as exc:
        error = f"invalid JSON arguments for {name}: {exc.msg} at char {exc.pos}"
    else:
        if isinstance(value, dict):
            parsed = value
        else:
            error = f"arguments for {name} are JSON but not an object: {type(value).__name__}"
    return ToolCall(name=name, arguments=arguments, parsed_arguments=parsed, recipient=recipient,
                    channel=message.channel, error=error)


def _partial_message(parser: StreamableParser) -> Message | None:
    """The message the parser was in the middle of (content cut off by truncation), if any."""
    if parser.state != StreamState.CONTENT:
        return None
    role = parser.current_role or Role.ASSISTANT
    message = Message.from_author_and_content(Author(role=role), parser.current_content)
    if parser.current_channel:
        message = message.with_channel(parser.current_channel)
    if parser.current_recipient:
        message = message.with_recipient(parser.current_recipient)
    if parser.current_content_type:
        message = message.with_content_type(parser.current_content_type)
    return message


def _assistant_header(encoding) -> tuple[int, ...]:
    from openai_harmony import Conversation

    return tuple(encoding.render_conversation_for_completion(Conversation.from_messages([]), Role.ASSISTANT))


def parse_turn(completion_tokens: list[int], *, stopped_by: int | None = None) -> ParsedTurn:
    """Parse the tokens generated after ``<|start|>assistant``.

    Tokens after the first ``<|return|>`` / ``<|call|>`` are ignored, and a leading ``<|start|>assistant`` (echoed
    prompt) is skipped. Backends that strip the stop token can pass it as ``stopped_by``. Never raises on bad model
    output: problems go to ``error`` (and ``ToolCall.error``).
    """
    encoding = load_harmony_encoding()
    tokens = [int(token) for token in completion_tokens]
    prompt_suffix = list(_assistant_header(encoding))
    if tokens[: len(prompt_suffix)] == prompt_suffix:
        tokens = tokens[len(prompt_suffix):]  # a backend that echoes the prompt's <|start|>assistant
    stop_at = next((i for i, token in enumerate(tokens) if token in (RETURN, CALL)), None)
    if stop_at is not None:
        tokens = tokens[: stop_at + 1]
    elif stopped_by in (RETURN, CALL):
        tokens = tokens + [stopped_by]
    stop = {RETURN: "return", CALL: "call"}.get(tokens[-1], "truncated") if tokens else "truncated"

    parser = StreamableParser(encoding, Role.ASSISTANT, strict=False)
    errors: list[str] = []
    failed = False
    for position, token in enumerate(tokens):
        try:
            parser.process(token)
        except Exception as exc:  # HarmonyError on tokens that break the format
            errors.append(f"unparseable output at token {position}: {exc}")
            failed = True
            break
    messages = list(parser.messages)
    partial = None
    if not failed:
        partial = _partial_message(parser)
        if partial is not None:
            messages.append(partial)
            if stop == "truncated":
                errors.append("output ends inside a message (truncated)")
        elif parser.state == StreamState.HEADER:
            errors.append("output ends inside a message header")
    if not tokens:
        errors.append("no tokens generated")
    elif stop == "truncated" and not errors:
        errors.append("output ended without <|return|> or <|call|>")

    analysis = [_text(m) for m in messages if m.channel == "analysis" and m.recipient in (None, "all")]
    finals = [_text(m) for m in messages if m.channel == "final" and m.recipient in (None, "all")]
    commentary = [_text(m) for m in messages if m.channel == "commentary" and m.recipient in (None, "all")]
    calls = [_tool_call(m) for m in messages if m.recipient not in (None, "all") and m.author.role == Role.ASSISTANT]
    errors.extend(call.error for call in calls if call.error)
    return ParsedTurn(
        messages=messages,
        analysis="\n".join(analysis) if analysis else None,
        final="\n".join(finals) if finals else None,
        tool_calls=calls,
        stop=stop,
        error="; ".join(errors) if errors else None,
        commentary="\n".join(commentary) if commentary else None,
        num_tokens=len(tokens),
    )


def parse_messages(tokens: list[int], *, role: Role | None = None) -> list[Message]:
    """Strictly parse rendered Harmony tokens back into messages (raises ``HarmonyError`` on malformed input).

    With ``role=None`` the tokens must start with ``<|start|>`` (a rendered conversation); pass ``Role.ASSISTANT`` for
    a completion that follows ``<|start|>assistant``. System and developer messages come back as their rendered text.
    """
    encoding = load_harmony_encoding()
    return list(encoding.parse_messages_from_completion_tokens(list(tokens), role, strict=True))
