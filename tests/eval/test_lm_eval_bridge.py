"""lm-eval bridge: registered as ``gptoss``; Harmony-rendered generation (final channel) and loglikelihood."""

import math

import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from gptoss_train.eval.backends.oracle import FunctionBackend, canned_turn  # noqa: E402
from gptoss_train.eval.lm_eval_bridge import GptOssLM  # noqa: E402


def _instance(kind, arguments, idx=0):
    return Instance(request_type=kind, doc={}, arguments=arguments, idx=idx, metadata=("t", idx, 1))


def test_registered_and_generate_until_returns_final_only():
    assert get_model("gptoss") is GptOssLM
    seen = []

    def respond(request):
        seen.append(request)
        return canned_turn(analysis="The answer is 4. STOP", final="4\nQuestion: next one")

    lm = GptOssLM(backend=FunctionBackend(respond), reasoning_effort="low", max_gen_toks=2048)
    outputs = lm.generate_until([_instance("generate_until", ("Q: 2+2?\nA:", {"until": ["Question:"],
                                                                              "max_gen_toks": 32}))])
    assert outputs == ["4\n"]  # final channel, cut at the task's stop string; analysis ignored
    assert seen[0].reasoning_effort == "low" and seen[0].max_tokens == 2048
    assert seen[0].messages == [{"role": "user", "content": "Q: 2+2?\nA:"}]

    # --apply_chat_template: few-shot turns arrive as real chat turns
    chat = lm.apply_chat_template([{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
                                   {"role": "user", "content": "2+2?"}])
    lm.generate_until([_instance("generate_until", (chat, {"until": []}))])
    assert [m["role"] for m in seen[-1].messages] == ["user", "assistant", "user"]

    no_final = GptOssLM(backend=FunctionBackend(lambda r: canned_turn(analysis="4", tool_call={
        "name": "x", "arguments": "{}"})))
    assert no_final.generate_until([_instance("generate_until", ("2+2?", {}))]) == [""]


def test_loglikelihood_on_the_tiny_model(tiny_local_backend):
    lm = GptOssLM(backend=tiny_local_backend, reasoning_effort="low")
    (a_logprob, a_greedy), (b_logprob, _) = lm.loglikelihood([
        _instance("loglikelihood", ("The capital of France is", " Paris")),
        _instance("loglikelihood", ("The capital of France is", " Paris Paris")),
    ])
    assert math.isfinite(a_logprob) and a_logprob < 0 and isinstance(a_greedy, bool)
    assert b_logprob < a_logprob  # one more token can only lower the log-probability
    (rolling,) = lm.loglikelihood_rolling([_instance("loglikelihood_rolling", ("hello world",))])
    assert math.isfinite(rolling) and rolling < 0


def test_loglikelihood_needs_a_local_model():
    lm = GptOssLM(backend=FunctionBackend(lambda r: canned_turn(final="x")))
    with pytest.raises(NotImplementedError, match="local model"):
        lm.loglikelihood([_instance("loglikelihood", ("a", " b"))])
