"""Driver for unmanaged USB hubs: Datamation hubs and any other hub without a control protocol.

Datamation publishes no control protocol (research notes, hubs.md §2), so such a hub is what the
USB hub class makes of it: a USB hub device at a stable sysfs path (`1-2`) whose port `N` has the
child device `1-2.N` while something enumerates there. Power switching is the uhubctl approach
(hubs.md §3): only on hubs whose hub descriptor advertises per-port power switching, through the
kernel's `port<N>/disable` file (Linux >= 6.0, preferred) or hub class
SET_FEATURE / CLEAR_FEATURE(PORT_POWER) sent with pyusb.

What `open()` probes, and what it claims
----------------------------------------
* The hub must be enumerated at the configured path and be a hub (`bDeviceClass` 09) with
  `maxchild` ports (and exactly the configured count, if one is given); otherwise `HubError`.
* **ATTACH_SENSE is not claimed.** `poll()` does report `attached` (a child device is enumerated on
  the port, on either half of a USB3 hub), but that is USB enumeration, not the hub sensing a
  plug: an iPhone that reboots, restores, sits in recovery/DFU hand-over or is power-cycled by us
  leaves the USB bus for seconds while still plugged in, and a phone that is plugged in but does
  not enumerate (dead battery, charge-only cable) is invisible. The daemon treats a DETACHED
  event from an ATTACH_SENSE hub as "the operator unplugged the device" and interrupts the
  workflow, which enumeration cannot justify. The daemon's device watcher already sees the same
  enumeration, so nothing is lost.
* **PORT_POWER is claimed only when every condition holds**, and `probe.reason` says which failed:
  1. the hub descriptor was read and says individual port power switching (LPSM 01, or ganged on
     a one-port hub). The kernel's sysfs `descriptors` file holds the device and configuration
     descriptors only; the hub class descriptor (0x29 / 0x2A) comes from a GET_DESCRIPTOR control
     transfer, so without pyusb access to the hub (root or a udev rule) the switching mode is
     unknown and power is not claimed, even if `disable` files exist (the kernel creates them
     on every hub, switching or not, and on a non-switching hub writing them only disconnects the
     device logically while VBUS stays on);
  2. every half of the hub has a working mechanism: all its `disable` files exist and are
     writable (preferred), or pyusb control transfers to it work;
  3. a USB3 hub's other half is known: SuperSpeed and USB 2.0 halves share VBUS, so both are
     switched. The other half is found through the kernel's `peer` links; a SuperSpeed hub without
     them is refused (its USB 2.0 half would keep the port powered). A USB 2.0 hub without peer
     links is treated as a plain USB 2.0 hub: if it is in fact the USB 2.0 half of a USB3 hub whose
     SuperSpeed half the kernel did not pair, switching may not cut VBUS (uhubctl's `-e` caveat);
  4. at least one port is switchable: ports whose child is itself a hub (internal daisy-chain) or
     that the descriptor marks non-removable are never switched (`set_mode` refuses them).
  Even then, uhubctl reports hubs that advertise per-port switching but gang ports or never cut
  VBUS; the pyusb path checks the port's PORT_POWER status bit after switching, the sysfs path
  trusts the kernel. Verifying that the device really disappears is the daemon's business.
* No PORT_MODE, PORT_LED or CURRENT_SENSE: `set_mode` takes OFF (power off) and SYNC (power on);
  CHARGE and BIASED raise `HubError`. Current is always 0.

Port numbering: `port_paths()` is `{n: "n"}`: an unmanaged hub's ports are numbered as USB numbers
them. Multi-chip hubs whose labels differ (or whose ports sit behind internal hubs) need the
daemon's topology config to map them; ports that chain an internal hub show as attached.

I/O: sysfs reads and writes are inline (fast, in-memory); pyusb transfers go through
`asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from hubdrivers.base import Capability, HubDriver, HubError, HubInfo, PortMode, PortStatus
from hubdrivers.usbhub.control import HubControl, HubControlError
from hubdrivers.usbhub.descriptors import HubDescriptor, UsbParseError
from hubdrivers.usbhub.sysfs import SYSFS_USB_DEVICES, PortRef, SysfsUsb, UsbDevice, valid_usb_path

log = logging.getLogger(__name__)


class PowerMechanism(enum.StrEnum):
    SYSFS = "sysfs"  # <hub>:1.0/<hub>-port<N>/disable (Linux >= 6.0)
    PYUSB = "pyusb"  # hub class SET_FEATURE / CLEAR_FEATURE(PORT_POWER)


@dataclass(frozen=True, slots=True)
class HalfProbe:
    """What `open()` learnt about one hub device (a USB3 hub has two: USB 2.0 and SuperSpeed)."""

    device: UsbDevice
    superspeed: bool
    ports: int
    descriptor: HubDescriptor | None
    mechanism: PowerMechanism | None
    note: str = ""

    @property
    def name(self) -> str:
        return self.device.name


@dataclass(frozen=True, slots=True)
class HubProbe:
    usb_path: str
    ports: int
    halves: tuple[HalfProbe, ...]  # [0] is the configured hub, then its peer halves
    peers: Mapping[int, PortRef] = field(default_factory=dict)  # port -> the other half's port
    refused_ports: frozenset[int] = frozenset()  # chained hubs / non-removable devices
    port_power: bool = False
    reason: str = ""


def _half_problem(half: HalfProbe) -> str | None:
    if half.descriptor is None:
        return f"{half.name}: power switching mode unknown ({half.note})"
    if not half.descriptor.per_port_power:
        mode = half.descriptor.power_switching.name.lower()
        return f"{half.name}: hub descriptor reports {mode} power switching, not per-port"
    if half.mechanism is None:
        return f"{half.name}: no way to switch port power ({half.note})"
    return None


def decide_port_power(
    halves: tuple[HalfProbe, ...], ports: int, peers: Mapping[int, PortRef], refused: frozenset[int]
) -> tuple[bool, str]:
    """Whether to claim PORT_POWER, and why (see the module docstring for the rules)."""
    primary = halves[0]
    problems = [p for p in map(_half_problem, halves) if p is not None]
    if primary.superspeed and len(halves) < 2:
        problems.append(
            f"{primary.name} is the SuperSpeed half of a USB3 hub and the kernel shows no peer "
            "ports, so its USB 2.0 half (which also powers the ports) cannot be switched"
        )
    missing = [n for n in range(1, ports + 1) if len(halves) > 1 and n not in peers]
    if missing:
        problems.append(f"{primary.name}: ports {missing} have no peer on the other half of the hub")
    if refused >= frozenset(range(1, ports + 1)):
        problems.append(f"{primary.name}: every port chains a hub or a built-in device")
    if problems:
        return False, "; ".join(problems)
    how = ", ".join(f"{h.name} via {h.mechanism}" for h in halves)
    return True, f"per-port power switching ({how})"


class UsbHubDriver(HubDriver):
    """An unmanaged USB hub at a sysfs path such as `1-2` (config kind "usbhub"/"datamation")."""

    kind: ClassVar[str] = "usbhub"

    def __init__(
        self,
        usb_path: str,
        ports: int | None = None,
        *,
        sysfs_root: str | os.PathLike[str] = SYSFS_USB_DEVICES,
        usb_backend: object | None = None,
        use_pyusb: bool = True,
    ) -> None:
        """`usb_path`: the hub device itself (`1-2`), not a port. `ports`: the expected port count
        (open fails if the hub has another). `usb_backend`: a pyusb backend for the hub class
        control transfers (None = pyusb's default, libusb1). `use_pyusb=False` never touches
        libusb; the hub's power switching mode then stays unknown and PORT_POWER is not claimed."""
        if not valid_usb_path(usb_path):
            raise ValueError(f"{usb_path!r} is not a USB hub path like '1-2' or '3-1.4'")
        if ports is not None and ports < 1:
            raise ValueError(f"a hub has at least one port, not {ports}")
        self.usb_path = usb_path
        self.expected_ports = ports
        self._sysfs = SysfsUsb(sysfs_root)
        self._usb_backend = usb_backend
        self._use_pyusb = use_pyusb
        self._probe: HubProbe | None = None
        self._controls: dict[str, HubControl] = {}
        self._hub_ports: set[int] = set()  # ports seen chaining a hub, for the driver's lifetime
        self._off: set[int] = set()  # ports this driver switched off
        self._lock = asyncio.Lock()

    @property
    def capabilities(self) -> frozenset[Capability]:
        if self._probe is not None and self._probe.port_power:
            return frozenset({Capability.PORT_POWER})
        return frozenset()

    @property
    def probe(self) -> HubProbe | None:
        """What `open()` found, including `reason` for the PORT_POWER decision (worth logging)."""
        return self._probe

    # ------------------------------------------------------------------- lifecycle

    async def open(self) -> HubInfo:
        try:
            return await self._open()
        except (OSError, ValueError) as exc:  # unreadable or malformed sysfs attributes
            raise HubError(f"cannot probe USB hub {self.usb_path} in {self._sysfs.root}: {exc}") from exc

    async def _open(self) -> HubInfo:
        path = self.usb_path
        hub = self._hub_device(path)
        ports = self._sysfs.maxchild(path)
        if not ports:
            raise HubError(f"USB hub {path} reports no ports (maxchild {ports})")
        if self.expected_ports is not None and ports != self.expected_ports:
            raise HubError(
                f"USB hub {path} has {ports} ports, the configuration says {self.expected_ports}: "
                "is usb_path pointing at the right hub?"
            )
        primary = await self._probe_half(hub, ports)
        peers = {n: ref for n in range(1, ports + 1) if (ref := self._sysfs.peer(path, n)) is not None}
        halves = [primary]
        for name in sorted({ref.hub for ref in peers.values()}):
            other = self._sysfs.device(name)
            other_ports = self._sysfs.maxchild(name)
            if other is None or not other_ports:
                peers = {n: ref for n, ref in peers.items() if ref.hub != name}
                continue
            halves.append(await self._probe_half(other, other_ports))
        refused = self._refused_ports(ports, halves, peers)
        port_power, reason = decide_port_power(tuple(halves), ports, peers, refused)
        self._probe = HubProbe(path, ports, tuple(halves), peers, refused, port_power, reason)
        for half in halves:  # keep libusb handles only where they switch power
            if not port_power or half.mechanism is not PowerMechanism.PYUSB:
                await self._close_control(half.name)
        log.info("usbhub %s: %d ports, PORT_POWER %s: %s", path, ports, port_power, reason)
        return HubInfo(
            model=_model(hub),
            firmware=_bcd(hub.bcd_device),
            serial=hub.serial or path,
            port_count=ports,
            capabilities=self.capabilities,
        )

    async def close(self) -> None:
        for name in list(self._controls):
            await self._close_control(name)

    async def _close_control(self, name: str) -> None:
        control = self._controls.pop(name, None)
        if control is not None:
            await asyncio.to_thread(control.close)

    # ----------------------------------------------------------------------- probe

    def _hub_device(self, path: str) -> UsbDevice:
        hub = self._sysfs.device(path)
        if hub is None:
            raise HubError(
                f"no USB device at {path} (looked in {self._sysfs.root}): "
                "the hub is unplugged, unpowered, or usb_path is wrong"
            )
        if not hub.is_hub:
            raise HubError(
                f"USB device {path} ({hub.vendor_id:04x}:{hub.product_id:04x}) is not a hub "
                f"(bDeviceClass {hub.device_class:02x})"
            )
        return hub

    def _is_superspeed(self, device: UsbDevice) -> bool:
        try:
            raw = self._sysfs.descriptors(device.name)
        except (OSError, UsbParseError):
            raw = None
        if raw is not None:
            return raw.device.superspeed_hub
        return device.device_protocol == 3

    async def _probe_half(self, device: UsbDevice, ports: int) -> HalfProbe:
        superspeed = self._is_superspeed(device)
        descriptor: HubDescriptor | None = None
        note = ""
        if not self._use_pyusb:
            note = "pyusb disabled; the hub descriptor is only readable by a control transfer"
        else:
            try:
                control = await asyncio.to_thread(
                    HubControl.open, device.busnum, device.devnum, superspeed, self._usb_backend
                )
                self._controls[device.name] = control
                descriptor = await asyncio.to_thread(control.hub_descriptor)
            except (HubControlError, UsbParseError) as exc:
                note = f"cannot read the hub descriptor: {exc}"
        mechanism: PowerMechanism | None = None
        if descriptor is not None:
            if all(self._sysfs.disable_writable(device.name, n) for n in range(1, ports + 1)):
                mechanism = PowerMechanism.SYSFS
            elif device.name in self._controls:
                mechanism = PowerMechanism.PYUSB
            if descriptor.ports != ports:
                note = f"hub descriptor says {descriptor.ports} ports, sysfs maxchild {ports}"
        return HalfProbe(device, superspeed, ports, descriptor, mechanism, note)

    def _refused_ports(
        self, ports: int, halves: list[HalfProbe], peers: Mapping[int, PortRef]
    ) -> frozenset[int]:
        by_name = {h.name: h for h in halves}
        refused = set()
        for n in range(1, ports + 1):
            if self._chains_hub(n, peers):
                refused.add(n)
            for hub, port in [(self.usb_path, n), *([(peers[n].hub, peers[n].port)] if n in peers else [])]:
                half = by_name.get(hub)
                if half is not None and half.descriptor is not None and port in half.descriptor.non_removable:
                    refused.add(n)
        return frozenset(refused)

    def _chains_hub(self, port: int, peers: Mapping[int, PortRef]) -> bool:
        children = [self._sysfs.child(self.usb_path, port)]
        if (peer := peers.get(port)) is not None:
            children.append(self._sysfs.child(peer.hub, peer.port))
        if any(child is not None and child.is_hub for child in children):
            self._hub_ports.add(port)
        return port in self._hub_ports

    def _require_open(self) -> HubProbe:
        if self._probe is None:
            raise HubError(f"USB hub {self.usb_path} is not open")
        return self._probe

    # ------------------------------------------------------------------------ poll

    async def poll(self) -> list[PortStatus]:
        probe = self._require_open()
        sysfs = self._sysfs
        try:
            hub = sysfs.device(self.usb_path)
            if hub is None:
                raise HubError(f"USB hub {self.usb_path} disappeared")
            if hub.devnum != probe.halves[0].device.devnum:
                raise HubError(f"USB hub {self.usb_path} re-enumerated; reopening")
            statuses = []
            for n in range(1, probe.ports + 1):
                child = sysfs.child(self.usb_path, n)
                peer = probe.peers.get(n)
                peer_child = sysfs.child(peer.hub, peer.port) if peer is not None else None
                if any(c is not None and c.is_hub for c in (child, peer_child)):
                    self._hub_ports.add(n)
                off = n in self._off or sysfs.read_disabled(self.usb_path, n) is True
                statuses.append(
                    PortStatus(
                        port=n,
                        attached=child is not None or peer_child is not None,
                        mode=PortMode.OFF if off else PortMode.SYNC,
                    )
                )
        except (OSError, ValueError) as exc:
            raise HubError(f"cannot read USB hub {self.usb_path} from sysfs: {exc}") from exc
        return statuses

    async def port_paths(self) -> dict[int, str]:
        """`{n: "n"}`: USB numbering. The daemon's topology config overrides it where labels differ."""
        probe = self._require_open()
        return {n: str(n) for n in range(1, probe.ports + 1)}

    # ------------------------------------------------------------------ port power

    async def set_mode(self, port: int, mode: PortMode) -> None:
        """OFF powers the port off, SYNC powers it on (on both halves of a USB3 hub)."""
        probe = self._require_open()
        self._check_switchable(probe, port, mode)
        on = mode is PortMode.SYNC
        targets = [(probe.halves[0], port)]
        if (peer := probe.peers.get(port)) is not None:
            targets += [(h, peer.port) for h in probe.halves[1:] if h.name == peer.hub]
        async with self._lock:
            done: list[tuple[HalfProbe, int]] = []
            try:
                for half, half_port in targets:
                    await self._switch(half, half_port, on)
                    done.append((half, half_port))
            except HubError:
                if not on:  # best effort: do not leave one half of the port off
                    await self._repower(done)
                raise
            if on:
                self._off.discard(port)
            else:
                self._off.add(port)

    def _check_switchable(self, probe: HubProbe, port: int, mode: PortMode) -> None:
        if not 1 <= port <= probe.ports:
            raise HubError(f"port {port} does not exist on USB hub {self.usb_path} ({probe.ports} ports)")
        if mode not in (PortMode.OFF, PortMode.SYNC):
            raise HubError(f"unmanaged USB hubs only switch port power (off / sync); {mode} is not supported")
        if not probe.port_power:
            raise HubError(f"USB hub {self.usb_path} cannot switch port power: {probe.reason}")
        try:
            chains_hub = self._chains_hub(port, probe.peers)
        except (OSError, ValueError) as exc:
            raise HubError(f"cannot read port {port} of USB hub {self.usb_path}: {exc}") from exc
        if port in probe.refused_ports or chains_hub:
            raise HubError(
                f"port {port} of USB hub {self.usb_path} chains a hub or a built-in device; "
                "its power is never switched"
            )

    async def _repower(self, switched: list[tuple[HalfProbe, int]]) -> None:
        for half, port in switched:
            try:
                await self._switch(half, port, True)
            except HubError:
                log.warning("usbhub %s: could not power port %d back on", half.name, port)

    async def _switch(self, half: HalfProbe, port: int, on: bool) -> None:
        action = "power on" if on else "power off"
        if half.mechanism is PowerMechanism.SYSFS:
            try:
                self._sysfs.write_disabled(half.name, port, not on)
            except OSError as exc:
                raise HubError(f"cannot {action} {half.name} port {port} through sysfs: {exc}") from exc
            return
        control = self._controls.get(half.name)
        if control is None:
            raise HubError(f"cannot {action} {half.name} port {port}: no control channel")
        try:
            await asyncio.to_thread(control.set_port_power, port, on)
            status = await asyncio.to_thread(control.port_status, port)
        except (HubControlError, UsbParseError) as exc:
            raise HubError(f"cannot {action} {half.name} port {port}: {exc}") from exc
        if status.powered != on:
            raise HubError(
                f"{half.name} port {port} accepted the {action} request but reports power "
                f"{'off' if on else 'on'} (status {status.status:04x}): the hub does not really "
                "switch its ports individually"
            )


def _model(hub: UsbDevice) -> str:
    name = " ".join(part for part in (hub.manufacturer, hub.product) if part) or "USB hub"
    return f"{name} [{hub.vendor_id:04x}:{hub.product_id:04x}]"


def _bcd(value: int | None) -> str:
    return "" if value is None else f"{value >> 8:x}.{value & 0xFF:02x}"
