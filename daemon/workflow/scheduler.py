"""Who may run a heavy step now.

Restores are the bench's bottleneck, and what they share is USB bandwidth: every port on one host
controller shares that controller's bus (a USB 2 controller carries 480 Mbit/s for all of its
devices, whatever the hubs below it). Field reports put the practical limit near 10 concurrent
restores per controller, with failures beyond it (and more on deep hub chains). So a step declares
the resources it needs (`Step.resources`), and the scheduler hands out:

* a **restore slot on the port's bandwidth domain** (`Resource.USB_BANDWIDTH`): the USB bus the
  port's path hangs off (`3-2.4` → `usb3`), capped at `scheduler.restores_per_controller`, or the
  controller's own cap in `scheduler.controllers`;
* with it, a **share of that bus** (`bus:usb3`, `scheduler.transfers_per_controller`), held only
  until the restore reports that its filesystem image has crossed USB
  (`daemon.ios.base.on_transfer_done`). Without it, restores started together share the bus
  fairly, so they all finish sending at the same moment and then all verify and flash on the
  device at once while the bus idles: in the simulated bench (`bench/throughput.py`) that wasted
  a quarter of the bus. Holding the bus to a few transfers at a time, handed out at least
  `scheduler.transfer_spacing` seconds apart on one controller, staggers the restores for good,
  so one restore's transfer overlaps the others' time on the device. A backend that never
  reports the end of its transfer keeps its share to the end: slower, never unsafe;
* a **station-wide slot** for a step whose policy sets `concurrency` (a cap across controllers,
  e.g. for the station's disk or CPU);
* a **pace for Apple's API** (`RateLimiter`): every request of the Apple clients waits for a token,
  so however many ports wait for Apple, the station stays under one request rate.

Light steps (detect, erase, setup, the Apple waits) need nothing and run freely.

**Fairness.** Waiters are served first plugged, first served: the key is when the port's device
was plugged in (since this daemon started), so a device whose restore failed and is retried keeps
its place ahead of devices plugged after it. A waiter never loses a resource it is waiting for to a
later waiter: while it waits, later waiters that need any of its resources wait behind it, so no
port is starved; later waiters on *other* controllers are not held up by it (no head-of-line
blocking across controllers). Waiting ports are told their place in line (`Queued`), which the
board and MQTT show.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final

from daemon.config import SchedulerConfig, StepPolicy
from daemon.models import PortRef, Queued

STATION_DOMAIN: Final = "station"
"""The bandwidth domain of a port whose USB path is unknown: one shared domain, the safe guess."""


class Resource(enum.Enum):
    USB_BANDWIDTH = "usb_bandwidth"
    """A restore slot on the port's bandwidth domain (its USB host controller)."""


def controller_of(usb_path: str | None) -> str:
    """The bandwidth domain of a USB path: its bus (`3-2.4` → `usb3`); the USB 2 bus for hubs with a
    USB 3 half, since paths reach here canonical (`daemon.usb.topology`)."""
    if not usb_path or "-" not in usb_path:
        return STATION_DOMAIN
    bus = usb_path.split("-", 1)[0]
    return f"usb{bus}" if bus.isdigit() else STATION_DOMAIN


@dataclass(frozen=True, slots=True)
class PoolStatus:
    resource: str
    busy: int
    capacity: int
    waiting: int


@dataclass(eq=False)
class _Waiter:
    key: tuple[float, int]
    needs: tuple[str, ...]
    on_queued: Callable[[Queued | None], None]
    granted: asyncio.Future[None]
    reported: Queued | None = None


@dataclass
class FairPool:
    """Named counters with capacities, served in key order (see the module docstring)."""

    capacity_of: Callable[[str], int]
    spacing_of: Callable[[str], float] = lambda _name: 0.0
    """Least seconds between two grants of one resource (0: none)."""
    clock: Callable[[], float] = time.monotonic
    _busy: dict[str, int] = field(default_factory=dict)
    _granted_at: dict[str, float] = field(default_factory=dict)
    _wakeup: asyncio.TimerHandle | None = None
    _waiters: list[_Waiter] = field(default_factory=list)
    _tiebreak: itertools.count[int] = field(default_factory=itertools.count)

    async def acquire(
        self, needs: tuple[str, ...], key: float, on_queued: Callable[[Queued | None], None]
    ) -> None:
        """Wait for one of each of `needs`, served in `key` order; `on_queued` hears the waiter's place
        in line whenever it changes, and None when a waiter that was told a place is served."""
        waiter = _Waiter(
            (key, next(self._tiebreak)), needs, on_queued, asyncio.get_running_loop().create_future()
        )
        self._waiters.append(waiter)
        self._waiters.sort(key=lambda w: w.key)
        self._serve()
        try:
            await waiter.granted
        except BaseException:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif waiter.granted.done() and not waiter.granted.cancelled():
                self.release(needs)  # granted just as it was cancelled: give the slots back
            self._serve()
            raise
        if waiter.reported is not None:
            on_queued(None)  # in the waiter's own task, not in the `release` that served it

    def release(self, needs: tuple[str, ...]) -> None:
        for name in needs:
            self._busy[name] -= 1
        self._serve()

    def status(self) -> list[PoolStatus]:
        names = set(self._busy) | {n for w in self._waiters for n in w.needs}
        return [
            PoolStatus(
                name,
                self._busy.get(name, 0),
                self.capacity_of(name),
                sum(name in w.needs for w in self._waiters),
            )
            for name in sorted(names)
        ]

    def _serve(self) -> None:
        held: set[str] = set()  # resources an earlier waiter is waiting for: reserved for it
        still: list[_Waiter] = []
        now = self.clock()
        soonest: float | None = None  # when a resource held back only by its spacing frees up
        for waiter in self._waiters:
            if held.isdisjoint(waiter.needs) and all(self._free(n) for n in waiter.needs):
                ready = max((self._spaced_until(n) for n in waiter.needs), default=now)
                if ready > now:
                    soonest = ready if soonest is None else min(soonest, ready)
                    held.update(waiter.needs)
                    still.append(waiter)
                    continue
                for name in waiter.needs:
                    self._busy[name] = self._busy.get(name, 0) + 1
                    self._granted_at[name] = now
                waiter.granted.set_result(None)
            else:
                held.update(waiter.needs)
                still.append(waiter)
        self._waiters = still
        for i, waiter in enumerate(still):
            self._tell(waiter, still[:i])
        if self._wakeup is not None:
            self._wakeup.cancel()
            self._wakeup = None
        if soonest is not None:
            self._wakeup = asyncio.get_running_loop().call_later(max(0.0, soonest - now), self._serve)

    def _free(self, name: str) -> bool:
        return self._busy.get(name, 0) < self.capacity_of(name)

    def _spaced_until(self, name: str) -> float:
        last = self._granted_at.get(name)
        return -math.inf if last is None else last + self.spacing_of(name)

    def _tell(self, waiter: _Waiter, ahead: list[_Waiter]) -> None:
        """Tell `waiter` its place for the first resource that holds it up."""
        for name in waiter.needs:
            before = sum(name in w.needs for w in ahead)
            if before or not self._free(name):
                place = Queued(before + 1, name, self._busy.get(name, 0), self.capacity_of(name))
                break
        else:  # pragma: no cover - a waiter with every resource free and nobody ahead is served
            return
        if place != waiter.reported:
            waiter.reported = place
            waiter.on_queued(place)


class RateLimiter:
    """A token bucket: at most `rate` calls a second on average, `burst` at once; callers wait their
    turn in order. `wait` fits httpx's request event hook, so every request of a client is paced."""

    def __init__(
        self, rate: float, burst: int | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, not {rate}")
        self.rate = rate
        self.burst = burst if burst is not None else max(1, int(rate))
        self._clock = clock
        self._tokens = float(self.burst)
        self._stamp = clock()
        self._lock = asyncio.Lock()

    async def wait(self, *_request: object) -> None:
        async with self._lock:
            while True:
                now = self._clock()
                self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await asyncio.sleep((1 - self._tokens) / self.rate)


class Lease:
    """The slots one step holds; `transfer_done` gives back the bus share early."""

    def __init__(self, pool: FairPool, needs: tuple[str, ...]) -> None:
        self._pool = pool
        self._held = list(needs)

    def transfer_done(self) -> None:
        """The restore's image has crossed USB: the bus is free for the next one; the restore slot
        stays held until the restore ends."""
        bus = tuple(name for name in self._held if name.startswith("bus:"))
        if bus:
            self._held = [name for name in self._held if name not in bus]
            self._pool.release(bus)

    def release(self) -> None:
        held, self._held = tuple(self._held), []
        if held:
            self._pool.release(held)


class Scheduler:
    """The station's one scheduler: runners ask it for a step's slots (`slot`)."""

    def __init__(
        self,
        config: SchedulerConfig,
        policies: Mapping[str, StepPolicy],
        domain_of: Callable[[PortRef], str],
        *,
        time_scale: float = 1.0,
    ) -> None:
        """`domain_of(ref)`: the port's bandwidth domain, asked at each request (a hub's port map can
        arrive after start-up). `time_scale`: how much faster than life the bench runs (a simulated
        bench's speed), which shortens the transfer spacing and quickens Apple's pace alike."""
        self.config = config
        self._time_scale = time_scale
        self._policies = policies
        self._domain_of = domain_of
        self.pool = FairPool(self._capacity, self._spacing)
        self.apple = RateLimiter(config.apple_requests_per_second * time_scale)
        """Paces every request to Apple's services (`daemon.applesetup`); in a simulated bench's time
        too, where Apple's polling intervals are compressed alike."""

    def _capacity(self, name: str) -> int:
        if name.startswith("step:"):
            cap = self._policies[name.removeprefix("step:")].concurrency
            assert cap is not None
            return cap
        if name.startswith("bus:"):
            return self.config.transfers_per_controller
        return self.config.controllers.get(name, self.config.restores_per_controller)

    def _spacing(self, name: str) -> float:
        return self.config.transfer_spacing / self._time_scale if name.startswith("bus:") else 0.0

    def needs(self, step: str, resources: frozenset[Resource], ref: PortRef) -> tuple[str, ...]:
        policy = self._policies.get(step)
        needs: list[str] = []
        if policy is not None and policy.concurrency is not None:
            needs.append(f"step:{step}")
        if Resource.USB_BANDWIDTH in resources:
            domain = self._domain_of(ref)
            needs += [domain, f"bus:{domain}"]
        return tuple(needs)

    @asynccontextmanager
    async def slot(
        self,
        step: str,
        resources: frozenset[Resource],
        ref: PortRef,
        *,
        plugged_at: float,
        on_queued: Callable[[Queued | None], None],
    ) -> AsyncIterator[Lease]:
        """Hold the step's slots while the body runs; waiting for them does not count against the
        step's timeout (the caller starts its clock inside)."""
        needs = self.needs(step, resources, ref)
        if needs:
            await self.pool.acquire(needs, plugged_at, on_queued)
        lease = Lease(self.pool, needs)
        try:
            yield lease
        finally:
            lease.release()

    def status(self) -> list[PoolStatus]:
        return self.pool.status()
