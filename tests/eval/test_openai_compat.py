"""The OpenAI-compatible backend against a real HTTP server on loopback (tests/eval/fake_openai_server.py)."""

import json

import pytest

from gptoss_train.eval import run_suite
from gptoss_train.eval.backends import backend_kind, load_backend
from gptoss_train.eval.backends.openai_compat import OpenAIBackend, OpenAIBackendError
from gptoss_train.eval.core import GenerationRequest
from gptoss_train.harmony.encoding import START

from fake_openai_server import FakeOpenAIServer

FINAL_TURN = "<|channel|>analysis<|message|>2+2 is 4<|end|><|start|>assistant<|channel|>final<|message|>\\boxed{4}"
CALL_TURN = ('<|channel|>analysis<|message|>need weather<|end|><|start|>assistant<|channel|>commentary '
             'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}')

REQUEST = GenerationRequest(messages=[{"role": "user", "content": "What is 2+2?"}], reasoning_effort="high",
                            max_tokens=64, temperature=0.0, seed=3)


def test_spec_dispatch():
    assert backend_kind("http://localhost:8000/v1") == "openai"
    assert backend_kind("https://api.example.com") == "openai"
    assert backend_kind("exports/model.Q4.gguf") == "llamacpp"
    assert backend_kind("oracle") == "oracle"
    assert backend_kind("openai/gpt-oss-20b") == "local"
    assert backend_kind("runs/tiny") == "local"


def test_completions_sends_harmony_prompt_and_parses_final():
    with FakeOpenAIServer(completion_text=FINAL_TURN + "<|return|>", stop_reason="<|return|>") as server:
        backend = OpenAIBackend(server.url)
        result = backend.generate(REQUEST)
        path, body = server.requests[-1]
    assert path == "/v1/completions"
    assert body["model"] == "fake-gpt-oss"  # taken from /v1/models
    assert body["prompt"].startswith("<|start|>system<|message|>") and body["prompt"].endswith("<|start|>assistant")
    assert "Reasoning: high" in body["prompt"]
    assert body["temperature"] == 0.0 and body["seed"] == 3 and body["max_tokens"] == 64
    assert body["skip_special_tokens"] is False
    assert result.final == "\\boxed{4}" and result.analysis == "2+2 is 4" and result.finish_reason == "return"


def test_completions_restores_a_stripped_stop_token_and_reads_tool_calls():
    # llama.cpp's server strips the matched stop string and reports no stop_reason.
    with FakeOpenAIServer(completion_text=CALL_TURN) as server:
        result = OpenAIBackend(server.url, prompt_format="tokens").generate(REQUEST)
        prompt = server.requests[-1][1]["prompt"]
    assert isinstance(prompt, list) and prompt[0] == START
    assert result.finish_reason == "call"
    assert result.tool_calls[0]["name"] == "get_weather"
    assert result.tool_calls[0]["parsed_arguments"] == {"city": "Paris"}
    with FakeOpenAIServer(completion_text=FINAL_TURN) as server:
        assert OpenAIBackend(server.url).generate(REQUEST).finish_reason == "return"
    with FakeOpenAIServer(completion_text=FINAL_TURN[:40], finish_reason="length") as server:
        result = OpenAIBackend(server.url).generate(REQUEST)
    assert result.finish_reason == "truncated" and result.final is None


def test_chat_api_passes_reasoning_effort_and_reads_reasoning_fields():
    message = {"role": "assistant", "content": "Answer: 4", "reasoning_content": "2+2=4"}
    with FakeOpenAIServer(chat_message=message) as server:
        result = OpenAIBackend(server.url, api="chat", served_model="m").generate(REQUEST)
        path, body = server.requests[-1]
    assert path == "/v1/chat/completions"
    assert body["reasoning_effort"] == "high" and body["messages"] == REQUEST.messages and body["model"] == "m"
    assert result.final == "Answer: 4" and result.analysis == "2+2=4" and result.finish_reason == "return"

    tool_message = {"role": "assistant", "content": None, "reasoning": "call it", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}
    with FakeOpenAIServer(chat_message=tool_message) as server:
        result = OpenAIBackend(server.url, api="chat").generate(REQUEST)
    assert result.final is None and result.analysis == "call it" and result.finish_reason == "call"
    assert result.tool_calls == [{"name": "get_weather", "arguments": '{"city": "Oslo"}',
                                  "parsed_arguments": {"city": "Oslo"}}]


def test_auto_falls_back_to_chat_when_there_is_no_completions_endpoint():
    with FakeOpenAIServer(completions_status=404, chat_message={"role": "assistant", "content": "4"}) as server:
        backend = OpenAIBackend(server.url, api="auto")
        assert backend.generate(REQUEST).final == "4"
        assert backend.generate(REQUEST).final == "4"
        paths = [p for p, _ in server.requests]
    assert paths == ["/v1/completions", "/v1/chat/completions", "/v1/chat/completions"]
    assert backend.api == "chat"


def test_retries_after_500_then_succeeds():
    with FakeOpenAIServer(completion_text=FINAL_TURN + "<|return|>", fail_first=2) as server:
        backend = OpenAIBackend(server.url, served_model="m", backoff=0.01)
        result = backend.generate(REQUEST)
        assert len(server.requests) == 3
    assert result.final == "\\boxed{4}" and result.error is None


def test_retries_exhausted_is_recorded_as_backend_error():
    with FakeOpenAIServer(fail_first=100) as server:
        backend = OpenAIBackend(server.url, served_model="m", max_retries=2, backoff=0.01)
        result = backend.generate(REQUEST)
        assert len(server.requests) == 3
    assert result.finish_reason == "error" and "HTTP 500" in result.error


def test_timeout_is_retried():
    with FakeOpenAIServer(completion_text=FINAL_TURN + "<|return|>", stall_first=1, stall_seconds=1.5) as server:
        backend = OpenAIBackend(server.url, served_model="m", timeout=0.3, backoff=0.01)
        result = backend.generate(REQUEST)
        assert len(server.requests) == 2
    assert result.final == "\\boxed{4}"


def test_client_errors_stop_with_the_server_message():
    with FakeOpenAIServer(fail_first=5, fail_status=401) as server:
        backend = OpenAIBackend(server.url, served_model="m")
        with pytest.raises(OpenAIBackendError, match="HTTP 401.*overloaded"):
            backend.generate(REQUEST)
        assert len(server.requests) == 1  # not retried


def test_suite_run_through_server_with_concurrency(tmp_path):
    with FakeOpenAIServer(completion_text="<|channel|>final<|message|>The answer is \\boxed{24}<|return|>") as server:
        backend = load_backend(server.url, concurrency=4)
        results = run_suite("aime25", model=backend, data="bundled", progress=False, out_dir=tmp_path)
        assert len(server.requests) == 5
    metrics = results["metrics"]["medium"]
    assert metrics["score"] == pytest.approx(2 / 5)  # two bundled items have the answer 24
    assert results["model"]["backend"] == "openai"
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert all(row["details"]["prompt_hash"] and row["details"]["output"] for row in rows)


def test_unreachable_server_fails_fast_with_a_clear_message():
    import socket
    import time

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = OpenAIBackend(f"http://127.0.0.1:{port}/v1", backoff=5.0)
    started = time.perf_counter()
    with pytest.raises(OpenAIBackendError, match="is the server running"):
        backend.generate(REQUEST)
    assert time.perf_counter() - started < 2.0  # no backoff rounds before the first contact
