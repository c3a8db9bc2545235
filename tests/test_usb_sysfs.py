"""`daemon.usb.sysfs` against fake sysfs trees laid out as the kernel does: real device directories
under `devices/pci.../usbN/...`, symlinked from `bus/usb/devices/`, interfaces and root hubs alongside."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon.usb.sysfs import UsbSysfs, location_id, path_key, split_location_id

IPHONE_SERIAL = "00008030001A2C3E0E12802E"
RECOVERY_SERIAL = (
    "CPID:8030 CPRV:11 CPFM:03 SCEP:01 BDID:0C ECID:001A2C3E0E12802E IBFL:3C SRNM:[F2LXK3ABHG7F]"
)


class FakeSysfs:
    """Builds `<tmp>/devices/pci0000:00/0000:00:14.0/usbN/...` and the `<tmp>/bus/usb/devices` links."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.devices = base / "devices" / "pci0000:00" / "0000:00:14.0"
        self.root = base / "bus" / "usb" / "devices"
        self.root.mkdir(parents=True)
        self._next_devnum: dict[int, int] = {}

    def _real_dir(self, name: str) -> Path:
        bus, _, rest = name.partition("-")
        parts = [f"usb{bus}"]
        if rest:
            ports = rest.split(".")
            parts += [f"{bus}-{'.'.join(ports[: i + 1])}" for i in range(len(ports))]
        return self.devices.joinpath(*parts)

    def _link(self, name: str, real: Path) -> None:
        link = self.root / name
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(real, self.root))

    def root_hub(self, bus: int) -> None:
        real = self._real_dir(str(bus))
        real.mkdir(parents=True, exist_ok=True)
        self._write(real, busnum=bus, devnum=1, devpath="0", idVendor="1d6b", idProduct="0002", maxchild=12)
        self._link(f"usb{bus}", real)
        iface = real / f"{bus}-0:1.0"
        iface.mkdir(exist_ok=True)
        self._link(f"{bus}-0:1.0", iface)
        self._next_devnum.setdefault(bus, 2)

    def add(
        self,
        name: str,
        vid: int,
        pid: int,
        serial: str | None = None,
        devnum: int | None = None,
        **extra: object,
    ) -> int:
        """Enumerate a device at sysfs name `name` (`3-2.4.1`); returns its devnum."""
        bus = int(name.split("-", maxsplit=1)[0])
        if bus not in self._next_devnum:
            self.root_hub(bus)
        if devnum is None:
            devnum = self._next_devnum[bus]
        self._next_devnum[bus] = max(self._next_devnum[bus], devnum) + 1
        real = self._real_dir(name)
        real.mkdir(parents=True, exist_ok=True)
        attrs: dict[str, object] = {
            "busnum": bus,
            "devnum": devnum,
            "devpath": name.split("-", 1)[1],
            "idVendor": f"{vid:04x}",
            "idProduct": f"{pid:04x}",
            "bDeviceClass": "09" if extra.pop("hub", False) else "00",
            "bDeviceProtocol": "00",
            "speed": 480,
        }
        if serial is not None:
            attrs["serial"] = serial
        attrs.update(extra)
        self._write(real, **attrs)
        self._link(name, real)
        iface = real / f"{name}:1.0"
        iface.mkdir(exist_ok=True)
        self._link(f"{name}:1.0", iface)
        return devnum

    def remove(self, name: str) -> None:
        """Unplug: the kernel removes the device and everything below it."""
        for entry in list(self.root.iterdir()):
            if entry.name == name or entry.name.startswith((f"{name}.", f"{name}:")):
                entry.unlink()
        real = self._real_dir(name)
        for path in sorted(real.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        real.rmdir()

    @staticmethod
    def _write(directory: Path, **attrs: object) -> None:
        for key, value in attrs.items():
            (directory / key).write_text(f"{value}\n", encoding="utf-8")


@pytest.fixture
def fake(tmp_path: Path) -> FakeSysfs:
    return FakeSysfs(tmp_path)


def bench(fake: FakeSysfs) -> None:
    """Bus 3: a 2-level hub chain with an iPhone at 3-2.4.1, one in Recovery at 3-2.4.3, a keyboard;
    bus 1: an FTDI (hub controller) at 1-14."""
    fake.add("3-2", 0x05E3, 0x0610, hub=True)
    fake.add("3-2.4", 0x05E3, 0x0610, hub=True)
    fake.add("3-2.4.1", 0x05AC, 0x12A8, IPHONE_SERIAL, devnum=17)
    fake.add("3-2.4.3", 0x05AC, 0x1281, RECOVERY_SERIAL, devnum=19)
    fake.add("3-2.10", 0x05AC, 0x024F)  # an Apple keyboard
    fake.add("1-14", 0x0403, 0x6015, "DN0123")


def test_location_id_round_trip() -> None:
    assert location_id(3, 17) == 0x30011
    assert split_location_id(0x30011) == (3, 17)
    for bad in (-1, 1 << 32):
        with pytest.raises(ValueError, match="out of range"):
            split_location_id(bad)
    with pytest.raises(ValueError, match="out of range"):
        location_id(0x10000, 1)


def test_names_skip_root_hubs_and_interfaces_in_path_order(fake: FakeSysfs) -> None:
    bench(fake)
    assert UsbSysfs(fake.root).names() == ["1-14", "3-2", "3-2.4", "3-2.4.1", "3-2.4.3", "3-2.10"]
    assert sorted(["3-10", "3-2.10", "3-2.9", "10-1", "3-2"], key=path_key) == [
        "3-2",
        "3-2.9",
        "3-2.10",
        "3-10",
        "10-1",
    ]


def test_location_id_resolves_to_port_path(fake: FakeSysfs) -> None:
    bench(fake)
    sysfs = UsbSysfs(fake.root)
    assert sysfs.path_for_location_id(location_id(3, 17)) == "3-2.4.1"
    assert sysfs.path_for_location_id((3 << 16) | 19) == "3-2.4.3"
    assert sysfs.path_for_location_id((1 << 16) | 17) is None  # same devnum, other bus
    assert sysfs.path_for_location_id((3 << 16) | 99) is None
    assert sysfs.path_for_location_id((3 << 16) | 1) is None  # the root hub is no port
    assert sysfs.path_for_location_id(-5) is None
    device = sysfs.find_location(3, 17)
    assert device is not None
    assert (device.vendor_id, device.product_id, device.serial) == (0x05AC, 0x12A8, IPHONE_SERIAL)


def test_location_id_after_re_enumeration(fake: FakeSysfs) -> None:
    bench(fake)
    sysfs = UsbSysfs(fake.root)
    fake.remove("3-2.4.1")
    assert sysfs.path_for_location_id(location_id(3, 17)) is None
    fake.add("3-2.4.1", 0x05AC, 0x1281, RECOVERY_SERIAL, devnum=23)
    assert sysfs.path_for_location_id(location_id(3, 23)) == "3-2.4.1"


def test_apple_devices_read_identity(fake: FakeSysfs) -> None:
    bench(fake)
    found = {d.name: d for d in UsbSysfs(fake.root).apple_devices()}
    assert set(found) == {"3-2.4.1", "3-2.4.3", "3-2.10"}
    assert found["3-2.4.3"].serial == RECOVERY_SERIAL
    assert (found["3-2.4.3"].busnum, found["3-2.4.3"].devnum) == (3, 19)
    assert found["3-2.10"].serial is None


def test_devices_under_hub(fake: FakeSysfs) -> None:
    bench(fake)
    sysfs = UsbSysfs(fake.root)
    assert [d.name for d in sysfs.devices(under="3-2.4")] == ["3-2.4.1", "3-2.4.3"]
    assert [d.name for d in sysfs.devices(under="3-2")] == ["3-2.4", "3-2.4.1", "3-2.4.3", "3-2.10"]
    assert sysfs.devices(under="3-2.4.1") == []
    assert [d.name for d in sysfs.devices(under="3-1")] == []  # not a prefix match of 3-10 etc.
    assert len(sysfs.devices()) == 6


def test_odd_entries_are_skipped(fake: FakeSysfs) -> None:
    bench(fake)
    fake.add("3-2.4.2", 0x05AC, 0x12A8, idVendor="zzzz")  # garbled
    half = fake.root / "3-2.4.4"
    half.mkdir()  # half gone: no attributes left
    (fake.root / "3-2.4.5").write_text("not a directory")
    sysfs = UsbSysfs(fake.root)
    assert "3-2.4.2" in sysfs.names()
    assert sysfs.device("3-2.4.2") is None
    assert sysfs.device("3-2.4.4") is None
    assert sysfs.device("3-2.4.5") is None
    assert sysfs.device("9-9") is None
    assert {d.name for d in sysfs.apple_devices()} == {"3-2.4.1", "3-2.4.3", "3-2.10"}


def test_missing_root(tmp_path: Path) -> None:
    sysfs = UsbSysfs(tmp_path / "nope")
    assert not sysfs.available()
    assert sysfs.names() == []
    assert sysfs.apple_devices() == []
    assert sysfs.path_for_location_id(0x30011) is None
    assert UsbSysfs(tmp_path).available()
