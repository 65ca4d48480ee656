"""A minimal LLM server for the benchmark: loads a saved model, generates its first token, then answers
"generate one token" requests on a Unix socket.

    serve.py MODEL_DIR SOCKET [--agent]

--agent enables gpuschedd.agent (the fast path), loads the model inside agent.parkable(), and answers each
request inside agent.busy().

Cold start is measured by the caller from process start to the line "FIRST_TOKEN <unix time>" written to
SOCKET + ".ready"; after a thaw the caller connects and times one request (thaw → first token)."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    model_dir, sock_path = sys.argv[1], sys.argv[2]
    busy = parkable = contextlib.nullcontext
    if "--agent" in sys.argv[3:]:
        import gpuschedd.agent

        agent = gpuschedd.agent.enable()
        busy, parkable = agent.busy, agent.parkable
    with parkable():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cuda")
    model.eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 32), device="cuda", generator=None)

    @torch.inference_mode()
    def one_token() -> int:
        out = model(prompt)
        token = int(out.logits[0, -1].argmax())
        torch.cuda.synchronize()
        return token

    token = one_token()
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock_path)
    server.listen(4)
    with open(sock_path + ".ready", "w") as f:
        f.write(f"FIRST_TOKEN {time.time():.6f} {token}\n")
    while True:
        conn, _ = server.accept()
        with conn:
            conn.recv(16)
            with busy():
                token = one_token()
            conn.sendall(f"{token}\n".encode())


if __name__ == "__main__":
    main()
