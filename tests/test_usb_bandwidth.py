"""The simulated bench's USB bandwidth model: fair shares, device caps, overload failures."""

from __future__ import annotations

import asyncio
import random

import pytest

from daemon.sim.usbbandwidth import MB, BusModel, Controller, OverloadError, UsbBandwidth

SPEED = 1000.0  # simulated seconds per real second


def controller(model: BusModel, seed: int = 1) -> Controller:
    return Controller("usb1", model, SPEED, random.Random(seed))


async def timed(ctrl: Controller, nbytes: float, delay: float = 0.0) -> float:
    """Simulated seconds from the start of the test until the transfer is done."""
    loop = asyncio.get_running_loop()
    start = loop.time() - delay / SPEED
    await asyncio.sleep(delay / SPEED)
    await ctrl.transfer(nbytes, lambda _f: None, tick=5.0)
    return (loop.time() - start) * SPEED


# Timings are simulated seconds measured on the real event loop: a busy machine makes them late,
# never early. So each test bounds them tightly from below (the physics) and loosely from above,
# with the two outcomes it tells apart far enough apart for a loaded CI machine.


async def test_one_transfer_runs_at_the_devices_own_rate() -> None:
    ctrl = controller(BusModel(controller_rate=40 * MB, device_rate=20 * MB))
    took = await timed(ctrl, 200 * MB)
    assert 9.9 <= took < 15  # 200 MB at 20 MB/s (10 s), not at the bus's 40 (5 s)


async def test_concurrent_transfers_share_the_controller() -> None:
    ctrl = controller(BusModel(controller_rate=40 * MB, device_rate=35 * MB))
    took = await asyncio.gather(*(timed(ctrl, 100 * MB) for _ in range(4)))
    # 400 MB over a 40 MB/s bus: 10 s (not 2.9 s at 35 MB/s each), all four together (fair shares).
    assert all(9.9 <= t < 15 for t in took), took
    assert max(took) - min(took) < 1.0
    assert ctrl.moved == pytest.approx(400 * MB, rel=0.01)


async def test_a_finished_transfer_leaves_its_share_to_the_others() -> None:
    ctrl = controller(BusModel(controller_rate=40 * MB, device_rate=40 * MB))
    short, long = await asyncio.gather(timed(ctrl, 100 * MB), timed(ctrl, 300 * MB))
    # Both at 20 MB/s until the short one is done (5 s), then the long one alone at 40 MB/s (10 s
    # in all; 15 s had it kept its half).
    assert 4.9 <= short < 7.5
    assert 9.9 <= long < 13


async def test_controllers_do_not_share_bandwidth() -> None:
    usb = UsbBandwidth(BusModel(controller_rate=40 * MB, device_rate=40 * MB), SPEED)
    took = await asyncio.gather(
        *(t for name in ("usb1", "usb2") for t in [timed(usb.controller(name), 200 * MB)])
    )
    assert all(4.9 <= t < 8 for t in took), took  # 5 s each; 10 s had they shared one bus


async def test_a_cancelled_transfer_gives_its_share_back() -> None:
    ctrl = controller(BusModel(controller_rate=40 * MB, device_rate=40 * MB))
    victim = asyncio.create_task(timed(ctrl, 1000 * MB))
    survivor = asyncio.create_task(timed(ctrl, 200 * MB))
    await asyncio.sleep(2 / SPEED)
    victim.cancel()
    # 2 s at 20 MB/s (40 MB), then 160 MB alone at 40 MB/s: about 6 s (10 s had it kept its half).
    assert 5.9 <= await survivor < 9


async def test_transfers_beyond_the_reliable_count_break_off_sometimes() -> None:
    model = BusModel(controller_rate=400 * MB, device_rate=35 * MB, reliable=2, overload_failure=1.0)
    ctrl = controller(model)
    results = await asyncio.gather(
        *(ctrl.transfer(50 * MB, lambda _f: None, tick=5.0) for _ in range(4)), return_exceptions=True
    )
    # The first two start on a controller with room; the next two start beyond `reliable`.
    assert results[:2] == [None, None]
    assert all(isinstance(r, OverloadError) for r in results[2:])


async def test_progress_is_reported_as_the_bytes_move() -> None:
    ctrl = controller(BusModel(controller_rate=40 * MB, device_rate=10 * MB))
    seen: list[float] = []
    await ctrl.transfer(100 * MB, seen.append, tick=2.0)
    assert seen == sorted(seen)
    assert 0 < seen[0] < seen[-1] < 1
    assert len(seen) >= 3  # a 10 s transfer, reported every 2 s
