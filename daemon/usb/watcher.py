"""Which iOS device is on which USB path, from usbmuxd and USB hotplug together.

`DeviceWatcher(usbmux, hotplug, sysfs).events()` is the station's device stream
(`DeviceSeen` / `DeviceGone` of `daemon.ios.base`), keyed by USB path (sysfs naming, `3-2.4.1`):

* usbmuxd is authoritative for normal mode (it brings the UDID). An `Attached` is placed on a path
  by its LocationID through sysfs (`(bus << 16) | devnum`), retried for `resolve_timeout` seconds
  because usbmuxd can report a device before sysfs (or our poll) shows it; failing that, by a
  hotplug-known path whose USB serial is the UDID without hyphen (the only way on hosts without
  sysfs). A `Detached` ends the device on the path its `Attached` was placed on (DeviceID -> path).
* Hotplug is authoritative for Recovery/DFU (not usbmuxd devices): `added` there is a
  `DeviceSeen(path, mode, udid=None, ecid)`, `removed` a `DeviceGone`. A normal-mode `added` emits
  nothing by itself; it records the path's serial/ECID for the correlation above.

Every path is canonical, the USB 2 side's (`UsbSysfs.canonical_path`): a device running at
SuperSpeed under a USB 3 hub is enumerated on the hub's SuperSpeed half (`4-2.4`) but reported on
the port's USB 2 path (`3-2.4`), the one the topology knows, so its port does not change when the
device drops to high speed (Recovery, DFU). A usbmuxd device is canonicalised here when it is placed;
hotplug events arrive canonical from their source (which must remember the path for a removal,
after sysfs is gone). Without sysfs (macOS) paths are what libusb reports.

Each path has one wanted state, derived after every input: the newest usbmuxd device placed there,
else a Recovery/DFU device hotplug reports there, else nothing. Only changes are emitted:

* the same `DeviceSeen` is never emitted twice in a row for a path;
* a different device or mode on a path (normal -> Recovery, a swap, a new UDID or ECID) is a
  `DeviceGone` then the new `DeviceSeen`; a `DeviceSeen` that only adds an ECID comes without `Gone`;
* a usbmuxd that restarts with new DeviceIDs (a new process) shows as `Detached` + `Attached`, so as
  `DeviceGone` + `DeviceSeen` for the same UDID and path, which the station treats as a
  re-enumeration: acceptable (and honest: we cannot tell it from a fast replug). A reconnect to the
  same usbmuxd emits nothing (`UsbmuxClient` reconciles its Listen burst).
* While usbmuxd still reports a device on a path, a hotplug `removed` there does not end it (the
  Detached will); while hotplug still reports a Recovery device, a late `Detached` goes straight to
  `Gone` + `Seen(recovery)`.

Both sources run as tasks of a TaskGroup inside the generator, feeding one queue; the generator body
alone changes the state, so no locks. A source that raises (or ends) is logged and restarted after
`backoff_delay`; nothing propagates out of the stream except cancellation. Each usbmuxd `Attached`
is placed by a task of its own, so a device that cannot be placed yet (sysfs lags) holds up no other
device. Its `Detached` keeps the order: if the placement is still running it is cancelled and the
device is never reported (it came and went before it could be tied to a port: a flaky cable, a
reboot right after attaching); if it has finished, the `Detached` is queued after its `_Placed`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import structlog

from daemon.backoff import backoff_delay
from daemon.ios.base import DeviceEvent, DeviceGone, DeviceMode, DeviceSeen
from daemon.usb.apple import APPLE_VID, AppleUsbError, ecid_from_udid, format_ecid
from daemon.usb.hotplug import HotplugSource, UsbAction, UsbEvent
from daemon.usb.sysfs import UsbSysfs, split_location_id
from daemon.usb.usbmux import UsbmuxAttached, UsbmuxClient, UsbmuxDetached

__all__ = ["DeviceWatcher"]

log = structlog.get_logger("benchhub.usb")

_NOT_ON_USBMUX: Final = (DeviceMode.RECOVERY, DeviceMode.DFU)


def _bare(udid_or_serial: str) -> str:
    """A UDID or a normal-mode USB serial, comparable to the other (no hyphen, upper case)."""
    return udid_or_serial.replace("-", "").strip().upper()


def _ecid_of_udid(udid: str) -> str | None:
    try:
        ecid = ecid_from_udid(udid)
        return format_ecid(ecid) if ecid is not None else None
    except AppleUsbError:
        return None


@dataclass(frozen=True, slots=True)
class _Placed:
    """A usbmuxd `Attached`, and the USB path it was placed on (None: could not be placed)."""

    attached: UsbmuxAttached
    usb_path: str | None


_Item = _Placed | UsbmuxDetached | UsbEvent


class DeviceWatcher:
    def __init__(
        self,
        usbmux: UsbmuxClient,
        hotplug: HotplugSource,
        sysfs: UsbSysfs,
        *,
        resolve_timeout: float = 2.0,
        resolve_interval: float = 0.05,
        backoff: Callable[[int], float] = backoff_delay,
    ) -> None:
        self.usbmux = usbmux
        self.hotplug = hotplug
        self.sysfs = sysfs
        self.resolve_timeout = resolve_timeout
        self.resolve_interval = resolve_interval
        self.backoff = backoff
        self._mux: dict[int, tuple[str, str]] = {}
        """DeviceID -> (usb path, UDID) of the usbmuxd devices placed on a path (insertion order)."""
        self._usb: dict[str, UsbEvent] = {}
        """usb path -> the last hotplug `added` there (identity for correlation, Recovery/DFU)."""
        self._last: dict[str, DeviceSeen] = {}
        """What was last emitted per path (absent: nothing, or a `DeviceGone`)."""
        self._placing: dict[int, asyncio.Task[None]] = {}
        """DeviceID -> its placement task, while it runs."""
        self._group: asyncio.TaskGroup | None = None
        self.restarts: dict[str, int] = {"usbmux": 0, "hotplug": 0}
        """How often each source was restarted after failing or ending (for tests and doctor)."""

    @property
    def present(self) -> dict[str, DeviceSeen]:
        """The devices as last reported, by path."""
        return dict(self._last)

    # -- the stream -------------------------------------------------------------------------------

    async def events(self) -> AsyncGenerator[DeviceEvent, None]:
        """Devices present (as `DeviceSeen`), then changes, forever; close with `aclose()`."""
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        async with asyncio.TaskGroup() as group:
            self._group = group
            pumps = [
                group.create_task(self._pump("usbmux", self.usbmux.events, self._route_usbmux, queue)),
                group.create_task(self._pump("hotplug", self.hotplug.events, _identity, queue)),
            ]
            try:
                while True:
                    item = await queue.get()
                    try:
                        out = self._handle(item)
                    except Exception as exc:  # a bug here must not end the station's device stream
                        log.exception("usb_watcher_event_failed", item=repr(item), error=repr(exc))
                        continue
                    for event in out:
                        yield event
            except GeneratorExit:
                # aclose(): end cleanly, so the TaskGroup sees no exception (it would wrap
                # GeneratorExit in a BaseExceptionGroup) and only cancels the pumps.
                pass
            finally:
                for task in [*pumps, *self._placing.values()]:
                    task.cancel()
                self._placing.clear()

    async def _pump(
        self,
        name: str,
        open_stream: Callable[[], AsyncIterator[Any]],
        convert: Callable[[Any, asyncio.Queue[_Item]], Awaitable[_Item | None]],
        queue: asyncio.Queue[_Item],
    ) -> None:
        """Run one source forever: restart it (after backoff) when it raises or ends."""
        failures = 0
        while True:
            stream: AsyncIterator[Any] | None = None
            try:
                stream = open_stream()
                async for raw in stream:
                    failures = 0
                    item = await convert(raw, queue)
                    if item is not None:
                        queue.put_nowait(item)
                log.warning("usb_watcher_source_ended", source=name)
            except Exception as exc:
                log.warning("usb_watcher_source_failed", source=name, error=repr(exc))
            finally:
                close = getattr(stream, "aclose", None)
                if close is not None:
                    try:
                        await close()
                    except Exception as exc:
                        log.debug("usb_watcher_source_close_failed", source=name, error=repr(exc))
            delay = self.backoff(failures)
            failures += 1
            self.restarts[name] += 1
            log.info("usb_watcher_source_restart", source=name, retry_in=round(delay, 2))
            await asyncio.sleep(delay)

    # -- placing usbmuxd devices ------------------------------------------------------------------

    async def _route_usbmux(self, event: object, queue: asyncio.Queue[_Item]) -> _Item | None:
        """A `Detached` goes straight to the queue (or cancels its device's placement); an `Attached`
        starts a placement that queues a `_Placed` when done."""
        if isinstance(event, UsbmuxDetached):
            placing = self._placing.pop(event.device_id, None)
            if placing is None:
                return event
            placing.cancel()
            log.info("usb_watcher_device_left_unplaced", device_id=event.device_id)
            return None
        if isinstance(event, UsbmuxAttached):
            assert self._group is not None
            if (stale := self._placing.pop(event.device_id, None)) is not None:
                stale.cancel()  # a restarted usbmuxd reuses DeviceIDs
            self._placing[event.device_id] = self._group.create_task(self._place(event, queue))
        return None

    async def _place(self, event: UsbmuxAttached, queue: asyncio.Queue[_Item]) -> None:
        try:
            path = await self.locate(event)
        except Exception as exc:
            log.warning("usb_watcher_locate_failed", udid=event.udid, error=repr(exc))
            path = None
        if path is None:
            log.warning(
                "usb_watcher_device_unplaced",
                udid=event.udid,
                device_id=event.device_id,
                location_id=f"0x{event.location_id:x}",
            )
        if self._placing.get(event.device_id) is asyncio.current_task():
            del self._placing[event.device_id]
            queue.put_nowait(_Placed(event, path))

    async def locate(self, attached: UsbmuxAttached) -> str | None:
        """The USB path of a usbmuxd device: by LocationID in sysfs (retried until `resolve_timeout`,
        sysfs may lag usbmuxd), else by a hotplug-known path whose serial is the UDID."""
        use_sysfs = attached.location_id > 0 and self.sysfs.available()
        deadline = time.monotonic() + self.resolve_timeout
        while True:
            path = self._by_location(attached) if use_sysfs else self._by_serial(attached.udid)
            if path is not None or time.monotonic() >= deadline:
                break
            await asyncio.sleep(self.resolve_interval)
        return path if path is not None else self._by_serial(attached.udid)

    def _by_location(self, attached: UsbmuxAttached) -> str | None:
        try:
            bus, devnum = split_location_id(attached.location_id)
        except ValueError:
            return None
        device = self.sysfs.find_location(bus, devnum)
        if device is None or device.vendor_id != APPLE_VID:
            return None
        if device.serial and _bare(device.serial) != _bare(attached.udid):
            return None  # a stale LocationID now naming another device (devnums are reused)
        return self.sysfs.canonical_path(device.name)

    def _by_serial(self, udid: str) -> str | None:
        wanted = _bare(udid)
        matches = [
            path
            for path, seen in self.hotplug.present.items()
            if seen.mode is DeviceMode.NORMAL and seen.serial is not None and _bare(seen.serial) == wanted
        ]
        return sorted(matches)[0] if matches else None

    # -- state ------------------------------------------------------------------------------------

    def _handle(self, item: _Item) -> list[DeviceEvent]:
        if isinstance(item, _Placed):
            path = item.usb_path
            if path is None:
                return []
            attached = item.attached
            self._mux.pop(attached.device_id, None)  # re-inserted last: the newest on its path wins
            self._mux[attached.device_id] = (path, attached.udid)
            return self._update(path)
        if isinstance(item, UsbmuxDetached):
            placed = self._mux.pop(item.device_id, None)
            return self._update(placed[0]) if placed is not None else []
        if item.action is UsbAction.ADDED:
            self._usb[item.usb_path] = item
        else:
            self._usb.pop(item.usb_path, None)
        return self._update(item.usb_path)

    def _wanted(self, path: str) -> DeviceSeen | None:
        usb = self._usb.get(path)
        udid = next((u for p, u in reversed(self._mux.values()) if p == path), None)
        if udid is not None:
            ecid = _ecid_of_udid(udid)
            if (
                ecid is None
                and usb is not None
                and usb.mode is DeviceMode.NORMAL
                and usb.udid is not None
                and _bare(usb.udid) == _bare(udid)
            ):
                ecid = usb.ecid_hex
            return DeviceSeen(path, DeviceMode.NORMAL, udid=udid, ecid=ecid)
        if usb is not None and usb.mode in _NOT_ON_USBMUX:
            return DeviceSeen(path, usb.mode, udid=None, ecid=usb.ecid_hex)
        return None

    def _update(self, path: str) -> list[DeviceEvent]:
        new, old = self._wanted(path), self._last.get(path)
        if new == old:
            return []
        out: list[DeviceEvent] = []
        if old is not None and (new is None or not _same_device(old, new)):
            out.append(DeviceGone(path))
        if new is None:
            del self._last[path]
        else:
            self._last[path] = new
            out.append(new)
        return out


def _same_device(old: DeviceSeen, new: DeviceSeen) -> bool:
    """Whether `new` only refines `old` (same mode and UDID, no conflicting ECID)."""
    if (old.mode, old.udid) != (new.mode, new.udid):
        return False
    return old.ecid is None or new.ecid is None or old.ecid == new.ecid


async def _identity(event: UsbEvent, _queue: object) -> UsbEvent:
    return event
