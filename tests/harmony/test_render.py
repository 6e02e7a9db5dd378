"""render: token identity with openai-harmony, and the loss mask of each policy checked on decoded text."""

from __future__ import annotations

import pytest
from chat_cases import CASES, WEATHER_TOOL
from openai_harmony import RenderConversationConfig, Role

from gptoss_train.harmony.conversation import conversation_from_chat
from gptoss_train.harmony.encoding import CALL, END, RETURN, START
from gptoss_train.harmony.render import (
    MaskPolicy,
    default_auto_drop_analysis,
    render_conversation,
    render_for_training,
    render_prompt,
)

CASE_IDS = [case[0] for case in CASES]


def trained_runs(encoding, example):
    """Decoded text of each maximal run of trained tokens."""
    runs, current = [], []
    for token, trained in zip(example.input_ids, example.loss_mask):
        if trained:
            current.append(token)
        elif current:
            runs.append(encoding.decode(current))
            current = []
    if current:
        runs.append(encoding.decode(current))
    return runs


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_token_identical_to_openai_harmony(case, harmony_encoding):
    _, messages, kwargs = case
    conv = conversation_from_chat(messages, **kwargs)
    for policy in MaskPolicy:
        example = render_for_training(conv, policy)
        config = RenderConversationConfig(auto_drop_analysis=default_auto_drop_analysis(policy))
        assert example.input_ids == harmony_encoding.render_conversation_for_training(conv, config)
        assert len(example.loss_mask) == len(example.input_ids)
        assert set(example.loss_mask) <= {0, 1}
    for drop in (True, False):
        example = render_for_training(conv, MaskPolicy.ALL_ASSISTANT, auto_drop_analysis=drop)
        assert example.input_ids == harmony_encoding.render_conversation_for_training(
            conv, RenderConversationConfig(auto_drop_analysis=drop))
    prompt = render_prompt(conv)
    assert prompt == harmony_encoding.render_conversation_for_completion(conv, Role.ASSISTANT)
    assert harmony_encoding.decode(prompt[-2:]) == "<|start|>assistant"
    assert render_conversation(conv) == harmony_encoding.render_conversation(conv)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_mask_structure(case, harmony_encoding):
    """Every trained run ends with a message end token and no non-assistant token is ever trained."""
    _, messages, kwargs = case
    conv = conversation_from_chat(messages, **kwargs)
    for policy in MaskPolicy:
        example = render_for_training(conv, policy)
        for message, begin, end in example.spans:
            if message.author.role != Role.ASSISTANT:
                assert not any(example.loss_mask[begin:end])
        for i, trained in enumerate(example.loss_mask):
            if trained and (i + 1 == len(example.loss_mask) or not example.loss_mask[i + 1]):
                assert example.input_ids[i] in (END, RETURN, CALL)
        # A trained <|start|> only ever continues an assistant turn.
        for i, token in enumerate(example.input_ids):
            if token == START and example.loss_mask[i]:
                assert example.loss_mask[i - 1] == 1 or example.input_ids[i - 1] in (END, CALL)


def _conv(case_id):
    _, messages, kwargs = next(case for case in CASES if case[0] == case_id)
    return conversation_from_chat(messages, **kwargs)


EXPECTED_TRAINED = {
    ("thinking", MaskPolicy.FINAL): ["<|channel|>final<|message|>5<|return|>"],
    ("thinking", MaskPolicy.REASONING_AND_FINAL): [
        "<|channel|>analysis<|message|>Add them: 5.<|end|><|start|>assistant<|channel|>final<|message|>5<|return|>"],
    ("thinking", MaskPolicy.ALL_ASSISTANT): [
        "<|channel|>analysis<|message|>Add them: 5.<|end|><|start|>assistant<|channel|>final<|message|>5<|return|>"],
    ("tool_call", MaskPolicy.FINAL): ["<|channel|>final<|message|>It is 21 °C in Paris.<|return|>"],
    ("tool_call", MaskPolicy.REASONING_AND_FINAL): [
        "<|channel|>analysis<|message|>Use the tool.<|end|>",
        "<|channel|>analysis<|message|>21 degrees.<|end|><|start|>assistant<|channel|>final<|message|>"
        "It is 21 °C in Paris.<|return|>"],
    ("tool_call", MaskPolicy.ALL_ASSISTANT): [
        "<|channel|>analysis<|message|>Use the tool.<|end|><|start|>assistant to=functions.get_weather"
        "<|channel|>commentary <|constrain|>json<|message|>{\"city\": \"Paris\"}<|call|>",
        "<|channel|>analysis<|message|>21 degrees.<|end|><|start|>assistant<|channel|>final<|message|>"
        "It is 21 °C in Paris.<|return|>"],
    ("parallel_calls", MaskPolicy.ALL_ASSISTANT): [
        "<|channel|>analysis<|message|>Two calls.<|end|>"
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
        "{\"city\": \"Oslo\"}<|call|>"
        "<|start|>assistant to=functions.get_time<|channel|>commentary <|constrain|>json<|message|>"
        "{\"city\": \"Oslo\"}<|call|>",
        "<|channel|>final<|message|>Cold, and it is 9 am.<|return|>"],
    ("preamble", MaskPolicy.ALL_ASSISTANT): [
        "<|channel|>commentary<|message|>Let me look that up.<|end|><|start|>assistant to=functions.get_weather"
        "<|channel|>commentary <|constrain|>json<|message|>{\"city\": \"Paris\"}<|call|>",
        "<|channel|>final<|message|>Rain.<|return|>"],
    ("preamble", MaskPolicy.REASONING_AND_FINAL): ["<|channel|>final<|message|>Rain.<|return|>"],
    # FINAL keeps openai-harmony's default: reasoning before the first final is dropped, later reasoning stays
    # (untrained) as context.
    ("three_turns", MaskPolicy.FINAL): ["<|channel|>final<|message|>f1<|end|>",
                                        "<|start|>assistant<|channel|>final<|message|>f2<|end|>",
                                        "<|start|>assistant<|channel|>final<|message|>f3<|return|>"],
    ("three_turns", MaskPolicy.REASONING_AND_FINAL): [
        "<|channel|>analysis<|message|>r1<|end|><|start|>assistant<|channel|>final<|message|>f1<|end|>",
        "<|channel|>analysis<|message|>r2<|end|><|start|>assistant<|channel|>final<|message|>f2<|end|>",
        "<|channel|>analysis<|message|>r3<|end|><|start|>assistant<|channel|>final<|message|>f3<|return|>"],
    ("ends_with_call", MaskPolicy.FINAL): [],
    ("ends_with_call", MaskPolicy.REASONING_AND_FINAL): ["<|channel|>analysis<|message|>Call it.<|end|>"],
    ("ends_with_call", MaskPolicy.ALL_ASSISTANT): [
        "<|channel|>analysis<|message|>Call it.<|end|><|start|>assistant to=functions.get_weather<|channel|>"
        "commentary <|constrain|>json<|message|>{\"city\": \"Lima\"}<|call|>"],
    ("ends_with_user", MaskPolicy.ALL_ASSISTANT): [
        "<|channel|>analysis<|message|>r<|end|><|start|>assistant<|channel|>final<|message|>A1<|end|>"],
}


@pytest.mark.parametrize("key", list(EXPECTED_TRAINED), ids=[f"{k[0]}-{k[1].value}" for k in EXPECTED_TRAINED])
def test_trained_tokens_by_policy(key, harmony_encoding):
    case_id, policy = key
    example = render_for_training(_conv(case_id), policy)
    assert trained_runs(harmony_encoding, example) == EXPECTED_TRAINED[key]


def test_three_turns_context_under_final_policy(harmony_encoding):
    """openai-harmony drops only the reasoning before the first final; r2 and r3 stay in the sequence."""
    text = harmony_encoding.decode(render_for_training(_conv("three_turns"), MaskPolicy.FINAL).input_ids)
    assert "r1" not in text and "<|message|>r2<|end|>" in text and "<|message|>r3<|end|>" in text


EXPECTED_TEXT = {
    "tool_call": (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\n\nReasoning: medium\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.\n"
        "Calls to these tools must go to the commentary channel: 'functions'.<|end|>"
        "<|start|>developer<|message|># Tools\n\n## functions\n\nnamespace functions {\n\n"
        "// Current weather for a city\ntype get_weather = (_: {\n// City name\ncity: string,\n"
        "unit?: \"celsius\" | \"fahrenheit\",\n}) => any;\n\n} // namespace functions<|end|>"
        "<|start|>user<|message|>Weather in Paris?<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>Use the tool.<|end|>"
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
        "{\"city\": \"Paris\"}<|call|>"
        "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{\"temp\": 21}<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>21 degrees.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>It is 21 °C in Paris.<|return|>"
    ),
    "effort_high_date": (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\nCurrent date: 2025-06-28\n\nReasoning: high\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
        "<|start|>user<|message|>Date?<|end|><|start|>assistant<|channel|>final<|message|>Today.<|return|>"
    ),
    "instructions_joined": (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\n\nReasoning: medium\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
        "<|start|>developer<|message|># Instructions\n\nFirst.\n\nSecond.<|end|>"
        "<|start|>user<|message|>Go<|end|><|start|>assistant<|channel|>final<|message|>Ok<|return|>"
    ),
}


@pytest.mark.parametrize("case_id", list(EXPECTED_TEXT))
def test_full_text(case_id, harmony_encoding):
    example = render_for_training(_conv(case_id), MaskPolicy.ALL_ASSISTANT)
    assert harmony_encoding.decode(example.input_ids) == EXPECTED_TEXT[case_id]


def test_policy_names():
    assert MaskPolicy.parse("reasoning-final") is MaskPolicy.REASONING_AND_FINAL
    assert MaskPolicy.parse("FINAL") is MaskPolicy.FINAL
    with pytest.raises(ValueError, match="choose one of"):
        MaskPolicy.parse("everything")


def test_prompt_drops_reasoning_like_harmony(harmony_encoding):
    conv = conversation_from_chat([{"role": "user", "content": "A"},
                                   {"role": "assistant", "thinking": "secret", "content": "B"},
                                   {"role": "user", "content": "C"}], tools=[WEATHER_TOOL])
    text = harmony_encoding.decode(render_prompt(conv))
    # The last assistant message is a final answer, so the earlier reasoning is left out of the prompt.
    assert "secret" not in text and "<|channel|>final<|message|>B<|end|>" in text
