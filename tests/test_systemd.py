"""Running under systemd: the sd_notify protocol, what the daemon tells systemd, and the unit file.

Everything talks to real AF_UNIX datagram sockets, as systemd's own notification socket is one; the
daemon test runs `python -m daemon run` as a child process the way systemd starts it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.config import parse_config
from daemon.mqtt.publisher import MqttPublisher
from daemon.sdnotify import Notifier, watchdog_interval
from daemon.sim.demo import DemoOptions, demo_config
from daemon.station import Station
from tests.mqtt_broker import Mosquitto
from tests.test_restart import STATION_TOML

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "benchhub.service"


@pytest.fixture
def receiver() -> Iterator[tuple[socket.socket, str]]:
    """A bound AF_UNIX datagram socket standing in for systemd's, and its path (under /tmp: the
    107-byte limit on socket paths is too short for pytest's tmp_path)."""
    folder = Path(tempfile.mkdtemp(prefix="sdn", dir="/tmp"))
    path = str(folder / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    yield sock, path
    sock.close()
    shutil.rmtree(folder, ignore_errors=True)


def drain(sock: socket.socket) -> list[str]:
    """Every datagram already queued on `sock`, in order."""
    messages = []
    sock.setblocking(False)
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


# ------------------------------------------------------------------ (a) the protocol


def test_messages_arrive_as_sent_on_a_path_socket(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("1 hub, 8 ports: all empty")
    assert notifier.status("two\nlines")
    assert notifier.watchdog()
    assert notifier.stopping()
    assert drain(sock) == [
        "READY=1\nSTATUS=1 hub, 8 ports: all empty",
        "STATUS=two lines",  # a newline would start a new assignment
        "WATCHDOG=1",
        "STOPPING=1",
    ]


def test_messages_arrive_on_an_abstract_socket() -> None:
    name = f"benchhub-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        notifier = Notifier({"NOTIFY_SOCKET": f"@{name}"})
        assert notifier.ready()
        assert notifier.watchdog()
        assert drain(sock) == ["READY=1", "WATCHDOG=1"]


def test_without_notify_socket_every_call_is_a_no_op() -> None:
    for environ in ({}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "relative/path"}):
        notifier = Notifier(environ)
        assert not notifier.enabled
        assert notifier.watchdog_interval is None
        assert not notifier.ready()
        assert not notifier.watchdog()


def test_a_vanished_socket_is_ignored_and_logged_once(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone"), "WATCHDOG_USEC": "1000000"})
    with capture_logs() as logs:
        assert not notifier.ready()
        assert not notifier.watchdog()
        assert not notifier.stopping()
    assert [entry["event"] for entry in logs] == ["sd_notify_failed"]
    assert logs[0]["log_level"] == "debug"


def test_watchdog_interval_follows_sd_watchdog_enabled() -> None:
    me = os.getpid()
    assert watchdog_interval({"WATCHDOG_USEC": "400000"}) == 0.4  # no WATCHDOG_PID: meant for us
    assert watchdog_interval({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(me)}) == 0.4
    assert watchdog_interval({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(me + 1)}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "x"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({}) is None
    # The socket comes first: a watchdog interval without anyone listening is meaningless.
    assert Notifier({"WATCHDOG_USEC": "400000"}).watchdog_interval is None


# ------------------------------------------------------------------ (b) the real daemon

STATUS = re.compile(r"^1 hub, 8 ports: (all empty|(\d+ [a-z ]+)(, \d+ [a-z ]+)*)(; .*)?$")


def test_daemon_reports_ready_status_watchdog_and_stopping(
    tmp_path: Path, mosquitto: Mosquitto, receiver: tuple[socket.socket, str]
) -> None:
    """`benchhub run` as systemd starts it: `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID`
    set to the daemon's own pid (a shell exports its `$$` and execs, keeping the pid, which is what
    systemd does between fork and exec)."""
    sock, path = receiver
    config = tmp_path / "station.toml"
    config.write_text(STATION_TOML.format(url=mosquitto.url))
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
    cmd = ["/bin/sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh", sys.executable, "-m", "daemon", "run"]
    log = (tmp_path / "daemon.log").open("wb")
    daemon = subprocess.Popen([*cmd, "--config", str(config)], stdout=log, stderr=log, env=env)
    received: list[tuple[float, str]] = []
    try:
        sock.settimeout(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            received.append((time.monotonic(), sock.recv(4096).decode()))
            pings = [t for t, m in received if m == "WATCHDOG=1"]
            states = [m for _, m in received if m.startswith("STATUS=")]
            if len(pings) >= 8 and any(re.search(r"\d+ (updating|erasing|done)", m) for m in states):
                break
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(20) == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    received += [(time.monotonic(), m) for m in drain(sock)]
    messages = [m for _, m in received]

    first = messages[0].split("\n")
    assert first[0] == "READY=1", messages[:3]
    assert STATUS.match(first[1].removeprefix("STATUS=")), first
    statuses = [m.removeprefix("STATUS=") for m in messages if m.startswith("STATUS=")]
    assert all(STATUS.match(s) for s in statuses), statuses
    assert any(re.search(r"\d+ (updating|erasing|done)", s) for s in statuses), statuses
    assert all(a != b for a, b in itertools.pairwise(statuses)), statuses
    pings = [t for t, m in received if m == "WATCHDOG=1"]
    assert len(pings) >= 8, messages
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    # Every half interval (0.2 s): never as late as the interval itself, and not a busy loop.
    assert max(gaps) < 0.4, gaps
    assert sum(gaps) / len(gaps) > 0.12, gaps
    assert messages[-1].startswith("STOPPING=1"), messages[-3:]
    print(*statuses, sep="\n")  # shown with -s: what `systemctl status` would have said


# ------------------------------------------------------------------ (c) health


def idle_station(tmp_path: Path) -> Station:
    """A simulated station that is built but not run: `_systemd` is driven by the test, with the
    tasks it watches made to be alive or dead (the seam is the list of vital tasks `_run` passes)."""
    options = DemoOptions(
        devices=0, hub_model="sim", ports_per_hub=8, speed=1000, mqtt_url="mqtt://127.0.0.1:1"
    )
    base = demo_config(options, tmp_path)
    return Station(parse_config(base.model_dump(mode="json", exclude_none=True), tmp_path))


async def watch(station: Station, path: str, dead: bool, seconds: float, stall: float = 0.0) -> None:
    """Run the station's systemd task for `seconds` against the socket at `path`, with a 0.4 s
    watchdog, a live hub task and a publisher task that is alive or has returned; block the event
    loop for `stall` seconds half-way."""
    station.notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
    publisher = MqttPublisher(station.config.mqtt, station.topics, station.store, station.renderer)

    async def returned() -> None:
        return None

    forever = asyncio.Event()
    hub = asyncio.create_task(forever.wait(), name="hub hub-a")
    mqtt = asyncio.create_task(returned() if dead else forever.wait(), name="mqtt publisher")
    await asyncio.sleep(0)
    stop = asyncio.Event()
    task = asyncio.create_task(station._systemd(stop, publisher, [mqtt, hub]))  # type: ignore[list-item]
    await asyncio.sleep(seconds / 2)
    time.sleep(stall)  # noqa: ASYNC251 - the point: a blocked event loop
    await asyncio.sleep(seconds / 2)
    stop.set()
    await task
    for t in (hub, mqtt):
        t.cancel()
    station.store.close()


async def test_watchdog_pings_while_healthy(tmp_path: Path, receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    await watch(idle_station(tmp_path), path, dead=False, seconds=1.2)
    messages = drain(sock)
    assert messages.count("WATCHDOG=1") >= 4, messages
    # A broker that cannot be reached and a hub that never came online: said, not punished.
    assert any("MQTT connecting" in m and "offline: hub-a" in m for m in messages), messages
    assert messages[-1].startswith("STOPPING=1")


async def test_no_watchdog_once_the_publisher_task_ended(
    tmp_path: Path, receiver: tuple[socket.socket, str]
) -> None:
    sock, path = receiver
    await watch(idle_station(tmp_path), path, dead=True, seconds=1.2)
    messages = drain(sock)
    assert "WATCHDOG=1" not in messages, messages
    assert any("UNHEALTHY: task ended: mqtt publisher" in m for m in messages), messages


async def test_no_watchdog_for_a_stalled_event_loop(
    tmp_path: Path, receiver: tuple[socket.socket, str]
) -> None:
    sock, path = receiver
    await watch(idle_station(tmp_path), path, dead=False, seconds=1.2, stall=0.5)
    messages = drain(sock)
    stalled = [i for i, m in enumerate(messages) if "UNHEALTHY: event loop stalled" in m]
    assert len(stalled) == 1, messages
    # Pings before the stall, none for it, and pings again once the loop is responsive.
    assert "WATCHDOG=1" in messages[: stalled[0]]
    assert "WATCHDOG=1" in messages[stalled[0] :]


# ------------------------------------------------------------------ (d) the unit file


def analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return found


def test_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` checks that ExecStart= is executable, and /opt/benchhub/bin/benchhub
    exists only on a station; so this verifies a copy whose ExecStart= is this venv's `benchhub`,
    identical otherwise (the copy's name stays benchhub.service)."""
    benchhub = Path(sys.executable).with_name("benchhub")
    assert benchhub.exists(), benchhub
    text = UNIT.read_text()
    assert "ExecStart=/opt/benchhub/bin/benchhub " in text
    copy = tmp_path / "benchhub.service"
    copy.write_text(text.replace("ExecStart=/opt/benchhub/bin/benchhub ", f"ExecStart={benchhub} "))
    result = subprocess.run(
        [analyze(), "verify", str(copy)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not result.stderr.strip(), result.stderr
    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=30s"):
        assert f"\n{line}\n" in text, line


def test_unit_exposure_is_at_most_3() -> None:
    result = subprocess.run(
        [analyze(), "security", "--offline=yes", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    match = re.search(r"Overall exposure level for benchhub\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr
    assert float(match.group(1)) <= 3.0, result.stdout
