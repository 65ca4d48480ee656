#!/usr/bin/env python3
"""A small OpenAI-compatible server that answers with its own name: the catalog model of the front door's tests.

Standard library only (the sandbox's models run under the system's python3):

    fake_openai.py --name NAME --port PORT [--host 127.0.0.1]

POST /v1/chat/completions and /v1/completions answer "I am NAME." (`stream: true`: as server-sent events, one
word per chunk, `fake_chunk_delay` seconds apart, then `data: [DONE]`); /v1/embeddings a short vector; GET
/v1/models and any GET path answer too (the path is echoed, for the /upstream/ passthrough). A body's
`fake_sleep` (seconds) delays the answer: a request that stays in flight while the tests swap other models.
"""

from __future__ import annotations

import argparse
import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def words(name: str) -> list[str]:
    return ["I", " am", f" {name}", "."]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.server.name, "object": "model"}]})
        else:
            self._json(200, {"name": self.server.name, "path": self.path})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            request = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            self._json(400, {"error": {"message": "bad json", "type": "invalid_request_error", "code": None}})
            return
        time.sleep(float(request.get("fake_sleep", 0)))
        name = self.server.name
        if self.path == "/v1/embeddings":
            self._json(200, {"object": "list", "model": name, "data": [{"object": "embedding", "index": 0,
                                                                       "embedding": [0.1, 0.2, 0.3]}],
                             "usage": {"prompt_tokens": 1, "total_tokens": 1}})  # fmt: skip
        elif self.path in ("/v1/chat/completions", "/v1/completions"):
            chat = self.path == "/v1/chat/completions"
            if request.get("stream"):
                self._stream(chat, request)
            else:
                self._json(200, self._completion(chat, "".join(words(name)), request))
        else:
            self._json(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})

    def _completion(self, chat: bool, text: str, request: dict[str, Any], final: bool = True) -> dict[str, Any]:
        created = int(time.time())
        name = self.server.name
        if chat:
            key = "message" if final else "delta"
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, key: message, "finish_reason": "stop" if final else None}
            kind = "chat.completion" if final else "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text, "finish_reason": "stop" if final else None, "logprobs": None}
            kind = "text_completion"
        body: dict[str, Any] = {"id": f"fake-{name}", "object": kind, "created": created, "model": name,
                                "choices": [choice]}  # fmt: skip
        if final:
            body["usage"] = {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}
        return body

    def _stream(self, chat: bool, request: dict[str, Any]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        delay = float(request.get("fake_chunk_delay", 0))
        for i, word in enumerate(words(self.server.name)):
            if i:
                time.sleep(delay)
            self._chunk(f"data: {json.dumps(self._completion(chat, word, request, final=False))}\n\n")
        self._chunk("data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), Handler)
        self.name = name


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    FakeServer(args.name, args.host, args.port).serve_forever()


if __name__ == "__main__":
    main()
