"""Shared fixtures: a real Mosquitto per test, and a simulated station running at high speed."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Config, parse_config
from daemon.sim.demo import DemoOptions, demo_config
from daemon.sim.world import SimWorld
from daemon.station import Station
from tests.mqtt_broker import Mosquitto, mosquitto_fixture

__all__ = ["mosquitto_fixture"]

FAST = 2000.0
"""Simulated speed for tests: a device's whole workflow takes well under a second."""


def station_config(
    state_dir: Path,
    broker: Mosquitto,
    *,
    devices: int = 8,
    ports: int = 8,
    hub_model: str = "sim",
    speed: float = FAST,
    workflow: dict[str, Any] | None = None,
    sim: dict[str, Any] | None = None,
    hub: dict[str, Any] | None = None,
    apple: dict[str, Any] | None = None,
) -> Config:
    """The demo configuration (speed-scaled timeouts), pointed at the test's Mosquitto."""
    base = demo_config(
        DemoOptions(
            devices=devices, hub_model=hub_model, ports_per_hub=ports, speed=speed, mqtt_url=broker.url
        ),
        state_dir,
    )
    data = base.model_dump(mode="json", exclude_none=True)
    data["workflow"].update(workflow or {})
    data["sim"].update(sim or {})
    data["apple"] = {**data.get("apple", {}), **(apple or {})}
    for hub_data in data["hubs"]:
        hub_data.update(hub or {})
    return parse_config(data, state_dir)


@contextlib.asynccontextmanager
async def running(config: Config, world: SimWorld | None = None) -> AsyncIterator[Station]:
    """A station running in the background of the test; stopped cleanly on exit."""
    station = Station(config, world)
    stop = asyncio.Event()
    task = asyncio.create_task(station.run(stop))
    try:
        async with asyncio.timeout(10):
            ready = asyncio.create_task(station.ready.wait())
            await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                task.result()  # raise the startup error
        yield station
    finally:
        stop.set()
        async with asyncio.timeout(15):
            await task


async def eventually(predicate: Callable[[], bool], what: str = "condition", within: float = 20.0) -> None:
    """Poll until `predicate()` holds; fail the test, naming `what`, if it does not within `within` s."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within:g} s waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
def socket_path() -> Iterator[Path]:
    """A path for a UNIX socket (fake usbmuxd). AF_UNIX paths are limited to 107 bytes, and pytest's
    tmp_path can be longer, so it lives in a short directory under /tmp."""
    folder = Path(tempfile.mkdtemp(prefix="mux", dir="/tmp"))
    yield folder / "usbmuxd"
    shutil.rmtree(folder, ignore_errors=True)
