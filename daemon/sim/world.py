"""The simulated physical bench: hubs, ports, which device sits where, and the devices themselves.

It is the single source of physical truth for the simulated hub driver (what a hub would measure),
the simulated device backend (what usbmuxd would report) and the simulated portal. With a state
file it survives daemon restarts and crashes the way a real bench does: the devices stay plugged in
and keep whatever was done to them.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from daemon.ios.base import DeviceEvent, DeviceGone, DeviceMode, DeviceSeen
from daemon.models import PortRef
from daemon.sim.apple import FakeAppleBusiness
from daemon.sim.devices import SimDevice, make_device
from daemon.sim.faults import Fault, FaultKind
from daemon.sim.usbbandwidth import BusModel, UsbBandwidth
from daemon.usb.topology import default_usb_path
from hubdrivers.base import PortMode, PortStatus


@dataclass
class SimHub:
    id: str
    ports: int
    usb_path: str
    online: bool = True
    port_paths: dict[int, str] = field(default_factory=dict)
    """How the hub's physical ports are wired to its internal USB ports (a PP15S's port 15 is `2.1`);
    the station learns the same map from the hub itself, which is what the simulation checks."""


@dataclass
class PortSlot:
    device: int | None = None  # ECID of the device in the port
    mode: PortMode = PortMode.SYNC


class HubWiring(Protocol):
    """A simulated hub with its own model of the ports (the Cambrionix simulator)."""

    def attach(self, port: int) -> None: ...

    def detach(self, port: int) -> None: ...

    def set_online(self, online: bool) -> None: ...


@dataclass
class SimWorld:
    hubs: dict[str, SimHub]
    speed: float = 60.0
    seed: int = 1
    assign_delay: float = 120.0
    fail_rate: float = 0.0
    target_server: str = "benchhub MDM"
    state_file: Path | None = None
    devices: dict[int, SimDevice] = field(default_factory=dict)
    slots: dict[PortRef, PortSlot] = field(default_factory=dict)
    apple: FakeAppleBusiness = field(default_factory=FakeAppleBusiness)
    """The simulated organisation in Apple Business Manager, served to the daemon over HTTP as
    Apple's API (`daemon.sim.apple`); its clock is the wall clock, so the administrator's delay
    runs across daemon restarts."""
    faults: list[Fault] = field(default_factory=list)
    usb: UsbBandwidth | None = None
    """The controllers' shared bandwidth, which restores' transfers cross (None: restores spend only
    their device-side time)."""
    restore_bytes: float = 0.0
    """Bytes a restore moves over USB (the IPSW's filesystem image)."""
    wiring: dict[str, HubWiring] = field(default_factory=dict)
    generated: int = 0
    host_sees: Callable[[SimDevice], bool] | None = None
    """Whether the host (usbmuxd) shows this device in normal mode; set by the simulated USB host."""
    on_erase: list[Callable[[SimDevice], None]] = field(default_factory=list)
    """Called when a device is wiped (an erase, an erase-install restore): whatever else the device
    remembers must go too, e.g. the simulated host's lockdownd pairings (`daemon.sim.usbbus`)."""
    _listeners: list[asyncio.Queue[DeviceEvent]] = field(default_factory=list)
    _rng: random.Random = field(default_factory=random.Random)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _host_change: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        for hub in self.hubs.values():
            for n in range(1, hub.ports + 1):
                self.slots.setdefault(PortRef(hub.id, n), PortSlot())

    # -------------------------------------------------------------- topology

    def usb_path(self, ref: PortRef) -> str:
        hub = self.hubs[ref.hub]
        return f"{hub.usb_path}.{hub.port_paths.get(ref.port, str(ref.port))}"

    def port_of(self, ecid: int) -> PortRef | None:
        for ref, slot in self.slots.items():
            if slot.device == ecid:
                return ref
        return None

    def device_by_udid(self, udid: str) -> tuple[SimDevice, PortRef] | None:
        for ref, slot in self.slots.items():
            if slot.device is not None:
                device = self.devices[slot.device]
                if device.udid == udid:
                    return device, ref
        return None

    def free_ports(self) -> list[PortRef]:
        return [ref for ref, slot in sorted(self.slots.items()) if slot.device is None]

    # ------------------------------------------------------- hub backplane

    def hub_online(self, hub: str) -> bool:
        return self.hubs[hub].online

    def port_statuses(self, hub: str) -> list[PortStatus]:
        statuses = []
        for n in range(1, self.hubs[hub].ports + 1):
            slot = self.slots[PortRef(hub, n)]
            attached = slot.device is not None and slot.mode is not PortMode.OFF
            statuses.append(
                PortStatus(port=n, attached=attached, mode=slot.mode, current_ma=480 if attached else 0)
            )
        return statuses

    async def set_port_mode(self, hub: str, port: int, mode: PortMode) -> None:
        self.apply_port_mode(hub, port, mode)

    def apply_port_mode(self, hub: str, port: int, mode: PortMode) -> None:
        """A hub switched a port's mode: `off` cuts the device off USB, power back re-enumerates it."""
        ref = PortRef(hub, port)
        slot = self.slots[ref]
        was_on = slot.mode is not PortMode.OFF
        slot.mode = mode
        if slot.device is None:
            return
        device = self.devices[slot.device]
        if mode is PortMode.OFF and was_on:
            self._emit(DeviceGone(self.usb_path(ref)))
        elif mode is not PortMode.OFF and not was_on:
            # Power returns: the phone (it has a battery) re-enumerates within a couple of seconds.
            self.later(2.0 / self.speed, lambda: self._announce(ref, device))

    def set_hub_online(self, hub: str, online: bool) -> None:
        """Plug the hub's control link in or out (its ports and devices stay as they are)."""
        self.hubs[hub].online = online
        if (wiring := self.wiring.get(hub)) is not None:
            wiring.set_online(online)

    def wire(self, hub: str, wiring: HubWiring) -> None:
        """Let a hub that keeps its own port state (a simulated Cambrionix) follow this world."""
        self.wiring[hub] = wiring
        for ref, slot in self.slots.items():
            if ref.hub == hub and slot.device is not None:
                wiring.attach(ref.port)

    # ------------------------------------------------------------ plugging

    def new_device(self, minimum_major: int = 0) -> SimDevice:
        device = make_device(self.seed, self.generated, minimum_major)
        self.generated += 1
        self.devices[device.ecid] = device
        self.save()
        return device

    def plug(self, ref: PortRef, device: SimDevice, mode: DeviceMode = DeviceMode.NORMAL) -> None:
        """Plug `device` into `ref`; `mode` is how it comes up (Recovery: a device a failed restore
        left there stays there, whatever port it is moved to)."""
        slot = self.slots[ref]
        if slot.device is not None:
            raise ValueError(f"port {ref} is occupied")
        current = self.port_of(device.ecid)
        if current is not None:
            raise ValueError(f"device {device.serial} is already in port {current}")
        self.devices.setdefault(device.ecid, device)
        slot.device = device.ecid
        device.mode = mode
        self.save()
        if (wiring := self.wiring.get(ref.hub)) is not None:
            wiring.attach(ref.port)
        if slot.mode is not PortMode.OFF:
            self._announce(ref, device)

    def unplug(self, ref: PortRef) -> SimDevice | None:
        slot = self.slots[ref]
        if slot.device is None:
            return None
        device = self.devices[slot.device]
        slot.device = None
        self.save()
        if (wiring := self.wiring.get(ref.hub)) is not None:
            wiring.detach(ref.port)
        self._emit(DeviceGone(self.usb_path(ref)))
        return device

    def plug_new(self, count: int, minimum_major: int = 0) -> list[PortRef]:
        """Plug `count` new devices into the first free ports, as a technician would."""
        refs = self.free_ports()[:count]
        for ref in refs:
            self.plug(ref, self.new_device(minimum_major))
        return refs

    # ---------------------------------------------------------- USB events

    def _announce(self, ref: PortRef, device: SimDevice) -> None:
        udid = device.udid if device.mode in (DeviceMode.NORMAL, DeviceMode.RESTORE) else None
        self._emit(DeviceSeen(self.usb_path(ref), device.mode, udid=udid, ecid=device.ecid_hex))

    def reenumerate(self, device: SimDevice, mode: DeviceMode) -> None:
        """The device drops off USB and comes back in another mode (a restore or a reboot)."""
        ref = self.port_of(device.ecid)
        device.mode = mode
        if ref is None:
            return
        self._emit(DeviceGone(self.usb_path(ref)))
        self._announce(ref, device)

    def host_changed(self) -> None:
        """The simulated host's view changed (a usbmuxd attach): wake `until_on_host` waiters."""
        self._host_change.set()

    async def until_on_host(self, device: SimDevice, within: float = 10.0) -> None:
        """Wait until the host sees the device back in normal mode, as a real restore only ends when
        the rebooted device answers over usbmuxd (no-op without a simulated host)."""
        async with asyncio.timeout(within):
            while self.host_sees is not None and not self.host_sees(device):
                self._host_change.clear()
                await self._host_change.wait()

    def erased(self, device: SimDevice) -> None:
        """The device has wiped itself: tell whoever keeps more of its memory (`on_erase`)."""
        for forget in self.on_erase:
            forget(device)

    def vanish(self, device: SimDevice) -> None:
        ref = self.port_of(device.ecid)
        if ref is not None:
            self._emit(DeviceGone(self.usb_path(ref)))

    def reappear(self, device: SimDevice) -> None:
        ref = self.port_of(device.ecid)
        device.mode = DeviceMode.NORMAL
        if ref is not None and self.slots[ref].mode is not PortMode.OFF:
            self._announce(ref, device)

    def _emit(self, event: DeviceEvent) -> None:
        for queue in self._listeners:
            queue.put_nowait(event)

    async def events(self) -> AsyncIterator[DeviceEvent]:
        """What usbmuxd/udev would report: first every device present, then every change."""
        queue: asyncio.Queue[DeviceEvent] = asyncio.Queue()
        self._listeners.append(queue)
        try:
            for ref, slot in sorted(self.slots.items()):
                if slot.device is not None and slot.mode is not PortMode.OFF:
                    device = self.devices[slot.device]
                    udid = device.udid if device.mode is DeviceMode.NORMAL else None
                    queue.put_nowait(DeviceSeen(self.usb_path(ref), device.mode, udid, device.ecid_hex))
            while True:
                yield await queue.get()
        finally:
            self._listeners.remove(queue)

    # -------------------------------------------------------------- faults

    def inject(self, *faults: Fault) -> None:
        self.faults.extend(faults)

    def take_fault(self, op: str, ref: PortRef) -> Fault | None:
        for fault in self.faults:
            if fault.matches(op, ref):
                fault.times -= 1
                return fault
        if self.fail_rate and self._rng.random() < self.fail_rate:
            # Transient: it fails before any effect (at=0), so a retry is a first try.
            return Fault(op, FaultKind.FAIL, at=0.0, message="simulated transient failure (sim.fail_rate)")
        return None

    def schedule_replug(self, ref: PortRef, device: SimDevice, delay: float) -> None:
        self.later(delay, lambda: self.plug(ref, device) if self.slots[ref].device is None else None)

    def later(self, delay: float, action: Callable[[], object]) -> None:
        """Run `action` after `delay` real seconds."""

        async def run() -> None:
            await asyncio.sleep(delay)
            action()

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def sleep(self, seconds: float) -> None:
        """Sleep for `seconds` of simulated time, jittered by ±20 % like real hardware."""
        await asyncio.sleep(seconds * self._rng.uniform(0.8, 1.2) / self.speed)

    # -------------------------------------------------------------- organisation

    def prepare_org(self) -> None:
        """The organisation the simulated bench enrolls into: the target MDM server exists, and its
        administrator assigns a device parked on Apple Configurator's placeholder after
        `assign_delay` simulated seconds; activities take Apple's ~10 s, simulated."""
        try:
            target = self.apple.server_id(self.target_server)
        except StopIteration:
            target = self.apple.add_mdm_server(self.target_server)
        self.apple.admin_target = target
        self.apple.admin_assigns_after = self.assign_delay / self.speed
        self.apple.activity_delay = 10.0 / self.speed

    def in_organisation(self, serial: str) -> bool:
        return self.apple.has_device(serial)

    def assigned_mdm_server(self, serial: str) -> str | None:
        """The MDM server the organisation has assigned the serial to; None while it is not in the
        organisation, unassigned, or parked on Apple Configurator's placeholder."""
        return self.apple.mdm_server_of(serial)

    # --------------------------------------------------------- persistence

    def save(self) -> None:
        if self.state_file is None:
            return
        data = {
            "generated": self.generated,
            "devices": [d.to_json() for d in self.devices.values()],
            "slots": {f"{r.hub}/{r.port}": s.device for r, s in self.slots.items() if s.device is not None},
            "apple": self.apple.snapshot(),
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.state_file)

    def load(self) -> bool:
        if self.state_file is None or not self.state_file.exists():
            return False
        data = json.loads(self.state_file.read_text())
        self.generated = data["generated"]
        self.devices = {d["ecid"]: SimDevice.from_json(d) for d in data["devices"]}
        for key, ecid in data["slots"].items():
            hub, port = key.rsplit("/", 1)
            ref = PortRef(hub, int(port))
            if ref in self.slots:
                self.slots[ref].device = ecid
        if "apple" in data:  # state files from before the organisation was kept start it empty
            self.apple.restore(data["apple"])
        return True


def build_world(
    hubs: Iterable[tuple[str, int, str | None, dict[int, str]]],
    *,
    speed: float,
    seed: int,
    assign_delay: float,
    fail_rate: float = 0.0,
    target_server: str = "benchhub MDM",
    state_file: Path | None = None,
    bus: BusModel | None = None,
    restore_bytes: float = 0.0,
) -> SimWorld:
    """A world for the given `(hub id, port count, usb path, port paths)` hubs; with a `bus`, restores
    move `restore_bytes` each over their controller's shared bandwidth."""
    sim_hubs = {
        hub_id: SimHub(hub_id, ports, usb_path or default_usb_path(i), port_paths=paths)
        for i, (hub_id, ports, usb_path, paths) in enumerate(hubs)
    }
    world = SimWorld(
        sim_hubs,
        speed=speed,
        seed=seed,
        assign_delay=assign_delay,
        fail_rate=fail_rate,
        target_server=target_server,
        state_file=state_file,
        usb=UsbBandwidth(bus, speed, seed) if bus is not None else None,
        restore_bytes=restore_bytes,
    )
    world.load()
    world.prepare_org()
    return world
