"""A small OpenAI-compatible HTTP server on loopback for the backend tests.

It speaks /v1/models, /v1/completions and /v1/chat/completions, answers from canned replies, and can be told to
fail (HTTP 500 with Retry-After, or stall past the client's timeout) for the first N requests. Every request body is
recorded so tests can check what the backend sent.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAIServer:
    def __init__(self, *, completion_text="", chat_message=None, finish_reason="stop", stop_reason=None,
                 fail_first=0, fail_status=500, stall_first=0, stall_seconds=2.0, completions_status=None):
        self.completion_text = completion_text
        self.chat_message = chat_message or {"role": "assistant", "content": ""}
        self.finish_reason = finish_reason
        self.stop_reason = stop_reason
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.stall_first = stall_first
        self.stall_seconds = stall_seconds
        self.completions_status = completions_status  # e.g. 404: "this server has no /v1/completions"
        self.requests: list[tuple[str, dict]] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address
        return f"http://{host}:{port}/v1"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, status, payload, headers=None):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": "fake-gpt-oss", "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with server._lock:
                    server.requests.append((self.path, body))
                    number = len(server.requests)
                if number <= server.stall_first:
                    time.sleep(server.stall_seconds)
                    self._send(200, {"choices": [{"text": "", "finish_reason": "length"}]})
                    return
                if number <= server.stall_first + server.fail_first:
                    self._send(server.fail_status, {"error": {"message": "overloaded"}}, {"Retry-After": "0"})
                    return
                if self.path == "/v1/completions":
                    if server.completions_status:
                        self._send(server.completions_status, {"error": {"message": "no such endpoint"}})
                        return
                    choice = {"index": 0, "text": server.completion_text, "finish_reason": server.finish_reason}
                    if server.stop_reason is not None:
                        choice["stop_reason"] = server.stop_reason
                    self._send(200, {"object": "text_completion", "choices": [choice],
                                     "usage": {"prompt_tokens": 10, "completion_tokens": 5}})
                elif self.path == "/v1/chat/completions":
                    finish = "tool_calls" if server.chat_message.get("tool_calls") else server.finish_reason
                    self._send(200, {"object": "chat.completion",
                                     "choices": [{"index": 0, "message": server.chat_message, "finish_reason": finish}],
                                     "usage": {"prompt_tokens": 10, "completion_tokens": 5}})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

        return Handler
