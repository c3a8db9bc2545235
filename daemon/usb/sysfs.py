"""Which USB device is where, from the Linux sysfs tree (default `/sys/bus/usb/devices`, injectable).

Device entries are named `<bus>-<port>[.<port>...]` (`3-2.4.1`: bus 3, root port 2, hub port 4, its
port 1); interfaces (`3-2.4.1:1.0`) and root hubs (`usb3`) are skipped. The per-device attribute
reading (`busnum`, `devnum`, `idVendor`, `idProduct`, `serial`) is `hubdrivers.usbhub.sysfs.SysfsUsb`;
this module adds listing, the usbmuxd LocationID lookup and never raising on odd entries.

usbmuxd on Linux reports `LocationID = (bus << 16) | devnum` (`src/usb.c` `usb_get_location`), and
devnum changes on every enumeration, so a LocationID is only good while that enumeration lasts; the
sysfs name it resolves to is the stable, physical part.

USB 3 hubs (and xHCI controllers) are two hubs in one, a USB 2 half and a SuperSpeed half on two
buses (`3-2` on bus 3, `4-2` on bus 4). A device enumerates under the SuperSpeed half only while it
runs at 5 Gbit/s or more, so one physical port has two names (`3-2.4`, `4-2.4`). `canonical_path`
names a device by the USB 2 side, the one hubs are configured with. What it relies on, from Linux
`drivers/usb/core/port.c` (`usb_hub_create_port_device`, `find_and_link_peer`, `link_peers`),
`drivers/usb/core/message.c` (interface names) and Documentation/ABI/testing/sysfs-bus-usb (which
documents the port directories and `speed`, but has no entry for `peer`):

* Port N of hub `H` is a device `H-portN` whose parent is the hub's interface `H:<config>.0`. A root
  hub is `usbB` and its interface is `B-0:<config>.0` (devpath "0"), so its ports are
  `B-0:1.0/usbB-portN`. Port devices have no entry of their own in `/sys/bus/usb/devices`; they are
  reached through the interface entries, which have.
* `link_peers` creates a `peer` symlink in both directories of a matched SuperSpeed / USB 2 port
  pair, each pointing at the other port's directory, so the link's last component is
  `<other hub>-port<M>`. Root hub ports are paired with the other root hub of the same controller
  (same port number, or by the firmware's `location`, which may pair different numbers); a non-root
  hub's port only when the hub's own upstream port has a peer (the other half is that peer's child).
  So the link on a device's own port already names the other half's hub by its full path, every
  level above included: reading that one link is following the peers level by level.
* The link sits on the parent hub's port, not on the device: it outlives the device (a remove can
  still be resolved while the hub is there) but not the hub.
* Whether a bus is SuperSpeed: its root hub's `speed` (Mbit/s; `usb_device.speed`, 480 on a USB 2
  bus, 5000 / 10000 / 20000 on a SuperSpeed one, since xHCI registers one root hub of each), or,
  when that is unreadable, its `version` (bcdUSB as `" 3.00"`). The kernel's own test
  (`hub_is_superspeed`: `bDeviceProtocol == 3`) agrees on every root hub.

Nothing about peers is cached: a resolution is two or three small reads of an in-memory filesystem,
made once per enumeration (or per poll of the sysfs enumerator), and a cache would have to notice a
hub re-enumerating.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import structlog

from daemon.usb.apple import APPLE_VID
from hubdrivers.usbhub.sysfs import SYSFS_USB_DEVICES, SysfsUsb, UsbDevice, valid_usb_path

__all__ = [
    "SUPERSPEED_MBPS",
    "SYSFS_USB_DEVICES",
    "UsbDevice",
    "UsbSysfs",
    "location_id",
    "path_key",
    "split_location_id",
]

log = structlog.get_logger("benchhub.usb")

_LOCATION_MAX = 0xFFFF_FFFF
_PATH = re.compile(r"^(\d+)-(\d+(?:\.\d+)*)$")
_PEER_PORT = re.compile(
    r"^(?:usb(?P<bus>[1-9]\d*)|(?P<hub>[1-9]\d*-[1-9]\d*(?:\.[1-9]\d*)*))-port(?P<port>[1-9]\d*)$"
)
"""The name of a port device, as a `peer` link's target ends: `usb4-port2` (root hub), `4-2.1-port3`."""

SUPERSPEED_MBPS = 5000
"""The lowest root hub `speed` of a SuperSpeed bus."""


def location_id(bus: int, devnum: int) -> int:
    """The usbmuxd LocationID of a device on Linux."""
    if not (0 <= bus <= 0xFFFF and 0 <= devnum <= 0xFFFF):
        raise ValueError(f"bus/devnum out of range: {bus}/{devnum}")
    return (bus << 16) | devnum


def split_location_id(location: int) -> tuple[int, int]:
    """`(bus, devnum)` from a Linux usbmuxd LocationID."""
    if not 0 <= location <= _LOCATION_MAX:
        raise ValueError(f"LocationID out of range: {location}")
    return location >> 16, location & 0xFFFF


def path_key(usb_path: str) -> tuple[int, ...]:
    """Sort key ordering `1-2` < `1-2.3` < `1-10` (numerically, bus first)."""
    match = _PATH.match(usb_path)
    if match is None:
        return (1 << 31,)
    return (int(match[1]), *(int(p) for p in match[2].split(".")))


class UsbSysfs:
    """Read-only queries over the sysfs USB device directory. Nothing here raises for a device that
    vanishes mid-read or has a garbled attribute: such a device is skipped (and logged)."""

    def __init__(self, root: str | os.PathLike[str] = SYSFS_USB_DEVICES) -> None:
        self.root = Path(root)
        self._sysfs = SysfsUsb(self.root)

    def available(self) -> bool:
        """Whether the directory exists and can be listed (not the case on macOS or in some containers)."""
        try:
            with os.scandir(self.root) as entries:
                next(entries, None)
        except OSError:
            return False
        return True

    def names(self) -> list[str]:
        """The USB devices present, by sysfs name, in path order; root hubs and interfaces excluded."""
        try:
            entries = os.listdir(self.root)
        except OSError as exc:
            log.warning("usb_sysfs_unreadable", root=str(self.root), error=str(exc))
            return []
        return sorted((name for name in entries if valid_usb_path(name)), key=path_key)

    def device(self, name: str) -> UsbDevice | None:
        """The device called `name`; None if it is absent, half gone, or its attributes are garbled."""
        try:
            return self._sysfs.device(name)
        except (OSError, ValueError) as exc:
            log.warning("usb_sysfs_bad_device", usb_path=name, error=str(exc))
            return None

    def devices(self, under: str | None = None) -> list[UsbDevice]:
        """All devices, or only those below hub path `under` (its descendants, not the hub itself)."""
        return list(self._iter(under))

    def _iter(self, under: str | None = None, bus: int | None = None) -> Iterator[UsbDevice]:
        prefix = f"{under}." if under else (f"{bus}-" if bus is not None else "")
        for name in self.names():
            if name.startswith(prefix) and (device := self.device(name)) is not None:
                yield device

    def apple_devices(self) -> list[UsbDevice]:
        """Every device with Apple's vendor ID (iOS devices and anything else Apple). Only `idVendor`
        is read for the others, so polling this every second stays cheap."""
        found = []
        for name in self.names():
            if self._vendor(name) == APPLE_VID and (device := self.device(name)) is not None:
                found.append(device)
        return found

    def _vendor(self, name: str) -> int | None:
        try:
            text = (self.root / name / "idVendor").read_text(encoding="ascii", errors="replace").strip()
            return int(text, 16)
        except (OSError, ValueError):
            return None

    def find_location(self, bus: int, devnum: int) -> UsbDevice | None:
        """The device currently enumerated as (bus, devnum)."""
        for device in self._iter(bus=bus):
            if device.busnum == bus and device.devnum == devnum:
                return device
        return None

    def path_for_location_id(self, location: int) -> str | None:
        """The sysfs name (`3-2.4.1`) of the device a Linux usbmuxd LocationID points at, if present."""
        try:
            bus, devnum = split_location_id(location)
        except ValueError:
            return None
        device = self.find_location(bus, devnum)
        return device.name if device else None

    # -- USB 3 hubs: the two halves of a port ----------------------------------------------------

    def peer_path(self, name: str) -> str | None:
        """The name a device on the port `name` has on the other half of a USB 3 hub (`4-2.4` for
        `3-2.4` and the reverse), from the `peer` link of that port; None when there is none (a
        USB 2 hub, the hub gone, not a device name). Only the parent hub has to be present."""
        port_dir = self._port_dir(name)
        if port_dir is None:
            return None
        try:
            target = os.readlink(port_dir / "peer")
        except OSError as exc:
            log.debug("usb_port_without_peer", usb_path=name, port=str(port_dir), error=str(exc))
            return None
        return _device_at(Path(target).name, name)

    def _port_dir(self, name: str) -> Path | None:
        """Where the port device `name` sits on would be: `3-2:1.0/3-2-port4` for `3-2.4`,
        `3-0:1.0/usb3-port2` for `3-2` (a root hub port). Not checked for existence."""
        if not valid_usb_path(name):
            return None
        bus, ports = name.split("-", 1)
        parent, _, port = ports.rpartition(".")
        hub = f"{bus}-{parent}" if parent else f"usb{bus}"
        interface = hub if parent else f"{bus}-0"
        config = self._text(hub, "bConfigurationValue") or "1"
        return self.root / f"{interface}:{config}.0" / f"{hub}-port{port}"

    def superspeed_bus(self, bus: int) -> bool:
        """Whether `bus` is a SuperSpeed bus: its root hub's `speed`, else its `version` (see the
        module docstring); False when neither can be read (no such bus, no sysfs)."""
        speed = self._number(f"usb{bus}", "speed")
        if speed is not None:
            return speed >= SUPERSPEED_MBPS
        version = self._number(f"usb{bus}", "version")
        return version is not None and version >= 3

    def canonical_path(self, name: str) -> str:
        """The USB 2 side's name of the device `name`: `3-2.4` for `4-2.4` enumerated at SuperSpeed
        under the SuperSpeed half of hub `3-2`; `name` itself on a USB 2 bus, or when the other half
        cannot be found (logged at debug). Never raises."""
        if not valid_usb_path(name) or not self.superspeed_bus(int(name.split("-", 1)[0])):
            return name
        peer = self.peer_path(name)
        if peer is None:
            log.debug("usb_superspeed_path_unmapped", usb_path=name)
            return name
        return peer

    def _text(self, name: str, attr: str) -> str | None:
        try:
            return (self.root / name / attr).read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            return None

    def _number(self, name: str, attr: str) -> float | None:
        text = self._text(name, attr)
        try:
            return float(text) if text else None
        except ValueError:
            log.debug("usb_sysfs_not_a_number", device=name, attribute=attr, value=text)
            return None


def _device_at(port_device: str, name: str) -> str | None:
    """The device name of whatever sits on the port device `port_device` (`usb3-port2` -> `3-2`,
    `3-2-port4` -> `3-2.4`); None (logged) for anything else."""
    match = _PEER_PORT.match(port_device)
    if match is None:
        log.debug("usb_peer_unexpected_target", usb_path=name, target=port_device)
        return None
    if match["bus"] is not None:
        return f"{match['bus']}-{match['port']}"
    return f"{match['hub']}.{match['port']}"
