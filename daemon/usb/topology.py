"""USB path <-> (hub, port).

A device on a hub port appears under the hub's upstream USB path (Linux sysfs naming, `3-2` for
the hub, `3-2.4` for whatever is on its port 4). Multi-chip hubs number their physical ports
differently from their internal USB ports: a Cambrionix PP15S's port 15 is `<hub>.2.1`. Each hub
driver reports its map (`HubDriver.port_paths`, from the Cambrionix `bd` command or a per-model
table); until then, and for hubs without one, port `n` is `<hub>.n`. The port path is stable while
a device re-enumerates, which is why the port, not the device's USB address, is the key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from daemon.models import PortRef


@dataclass
class HubWiring:
    hub: str
    ports: int
    usb_path: str
    port_paths: dict[int, str] = field(default_factory=dict)
    """Physical port -> path below `usb_path` (e.g. `{15: "2.1"}`); missing ports use `str(port)`."""

    def path_of(self, port: int) -> str:
        return f"{self.usb_path}.{self.port_paths.get(port, str(port))}"


def default_usb_path(index: int) -> str:
    """Where an unconfigured hub is assumed to hang: its own bus, port 1 (`1-1`, `2-1`, ...)."""
    return f"{index + 1}-1"


class Topology:
    def __init__(self, hubs: Iterable[HubWiring]) -> None:
        self.hubs = {h.hub: h for h in hubs}
        self._by_path: dict[str, PortRef] = {}
        self._index()

    @classmethod
    def from_config(cls, hubs: Iterable[tuple[str, int, str | None]]) -> Topology:
        return cls(
            HubWiring(hub, ports, path or default_usb_path(i)) for i, (hub, ports, path) in enumerate(hubs)
        )

    def _index(self) -> None:
        self._by_path = {
            wiring.path_of(n): PortRef(wiring.hub, n)
            for wiring in self.hubs.values()
            for n in range(1, wiring.ports + 1)
        }

    def set_port_paths(self, hub: str, port_paths: Mapping[int, str]) -> None:
        """Install the map a hub reported when it was opened."""
        self.hubs[hub].port_paths = dict(port_paths)
        self._index()

    def hub_for(self, usb_path: str) -> str | None:
        """The configured hub a USB path lies under (the deepest one, for chained hubs)."""
        best: HubWiring | None = None
        for wiring in self.hubs.values():
            if usb_path.startswith(wiring.usb_path + ".") and (
                best is None or len(wiring.usb_path) > len(best.usb_path)
            ):
                best = wiring
        return best.hub if best else None

    def port_for(self, usb_path: str) -> PortRef | None:
        """The hub port a device sits on; a device further down a chain of hubs maps to the port the
        chain hangs from."""
        ref = self._by_path.get(usb_path)
        while ref is None and "." in usb_path:
            usb_path = usb_path.rsplit(".", 1)[0]
            ref = self._by_path.get(usb_path)
        return ref

    def usb_path(self, ref: PortRef) -> str:
        return self.hubs[ref.hub].path_of(ref.port)

    def ports(self) -> list[PortRef]:
        return sorted(PortRef(h.hub, n) for h in self.hubs.values() for n in range(1, h.ports + 1))
