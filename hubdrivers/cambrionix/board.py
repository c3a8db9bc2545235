"""`bd` (board description): the hub's internal USB tree, and the port map derived from it.

The physical port number printed on a Cambrionix case has nothing to do with the USB path a phone
gets: the ports hang off a tree of internal hub chips wired in whatever order suited the PCB. `bd`
prints that tree. Reading it at runtime means a new model or a board revision does not need a new
table; `models.py` keeps GAZOO's tables as the fallback for hubs whose `bd` cannot be read.

Key convention (hubs.md §1.3, cross-checked against GAZOO for the SS15): the USB path *below the
hub's upstream port*, e.g. `"1.3"` = port 3 of the sub-hub on port 1 of hub 1 -> physical port 9.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

from hubdrivers.cambrionix.protocol import CambrionixParseError

MAX_DEPTH = 8  # USB allows 7 tiers; anything deeper is a loop in a garbled reply


class TargetKind(enum.StrEnum):
    HUB = "hub"
    CONTROL = "control"
    EXPANSION = "expansion"
    PORT = "port"
    UNUSED = "unused"


@dataclass(frozen=True, slots=True)
class Target:
    """What one internal hub port feeds: another hub, a physical port, the control UART..."""

    kind: TargetKind
    number: int | None = None  # hub number, physical port or expansion number
    label: str = ""  # the text as printed, e.g. "Turbo Hub 2"


@dataclass(frozen=True, slots=True)
class Node:
    index: int
    type: str  # "USB3 Hub 1", "Turbo Hub 2", "Root 1" ...
    ports: int


@dataclass(frozen=True, slots=True)
class Link:
    hub: int
    port: int
    target: Target


@dataclass(frozen=True, slots=True)
class BoardDescription:
    ports: int
    nodes: tuple[Node, ...]
    links: tuple[Link, ...]
    sync: bool | None = None
    temperature: bool | None = None
    external_psu: bool | None = None
    console: str | None = None

    def port_map(self) -> dict[str, int]:
        """USB path suffix below the upstream port -> physical port, e.g. {"1.3": 9}."""
        parent: dict[int, tuple[int, int]] = {}
        for link in self.links:
            if link.target.kind is TargetKind.HUB and link.target.number is not None:
                parent[link.target.number] = (link.hub, link.port)
        result: dict[str, int] = {}
        for link in self.links:
            if link.target.kind is not TargetKind.PORT or link.target.number is None:
                continue
            path = _path_to_root(link.hub, parent)
            if path is not None:
                result[".".join(str(p) for p in (*path, link.port))] = link.target.number
        return result


def _path_to_root(hub: int, parent: dict[int, tuple[int, int]]) -> list[int] | None:
    """Ports from hub 1 (the hub behind the upstream connector) down to `hub`; None if unreachable
    (a `Root` controller starts a separate USB bus, so its ports have no path below the hub)."""
    path: list[int] = []
    for _ in range(MAX_DEPTH):
        if hub == 1:
            return list(reversed(path))
        if hub not in parent:
            return None
        hub, port = parent[hub]
        path.append(port)
    return None


_HEADER = re.compile(r"^(Ports|Sync|Temp|EXTPSU|Console|Nodes)\s*:\s*(\S*)$")
_NODE = re.compile(r"^Node (\d{1,3}) (Type|Ports)\s*:\s*(.+)$")
_LINK = re.compile(r"^Hub (\d{1,3}) Port (\d{1,3})\s*:\s*(.+)$")
_TARGET_HUB = re.compile(r"^(?:USB3 |Turbo |Optional )?Hub (\d{1,3})$")
_TARGET_NUMBERED = re.compile(r"^(Port|Expansion Port) (\d{1,3})$")


def parse_target(text: str) -> Target:
    text = " ".join(text.split())
    if match := _TARGET_HUB.match(text):
        return Target(TargetKind.HUB, int(match.group(1)), text)
    if match := _TARGET_NUMBERED.match(text):
        kind = TargetKind.PORT if match.group(1) == "Port" else TargetKind.EXPANSION
        return Target(kind, int(match.group(2)), text)
    if text == "Control Port":
        return Target(TargetKind.CONTROL, None, text)
    if text == "Unused Port":
        return Target(TargetKind.UNUSED, None, text)
    raise CambrionixParseError(f"unknown bd port target {text!r}")


def _flag(value: str | None) -> bool | None:
    return None if value is None else value == "1"


def parse_bd(lines: Sequence[str]) -> BoardDescription:
    header: dict[str, str] = {}
    node_types: dict[int, str] = {}
    node_ports: dict[int, int] = {}
    links: list[Link] = []
    for line in lines:
        if match := _HEADER.match(line):
            header[match.group(1)] = match.group(2)
        elif match := _NODE.match(line):
            index = int(match.group(1))
            if match.group(2) == "Type":
                node_types[index] = match.group(3).strip()
            elif match.group(3).strip().isdigit() and len(match.group(3).strip()) <= 3:
                node_ports[index] = int(match.group(3))
            else:
                raise CambrionixParseError(f"bad node port count: {line!r}")
        elif match := _LINK.match(line):
            links.append(Link(int(match.group(1)), int(match.group(2)), parse_target(match.group(3))))
        else:
            raise CambrionixParseError(f"unexpected bd line {line!r}")
    ports = header.get("Ports", "")
    if not ports.isdigit() or len(ports) > 3:
        raise CambrionixParseError(f"bd reply without a port count: {list(lines)!r}")
    nodes = tuple(Node(i, node_types[i], node_ports.get(i, 0)) for i in sorted(node_types))
    return BoardDescription(
        ports=int(ports),
        nodes=nodes,
        links=tuple(links),
        sync=_flag(header.get("Sync")),
        temperature=_flag(header.get("Temp")),
        external_psu=_flag(header.get("EXTPSU")),
        console=header.get("Console"),
    )
