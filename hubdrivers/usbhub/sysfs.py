"""Reading (and, for port power, writing) the Linux USB sysfs tree under an injectable root.

Layout relied on (Documentation/ABI/*/sysfs-bus-usb; Linux USB FAQ):

* `<root>/<bus>-<port>[.<port>...]` is a USB device (`1-2`, `1-2.3`); `<root>` defaults to
  `/sys/bus/usb/devices`, where every device and interface has an entry. Attributes used:
  `busnum`, `devnum` (decimal), `idVendor`, `idProduct`, `bDeviceClass`, `bDeviceProtocol`,
  `bcdDevice` (hex), `maxchild` (decimal, hubs), `bConfigurationValue`, `speed` (Mbit/s),
  `serial`/`manufacturer`/`product` (absent when the device has no such string) and the binary
  `descriptors` (device descriptor + raw configuration bundles; no hub class descriptor).
* Port `N` of hub `H` has child device `H.N`.
* The hub interface `H:<cfg>.0` holds one directory per port, `H-portN`. On Linux >= 6.0 it has
  `disable` (read: "1" when the kernel has the port's power off; write "1" = power off after a
  logical disconnect, "0" = power on). On USB3 hubs the kernel links the two halves' matching
  ports with `peer` symlinks (`1-2:1.0/1-2-port1/peer` -> `.../2-2:1.0/2-2-port1`).

Sysfs reads are a few syscalls on an in-memory filesystem, so callers may do them inline on the
event loop. A device that vanishes mid-read reads as absent (None), never as an exception.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from hubdrivers.usbhub.descriptors import USB_CLASS_HUB, RawDescriptors, parse_sysfs_descriptors

SYSFS_USB_DEVICES = Path("/sys/bus/usb/devices")

_DEVICE_NAME = re.compile(r"^[1-9]\d*-[1-9]\d*(\.[1-9]\d*)*$")
_PORT_DIR = re.compile(r"^(?P<hub>.+)-port(?P<port>[1-9]\d*)$")


def valid_usb_path(path: str) -> bool:
    """True for a non-root USB device name as sysfs spells it (`1-2`, `3-1.4.2`)."""
    return bool(_DEVICE_NAME.match(path))


@dataclass(frozen=True, slots=True)
class UsbDevice:
    """One enumerated USB device as sysfs describes it."""

    name: str
    busnum: int
    devnum: int
    vendor_id: int
    product_id: int
    device_class: int
    device_protocol: int
    bcd_device: int | None = None
    serial: str | None = None
    manufacturer: str | None = None
    product: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.device_class == USB_CLASS_HUB


@dataclass(frozen=True, slots=True)
class PortRef:
    """A downstream port of a hub: (hub device name, port number)."""

    hub: str
    port: int


class SysfsUsb:
    def __init__(self, root: str | os.PathLike[str] = SYSFS_USB_DEVICES) -> None:
        self.root = Path(root)

    # ------------------------------------------------------------------ attributes

    def _attr(self, name: str, attr: str) -> str | None:
        try:
            return (self.root / name / attr).read_text(encoding="utf-8", errors="replace").strip()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _int(self, name: str, attr: str, base: int) -> int | None:
        text = self._attr(name, attr)
        if not text:
            return None
        return int(text, base)

    def exists(self, name: str) -> bool:
        return (self.root / name).is_dir()

    def device(self, name: str) -> UsbDevice | None:
        """The device called `name`, or None if it is not (or no longer) enumerated."""
        busnum = self._int(name, "busnum", 10)
        devnum = self._int(name, "devnum", 10)
        vendor = self._int(name, "idVendor", 16)
        product = self._int(name, "idProduct", 16)
        if busnum is None or devnum is None or vendor is None or product is None:
            return None
        return UsbDevice(
            name=name,
            busnum=busnum,
            devnum=devnum,
            vendor_id=vendor,
            product_id=product,
            device_class=self._int(name, "bDeviceClass", 16) or 0,
            device_protocol=self._int(name, "bDeviceProtocol", 16) or 0,
            bcd_device=self._int(name, "bcdDevice", 16),
            serial=self._attr(name, "serial") or None,
            manufacturer=self._attr(name, "manufacturer") or None,
            product=self._attr(name, "product") or None,
        )

    def descriptors(self, name: str) -> RawDescriptors | None:
        """The parsed `descriptors` file; raises `UsbParseError` if it is malformed."""
        try:
            data = (self.root / name / "descriptors").read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return parse_sysfs_descriptors(data)

    def maxchild(self, name: str) -> int | None:
        return self._int(name, "maxchild", 10)

    # ------------------------------------------------------------------- topology

    @staticmethod
    def child_name(hub: str, port: int) -> str:
        return f"{hub}.{port}"

    def child(self, hub: str, port: int) -> UsbDevice | None:
        """The device enumerated on `port` of `hub`, if any."""
        return self.device(self.child_name(hub, port))

    def interface_dir(self, hub: str) -> Path | None:
        """The hub's interface directory (`1-2:1.0`), which holds the port directories."""
        config = self._attr(hub, "bConfigurationValue")
        if config:
            candidate = self.root / f"{hub}:{config}.0"
            if candidate.is_dir():
                return candidate
        found = sorted(self.root.glob(f"{hub}:*.0"))
        return found[0] if found else None

    def port_dir(self, hub: str, port: int) -> Path | None:
        interface = self.interface_dir(hub)
        if interface is None:
            return None
        path = interface / f"{hub}-port{port}"
        return path if path.is_dir() else None

    def peer(self, hub: str, port: int) -> PortRef | None:
        """The matching port on the other half of a USB3 hub, from the kernel's `peer` link."""
        port_dir = self.port_dir(hub, port)
        if port_dir is None:
            return None
        link = port_dir / "peer"
        if not link.exists():
            return None
        match = _PORT_DIR.match(Path(os.path.realpath(link)).name)
        if match is None:
            return None
        return PortRef(match["hub"], int(match["port"]))

    # ----------------------------------------------------------------- port power

    def disable_file(self, hub: str, port: int) -> Path | None:
        port_dir = self.port_dir(hub, port)
        if port_dir is None:
            return None
        path = port_dir / "disable"
        return path if path.is_file() else None

    def disable_writable(self, hub: str, port: int) -> bool:
        path = self.disable_file(hub, port)
        return path is not None and os.access(path, os.W_OK)

    def read_disabled(self, hub: str, port: int) -> bool | None:
        """What the kernel says about the port's power: True = off; None = no `disable` file."""
        path = self.disable_file(hub, port)
        if path is None:
            return None
        try:
            return path.read_text(encoding="ascii", errors="replace").strip() == "1"
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write_disabled(self, hub: str, port: int, disabled: bool) -> None:
        """Switch port power through the kernel; raises OSError (incl. FileNotFoundError)."""
        path = self.disable_file(hub, port)
        if path is None:
            raise FileNotFoundError(f"no disable file for {hub} port {port}")
        with path.open("w", encoding="ascii") as f:
            f.write("1" if disabled else "0")
