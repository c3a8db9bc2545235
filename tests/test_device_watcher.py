"""`daemon.usb.watcher.DeviceWatcher`: the simulated usbmuxd on a UNIX socket and polling hotplug over
a fake sysfs tree (kernel layout), merged into `DeviceSeen`/`DeviceGone` by USB path."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from pathlib import Path

import pytest

from daemon.ios.base import DeviceEvent, DeviceGone, DeviceInfo, DeviceMode, DeviceSeen
from daemon.sim.usbmuxd import FakeUsbmuxd
from daemon.usb.hotplug import PollingHotplug, SysfsEnumerator, UsbEvent
from daemon.usb.sysfs import UsbSysfs
from daemon.usb.usbmux import UsbmuxClient, UsbmuxEvent
from daemon.usb.watcher import DeviceWatcher
from tests.test_usb_sysfs import IPHONE_SERIAL, RECOVERY_SERIAL, FakeSysfs

NORMAL, RECOVERY = DeviceMode.NORMAL, DeviceMode.RECOVERY
UDID_A, ECID_A = "00008030-001A2C3E0E12802E", "001A2C3E0E12802E"  # IPHONE_SERIAL / RECOVERY_SERIAL
UDID_B, ECID_B = "00008110-001C604A3405801E", "001C604A3405801E"
UDID_C, ECID_C = "00008101-000A1B2C3D4E5F60", "000A1B2C3D4E5F60"
PORT, PORT2, PORT3 = "1-1.4", "1-1.5", "1-1.6"


def info(udid: str, ecid: str) -> DeviceInfo:
    return DeviceInfo(
        udid=udid,
        ecid=ecid,
        serial="F2LXK3ABHG7F",
        product_type="iPhone14,2",
        ios_version="17.5",
        build="21F79",
        device_class="iPhone",
        activation_state="Activated",
        in_setup_assistant=True,
    )


A, B, C = info(UDID_A, ECID_A), info(UDID_B, ECID_B), info(UDID_C, ECID_C)
assert UDID_A.replace("-", "") == IPHONE_SERIAL


class Bench:
    """A fake usbmuxd and a fake sysfs that agree on where devices are (LocationID <-> busnum/devnum)."""

    def __init__(self, mux: FakeUsbmuxd, fake: FakeSysfs) -> None:
        self.mux = mux
        self.fake = fake
        fake.add("1-1", 0x05E3, 0x0610, hub=True, devnum=90)  # the smart hub, never mistaken for an iPhone

    def plug(self, device: DeviceInfo, path: str, *, sysfs: bool = True) -> int:
        """Enumerate `device` in normal mode on `path` (usbmuxd first, as on a real host); returns its
        devnum, so a lagging sysfs entry can be added later with `sysfs_add`."""
        entry = self.mux.attach(device, path)
        assert entry is not None
        devnum = entry.location_id & 0xFFFF
        if sysfs:
            self.sysfs_add(device, path, devnum)
        return devnum

    def sysfs_add(self, device: DeviceInfo, path: str, devnum: int) -> None:
        self.fake.add(path, 0x05AC, 0x12A8, device.udid.replace("-", ""), devnum=devnum)

    def unplug(self, path: str) -> None:
        self.mux.detach(usb_path=path)
        self.fake.remove(path)


class Recorder:
    """Consumes `watcher.events()` in a task; `events` is everything seen so far."""

    def __init__(self, watcher: DeviceWatcher) -> None:
        self.watcher = watcher
        self.events: list[DeviceEvent] = []
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with aclosing(self.watcher.events()) as stream:
            async for event in stream:
                self.events.append(event)

    def at(self, path: str) -> list[DeviceEvent]:
        return [e for e in self.events if e.usb_path == path]

    def state(self) -> dict[str, DeviceSeen]:
        """Replays the events as the station would: the device last seen per path."""
        now: dict[str, DeviceSeen] = {}
        for event in self.events:
            if isinstance(event, DeviceSeen):
                now[event.usb_path] = event
            else:
                now.pop(event.usb_path, None)
        return now

    async def until(self, predicate: Callable[[], bool], what: str, within: float = 4.0) -> None:
        deadline = time.monotonic() + within
        while not predicate():
            if self._task.done():
                self._task.result()
                pytest.fail(f"the watcher stream ended while waiting for {what}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {within:g} s waiting for {what}; events: {self.events}")
            await asyncio.sleep(0.01)

    async def quiet(self, wait: float = 0.3) -> None:
        """Nothing more arrives within `wait` seconds."""
        count = len(self.events)
        await asyncio.sleep(wait)
        assert self.events[count:] == []

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def fast_client(mux: FakeUsbmuxd) -> UsbmuxClient:
    return UsbmuxClient(mux.socket_path, settle=0.05, reply_timeout=1.0, backoff=lambda _n: 0.05)


def watcher_for(mux: FakeUsbmuxd, fake: FakeSysfs, sysfs: UsbSysfs | None = None) -> DeviceWatcher:
    hotplug = PollingHotplug(SysfsEnumerator(UsbSysfs(fake.root)), interval=0.02)
    return DeviceWatcher(
        fast_client(mux),
        hotplug,
        sysfs or UsbSysfs(fake.root),
        resolve_timeout=1.0,
        resolve_interval=0.02,
        backoff=lambda _n: 0.05,
    )


@pytest.fixture
def fake(tmp_path: Path) -> FakeSysfs:
    return FakeSysfs(tmp_path)


@pytest.fixture
async def mux(socket_path: Path) -> AsyncIterator[FakeUsbmuxd]:
    server = FakeUsbmuxd(socket_path)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def bench(mux: FakeUsbmuxd, fake: FakeSysfs) -> Bench:
    return Bench(mux, fake)


@pytest.fixture
async def recorder(mux: FakeUsbmuxd, fake: FakeSysfs, bench: Bench) -> AsyncIterator[Recorder]:
    rec = Recorder(watcher_for(mux, fake))
    yield rec
    await rec.close()


# ------------------------------------------------------------------------------------------------ tests


async def test_attach_and_detach_on_the_sysfs_path(bench: Bench, recorder: Recorder) -> None:
    bench.plug(A, PORT)
    seen = DeviceSeen(PORT, NORMAL, udid=UDID_A, ecid=ECID_A)
    await recorder.until(lambda: recorder.events == [seen], "the device seen on 1-1.4")
    await recorder.quiet()  # the hotplug `added` (normal mode) adds nothing; no duplicate Seen
    bench.unplug(PORT)
    await recorder.until(lambda: len(recorder.events) == 2, "the device gone")
    assert recorder.events == [seen, DeviceGone(PORT)]
    await recorder.quiet()
    assert recorder.watcher.present == {}


async def test_devices_present_at_start_and_clean_aclose(
    bench: Bench, mux: FakeUsbmuxd, fake: FakeSysfs
) -> None:
    bench.plug(A, PORT)
    fake.add(PORT2, 0x05AC, 0x1281, RECOVERY_SERIAL.replace(ECID_A, ECID_B), devnum=100)
    watcher = watcher_for(mux, fake)
    got: list[DeviceEvent] = []
    async with asyncio.timeout(5), aclosing(watcher.events()) as stream:
        got += [await anext(stream), await anext(stream)]
    assert sorted(got, key=lambda e: e.usb_path) == [
        DeviceSeen(PORT, NORMAL, udid=UDID_A, ecid=ECID_A),
        DeviceSeen(PORT2, RECOVERY, udid=None, ecid=ECID_B),
    ]
    await asyncio.sleep(0.05)
    assert not watcher.usbmux.connected  # aclose() stopped the sources


async def test_normal_recovery_normal_on_one_path(bench: Bench, fake: FakeSysfs, recorder: Recorder) -> None:
    bench.plug(A, PORT)
    normal = DeviceSeen(PORT, NORMAL, udid=UDID_A, ecid=ECID_A)
    await recorder.until(lambda: recorder.events == [normal], "normal mode")

    # EnterRecovery: the device leaves usbmuxd and re-enumerates as PID 0x1281 with an iBoot serial
    bench.mux.attach(A, PORT, RECOVERY)
    fake.remove(PORT)
    fake.add(PORT, 0x05AC, 0x1281, RECOVERY_SERIAL, devnum=100)
    recovery = DeviceSeen(PORT, RECOVERY, udid=None, ecid=ECID_A)
    await recorder.until(lambda: len(recorder.events) == 3, "recovery mode")

    # back to normal; usbmuxd reports it before sysfs shows it (the LocationID lookup must wait)
    fake.remove(PORT)
    devnum = bench.plug(A, PORT, sysfs=False)
    await asyncio.sleep(0.15)
    bench.sysfs_add(A, PORT, devnum)
    await recorder.until(lambda: len(recorder.events) == 5, "normal mode again")
    await recorder.quiet()
    assert recorder.events == [normal, DeviceGone(PORT), recovery, DeviceGone(PORT), normal]
    assert {e.ecid for e in recorder.events if isinstance(e, DeviceSeen)} == {ECID_A}


async def test_swapped_devices_are_reported_on_their_new_paths(
    bench: Bench, fake: FakeSysfs, recorder: Recorder
) -> None:
    bench.plug(A, PORT)
    bench.plug(B, PORT2)
    a_on_1 = DeviceSeen(PORT, NORMAL, udid=UDID_A, ecid=ECID_A)
    b_on_2 = DeviceSeen(PORT2, NORMAL, udid=UDID_B, ecid=ECID_B)
    await recorder.until(lambda: recorder.state() == {PORT: a_on_1, PORT2: b_on_2}, "both devices")

    # swap the cables: usbmuxd first, sysfs a moment later
    devnum_a = bench.plug(A, PORT2, sysfs=False)  # detaches B (on that port) and A (one port at a time)
    devnum_b = bench.plug(B, PORT, sysfs=False)
    await asyncio.sleep(0.05)
    fake.remove(PORT)
    fake.remove(PORT2)
    bench.sysfs_add(A, PORT2, devnum_a)
    bench.sysfs_add(B, PORT, devnum_b)

    b_on_1 = DeviceSeen(PORT, NORMAL, udid=UDID_B, ecid=ECID_B)
    a_on_2 = DeviceSeen(PORT2, NORMAL, udid=UDID_A, ecid=ECID_A)
    await recorder.until(lambda: recorder.state() == {PORT: b_on_1, PORT2: a_on_2}, "the swap")
    await recorder.quiet()
    assert recorder.at(PORT) == [a_on_1, DeviceGone(PORT), b_on_1]
    assert recorder.at(PORT2) == [b_on_2, DeviceGone(PORT2), a_on_2]


async def test_usbmuxd_restart_loses_no_device(bench: Bench, mux: FakeUsbmuxd, recorder: Recorder) -> None:
    bench.plug(B, PORT2)  # DeviceID 1
    bench.plug(A, PORT)  # DeviceID 2, which becomes 1 in the new usbmuxd once B is gone
    a_seen = DeviceSeen(PORT, NORMAL, udid=UDID_A, ecid=ECID_A)
    b_seen = DeviceSeen(PORT2, NORMAL, udid=UDID_B, ecid=ECID_B)
    await recorder.until(lambda: recorder.state() == {PORT: a_seen, PORT2: b_seen}, "both devices")
    client = recorder.watcher.usbmux

    # the same usbmuxd process comes back (DeviceIDs kept): nothing to report
    await mux.stop()
    await recorder.until(lambda: not client.connected, "the client noticing")
    await mux.start()
    await recorder.until(lambda: client.connects == 2, "the reconnect")
    await recorder.quiet()
    assert recorder.state() == {PORT: a_seen, PORT2: b_seen}
    count = len(recorder.events)

    # a new usbmuxd process: B unplugged and C plugged while it was down, A renumbered
    await mux.stop()
    await recorder.until(lambda: not client.connected, "the client noticing")
    bench.unplug(PORT2)
    bench.plug(C, PORT3)
    await asyncio.sleep(0.1)  # hotplug sees both changes; the usbmux devices stay until usbmuxd says
    assert recorder.state() == {PORT: a_seen, PORT2: b_seen}
    await mux.start(renumber=True)
    c_seen = DeviceSeen(PORT3, NORMAL, udid=UDID_C, ecid=ECID_C)
    await recorder.until(lambda: recorder.state() == {PORT: a_seen, PORT3: c_seen}, "the new state")
    await recorder.quiet()
    new = recorder.events[count:]
    # A got a new DeviceID: Detached + Attached, which the station sees as a re-enumeration
    assert [e for e in new if e.usb_path == PORT] == [DeviceGone(PORT), a_seen]
    assert [e for e in new if e.usb_path == PORT2] == [DeviceGone(PORT2)]
    assert [e for e in new if e.usb_path == PORT3] == [c_seen]


async def test_placed_by_serial_without_sysfs(bench: Bench, mux: FakeUsbmuxd, fake: FakeSysfs) -> None:
    """No usable sysfs for the LocationID (macOS): the hotplug path whose serial is the UDID."""
    watcher = watcher_for(mux, fake, sysfs=UsbSysfs(fake.base / "absent"))
    recorder = Recorder(watcher)
    try:
        bench.plug(A, PORT)
        seen = DeviceSeen(PORT, NORMAL, udid=UDID_A, ecid=ECID_A)
        await recorder.until(lambda: recorder.events == [seen], "the device placed by serial")
        bench.unplug(PORT)
        await recorder.until(lambda: recorder.events == [seen, DeviceGone(PORT)], "the device gone")
    finally:
        await recorder.close()


SS_PORT, USB2_PORT = "4-2.4", "3-2.4"
"""One physical port, port 4 of a USB 3 hub: as its SuperSpeed half (bus 4) and USB 2 half (bus 3)
name it."""


def usb3_hub(fake: FakeSysfs) -> None:
    """An xHCI controller (bus 3 USB 2, bus 4 SuperSpeed) and a USB 3 hub on its root port 2."""
    fake.xhci(3, 4)
    fake.usb3_hub("3-2", "4-2")


async def test_superspeed_device_seen_and_gone_on_the_usb2_path(
    bench: Bench, fake: FakeSysfs, recorder: Recorder
) -> None:
    usb3_hub(fake)
    bench.plug(A, SS_PORT)  # usbmuxd's LocationID names bus 4; sysfs has 4-2.4
    seen = DeviceSeen(USB2_PORT, NORMAL, udid=UDID_A, ecid=ECID_A)
    await recorder.until(lambda: recorder.events == [seen], "the device seen on 3-2.4")
    await recorder.until(lambda: USB2_PORT in recorder.watcher.hotplug.present, "hotplug on 3-2.4")
    await recorder.quiet()

    # the hub is pulled with the device: its sysfs entries and peer links go at once
    bench.mux.detach(usb_path=SS_PORT)
    fake.remove("4-2")
    fake.remove("3-2")
    await recorder.until(lambda: len(recorder.events) == 2, "the device gone")
    await recorder.quiet()
    assert recorder.events == [seen, DeviceGone(USB2_PORT)]
    assert recorder.watcher.present == {}
    assert recorder.watcher.hotplug.present == {}


async def test_superspeed_normal_and_high_speed_recovery_share_the_path(
    bench: Bench, fake: FakeSysfs, recorder: Recorder
) -> None:
    usb3_hub(fake)
    bench.plug(A, SS_PORT)
    normal = DeviceSeen(USB2_PORT, NORMAL, udid=UDID_A, ecid=ECID_A)
    await recorder.until(lambda: recorder.events == [normal], "normal mode at SuperSpeed")

    # EnterRecovery: iBoot talks high speed, so the device comes back on the hub's USB 2 half
    bench.mux.attach(A, SS_PORT, RECOVERY)
    fake.remove(SS_PORT)
    fake.add(USB2_PORT, 0x05AC, 0x1281, RECOVERY_SERIAL, devnum=100)
    recovery = DeviceSeen(USB2_PORT, RECOVERY, udid=None, ecid=ECID_A)
    await recorder.until(lambda: len(recorder.events) == 3, "recovery mode on the same path")

    fake.remove("4-2")
    fake.remove("3-2")
    await recorder.until(lambda: len(recorder.events) == 4, "the device gone")
    await recorder.quiet()
    assert recorder.events == [normal, DeviceGone(USB2_PORT), recovery, DeviceGone(USB2_PORT)]


class FlakyUsbmux(UsbmuxClient):
    def __init__(self, mux: FakeUsbmuxd) -> None:
        super().__init__(mux.socket_path, settle=0.05, reply_timeout=1.0, backoff=lambda _n: 0.05)
        self.calls = 0

    async def events(self) -> AsyncIterator[UsbmuxEvent]:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("usbmux source broke")
        async for event in super().events():
            yield event


class FlakyHotplug(PollingHotplug):
    def __init__(self, fake: FakeSysfs) -> None:
        super().__init__(SysfsEnumerator(UsbSysfs(fake.root)), interval=0.02)
        self.calls = 0

    async def events(self) -> AsyncIterator[UsbEvent]:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("hotplug source broke")
        if self.calls == 2:
            return  # a source that just ends is restarted too
        async for event in super().events():
            yield event


async def test_failing_sources_are_restarted_not_propagated(
    bench: Bench, mux: FakeUsbmuxd, fake: FakeSysfs
) -> None:
    watcher = DeviceWatcher(
        FlakyUsbmux(mux),
        FlakyHotplug(fake),
        UsbSysfs(fake.root),
        resolve_timeout=1.0,
        resolve_interval=0.02,
        backoff=lambda _n: 0.02,
    )
    recorder = Recorder(watcher)
    try:
        bench.plug(A, PORT)
        fake.add(PORT2, 0x05AC, 0x1281, RECOVERY_SERIAL.replace(ECID_A, ECID_B), devnum=100)
        expected = {
            PORT: DeviceSeen(PORT, NORMAL, udid=UDID_A, ecid=ECID_A),
            PORT2: DeviceSeen(PORT2, RECOVERY, udid=None, ecid=ECID_B),
        }
        await recorder.until(lambda: recorder.state() == expected, "both sources after restarts")
        assert watcher.restarts == {"usbmux": 1, "hotplug": 2}
    finally:
        await recorder.close()


@pytest.fixture(autouse=True)
def _fast(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test here is bounded: it must finish in a few seconds."""
    started = time.monotonic()
    yield
    assert time.monotonic() - started < 8, f"{request.node.name} was slow"
