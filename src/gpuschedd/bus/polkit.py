"""Who may do what: the caller's uid from the bus, and polkit's verdict, with systemd's semantics.

Root passes without asking polkit. Anyone else is checked with CheckAuthorization on a `system-bus-name`
subject (the caller's unique name, so polkit resolves the process itself and cannot be lied to).
Interactive authentication is offered only when the caller's message allows it; a challenge becomes
InteractiveAuthorizationRequired; polkit missing, failing or too slow means AccessDenied.

Every local user can send us calls, and each non-root call becomes a call of ours to polkitd. dbus-daemon limits
how many replies one connection may await (ours included): a burst from one user could fill that budget, and every
other user's checks would fail with LimitsExceeded. So at most a few checks of one caller, and a bounded number in
all, are in flight; the rest wait their turn inside the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from dbus_fast import Message, MessageFlag, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.errors import DBusError

from ..errors import AccessDenied, InteractiveAuthorizationRequired
from ..sysbus import call

log = logging.getLogger(__name__)

ACTION_RUN = "org.gpusched1.run"
ACTION_CONTROL = "org.gpusched1.control"
ACTION_CONTROL_ANY = "org.gpusched1.control-any"
ACTION_CONTROL_CATALOG = "org.gpusched1.control-catalog"
ACTION_ADOPT = "org.gpusched1.adopt"
ACTION_MANAGE = "org.gpusched1.manage"

POLKIT = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_IFACE = "org.freedesktop.PolicyKit1.Authority"
CHECK_ALLOW_USER_INTERACTION = 1

_MAX_CACHED_CALLERS = 4096
MAX_CHECKS_IN_FLIGHT = 32  # well under dbus-daemon's max_replies_per_connection (128 on the system bus)
MAX_CHECKS_PER_CALLER = 4
CHECK_TIMEOUT_S = 25.0  # sd-bus's default method call timeout, as systemd's own polkit checks use
INTERACTIVE_TIMEOUT_S = 300.0  # a person typing a password


class Authority:
    def __init__(self, bus: MessageBus) -> None:
        self.bus = bus
        # Unique bus names are never reused, so a sender's uid never changes: caching it is safe.
        self._uids: dict[str, int] = {}
        self._all = asyncio.Semaphore(MAX_CHECKS_IN_FLIGHT)
        self._callers: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def _turn(self, sender: str) -> AsyncIterator[None]:
        """Wait for a free slot of this caller and one of all callers (never hold one while taking another)."""
        sem, waiting = self._callers.setdefault(sender, (asyncio.Semaphore(MAX_CHECKS_PER_CALLER), [0]))
        waiting[0] += 1
        try:
            async with sem, self._all:
                yield
        finally:
            waiting[0] -= 1
            if not waiting[0]:
                del self._callers[sender]

    def known_uid(self, sender: str) -> int | None:
        """The uid of a sender already looked up, without a bus call (None if it never was)."""
        return self._uids.get(sender)

    async def caller_uid(self, msg: Message) -> int:
        sender = msg.sender or ""
        uid = self._uids.get(sender)
        if uid is None:
            try:
                async with self._turn(sender):
                    [uid] = await asyncio.wait_for(
                        call(
                            self.bus,
                            "org.freedesktop.DBus",
                            "/org/freedesktop/DBus",
                            "org.freedesktop.DBus",
                            "GetConnectionUnixUser",
                            "s",
                            [sender],
                        ),
                        CHECK_TIMEOUT_S,
                    )
            except (DBusError, TimeoutError):
                # the caller is gone, or the bus too slow to say who it was: nobody we could authorize
                raise AccessDenied("could not tell who the caller is") from None
            if len(self._uids) >= _MAX_CACHED_CALLERS:
                self._uids.clear()
            self._uids[sender] = uid
        return int(uid)

    async def check(self, msg: Message, action: str, details: dict[str, str], ask: bool = True) -> int:
        """Return the caller's uid if it may perform `action`; raise AccessDenied or
        InteractiveAuthorizationRequired otherwise. ask=False: never prompt, even if the caller allows it (a probe
        of the caller's rights, not something it asked for)."""
        uid = await self.caller_uid(msg)
        if uid == 0:
            return uid
        interactive = ask and bool(msg.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)
        try:
            async with self._turn(msg.sender or ""):
                [result] = await asyncio.wait_for(
                    call(
                        self.bus,
                        POLKIT,
                        POLKIT_PATH,
                        POLKIT_IFACE,
                        "CheckAuthorization",
                        "(sa{sv})sa{ss}us",
                        [
                            ["system-bus-name", {"name": Variant("s", msg.sender or "")}],
                            action,
                            details,
                            CHECK_ALLOW_USER_INTERACTION if interactive else 0,
                            "",
                        ],
                    ),
                    INTERACTIVE_TIMEOUT_S if interactive else CHECK_TIMEOUT_S,
                )
        except DBusError as e:
            log.warning("polkit unavailable (%s); denying %s to uid %d", e.type, action, uid)
            raise AccessDenied(f"not authorized for {action}: polkit is not available") from None
        except TimeoutError:
            log.warning("polkit did not answer in time; denying %s to uid %d", action, uid)
            raise AccessDenied(f"not authorized for {action}: polkit did not answer in time") from None
        authorized, challenge, _details = result
        if authorized:
            return uid
        if challenge:
            # Like systemd: whether or not interaction was allowed, polkit's "an administrator could allow it"
            # is InteractiveAuthorizationRequired (with interaction allowed it means no agent could ask).
            if interactive:
                raise InteractiveAuthorizationRequired(
                    f"{action} needs authentication, and no polkit authentication agent answered"
                )
            raise InteractiveAuthorizationRequired(
                f"{action} needs authentication: retry allowing interactive authorization"
            )
        raise AccessDenied(f"not authorized for {action}")
