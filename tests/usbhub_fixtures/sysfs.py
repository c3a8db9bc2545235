"""A fake `/sys/bus/usb/devices` tree laid out as the Linux kernel lays it out."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tests.usbhub_fixtures.descriptors import device_descriptor, hub_sysfs_descriptors


class FakeSysfs:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._devnum = 1

    def _attrs(self, directory: Path, attrs: dict[str, str | bytes]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for name, value in attrs.items():
            if isinstance(value, bytes):
                (directory / name).write_bytes(value)
            else:
                (directory / name).write_text(f"{value}\n")

    def _device(
        self,
        name: str,
        *,
        vid: int,
        pid: int,
        device_class: int,
        protocol: int,
        extra: dict[str, str | bytes],
    ) -> Path:
        self._devnum += 1
        attrs: dict[str, str | bytes] = {
            "busnum": name.split("-", 1)[0],
            "devnum": str(self._devnum),
            "devpath": name.split("-", 1)[1],
            "idVendor": f"{vid:04x}",
            "idProduct": f"{pid:04x}",
            "bDeviceClass": f"{device_class:02x}",
            "bDeviceProtocol": f"{protocol:02x}",
            "bcdDevice": "0660",
            "bConfigurationValue": "1",
            **extra,
        }
        directory = self.root / name
        self._attrs(directory, attrs)
        return directory

    def add_hub(
        self,
        name: str,
        ports: int,
        *,
        superspeed: bool = False,
        vid: int = 0x05E3,
        pid: int = 0x0610,
        disable_files: bool = True,
    ) -> Path:
        """A hub with `maxchild` ports, its interface `name:1.0` and `name-portN` directories."""
        directory = self._device(
            name,
            vid=vid,
            pid=pid,
            device_class=0x09,
            protocol=3 if superspeed else 1,
            extra={
                "maxchild": str(ports),
                "speed": "5000" if superspeed else "480",
                "manufacturer": "GenesysLogic",
                "product": "USB3.2 Hub" if superspeed else "USB2.1 Hub",
                "descriptors": hub_sysfs_descriptors(vid, pid, superspeed=superspeed),
            },
        )
        interface = self.root / f"{name}:1.0"
        self._attrs(interface, {"bInterfaceClass": "09", "bInterfaceNumber": "00"})
        for port in range(1, ports + 1):
            port_dir = interface / f"{name}-port{port}"
            port_dir.mkdir()
            (port_dir / "connect_type").write_text("hotplug\n")
            if disable_files:
                (port_dir / "disable").write_text("0\n")
        return directory

    def add_device(
        self,
        name: str,
        *,
        vid: int = 0x05AC,
        pid: int = 0x12A8,
        serial: str = "00008030001A2B3C0E12802E",
        device_class: int = 0,
    ) -> Path:
        return self._device(
            name,
            vid=vid,
            pid=pid,
            device_class=device_class,
            protocol=0,
            extra={
                "serial": serial,
                "manufacturer": "Apple Inc.",
                "product": "iPhone",
                "speed": "480",
                "descriptors": device_descriptor(vid, pid, configurations=0),
            },
        )

    def remove(self, name: str) -> None:
        shutil.rmtree(self.root / name)
        for interface in self.root.glob(f"{name}:*"):
            shutil.rmtree(interface)

    def port_dir(self, hub: str, port: int) -> Path:
        return self.root / f"{hub}:1.0" / f"{hub}-port{port}"

    def link_peers(self, usb2_hub: str, usb3_hub: str, ports: int) -> None:
        """The kernel's `peer` links between the matching ports of a USB3 hub's two halves."""
        for port in range(1, ports + 1):
            a, b = self.port_dir(usb2_hub, port), self.port_dir(usb3_hub, port)
            (a / "peer").symlink_to(os.path.relpath(b, a))
            (b / "peer").symlink_to(os.path.relpath(a, b))

    def disable_writes(self, hub: str, port: int) -> str:
        return (self.port_dir(hub, port) / "disable").read_text()
