"""`benchhub ports learn`: walk one iPhone across the bench and record each port's USB path.

Why: which USB path a physical port has depends on the hub's internal chips and on how the bench is
cabled (which host port, which USB3 half, hubs behind hubs). Per-model tables and the hub's own
report cover the common cases; a measured map covers every case, including unmanaged multi-chip
hubs that report nothing. The result is a `daemon.usb.portmap` file the station's `Topology`
prefers over anything derived.

The flow, per configured hub and per port 1..n: ask for a device on that port, take the USB path of
the next `added` hotplug event, ask for it to be unplugged and wait for its `removed`, so the same
phone walks the bench. Enter skips a port, `q` (or end of input) finishes with what was learned.
Only iOS devices are reported by the hotplug sources, so the technician must use an iPhone or iPad.

Two layers, so the logic is tested without USB or a terminal:

* `PortLearner`: a state machine fed with `UsbEvent`s and input lines, answering with the lines to
  print. It rejects a path already learned for another port (or below one: a hub on that port), and
  a path the saved map gives a hub that is not being learned.
* `learn_ports()`: runs it on a `HotplugSource` and an async iterator of input lines. Devices
  already present at the start do not count: the source is primed with one enumeration first, so
  its stream reports only later changes (`prime`). `FdLines` reads lines from a file descriptor in
  a thread (works the same on a terminal, a pipe and a file) and stops it promptly when closed.
"""

from __future__ import annotations

import asyncio
import enum
import os
import select
import threading
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final

from daemon.models import PortRef
from daemon.usb.hotplug import (
    HotplugSource,
    PollingHotplug,
    SysfsEnumerator,
    UdevHotplug,
    UsbAction,
    UsbEvent,
)
from daemon.usb.portmap import PortMap, find_overlap


class LearnError(Exception):
    """The wizard cannot go on (USB devices cannot be listed, the event stream failed)."""


@dataclass(frozen=True, slots=True)
class HubToLearn:
    id: str
    ports: int
    usb_path: str | None = None
    """As configured; only compared with the learned paths' common parent in the summary."""


class Stage(enum.Enum):
    PLUG = "plug"
    """Waiting for a device to be plugged into the current port."""
    UNPLUG = "unplug"
    """A path was recorded for the current port; waiting for that device to leave."""
    DONE = "done"


def common_parent(paths: Iterable[str]) -> str | None:
    """The deepest USB path every path lies strictly below (`3-2.4.1`, `3-2.1` -> `3-2`): where the
    hub hangs, i.e. the `usb_path` to configure. None when there is none below a root hub (ports on
    different buses, as with a USB3 hub's two halves, or on the root hub itself)."""
    split = [p.split("-", 1) for p in paths]
    if not split or len({bus for bus, _ in split}) != 1:
        return None
    chains = [rest.split(".") for _, rest in split]
    common: list[str] = []
    for i in range(min(len(c) for c in chains) - 1):
        if len({c[i] for c in chains}) != 1:
            break
        common.append(chains[0][i])
    return f"{split[0][0]}-{'.'.join(common)}" if common else None


def describe(event: UsbEvent) -> str:
    """How the technician can tell which device was seen."""
    who = f"ECID {event.ecid_hex}" if event.ecid is not None else f"serial {event.serial or '?'}"
    return f"{event.mode} mode, {who}"


_PLUG_KEYS: Final = "Enter: skip this port, q: finish"
_UNPLUG_KEYS: Final = "Enter: leave it plugged and go on, r: wrong port, ask again, q: finish"


@dataclass
class PortLearner:
    """The wizard's state: which port is being asked and what was learned (see the module doc).

    Every `on_*` method returns the lines to show, ending with the next prompt when there is one."""

    hubs: Sequence[HubToLearn]
    fixed: Mapping[str, Mapping[int, str]] = field(default_factory=dict)
    """Saved ports of hubs not being learned now: their paths are taken, and stay so."""
    present: Iterable[str] = ()
    """Paths with a device at the start; an `added` there is ignored until it has been removed
    (for sources that report present devices as `added`; a primed source does not)."""

    learned: PortMap = field(init=False, default_factory=dict)
    skipped: list[PortRef] = field(init=False, default_factory=list)
    quit: bool = field(init=False, default=False)
    stage: Stage = field(init=False, default=Stage.PLUG)
    _order: list[PortRef] = field(init=False, default_factory=list)
    _index: int = field(init=False, default=0)
    _recorded: str | None = field(init=False, default=None)
    _baseline: set[str] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self._order = [PortRef(h.id, n) for h in self.hubs for n in range(1, h.ports + 1)]
        self._baseline = set(self.present)
        if not self._order:
            self.stage = Stage.DONE

    @property
    def current(self) -> PortRef | None:
        return self._order[self._index] if self.stage is not Stage.DONE else None

    @property
    def count(self) -> int:
        return sum(len(ports) for ports in self.learned.values())

    def prompt(self) -> str:
        ref = self.current
        if ref is None:
            return ""
        if self.stage is Stage.UNPLUG:
            return f"Unplug the device from {ref.hub} port {ref.port} ({_UNPLUG_KEYS})"
        return f"Plug a device into {ref.hub} port {ref.port} ({_PLUG_KEYS})"

    # -- inputs -----------------------------------------------------------------------------------

    def on_usb(self, event: UsbEvent) -> list[str]:
        ref = self.current
        if event.action is UsbAction.REMOVED:
            self._baseline.discard(event.usb_path)
            if ref is not None and self.stage is Stage.UNPLUG and event.usb_path == self._recorded:
                return [f"Unplugged from {ref.hub} port {ref.port}.", *self._advance()]
            return []
        if event.usb_path in self._baseline or ref is None:
            return []
        if self.stage is Stage.UNPLUG:
            return [
                f"Ignored a device on {event.usb_path}: unplug the one on {ref.hub} port {ref.port}"
                " first, then plug into the next port when asked.",
            ]
        problem = self._conflict(event.usb_path)
        if problem is not None:
            return [f"Not taken: {problem}", self.prompt()]
        self.learned.setdefault(ref.hub, {})[ref.port] = event.usb_path
        self._recorded = event.usb_path
        self.stage = Stage.UNPLUG
        return [f"{ref.hub} port {ref.port} is {event.usb_path} ({describe(event)}).", self.prompt()]

    def on_line(self, line: str) -> list[str]:
        ref = self.current
        if ref is None:
            return []
        answer = line.strip().lower()
        if answer in ("q", "quit"):
            return self._finish("Finishing.")
        if self.stage is Stage.PLUG and answer == "":
            self.skipped.append(ref)
            return [f"{ref.hub} port {ref.port}: skipped.", *self._advance()]
        if self.stage is Stage.UNPLUG and answer == "":
            return [f"Not waiting for the unplug; the device stays on {self._recorded}.", *self._advance()]
        if self.stage is Stage.UNPLUG and answer == "r":
            forgotten = self.learned[ref.hub].pop(ref.port)
            if not self.learned[ref.hub]:
                del self.learned[ref.hub]
            self._recorded = None
            self.stage = Stage.PLUG
            return [f"Forgot {forgotten} for {ref.hub} port {ref.port}.", self.prompt()]
        return [f"Unknown answer {line.strip()!r}.", self.prompt()]

    def on_eof(self) -> list[str]:
        """The input ended (Ctrl-D, a closed pipe): finish with what was learned."""
        return self._finish("Input closed; finishing.") if self.stage is not Stage.DONE else []

    # -- the rest ---------------------------------------------------------------------------------

    def _conflict(self, path: str) -> str | None:
        ref = self.current
        assert ref is not None
        clash = find_overlap(path, self.learned)
        if clash is not None:
            hub, port, other = clash
            if other == path:
                return (
                    f"{path} is already {hub} port {port}; is the device in that port again?"
                    f" Unplug it and plug it into {ref.hub} port {ref.port}."
                )
            return (
                f"{path} overlaps {hub} port {port} ({other}); is a hub in that port? Plug the device"
                f" straight into {ref.hub} port {ref.port}."
            )
        clash = find_overlap(path, self.fixed)
        if clash is not None:
            hub, port, other = clash
            return (
                f"{path} is {hub} port {port} ({other}) in the saved port map, and {hub} is not being"
                f" learned now (learn {hub} again if its cabling changed). Plug the device into"
                f" {ref.hub} port {ref.port}."
            )
        return None

    def _advance(self) -> list[str]:
        done = self._order[self._index]
        self._index += 1
        self._recorded = None
        out: list[str] = []
        last = self._index >= len(self._order)
        if last or self._order[self._index].hub != done.hub:
            hub = next(h for h in self.hubs if h.id == done.hub)
            out.append(f"{hub.id}: {len(self.learned.get(hub.id, {}))} of {hub.ports} ports learned.")
            if not last:
                nxt = self._order[self._index].hub
                out.append(f"Next hub: {nxt}.")
        if last:
            self.stage = Stage.DONE
            return out
        self.stage = Stage.PLUG
        out.append(self.prompt())
        return out

    def _finish(self, why: str) -> list[str]:
        self.quit = True
        self.stage = Stage.DONE
        return [why]

    def summary(self) -> list[str]:
        """Per hub: each port's path (or skipped / not learned) and the suggested `usb_path`."""
        lines = [f"Learned {self.count} port(s)."]
        skipped = set(self.skipped)
        for hub in self.hubs:
            ports = self.learned.get(hub.id, {})
            lines.append(f"{hub.id}: {len(ports)} of {hub.ports} ports learned")
            for n in range(1, hub.ports + 1):
                ref = PortRef(hub.id, n)
                what = ports.get(n) or ("skipped" if ref in skipped else "not learned")
                lines.append(f"  port {n:>2}  {what}")
            if ports:
                lines.append(f"  {self._suggestion(hub, list(ports.values()))}")
        return lines

    @staticmethod
    def _suggestion(hub: HubToLearn, paths: list[str]) -> str:
        parent = common_parent(paths)
        if parent is None:
            buses = {p.split("-", 1)[0] for p in paths}
            why = "they are on different USB buses (a USB3 hub's two halves?)" if len(buses) > 1 else ""
            return (
                f"no common parent path{': ' + why if why else ''}; usb_path only matters for ports"
                " not learned"
            )
        guess = " (from one port only: a guess)" if len(paths) == 1 else ""
        if hub.usb_path is None:
            config = "not configured"
        elif hub.usb_path == parent:
            config = "as configured"
        else:
            config = f'the config says "{hub.usb_path}"'
        return f'common parent {parent}{guess}: suggested usb_path = "{parent}" ({config})'


# ------------------------------------------------------------------------------------------- driving


async def prime(hotplug: HotplugSource) -> set[str]:
    """Enumerate once into the source's own device map, so that its `events()` stream then reports
    only what changes afterwards (both sources diff against that map), and return the paths with an
    iOS device now. For other sources, their `present` as it stands.

    The udev source is primed through `SysfsEnumerator` on the same sysfs, so the sightings are
    exactly what its own start-up scan will produce (same paths), and that scan then finds nothing
    new; anything that changes between the two is reported by the stream, as it should be."""
    try:
        if isinstance(hotplug, PollingHotplug):
            await hotplug.poll_once()
        elif isinstance(hotplug, UdevHotplug) and hotplug.sysfs.available():
            hotplug.devices.sync(await SysfsEnumerator(hotplug.sysfs).scan())
    except Exception as exc:
        raise LearnError(f"cannot list USB devices ({hotplug.name}): {exc}") from exc
    return set(hotplug.present)


@dataclass(frozen=True, slots=True)
class _Eof:
    pass


@dataclass(frozen=True, slots=True)
class _Failed:
    reason: str


_Item = UsbEvent | str | _Eof | _Failed


async def _pump_usb(hotplug: HotplugSource, queue: asyncio.Queue[_Item]) -> None:
    events = hotplug.events()
    try:
        async for event in events:
            queue.put_nowait(event)
        queue.put_nowait(_Failed(f"the USB event stream ({hotplug.description}) ended"))
    except Exception as exc:
        queue.put_nowait(_Failed(f"USB events failed ({hotplug.description}): {exc!r}"))
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


async def _pump_lines(lines: AsyncIterable[str], queue: asyncio.Queue[_Item]) -> None:
    async for line in lines:
        queue.put_nowait(line)
    queue.put_nowait(_Eof())


def intro(hubs: Sequence[HubToLearn], present: Iterable[str]) -> list[str]:
    names = ", ".join(f"{h.id} ({h.ports} ports)" for h in hubs)
    lines = [
        f"Learning the port map of {names}.",
        "Use an iPhone or iPad on a data cable: only iOS devices are seen, other USB devices are not.",
        "Plug it into each port when asked, unplug it when asked; the next port follows.",
    ]
    already = sorted(present)
    if already:
        lines.append(
            f"Ignoring {len(already)} iOS device(s) already plugged in ({', '.join(already)});"
            " unplug one and plug it in again to use it."
        )
    return lines


async def learn_ports(
    hubs: Sequence[HubToLearn],
    hotplug: HotplugSource,
    lines: AsyncIterable[str],
    say: Callable[[str], None],
    *,
    fixed: Mapping[str, Mapping[int, str]] | None = None,
) -> PortLearner:
    """Run the wizard to the end (every port asked, `q`, or end of input) and return the learner
    (`learned`, `skipped`, `quit`); the summary has been said. Raises LearnError when USB events
    cannot be had. Nothing is saved here: the caller decides (`portmap.save_port_map`)."""
    present = await prime(hotplug)
    learner = PortLearner(hubs, fixed=fixed or {}, present=present)
    for line in intro(hubs, present):
        say(line)
    queue: asyncio.Queue[_Item] = asyncio.Queue()
    tasks = [
        asyncio.create_task(_pump_usb(hotplug, queue)),
        asyncio.create_task(_pump_lines(lines, queue)),
    ]
    try:
        if learner.stage is not Stage.DONE:
            say(learner.prompt())
        while learner.stage is not Stage.DONE:
            item = await queue.get()
            if isinstance(item, _Failed):
                raise LearnError(item.reason)
            if isinstance(item, UsbEvent):
                out = learner.on_usb(item)
            elif isinstance(item, _Eof):
                out = learner.on_eof()
            else:
                out = learner.on_line(item)
            for text in out:
                say(text)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for text in learner.summary():
        say(text)
    return learner


class FdLines:
    """Lines read from a file descriptor (a terminal, a pipe, a file), as an async iterator.

    A thread does the reading, because a terminal cannot be read from the event loop portably
    (`connect_read_pipe` refuses regular files and would make a shared tty non-blocking, which
    breaks `print`). The thread waits with `select` in `poll_interval` steps and reads the raw
    descriptor (not `sys.stdin`, whose buffer lock a thread stuck at interpreter exit would hold), so
    `close()` ends it promptly and the caller may then close the descriptor safely. End of input
    ends the iteration. Use as a context manager, or call `close()`."""

    def __init__(self, fd: int, *, poll_interval: float = 0.1) -> None:
        self.fd = fd
        self.poll_interval = poll_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FdLines:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[str]:
        if self._thread is not None:
            raise RuntimeError("FdLines can be iterated only once")
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._thread = threading.Thread(
            target=self._read, args=(asyncio.get_running_loop(), queue), name="benchhub-input", daemon=True
        )
        self._thread.start()
        while (line := await queue.get()) is not None:
            yield line

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _read(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str | None]) -> None:
        def post(item: str | None) -> bool:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody listens any more
                return False
            return True

        pending = b""
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([self.fd], [], [], self.poll_interval)
                if not ready:
                    continue
                chunk = os.read(self.fd, 4096)
                if not chunk:
                    break
                *complete, pending = (pending + chunk).split(b"\n")
                for raw in complete:
                    if not post(raw.decode("utf-8", "replace").rstrip("\r")):
                        return
        except (OSError, ValueError):
            pass  # a closed or bad descriptor reads as the end of input
        if pending and not self._stop.is_set():
            post(pending.decode("utf-8", "replace").rstrip("\r"))
        post(None)
