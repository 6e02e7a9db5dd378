"""Errors that point at the bad input (file:line or dataset row) and the report of what was skipped."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


class DataSourceError(RuntimeError):
    """A dataset that cannot be opened at all (missing file, no network for a hub dataset, ...)."""


class DataError(ValueError):
    """One bad example. ``str()`` reads ``train.jsonl:12: message 3: tool result ... without a matching call``."""

    def __init__(self, source: str, location: str, problem: str, *, reason: str, hint: str | None = None):
        self.source = source
        self.location = location  # "12" (a line) or "row 7"
        self.problem = problem
        self.reason = reason  # short stable code, counted in BuildReport.skipped
        self.hint = hint
        super().__init__(str(self))

    def __reduce__(self):  # picklable, so worker processes can return it
        return (_rebuild_data_error, (self.source, self.location, self.problem, self.reason, self.hint))

    def __str__(self) -> str:
        text = f"{self.source}:{self.location}: {self.problem}"
        return f"{text}\n  fix: {self.hint}" if self.hint else text


def _rebuild_data_error(source, location, problem, reason, hint):
    return DataError(source, location, problem, reason=reason, hint=hint)


# How to fix each kind of problem (shown with the error).
HINTS = {
    "invalid JSON line": "each line must be one JSON object; check for a truncated line or a trailing comma",
    "not an object": "each line must be a JSON object such as {\"messages\": [...]}",
    "missing messages": "give a \"messages\" list (OpenAI chat or Harmony form), or \"user\" + \"final\" columns",
    "unknown role": "roles are system, developer, user, assistant and tool",
    "tool result without call": "a tool message must follow the assistant tool_call it answers (same tool_call_id)",
    "tool call without result": "answer every tool call with a tool message before the next user/assistant turn",
    "invalid JSON arguments": "tool_calls[].function.arguments must be a JSON object (string or dict)",
    "empty assistant turn": "an assistant message needs content, reasoning (thinking) or tool_calls",
    "unknown tool": "add the tool to the sample's \"tools\" list or fix the name in the call",
    "misplaced system message": "put system/developer instructions before the first user message",
    "invalid tools": "tools must be OpenAI function tools: {\"type\": \"function\", \"function\": {\"name\", ...}}",
    "invalid reasoning effort": "reasoning_effort is low, medium or high",
    "conflicting reasoning": "give the reasoning in one field (thinking, reasoning or reasoning_content)",
    "unsupported content": "content must be text (a string or a list of {\"type\": \"text\"} parts)",
    "invalid harmony message": "Harmony-form messages need role, content and (for the assistant) a channel",
    "invalid tool call": "tool_calls entries are {\"id\", \"type\": \"function\", \"function\": {\"name\", \"arguments\"}}",
    "invalid messages": "messages must be a list of objects with a role",
    "empty conversation": "add at least one user message and one assistant reply",
    "no trained tokens": "the conversation has no assistant message the mask policy trains (see --policy)",
    "too long": "raise --max-length, or use truncation 'truncate' (keeps the prompt, cuts the end) or 'drop'",
    "prompt too long": "the prompt alone exceeds max_length; raise --max-length or shorten the conversation",
}


@dataclass
class BuildReport:
    """What happened to each input example: kept, truncated, or skipped (counted per reason)."""

    read: int = 0
    kept: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)
    # The first few errors per reason, as "file:line: problem" strings, so a report can show examples.
    samples: dict[str, list[str]] = field(default_factory=dict)
    max_samples_per_reason: int = 3

    def skip(self, error: DataError) -> None:
        self.skipped[error.reason] += 1
        bucket = self.samples.setdefault(error.reason, [])
        if len(bucket) < self.max_samples_per_reason:
            bucket.append(f"{error.source}:{error.location}: {error.problem}")

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict:
        return {
            "read": self.read,
            "kept": self.kept,
            "truncated": self.truncated,
            "skipped": dict(self.skipped),
            "samples": self.samples,
        }
