"""Which device is on which port, end to end: the simulated bench drives a fake sysfs tree, udev-style
events and a fake usbmuxd (a real UNIX-socket server), and the station finds its devices through the
production `DeviceWatcher` and usbmuxd client, as on a real bench.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from daemon.ios.base import DeviceEvent, DeviceGone, DeviceMode, DeviceSeen
from daemon.models import PortRef
from daemon.sim.devices import SimDevice, make_device
from daemon.sim.faults import Fault, FaultKind
from daemon.sim.usbbus import RECOVERY_PID, SimUsbBus
from daemon.sim.world import SimWorld, build_world
from daemon.station import Station, build_sim_world
from daemon.usb.apple import APPLE_VID, format_ecid
from daemon.usb.hotplug import UsbAction
from daemon.usb.sysfs import location_id
from daemon.usb.usbmux import UsbmuxAttached, UsbmuxClient
from daemon.workflow.phases import Phase
from tests.conftest import eventually, running, station_config
from tests.mqtt_broker import Mosquitto

A1, A2 = PortRef("hub-a", 1), PortRef("hub-a", 2)


def device_needing(world: SimWorld, *, update: bool) -> SimDevice:
    """A fresh device of this world's seed that does (or does not) need the update to iOS 18."""
    for index in range(world.generated, world.generated + 200):
        device = make_device(world.seed, index, 18)
        below = int(device.ios_version.split(".")[0]) < 18
        if below == update:
            world.generated = index + 1
            world.devices[device.ecid] = device
            return device
    raise AssertionError("no such device in 200 tries")


class Recorder:
    """Every event a second watcher on the station's bus reports, in order."""

    def __init__(self) -> None:
        self.events: list[DeviceEvent] = []

    def on(self, usb_path: str) -> list[DeviceEvent]:
        return [e for e in self.events if e.usb_path == usb_path]


@contextlib.asynccontextmanager
async def recording(station: Station) -> AsyncIterator[Recorder]:
    assert station.bus is not None
    recorder = Recorder()

    async def pump() -> None:
        assert station.bus is not None
        async with contextlib.aclosing(station.bus.watcher().events()) as events:
            async for event in events:
                recorder.events.append(event)

    task = asyncio.create_task(pump())
    try:
        yield recorder
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- the bus itself --------------------------------------------------------------------------------


async def test_plugging_shows_in_sysfs_udev_then_usbmuxd_with_matching_location(tmp_path: Path) -> None:
    world = build_world_for_bus(tmp_path)
    bus = SimUsbBus(world, tmp_path / "usb")
    async with bus.running():
        order: list[str] = []
        hotplug_events = bus.hotplug.events()
        client = UsbmuxClient(bus.socket_path)
        mux_events = client.events()

        async def watch_udev() -> None:
            async for event in hotplug_events:
                order.append(f"udev {event.action}")

        async def watch_mux() -> None:
            async for event in mux_events:
                if isinstance(event, UsbmuxAttached):
                    # sysfs already names the device at the LocationID usbmuxd reports
                    assert bus.sysfs.path_for_location_id(event.location_id) == world.usb_path(A1)
                order.append(f"usbmuxd {type(event).__name__}")

        tasks = [asyncio.create_task(watch_udev()), asyncio.create_task(watch_mux())]
        await eventually(lambda: client.connected, what="usbmuxd client listening")
        device = device_needing(world, update=False)
        world.plug(A1, device)
        await eventually(lambda: "usbmuxd UsbmuxAttached" in order, what="usbmuxd Attached")
        assert order == ["udev added", "usbmuxd UsbmuxAttached"]

        sysfs_device = bus.sysfs.device(world.usb_path(A1))
        assert sysfs_device is not None
        assert sysfs_device.vendor_id == APPLE_VID
        assert sysfs_device.serial == device.udid.replace("-", "")
        mux = bus.usbmuxd.device_at(world.usb_path(A1))
        assert mux is not None
        assert mux.location_id == location_id(sysfs_device.busnum, sysfs_device.devnum)

        world.unplug(A1)
        await eventually(lambda: "usbmuxd UsbmuxDetached" in order, what="usbmuxd Detached")
        await eventually(lambda: "udev removed" in order, what="udev remove")
        assert bus.sysfs.device(world.usb_path(A1)) is None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_recovery_is_a_libusb_device_with_the_ecid_in_its_serial(tmp_path: Path) -> None:
    world = build_world_for_bus(tmp_path)
    bus = SimUsbBus(world, tmp_path / "usb")
    async with bus.running():
        device = device_needing(world, update=True)
        world.plug(A1, device)
        path = world.usb_path(A1)
        await eventually(lambda: bus.usbmuxd.device_at(path) is not None, what="attached")
        world.reenumerate(device, DeviceMode.RECOVERY)
        await eventually(
            lambda: (
                (event := bus.hotplug.present.get(path)) is not None and event.mode is DeviceMode.RECOVERY
            ),
            what="Recovery device on udev",
        )
        event = bus.hotplug.present[path]
        assert event.action is UsbAction.ADDED
        assert event.pid == RECOVERY_PID
        assert event.ecid == device.ecid
        assert event.serial is not None
        assert f"SRNM:[{device.serial}]" in event.serial
        assert bus.usbmuxd.device_at(path) is None  # Recovery devices are not usbmuxd devices


def build_world_for_bus(tmp_path: Path) -> SimWorld:
    return build_world([("hub-a", 4, None, {})], speed=2000.0, seed=3, assign_delay=0.0)


# -- the station on top ----------------------------------------------------------------------------


async def test_a_restore_keeps_the_device_on_its_port_through_every_mode(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = station_config(tmp_path, mosquitto, devices=0)
    async with running(config) as station, recording(station) as recorder:
        device = device_needing(station.world, update=True)
        station.world.plug(A1, device)
        await eventually(lambda: station.store.port(A1).phase is Phase.DONE, what="port 1 done")

        path = station.world.usb_path(A1)
        seen = [e for e in recorder.on(path) if isinstance(e, DeviceSeen)]
        modes = [e.mode for e in seen]
        # normal -> Recovery -> restore mode (usbmuxd: normal) -> normal; the restore was an
        # erase-install, so there is no separate erase reboot
        assert modes[:2] == [DeviceMode.NORMAL, DeviceMode.RECOVERY], modes
        assert modes.count(DeviceMode.NORMAL) >= 3, modes
        assert {e.ecid for e in seen} == {format_ecid(device.ecid)}
        assert all(isinstance(e, DeviceGone) for e in recorder.on(path) if e not in seen)

        phases = [row.phase for row in station.store.history(ref=A1)]
        assert Phase.INTERRUPTED not in phases
        assert phases.count(Phase.DETECTED) == 1
        assert device.completed["update"] == 1
        assert device.completed["erase"] == 1  # by the erase-install restore
        assert Phase.ERASING not in phases  # one device cycle saved
        skipped = {
            k: v for row in station.store.history(ref=A1) for k, v in row.extra.get("skipped", {}).items()
        }
        assert skipped["erase"].startswith("erased by the erase-install restore")
        state = station.store.port(A1)
        assert state.device is not None
        assert state.device.ecid == format_ecid(device.ecid)


async def test_swapped_devices_are_found_on_their_new_ports(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = station_config(tmp_path, mosquitto, devices=2)
    async with running(config) as station:
        await eventually(
            lambda: all(station.store.port(r).phase is Phase.DONE for r in (A1, A2)), what="both done"
        )
        first, second = station.world.unplug(A1), station.world.unplug(A2)
        assert first is not None
        assert second is not None
        await eventually(
            lambda: all(station.store.port(r).phase is Phase.EMPTY for r in (A1, A2)), what="both empty"
        )
        station.world.plug(A1, second)
        station.world.plug(A2, first)

        def swapped() -> bool:
            one, two = station.store.port(A1), station.store.port(A2)
            return (
                one.phase is Phase.DONE
                and two.phase is Phase.DONE
                and one.device is not None
                and two.device is not None
                and (one.device.serial, two.device.serial) == (second.serial, first.serial)
            )

        await eventually(swapped, what="each device done on the other port")
        # Already provisioned: found again, nothing repeated.
        assert first.completed["erase"] == second.completed["erase"] == 1


async def test_a_usbmuxd_restart_mid_run_loses_no_device(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = station_config(tmp_path, mosquitto, devices=8, speed=500)
    async with running(config) as station:
        bus = station.bus
        assert bus is not None
        await eventually(
            lambda: any(s.phase is Phase.UPDATING for s in station.ports()), what="a restore under way"
        )
        await bus.usbmuxd.stop()
        # About a second of bench time, like a `systemctl restart usbmuxd`: device operations that hit
        # the gap fail and are retried (much longer and their retries, scaled to x500, run out).
        await asyncio.sleep(1.0 / 500)
        await bus.usbmuxd.start(renumber=True)
        await eventually(
            lambda: all(s.phase is Phase.DONE for s in station.ports()), what="all 8 done", within=60
        )
        assert station.watcher is not None
        assert station.watcher.restarts["usbmux"] == 0  # the client reconnected by itself
        for device in station.world.devices.values():
            assert device.completed["update"] <= 1
            assert device.completed["setup"] == 1


# -- hubs that cannot sense a device ---------------------------------------------------------------


@pytest.fixture
def blind_hub() -> dict[str, object]:
    return {"attach_sense": False}


async def test_on_a_blind_hub_a_device_long_gone_is_unplugged(
    tmp_path: Path, mosquitto: Mosquitto, blind_hub: dict[str, object]
) -> None:
    config = station_config(
        tmp_path, mosquitto, devices=1, hub=blind_hub, workflow={"reenumeration_window": 0.5}
    )
    async with running(config) as station:
        await eventually(lambda: station.store.port(A1).phase is Phase.DONE, what="done")
        station.world.unplug(A1)
        await eventually(lambda: station.store.port(A1).phase is Phase.EMPTY, what="empty after the window")
        assert station.store.port(A1).detail == "device gone from USB for 0.5 s"


async def test_on_a_blind_hub_a_quick_replug_is_the_same_device(
    tmp_path: Path, mosquitto: Mosquitto, blind_hub: dict[str, object]
) -> None:
    config = station_config(
        tmp_path,
        mosquitto,
        devices=1,
        hub=blind_hub,
        workflow={"reenumeration_window": 2.0},
        sim={"assign_delay": 1e9},  # the portal admin never comes: the device waits for assignment
    )
    async with running(config) as station:
        await eventually(
            lambda: station.store.port(A1).phase is Phase.AWAITING_ASSIGNMENT, what="awaiting assignment"
        )
        device = station.world.unplug(A1)
        assert device is not None
        await asyncio.sleep(0.3)
        station.world.plug(A1, device)
        await eventually(
            lambda: station.bus is not None and station.bus.usbmuxd.device_at(station.world.usb_path(A1)),
            what="back on usbmuxd",
        )
        await asyncio.sleep(2.5)  # past the window: the away timer must have been cancelled
        phases = [row.phase for row in station.store.history(ref=A1)]
        assert Phase.INTERRUPTED not in phases
        assert station.store.port(A1).phase is Phase.AWAITING_ASSIGNMENT


async def test_on_a_blind_hub_an_erase_reboot_longer_than_the_window_is_expected(
    tmp_path: Path, mosquitto: Mosquitto, blind_hub: dict[str, object]
) -> None:
    config = station_config(
        tmp_path, mosquitto, devices=0, hub=blind_hub, workflow={"reenumeration_window": 0.3}
    )
    world = build_sim_world(config)
    # The erase reboot takes 150 s / speed; 20x slower is well past the 0.3 s window.
    world.inject(Fault("erase", FaultKind.SLOW, A1, factor=20))
    async with running(config, world) as station:
        device = device_needing(station.world, update=False)
        station.world.plug(A1, device)
        await eventually(lambda: station.store.port(A1).phase is Phase.DONE, what="done")
        phases = [row.phase for row in station.store.history(ref=A1)]
        assert Phase.INTERRUPTED not in phases
        assert Phase.EMPTY not in phases
        assert device.completed["erase"] == 1


async def test_a_learned_port_map_decides_which_port_a_device_is_on(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    # The bench is wired crosswise: what USB calls `1-1.1` is the socket labelled 3, and back.
    (tmp_path / "ports.toml").write_text('[hub-a]\n1 = "1-1.3"\n3 = "1-1.1"\n')
    config = station_config(tmp_path, mosquitto, devices=0)
    config = config.model_copy(
        update={"station": config.station.model_copy(update={"port_map": tmp_path / "ports.toml"})}
    )
    async with running(config) as station:
        device = device_needing(station.world, update=False)
        station.world.plug(A1, device)  # USB path 1-1.1
        a3 = PortRef("hub-a", 3)
        await eventually(lambda: station.store.port(a3).phase is Phase.DONE, what="done on port 3")
        assert station.store.port(A1).phase is Phase.EMPTY


# -- a failed restore is judged on the device as it is afterwards ----------------------------------


async def test_a_restore_failing_part_way_is_restored_again_from_recovery(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = station_config(tmp_path, mosquitto, devices=0, workflow={"reenumeration_window": 0.5})
    world = build_sim_world(config)
    world.inject(Fault("update", FaultKind.FAIL, A1, message="restore_failed after touch"))
    async with running(config, world) as station:
        device = device_needing(world, update=True)
        world.plug(A1, device)
        # The restore fails part-way: the device is left in Recovery, where nothing can read its
        # version; but a device in Recovery has no working iOS, so the restore's effect is provably
        # absent, and the port restores it again, by ECID (tests/test_recovery_resume.py has more).
        await eventually(
            lambda: any(row.extra.get("resumed_from_recovery") for row in station.store.history(ref=A1)),
            what="the restore resumed from Recovery",
        )
        rows = [row for row in station.store.history(ref=A1) if row.step == "update"]
        assert [(row.phase, row.attempt) for row in rows[:2]] == [(Phase.UPDATING, 1), (Phase.UPDATING, 2)]
        assert rows[1].detail is not None
        assert rows[1].detail.startswith("device is in Recovery; its iOS must be restored")
        await eventually(lambda: device.completed["update"] == 1, what="the second restore finished")
        assert device.started["update"] == 2
        assert device.mode is DeviceMode.NORMAL


async def test_a_failed_restore_that_left_the_old_version_is_run_again(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = station_config(tmp_path, mosquitto, devices=0)
    world = build_sim_world(config)
    world.inject(Fault("update", FaultKind.FAIL, A1, at=0, message="tss_unreachable before touch"))
    async with running(config, world) as station:
        device = device_needing(world, update=True)
        world.plug(A1, device)
        await eventually(lambda: station.store.port(A1).phase is Phase.DONE, what="done")
        # The re-read showed the old version: the effect was provably absent, so one more restore.
        assert (device.started["update"], device.completed["update"]) == (2, 1)
