"""A broker outage in the middle of a working bench: nothing the store recorded is lost on MQTT.

The claim under test (DESIGN §2, `daemon/store.py`): every transition is committed together with its
event message, and the publisher deletes a message only after the broker acknowledged it, so a broker
that is gone for half a minute delays events and loses none, reorders none, and every port's retained
state ends up equal to the store's.

How the test can see that although the subscriber, too, loses the broker: the recorder is a
persistent MQTT session (clean session off, fixed client id, QoS 1 subscription) on a Mosquitto with
persistence, so the broker keeps the recorder's subscription and its undelivered messages across the
restart, and it queues for the recorder whatever the daemon publishes before the recorder is back.
Whether the recorder or the daemon reconnects first therefore does not matter, and any event missing
at the recorder is one the daemon never delivered. The comparison is with the store's history, row
by row and in order per port, so a dropped, reordered or invented event fails the test; a duplicate
(QoS 1 is at-least-once: a PUBACK lost in the crash) is tolerated only as an exact repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from daemon.models import iso
from daemon.sim.demo import technician
from daemon.store import Store
from daemon.workflow.phases import SETTLED, Phase
from tests.conftest import eventually, running, station_config
from tests.mqtt_broker import Mosquitto, free_port, require_mosquitto, retained_messages

OUTAGE_SECONDS = float(os.environ.get("BENCHHUB_OUTAGE_SECONDS", "30"))
"""How long the broker is away (the issue asks for 30 s; the whole test stays under 45 s).

A longer outage (`BENCHHUB_OUTAGE_SECONDS=60`, run before a release) exercises nothing a 30 s one
does not: the station has lost its connection within a second either way (the broker's sockets
close, keepalive plays no part), the reconnect backoff is capped below for this test, and the
outbox only grows linearly, far below its limit. So CI runs 30 s, once."""
SPEED = 300.0
"""Simulated speed: a device's whole workflow takes a few seconds, so with the technician swapping
finished devices every port goes through several devices during the outage."""
BASE = "benchhub/demo"


class PersistentMosquitto(Mosquitto):
    """Mosquitto that keeps sessions, queued QoS 1 messages and retained messages across a restart
    (written on SIGTERM), and queues without limit for an offline persistent client: the default
    (1,000) would drop the recorder's messages and blame the daemon for it."""

    def _write_config(self) -> None:
        super()._write_config()
        lines = self.config_path.read_text().splitlines()
        lines = [line for line in lines if not line.startswith("persistence ")]
        lines += [
            "persistence true",
            f"persistence_location {self.workdir}/",
            "max_queued_messages 0",
            "max_inflight_messages 0",
        ]
        self.config_path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PersistentMosquitto]:
    broker = PersistentMosquitto(
        tmp_path_factory.mktemp("mosquitto"), port=free_port(), binary=require_mosquitto()
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


class Recorder:
    """A persistent-session subscriber to every port's events that reconnects until stopped."""

    def __init__(self, broker: Mosquitto) -> None:
        self.broker = broker
        self.events: list[dict[str, Any]] = []
        self.connected = asyncio.Event()
        self.connections = 0

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    self.broker.host,
                    self.broker.port,
                    identifier="outage-recorder",
                    clean_session=False,
                    timeout=2.0,
                ) as client:
                    # Subscribing again after a reconnect is harmless; the session already has it.
                    await client.subscribe(f"{BASE}/hub/+/port/+/event", qos=1)
                    self.connections += 1
                    self.connected.set()
                    async for message in client.messages:
                        assert isinstance(message.payload, bytes)
                        self.events.append(json.loads(message.payload))
            except (aiomqtt.MqttError, OSError):
                self.connected.clear()
                await asyncio.sleep(0.1)


def per_port(items: list[tuple[str, tuple[Any, ...]]]) -> dict[str, list[tuple[Any, ...]]]:
    grouped: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for port, item in items:
        grouped[port].append(item)
    return dict(grouped)


async def test_a_30_s_broker_outage_loses_and_reorders_no_event(
    tmp_path: Path, broker: PersistentMosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The production backoff waits up to 30 s (+20 %) between attempts late in an outage, so the
    # station could come back half a minute after the broker. The curve is not what this test is
    # about; capping it keeps the test short without changing what reaches the broker.
    monkeypatch.setattr("daemon.mqtt.publisher.backoff_delay", lambda tries: 0.3)
    config = station_config(tmp_path, broker, devices=8, ports=8, speed=SPEED)
    recorder = Recorder(broker)
    recording = asyncio.create_task(recorder.run())
    async with running(config) as station:
        assert station.world is not None
        bench = asyncio.create_task(technician(station.world, config, station.ports, dwell=0.3))
        try:
            await asyncio.wait_for(recorder.connected.wait(), 5)
            await eventually(lambda: len(recorder.events) >= 8, what="the first events before the outage")

            broker.stop()
            outage_started = len(station.store.history())
            await asyncio.sleep(OUTAGE_SECONDS)
            during = len(station.store.history()) - outage_started
            queued = station.store.outbox_size()
            broker.start()
            # The bench keeps going a little after the broker is back, so new transitions queue
            # behind the backlog being drained.
            await asyncio.sleep(1.0)
        finally:
            bench.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await bench

        def quiet() -> bool:
            # Every device finished (or no device) and nothing left to publish.
            return all(s.phase in SETTLED or s.phase is Phase.EMPTY for s in station.ports()) and (
                station.store.outbox_size() == 0
            )

        await eventually(quiet, what="the bench settled and the outbox drained", within=12)
        history = station.store.history()
        # Give the last deliveries a moment, then compare whatever arrived: a missing event then
        # shows as a precise difference below rather than as a timeout.
        deadline = time.monotonic() + 5
        while len({(e["hub"], e["port"], e["seq"]) for e in recorder.events}) < len(history):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        ports = station.store.ports()

        # Every recorded transition is an event on MQTT, in the store's order, per port.
        expected = per_port(
            [
                (
                    f"{h.ref.hub}/{h.ref.port}",
                    (h.from_phase.value, h.phase.value, h.step, h.attempt, iso(h.ts)),
                )
                for h in history
            ]
        )
        received: list[tuple[str, tuple[Any, ...]]] = []
        delivered: dict[tuple[str, int], tuple[Any, ...]] = {}
        last_seq: dict[str, int] = {}
        for event in recorder.events:
            port = f"{event['hub']}/{event['port']}"
            item = (event["from"], event["to"], event["step"], event["attempt"], event["ts"])
            if (port, event["seq"]) in delivered:
                # At-least-once: an exact repeat of a delivered event is allowed, and only that.
                assert delivered[port, event["seq"]] == item, f"{port}: two events with seq {event['seq']}"
                continue
            assert event["seq"] > last_seq.get(port, 0), f"{port}: seq {event['seq']} after {last_seq[port]}"
            delivered[port, event["seq"]] = item
            last_seq[port] = event["seq"]
            received.append((port, item))
        assert per_port(received) == expected
        # And the test did test something: the bench kept working through the outage, and the
        # outbox held the outage's events (an event plus retained rows per transition).
        assert during > 100, f"only {during} transitions during the outage: the bench stood still"
        assert queued > during, "the outage's events were not held in the outbox"

        # No port's latest state is missing: retained state == store state, for every port.
        expect = {f"{BASE}/hub/hub-a/port/{s.ref.port}/state" for s in ports}
        seen = await retained_messages(broker.host, broker.port, f"{BASE}/hub/+/port/+/state", expect)
        for state in ports:
            doc = json.loads(seen[f"{BASE}/hub/hub-a/port/{state.ref.port}/state"])
            assert (doc["phase"], doc["seq"]) == (state.phase.value, state.seq)
        assert station.store.dropped_events() == 0
    recording.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await recording
    assert recorder.connections >= 2, "the recorder never lost the broker: no outage happened"
    # The store agrees after the station stopped, too (nothing was left unsent).
    after = Store(config.storage.path)
    assert after.outbox_size() == 0
    after.close()
