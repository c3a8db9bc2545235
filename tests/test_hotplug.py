"""`daemon.usb.hotplug`: the device map, polling over a fake sysfs and over pyusb with a backend
double, udev event translation with real pyudev `Device` objects, and (where this host allows it)
the udev source end to end through a real netlink socket."""

from __future__ import annotations

import array
import asyncio
import contextlib
import ctypes
import errno
import os
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import structlog.testing
import usb.backend
import usb.core

from daemon.ios.base import DeviceGone, DeviceMode, DeviceSeen
from daemon.usb import hotplug
from daemon.usb.hotplug import (
    DeviceMap,
    PollingHotplug,
    PyusbEnumerator,
    SysfsEnumerator,
    UdevHotplug,
    UsbAction,
    UsbEvent,
    UsbSighting,
    open_hotplug,
    udev_sighting,
)
from daemon.usb.sysfs import UsbSysfs
from tests.test_usb_sysfs import IPHONE_SERIAL, PRO_SERIAL, RECOVERY_SERIAL, FakeSysfs, usb3_bench

pyudev = pytest.importorskip("pyudev")

ECID = 0x001A2C3E0E12802E
UDID = "00008030-001A2C3E0E12802E"
OTHER_SERIAL = "00008110001C604A3405801E"
ADDED, REMOVED = UsbAction.ADDED, UsbAction.REMOVED


def summary(events: list[UsbEvent]) -> list[tuple[str, str, DeviceMode, int | None]]:
    return [(e.action.value, e.usb_path, e.mode, e.ecid) for e in events]


@pytest.fixture
def fake(tmp_path: Path) -> FakeSysfs:
    return FakeSysfs(tmp_path)


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hotplug, "backoff_delay", lambda _tries: 0.01)


# ------------------------------------------------------------------------------------------ DeviceMap


def test_map_added_then_removed_keeps_identity() -> None:
    devices = DeviceMap()
    [added] = devices.add(UsbSighting("3-2.4", 0x05AC, 0x12A8, IPHONE_SERIAL, bus=3, devnum=17))
    assert (added.action, added.udid, added.ecid, added.location_id) == (ADDED, UDID, ECID, 0x30011)
    assert added.ecid_hex == "001A2C3E0E12802E"
    assert devices.add(UsbSighting("3-2.4", 0x05AC, 0x12A8, IPHONE_SERIAL, bus=3, devnum=17)) == []
    [removed] = devices.remove("3-2.4")
    assert removed.action is REMOVED
    assert (removed.serial, removed.udid, removed.ecid, removed.pid) == (IPHONE_SERIAL, UDID, ECID, 0x12A8)
    assert devices.remove("3-2.4") == []
    assert devices.present == {}


def test_map_ignores_non_ios_devices() -> None:
    devices = DeviceMap()
    assert devices.add(UsbSighting("3-2", 0x05E3, 0x0610)) == []
    assert devices.add(UsbSighting("3-3", 0x05AC, 0x024F)) == []  # Apple keyboard
    assert devices.remove("3-2", UsbSighting("3-2", 0x05E3, 0x0610)) == []


def test_map_same_path_new_device_is_removed_then_added() -> None:
    devices = DeviceMap()
    devices.add(UsbSighting("3-2.4", 0x05AC, 0x12A8, IPHONE_SERIAL, bus=3, devnum=17))
    # a missed unplug: another phone is now there
    events = devices.add(UsbSighting("3-2.4", 0x05AC, 0x12A8, OTHER_SERIAL, bus=3, devnum=30))
    assert summary(events) == [
        ("removed", "3-2.4", DeviceMode.NORMAL, ECID),
        ("added", "3-2.4", DeviceMode.NORMAL, 0x001C604A3405801E),
    ]
    # the same phone re-enumerated (new devnum) between two looks
    events = devices.add(UsbSighting("3-2.4", 0x05AC, 0x12A8, OTHER_SERIAL, bus=3, devnum=31))
    assert [e.action for e in events] == [REMOVED, ADDED]
    # a non-iOS device replacing an iOS one removes it
    assert [e.action for e in devices.add(UsbSighting("3-2.4", 0x0403, 0x6015))] == [REMOVED]


def test_event_as_device_event() -> None:
    [added] = DeviceMap().add(UsbSighting("3-2.4", 0x05AC, 0x1281, RECOVERY_SERIAL))
    assert added.as_device_event() == DeviceSeen(
        "3-2.4", DeviceMode.RECOVERY, udid=None, ecid="001A2C3E0E12802E"
    )
    assert added.udid is None
    assert added.location_id is None
    assert UsbEvent(
        REMOVED, "3-2.4", 0x05AC, 0x1281, None, DeviceMode.RECOVERY, None, None
    ).as_device_event() == (DeviceGone("3-2.4"))


# ------------------------------------------------------------------------------------- polling: sysfs


async def test_polling_sysfs_diff_and_re_enumeration(fake: FakeSysfs) -> None:
    fake.add("3-2", 0x05E3, 0x0610, hub=True)
    fake.add("3-2.1", 0x05AC, 0x12A8, OTHER_SERIAL, devnum=5)
    source = PollingHotplug(SysfsEnumerator(UsbSysfs(fake.root)), interval=0.01)
    assert source.name == "poll-sysfs"
    assert summary(await source.poll_once()) == [("added", "3-2.1", DeviceMode.NORMAL, 0x001C604A3405801E)]
    assert await source.poll_once() == []

    fake.add("3-2.4", 0x05AC, 0x12A8, IPHONE_SERIAL, devnum=17)
    [added] = await source.poll_once()
    assert (added.action, added.usb_path, added.udid, added.location_id) == (ADDED, "3-2.4", UDID, 0x30011)

    # normal -> Recovery (EnterRecovery) -> normal, all on port 3-2.4
    fake.remove("3-2.4")
    [removed] = await source.poll_once()
    assert (removed.action, removed.serial, removed.udid, removed.ecid) == (
        REMOVED,
        IPHONE_SERIAL,
        UDID,
        ECID,
    )
    fake.add("3-2.4", 0x05AC, 0x1281, RECOVERY_SERIAL, devnum=18)
    [recovery] = await source.poll_once()
    assert (recovery.mode, recovery.ecid, recovery.udid) == (DeviceMode.RECOVERY, ECID, None)
    # re-enumeration faster than the poll interval still shows as removed + added
    fake.remove("3-2.4")
    fake.add("3-2.4", 0x05AC, 0x12A8, IPHONE_SERIAL, devnum=21)
    assert summary(await source.poll_once()) == [
        ("removed", "3-2.4", DeviceMode.RECOVERY, ECID),
        ("added", "3-2.4", DeviceMode.NORMAL, ECID),
    ]
    assert set(source.present) == {"3-2.1", "3-2.4"}


async def test_polling_sysfs_unreadable_is_not_everything_removed(fake: FakeSysfs) -> None:
    fake.add("3-2.1", 0x05AC, 0x12A8, IPHONE_SERIAL)
    source = PollingHotplug(SysfsEnumerator(UsbSysfs(fake.root)))
    assert len(await source.poll_once()) == 1
    fake.root.rename(fake.root.with_name("gone"))
    with pytest.raises(OSError, match="cannot list"):
        await source.poll_once()
    assert set(source.present) == {"3-2.1"}


class ScriptedEnumerator:
    name = "scripted"
    description = "a script"

    def __init__(self, *results: list[UsbSighting] | Exception) -> None:
        self.results = list(results)

    async def scan(self) -> list[UsbSighting]:
        result = self.results.pop(0) if len(self.results) > 1 else self.results[0]
        if isinstance(result, Exception):
            raise result
        return result


async def test_polling_sysfs_superspeed_device_on_the_usb2_path(fake: FakeSysfs) -> None:
    usb3_bench(fake)  # an iPhone 15 Pro at SuperSpeed on 4-2.4.1, a Lightning iPhone on 3-2.4.3
    source = PollingHotplug(SysfsEnumerator(UsbSysfs(fake.root)))
    added = await source.poll_once()
    assert [(e.action, e.usb_path, e.sysfs_name) for e in added] == [
        (ADDED, "3-2.4.1", "4-2.4.1"),
        (ADDED, "3-2.4.3", None),
    ]
    assert added[0].location_id == (4 << 16) | 7  # usbmuxd's LocationID names the SuperSpeed bus
    assert await source.poll_once() == []  # stable from poll to poll
    fake.remove("4-2")  # the whole hub is unplugged: both halves, their ports and peer links go
    fake.remove("3-2")
    removed = await source.poll_once()
    assert [(e.action, e.usb_path, e.udid) for e in removed] == [
        (REMOVED, "3-2.4.1", "00008130-001E2D4A0C38801E"),
        (REMOVED, "3-2.4.3", UDID),
    ]
    assert source.present == {}


async def test_polling_stream_survives_enumeration_errors(no_backoff: None) -> None:
    phone = UsbSighting("1-1", 0x05AC, 0x12A8, IPHONE_SERIAL)
    source = PollingHotplug(
        ScriptedEnumerator([phone], usb.core.NoBackendError("No backend available"), RuntimeError("x"), []),
        interval=0.001,
    )
    stream = source.events()
    async with contextlib.aclosing(stream):
        first = await asyncio.wait_for(anext(stream), 2)
        second = await asyncio.wait_for(anext(stream), 2)
    assert [(first.action, first.usb_path), (second.action, second.usb_path)] == [
        (ADDED, "1-1"),
        (REMOVED, "1-1"),
    ]
    assert second.udid == UDID


# ------------------------------------------------------------------------------------- polling: pyusb


class FakeUsbDevice:
    def __init__(  # noqa: PLR0917 - reads like a device listing
        self,
        bus: int,
        address: int,
        ports: tuple[int, ...] | None,
        vid: int,
        pid: int,
        serial: str | None,
        *,
        open_error: int | None = None,
    ) -> None:
        self.strings = {3: serial} if serial is not None else {}
        self.open_error = open_error
        self.desc = SimpleNamespace(
            bLength=18,
            bDescriptorType=1,
            bcdUSB=0x0200,
            bDeviceClass=0,
            bDeviceSubClass=0,
            bDeviceProtocol=0,
            bMaxPacketSize0=64,
            idVendor=vid,
            idProduct=pid,
            bcdDevice=0x1001,
            iManufacturer=0,
            iProduct=0,
            iSerialNumber=3 if serial is not None else 0,
            bNumConfigurations=1,
            address=address,
            bus=bus,
            port_number=ports[-1] if ports else None,
            port_numbers=ports,
            speed=3,
        )


class FakeUsbBackend(usb.backend.IBackend):  # type: ignore[misc]
    """A pyusb backend serving descriptors and string descriptors from memory, so the real pyusb
    `find`, `Device.serial_number` and resource handling run."""

    def __init__(self, *devices: FakeUsbDevice) -> None:
        self.devices = list(devices)
        self.opens = 0

    def enumerate_devices(self) -> Iterator[FakeUsbDevice]:
        return iter(list(self.devices))

    def get_device_descriptor(self, dev: FakeUsbDevice) -> SimpleNamespace:
        return dev.desc

    def open_device(self, dev: FakeUsbDevice) -> FakeUsbDevice:
        if dev.open_error is not None:
            raise usb.core.USBError("Access denied (insufficient permissions)", errno=dev.open_error)
        self.opens += 1
        return dev

    def close_device(self, dev_handle: FakeUsbDevice) -> None:
        pass

    def ctrl_transfer(  # noqa: PLR0917 - pyusb's backend interface
        self,
        dev_handle: FakeUsbDevice,
        bmRequestType: int,
        bRequest: int,
        wValue: int,
        wIndex: int,
        data: array.array[int],
        timeout: int,
    ) -> int:
        assert (bmRequestType, bRequest, wValue >> 8) == (0x80, 6, 3)  # GET_DESCRIPTOR(STRING)
        index = wValue & 0xFF
        if index == 0:
            payload = bytes([4, 3, 0x09, 0x04])  # langid en-US
        else:
            text = dev_handle.strings[index].encode("utf-16-le")
            payload = bytes([2 + len(text), 3]) + text
        n = min(len(data), len(payload))
        data[:n] = array.array("B", payload[:n])
        return n


async def test_polling_pyusb_paths_serials_and_errors(caplog: pytest.LogCaptureFixture) -> None:
    backend = FakeUsbBackend(
        FakeUsbDevice(3, 17, (2, 4, 1), 0x05AC, 0x12A8, IPHONE_SERIAL),
        FakeUsbDevice(3, 19, (2, 4, 3), 0x05AC, 0x1281, RECOVERY_SERIAL),
        FakeUsbDevice(3, 20, (2, 4, 2), 0x05AC, 0x12A8, OTHER_SERIAL, open_error=errno.EACCES),
        FakeUsbDevice(3, 1, None, 0x05AC, 0x12A8, None),  # no port numbers: cannot be placed
        FakeUsbDevice(3, 21, (2, 5), 0x0403, 0x6015, "DN0123"),  # not Apple: never opened
    )
    source = PollingHotplug(PyusbEnumerator(backend=backend), interval=0.01)
    assert source.name == "poll-pyusb"
    events = {e.usb_path: e for e in await source.poll_once()}
    assert set(events) == {"3-2.4.1", "3-2.4.2", "3-2.4.3"}
    assert (events["3-2.4.1"].udid, events["3-2.4.1"].location_id) == (UDID, 0x30011)
    assert (events["3-2.4.3"].mode, events["3-2.4.3"].ecid) == (DeviceMode.RECOVERY, ECID)
    assert (events["3-2.4.2"].serial, events["3-2.4.2"].udid) == (None, None)  # no permission
    assert backend.opens == 2

    assert await source.poll_once() == []
    assert backend.opens == 2  # serials are read once per enumeration of a device

    # 3-2.4.1 goes to Recovery: new address, new PID, same port
    backend.devices[0] = FakeUsbDevice(3, 22, (2, 4, 1), 0x05AC, 0x1281, RECOVERY_SERIAL)
    assert summary(await source.poll_once()) == [
        ("removed", "3-2.4.1", DeviceMode.NORMAL, ECID),
        ("added", "3-2.4.1", DeviceMode.RECOVERY, ECID),
    ]
    assert backend.opens == 3


async def test_pyusb_without_backend_raises_so_polling_retries() -> None:
    class NoBackend(usb.backend.IBackend):  # type: ignore[misc]
        def enumerate_devices(self) -> Iterator[Any]:
            raise usb.core.NoBackendError("No backend available")

    with pytest.raises(usb.core.NoBackendError):
        await PollingHotplug(PyusbEnumerator(backend=NoBackend())).poll_once()


# ------------------------------------------------------------------------------- udev: translation

DEVROOT = "/devices/benchhub-test/usb3/3-2/3-2.4"
_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def c_environment(props: dict[str, str]) -> Iterator[None]:
    """The C-level environment holds exactly `props`, then is rebuilt from `os.environ`.

    libudev's `udev_device_new_from_environment` splits `environ`'s `KEY=VALUE` strings in place
    (seen with libudev 252: afterwards `getenv("HOME")` is NULL and a second call fails), so it
    must never see the real environment. Python's `os.environ` is not touched."""
    try:
        _libc.clearenv()
        for key, value in props.items():
            _libc.setenv(key.encode(), value.encode(), 1)
        yield
    finally:
        _libc.clearenv()
        for key, value in os.environ.items():
            os.putenv(key, value)


def udev_device(action: str, sys_name: str, devtype: str = "usb_device", **props: str) -> Any:
    """A real pyudev Device, built by libudev from uevent properties (`Devices.from_environment`),
    like one read from the netlink socket. Its sysfs directory does not exist, as in a remove event."""
    env = {"ACTION": action, "DEVPATH": f"{DEVROOT}/{sys_name}", "SUBSYSTEM": "usb", "DEVTYPE": devtype}
    with c_environment({**env, "SEQNUM": "1", **props}):
        return pyudev.Devices.from_environment(pyudev.Context())


def udev_add(sys_name: str, pid: int, serial: str, devnum: int, bus: int = 3) -> Any:
    return udev_device(
        "add",
        sys_name,
        PRODUCT=f"5ac/{pid:x}/1001",
        BUSNUM=f"{bus:03d}",
        DEVNUM=f"{devnum:03d}",
        ID_VENDOR_ID="05ac",
        ID_MODEL_ID=f"{pid:04x}",
        ID_SERIAL_SHORT=serial,
    )


def udev_remove(sys_name: str, pid: int, devnum: int, bus: int = 3) -> Any:
    """What the kernel puts in a usb_device remove uevent (no udev ID_* properties)."""
    return udev_device(
        "remove", sys_name, PRODUCT=f"5ac/{pid:x}/1001", BUSNUM=f"{bus:03d}", DEVNUM=f"{devnum:03d}"
    )


def mangled(serial: str) -> str:
    """udev's ID_SERIAL_SHORT spelling of a serial string."""
    return serial.replace(" ", "_").replace("[", "_").replace("]", "_")


def test_udev_sighting_from_properties() -> None:
    device = udev_add("3-2.4.1", 0x12A8, IPHONE_SERIAL, 17)
    assert isinstance(device, pyudev.Device)
    assert udev_sighting(device) == UsbSighting("3-2.4.1", 0x05AC, 0x12A8, IPHONE_SERIAL, 3, 17)
    # remove events: IDs from the kernel's PRODUCT, no serial
    assert udev_sighting(udev_remove("3-2.4.1", 0x1281, 18)) == UsbSighting(
        "3-2.4.1", 0x05AC, 0x1281, None, 3, 18
    )
    # root hubs, interfaces and devices without IDs are not sightings
    assert udev_sighting(udev_device("add", "usb3", PRODUCT="1d6b/2/606")) is None
    assert (
        udev_sighting(udev_device("add", "3-2.4.1:1.0", devtype="usb_interface", PRODUCT="5ac/12a8/1001"))
        is None
    )
    assert udev_sighting(udev_device("add", "3-2.4.1")) is None
    assert udev_sighting(udev_device("add", "3-2.4.1", PRODUCT="zz/12a8/1")) is None
    # the process environment survived libudev
    _libc.getenv.restype = ctypes.c_char_p
    assert _libc.getenv(b"PATH") == os.environ["PATH"].encode()
    assert _libc.getenv(b"ACTION") == (os.environ["ACTION"].encode() if "ACTION" in os.environ else None)


def test_udev_translate_keeps_identity_for_remove() -> None:
    source = UdevHotplug(sysfs=UsbSysfs("/nonexistent"))
    [added] = source.translate(udev_add("3-2.4.1", 0x12A8, IPHONE_SERIAL, 17))
    assert (added.action, added.udid, added.ecid, added.location_id) == (ADDED, UDID, ECID, 0x30011)
    assert source.translate(udev_device("bind", "3-2.4.1", PRODUCT="5ac/12a8/1001")) == []
    assert source.translate(udev_add("3-2.4.1", 0x12A8, IPHONE_SERIAL, 17)) == []  # duplicate

    [removed] = source.translate(udev_remove("3-2.4.1", 0x12A8, 17))
    assert (removed.action, removed.serial, removed.udid, removed.ecid) == (
        REMOVED,
        IPHONE_SERIAL,
        UDID,
        ECID,
    )

    # Recovery: udev mangles the iBoot string in ID_SERIAL_SHORT; the ECID survives
    [recovery] = source.translate(udev_add("3-2.4.1", 0x1281, mangled(RECOVERY_SERIAL), 18))
    assert (recovery.mode, recovery.ecid, recovery.udid) == (DeviceMode.RECOVERY, ECID, None)
    [gone] = source.translate(udev_remove("3-2.4.1", 0x1281, 18))
    assert (gone.mode, gone.ecid) == (DeviceMode.RECOVERY, ECID)

    # a remove for a device that arrived before we looked still says what it was
    [unknown] = source.translate(udev_remove("3-2.4.2", 0x1227, 9))
    assert (unknown.action, unknown.mode, unknown.ecid) == (REMOVED, DeviceMode.DFU, None)
    # not iOS
    assert (
        source.translate(udev_device("add", "3-2.4.5", PRODUCT="403/6015/1000", ID_SERIAL_SHORT="DN0")) == []
    )


def test_udev_superspeed_device_removed_on_its_usb2_path_after_sysfs_is_gone(fake: FakeSysfs) -> None:
    usb3_bench(fake)
    source = UdevHotplug(sysfs=UsbSysfs(fake.root))
    [added] = source.translate(udev_add("4-2.4.1", 0x12A8, PRO_SERIAL, 7, bus=4))
    assert (added.action, added.usb_path, added.sysfs_name, added.enumerated_as) == (
        ADDED,
        "3-2.4.1",
        "4-2.4.1",
        "4-2.4.1",
    )
    assert added.as_device_event() == DeviceSeen(
        "3-2.4.1", DeviceMode.NORMAL, udid="00008130-001E2D4A0C38801E", ecid="001E2D4A0C38801E"
    )
    fake.remove("4-2")  # the hub unplugged: nothing left in sysfs to resolve 4-2.4.1 with
    fake.remove("3-2")
    assert UsbSysfs(fake.root).canonical_path("4-2.4.1") == "4-2.4.1"
    [removed] = source.translate(udev_remove("4-2.4.1", 0x12A8, 7, bus=4))
    assert (removed.action, removed.usb_path, removed.serial) == (REMOVED, "3-2.4.1", PRO_SERIAL)
    assert removed.as_device_event() == DeviceGone("3-2.4.1")
    assert source.present == {}


def test_udev_superspeed_remove_of_a_device_seen_before_we_looked(fake: FakeSysfs) -> None:
    """No `add` seen, but the hub is still there: its port's peer link names the USB 2 path."""
    usb3_bench(fake)
    source = UdevHotplug(sysfs=UsbSysfs(fake.root))
    fake.remove("4-2.4.1")
    [removed] = source.translate(udev_remove("4-2.4.1", 0x12A8, 7, bus=4))
    assert (removed.action, removed.usb_path, removed.sysfs_name) == (REMOVED, "3-2.4.1", "4-2.4.1")


def test_udev_stale_superspeed_remove_after_the_high_speed_add(fake: FakeSysfs) -> None:
    """Into Recovery the device drops from SuperSpeed to high speed: `4-2.4.1` leaves, `3-2.4.1`
    arrives, and the two halves' uevents may come the other way round. The late remove must not end
    the Recovery device that now holds the port."""
    usb3_bench(fake)
    source = UdevHotplug(sysfs=UsbSysfs(fake.root))
    source.translate(udev_add("4-2.4.1", 0x12A8, PRO_SERIAL, 7, bus=4))
    fake.remove("4-2.4.1")
    recovery_serial = RECOVERY_SERIAL.replace("001A2C3E0E12802E", "001E2D4A0C38801E")
    fake.add("3-2.4.1", 0x05AC, 0x1281, recovery_serial, devnum=30)
    events = source.translate(udev_add("3-2.4.1", 0x1281, mangled(recovery_serial), 30))
    assert summary(events) == [
        ("removed", "3-2.4.1", DeviceMode.NORMAL, 0x001E2D4A0C38801E),
        ("added", "3-2.4.1", DeviceMode.RECOVERY, 0x001E2D4A0C38801E),
    ]
    assert source.translate(udev_remove("4-2.4.1", 0x12A8, 7, bus=4)) == []  # stale
    assert source.present["3-2.4.1"].mode is DeviceMode.RECOVERY
    [gone] = source.translate(udev_remove("3-2.4.1", 0x1281, 30))
    assert (gone.usb_path, gone.mode) == ("3-2.4.1", DeviceMode.RECOVERY)


# ----------------------------------------------------------------------- udev: real netlink socket

UDEV_MONITOR_MAGIC = 0xFEEDCAFE
NETLINK_KOBJECT_UEVENT = 15
UDEV_GROUP = 2


def murmur2(data: bytes, seed: int = 0) -> int:
    """libudev's `string_hash32` (MurmurHash2), which its in-kernel socket filter compares."""
    m, length = 0x5BD1E995, len(data)
    h = (seed ^ length) & 0xFFFFFFFF
    i = 0
    while length - i >= 4:
        k = (struct.unpack_from("<I", data, i)[0] * m) & 0xFFFFFFFF
        k = ((k ^ (k >> 24)) * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
        i += 4
    rest = data[i:]
    if len(rest) == 3:
        h ^= rest[2] << 16
    if len(rest) >= 2:
        h ^= rest[1] << 8
    if rest:
        h = ((h ^ rest[0]) * m) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * m) & 0xFFFFFFFF
    return h ^ (h >> 15)


class UeventSender:
    """Sends messages in udevd's netlink format (`monitor_netlink_header` + NUL-separated
    properties) to the udev multicast group, as udevd does after processing a uevent."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_KOBJECT_UEVENT)
        self.sock.bind((0, 0))
        self.seqnum = 1000

    def send(self, action: str, sys_name: str, devtype: str = "usb_device", **props: str) -> None:
        self.seqnum += 1
        fields = {
            "ACTION": action,
            "DEVPATH": f"{DEVROOT}/{sys_name}",
            "SUBSYSTEM": "usb",
            "DEVTYPE": devtype,
            "SEQNUM": str(self.seqnum),
            **props,
        }
        body = b"".join(f"{k}={v}".encode() + b"\0" for k, v in fields.items())
        header = (
            b"libudev\0"
            + struct.pack(">I", UDEV_MONITOR_MAGIC)
            + struct.pack("=III", 40, 40, len(body))
            + struct.pack(">IIII", murmur2(b"usb"), murmur2(devtype.encode()), 0, 0)
        )
        self.sock.sendto(header + body, (0, UDEV_GROUP))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def netlink() -> Iterator[UeventSender]:
    """Skips unless a pyudev monitor here receives a udevd-format message sent by this process
    (needs Linux, netlink, and root or CAP_NET_ADMIN to send to the multicast group)."""
    try:
        monitor = hotplug.open_udev_monitor()
        sender = UeventSender()
        sender.send("change", "9-9")
        probe = monitor.poll(timeout=2)
    except (OSError, ImportError) as exc:
        pytest.skip(f"udev netlink not usable here: {exc!r}")
    if probe is None:
        sender.close()
        pytest.skip("udev netlink monitor received nothing (sending to the udev group not permitted?)")
    del monitor
    yield sender
    sender.close()


async def test_udev_end_to_end_over_netlink(fake: FakeSysfs, netlink: UeventSender) -> None:
    fake.add("3-2", 0x05E3, 0x0610, hub=True)
    fake.add("3-2.1", 0x05AC, 0x12A8, OTHER_SERIAL, devnum=5)  # present before the daemon starts
    source = UdevHotplug(sysfs=UsbSysfs(fake.root))
    stream: AsyncIterator[UsbEvent] = source.events()

    async def next_event() -> UsbEvent:
        return await asyncio.wait_for(anext(stream), 3)

    async with contextlib.aclosing(stream):
        initial = await next_event()  # the monitor is listening from here on
        assert (initial.action, initial.usb_path, initial.ecid) == (ADDED, "3-2.1", 0x001C604A3405801E)

        netlink.send("add", "3-2.4:1.0", devtype="usb_interface", PRODUCT="5ac/12a8/1001")  # kernel-filtered
        netlink.send("add", "3-2.5", PRODUCT="403/6015/1000", ID_VENDOR_ID="0403", ID_MODEL_ID="6015")
        netlink.send(
            "add",
            "3-2.4",
            PRODUCT="5ac/12a8/1001",
            BUSNUM="003",
            DEVNUM="017",
            ID_VENDOR_ID="05ac",
            ID_MODEL_ID="12a8",
            ID_SERIAL_SHORT=IPHONE_SERIAL,
        )
        added = await next_event()
        assert (added.action, added.usb_path, added.udid, added.location_id) == (
            ADDED,
            "3-2.4",
            UDID,
            0x30011,
        )

        netlink.send("bind", "3-2.4", PRODUCT="5ac/12a8/1001")
        netlink.send("remove", "3-2.4", PRODUCT="5ac/12a8/1001", BUSNUM="003", DEVNUM="017")
        removed = await next_event()
        assert (removed.action, removed.serial, removed.udid, removed.ecid) == (
            REMOVED,
            IPHONE_SERIAL,
            UDID,
            ECID,
        )

        netlink.send(
            "add",
            "3-2.4",
            PRODUCT="5ac/1281/1001",
            BUSNUM="003",
            DEVNUM="018",
            ID_SERIAL_SHORT=mangled(RECOVERY_SERIAL),
        )
        recovery = await next_event()
        assert (recovery.action, recovery.mode, recovery.ecid) == (ADDED, DeviceMode.RECOVERY, ECID)
        assert set(source.present) == {"3-2.1", "3-2.4"}


class BrokenMonitor:
    """Stands in for the monitor only to make a receive fail (ENOBUFS: the socket overflowed and
    events were lost); readiness comes from a real socket pair."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.failures = 1

    def fileno(self) -> int:
        return self.ours.fileno()

    def poll(self, timeout: float | None = None) -> Any:
        self.ours.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            self.ours.recv(4096)
        if self.failures:
            self.failures -= 1
            raise OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))
        return None

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()


async def test_udev_receive_error_resyncs_from_sysfs(fake: FakeSysfs, no_backoff: None) -> None:
    fake.add("3-2.1", 0x05AC, 0x12A8, IPHONE_SERIAL, devnum=5)
    monitor = BrokenMonitor()
    source = UdevHotplug(sysfs=UsbSysfs(fake.root), monitor=monitor)
    stream = source.events()
    try:
        async with contextlib.aclosing(stream):
            assert (await asyncio.wait_for(anext(stream), 2)).usb_path == "3-2.1"
            fake.remove("3-2.1")  # both happen while the socket overflows
            fake.add("3-2.3", 0x05AC, 0x1281, RECOVERY_SERIAL, devnum=6)
            monitor.theirs.send(b"x")
            first = await asyncio.wait_for(anext(stream), 2)
            second = await asyncio.wait_for(anext(stream), 2)
        assert [(first.action, first.usb_path), (second.action, second.usb_path)] == [
            (REMOVED, "3-2.1"),
            (ADDED, "3-2.3"),
        ]
        assert first.udid == UDID
        assert second.ecid == ECID
    finally:
        monitor.close()


# --------------------------------------------------------------------------------------- open_hotplug


def test_open_hotplug_off_linux_polls(fake: FakeSysfs, tmp_path: Path) -> None:
    source = open_hotplug(platform="darwin", sysfs_root=fake.root)
    assert isinstance(source, PollingHotplug)
    assert source.name == "poll-sysfs"
    assert "Linux-only" in source.description
    nothing = open_hotplug(platform="darwin", sysfs_root=tmp_path / "none")
    assert nothing.name == "poll-pyusb"
    assert "unreadable" in nothing.description


def test_open_hotplug_without_udevd_polls_sysfs(fake: FakeSysfs, tmp_path: Path) -> None:
    source = open_hotplug(platform="linux", sysfs_root=fake.root, udev_control=tmp_path / "no-control")
    assert source.name == "poll-sysfs"
    assert "udevd is not running" in source.description


def test_open_hotplug_prefers_udev(fake: FakeSysfs, tmp_path: Path) -> None:
    control = tmp_path / "control"
    control.touch()
    source = open_hotplug(platform="linux", sysfs_root=fake.root, udev_control=control)
    if not isinstance(source, UdevHotplug):
        pytest.skip(f"netlink monitor not available here: {source.description}")
    assert source.name == "udev"
    assert "netlink" in source.description
    polled = open_hotplug(prefer="poll", platform="linux", sysfs_root=fake.root, udev_control=control)
    assert polled.name == "poll-sysfs"


async def test_polling_logs_an_odd_device_once(fake: FakeSysfs) -> None:
    fake.add("3-2.1", 0x05AC, 0x12A8, "garbage serial")
    source = PollingHotplug(SysfsEnumerator(UsbSysfs(fake.root)))
    with structlog.testing.capture_logs() as logs:
        [added] = await source.poll_once()
        assert await source.poll_once() == []
        assert await source.poll_once() == []
    assert (added.mode, added.udid, added.ecid) == (DeviceMode.NORMAL, None, None)
    assert [e["event"] for e in logs] == ["usb_apple_identity_incomplete"]
