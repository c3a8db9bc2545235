"""Faults a station meets in real life, on a whole simulated bench: the daemon survives them.

* The process dies at any moment (SIGKILL: the OOM killer, a power cut of the host) and systemd
  starts it again, many times over one run: every device still ends settled, no unsafe effect is
  repeated without the history saying why, and the history has no gap.
* A hub's serial (control) link is cut for ten seconds: the hub shows offline, and nobody mistakes
  that for every device on it being unplugged.
* The database is locked by another process, or the disk is full: the daemon says so loudly, keeps
  running, loses no port's work and catches up once the database is writable again.

(A broker outage is `tests/test_mqtt_outage.py`.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import structlog.testing

from daemon.config import load_config
from daemon.models import DeviceRecord, HistoryRow, PortRef, PortState
from daemon.sim.devices import SimDevice
from daemon.station import Station, build_sim_world
from daemon.store import BUSY_TIMEOUT, Store
from daemon.workflow.phases import ALLOWED, RUNNING, SETTLED, Phase
from tests.conftest import eventually, running, station_config
from tests.mqtt_broker import Mosquitto

# --------------------------------------------------------------------------------------------------
# 1. SIGKILL at many random moments

KILLS = int(os.environ.get("BENCHHUB_KILLS", "50"))
"""How many times the daemon is SIGKILLed before it is left to finish (`BENCHHUB_KILLS`)."""
KILL_SEED = int(os.environ.get("BENCHHUB_KILL_SEED", "20261125"))
"""Seed of the kill moments, so a failing schedule can be replayed (the daemon's own timing is not
deterministic, so a replay hits similar, not identical, moments)."""
MEAN_LIFE = 1.2
"""Mean seconds a daemon lives before it is killed (uniform in 0 .. 2 x this). A restart costs
about a second of start-up and re-detection, so some lives end during start-up, some before a
restore can finish and some after: all three are faults the daemon must survive."""
HUBS = "abcd"
PORTS_PER_HUB = 15
DEVICES = len(HUBS) * PORTS_PER_HUB
SPEED = 400
"""The whole 60-device run takes ~15-20 s without kills on a 2-core runner."""
STEP_ORDER = ["detect", "update", "erase", "enroll", "assign", "setup"]
EFFECT_STEPS = {"update": {"update"}, "erase": {"update", "erase"}}
"""Steps during which a device's restore (update) or wipe (erase) may take place: an erase-install
restore wipes the device, so an interrupted update may explain a second erase."""

_HUB_TOML = """
[[hubs]]
id = "hub-{letter}"
kind = "sim"
ports = {ports}
poll_interval = 0.05
"""

STATION_TOML = """
[station]
id = "killtest"
{hubs}
[workflow]
minimum_ios = "18.0"
mdm_server = "benchhub MDM"
enrollment = "configurator"
assignment_poll_interval = 0.05

[workflow.policy.update]
timeout = 60
backoff = 0.05

[mqtt]
url = "{url}"

[storage]
path = "bench.sqlite3"

[logging]
format = "json"

[sim]
speed = {speed}
devices = {devices}
state_file = "world.json"
"""


def _phases(db: Path) -> list[str]:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.5) as conn:
            return [r[0] for r in conn.execute("SELECT phase FROM ports ORDER BY hub, port")]
    except sqlite3.OperationalError:
        return []


def _plugged(state_file: Path) -> int:
    try:
        return len(json.loads(state_file.read_text())["slots"])
    except (OSError, ValueError, KeyError):
        return 0


def _settled(phases: list[str]) -> bool:
    return len(phases) == DEVICES and all(Phase(p) in SETTLED for p in phases)


def _log_tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _wait(predicate: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}; daemon log:\n{_log_tail(log)}"
        time.sleep(0.05)


def check_history_has_no_gap(rows: list[HistoryRow]) -> None:
    """Every port's history is one unbroken chain of legal moves in time order, and every crash
    recovery resumes at (or after) the step it interrupted, through a fresh detection.

    The store checks each move against `ALLOWED` before writing it; this also catches a row that
    does not start where the previous one ended (a lost transition), a clock going backwards within
    a port, and a resume that went back to an earlier step (which would redo an unsafe effect)."""
    by_port: dict[PortRef, list[HistoryRow]] = defaultdict(list)
    for row in rows:
        by_port[row.ref].append(row)
    for ref, chain in by_port.items():
        previous = Phase.EMPTY
        for i, row in enumerate(chain):
            where = f"{ref} row {row.id} ({row.from_phase} -> {row.phase}, {row.actor})"
            assert row.from_phase is previous, f"{where}: gap, the port was {previous}"
            assert row.phase in ALLOWED[row.from_phase], f"{where}: illegal move"
            if i:
                assert row.ts >= chain[i - 1].ts, f"{where}: earlier than the row before it"
            previous = row.phase
            if row.phase is not Phase.INTERRUPTED or row.actor != "recovery":
                continue
            after = chain[i + 1 :]
            assert after, f"{where}: the last word on the port is a crash"
            assert after[0].phase is Phase.DETECTED, f"{where}: resumed without detection: {after[0]}"
            if row.step in STEP_ORDER:
                resumed = next(
                    (h for h in after[1:] if h.phase in RUNNING and h.phase is not Phase.DETECTED), None
                )
                if resumed is not None and resumed.step in STEP_ORDER:
                    assert STEP_ORDER.index(resumed.step) >= STEP_ORDER.index(row.step), (
                        f"{where}: interrupted at {row.step}, resumed at the earlier {resumed.step}"
                    )


def check_no_unexplained_repeat(
    devices: list[SimDevice],
    history: list[HistoryRow],
    records: list[DeviceRecord],
    ports: list[PortState],
) -> None:
    """No restore and no wipe took effect twice on a device unless a crash interrupted a step that
    does it (a kill between the effect and its record leaves the daemon to redo the step, which the
    step's check may allow); enrollment and setup never twice; every finished device set up once."""
    key_of = {r.identity.serial: r.key for r in records}
    interrupted_at: dict[str | None, Counter[str | None]] = defaultdict(Counter)
    for row in [h for h in history if h.phase is Phase.INTERRUPTED and h.actor == "recovery"]:
        interrupted_at[row.device_key][row.step] += 1
    for device in devices:
        key = key_of[device.serial]
        for op, steps in EFFECT_STEPS.items():
            excuses = sum(interrupted_at[key][step] for step in steps)
            assert device.completed[op] <= 1 + excuses, (device.serial, op, dict(device.completed))
        for op in ("enroll", "setup"):
            assert device.completed[op] <= 1, (device.serial, op, dict(device.completed))
    for state in ports:
        if state.phase is Phase.DONE:
            assert state.device is not None
            device = next(d for d in devices if d.serial == state.device.serial)
            assert device.completed["setup"] == 1, (device.serial, dict(device.completed))


def test_sigkill_at_many_random_moments_of_a_60_device_run(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """60 devices on four 15-port hubs; the daemon is SIGKILLed `KILLS` times at random moments and
    restarted each time, then left to finish.

    Kills are not kept away from start-up: a daemon that dies while it recovers the ports or
    re-detects the devices is exactly what a crash loop looks like, and the store must survive it
    too. Only the very first start is waited for until the simulated bench has its 60 devices
    plugged (`world.json`): plugging them is the simulation playing the technician, not the daemon,
    and a world killed half-plugged would simply be a smaller bench."""
    config_path = tmp_path / "station.toml"
    hubs = "".join(_HUB_TOML.format(letter=letter, ports=PORTS_PER_HUB) for letter in HUBS)
    config_path.write_text(STATION_TOML.format(url=mosquitto.url, hubs=hubs, speed=SPEED, devices=DEVICES))
    db, state_file, log = tmp_path / "bench.sqlite3", tmp_path / "world.json", tmp_path / "daemon.log"
    cmd = [sys.executable, "-m", "daemon", "run", "--config", str(config_path)]
    rng = random.Random(KILL_SEED)
    settled_early = 0
    with log.open("ab") as out:
        for kill in range(KILLS):
            daemon = subprocess.Popen(cmd, stdout=out, stderr=out)
            try:
                if kill == 0:
                    _wait(lambda: _plugged(state_file) == DEVICES, 20, "the bench to be plugged", log)
                time.sleep(rng.uniform(0, 2 * MEAN_LIFE))
                assert daemon.poll() is None, f"the daemon exited by itself:\n{_log_tail(log)}"
            finally:
                daemon.kill()
                daemon.wait(10)
            if _settled(_phases(db)):
                settled_early += 1  # the remaining kills still hit the start-up of a settled bench
        final = subprocess.Popen(cmd, stdout=out, stderr=out)
        try:
            _wait(lambda: _settled(_phases(db)), 90, "every port settled after the last restart", log)
        finally:
            final.send_signal(signal.SIGTERM)
            assert final.wait(20) == 0, _log_tail(log)

    config = load_config(config_path)
    world = build_sim_world(config)
    store = Store(config.storage.path)
    try:
        ports, history, records = store.ports(), store.history(), store.devices()
    finally:
        store.close()

    # Every device ends done, or held for a person with the reason given.
    assert len(ports) == DEVICES
    outcomes = Counter(s.phase for s in ports)
    for state in ports:
        assert state.phase in (Phase.DONE, Phase.NEEDS_ATTENTION), (state.ref, state.phase, state.error)
        if state.phase is Phase.NEEDS_ATTENTION:
            assert state.error is not None, (state.ref, state.detail)
            assert state.error.code, (state.ref, state.error)
    assert len({s.device.key for s in ports if s.device}) == DEVICES, "a port lost its device"

    check_history_has_no_gap(history)

    # The kills did hit work in progress (else this test tests nothing).
    crashes = [h for h in history if h.phase is Phase.INTERRUPTED and h.actor == "recovery"]
    assert len(crashes) >= KILLS, f"only {len(crashes)} interrupted ports over {KILLS} kills"

    check_no_unexplained_repeat(list(world.devices.values()), history, records, ports)
    repeats = sum(d.completed["erase"] > 1 or d.completed["update"] > 1 for d in world.devices.values())
    print(
        f"\n{KILLS} kills ({settled_early} after the bench had settled), {len(crashes)} ports"
        f" interrupted by them, outcomes {dict(outcomes)},"
        f" {repeats} devices restored or wiped more than once (each after an interrupted step)"
    )


# --------------------------------------------------------------------------------------------------
# 2. The hub's serial link cut for ten seconds

LINK_CUT = 10.0
"""Seconds the Cambrionix control link is gone (a USB-serial adapter reset, a cable knocked)."""


async def _watch_hub_status(broker: Mosquitto, topic: str, seen: list[str]) -> None:
    while True:
        with contextlib.suppress(aiomqtt.MqttError, OSError):
            async with aiomqtt.Client(broker.host, broker.port, timeout=2.0) as client:
                await client.subscribe(topic, qos=1)
                async for message in client.messages:
                    assert isinstance(message.payload, bytes)
                    seen.append(message.payload.decode())
        await asyncio.sleep(0.1)


async def test_a_10_s_hub_link_cut_is_not_mistaken_for_unplugged_devices(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """A simulated PP8S loses its serial link for 10 s while eight devices are mid-workflow.

    The link carries only the hub's view (attach sensing, port modes); the devices' USB data runs
    on regardless. So the hub must show offline (store and MQTT), the devices must keep going, and
    when the link returns, a hub that says "attached" again must not make any port look as if it
    had been emptied in between: no `empty` or `interrupted` row may appear because of the cut."""
    config = station_config(
        tmp_path, mosquitto, devices=8, hub_model="PP8S", speed=120, sim={"assign_delay": 600}
    )
    topic = f"benchhub/{config.station.id}/hub/hub-a/status"
    statuses: list[str] = []
    watcher = asyncio.create_task(_watch_hub_status(mosquitto, topic, statuses))
    try:
        async with running(config) as station:
            assert station.world is not None
            world = station.world
            await eventually(lambda: station.store.hub_statuses().get("hub-a") is True, "hub online")
            await eventually(
                lambda: (
                    sum(s.phase in RUNNING and s.phase is not Phase.DETECTED for s in station.ports()) >= 6
                ),
                "most ports mid-workflow",
            )
            before = len(station.store.history())
            world.set_hub_online("hub-a", False)
            await eventually(lambda: station.store.hub_statuses()["hub-a"] is False, "hub offline", 5)
            await asyncio.sleep(LINK_CUT)
            during = station.store.history()[before:]
            still_working = sum(s.phase not in SETTLED for s in station.ports())
            world.set_hub_online("hub-a", True)
            await eventually(lambda: station.store.hub_statuses()["hub-a"] is True, "hub back", 20)
            await eventually(lambda: all(s.phase in SETTLED for s in station.ports()), "all settled", 60)
            after = station.store.history()[before:]
            ports = station.ports()
            await eventually(lambda: statuses[-1:] == ["online"], "MQTT hub status online again", 5)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher

    # The devices kept working while the hub was unreachable.
    assert any(h.phase in RUNNING or h.phase is Phase.DONE for h in during), "nothing moved during the cut"
    print(f"\n{len(during)} transitions during the cut, {still_working} ports still working when it ended")
    assert still_working, "every device had finished before the link came back: the test tests nothing"
    # Nobody mistook the cut for an unplug, during or after it.
    mistaken = [h for h in after if h.phase in (Phase.EMPTY, Phase.INTERRUPTED)]
    assert mistaken == [], mistaken
    assert all(s.phase is Phase.DONE for s in ports), [(s.ref, s.phase, s.error) for s in ports]
    # Operators saw it on MQTT: online, offline, online (the retained status, in order).
    assert "offline" in statuses, statuses
    assert statuses.index("offline") < len(statuses) - 1 - statuses[::-1].index("online"), statuses


# --------------------------------------------------------------------------------------------------
# 3. The database locked by another process, or the disk full

LONG_LOCK = 6.0
"""Seconds of a lock far beyond the store's busy timeout (and beyond the 5 s it once was)."""


async def _lock_for(db: Path, seconds: float, taken: threading.Event | None = None) -> None:
    """Another process's write lock on the database (`sqlite3 bench.sqlite3` with a `BEGIN
    EXCLUSIVE` left open, a backup tool), held for `seconds`; `taken` is set once it is held.

    Taken, held and released on a thread of its own: the store's SQLite calls run on the event loop
    and block it while they wait for the lock (at most `BUSY_TIMEOUT` each), so the lock's timing
    must not depend on the loop."""

    def hold() -> None:
        conn = sqlite3.connect(db, isolation_level=None)
        try:
            conn.execute("BEGIN EXCLUSIVE")
            locked.set()
            time.sleep(seconds)
            conn.execute("ROLLBACK")
        finally:
            conn.close()

    locked = taken or threading.Event()
    holder = asyncio.create_task(asyncio.to_thread(hold))
    await asyncio.to_thread(locked.wait, 5)
    await holder


def _errors(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry.get("log_level") in ("error", "critical")]


@pytest.fixture
def systemd(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """systemd's notification socket, for the station built next (`$NOTIFY_SOCKET`): the test reads
    the STATUS= lines it sends. Under /tmp: socket paths are limited to 107 bytes."""
    folder = Path(tempfile.mkdtemp(prefix="sdn", dir="/tmp"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(folder / "notify"))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(folder / "notify"))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    yield sock
    sock.close()
    shutil.rmtree(folder, ignore_errors=True)


def _status_lines(sock: socket.socket, into: list[str]) -> list[str]:
    """The STATUS= lines systemd got so far (appended to `into`, which is returned)."""
    while True:
        try:
            datagram = sock.recv(65536).decode()
        except BlockingIOError:
            return into
        into += [line.removeprefix("STATUS=") for line in datagram.splitlines() if line.startswith("STATUS=")]


class _Health:
    """What a subscriber of the station's retained `…/health` topic saw, in order."""

    def __init__(self, broker: Mosquitto, topic: str) -> None:
        self._payloads: list[str] = []
        self._task = asyncio.create_task(_watch_hub_status(broker, topic, self._payloads))

    def docs(self) -> list[dict[str, Any]]:
        return [json.loads(p) for p in self._payloads]

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def _lag_meter(lags: list[float]) -> None:
    """How late a 50 ms ticker runs: a write waiting on SQLite's busy timeout stalls the whole loop."""
    loop = asyncio.get_running_loop()
    while True:
        planned = loop.time() + 0.05
        await asyncio.sleep(0.05)
        lags.append(loop.time() - planned)


def _assert_reported_and_cleared(
    station: Any, statuses: list[str], health: list[dict[str, Any]], logs: list[dict[str, Any]], what: str
) -> None:
    """The failure was said loudly (log, systemd STATUS, MQTT health), then said to be over."""
    assert any(e["event"] == "store_unavailable" and what in e["error"] for e in _errors(logs)), _errors(logs)
    assert any(e["event"] == "store_recovered" for e in logs), "the recovery was not logged"
    assert station.store.failing is None
    during = [line for line in statuses if f"database: {what}" in line]
    assert during, f"systemd STATUS never said {what!r}: {statuses}"
    assert "database:" not in statuses[-1], statuses[-1]
    assert any(not doc["ok"] and what in doc["database"] for doc in health), health
    assert health[-1] == {"ok": True, "database": None, "since": None}, health


async def _mid_workflow(station: Any, ports: int = 4) -> None:
    await eventually(
        lambda: sum(s.phase in RUNNING and s.phase is not Phase.DETECTED for s in station.ports()) >= ports,
        "ports mid-workflow",
    )


async def _all_done_with_no_gap(station: Any, within: float = 15) -> None:
    """Every port finishes `done` within `within` s (a healthy run of this bench takes ~10 s)."""
    deadline = time.monotonic() + within
    while not all(s.phase in SETTLED for s in station.ports()):
        if time.monotonic() > deadline:
            stuck = [(s.ref.port, s.phase.value, s.step) for s in station.ports() if s.phase not in SETTLED]
            pytest.fail(f"ports still unsettled after {within:g} s (nothing runs them?): {stuck}")
        await asyncio.sleep(0.05)
    outcomes = [(s.ref.port, s.phase.value, s.error) for s in station.ports()]
    assert all(s.phase is Phase.DONE for s in station.ports()), outcomes
    check_history_has_no_gap(station.store.history())


async def _caught_up(station: Any, systemd: socket.socket, statuses: list[str], health: _Health) -> None:
    """Every device finished with an unbroken history, and systemd's STATUS and the MQTT health topic
    no longer speak of the database."""
    await _all_done_with_no_gap(station)
    await eventually(lambda: "database:" not in _status_lines(systemd, statuses)[-1], "STATUS", 5)
    await eventually(lambda: health.docs()[-1:] == [{"ok": True, "database": None, "since": None}])


@pytest.mark.parametrize(
    "hold",
    [
        pytest.param(BUSY_TIMEOUT * 0.6, id="shorter-than-busy-timeout"),
        pytest.param(LONG_LOCK, id="longer-than-busy-timeout"),
    ],
)
async def test_a_locked_database_delays_the_bench_and_loses_no_work(
    tmp_path: Path, mosquitto: Mosquitto, systemd: socket.socket, hold: float
) -> None:
    """Another process holds the write lock while eight devices are mid-workflow.

    Wanted: every write waits for the lock or is retried, so when it is released every device still
    finishes (`done`) with an unbroken history, and the daemon keeps running throughout. A lock held
    longer than `busy_timeout` must be reported (an error in the log, systemd's STATUS, the MQTT
    health topic), and cleared once over; and waiting it out must not stall the event loop (the
    MQTT keepalive, the watchdog and every other port run on it)."""
    config = station_config(tmp_path, mosquitto, devices=8, speed=150)
    statuses: list[str] = []
    health = _Health(mosquitto, f"benchhub/{config.station.id}/health")
    lags: list[float] = []
    try:
        with structlog.testing.capture_logs() as logs:
            async with running(config) as station:
                await _mid_workflow(station)
                meter = asyncio.create_task(_lag_meter(lags))
                await _lock_for(config.storage.path, hold)
                meter.cancel()
                _status_lines(systemd, statuses)
                await _caught_up(station, systemd, statuses, health)
    finally:
        await health.close()
    assert max(lags) < 1.0, f"the event loop stalled {max(lags):.1f} s during the lock"
    if hold > BUSY_TIMEOUT:
        assert _errors(logs), "a write failed on the lock and nothing said so"
        _assert_reported_and_cleared(station, statuses, health.docs(), logs, "database is locked")


async def test_a_station_started_on_a_locked_database_waits_for_it(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Another process holds the write lock when the daemon starts, beyond the store's busy timeout.

    Wanted: the start waits for the database rather than failing (systemd would restart it into the
    same failure until it gave up), and once the lock is gone the ports get their rows and every
    device is provisioned. Building the station writes nothing: its first writes are in `run`."""
    config = station_config(tmp_path, mosquitto, devices=4, ports=4, speed=150)
    station = Station(config)
    taken = threading.Event()
    holder = asyncio.create_task(_lock_for(config.storage.path, LONG_LOCK / 3, taken))
    await asyncio.to_thread(taken.wait, 5)
    stop = asyncio.Event()
    task = asyncio.create_task(station.run(stop))
    try:
        await asyncio.sleep(BUSY_TIMEOUT * 5)
        assert not task.done(), "the start gave up on a locked database"
        assert not station.ready.is_set(), "READY=1 before the store was recovered"
        await holder
        async with asyncio.timeout(10):
            await station.ready.wait()
        assert [s.ref for s in station.ports()] == list(station.runners)
        await _all_done_with_no_gap(station)
    finally:
        stop.set()
        async with asyncio.timeout(15):
            await task


async def _keep_full(db: sqlite3.Connection) -> None:
    """Another writer on the same disk: every 20 ms it takes whatever pages are free."""
    db.execute("CREATE TABLE IF NOT EXISTS disk_filler (b BLOB)")
    while True:
        with contextlib.suppress(sqlite3.OperationalError):
            while True:
                db.execute("INSERT INTO disk_filler VALUES (zeroblob(1024))")
        await asyncio.sleep(0.02)


async def test_a_full_disk_is_reported_and_the_bench_catches_up(
    tmp_path: Path, mosquitto: Mosquitto, systemd: socket.socket
) -> None:
    """The disk fills while eight devices are mid-workflow, for a few seconds, then space is freed.

    A full disk is played with SQLite's own limit, `PRAGMA max_page_count` set to the database's
    current size on the daemon's connection: writes then fail exactly as on a full disk (SQLITE_FULL,
    "database or disk is full", raised by the real store code), without root or a tiny mount.
    Wanted: the daemon logs the failure, says so on systemd's STATUS and MQTT, keeps running, and
    once space is back every device finishes with an unbroken history: no transition half-written,
    none lost, and the signals cleared."""
    config = station_config(tmp_path, mosquitto, devices=8, speed=150)
    statuses: list[str] = []
    health = _Health(mosquitto, f"benchhub/{config.station.id}/health")
    try:
        with structlog.testing.capture_logs() as logs:
            async with running(config) as station:
                await _mid_workflow(station)
                db = station.store._db  # the seam: the daemon's own connection
                db.execute("VACUUM")  # no free pages left to grow into
                pages = db.execute("PRAGMA page_count").fetchone()[0]
                db.execute(f"PRAGMA max_page_count = {pages}")
                # Whatever else fills the disk keeps at it: pages the daemon frees (acked outbox
                # rows) are taken again at once, so the disk stays full until space is freed.
                filler = asyncio.create_task(_keep_full(db))
                await eventually(lambda: bool(_errors(logs)), "a write failing on the full disk", 10)
                await asyncio.sleep(2)
                full = [s.ref.port for s in station.ports() if s.phase in RUNNING]
                filler.cancel()
                db.execute("DROP TABLE IF EXISTS disk_filler")
                db.execute("PRAGMA max_page_count = 1073741823")
                await _caught_up(station, systemd, statuses, health)
    finally:
        await health.close()
    assert full, "every port had finished before the disk was freed: the test tests nothing"
    _assert_reported_and_cleared(station, statuses, health.docs(), logs, "database or disk is full")
