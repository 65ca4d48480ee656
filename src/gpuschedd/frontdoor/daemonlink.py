"""The router's Daemon over the system bus: gpuschedd's SDK (AsyncGpuSched) as an unprivileged client, without
polkit prompts (a service has no agent to answer one: a refusal must come back at once)."""

from __future__ import annotations

from ..client import AsyncGpuSched
from ..errors import NoSuchModel
from .router import Entry


class DaemonLink:
    def __init__(self, client: AsyncGpuSched | None = None) -> None:
        self.client = client or AsyncGpuSched(interactive=False)

    def _fresh(self) -> AsyncGpuSched:
        """The client, its connection dropped first if the bus closed it (dbus restarted): the next call reconnects."""
        bus = self.client.bus
        if bus is not None and not bus.connected:
            self.client.close()
        return self.client

    async def catalog(self) -> list[Entry]:
        """The catalog models (property Catalog), read one by one; one removed meanwhile is left out."""
        client = self._fresh()
        entries = []
        for info in await client.models():
            try:
                props = await client.model(info.name)
            except NoSuchModel:
                continue
            if props.get("Catalog"):
                entries.append(
                    Entry(
                        name=str(props["Name"]),
                        aliases=tuple(props.get("Aliases", ())),
                        backend_port=int(props.get("BackendPort", 0)),
                        priority=int(props.get("Priority", 0)),
                    )
                )
        return entries

    async def states(self) -> dict[str, str]:
        return {info.name: info.state for info in await self._fresh().models()}

    async def start(self, name: str) -> None:
        await self._fresh().start(name)

    async def freeze(self, name: str) -> None:
        await self._fresh().freeze(name)

    async def thaw(self, name: str) -> None:
        await self._fresh().thaw(name)

    async def swap(self, freeze_name: str, thaw_name: str) -> None:
        await self._fresh().swap(freeze_name, thaw_name)

    def close(self) -> None:
        self.client.close()
