"""Harmony conversations -> token ids plus a per-token loss mask, and generation prompts.

Every token comes from openai-harmony (``render_conversation_for_training`` / ``render_conversation_for_completion``);
we never format Harmony ourselves. The loss mask is computed on top of that output: the rendered sequence is split
at its ``<|start|>`` tokens (Harmony encodes all text with ``encode_ordinary``, so ``<|start|>`` occurs only where a
message begins), and each piece is matched to the conversation message that openai-harmony renders to exactly those
tokens (``HarmonyEncoding.render``). Messages the library dropped are skipped during that match.

What is trained (``loss_mask == 1``) for an assistant message the policy selects: every token the model itself
generates for it, i.e. the header after ``<|start|>assistant`` (recipient ``to=functions.x``, ``<|channel|>`` and the
channel name, `` <|constrain|>json``), ``<|message|>``, the content and the end token (``<|end|>``, ``<|call|>`` or
``<|return|>``). ``<|start|>assistant`` itself is trained only when the model generates it, that is when the message
continues a turn (the previous rendered message is also from the assistant); the first ``<|start|>assistant`` of a
turn belongs to the prompt. Nothing from system, developer, user or tool messages is ever trained.

Policies:

* ``FINAL``: final-channel messages.
* ``REASONING_AND_FINAL``: analysis-channel messages (reasoning, without a recipient) and final-channel messages.
* ``ALL_ASSISTANT``: every assistant message: reasoning, preambles (commentary without recipient), tool calls, finals.

Reasoning of earlier turns ("exactly as openai-harmony does for training"): the sequence is always
``render_conversation_for_training(conv, RenderConversationConfig(auto_drop_analysis=...))``. With
``auto_drop_analysis=True`` (openai-harmony's default) the library drops the analysis messages that come before the
conversation's *first* final message whenever the last assistant message is a final answer. For a single turn that
removes the reasoning itself, so:

* ``FINAL`` uses the library default (``True``): reasoning is not trained, and the first turn's reasoning is not in
  the sequence either (as at inference, where the library drops it from the prompt); later turns' reasoning stays as
  context, because the library keeps it.
* ``REASONING_AND_FINAL`` and ``ALL_ASSISTANT`` use ``False``: the reasoning of *every* turn is in the sequence and
  trained, so each turn teaches the model to reason before it answers.

Pass ``auto_drop_analysis=`` to override either choice.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from enum import Enum

from openai_harmony import Conversation, Message, RenderConversationConfig, RenderOptions, Role

from gptoss_train.harmony.encoding import CALL, END, RETURN, START, load_harmony_encoding


class MaskPolicy(str, Enum):
    """Which assistant messages a training example learns from."""

    FINAL = "final"
    REASONING_AND_FINAL = "reasoning_final"
    ALL_ASSISTANT = "all_assistant"

    @classmethod
    def parse(cls, value: "MaskPolicy | str") -> "MaskPolicy":
        if isinstance(value, MaskPolicy):
            return value
        aliases = {"reasoning_and_final": cls.REASONING_AND_FINAL, "all": cls.ALL_ASSISTANT}
        key = str(value).strip().lower().replace("-", "_")
        try:
            return aliases.get(key) or cls(key)
        except ValueError:
            choices = ", ".join(policy.value for policy in cls)
            raise ValueError(f"unknown mask policy {value!r}; choose one of {choices}") from None

    def trains(self, message: Message) -> bool:
        """Whether this policy puts ``message`` (a rendered message) into the loss."""
        if message.author.role != Role.ASSISTANT:
            return False
        if self is MaskPolicy.ALL_ASSISTANT:
            return True
        if message.recipient not in (None, "all"):  # a tool call, even one on the analysis channel
            return False
        if message.channel == "final":
            return True
        return self is MaskPolicy.REASONING_AND_FINAL and message.channel == "analysis"


@dataclass
class RenderedExample:
    """One training example: ``input_ids`` and a same-length ``loss_mask`` (1 = the token is trained)."""

    input_ids: list[int]
    loss_mask: list[int]
    # Rendered messages with their token spans [start, end), for inspection and tests.
    spans: list[tuple[Message, int, int]] = field(default_factory=list, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        return sum(self.loss_mask)


class RenderMismatchError(RuntimeError):
    """openai-harmony's conversation render could not be split into its messages (a library behaviour we do not know)."""


@functools.lru_cache(maxsize=1)
def _assistant_prompt_tokens() -> tuple[int, ...]:
    """``<|start|>assistant``: the tokens a generation prompt ends with, rendered by the library."""
    encoding = load_harmony_encoding()
    tokens = encoding.render_conversation_for_completion(Conversation.from_messages([]), Role.ASSISTANT)
    return tuple(tokens)


def default_auto_drop_analysis(policy: MaskPolicy) -> bool:
    """openai-harmony's default (drop early reasoning) unless the policy trains reasoning; see the module docstring."""
    return MaskPolicy.parse(policy) is MaskPolicy.FINAL


def _has_function_tools(conv: Conversation) -> bool:
    from openai_harmony import DeveloperContent

    for message in conv.messages:
        for part in message.content:
            if isinstance(part, DeveloperContent) and part.tools and part.tools.get("functions") is not None:
                if part.tools["functions"].tools:
                    return True
    return False


def _split_at_starts(tokens: list[int]) -> list[tuple[int, int]]:
    starts = [i for i, token in enumerate(tokens) if token == START]
    if not starts or starts[0] != 0:
        raise RenderMismatchError("rendered conversation does not begin with <|start|>")
    return [(begin, end) for begin, end in zip(starts, starts[1:] + [len(tokens)])]


_MESSAGE_CACHE: dict[tuple[str, bool], tuple[int, ...]] = {}
_MESSAGE_CACHE_SIZE = 4096


def _render_message(message: Message, has_function_tools: bool) -> list[int]:
    """``HarmonyEncoding.render`` of one message, cached by its JSON: the system and developer messages (tools!)
    repeat across a dataset and are the most expensive ones to render. The message object itself is rendered on a
    miss (a JSON round trip would turn ``reasoning_effort=None`` back into the default)."""
    key = (message.to_json(), has_function_tools)
    tokens = _MESSAGE_CACHE.get(key)
    if tokens is None:
        if len(_MESSAGE_CACHE) >= _MESSAGE_CACHE_SIZE:
            _MESSAGE_CACHE.clear()
        encoding = load_harmony_encoding()
        tokens = tuple(encoding.render(message, RenderOptions(conversation_has_function_tools=has_function_tools)))
        _MESSAGE_CACHE[key] = tokens
    return list(tokens)


def message_spans(conv: Conversation, tokens: list[int]) -> list[tuple[Message, int, int]]:
    """Pair each message openai-harmony rendered into ``tokens`` with its ``[start, end)`` token span."""
    has_tools = _has_function_tools(conv)
    pieces = _split_at_starts(tokens)
    spans: list[tuple[Message, int, int]] = []
    piece_index = 0
    for message in conv.messages:
        if piece_index >= len(pieces):
            break
        begin, end = pieces[piece_index]
        alone = _render_message(message, has_tools)
        piece = tokens[begin:end]
        # The training render ends the last final message with <|return|> instead of <|end|>.
        same = piece == alone or (
            end == len(tokens) and piece[:-1] == alone[:-1] and alone[-1] == END and piece[-1] == RETURN
        )
        if same:
            spans.append((message, begin, end))
            piece_index += 1
        elif message.author.role == Role.ASSISTANT and message.channel == "analysis":
            continue  # dropped by auto_drop_analysis
        else:
            raise RenderMismatchError(
                f"cannot match rendered tokens {begin}:{end} to message {message.author.role.value} "
                f"(channel={message.channel}); openai-harmony's rendering changed?"
            )
    if piece_index != len(pieces):
        raise RenderMismatchError("rendered conversation has more messages than the conversation")
    return spans


def render_for_training(
    conv: Conversation,
    policy: MaskPolicy | str = MaskPolicy.ALL_ASSISTANT,
    *,
    auto_drop_analysis: bool | None = None,
) -> RenderedExample:
    """Token ids exactly as ``render_conversation_for_training`` and the loss mask of ``policy``."""
    policy = MaskPolicy.parse(policy)
    if auto_drop_analysis is None:
        auto_drop_analysis = default_auto_drop_analysis(policy)
    encoding = load_harmony_encoding()
    tokens = list(
        encoding.render_conversation_for_training(conv, RenderConversationConfig(auto_drop_analysis=auto_drop_analysis))
    )
    spans = message_spans(conv, tokens)
    mask = [0] * len(tokens)
    prompt_len = len(_assistant_prompt_tokens())
    previous_role = None
    for message, begin, end in spans:
        if policy.trains(message):
            # A turn's first <|start|>assistant is the prompt; inside a turn the model generates it itself.
            first = begin if previous_role == Role.ASSISTANT else begin + prompt_len
            if tuple(tokens[begin:begin + prompt_len]) != _assistant_prompt_tokens():
                raise RenderMismatchError("assistant message does not start with <|start|>assistant")
            for i in range(first, end):
                mask[i] = 1
        previous_role = message.author.role
    return RenderedExample(input_ids=tokens, loss_mask=mask, spans=spans)


def render_prompt(conv: Conversation) -> list[int]:
    """Generation prompt exactly as ``render_conversation_for_completion(conv, Role.ASSISTANT)``.

    Ends with ``<|start|>assistant``. openai-harmony's default (``auto_drop_analysis=True``) applies: when the last
    assistant message is a final answer, analysis messages before the conversation's first final are left out.
    """
    encoding = load_harmony_encoding()
    return list(encoding.render_conversation_for_completion(conv, Role.ASSISTANT))


def render_conversation(conv: Conversation, *, auto_drop_analysis: bool = True) -> list[int]:
    """The conversation as it stands (no generation prompt), exactly as ``render_conversation``."""
    encoding = load_harmony_encoding()
    return list(encoding.render_conversation(conv, RenderConversationConfig(auto_drop_analysis=auto_drop_analysis)))


ASSISTANT_STOP_TOKENS = (RETURN, CALL)
