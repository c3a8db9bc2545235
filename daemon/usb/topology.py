"""USB path <-> (hub, port).

A hub's downstream port `n` is the USB path of the hub's upstream port plus `.n` (Linux sysfs
naming, e.g. `3-2.4`). The path of a port is stable while a device re-enumerates, which is why the
port, not the device's USB address, is the key. Hubs whose internal port numbering differs from
the physical labels (most multi-chip hubs) get explicit maps in a later iteration (issue 4).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from daemon.models import PortRef


@dataclass(frozen=True, slots=True)
class HubWiring:
    hub: str
    ports: int
    usb_path: str


def default_usb_path(index: int) -> str:
    """Where an unconfigured hub is assumed to hang: its own bus, port 1 (`1-1`, `2-1`, ...)."""
    return f"{index + 1}-1"


class Topology:
    def __init__(self, hubs: Iterable[HubWiring]) -> None:
        self.hubs = {h.hub: h for h in hubs}
        self._by_path = {
            f"{h.usb_path}.{n}": PortRef(h.hub, n) for h in self.hubs.values() for n in range(1, h.ports + 1)
        }

    @classmethod
    def from_config(cls, hubs: Iterable[tuple[str, int, str | None]]) -> Topology:
        return cls(
            HubWiring(hub, ports, path or default_usb_path(i)) for i, (hub, ports, path) in enumerate(hubs)
        )

    def port_for(self, usb_path: str) -> PortRef | None:
        """The hub port a device sits on; devices further down a chain of hubs map to the first."""
        ref = self._by_path.get(usb_path)
        while ref is None and "." in usb_path:
            usb_path = usb_path.rsplit(".", 1)[0]
            ref = self._by_path.get(usb_path)
        return ref

    def usb_path(self, ref: PortRef) -> str:
        return f"{self.hubs[ref.hub].usb_path}.{ref.port}"

    def ports(self) -> list[PortRef]:
        return sorted(self._by_path.values())
