"""Apple devices arriving on and leaving USB paths, as one typed event stream.

Two sources, one event type:

* `UdevHotplug` (Linux with udevd): a pyudev netlink monitor filtered in the kernel to
  `usb`/`usb_device`, read from the event loop with `loop.add_reader` (no thread). Devices already
  present are reported first, from sysfs; the monitor is opened before that scan, so nothing that
  happens during it is lost (a duplicate `add` is absorbed).
* `PollingHotplug`: enumerates every `interval` seconds and reports the difference, through sysfs
  (`SysfsEnumerator`, Linux without udevd, e.g. containers) or pyusb/libusb (`PyusbEnumerator`,
  macOS). pyusb has no hotplug API (pyusb issue #64), hence polling; its serial reads are blocking
  USB I/O and run in a worker thread, once per enumeration of a device.

`open_hotplug()` picks one and says which in `.name`/`.description` (for `benchhub doctor`).

Both keep a `usb_path -> last added event` map (`DeviceMap`): a `removed` event carries the identity
the device had when it arrived, because a remove uevent has no sysfs attributes left to read. A
device that re-enumerates on the same path (normal -> Recovery -> normal) is a `removed` then an
`added`, with the same ECID throughout when the serials carry it.

Paths are canonical: a device enumerated at SuperSpeed under the SuperSpeed half of a USB 3 hub
(`4-2.4`) is reported on the USB 2 side's path (`3-2.4`, `UsbSysfs.canonical_path`), so a port has one
path whatever speed the device runs at (an iPhone 15 Pro at 5 Gbit/s in normal mode comes back at
high speed in Recovery). The kernel's name is kept as `UsbEvent.sysfs_name`. The sysfs-backed sources
canonicalise when they see a device arrive; a `remove` uevent finds the path its `add` was given,
since by then the device's sysfs entry (and, when a whole hub went, its `peer` links) is gone.
`PyusbEnumerator` (macOS) has no sysfs and no peer links: its paths are left as libusb builds them.

Only iOS devices are reported (Apple VID and a PID `apple.classify_pid` knows); hubs, keyboards and
the rest of USB are ignored. Nothing here raises out of the stream for an odd device or a failing
read: it is logged (logger `benchhub.usb`) and skipped, and the stream goes on.
"""

from __future__ import annotations

import asyncio
import enum
import os
import sys
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, Literal, Protocol

import structlog

from daemon.backoff import backoff_delay
from daemon.ios.base import DeviceEvent, DeviceGone, DeviceMode, DeviceSeen
from daemon.usb.apple import APPLE_VID, classify_pid, format_ecid, identify
from daemon.usb.sysfs import SYSFS_USB_DEVICES, UsbSysfs, location_id, path_key
from hubdrivers.usbhub.sysfs import valid_usb_path

log = structlog.get_logger("benchhub.usb")

UDEV_CONTROL: Final = "/run/udev/control"
"""udevd's control socket: present while udevd runs. Without udevd the netlink `udev` group stays
silent even though the monitor opens fine (seen in this project's sandbox)."""


class UsbAction(enum.StrEnum):
    ADDED = "added"
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class UsbEvent:
    """An iOS device appeared on, or left, a USB path (sysfs naming, `3-2.4.1`)."""

    action: UsbAction
    usb_path: str
    vid: int
    pid: int
    serial: str | None
    """The USB serial string as read (normal mode: the UDID without hyphen; Recovery/DFU: the iBoot
    string); None when it could not be read."""
    mode: DeviceMode
    """From the PID; restore mode reads as NORMAL (see `daemon.usb.apple`)."""
    ecid: int | None
    udid: str | None
    """Normal mode only; Recovery/DFU devices have none."""
    location_id: int | None = None
    """`(bus << 16) | devnum` as Linux usbmuxd reports it, for matching `Attached` messages; valid
    for this enumeration only."""
    sysfs_name: str | None = None
    """The kernel's name for the device when it is not `usb_path` (a SuperSpeed device: `4-2.4` on
    `3-2.4`); None when they are the same."""

    @property
    def enumerated_as(self) -> str:
        """The name the kernel gave this enumeration, as uevents spell it."""
        return self.sysfs_name or self.usb_path

    @property
    def ecid_hex(self) -> str | None:
        """The ECID spelled as `DeviceIdentity.ecid` spells it (16 upper-case hex digits)."""
        return format_ecid(self.ecid) if self.ecid is not None else None

    def as_device_event(self) -> DeviceEvent:
        """The backend-neutral event of `daemon.ios.base`."""
        if self.action is UsbAction.REMOVED:
            return DeviceGone(self.usb_path)
        return DeviceSeen(self.usb_path, self.mode, udid=self.udid, ecid=self.ecid_hex)


@dataclass(frozen=True, slots=True)
class UsbSighting:
    """One device as an enumeration or a uevent saw it, before its identity is worked out."""

    usb_path: str
    vid: int
    pid: int
    serial: str | None = None
    bus: int | None = None
    devnum: int | None = None
    sysfs_name: str | None = None
    """The kernel's name when `usb_path` is the USB 2 side's instead (see the module docstring)."""


def on_usb2_side(sysfs: UsbSysfs, sighting: UsbSighting) -> UsbSighting:
    """`sighting` on its canonical path (`UsbSysfs.canonical_path`); unchanged off SuperSpeed."""
    path = sysfs.canonical_path(sighting.usb_path)
    if path == sighting.usb_path:
        return sighting
    return replace(sighting, usb_path=path, sysfs_name=sighting.usb_path)


def sysfs_sightings(sysfs: UsbSysfs) -> list[UsbSighting]:
    """Every Apple device in sysfs, on its canonical path."""
    return [
        on_usb2_side(sysfs, UsbSighting(d.name, d.vendor_id, d.product_id, d.serial, d.busnum, d.devnum))
        for d in sysfs.apple_devices()
    ]


def event_for(action: UsbAction, sighting: UsbSighting) -> UsbEvent | None:
    """The event for an iOS device; None for anything else on USB."""
    identity = identify(sighting.vid, sighting.pid, sighting.serial)
    if identity is None:
        return None
    if identity.problem and action is UsbAction.ADDED:
        log.warning(
            "usb_apple_identity_incomplete",
            usb_path=sighting.usb_path,
            pid=f"{sighting.pid:04x}",
            mode=str(identity.mode),
            problem=identity.problem,
        )
    location = None
    if sighting.bus is not None and sighting.devnum is not None:
        try:
            location = location_id(sighting.bus, sighting.devnum)
        except ValueError:
            location = None
    return UsbEvent(
        action=action,
        usb_path=sighting.usb_path,
        vid=sighting.vid,
        pid=sighting.pid,
        serial=sighting.serial,
        mode=identity.mode,
        ecid=identity.ecid,
        udid=identity.udid,
        location_id=location,
        sysfs_name=sighting.sysfs_name,
    )


def _seen_before(old: UsbEvent, sighting: UsbSighting) -> bool:
    """Whether `sighting` is the device `old` announced (and not a new enumeration on its path)."""
    if (old.vid, old.pid, old.serial) != (sighting.vid, sighting.pid, sighting.serial):
        return False
    if old.location_id is None or sighting.bus is None or sighting.devnum is None:
        return True
    # A changed devnum on the same path is a re-enumeration the source did not see as a removal.
    return old.location_id == (sighting.bus << 16 | sighting.devnum)


class DeviceMap:
    """`usb_path -> last added event`; turns sightings into added/removed events."""

    def __init__(self) -> None:
        self._present: dict[str, UsbEvent] = {}

    @property
    def present(self) -> Mapping[str, UsbEvent]:
        return dict(self._present)

    def add(self, sighting: UsbSighting) -> list[UsbEvent]:
        old = self._present.get(sighting.usb_path)
        if old is not None and _seen_before(old, sighting):
            return []  # checked before `event_for`, which logs, so a poll every second stays quiet
        event = event_for(UsbAction.ADDED, sighting)
        out = self.remove(sighting.usb_path) if old is not None else []
        if event is not None:
            self._present[sighting.usb_path] = event
            out.append(event)
        return out

    def path_of(self, sysfs_name: str) -> str | None:
        """The path of the device present under the kernel name `sysfs_name`, if any."""
        return next((p for p, e in self._present.items() if e.enumerated_as == sysfs_name), None)

    def remove(self, usb_path: str, sighting: UsbSighting | None = None) -> list[UsbEvent]:
        """The removal of what was last seen on `usb_path`; if nothing was, the removal `sighting`
        describes (a device that arrived before we looked), if it is an iOS device."""
        old = self._present.pop(usb_path, None)
        if old is not None:
            return [replace(old, action=UsbAction.REMOVED)]
        if sighting is not None and (event := event_for(UsbAction.REMOVED, sighting)) is not None:
            return [event]
        return []

    def sync(self, sightings: Iterable[UsbSighting]) -> list[UsbEvent]:
        """Events that turn the map into exactly `sightings` (a full enumeration): removals first."""
        current = {s.usb_path: s for s in sightings}
        out: list[UsbEvent] = []
        for path in sorted(self._present.keys() - current.keys(), key=path_key):
            out += self.remove(path)
        for path in sorted(current, key=path_key):
            out += self.add(current[path])
        return out


class HotplugSource(Protocol):
    name: str
    description: str

    @property
    def present(self) -> Mapping[str, UsbEvent]: ...

    def events(self) -> AsyncIterator[UsbEvent]:
        """Devices present now (as `added`), then changes, forever. Close with `aclose()` (or
        `contextlib.aclosing`) to release the monitor."""
        ...


# ----------------------------------------------------------------------------------------------- udev


def _hex(text: object) -> int | None:
    if not isinstance(text, str) or not 1 <= len(text) <= 4:
        return None
    try:
        return int(text, 16) if text.isascii() and text.isalnum() else None
    except ValueError:
        return None


def _dec(text: object) -> int | None:
    if not isinstance(text, str) or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def _attribute(device: Any, name: str) -> str | None:
    """A sysfs attribute of a udev device; None when gone (remove events) or unreadable."""
    try:
        value = device.attributes.get(name)
    except (OSError, ValueError, KeyError):
        return None
    if value is None:
        return None
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return text.strip() or None


def udev_sighting(device: Any) -> UsbSighting | None:
    """What a pyudev `Device` (from a uevent or an enumeration) says; None if it is not a USB
    device on a port (root hubs, interfaces) or lacks IDs.

    IDs: `ID_VENDOR_ID`/`ID_MODEL_ID` (udev), else the kernel's `PRODUCT` (`5ac/12a8/1001`, in remove
    events too), else the sysfs attributes. Serial: the sysfs `serial` attribute first, because
    udev's `ID_SERIAL_SHORT` replaces spaces and brackets in a Recovery/DFU iBoot string with `_`;
    `ID_SERIAL_SHORT` when the attribute is gone."""
    usb_path = device.sys_name
    if not isinstance(usb_path, str) or not valid_usb_path(usb_path):
        return None
    props = device.properties
    vid, pid = _hex(props.get("ID_VENDOR_ID")), _hex(props.get("ID_MODEL_ID"))
    if vid is None or pid is None:
        product = props.get("PRODUCT")
        parts = product.split("/") if isinstance(product, str) else []
        if len(parts) >= 2:
            vid, pid = _hex(parts[0]), _hex(parts[1])
    if vid is None or pid is None:
        vid, pid = _hex(_attribute(device, "idVendor")), _hex(_attribute(device, "idProduct"))
    if vid is None or pid is None:
        return None
    serial = None
    if vid == APPLE_VID:
        short = props.get("ID_SERIAL_SHORT")
        serial = _attribute(device, "serial") or (short if isinstance(short, str) and short else None)
    return UsbSighting(
        usb_path=usb_path,
        vid=vid,
        pid=pid,
        serial=serial,
        bus=_dec(props.get("BUSNUM")),
        devnum=_dec(props.get("DEVNUM")),
    )


def open_udev_monitor(context: Any = None) -> Any:
    """A started pyudev netlink monitor for USB devices (not interfaces). Raises ImportError or
    OSError when udev/netlink is unavailable."""
    import pyudev  # noqa: PLC0415 - Linux-only dependency, imported where used

    monitor = pyudev.Monitor.from_netlink(context if context is not None else pyudev.Context())
    monitor.filter_by("usb", device_type="usb_device")
    monitor.start()
    return monitor


_RESYNC: Final = object()
_MAX_PER_WAKEUP: Final = 64


class _NetlinkReader:
    """Drains the monitor socket into a queue from the event loop's reader callback. A receive error
    (ENOBUFS when the socket overflowed, i.e. events were lost) queues a resync and pauses reading
    with backoff, so a broken socket cannot spin the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, monitor: Any, queue: asyncio.Queue[Any]) -> None:
        self._loop = loop
        self._monitor = monitor
        self._queue = queue
        self._fd: int = monitor.fileno()
        self._failures = 0
        self._timer: asyncio.TimerHandle | None = None
        self._reading = False

    def start(self) -> None:
        self._timer = None
        self._loop.add_reader(self._fd, self._on_readable)
        self._reading = True

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _on_readable(self) -> None:
        try:
            for _ in range(_MAX_PER_WAKEUP):
                device = self._monitor.poll(timeout=0)
                if device is None:
                    break
                self._queue.put_nowait(device)
            self._failures = 0
        except Exception as exc:
            delay = backoff_delay(self._failures)
            self._failures += 1
            log.warning("usb_udev_receive_failed", error=repr(exc), retry_in=round(delay, 1))
            self._queue.put_nowait(_RESYNC)
            self.stop()
            self._timer = self._loop.call_later(delay, self.start)


class UdevHotplug:
    """Hotplug from udev's netlink events (see the module docstring)."""

    name = "udev"

    def __init__(
        self,
        *,
        sysfs: UsbSysfs | None = None,
        monitor: Any = None,
        context: Any = None,
        description: str | None = None,
    ) -> None:
        self.sysfs = sysfs or UsbSysfs()
        self.description = description or (
            f"udev netlink monitor (usb_device), devices present at start from {self.sysfs.root}"
        )
        self._monitor = monitor
        self._context = context
        self.devices = DeviceMap()

    @property
    def present(self) -> Mapping[str, UsbEvent]:
        return self.devices.present

    def translate(self, device: Any) -> list[UsbEvent]:
        """Events for one uevent; `bind`, `change` and the like produce none."""
        action = getattr(device, "action", None)
        if action not in ("add", "remove"):
            return []
        try:
            sighting = udev_sighting(device)
        except Exception as exc:
            log.warning("usb_udev_bad_event", action=action, device=repr(device), error=repr(exc))
            return []
        if sighting is None:
            return []
        if action == "add":
            return self.devices.add(on_usb2_side(self.sysfs, sighting))
        return self._removed(sighting)

    def _removed(self, sighting: UsbSighting) -> list[UsbEvent]:
        """A remove uevent names the device as the kernel did and its sysfs entry is gone: the path
        is the one its `add` was given. A device that arrived before we looked is resolved through
        its parent hub's port, if that is still there. A remove for a device whose port is by now
        held by another enumeration (a device that dropped from SuperSpeed to high speed, with the
        new `add` first) is stale and ignored."""
        path = self.devices.path_of(sighting.usb_path)
        if path is not None:
            return self.devices.remove(path)
        late = on_usb2_side(self.sysfs, sighting)
        if late.usb_path in self.devices.present:
            log.debug("usb_udev_stale_remove", sysfs_name=sighting.usb_path, usb_path=late.usb_path)
            return []
        return self.devices.remove(late.usb_path, late)

    def _scan(self) -> list[UsbSighting]:
        return sysfs_sightings(self.sysfs)

    async def events(self) -> AsyncIterator[UsbEvent]:
        monitor = self._monitor if self._monitor is not None else open_udev_monitor(self._context)
        self._monitor = None  # a monitor serves one stream; a second `events()` opens its own
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        reader = _NetlinkReader(loop, monitor, queue)
        reader.start()
        try:
            if self.sysfs.available():
                for event in self.devices.sync(self._scan()):
                    yield event
            else:
                log.info("usb_udev_no_initial_scan", root=str(self.sysfs.root))
            while True:
                item = await queue.get()
                if item is _RESYNC:
                    events = self.devices.sync(self._scan()) if self.sysfs.available() else []
                else:
                    events = self.translate(item)
                for event in events:
                    yield event
        finally:
            reader.stop()


# -------------------------------------------------------------------------------------------- polling


class UsbEnumerator(Protocol):
    name: str
    description: str

    async def scan(self) -> list[UsbSighting]:
        """Every Apple device present now; raises if the enumeration as a whole failed (which must
        not be mistaken for "no devices")."""
        ...


class SysfsEnumerator:
    name = "sysfs"

    def __init__(self, sysfs: UsbSysfs | None = None) -> None:
        self.sysfs = sysfs or UsbSysfs()
        self.description = f"sysfs ({self.sysfs.root})"

    async def scan(self) -> list[UsbSighting]:
        if not self.sysfs.available():
            raise OSError(f"cannot list {self.sysfs.root}")
        return sysfs_sightings(self.sysfs)


class PyusbEnumerator:
    """Enumeration through pyusb (`usb.core.find`); the path is `f"{bus}-{'.'.join(port_numbers)}"`,
    as libusb reports it: without sysfs there are no `peer` links, so a SuperSpeed device keeps its
    own path (not canonical). Reading a serial opens the device, so it is done once per (path,
    address, PID), in a thread."""

    name = "pyusb"

    def __init__(self, *, backend: Any = None) -> None:
        self._backend = backend
        self._serials: dict[tuple[str, int | None, int], str | None] = {}
        self.description = "pyusb/libusb"

    @staticmethod
    def backend_problem() -> str | None:
        """Why pyusb cannot enumerate here (no libusb found), or None."""
        try:
            import usb.backend.libusb1  # noqa: PLC0415

            if usb.backend.libusb1.get_backend() is None:
                return "no libusb-1.0 found: no devices will be seen"
        except Exception as exc:
            return f"pyusb unusable: {exc!r}"
        return None

    async def scan(self) -> list[UsbSighting]:
        return await asyncio.to_thread(self._scan)

    def _scan(self) -> list[UsbSighting]:
        import usb.core  # noqa: PLC0415 - optional at import time

        found = usb.core.find(find_all=True, idVendor=APPLE_VID, backend=self._backend)
        sightings: list[UsbSighting] = []
        seen: set[tuple[str, int | None, int]] = set()
        for dev in found:
            try:
                sighting = self._sighting(dev, seen)
            except Exception as exc:
                log.warning("usb_pyusb_bad_device", device=repr(dev), error=repr(exc))
                continue
            if sighting is not None:
                sightings.append(sighting)
        for key in self._serials.keys() - seen:
            del self._serials[key]
        return sightings

    def _sighting(self, dev: Any, seen: set[tuple[str, int | None, int]]) -> UsbSighting | None:
        ports = dev.port_numbers
        bus = dev.bus
        if not ports or bus is None:
            return None  # a root hub, or a backend that cannot tell ports (then no path either)
        usb_path = f"{int(bus)}-" + ".".join(str(int(p)) for p in ports)
        pid = int(dev.idProduct)
        address = int(dev.address) if dev.address is not None else None
        key = (usb_path, address, pid)
        seen.add(key)
        if key not in self._serials:
            self._serials[key] = self._read_serial(dev, usb_path) if classify_pid(APPLE_VID, pid) else None
        return UsbSighting(usb_path, APPLE_VID, pid, self._serials[key], int(bus), address)

    @staticmethod
    def _read_serial(dev: Any, usb_path: str) -> str | None:
        import usb.core  # noqa: PLC0415
        import usb.util  # noqa: PLC0415

        try:
            serial = dev.serial_number
        except (usb.core.USBError, ValueError, NotImplementedError) as exc:
            log.warning("usb_pyusb_serial_unreadable", usb_path=usb_path, error=str(exc))
            return None
        finally:
            try:
                usb.util.dispose_resources(dev)
            except Exception as exc:
                log.debug("usb_pyusb_dispose_failed", usb_path=usb_path, error=repr(exc))
        if not isinstance(serial, str):
            return None
        return serial.strip() or None


class PollingHotplug:
    """Hotplug by enumerating every `interval` seconds and diffing (see the module docstring)."""

    def __init__(
        self, enumerator: UsbEnumerator, *, interval: float = 1.0, reason: str | None = None
    ) -> None:
        self.enumerator = enumerator
        self.interval = interval
        self.name = f"poll-{enumerator.name}"
        self.description = f"polling {enumerator.description} every {interval:g} s" + (
            f" ({reason})" if reason else ""
        )
        self.devices = DeviceMap()
        self._failures = 0

    @property
    def present(self) -> Mapping[str, UsbEvent]:
        return self.devices.present

    async def poll_once(self) -> list[UsbEvent]:
        """One enumeration and its difference to the last; raises if the enumeration failed (the
        map is left as it was)."""
        sightings = await self.enumerator.scan()
        return self.devices.sync(sightings)

    async def events(self) -> AsyncIterator[UsbEvent]:
        while True:
            try:
                events = await self.poll_once()
            except Exception as exc:
                delay = max(self.interval, backoff_delay(self._failures))
                self._failures += 1
                log.warning("usb_poll_failed", source=self.name, error=repr(exc), retry_in=round(delay, 1))
                await asyncio.sleep(delay)
                continue
            self._failures = 0
            for event in events:
                yield event
            await asyncio.sleep(self.interval)


# --------------------------------------------------------------------------------------------- choice


def udev_problem(
    *, platform: str = sys.platform, udev_control: str | os.PathLike[str] = UDEV_CONTROL
) -> str | None:
    """Why udev hotplug cannot work here, or None if it should (the netlink socket itself is tried by
    `open_hotplug`)."""
    if not platform.startswith("linux"):
        return f"udev is Linux-only (platform {platform})"
    try:
        import pyudev  # noqa: F401, PLC0415
    except ImportError:
        return "pyudev is not installed"
    except Exception as exc:  # pyudev raises ImportError subclasses, but libudev loading may differ
        return f"pyudev unusable: {exc!r}"
    if not os.path.exists(udev_control):
        return f"udevd is not running ({os.fspath(udev_control)} missing), so no udev events would arrive"
    return None


def open_hotplug(
    *,
    prefer: Literal["auto", "udev", "poll"] = "auto",
    sysfs_root: str | os.PathLike[str] = SYSFS_USB_DEVICES,
    interval: float = 1.0,
    platform: str = sys.platform,
    udev_control: str | os.PathLike[str] = UDEV_CONTROL,
) -> UdevHotplug | PollingHotplug:
    """The best hotplug source here: udev when on Linux with udevd running and a netlink socket
    allowed, else polling sysfs when it is readable, else polling pyusb. Never raises; `prefer="udev"`
    that cannot be honoured falls back (and logs why), `prefer="poll"` skips udev."""
    sysfs = UsbSysfs(sysfs_root)
    reason: str | None = None
    if prefer != "poll":
        reason = udev_problem(platform=platform, udev_control=udev_control)
        if reason is None:
            try:
                return UdevHotplug(sysfs=sysfs, monitor=open_udev_monitor())
            except Exception as exc:
                reason = f"netlink monitor refused: {exc!r}"
        log_fn = log.warning if prefer == "udev" else log.info
        log_fn("usb_hotplug_udev_unavailable", reason=reason)
    if sysfs.available():
        return PollingHotplug(SysfsEnumerator(sysfs), interval=interval, reason=reason)
    problem = PyusbEnumerator.backend_problem()
    reason = "; ".join(r for r in (reason, f"{sysfs.root} unreadable", problem) if r)
    return PollingHotplug(PyusbEnumerator(), interval=interval, reason=reason)
