"""`benchhub watch`: the board rebuilt from MQTT alone, checked against what the stations published.

The model is checked directly (newest `seq` wins, garbage is skipped with a debug line); the command
is run as a user runs it, against a real Mosquitto holding the retained messages a station's own
payload renderer produces, and against a running simulated station.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import aiomqtt
from structlog.testing import capture_logs

from daemon.models import DeviceIdentity, ErrorInfo, PortRef, PortState, Queued
from daemon.mqtt.payloads import PayloadRenderer, state_document
from daemon.mqtt.topics import Topics
from daemon.watch import Board
from daemon.workflow.phases import Phase
from tests.conftest import eventually, running, station_config
from tests.mqtt_broker import Mosquitto

REPO = Path(__file__).resolve().parents[1]
S1, S2 = Topics("benchhub", "s1"), Topics("benchhub", "s2")


def state_payload(state: PortState) -> bytes:
    return json.dumps(state_document(state)).encode()


def rows(text: str) -> dict[str, str]:
    """Board rows by port (`hub-a/3` -> the row), from one station block of the output."""
    return {
        line.split()[0]: line for line in text.splitlines() if line[:1].isalpha() and "/" in line.split()[0]
    }


async def watch(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "daemon",
        "watch",
        *args,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(20):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def publish_retained(broker: Mosquitto, messages: list[tuple[str, bytes]]) -> None:
    async with aiomqtt.Client(broker.host, broker.port) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1, retain=True)


# ------------------------------------------------------------------------------ the model


def test_newest_seq_wins_and_garbage_is_skipped_with_a_debug_line() -> None:
    board = Board("benchhub")
    ref = PortRef("hub-a", 3)
    topic = S1.port_state(ref)
    newer = PortState(ref, Phase.ERASING, step="erase", seq=7)
    assert board.apply(topic, state_payload(newer))
    assert not board.apply(topic, state_payload(newer))  # the snapshot repeating it: no change
    with capture_logs() as logs:
        assert not board.apply(topic, state_payload(PortState(ref, Phase.UPDATING, seq=6)))  # late
        for garbage in (
            b"not json",
            b"\xff\xfe",
            b"[1, 2]",
            b'{"phase": "erasing"}',  # no seq
            b'{"phase": "dancing", "seq": 99}',
            b'{"phase": "done", "seq": "99"}',
            b'{"phase": "done", "seq": 99, "error": "boom"}',
            b'{"phase": "done", "seq": 99, "since": "yesterday"}',
            b'{"phase": "updating", "seq": 99, "queue": 3}',
            b'{"phase": "updating", "seq": 99, "queue": {"position": 3}}',
            json.dumps({**state_document(PortState(PortRef("hub-b", 1), Phase.DONE)), "seq": 99}).encode(),
        ):
            assert not board.apply(topic, garbage), garbage
        assert not board.apply(S1.status, b"maybe")
        assert not board.apply("benchhub/s1/hub/hub-a/port/x/state", state_payload(newer))
    assert board.stations["s1"].ports[ref].phase is Phase.ERASING
    assert board.stations["s1"].ports[ref].seq == 7
    skipped = [e for e in logs if e["event"] == "watch_payload_skipped"]
    assert len(skipped) == 13
    assert all(e["log_level"] == "debug" and e["topic"] for e in skipped)
    assert [e["event"] for e in logs].count("watch_stale_state") == 1
    assert not board.apply("other/s1/status", b"online")  # outside the prefix
    assert not board.apply(S1.port_event(ref), b"{}")  # a topic the board does not show


def test_render_reuses_the_status_table_per_station() -> None:
    board = Board("benchhub")
    board.apply(S1.status, b"offline")
    board.apply(S1.hub_status("hub-a"), b"online")
    state = PortState(
        PortRef("hub-a", 2),
        Phase.FAILED,
        attempt=2,
        device=DeviceIdentity(serial="F2LXK3ABHG", product_type="iPhone12,1"),
        error=ErrorInfo("timeout", "update took too long"),
        seq=4,
    )
    board.apply(S1.port_state(state.ref), state_payload(state))
    text = board.render(width=200)
    assert text.splitlines()[0] == "station s1: offline   hubs: hub-a online"
    row = rows(text)["hub-a/2"]
    assert "failed #2" in row
    assert "iPhone12,1 F2LXK3ABHG" in row
    assert "timeout: update took too long" in row
    assert text.endswith("1 ports: 1 failed")
    assert Board("benchhub").render().startswith("no station has published")


def test_a_queued_port_shows_its_place_in_line() -> None:
    """The place in line travels as structured data (`queue`) and the board shows it in the progress
    column, so a port waiting its turn does not look like one at work."""
    board = Board("benchhub")
    place = Queued(3, "usb2", 10, 10)
    state = PortState(
        PortRef("hub-a", 5), Phase.UPDATING, step="update", detail=place.describe(), queue=place, seq=9
    )
    assert board.apply(S1.port_state(state.ref), state_payload(state))
    assert board.stations["s1"].ports[state.ref].queue == place
    row = rows(board.render(width=200))["hub-a/5"]
    assert "queued 3rd" in row
    assert "queued: 3rd in line for a restore slot on usb2 (10/10 busy)" in row


# ------------------------------------------------------------------------------ the command


async def test_watch_once_shows_every_station_from_retained_messages(mosquitto: Mosquitto) -> None:
    renderer = PayloadRenderer(S1)
    a1 = PortState(PortRef("hub-a", 1), Phase.UPDATING, step="update", progress=40, seq=3)
    a2 = PortState(PortRef("hub-a", 2), Phase.DONE, device=DeviceIdentity(serial="DMPZ91QXJF8J"), seq=9)
    b1 = PortState(PortRef("hub-b", 1), Phase.EMPTY, seq=1)
    other = PortState(PortRef("hub-z", 5), Phase.NEEDS_ATTENTION, seq=2)
    messages = [(S1.status, b"online"), *((m.topic, m.payload) for m in renderer.hub_messages("hub-a", True))]
    messages += [(S1.hub_status("hub-b"), b"offline")]
    messages += [(m.topic, m.payload) for s in (a1, a2, b1) for m in renderer.snapshot(s)]
    messages += [(S1.port_state(PortRef("hub-b", 2)), b"{garbage")]  # skipped, not a crash
    messages += [(S2.status, b"offline"), (S2.port_state(other.ref), state_payload(other))]
    await publish_retained(mosquitto, messages)

    code, out, err = await watch("--mqtt", mosquitto.url, "--once")
    assert (code, err) == (0, ""), err
    s1_text, s2_text = out.split("station s2:")
    assert s1_text.startswith("station s1: online   hubs: hub-a online, hub-b offline")
    s1_rows = rows(s1_text)
    assert sorted(s1_rows) == ["hub-a/1", "hub-a/2", "hub-b/1"]
    assert "updating" in s1_rows["hub-a/1"]
    assert "40%" in s1_rows["hub-a/1"]
    assert "done" in s1_rows["hub-a/2"]
    assert "DMPZ91QXJF8J" in s1_rows["hub-a/2"]
    assert "3 ports: 1 empty, 1 updating, 1 done" in s1_text
    assert s2_text.startswith(" offline   hubs: none reported")
    assert "needs_attention" in rows(s2_text)["hub-z/5"]

    code, out, _ = await watch("--mqtt", mosquitto.url, "--station", "s2", "--once")
    assert code == 0
    assert out.startswith("station s2: offline")
    assert "station s1" not in out


async def test_watch_once_matches_a_running_station(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = station_config(tmp_path, mosquitto, devices=3, ports=4)
    async with running(config) as station:
        await eventually(lambda: sum(s.phase is Phase.DONE for s in station.ports()) == 3, "three done")
        await eventually(lambda: station.store.outbox_size() == 0, "outbox drained")
        code, out, err = await watch("--mqtt", mosquitto.url, "--station", "demo", "--once")
        expected = {str(s.ref): s.phase.value for s in station.ports()}
    assert (code, err) == (0, ""), err
    assert out.startswith("station demo: online   hubs: hub-a online")
    assert {port: row.split()[1] for port, row in rows(out).items()} == expected


async def test_watch_once_reports_an_unreachable_broker_and_bad_usage(tmp_path: Path) -> None:
    from tests.mqtt_broker import free_port

    code, out, err = await watch("--mqtt", f"mqtt://127.0.0.1:{free_port()}", "--once")
    assert (code, out) == (1, "")
    assert "cannot watch every station on mqtt://127.0.0.1:" in err
    assert "refused" in err.lower()
    code, _, err = await watch("--mqtt", "http://broker", "--station", "a/b", "--once")
    assert code == 2
    assert "--mqtt:" in err
    assert "--station 'a/b'" in err
    assert "Traceback" not in err
