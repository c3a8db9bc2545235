"""A hub whose ports are wired to a simulated world instead of hardware.

The driver is deliberately thin: it asks the world what a real hub would measure (which ports draw
current, which are on) and forwards mode changes. It keeps the same failure surface as a real
driver, so a world that takes the hub "offline" makes `open`/`poll` raise `HubError` and exercises
the daemon's reconnect path. The byte-faithful Cambrionix simulator replaces it for protocol tests.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

from hubdrivers.base import Capability, HubDriver, HubError, HubInfo, PortMode, PortStatus


class Backplane(Protocol):
    """What the simulated world offers a simulated hub."""

    def hub_online(self, hub: str) -> bool: ...

    def port_statuses(self, hub: str) -> list[PortStatus]: ...

    async def set_port_mode(self, hub: str, port: int, mode: PortMode) -> None: ...


class SimHubDriver(HubDriver):
    kind: ClassVar[str] = "sim"
    CAPABILITIES: ClassVar[frozenset[Capability]] = frozenset(
        {Capability.ATTACH_SENSE, Capability.PORT_POWER, Capability.PORT_MODE, Capability.CURRENT_SENSE}
    )

    def __init__(
        self,
        hub_id: str,
        ports: int,
        backplane: Backplane,
        model: str = "SIM16",
        *,
        attach_sense: bool = True,
    ) -> None:
        self.hub_id = hub_id
        self.ports = ports
        self.model = model
        self._backplane = backplane
        self._open = False
        self._capabilities = (
            self.CAPABILITIES
            if attach_sense
            else self.CAPABILITIES - {Capability.ATTACH_SENSE, Capability.CURRENT_SENSE}
        )

    @property
    def capabilities(self) -> frozenset[Capability]:
        return self._capabilities

    async def open(self) -> HubInfo:
        if not self._backplane.hub_online(self.hub_id):
            raise HubError(f"simulated hub {self.hub_id} is unplugged")
        self._open = True
        return HubInfo(
            model=self.model,
            firmware="sim-1.0",
            serial=f"SIM-{self.hub_id}",
            port_count=self.ports,
            capabilities=self._capabilities,
        )

    async def close(self) -> None:
        self._open = False

    async def poll(self) -> list[PortStatus]:
        if not self._open or not self._backplane.hub_online(self.hub_id):
            raise HubError(f"simulated hub {self.hub_id} stopped answering")
        statuses = self._backplane.port_statuses(self.hub_id)
        if Capability.ATTACH_SENSE in self._capabilities:
            return statuses
        return [PortStatus(port=s.port, attached=False, mode=s.mode) for s in statuses]

    async def set_mode(self, port: int, mode: PortMode) -> None:
        if not 1 <= port <= self.ports:
            raise HubError(f"port {port} does not exist on hub {self.hub_id} ({self.ports} ports)")
        await self._backplane.set_port_mode(self.hub_id, port, mode)
