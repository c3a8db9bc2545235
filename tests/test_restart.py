"""Restarts: a stopped or killed daemon loses nothing, and never repeats an unsafe step's effect."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from daemon.config import load_config
from daemon.ios.base import DeviceMode
from daemon.models import PortRef
from daemon.sim.devices import SimDevice, make_device
from daemon.station import build_sim_world
from daemon.store import Store
from daemon.workflow.phases import RUNNING, Phase
from tests.conftest import eventually, running, station_config
from tests.mqtt_broker import Mosquitto

UNSAFE = ("update", "enroll", "setup")  # effects that must not happen twice (enroll: the technician's)


def assert_no_unsafe_effect_twice(devices: list[SimDevice]) -> None:
    for device in devices:
        for op in UNSAFE:
            assert device.completed[op] <= 1, (device.serial, op, dict(device.completed))
        assert device.completed["enroll"] == 1
        assert device.completed["setup"] == 1


async def test_a_restore_in_flight_at_a_stop_is_handed_over_and_done_once(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """SIGTERM (a clean stop) while a restore sends its filesystem: the restore is cut off, the
    history says where it stopped, and the next start restores the device once more, to the end."""
    a1 = PortRef("hub-a", 1)
    config = station_config(
        tmp_path,
        mosquitto,
        devices=0,
        speed=200,
        workflow={"minimum_ios": "18.0", "steps": ["update", "erase"]},
        sim={"restore_gb": 1.0},
    )
    world = build_sim_world(config)
    device = make_device(seed=3, index=0, minimum_major=18)
    device.ios_version, device.build = "17.0", "21A329"
    async with running(config, world) as station:
        world.plug(a1, device)

        def sending() -> bool:
            state = station.store.port(a1)
            return state.phase is Phase.UPDATING and (state.progress or 0) >= 10

        await eventually(sending, "a restore sending its filesystem")
    store = Store(config.storage.path)
    rows = store.history(ref=a1)
    store.close()
    stop = rows[-1]
    assert (stop.phase, stop.step, stop.actor) == (Phase.INTERRUPTED, "update", "recovery")
    assert (stop.detail or "").startswith("daemon stopped during update; last progress: ")
    assert "sending filesystem" in (stop.detail or "")
    assert stop.extra["progress"] >= 10
    # Cut off before its final reboot, the device boots back into its old system.
    assert (device.mode, device.ios_version, device.completed["update"]) == (DeviceMode.NORMAL, "17.0", 0)

    async with running(config, world) as station:
        await eventually(lambda: station.store.port(a1).phase is Phase.DONE, "restored after the restart")
        after = station.store.history(ref=a1)[len(rows) :]
    assert [r.phase for r in after][:2] == [Phase.DETECTED, Phase.UPDATING]
    assert (device.started["update"], device.completed["update"]) == (2, 1)
    assert device.ios_version != "17.0"


async def test_stop_mid_run_and_restart_finishes_every_device(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = station_config(tmp_path, mosquitto, devices=8, speed=400)
    async with running(config) as station:
        await eventually(
            lambda: sum(s.phase in RUNNING and s.phase is not Phase.DETECTED for s in station.ports()) >= 4,
            what="several ports mid-workflow",
        )
    # A clean stop leaves no port looking busy: what was running is recorded as interrupted.
    stopped = {s.ref: s for s in station.ports()}
    assert not any(s.phase in RUNNING for s in stopped.values()), stopped
    interrupted = {ref for ref, s in stopped.items() if s.phase is Phase.INTERRUPTED}
    assert len(interrupted) >= 4
    assert all((stopped[ref].detail or "").startswith("daemon stopped during") for ref in interrupted)

    world = build_sim_world(config)  # the same bench: devices still plugged, with what was done to them
    assert len(world.devices) == 8
    async with running(config, world) as station:
        await eventually(
            lambda: all(s.phase is Phase.DONE for s in station.ports()), "all done after restart", 30
        )
        for ref in interrupted:
            rows = station.store.history(ref=ref)
            stop_row = next(h for h in rows if h.phase is Phase.INTERRUPTED)
            assert stop_row.actor == "recovery"
            after = rows[rows.index(stop_row) + 1 :]
            # Resumed at the interrupted step: detect, then that step's phase (or a later one if its
            # check proved it done), never a step before it.
            assert after[0].phase is Phase.DETECTED
            resumed = next(h.step for h in after[1:] if h.step)
            order = ["detect", "update", "erase", "enroll", "assign", "setup"]
            assert order.index(resumed) >= order.index(stop_row.step or "update")
        assert_no_unsafe_effect_twice(list(world.devices.values()))


STATION_TOML = """
[station]
id = "killtest"

[[hubs]]
id = "hub-a"
kind = "sim"
ports = 8
poll_interval = 0.05

[workflow]
minimum_ios = "18.0"
mdm_server = "benchhub MDM"
enrollment = "configurator"
assignment_poll_interval = 0.05

[workflow.policy.update]
timeout = 30
backoff = 0.05

[mqtt]
url = "{url}"

[storage]
path = "bench.sqlite3"

[logging]
format = "json"

[sim]
speed = 500
devices = 8
state_file = "world.json"
"""


def phases(db: Path) -> list[str]:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return [r[0] for r in conn.execute("SELECT phase FROM ports ORDER BY hub, port")]
    except sqlite3.OperationalError:
        return []


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_sigkill_mid_run_then_restart(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = tmp_path / "station.toml"
    config.write_text(STATION_TOML.format(url=mosquitto.url))
    db = tmp_path / "bench.sqlite3"
    cmd = [sys.executable, "-m", "daemon", "run", "--config", str(config)]
    log = (tmp_path / "daemon.log").open("ab")
    first = subprocess.Popen(cmd, stdout=log, stderr=log)
    try:
        wait_until(
            lambda: (
                sum(p in {"erasing", "enrolling", "awaiting_assignment", "setting_up"} for p in phases(db))
                >= 3
            ),
            20,
            "ports mid-workflow",
        )
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
    killed_at = phases(db)
    assert any(p not in {"done", "empty"} for p in killed_at), killed_at

    second = subprocess.Popen(cmd, stdout=log, stderr=log)
    try:
        wait_until(lambda: phases(db) == ["done"] * 8, 30, "all ports done after the restart")
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(20) == 0
    world = build_sim_world(load_config(config))
    assert_no_unsafe_effect_twice(list(world.devices.values()))
    with sqlite3.connect(db) as conn:
        actors = {r[0] for r in conn.execute("SELECT actor FROM history")}
    assert "recovery" in actors
