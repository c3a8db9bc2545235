"""`daemon.usb.sysfs` against fake sysfs trees laid out as the kernel does: real device directories
under `devices/pci.../usbN/...`, symlinked from `bus/usb/devices/`, interfaces and root hubs alongside,
hub ports below the hub interfaces, and the `peer` links between the two halves of USB 3 hubs."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pytest

from daemon.usb.sysfs import UsbSysfs, location_id, path_key, split_location_id

IPHONE_SERIAL = "00008030001A2C3E0E12802E"
RECOVERY_SERIAL = (
    "CPID:8030 CPRV:11 CPFM:03 SCEP:01 BDID:0C ECID:001A2C3E0E12802E IBFL:3C SRNM:[F2LXK3ABHG7F]"
)
PRO_SERIAL = "00008130001E2D4A0C38801E"  # an iPhone 15 Pro (USB-C, SuperSpeed with a USB 3 cable)


class FakeSysfs:
    """Builds `<tmp>/devices/pci0000:00/0000:00:14.0/usbN/...` and the `<tmp>/bus/usb/devices` links.

    Ports (`xhci`, `usb3_hub`, `ports`) are laid out as `drivers/usb/core/port.c` registers them: a
    device `<hub>-portN` below the hub's interface (`3-2/3-2:1.0/3-2-port4`; for a root hub
    `usb3/3-0:1.0/usb3-port2`), not linked from `bus/usb/devices`. `link_peers` adds the kernel's
    `peer` symlinks (relative, both ways); `remove` drops the other half's link too, as
    `unlink_peers` does when a hub goes."""

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

    def root_hub(self, bus: int, *, superspeed: bool = False, ports: int = 0) -> None:
        """Root hub `usbN` (what xHCI registers: USB 2 `1d6b:0002` at 480, or `1d6b:0003` at 5000)."""
        real = self._real_dir(str(bus))
        real.mkdir(parents=True, exist_ok=True)
        self._write(
            real,
            busnum=bus,
            devnum=1,
            devpath="0",
            idVendor="1d6b",
            idProduct="0003" if superspeed else "0002",
            bDeviceClass="09",
            bDeviceProtocol="03" if superspeed else "01",
            bConfigurationValue=1,
            maxchild=max(ports, 12),
            speed=5000 if superspeed else 480,
            version=" 3.00" if superspeed else " 2.00",
        )
        self._link(f"usb{bus}", real)
        iface = real / f"{bus}-0:1.0"
        iface.mkdir(exist_ok=True)
        self._link(f"{bus}-0:1.0", iface)
        self._next_devnum.setdefault(bus, 2)
        self.ports(f"usb{bus}", ports)

    def xhci(
        self, usb2_bus: int, ss_bus: int, *, ports: int = 4, pairs: Mapping[int, int] | None = None
    ) -> None:
        """An xHCI controller's two root hubs, their ports peered: USB 2 port -> SuperSpeed port
        `pairs` (by firmware location, so numbers may differ), by default port N with port N."""
        self.root_hub(usb2_bus, ports=ports)
        self.root_hub(ss_bus, superspeed=True, ports=ports)
        for usb2_port, ss_port in (pairs or {n: n for n in range(1, ports + 1)}).items():
            self.link_peers((f"usb{usb2_bus}", usb2_port), (f"usb{ss_bus}", ss_port))

    def usb3_hub(self, usb2_name: str, ss_name: str, *, ports: int = 4) -> None:
        """A USB 3 hub (Genesys GL3523-like): its USB 2 half at `usb2_name`, its SuperSpeed half at
        `ss_name`, ports peered one to one."""
        self.add(usb2_name, 0x05E3, 0x0610, hub=True, bDeviceProtocol="02", maxchild=ports)
        self.add(ss_name, 0x05E3, 0x0626, hub=True, bDeviceProtocol="03", maxchild=ports, speed=5000)
        self.ports(usb2_name, ports)
        self.ports(ss_name, ports)
        for n in range(1, ports + 1):
            self.link_peers((usb2_name, n), (ss_name, n))

    def port_dir(self, hub: str, port: int) -> Path:
        """The real directory of port `port` of `hub` (a device name, or `usbN` for a root hub)."""
        if hub.startswith("usb"):
            bus = hub.removeprefix("usb")
            return self._real_dir(bus) / f"{bus}-0:1.0" / f"{hub}-port{port}"
        return self._real_dir(hub) / f"{hub}:1.0" / f"{hub}-port{port}"

    def ports(self, hub: str, count: int) -> None:
        for n in range(1, count + 1):
            port_dir = self.port_dir(hub, n)
            port_dir.mkdir(parents=True, exist_ok=True)
            self._write(port_dir, connect_type="hotplug")

    def link_peers(self, a: tuple[str, int], b: tuple[str, int]) -> None:
        """`peer` in each port directory, pointing at the other (relative, as kernfs writes it)."""
        a_dir, b_dir = self.port_dir(*a), self.port_dir(*b)
        (a_dir / "peer").symlink_to(os.path.relpath(b_dir, a_dir))
        (b_dir / "peer").symlink_to(os.path.relpath(a_dir, b_dir))

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
            if path.name == "peer" and path.is_symlink():
                (path.parent / os.readlink(path) / "peer").unlink(missing_ok=True)
            path.unlink() if path.is_file() or path.is_symlink() else path.rmdir()
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


# ------------------------------------------------------------------------------------- USB 3 hubs


def usb3_bench(fake: FakeSysfs) -> None:
    """An xHCI controller (bus 3 USB 2, bus 4 SuperSpeed) with a USB 3 hub on root port 2 (`3-2` /
    `4-2`) and a second one chained on its port 4 (`3-2.4` / `4-2.4`): an iPhone 15 Pro at
    SuperSpeed on the chained hub's port 1, a Lightning iPhone at high speed on its port 3."""
    fake.xhci(3, 4)
    fake.usb3_hub("3-2", "4-2")
    fake.usb3_hub("3-2.4", "4-2.4")
    fake.add("4-2.4.1", 0x05AC, 0x12A8, PRO_SERIAL, devnum=7, speed=5000)
    fake.add("3-2.4.3", 0x05AC, 0x12A8, IPHONE_SERIAL, devnum=17)


def test_fake_peer_links_are_laid_out_as_the_kernel_does(fake: FakeSysfs) -> None:
    usb3_bench(fake)
    root_port = fake.root / "4-0:1.0" / "usb4-port2" / "peer"
    hub_port = fake.root / "4-2.4:1.0" / "4-2.4-port1" / "peer"
    assert os.readlink(root_port) == "../../../usb3/3-0:1.0/usb3-port2"
    assert Path(os.path.realpath(hub_port)) == fake.port_dir("3-2.4", 1)
    assert str(fake.port_dir("3-2.4", 1)).endswith("usb3/3-2/3-2.4/3-2.4:1.0/3-2.4-port1")
    assert not (fake.root / "3-2.4-port1").exists()  # port devices are not in bus/usb/devices


def test_superspeed_device_is_named_by_the_usb2_side(fake: FakeSysfs) -> None:
    usb3_bench(fake)
    sysfs = UsbSysfs(fake.root)
    assert (sysfs.superspeed_bus(4), sysfs.superspeed_bus(3), sysfs.superspeed_bus(9)) == (True, False, False)
    assert sysfs.canonical_path("4-2.4.1") == "3-2.4.1"  # two levels of hub below the root port
    assert sysfs.canonical_path("4-2.4") == "3-2.4"
    assert sysfs.canonical_path("4-2") == "3-2"  # a root hub port
    assert sysfs.peer_path("4-2.4.1") == "3-2.4.1"
    # a high-speed device is already on the USB 2 side, though its port has a peer
    assert sysfs.canonical_path("3-2.4.3") == "3-2.4.3"
    assert sysfs.peer_path("3-2.4.3") == "4-2.4.3"
    assert sysfs.path_for_location_id(location_id(4, 7)) == "4-2.4.1"  # the kernel's name, unchanged


def test_root_ports_paired_by_location(fake: FakeSysfs) -> None:
    """Firmware may pair root ports with different numbers (SuperSpeed port 1 = USB 2 port 5)."""
    fake.xhci(3, 4, ports=6, pairs={5: 1, 6: 2})
    fake.usb3_hub("3-5", "4-1")
    fake.add("4-1.2", 0x05AC, 0x12A8, PRO_SERIAL, speed=5000)
    sysfs = UsbSysfs(fake.root)
    assert sysfs.canonical_path("4-1") == "3-5"
    assert sysfs.canonical_path("4-1.2") == "3-5.2"
    assert sysfs.canonical_path("4-3") == "4-3"  # a root port without a peer


def test_canonical_path_needs_the_hub_not_the_device(fake: FakeSysfs) -> None:
    usb3_bench(fake)
    sysfs = UsbSysfs(fake.root)
    fake.remove("4-2.4.1")
    assert sysfs.canonical_path("4-2.4.1") == "3-2.4.1"  # the link is on the hub's port
    fake.remove("4-2.4")  # the chained hub's SuperSpeed half goes; the kernel unlinks both sides
    assert not (fake.port_dir("3-2.4", 1) / "peer").exists()
    assert sysfs.canonical_path("4-2.4.1") == "4-2.4.1"
    assert sysfs.canonical_path("4-2.4") == "3-2.4"


def test_missing_or_odd_peer_leaves_the_name(fake: FakeSysfs, tmp_path: Path) -> None:
    usb3_bench(fake)
    fake.add("4-2.2", 0x05AC, 0x12A8, speed=5000)
    fake.add("4-2.3", 0x05AC, 0x12A8, speed=5000)
    sysfs = UsbSysfs(fake.root)
    (fake.port_dir("4-2.4", 1) / "peer").unlink()
    assert sysfs.canonical_path("4-2.4.1") == "4-2.4.1"
    assert sysfs.peer_path("4-2.4.1") is None
    odd = fake.port_dir("4-2", 2) / "peer"
    odd.unlink()
    odd.symlink_to("../../../../usb3/3-2/3-2:1.0/3-2-power")  # not a port device
    assert sysfs.canonical_path("4-2.2") == "4-2.2"
    plain = fake.port_dir("4-2", 3) / "peer"
    plain.unlink()
    plain.write_text("3-2-port3\n")  # a file, not a link
    assert sysfs.canonical_path("4-2.3") == "4-2.3"
    (fake.root / "4-2" / "bConfigurationValue").write_text("\n")  # unreadable: configuration 1
    assert sysfs.canonical_path("4-2.4") == "3-2.4"
    for name in ("usb4", "4-0", "4-2.4:1.0", "4-2.0", "", "x-1", "4-2.9", "5-1"):
        assert sysfs.canonical_path(name) == name
        assert sysfs.peer_path(name) is None
    nowhere = UsbSysfs(tmp_path / "absent")
    assert nowhere.canonical_path("4-2.4.1") == "4-2.4.1"
    assert nowhere.peer_path("4-2.4.1") is None


def test_bus_speed_from_version_when_speed_is_unreadable(fake: FakeSysfs) -> None:
    fake.xhci(3, 4)
    sysfs = UsbSysfs(fake.root)
    speed, version = fake.root / "usb4" / "speed", fake.root / "usb4" / "version"
    speed.write_text("unknown\n")
    assert sysfs.superspeed_bus(4)  # version " 3.00"
    version.write_text(" 2.00\n")
    assert not sysfs.superspeed_bus(4)
    speed.write_text("10000\n")  # SuperSpeed+ outranks a garbled version
    assert sysfs.superspeed_bus(4)
    speed.unlink()
    version.unlink()
    assert not sysfs.superspeed_bus(4)
