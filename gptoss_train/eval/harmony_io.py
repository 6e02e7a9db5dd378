"""The one place where eval turns requests into Harmony prompts and completions into :class:`GenerationResult` s.

Every backend goes through these functions, which call the project's single renderer/parser
(``gptoss_train.harmony.conversation`` / ``render`` / ``parse``), so a local model, a server and a GGUF are prompted
and parsed identically (DESIGN.md §1 decision 4).
"""

from __future__ import annotations

import hashlib
import json

from gptoss_train.eval.core import GenerationRequest, GenerationResult
from gptoss_train.harmony.encoding import CALL, RETURN, load_harmony_encoding


def request_conversation(request: GenerationRequest):
    from gptoss_train.harmony.conversation import conversation_from_chat

    return conversation_from_chat(
        request.messages,
        tools=request.tools,
        reasoning_effort=request.reasoning_effort,
        developer_instructions=request.developer_instructions,
        conversation_start_date=request.extra.get("conversation_start_date"),
    )


def prompt_tokens(request: GenerationRequest) -> list[int]:
    """Harmony prompt ids for the request, ending with ``<|start|>assistant``."""
    from gptoss_train.harmony.render import render_prompt

    return list(render_prompt(request_conversation(request)))


def prompt_hash(request: GenerationRequest) -> str:
    """Stable hash of what the model is asked (rendered ids when possible), recorded per sample."""
    try:
        payload = json.dumps(prompt_tokens(request))
    except Exception:  # a request the renderer refuses still gets a hash of its chat form
        payload = json.dumps([request.messages, request.tools, request.reasoning_effort], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def decode(tokens: list[int]) -> str:
    return load_harmony_encoding().decode(list(tokens))


def encode_with_specials(text: str) -> list[int]:
    """Harmony text (as a server returns it with special tokens kept) back to ids."""
    return load_harmony_encoding().encode(text, allowed_special="all")


def result_from_tokens(tokens: list[int], *, usage: dict | None = None) -> GenerationResult:
    """Parse a completion (ids after the prompt's ``<|start|>assistant``) with the shared parser."""
    from gptoss_train.harmony.parse import parse_turn

    tokens = [int(t) for t in tokens]
    turn = parse_turn(tokens)
    tool_calls = [
        {"name": call.name, "arguments": call.arguments, "parsed_arguments": call.parsed_arguments}
        for call in turn.tool_calls
    ]
    return GenerationResult(
        text=decode(tokens),
        final=turn.final,
        analysis=turn.analysis,
        tool_calls=tool_calls,
        finish_reason=turn.stop,
        tokens=tokens,
        usage=dict(usage or {}),
        error=turn.error,
    )


def result_from_harmony_text(text: str, *, stopped: bool, stop_token: int | None = None, usage=None) -> GenerationResult:
    """A server's raw-completions text (special tokens kept) -> result.

    Servers strip the stop string they matched, so when the server says it stopped we put the right stop token back:
    the one it reports, else ``<|call|>`` when the last message is addressed to a tool, else ``<|return|>``.
    """
    tokens = encode_with_specials(text)
    if stopped and (not tokens or tokens[-1] not in (RETURN, CALL)):
        if stop_token is None:
            stop_token = CALL if _last_header_has_recipient(text) else RETURN
        tokens.append(stop_token)
    return result_from_tokens(tokens, usage=usage)


def _last_header_has_recipient(text: str) -> bool:
    last_message = text.rsplit("<|message|>", 1)
    if len(last_message) < 2:
        return False
    header = last_message[0].rsplit("<|start|>", 1)[-1]
    return " to=" in header or header.startswith("to=") or "<|channel|>commentary to=" in header


def harmony_completion_tokens(*, final: str | None = None, analysis: str | None = None,
                              tool_call: dict | None = None) -> list[int]:
    """Render a gold assistant turn as the completion a perfect model would produce (used by oracles and tests).

    Going through real Harmony tokens means the oracle exercises the same parser as every model.
    """
    parts = []
    if analysis is not None:
        parts.append(f"<|channel|>analysis<|message|>{analysis}<|end|>")
    if tool_call is not None:
        prefix = "<|start|>assistant" if parts else ""
        arguments = tool_call["arguments"]
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        parts.append(
            f"{prefix}<|channel|>commentary to=functions.{tool_call['name']} <|constrain|>json<|message|>{arguments}<|call|>"
        )
    else:
        prefix = "<|start|>assistant" if parts else ""
        parts.append(f"{prefix}<|channel|>final<|message|>{final or ''}<|return|>")
    return encode_with_specials("".join(parts))
