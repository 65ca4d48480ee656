"""A non-blocking message writer for dbus-fast's asyncio bus, carried here until the fix is released upstream.

dbus-fast (5.2.0, as python-dbus-next before it: #153 / PR #154) writes a new message to the socket at once when
its queue is empty, even while the rest of an earlier message is still waiting for the socket to drain, and treats
the BlockingIOError of a full socket as fatal: it disconnects the bus. A caller who sends many calls and reads
the replies slowly (or one large reply: ListModels of hundreds of models, a long Command) fills the daemon's socket
and so disconnects the daemon. A full socket is the normal state of a non-blocking writer: this writer queues
while anything is buffered, and on EAGAIN waits for the socket to be writable again.

The patch for upstream is docs/upstream/dbus-fast-writer-eagain.patch. It overrides a private class, which is why
pyproject.toml pins dbus-fast below its next major version; tests/unit/test_bus_writer.py shows the bug against
the library's own writer and fails if an update changes what is overridden here.
"""

from __future__ import annotations

import array
import asyncio
import socket
from typing import Any

from dbus_fast.aio import MessageBus
from dbus_fast.aio.message_bus import _MessageWriter
from dbus_fast.message import Message


def _settle(fut: asyncio.Future[Any] | None, error: Exception | None = None) -> None:
    if fut is None or fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


class QueueingWriter(_MessageWriter):
    """_MessageWriter with a full socket as a wait, not an error, and one message at a time in order."""

    def write_callback(self, remove_writer: bool = True) -> None:
        try:
            while True:
                if self.buf is None:
                    if not self.messages:
                        if remove_writer:
                            self.loop.remove_writer(self.fd)
                        return
                    buf, self.unix_fds, self.fut = self.messages.popleft()
                    self.buf = memoryview(buf)
                    self.offset = 0
                try:
                    if self.unix_fds and self.negotiate_unix_fd:
                        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", self.unix_fds))]
                        self.offset += self.sock.sendmsg([self.buf[self.offset :]], rights)
                        self.unix_fds = None
                    else:
                        self.offset += self.sock.send(self.buf[self.offset :])
                except BlockingIOError:
                    pass  # the socket is full: wait below
                if self.offset < len(self.buf):
                    self.loop.add_writer(self.fd, self.write_callback)  # the rest when the socket drains
                    return
                self.buf = None
                _settle(self.fut)
        except Exception as e:  # a real socket error (the peer went away): the bus is lost
            _settle(self.fut, None if self.bus._user_disconnect else e)
            self.bus._finalize(e)

    def idle(self) -> bool:
        """Nothing is waiting to be written."""
        return self.buf is None and not self.messages

    def schedule_write(self, msg: Message | None = None, future: asyncio.Future[Any] | None = None) -> None:
        idle = self.idle()
        if msg is not None:
            self.buffer_message(msg, future)
        # Before the bus's Hello is answered only Hello itself may go; connect() calls this again after it.
        if self.bus.unique_name and (idle or msg is None):
            self.write_callback(remove_writer=False)


class QueueingWriterBus(MessageBus):
    """The asyncio MessageBus with QueueingWriter. connect() builds its writer as `_MessageWriter(self)` once the
    socket is connected: this property makes every writer it installs a QueueingWriter of the same bus."""

    @property  # type: ignore[override]
    def _writer(self) -> QueueingWriter | None:
        return self.__dict__.get("_queueing_writer")

    @_writer.setter
    def _writer(self, writer: _MessageWriter | None) -> None:
        self.__dict__["_queueing_writer"] = None if writer is None else QueueingWriter(self)
