"""The host side of the simulated bench: what Linux shows when a simulated device enters a port.

`SimWorld` says what physically happens (a device is plugged into hub-a port 3, reboots into
Recovery, is pulled out). A real host learns of that through three channels, and so does the
station here, through the same code it uses on a real bench (`daemon.usb.watcher.DeviceWatcher`):

* **sysfs**: a device directory `<root>/<bus>-<ports>` with `busnum`, `devnum`, `idVendor`,
  `idProduct` and `serial`, as the kernel writes it when enumeration finishes (Recovery devices carry
  their iBoot serial string with `ECID:`/`SRNM:`);
* **udev**: an `add`/`remove` uevent for the same device (`SimHotplug`, fed through the same
  `DeviceMap` that turns real uevents and enumerations into `UsbEvent`s);
* **usbmuxd**: for normal and restore mode, an `Attached` a moment after the uevent (usbmuxd gets the
  same hotplug from libusb, then opens the device, sets its configuration and handshakes), with a new
  DeviceID and LocationID `(bus << 16) | devnum` matching sysfs; `Detached` when it leaves. The fake
  usbmuxd is a real UNIX-socket server: pymobiledevice3 can be pointed at it
  (`USBMUXD_SOCKET_ADDRESS=<socket_path>`). Each device's lockdownd and its MCInstall and
  mobileactivationd services answer from the world (`daemon.sim.effects`), so pymobiledevice3 can
  detect, erase and set up the simulated devices through it.

Ordering and delays follow a real host: plugging takes `timing.enumerate` seconds until sysfs and
udev show the device, `timing.usbmuxd` more until usbmuxd announces it; leaving is seen by all three
at once. Events are applied in order per USB path (a device pulled during its enumeration appears
briefly, then leaves, as on real hardware). Delays are real seconds at `speed = 60` (the demo's) and
shrink proportionally at higher speeds so fast tests stay fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog

from daemon.ios.base import DeviceEvent, DeviceGone, DeviceMode, DeviceSeen
from daemon.sim.devices import SimDevice
from daemon.sim.effects import WorldDevices
from daemon.sim.mcinstall import install_services
from daemon.sim.usbmuxd import PRODUCT_IDS, FakeUsbmuxd, bus_of
from daemon.sim.world import SimWorld
from daemon.usb.apple import APPLE_VID, DFU_PID, parse_ecid
from daemon.usb.hotplug import DeviceMap, UsbEvent, UsbSighting
from daemon.usb.sysfs import UsbSysfs
from daemon.usb.usbmux import UsbmuxClient
from daemon.usb.watcher import DeviceWatcher

__all__ = ["BusTiming", "SimHotplug", "SimUsbBus", "usb_serial"]

log = structlog.get_logger("benchhub.sim")

RECOVERY_PID: Final = 0x1281
"""iBoot Recovery as seen in the field (dmesg `idProduct=1281`, idevicerestore #303)."""


@dataclass(frozen=True, slots=True)
class BusTiming:
    """Seconds from a device reaching a port to the host seeing it, at demo speed (60)."""

    enumerate: float = 0.25
    """Port contact -> enumeration done: reset, descriptors, address (sysfs + uevent)."""
    usbmuxd: float = 0.35
    """uevent -> usbmuxd `Attached`: libusb open, set configuration, version handshake."""

    def scaled(self, speed: float) -> BusTiming:
        factor = min(1.0, 60.0 / speed)
        return BusTiming(self.enumerate * factor, self.usbmuxd * factor)


def usb_serial(device: SimDevice, mode: DeviceMode) -> str:
    """The USB serial string the device presents in `mode`: the UDID without hyphen in normal and
    restore mode, iBoot's tagged string in Recovery and DFU (the ECID is the one identity in all)."""
    if mode in (DeviceMode.NORMAL, DeviceMode.RESTORE):
        return device.udid.replace("-", "")
    chip = device.model.chip_id
    fields = f"CPID:{chip:04X} CPRV:11 CPFM:03 SCEP:01 BDID:0C ECID:{device.ecid:016X} IBFL:3C"
    return f"{fields} SRNM:[{device.serial}]" if mode is DeviceMode.RECOVERY else fields


def product_id(device: SimDevice, mode: DeviceMode) -> int:
    if mode is DeviceMode.RECOVERY:
        return RECOVERY_PID
    if mode is DeviceMode.DFU:
        return DFU_PID
    return PRODUCT_IDS.get(device.model.device_class, 0x12A8)


class SimHotplug:
    """A `HotplugSource` fed by the simulated bus: udev-style `add`/`remove`, through the same
    `DeviceMap` the real sources use."""

    name = "sim-udev"
    description = "simulated udev events from the simulated bench"

    def __init__(self) -> None:
        self.devices = DeviceMap()
        self._listeners: list[asyncio.Queue[UsbEvent]] = []

    @property
    def present(self) -> Mapping[str, UsbEvent]:
        return self.devices.present

    def add(self, sighting: UsbSighting) -> None:
        self._publish(self.devices.add(sighting))

    def remove(self, usb_path: str) -> None:
        self._publish(self.devices.remove(usb_path))

    def _publish(self, events: list[UsbEvent]) -> None:
        for queue in self._listeners:
            for event in events:
                queue.put_nowait(event)

    async def events(self) -> AsyncIterator[UsbEvent]:
        queue: asyncio.Queue[UsbEvent] = asyncio.Queue()
        # Snapshot and subscribe with no await between them, so nothing falls in the gap.
        for event in self.devices.present.values():
            queue.put_nowait(event)
        self._listeners.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._listeners.remove(queue)


class SimUsbBus:
    def __init__(self, world: SimWorld, directory: Path, timing: BusTiming | None = None) -> None:
        self.world = world
        self.directory = directory
        self.timing = (timing or BusTiming()).scaled(world.speed)
        self.sysfs_root = directory / "sysfs"
        self.sysfs = UsbSysfs(self.sysfs_root)
        self.usbmuxd = FakeUsbmuxd(directory / "usbmuxd")
        self.devices = WorldDevices(world)
        install_services(self.usbmuxd, self.devices.effects_for)
        self.hotplug = SimHotplug()
        self._rng = random.Random(world.seed)
        self._devnums: dict[int, int] = {}
        self._queues: dict[str, asyncio.Queue[DeviceEvent]] = {}
        self._group: asyncio.TaskGroup | None = None
        self._workers: list[asyncio.Task[None]] = []

    def sees(self, device: SimDevice) -> bool:
        """Whether usbmuxd lists the device in normal mode (what a restorer waits for at the end)."""
        return any(
            m.udid == device.udid and m.lockdown.mode is DeviceMode.NORMAL
            for m in self.usbmuxd.devices.values()
        )

    def forget_pairings(self, device: SimDevice) -> None:
        """A wiped device (erase, erase-install restore) forgets the hosts it paired with and its
        supervisor certificates, as a real one does: the station has to pair again."""
        state = self.usbmuxd.lockdown.get(device.udid)
        if state is not None:
            state.paired_hosts.clear()
            state.supervisor_certificates.clear()

    @property
    def socket_path(self) -> str:
        return self.usbmuxd.socket_path

    @property
    def pair_records(self) -> Path:
        """Where a station's pymobiledevice3 keeps its pair records for this bus: next to the
        socket, so they go with the bus (whose devices remember their pairings only as long as it
        runs, like the usbmuxd's own copies)."""
        return self.directory / "pair_records"

    def watcher(self) -> DeviceWatcher:
        """The station's device watcher, on this bus: the real usbmuxd client, sysfs reader and
        correlation, against the simulated usbmuxd socket, sysfs tree and udev events."""
        return DeviceWatcher(UsbmuxClient(self.socket_path), self.hotplug, self.sysfs)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[SimUsbBus]:
        self.sysfs_root.mkdir(parents=True, exist_ok=True)
        self.world.host_sees = self.sees
        self.world.on_erase.append(self.forget_pairings)
        async with self.usbmuxd, asyncio.TaskGroup() as group:
            self._group = group
            feeder = group.create_task(self._feed(), name="sim usb bus")
            try:
                yield self
            finally:
                self.world.host_sees = None
                self.world.on_erase.remove(self.forget_pairings)
                feeder.cancel()
                for worker in self._workers:
                    worker.cancel()

    def close(self) -> None:
        """Remove the sysfs tree and socket directory (the bus is not used afterwards)."""
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- world -> host ----------------------------------------------------------------------------

    async def _feed(self) -> None:
        async for event in self.world.events():
            queue = self._queues.get(event.usb_path)
            if queue is None:
                queue = self._queues[event.usb_path] = asyncio.Queue()
                assert self._group is not None
                self._workers.append(self._group.create_task(self._path_worker(queue)))
            queue.put_nowait(event)

    async def _path_worker(self, queue: asyncio.Queue[DeviceEvent]) -> None:
        """Applies one USB path's events in order, with the host's delays."""
        while True:
            event = await queue.get()
            try:
                match event:
                    case DeviceSeen():
                        await self._arrive(event)
                    case DeviceGone():
                        self._leave(event.usb_path)
            except Exception:  # a simulator bug must not silence the port for the rest of the run
                log.exception("sim_usb_bus_event_failed", event=repr(event))

    async def _arrive(self, seen: DeviceSeen) -> None:
        device = self._device(seen)
        if device is None:
            return
        path, mode = seen.usb_path, seen.mode
        self._leave(path)  # a re-enumeration replaces whatever was there
        await self._delay(self.timing.enumerate)
        bus, devnum = bus_of(path), self._next_devnum(bus_of(path))
        serial, pid = usb_serial(device, mode), product_id(device, mode)
        self._write_sysfs(path, bus, devnum, pid, serial)
        self.hotplug.add(UsbSighting(path, APPLE_VID, pid, serial, bus, devnum))
        if mode in (DeviceMode.NORMAL, DeviceMode.RESTORE):
            await self._delay(self.timing.usbmuxd)
            self.usbmuxd.attach(device, path, mode, devnum=devnum)
            self.world.host_changed()

    def _leave(self, path: str) -> None:
        self.usbmuxd.detach(usb_path=path)
        self.hotplug.remove(path)
        shutil.rmtree(self.sysfs_root / path, ignore_errors=True)

    def _device(self, seen: DeviceSeen) -> SimDevice | None:
        if seen.ecid is None:
            log.warning("sim_usb_bus_device_without_ecid", usb_path=seen.usb_path)
            return None
        return self.world.devices.get(parse_ecid(seen.ecid))

    async def _delay(self, seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds * self._rng.uniform(0.8, 1.2))

    def _next_devnum(self, bus: int) -> int:
        """Linux hands out device numbers 2..127 per bus round-robin (1 is the root hub)."""
        devnum = self._devnums.get(bus, 2)
        self._devnums[bus] = devnum + 1 if devnum < 127 else 2
        return devnum

    def _write_sysfs(self, path: str, bus: int, devnum: int, pid: int, serial: str) -> None:
        entry = self.sysfs_root / path
        entry.mkdir(parents=True, exist_ok=True)
        # The identity attributes go last: a reader racing this write sees no device, not half a one.
        attributes = {
            "manufacturer": "Apple Inc.",
            "serial": serial,
            "speed": "480",
            "bDeviceClass": "00",
            "bDeviceProtocol": "00",
            "busnum": str(bus),
            "devnum": str(devnum),
            "idProduct": f"{pid:04x}",
            "idVendor": f"{APPLE_VID:04x}",
        }
        for name in (
            "manufacturer",
            "serial",
            "speed",
            "bDeviceClass",
            "bDeviceProtocol",
            "busnum",
            "devnum",
        ):
            (entry / name).write_text(attributes[name] + "\n")
        (entry / "idProduct").write_text(attributes["idProduct"] + "\n")
        (entry / "idVendor").write_text(attributes["idVendor"] + "\n")
