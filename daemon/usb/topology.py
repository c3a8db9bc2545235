"""USB path <-> (hub, port).

A device on a hub port appears under the hub's upstream USB path (Linux sysfs naming, `3-2` for
the hub, `3-2.4` for whatever is on its port 4). Multi-chip hubs number their physical ports
differently from their internal USB ports: a Cambrionix PP15S's port 15 is `<hub>.2.1`. A port's
path comes from, in this order:

1. the station's learned port map (`benchhub ports learn`, `daemon.usb.portmap`): a full path per
   port, measured on this bench with a real device, so it wins over anything derived;
2. the map the hub driver reports (`HubDriver.port_paths`, from the Cambrionix `bd` command or a
   per-model table), below the hub's configured `usb_path`;
3. `<usb_path>.<n>`.

Learned paths need no `usb_path`: a device at or below a learned port path belongs to that hub even
when the hub's `usb_path` is unset or wrong (USB3 halves, hubs chained behind other chips). The port
path is stable while a device re-enumerates, which is why the port, not the device's USB address, is
the key.

All paths here are canonical USB 2 paths: a device running at SuperSpeed on the SuperSpeed half of a
USB 3 hub (`4-2.4`) reaches the topology already named by the hub's USB 2 half (`3-2.4`,
`daemon.usb.sysfs.UsbSysfs.canonical_path`), so a hub is always configured (and learned) by the USB 2
path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from daemon.models import PortRef
from hubdrivers.usbhub.sysfs import valid_usb_path


@dataclass
class HubWiring:
    hub: str
    ports: int
    usb_path: str
    port_paths: dict[int, str] = field(default_factory=dict)
    """Physical port -> path below `usb_path` (e.g. `{15: "2.1"}`); missing ports use `str(port)`."""
    learned: dict[int, str] = field(default_factory=dict)
    """Physical port -> full USB path from the learned port map (e.g. `{3: "3-2.4.3"}`); wins over
    `port_paths` and `usb_path`."""

    def path_of(self, port: int) -> str:
        learned = self.learned.get(port)
        if learned is not None:
            return learned
        return f"{self.usb_path}.{self.port_paths.get(port, str(port))}"


def default_usb_path(index: int) -> str:
    """Where an unconfigured hub is assumed to hang: its own bus, port 1 (`1-1`, `2-1`, ...)."""
    return f"{index + 1}-1"


def _under(usb_path: str, parent: str) -> bool:
    return usb_path.startswith(parent + ".")


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
        # Derived paths first, learned ones last: where a derived path (a guessed usb_path, a
        # wrong model table) collides with a learned one, the measured path wins.
        by_path: dict[str, PortRef] = {}
        for wiring in self.hubs.values():
            for n in range(1, wiring.ports + 1):
                if n not in wiring.learned:
                    by_path[wiring.path_of(n)] = PortRef(wiring.hub, n)
        for wiring in self.hubs.values():
            for n, path in wiring.learned.items():
                by_path[path] = PortRef(wiring.hub, n)
        self._by_path = by_path

    def set_port_paths(self, hub: str, port_paths: Mapping[int, str]) -> None:
        """Install the map a hub reported when it was opened (learned paths still win)."""
        self.hubs[hub].port_paths = dict(port_paths)
        self._index()

    def apply_learned(self, port_map: Mapping[str, Mapping[int, str]]) -> list[str]:
        """Make the topology follow a learned port map (`daemon.usb.portmap.load_port_map`): every
        configured hub gets the map's paths for its ports, hubs the map does not name get none (so
        calling it again with a newer map is a full replacement).

        Entries the config cannot place are left out rather than refused, so an old map never stops
        a station from starting; each is returned as a one-line note for the log (a hub no longer
        in the config, a port beyond the hub's port count). Raises ValueError for a path that is not
        a USB path, which `load_port_map` never returns."""
        notes: list[str] = []
        for hub, ports in port_map.items():
            for port, path in ports.items():
                if not valid_usb_path(path):
                    raise ValueError(f"{hub} port {port}: {path!r} is not a USB path")
            if hub not in self.hubs:
                notes.append(
                    f"port map: hub {hub!r} is not in the config; its {len(ports)} port(s) are ignored"
                )
        for wiring in self.hubs.values():
            ports = port_map.get(wiring.hub, {})
            beyond = sorted(p for p in ports if not 1 <= p <= wiring.ports)
            if beyond:
                notes.append(
                    f"port map: hub {wiring.hub!r} has {wiring.ports} ports; learned port(s)"
                    f" {', '.join(map(str, beyond))} are ignored"
                )
            wiring.learned = {p: path for p, path in ports.items() if 1 <= p <= wiring.ports}
        self._index()
        return notes

    def fully_learned(self, hub: str) -> bool:
        """Whether every port of `hub` has a learned path, so nothing about it depends on a map the
        hub has yet to report (the station holds device events until a Cambrionix reports its map;
        a fully learned hub need not wait)."""
        wiring = self.hubs[hub]
        return all(n in wiring.learned for n in range(1, wiring.ports + 1))

    def hub_for(self, usb_path: str) -> str | None:
        """The configured hub a USB path lies under: below its `usb_path`, or at or below one of its
        learned port paths. The deepest match wins (chained hubs); on a tie, the hub whose own
        `usb_path` it is (a hub chained on another hub's learned port owns what is below it)."""
        best: tuple[int, int, str] | None = None
        for wiring in self.hubs.values():
            if _under(usb_path, wiring.usb_path):
                candidate = (len(wiring.usb_path), 1, wiring.hub)
                if best is None or candidate[:2] > best[:2]:
                    best = candidate
            for path in wiring.learned.values():
                if usb_path == path or _under(usb_path, path):
                    candidate = (len(path), 0, wiring.hub)
                    if best is None or candidate[:2] > best[:2]:
                        best = candidate
        return best[2] if best else None

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
