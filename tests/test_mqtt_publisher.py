"""The outbox publisher against a real Mosquitto and a real SQLite store.

Every check subscribes with an independent aiomqtt client and asserts on the messages the broker
really delivered: retained state for late subscribers, event order, delivery after an outage, the
station's online/offline status (explicit and via the last will), republishing after a broker
that lost its retained messages, stopping or losing the broker mid-drain, and TLS verification.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiomqtt
import pytest
from structlog.testing import capture_logs

from daemon.config import MqttConfig, TlsConfig
from daemon.models import PortRef, Transition
from daemon.mqtt.payloads import PayloadRenderer
from daemon.mqtt.publisher import MqttPublisher, cancel_and_wait
from daemon.mqtt.topics import Topics
from daemon.store import Store
from daemon.workflow.phases import Phase
from tests.conftest import eventually
from tests.mqtt_broker import (  # noqa: F401 - mosquitto_fixture provides the `mosquitto` fixture
    Mosquitto,
    free_port,
    make_certs,
    mosquitto_fixture,
    require_mosquitto,
    retained_messages,
)

TOPICS = Topics("benchhub", "t1")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "benchhub.sqlite3", renderer=PayloadRenderer(TOPICS))
    yield s
    s.close()


def publisher_for(url: str, store: Store) -> MqttPublisher:
    return MqttPublisher(MqttConfig(url=url), TOPICS, store, PayloadRenderer(TOPICS))


@asynccontextmanager
async def running(publisher: MqttPublisher) -> AsyncIterator[asyncio.Event]:
    """Run the publisher in a task; on exit stop it and insist that it returns promptly."""
    stop = asyncio.Event()
    task = asyncio.create_task(publisher.run(stop))
    try:
        yield stop
    finally:
        stop.set()
        try:
            async with asyncio.timeout(5):
                await task
        except TimeoutError:
            task.cancel()
            pytest.fail("publisher did not return within 5 s of stop")


def walk(store: Store, ref: PortRef, *phases: Phase) -> None:
    for phase in phases:
        store.record(Transition(ref=ref, to=phase, step=phase.value))


async def latest_retained(broker: Mosquitto, store: Store, within: float = 3.0) -> dict[str, bytes]:
    """Retained messages a late subscriber gets, once they match the store's newest state of every
    port (or after `within` seconds, for the assertion to report what was missing)."""
    deadline = time.monotonic() + within
    while True:
        ports = store.ports()
        wanted = {TOPICS.port_state(p.ref): p.seq for p in ports}
        expect = set(wanted) | {TOPICS.port_phase(p.ref) for p in ports} | {TOPICS.status}
        got = await retained_messages(broker.host, broker.port, f"{TOPICS.base}/#", expect, within=0.5)
        seqs = {t: json.loads(got[t])["seq"] for t in wanted if t in got}
        if (seqs == wanted and expect <= got.keys()) or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.05)


def assert_latest(got: dict[str, bytes], store: Store) -> None:
    for state in store.ports():
        topic = TOPICS.port_state(state.ref)
        assert topic in got, f"no retained state for {state.ref}; got {sorted(got)}"
        doc = json.loads(got[topic])
        assert (doc["hub"], doc["port"]) == (state.ref.hub, state.ref.port)
        assert (doc["phase"], doc["seq"]) == (state.phase.value, state.seq), state.ref
        assert got[TOPICS.port_phase(state.ref)] == state.phase.value.encode()


# ------------------------------------------------------------------------------------------------


async def test_late_subscriber_sees_latest_state_of_every_port(mosquitto: Mosquitto, store: Store) -> None:
    refs = [PortRef("a", n) for n in range(1, 5)] + [PortRef("b", 1), PortRef("b", 2)]
    store.ensure_ports(refs)  # b/2 is never touched: only the snapshot publishes it
    walk(store, refs[0], Phase.DETECTED, Phase.UPDATING)  # recorded before the publisher runs
    publisher = publisher_for(mosquitto.url, store)
    async with running(publisher):
        walk(store, refs[0], Phase.ERASING, Phase.ENROLLING)
        walk(store, refs[1], Phase.DETECTED, Phase.FAILED)
        walk(store, refs[2], Phase.DETECTED, Phase.UPDATING, Phase.DONE)
        store.set_progress(refs[3], None)
        walk(store, refs[3], Phase.DETECTED)
        store.set_progress(refs[3], 42)
        walk(store, refs[4], Phase.DETECTED, Phase.NEEDS_ATTENTION, Phase.EMPTY)
        await eventually(lambda: publisher.connected and store.outbox_size() == 0, "outbox drained")
        got = await latest_retained(mosquitto, store)
    assert_latest(got, store)
    assert json.loads(got[TOPICS.port_state(refs[3])])["progress"] == 42
    assert json.loads(got[TOPICS.port_state(refs[5])])["phase"] == "empty"
    assert publisher.published >= 1 + 3 * 11  # online + 11 transitions of 3 messages each


async def test_messages_leave_in_transition_order(mosquitto: Mosquitto, store: Store) -> None:
    a1, a2 = PortRef("a", 1), PortRef("a", 2)
    plan = [
        (a1, Phase.DETECTED),
        (a2, Phase.DETECTED),
        (a1, Phase.UPDATING),
        (a1, Phase.UPDATING),  # a retry: same phase, next attempt
        (a2, Phase.ERASING),
        (a1, Phase.ERASING),
        (a2, Phase.FAILED),
        (a1, Phase.ENROLLING),
        (a2, Phase.EMPTY),
        (a1, Phase.DONE),
    ]
    received: list[tuple[str, dict[str, object]]] = []
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as sub:
        await sub.subscribe(f"{TOPICS.base}/hub/+/port/+/event", qos=1)
        await sub.subscribe(f"{TOPICS.base}/hub/+/port/+/state", qos=1)
        for ref, phase in plan[:4]:  # a backlog the publisher finds at start ...
            walk(store, ref, phase)
        publisher = publisher_for(mosquitto.url, store)
        async with running(publisher):
            await eventually(lambda: publisher.connected, "connected")
            for ref, phase in plan[4:]:  # ... and transitions recorded while it runs
                walk(store, ref, phase)
            async with asyncio.timeout(3):
                async for message in sub.messages:
                    assert isinstance(message.payload, bytes)
                    received.append((message.topic.value, json.loads(message.payload)))
                    if sum(1 for t, _ in received if t.endswith("/event")) == len(plan):
                        break
    events = [doc for topic, doc in received if topic.endswith("/event")]
    assert [(PortRef(str(e["hub"]), int(str(e["port"]))), Phase(str(e["to"]))) for e in events] == plan
    for ref in (a1, a2):
        event_seqs = [int(str(e["seq"])) for e in events if e["port"] == ref.port]
        assert event_seqs == sorted(set(event_seqs)), f"event seq of {ref} not strictly increasing"
        state_seqs = [
            int(str(d["seq"])) for t, d in received if t == TOPICS.port_state(ref)
        ]  # a snapshot may repeat the newest state, never an older one
        assert state_seqs == sorted(state_seqs), f"state seq of {ref} went backwards: {state_seqs}"


async def test_broker_outage_delays_and_loses_nothing(mosquitto: Mosquitto, store: Store) -> None:
    a1, a2 = PortRef("a", 1), PortRef("a", 2)
    publisher = publisher_for(mosquitto.url, store)
    async with running(publisher) as stop:
        walk(store, a1, Phase.DETECTED)
        await eventually(lambda: publisher.connected and store.outbox_size() == 0, "first drain")

        mosquitto.stop()
        await eventually(lambda: not publisher.connected, "publisher noticed the outage")
        down = [(a1, Phase.UPDATING), (a2, Phase.DETECTED), (a1, Phase.ERASING), (a2, Phase.UPDATING)]
        for ref, phase in down:
            walk(store, ref, phase)
        await asyncio.sleep(0.1)
        # Every event is kept; of the retained state, phase and colour messages only the newest per
        # port is (an older retained state would be overwritten by the broker anyway).
        ports_touched = {ref for ref, _ in down}
        assert store.outbox_size() == len(down) + 3 * len(ports_touched), "outbox must keep what was not sent"
        error_while_down = publisher.last_error
        assert error_while_down, "last_error should say why the publisher is disconnected"
        assert not stop.is_set()

        mosquitto.start()  # same port; the publisher's first retry comes ~1 s after the drop
        events: list[dict[str, object]] = []
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as sub:
            await sub.subscribe(f"{TOPICS.base}/hub/+/port/+/event", qos=1)
            async with asyncio.timeout(4):
                async for message in sub.messages:
                    assert isinstance(message.payload, bytes)
                    events.append(json.loads(message.payload))
                    if len(events) == len(down):
                        break
        await eventually(lambda: publisher.connected and store.outbox_size() == 0, "outbox drained")
        assert publisher.last_error is None
        assert [(e["port"], e["to"]) for e in events] == [(r.port, p.value) for r, p in down]
        assert_latest(await latest_retained(mosquitto, store), store)


async def test_first_failure_warns_retries_are_quiet_and_password_never_logged(store: Store) -> None:
    secret = "pa55-never-in-logs"
    publisher = MqttPublisher(
        MqttConfig(url=f"mqtt://127.0.0.1:{free_port()}", username="bench"),  # nobody listens there
        TOPICS,
        store,
        PayloadRenderer(TOPICS),
        password=secret,
    )
    with capture_logs() as logs:
        stop = asyncio.Event()
        task = asyncio.create_task(publisher.run(stop))
        await eventually(
            lambda: sum(e["event"] == "mqtt_connect_failed" for e in logs) >= 2, "two attempts", within=3
        )
        walk(store, PortRef("a", 1), Phase.DETECTED)  # recording works while the broker is away
        stop.set()
        started = time.monotonic()
        async with asyncio.timeout(1):
            await task  # a stop during the backoff wait returns at once
        assert time.monotonic() - started < 0.5
    failures = [e for e in logs if e["event"] == "mqtt_connect_failed"]
    assert [e["log_level"] for e in failures[:2]] == ["warning", "debug"]
    assert all(e["broker"] == publisher.broker for e in failures)
    assert publisher.last_error is not None
    assert "refused" in publisher.last_error.lower()
    assert not publisher.connected
    assert store.outbox_size() == 4  # state, phase, colour and the event: kept for the broker
    assert secret not in repr(logs)


async def test_station_status_online_then_explicit_offline(mosquitto: Mosquitto, store: Store) -> None:
    a1 = PortRef("a", 1)
    publisher = publisher_for(mosquitto.url, store)
    stop = asyncio.Event()
    task = asyncio.create_task(publisher.run(stop))
    await eventually(lambda: publisher.connected, "connected")
    got = await retained_messages(mosquitto.host, mosquitto.port, TOPICS.status, {TOPICS.status})
    assert got == {TOPICS.status: b"online"}
    walk(store, a1, Phase.DETECTED, Phase.UPDATING)  # recorded just before stop: still delivered
    stop.set()
    async with asyncio.timeout(3):
        await task
    assert not publisher.connected
    assert store.outbox_size() == 0
    expect = {TOPICS.status, TOPICS.port_state(a1)}
    got = await retained_messages(mosquitto.host, mosquitto.port, f"{TOPICS.base}/#", expect)
    # A clean disconnect suppresses the will: this `offline` can only be the explicit one.
    assert got[TOPICS.status] == b"offline"
    assert json.loads(got[TOPICS.port_state(a1)])["phase"] == "updating"


async def test_cancelled_publisher_returns_promptly_and_says_offline(
    mosquitto: Mosquitto, store: Store
) -> None:
    publisher = publisher_for(mosquitto.url, store)
    task = asyncio.create_task(publisher.run(asyncio.Event()))
    await eventually(lambda: publisher.connected, "connected")
    task.cancel()
    started = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(2):
            await task
    assert time.monotonic() - started < 1.0
    got = await retained_messages(mosquitto.host, mosquitto.port, TOPICS.status, {TOPICS.status})
    assert got == {TOPICS.status: b"offline"}


_CHILD = """
import asyncio, sys
from pathlib import Path
from daemon.config import MqttConfig, TlsConfig
from daemon.mqtt.payloads import PayloadRenderer
from daemon.mqtt.publisher import MqttPublisher, cancel_and_wait
from daemon.mqtt.topics import Topics
from daemon.store import Store

topics = Topics("benchhub", "t1")
renderer = PayloadRenderer(topics)
store = Store(Path(sys.argv[1]), renderer=renderer)
publisher = MqttPublisher(MqttConfig(url=sys.argv[2]), topics, store, renderer)
asyncio.run(publisher.run(asyncio.Event()))
"""


async def test_last_will_says_offline_when_the_process_dies(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """SIGKILL leaves no chance for a goodbye: only the broker's last will can say `offline`."""
    statuses: list[bytes] = []
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as sub:
        await sub.subscribe(TOPICS.status, qos=1)
        child = await asyncio.create_subprocess_exec(
            *(sys.executable, "-c", _CHILD, str(tmp_path / "child.sqlite3"), mosquitto.url),
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.DEVNULL,
        )
        killed = False
        try:
            async with asyncio.timeout(10):  # the child imports the daemon first
                async for message in sub.messages:
                    assert isinstance(message.payload, bytes)
                    statuses.append(message.payload)
                    if message.payload == b"online":
                        break
            child.send_signal(signal.SIGKILL)
            killed = True
            async with asyncio.timeout(3):
                async for message in sub.messages:
                    assert isinstance(message.payload, bytes)
                    statuses.append(message.payload)
                    if message.payload == b"offline":
                        break
        finally:
            # Kill only once: a second kill() polls the dead child and reaps it before asyncio's
            # child watcher can, which then reports returncode 255.
            if not killed:
                child.kill()
            async with asyncio.timeout(5):
                await child.wait()
    assert statuses[-2:] == [b"online", b"offline"]
    assert child.returncode == -signal.SIGKILL
    got = await retained_messages(mosquitto.host, mosquitto.port, TOPICS.status, {TOPICS.status})
    assert got == {TOPICS.status: b"offline"}  # retained, for dashboards that connect later


async def test_state_is_republished_to_a_broker_that_lost_it(mosquitto: Mosquitto, store: Store) -> None:
    refs = [PortRef("a", 1), PortRef("a", 2), PortRef("b", 7)]
    store.ensure_ports(refs)
    walk(store, refs[0], Phase.DETECTED, Phase.UPDATING)
    walk(store, refs[1], Phase.DETECTED, Phase.DONE)
    publisher = publisher_for(mosquitto.url, store)
    async with running(publisher):
        await eventually(lambda: publisher.connected and store.outbox_size() == 0, "outbox drained")
        assert_latest(await latest_retained(mosquitto, store), store)

        mosquitto.restart()  # no persistence: every retained message is gone
        lost = await retained_messages(mosquitto.host, mosquitto.port, f"{TOPICS.base}/#", {"-"}, within=0.2)
        assert not lost, f"the restarted broker should have forgotten everything, has {sorted(lost)}"
        assert store.outbox_size() == 0  # so only the reconnect snapshot can bring the state back

        await eventually(lambda: publisher.connected, "reconnected", within=4)
        got = await latest_retained(mosquitto, store)
    assert_latest(got, store)
    assert got[TOPICS.status] == b"online"


async def test_outage_in_the_middle_of_a_drain_loses_nothing(mosquitto: Mosquitto, store: Store) -> None:
    """The broker dies while a long backlog is going out: the publisher must neither hang on a
    PUBACK that cannot come nor ack what was not confirmed; it resumes and empties the outbox."""
    refs = [PortRef("a", n) for n in range(1, 9)]
    for ref in refs:  # 8 ports x 25 attempts: 200 transition events (events are never coalesced)
        walk(store, ref, Phase.DETECTED, *[Phase.UPDATING] * 25)
    backlog = store.outbox_size()
    publisher = publisher_for(mosquitto.url, store)
    async with running(publisher):
        await eventually(lambda: publisher.published > 50, "publishing started")
        mosquitto.stop()
        await eventually(lambda: not publisher.connected, "publisher noticed the outage", within=2)
        assert 0 < store.outbox_size() < backlog, "the broker should have died mid-drain"
        mosquitto.start()
        await eventually(lambda: publisher.connected and store.outbox_size() == 0, "outbox drained", within=5)
        assert_latest(await latest_retained(mosquitto, store), store)


async def test_tls_verifies_the_broker_certificate(tmp_path: Path, store: Store) -> None:
    ca, cert, key = make_certs(tmp_path)
    tls_lines = [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}"]
    with Mosquitto(tmp_path / "tls", binary=require_mosquitto(), extra_config=tls_lines) as broker:
        url = f"mqtts://{broker.host}:{broker.port}"

        trusted = MqttPublisher(
            MqttConfig(url=url, tls=TlsConfig(ca_file=ca)), TOPICS, store, PayloadRenderer(TOPICS)
        )
        async with running(trusted):
            await eventually(lambda: trusted.connected, "connected over TLS")
        client_tls = ssl.create_default_context(cafile=str(ca))
        got = await retained_messages(
            broker.host, broker.port, TOPICS.status, {TOPICS.status}, tls_context=client_tls
        )
        assert got == {TOPICS.status: b"offline"}  # online, then the explicit goodbye, over TLS

        untrusted = publisher_for(url, store)  # system CAs do not know our private CA
        with capture_logs() as logs:
            async with running(untrusted):
                await eventually(lambda: untrusted.last_error is not None, "a TLS failure")
        assert not untrusted.connected
        assert "certificate verify failed" in (untrusted.last_error or "").lower()
        assert [e["log_level"] for e in logs if e["event"] == "mqtt_connect_failed"] == ["warning"]

        insecure = MqttPublisher(
            MqttConfig(url=url, tls=TlsConfig(insecure=True)), TOPICS, store, PayloadRenderer(TOPICS)
        )
        async with running(insecure):
            await eventually(lambda: insecure.connected, "connected without verification")


@pytest.mark.parametrize("after", [5, 40, 120])
async def test_stop_in_the_middle_of_a_drain_finishes_it_and_says_offline(
    mosquitto: Mosquitto, store: Store, after: int
) -> None:
    """Stop lands while PUBACKs are streaming in. (Python 3.11's asyncio.wait_for, which aiomqtt
    uses, can swallow a cancellation that coincides with a PUBACK; the publisher must not hang.)"""
    ref = PortRef("a", 1)
    walk(store, ref, Phase.DETECTED, *[Phase.UPDATING] * 200)  # 200 events: a long backlog
    publisher = publisher_for(mosquitto.url, store)
    stop = asyncio.Event()
    task = asyncio.create_task(publisher.run(stop))
    await eventually(lambda: publisher.published > after, f"{after} messages out")
    stop.set()
    async with asyncio.timeout(3):
        await task
    assert store.outbox_size() == 0  # the stop drain (<= 2 s) had plenty of time for the rest
    expect = {TOPICS.status, TOPICS.port_state(ref)}
    got = await retained_messages(mosquitto.host, mosquitto.port, f"{TOPICS.base}/#", expect)
    assert got[TOPICS.status] == b"offline"
    assert json.loads(got[TOPICS.port_state(ref)])["seq"] == store.port(ref).seq


async def test_cancel_and_wait_outlasts_a_swallowed_cancellation() -> None:
    """Deterministic version of the race above: the task drops the first cancellation, as
    Python 3.11's asyncio.wait_for does when the awaited PUBACK arrives at the same moment."""
    swallowed = 0

    async def publishing() -> None:
        nonlocal swallowed
        try:
            await asyncio.sleep(10)  # waiting for a PUBACK
        except asyncio.CancelledError:
            swallowed += 1  # wait_for returned the result instead
        await asyncio.Event().wait()  # ... and the loop waits for the next outbox message

    task = asyncio.create_task(publishing())
    await asyncio.sleep(0)
    async with asyncio.timeout(1):
        await cancel_and_wait(task)
    assert swallowed == 1
    assert task.cancelled()
