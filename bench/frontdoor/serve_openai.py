"""An OpenAI-compatible wrapper of bench/serve.py's model for the front door's GPU bench: a transformers causal LM
(random weights of a Qwen2.5 shape, bench/bench.py's make_model) behind POST /v1/chat/completions and
/v1/completions on 127.0.0.1:PORT (standard library http.server; the model's python needs nothing else).

    serve_openai.py MODEL_DIR --name NAME --port PORT [--agent]

There is no tokenizer (the weights are random): the prompt is a fixed 32 tokens, each generated token is answered
as the text "NAME:ID " (greedy, with the KV cache), `max_tokens` of them (default 4); `stream: true` sends one
server-sent event per token as it is generated. --agent enables gpuschedd.agent (the fast path, as serve.py)."""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from transformers import AutoModelForCausalLM


class Model:
    def __init__(self, model_dir: str, agent: bool) -> None:
        self.busy: Callable[[], Any] = contextlib.nullcontext
        parkable: Callable[[], Any] = contextlib.nullcontext
        if agent:
            import gpuschedd.agent

            handle = gpuschedd.agent.enable()
            self.busy, parkable = handle.busy, handle.parkable
        with parkable():
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cuda")
        self.model.eval()
        self.prompt = torch.arange(32, device="cuda").unsqueeze(0)
        self.lock = threading.Lock()  # one generation at a time on the GPU
        next(iter(self.tokens(1)))  # the first token before serving: CUDA and the kernels are warm

    @torch.inference_mode()
    def tokens(self, count: int) -> Iterator[int]:
        with self.lock, self.busy():
            ids, past = self.prompt, None
            for _ in range(count):
                out = self.model(input_ids=ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = int(out.logits[0, -1].argmax())
                torch.cuda.synchronize()
                yield token
                ids = torch.tensor([[token]], device="cuda")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        chat = self.path == "/v1/chat/completions"
        if self.path not in ("/v1/chat/completions", "/v1/completions"):
            self._send(404, "application/json", b'{"error": {"message": "no such route"}}')
            return
        count = int(request.get("max_tokens") or 4)
        texts = (f"{self.server.name}:{token} " for token in self.server.model.tokens(count))
        if not request.get("stream"):
            body = self._object(chat, "".join(texts), final=True)
            self._send(200, "application/json", json.dumps(body).encode())
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for text in texts:
            self._chunk(f"data: {json.dumps(self._object(chat, text, final=False))}\n\n".encode())
        self._chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def _object(self, chat: bool, text: str, final: bool) -> dict[str, Any]:
        if chat:
            key = "message" if final else "delta"
            choice = {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": None}
            kind = "chat.completion" if final else "chat.completion.chunk"
        else:
            choice, kind = {"index": 0, "text": text, "finish_reason": None}, "text_completion"
        return {"id": "bench", "object": kind, "created": int(time.time()), "model": self.server.name,
                "choices": [choice]}  # fmt: skip

    def _send(self, status: int, kind: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, name: str, port: int, model: Model) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.name, self.model = name, model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--agent", action="store_true")
    args = parser.parse_args()
    model = Model(args.model_dir, args.agent)  # loaded before the port opens: the front door waits for the port
    Server(args.name, args.port, model).serve_forever()


if __name__ == "__main__":
    main()
