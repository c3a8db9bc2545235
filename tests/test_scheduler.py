"""The scheduler: fair slots per USB controller, no starvation, places in line, Apple's pace."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from daemon.config import SchedulerConfig, StepPolicy
from daemon.models import PortRef, ordinal
from daemon.sim.devices import SimDevice, make_device
from daemon.station import build_sim_world
from daemon.workflow.phases import Phase
from daemon.workflow.scheduler import (
    STATION_DOMAIN,
    FairPool,
    Queued,
    RateLimiter,
    Resource,
    Scheduler,
    controller_of,
)
from tests.conftest import eventually, running, station_config
from tests.mqtt_broker import Mosquitto

USB = frozenset({Resource.USB_BANDWIDTH})


def test_a_ports_domain_is_its_usb_bus() -> None:
    assert controller_of("3-2.4") == "usb3"
    assert controller_of("11-1.2.1") == "usb11"
    assert controller_of(None) == STATION_DOMAIN
    assert controller_of("garbage") == STATION_DOMAIN


def test_ordinals() -> None:
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 111)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st", "111th",
    ]  # fmt: skip


class Recorder:
    """Waiters that take a pool's slots and hold them until told to let go."""

    def __init__(self, pool: FairPool) -> None:
        self.pool = pool
        self.order: list[str] = []
        self.places: dict[str, list[Queued]] = {}
        self.release: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, needs: tuple[str, ...], key: float) -> None:
        self.release[name] = asyncio.Event()
        self.places[name] = []
        self.tasks[name] = asyncio.create_task(self._hold(name, needs, key))

    async def _hold(self, name: str, needs: tuple[str, ...], key: float) -> None:
        await self.pool.acquire(needs, key, self.places[name].append)
        self.order.append(name)
        try:
            await self.release[name].wait()
        finally:
            self.pool.release(needs)

    async def finish(self, name: str) -> None:
        self.release[name].set()
        await self.tasks[name]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_waiters_are_served_first_plugged_first_served_not_in_asking_order() -> None:
    caps = {"usb1": 1}
    rec = Recorder(FairPool(caps.__getitem__))
    rec.start("holder", ("usb1",), key=0)
    await settle()
    # They ask in the order c, a, b; they were plugged in the order a, b, c.
    rec.start("c", ("usb1",), key=3)
    rec.start("a", ("usb1",), key=1)
    rec.start("b", ("usb1",), key=2)
    await settle()
    assert rec.order == ["holder"]
    assert rec.places["a"][-1] == Queued(1, "usb1", 1, 1)
    assert rec.places["b"][-1].position == 2
    assert rec.places["c"][-1].position == 3
    for name in ("holder", "a", "b", "c"):
        await rec.finish(name)
    assert rec.order == ["holder", "a", "b", "c"]
    # c was told its place whenever it changed: 1st when it asked, pushed back as a and b (plugged
    # before it) asked, then forward as the line moved; and None when its turn came.
    assert [p.position if p else None for p in rec.places["c"]] == [1, 2, 3, 2, 1, None]


async def test_a_full_controller_does_not_hold_up_another() -> None:
    caps = {"usb1": 1, "usb2": 1}
    rec = Recorder(FairPool(caps.__getitem__))
    rec.start("on-1", ("usb1",), key=0)
    rec.start("waits-for-1", ("usb1",), key=1)
    rec.start("on-2", ("usb2",), key=2)
    await settle()
    assert rec.order == ["on-1", "on-2"]  # no head-of-line blocking across controllers
    await rec.finish("on-1")
    await settle()
    assert rec.order == ["on-1", "on-2", "waits-for-1"]
    await rec.finish("on-2")
    await rec.finish("waits-for-1")


async def test_an_earlier_waiter_is_never_overtaken_on_a_resource_it_waits_for() -> None:
    """`early` needs a station-wide slot and usb1; usb1 has room all along. Later waiters that need
    only usb1 must not take the usb1 slots `early` will need the moment its other slot frees, or it
    could wait forever while usb1 stays busy with later ports."""
    caps = {"usb1": 2, "step:update": 1}
    rec = Recorder(FairPool(caps.__getitem__))
    rec.start("holder", ("step:update",), key=0)
    rec.start("early", ("step:update", "usb1"), key=1)
    await settle()
    rec.start("late", ("usb1",), key=2)
    await settle()
    assert rec.order == ["holder"]
    assert rec.places["late"][-1].position == 2  # behind `early` for usb1
    await rec.finish("holder")
    await settle()
    assert rec.order == ["holder", "early", "late"]  # both fit on usb1 (2 slots)
    await rec.finish("early")
    await rec.finish("late")


async def test_a_cancelled_waiter_leaves_the_line_and_a_holders_cancellation_frees_its_slot() -> None:
    caps = {"usb1": 1}
    pool = FairPool(caps.__getitem__)
    rec = Recorder(pool)
    rec.start("holder", ("usb1",), key=0)
    rec.start("quitter", ("usb1",), key=1)
    rec.start("patient", ("usb1",), key=2)
    await settle()
    rec.tasks["quitter"].cancel()
    await settle()
    assert rec.places["patient"][-1].position == 1
    rec.tasks["holder"].cancel()  # a step cancelled mid-restore (unplug, shutdown)
    await settle()
    assert rec.order == ["holder", "patient"]
    await rec.finish("patient")
    assert [(s.resource, s.busy, s.waiting) for s in pool.status()] == [("usb1", 0, 0)]


async def test_the_scheduler_holds_restores_to_the_controllers_cap() -> None:
    domains = {PortRef("a", n): "usb1" for n in range(1, 7)} | {PortRef("b", 1): "usb2"}
    scheduler = Scheduler(
        SchedulerConfig(restores_per_controller=2, controllers={"usb2": 1}, transfer_spacing=0),
        {"update": StepPolicy(timeout=10)},
        domains.__getitem__,
    )
    running: dict[str, int] = {"usb1": 0, "usb2": 0}
    most: dict[str, int] = {"usb1": 0, "usb2": 0}

    async def restore(ref: PortRef, key: float) -> None:
        domain = domains[ref]
        async with scheduler.slot("update", USB, ref, plugged_at=key, on_queued=lambda _q: None):
            running[domain] += 1
            most[domain] = max(most[domain], running[domain])
            await asyncio.sleep(0.01)
            running[domain] -= 1

    await asyncio.gather(*(restore(ref, i) for i, ref in enumerate(domains)))
    assert most == {"usb1": 2, "usb2": 1}
    assert all(s.busy == 0 and s.waiting == 0 for s in scheduler.status())


async def test_light_steps_and_station_wide_caps() -> None:
    scheduler = Scheduler(
        SchedulerConfig(),
        {"erase": StepPolicy(timeout=10, concurrency=1), "setup": StepPolicy(timeout=10)},
        lambda ref: "usb1",
    )
    ref = PortRef("a", 1)
    assert scheduler.needs("setup", frozenset(), ref) == ()
    assert scheduler.needs("erase", frozenset(), ref) == ("step:erase",)
    assert scheduler.needs("update", USB, ref) == ("usb1", "bus:usb1")
    places: list[Queued] = []
    async with scheduler.slot("erase", frozenset(), ref, plugged_at=0, on_queued=places.append):
        waiter = asyncio.create_task(
            _enter(
                scheduler.slot("erase", frozenset(), PortRef("a", 2), plugged_at=1, on_queued=places.append)
            )
        )
        await settle()
        assert not waiter.done()
        assert places[-1].describe() == "queued: 1st in line for the station's erase slots (1/1 busy)"
    await waiter


async def _enter(slot: object) -> None:
    async with slot:  # type: ignore[attr-defined]
        pass


async def test_bus_shares_are_spaced_and_handed_back_when_the_transfer_is_done() -> None:
    """Restores start on one controller's bus at least `transfer_spacing` apart, hold the bus only
    until their transfer is done, and keep their restore slot to the end."""
    scheduler = Scheduler(
        SchedulerConfig(restores_per_controller=3, transfers_per_controller=1, transfer_spacing=0.05),
        {},
        lambda ref: "usb1",
    )
    granted: dict[int, float] = {}
    transferred: dict[int, asyncio.Event] = {n: asyncio.Event() for n in range(1, 4)}
    finish = asyncio.Event()

    async def restore(n: int) -> None:
        async with scheduler.slot(
            "update", USB, PortRef("a", n), plugged_at=n, on_queued=lambda _q: None
        ) as lease:
            granted[n] = time.monotonic()
            await transferred[n].wait()
            lease.transfer_done()
            await finish.wait()

    tasks = [asyncio.create_task(restore(n)) for n in range(1, 4)]
    await settle()
    assert list(granted) == [1]  # one bus share: the others wait for it
    transferred[1].set()
    await eventually(lambda: 2 in granted, "the second restore on the bus")
    transferred[2].set()
    await eventually(lambda: 3 in granted, "the third restore on the bus")
    assert granted[3] - granted[2] >= 0.05 * 0.99  # spaced, although the share was free at once
    status = {s.resource: s.busy for s in scheduler.status()}
    assert status == {"usb1": 3, "bus:usb1": 1}  # three restore slots held, one transfer
    transferred[3].set()
    finish.set()
    await asyncio.gather(*tasks)
    assert {s.resource: s.busy for s in scheduler.status()} == {"usb1": 0, "bus:usb1": 0}


def test_a_restore_slot_reads_well() -> None:
    assert (
        Queued(3, "usb2", 10, 10).describe() == "queued: 3rd in line for a restore slot on usb2 (10/10 busy)"
    )


async def test_the_rate_limiter_paces_calls_after_its_burst() -> None:
    limiter = RateLimiter(rate=50, burst=2)
    start = time.monotonic()
    for _ in range(12):
        await limiter.wait()
    # Two at once, then ten at 50 a second: at least 0.2 s, however fast the machine.
    assert time.monotonic() - start >= 10 / 50 * 0.95


async def test_the_rate_limiter_serves_concurrent_callers_in_order() -> None:
    limiter = RateLimiter(rate=200, burst=1)
    order: list[int] = []

    async def call(i: int) -> None:
        await limiter.wait()
        order.append(i)

    await asyncio.gather(*(call(i) for i in range(8)))
    assert order == list(range(8))


def test_the_rate_limiter_refuses_a_nonsense_rate() -> None:
    with pytest.raises(ValueError, match="rate must be positive"):
        RateLimiter(0)


# --- on a running station ----------------------------------------------------------------------


def _old_device(index: int) -> SimDevice:
    """A device that supports iOS 18 and runs 17.0: it needs a restore."""
    device = make_device(seed=3, index=index, minimum_major=18)
    device.ios_version, device.build = "17.0", "21A329"
    return device


async def test_restores_queue_first_plugged_first_served_within_the_controllers_cap(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Six devices needing a restore on one controller capped at 2: never more than 2 restore at
    once, the others show their place in line, and slots go in the order the devices came."""
    config = station_config(
        tmp_path,
        mosquitto,
        devices=0,
        ports=6,
        workflow={"minimum_ios": "18.0", "steps": ["update"]},
        sim={"restore_gb": 1.0},
    )
    config = config.model_copy(
        update={"scheduler": config.scheduler.model_copy(update={"restores_per_controller": 2})}
    )
    world = build_sim_world(config)
    refs = [PortRef("hub-a", n) for n in range(1, 7)]
    details: set[str] = set()
    queued: set[int] = set()  # ports seen with a place in line (`PortState.queue`)
    started: set[int] = set()  # ports seen told their turn had come, their place cleared
    served: list[int] = []  # ports in the order their restores got a slot
    most_restoring = 0

    def after_commit() -> None:
        """Called by the store after every commit: sees each port state change, in order."""
        nonlocal most_restoring
        restoring = 0
        for state in station.store.ports():
            if state.phase is not Phase.UPDATING or state.detail is None:
                continue
            if state.queue is not None:
                assert state.detail == state.queue.describe()
                details.add(state.detail)
                queued.add(state.ref.port)
                continue
            if state.detail == "starting":
                started.add(state.ref.port)
            assert not state.detail.startswith("queued:"), "a queued port without its place in line"
            restoring += 1
            if state.ref.port not in served:
                served.append(state.ref.port)
        most_restoring = max(most_restoring, restoring)

    async with running(config, world) as station:
        station.store.subscribe(after_commit)
        # Something else holds both of usb1's slots until all six wait, so the order in which they
        # asked (detection times vary) cannot decide who goes first: only when they were plugged.
        pool = station.scheduler.pool
        for _ in range(2):
            await pool.acquire(("usb1",), -1.0, lambda _q: None)
        for i, ref in enumerate(reversed(refs)):  # plugged from the last port to the first
            world.plug(ref, _old_device(i))
            await asyncio.sleep(0.05)
        await eventually(lambda: pool.status()[0].waiting == 6, "all six in line")
        pool.release(("usb1",))
        pool.release(("usb1",))
        await eventually(
            lambda: all(s.phase is Phase.DONE for s in station.store.ports()), "all six restored", within=60
        )
        plugged = sorted(refs, key=lambda ref: station.runners[ref]._plugged_at)
    order = [r.port for r in plugged]
    assert order == [6, 5, 4, 3, 2, 1]
    assert served == order  # first plugged, first served, whoever asked or finished first
    assert most_restoring == 2
    assert queued == started == {1, 2, 3, 4, 5, 6}
    assert "queued: 1st in line for a restore slot on usb1 (2/2 busy)" in details, details
    assert "queued: 6th in line for a restore slot on usb1 (2/2 busy)" in details, details
