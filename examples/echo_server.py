#!/usr/bin/python3
"""A stand-in "model server" for wake-on-connection demos and tests: a TCP server on 127.0.0.1.

Usage: echo_server.py PORT

Each connection first gets the line "hello from PID\\n", then its bytes echoed back. Only the standard library.
"""

from __future__ import annotations

import os
import socketserver
import sys


class Echo(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.wfile.write(f"hello from {os.getpid()}\n".encode())
        while data := self.request.recv(65536):
            self.request.sendall(data)


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    with Server(("127.0.0.1", int(argv[1])), Echo) as server:
        print(f"listening on 127.0.0.1:{argv[1]}", flush=True)
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
