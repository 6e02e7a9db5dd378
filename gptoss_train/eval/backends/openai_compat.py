"""Any OpenAI-compatible server: vLLM, Ollama, llama.cpp's server, SGLang, hosted endpoints.

Two APIs, because they grade differently (DESIGN.md §4: chat vs completions gave 0.30 vs 0.90 on GSM8K):

* ``api="completions"`` (default): ``/v1/completions`` with OUR Harmony-rendered prompt (text with special tokens,
  or token ids with ``prompt_format="tokens"``), special tokens kept in the output, parsed by our parser. The server's
  chat template and reasoning parser play no part, so every server is prompted exactly like the local model.
* ``api="chat"``: ``/v1/chat/completions`` with ``reasoning_effort`` passed; the answer is ``message.content``,
  the analysis is read from ``reasoning_content`` / ``reasoning``, tool calls from ``tool_calls``. Use it for servers
  without a raw completions endpoint.
* ``api="auto"``: completions, switching to chat once if the server has no completions endpoint (404/405/501).

Transient failures (connection errors, timeouts, HTTP 408/429/5xx) are retried with exponential backoff, honouring
``Retry-After``; a sample whose retries run out is recorded as ``backend_error``. Other HTTP errors (bad model name,
bad key) stop the run with the server's message: repeating them on every sample would only hide the problem.
We use urllib rather than the ``openai`` client: no extra dependency, and full control of fields such as
``skip_special_tokens`` that servers accept outside the OpenAI schema.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from gptoss_train.eval.core import Backend, GenerationRequest, GenerationResult
from gptoss_train.eval.harmony_io import prompt_tokens, decode, result_from_harmony_text
from gptoss_train.harmony.encoding import CALL, RETURN

logger = logging.getLogger(__name__)

_RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_NO_ENDPOINT_STATUS = {404, 405, 501}


class OpenAIBackendError(RuntimeError):
    """A non-retryable server error (wrong URL, model name, key...)."""


class RetriesExhausted(OpenAIBackendError):
    """A transient failure that outlasted the retries: recorded on the sample as ``backend_error``."""


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class OpenAIBackend(Backend):
    name = "openai"
    OPTIONS = ("api", "api_key", "served_model", "concurrency", "timeout", "max_retries", "backoff", "prompt_format")

    def __init__(self, url: str, *, api: str = "auto", api_key: str | None = None, served_model: str | None = None,
                 concurrency: int = 8, timeout: float = 600.0, max_retries: int = 4, backoff: float = 1.0,
                 prompt_format: str = "text"):
        if api not in ("auto", "completions", "chat"):
            raise ValueError(f"api must be auto, completions or chat, got {api!r}")
        if prompt_format not in ("text", "tokens"):
            raise ValueError(f"prompt_format must be text or tokens, got {prompt_format!r}")
        base = url.rstrip("/")
        for suffix in ("/chat/completions", "/completions"):
            if base.endswith(suffix):
                base = base[: -len(suffix)]
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        self.api = api
        self.api_key = api_key
        self.concurrency = max(1, int(concurrency))
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.prompt_format = prompt_format
        self._served_model = served_model
        self._reached = False  # set once the server has answered anything (even an error)
        self._lock = threading.Lock()
        self.calls = 0  # HTTP requests sent (retries included): tests and reports read it

    # ------------------------------------------------------------------ HTTP
    def _post(self, path: str, body: dict) -> dict:
        """POST with retries; returns the decoded JSON body."""
        attempt = 0
        while True:
            try:
                return self._request("POST", path, body)
            except _Retryable as exc:
                if attempt >= self.max_retries:
                    raise RetriesExhausted(
                        f"{self.base_url}{path} failed after {attempt + 1} attempts: {exc}"
                    ) from exc
                delay = exc.retry_after if exc.retry_after is not None else self.backoff * 2**attempt
                logger.warning("%s%s: %s; retrying in %.1fs", self.base_url, path, exc, delay)
                time.sleep(min(delay, 60.0))
                attempt += 1

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        http_request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        with self._lock:
            self.calls += 1
        try:
            with urllib.request.urlopen(http_request, timeout=self.timeout) as response:
                self._reached = True
                return json.loads(response.read().decode())
        except urllib.error.HTTPError as exc:
            self._reached = True
            detail = exc.read().decode(errors="replace")[:500]
            if exc.code in _RETRYABLE_STATUS:
                retry_after = exc.headers.get("Retry-After") if exc.headers else None
                raise _Retryable(f"HTTP {exc.code}: {detail}", _parse_retry_after(retry_after)) from exc
            raise _HTTPStatusError(exc.code, f"{method} {self.base_url}{path} -> HTTP {exc.code}: {detail}") from exc
        except (socket.timeout, TimeoutError) as exc:
            raise _Retryable(f"timed out after {self.timeout:.0f}s") from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (socket.timeout, TimeoutError)):
                raise _Retryable(f"timed out after {self.timeout:.0f}s") from exc
            if not self._reached:
                # Never answered at all: a wrong URL or a server that is not running. Retrying every sample with
                # backoff would only hide that for minutes.
                raise OpenAIBackendError(
                    f"cannot reach {self.base_url} ({exc.reason}): is the server running, and is the URL right "
                    "(e.g. http://localhost:8000/v1)?"
                ) from exc
            raise _Retryable(f"cannot reach server: {exc.reason}") from exc
        except (ConnectionError, json.JSONDecodeError) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from exc

    @property
    def served_model(self) -> str:
        """The server's model name: given, else the first of ``GET /v1/models`` (vLLM/llama.cpp serve one)."""
        if self._served_model is None:
            try:
                listing = self._request("GET", "/models")
                self._served_model = listing["data"][0]["id"]
            except (_HTTPStatusError, _Retryable, KeyError, IndexError, TypeError):  # no /models: any name goes
                self._served_model = "default"
        return self._served_model

    # ------------------------------------------------------------------ generation
    def generate(self, request: GenerationRequest) -> GenerationResult:
        started = time.perf_counter()
        try:
            api = self.api
            if api in ("auto", "completions"):
                try:
                    result = self._generate_completions(request)
                except _HTTPStatusError as exc:
                    if api == "auto" and exc.status in _NO_ENDPOINT_STATUS:
                        logger.warning("%s has no /completions endpoint (%s); using /chat/completions",
                                       self.base_url, exc.status)
                        self.api = "chat"
                        result = self._generate_chat(request)
                    else:
                        raise OpenAIBackendError(str(exc)) from exc
                else:
                    if api == "auto":
                        self.api = "completions"
            else:
                result = self._generate_chat(request)
        except _HTTPStatusError as exc:
            raise OpenAIBackendError(str(exc)) from exc
        except RetriesExhausted as exc:
            result = GenerationResult(text="", final=None, analysis=None, tool_calls=[], finish_reason="error",
                                      error=str(exc))
        result.usage["seconds"] = time.perf_counter() - started
        return result

    def generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        if len(requests) <= 1 or self.concurrency == 1:
            return [self.generate(request) for request in requests]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            return list(pool.map(self.generate, requests))

    def _sampling(self, request: GenerationRequest) -> dict:
        body = {"max_tokens": request.max_tokens, "temperature": request.temperature, "top_p": request.top_p}
        if request.seed is not None:
            body["seed"] = request.seed
        return body

    def _generate_completions(self, request: GenerationRequest) -> GenerationResult:
        ids = prompt_tokens(request)
        body = {
            "model": self.served_model,
            "prompt": ids if self.prompt_format == "tokens" else decode(ids),
            "stop": ["<|return|>", "<|call|>"],
            # vLLM: keep <|channel|>, <|message|>... in the text, and the matched stop string.
            "skip_special_tokens": False,
            "include_stop_str_in_output": True,
            **self._sampling(request),
        }
        response = self._post("/completions", body)
        choice = response["choices"][0]
        finish = choice.get("finish_reason")
        stop_reason = choice.get("stop_reason")
        stop_token = {"<|call|>": CALL, CALL: CALL, "<|return|>": RETURN, RETURN: RETURN}.get(stop_reason)
        usage = dict(response.get("usage") or {})
        return result_from_harmony_text(choice.get("text") or "", stopped=finish == "stop", stop_token=stop_token,
                                        usage=usage)

    def _generate_chat(self, request: GenerationRequest) -> GenerationResult:
        messages = list(request.messages)
        if request.developer_instructions:
            messages = [{"role": "developer", "content": request.developer_instructions}] + messages
        body = {"model": self.served_model, "messages": messages, **self._sampling(request)}
        if request.tools:
            body["tools"] = request.tools
        if request.reasoning_effort:
            body["reasoning_effort"] = request.reasoning_effort
        response = self._post("/chat/completions", body)
        choice = response["choices"][0]
        message = choice.get("message") or {}
        analysis = message.get("reasoning_content") or message.get("reasoning")
        tool_calls = []
        for call in message.get("tool_calls") or []:
            function = call.get("function") or {}
            arguments = function.get("arguments") or ""
            try:
                parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
                parsed = parsed if isinstance(parsed, dict) else None
            except json.JSONDecodeError:
                parsed = None
            tool_calls.append({"name": function.get("name", ""), "arguments": arguments if isinstance(arguments, str)
                               else json.dumps(arguments), "parsed_arguments": parsed})
        finish = choice.get("finish_reason")
        content = message.get("content")
        if finish == "length":
            finish_reason = "truncated"
        elif tool_calls:
            finish_reason = "call"
        else:
            finish_reason = "return"
        return GenerationResult(text=content or "", final=content if content else None, analysis=analysis,
                                tool_calls=tool_calls, finish_reason=finish_reason,
                                usage=dict(response.get("usage") or {}))

    def describe(self) -> dict:
        return {"backend": "openai", "model": self.base_url, "served_model": self._served_model, "api": self.api,
                "prompt_format": self.prompt_format}


class _HTTPStatusError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
