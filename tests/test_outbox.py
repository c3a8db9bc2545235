"""The outbox under pressure: bounded during a long broker outage, and fed a throttled trickle of
progress, not every update a restore reports.

No broker here: an outage is simply the store recording while nobody drains it, which is exactly what
the publisher's absence looks like to the store.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from structlog.testing import capture_logs

from daemon.config import SchedulerConfig, WorkflowConfig
from daemon.models import PortRef, Transition
from daemon.mqtt.payloads import PayloadRenderer
from daemon.mqtt.topics import Topics
from daemon.store import Store
from daemon.workflow.phases import Phase
from daemon.workflow.runner import PortRunner
from daemon.workflow.scheduler import Scheduler
from daemon.workflow.steps.base import Services

TOPICS = Topics("benchhub", "s1")
PORTS = [PortRef(f"hub-{h}", p) for h in "abcd" for p in range(1, 16)]  # 60 ports, 4 x PP15S
LIFE = [
    Phase.DETECTED,
    Phase.UPDATING,
    Phase.ERASING,
    Phase.ENROLLING,
    Phase.AWAITING_ASSIGNMENT,
    Phase.SETTING_UP,
    Phase.DONE,
    Phase.EMPTY,
]
"""One device's life on a port; repeated, it is a bench that keeps working while the broker is away."""


def open_store(path: Path, limit: int) -> Store:
    store = Store(path, PayloadRenderer(TOPICS), outbox_limit=limit)
    store.ensure_ports(PORTS)
    return store


def outage(store: Store, devices_per_port: int) -> list[dict[str, Any]]:
    """Record `devices_per_port` whole lives on every port, interleaved across ports as a real bench
    does, with some progress on the way; return every event document produced, in order."""
    events = []
    for life in range(devices_per_port):
        for phase in LIFE:
            for ref in PORTS:
                state = store.record(Transition(ref, phase, step=phase.value, detail=f"life {life}"))
                events.append({"port": f"{ref.hub}/{ref.port}", "to": phase.value, "seq": state.seq})
                if phase is Phase.UPDATING:
                    store.set_progress(ref, 50, "restoring")
    return events


def queued(store: Store) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """The outbox split into its events (in queue order) and its retained messages (by topic)."""
    rows = store.outbox(limit=1_000_000)
    events = []
    retained: dict[str, bytes] = {}
    for row in rows:
        if row.message.retain:
            assert row.message.topic not in retained, "one retained message per topic"
            retained[row.message.topic] = row.message.payload
        else:
            doc = json.loads(row.message.payload)
            events.append({"port": f"{doc['hub']}/{doc['port']}", "to": doc["to"], "seq": doc["seq"]})
    return events, retained


def test_a_long_outage_keeps_the_newest_events_and_every_ports_state(tmp_path: Path) -> None:
    limit = 1_000
    path = tmp_path / "bench.sqlite3"
    store = open_store(path, limit)
    with capture_logs() as logs:
        produced = outage(store, devices_per_port=10)  # 4,800 transitions, ~20,000 messages
    assert len(produced) == 4_800

    assert store.outbox_size() == limit
    events, retained = queued(store)
    # Every port's latest state survives: the state document with the store's seq, and its phase.
    for state in store.ports():
        doc = json.loads(retained[TOPICS.port_state(state.ref)])
        assert (doc["phase"], doc["seq"]) == (state.phase.value, state.seq)
        assert retained[TOPICS.port_phase(state.ref)] == state.phase.value.encode()
    # What is left of the events is exactly the newest ones, in their original order: the oldest
    # went first, nothing in the middle is missing, nothing is reordered.
    assert events == produced[-len(events) :]
    assert len(events) == limit - len(retained)
    dropped = len(produced) - len(events)
    assert store.dropped_events() == dropped
    # One warning for the whole outage, not one per dropped event.
    warnings = [e for e in logs if e["event"] == "outbox_events_dropped"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    store.close()

    # The count is in the database: a restart (during or after the outage) still knows the loss.
    reopened = open_store(path, limit)
    assert reopened.dropped_events() == dropped
    assert queued(reopened) == (events, retained)
    # ... and keeps bounding, counting on from there.
    more = outage(reopened, devices_per_port=1)
    assert reopened.outbox_size() == limit
    assert reopened.dropped_events() == dropped + len(more)
    reopened.close()


def test_the_limit_counts_acks_and_a_new_outage_warns_again(tmp_path: Path) -> None:
    store = open_store(tmp_path / "bench.sqlite3", 400)
    with capture_logs() as logs:
        outage(store, devices_per_port=2)
        first = store.dropped_events()
        assert first > 0
        # The broker is back: the publisher drains everything.
        while rows := store.outbox(limit=200):
            store.ack([row.id for row in rows])
        assert store.outbox_size() == 0
        # A short blip stays under the limit and drops nothing.
        for phase in (Phase.DETECTED, Phase.EMPTY):
            for ref in PORTS[:10]:
                store.record(Transition(ref, phase))
        assert store.outbox_size() < 400
        assert store.dropped_events() == first
        # A second long outage is a new episode, warned about again.
        outage(store, devices_per_port=2)
        assert store.outbox_size() == 400
        assert store.dropped_events() > first
    names = [e["event"] for e in logs]
    assert names.count("outbox_events_dropped") == 2
    assert names.count("outbox_drained_after_drops") == 1
    # Acking an id that was dropped meanwhile (the publisher read it before the overflow) is harmless
    # and does not throw the count off.
    store.ack([1, 2, 3])
    assert store.outbox_size() == 400
    outage(store, devices_per_port=1)
    assert store.outbox_size() == 400
    store.close()


def test_an_event_dropped_while_in_flight_and_then_acked_is_not_counted_as_lost(tmp_path: Path) -> None:
    """The publisher reads a batch, then the outbox overflows (the publisher is behind a burst) and
    drops the oldest events, some of them in that batch; the broker confirms the batch. Those events
    were delivered: only the ones the broker never got count as dropped."""
    path = tmp_path / "bench.sqlite3"
    store = open_store(path, 400)

    def events_queued() -> set[int]:
        # Looked at through a connection of its own: `Store.outbox()` is the publisher's read.
        with contextlib.closing(sqlite3.connect(path)) as db:
            return {row[0] for row in db.execute("SELECT id FROM outbox WHERE retain = 0")}

    outage(store, devices_per_port=1)  # fills the outbox to the limit
    batch = store.outbox(limit=200)
    in_batch = {r.id for r in batch if not r.message.retain}
    before, queued_before = store.dropped_events(), events_queued()
    outage(store, devices_per_port=1)  # overflows: the oldest events, the batch's among them, go
    gone = queued_before - events_queued()
    assert in_batch & gone, "the overflow dropped events the publisher was sending"
    assert gone - in_batch, "... and events it had not read yet"
    counted = store.dropped_events()
    store.ack([r.id for r in batch])  # the broker confirmed the whole batch
    assert store.dropped_events() == counted - len(in_batch & gone)
    # A later read means that batch is over: acking it again (not that the publisher would) changes
    # nothing, and events dropped from the new batch are counted until the broker confirms them.
    store.outbox(limit=200)
    store.ack([r.id for r in batch])
    assert store.dropped_events() == counted - len(in_batch & gone)
    assert store.dropped_events() - before == len(gone - in_batch) + (counted - before - len(gone))
    store.close()


def test_retained_states_alone_may_exceed_a_tiny_limit_but_are_never_dropped(tmp_path: Path) -> None:
    # 60 ports x (state, phase, colour) retained topics is more than 100 messages: the limit then
    # bounds only the events (all dropped), and every state is still there.
    store = open_store(tmp_path / "bench.sqlite3", 100)
    produced = outage(store, devices_per_port=1)
    events, retained = queued(store)
    assert events == []
    assert store.dropped_events() == len(produced)
    assert {TOPICS.port_state(ref) for ref in PORTS} <= retained.keys()
    assert store.outbox_size() == len(retained)
    store.close()


class FakeClock:
    """Stands in for the runner's `time` module: the throttle's one-second rule without sleeping."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr("daemon.workflow.runner.time", SimpleNamespace(monotonic=fake.monotonic))
    return fake


async def test_a_burst_of_progress_is_throttled_and_a_phase_change_is_not(
    tmp_path: Path, clock: FakeClock
) -> None:
    """1,000 progress reports from a restore (the backend may report every block) reach the store,
    and so the outbox and the broker, as a handful of updates; the transition that follows is
    recorded at once. Driven through the callback the runner hands to steps (`ctx.progress`)."""
    store = Store(tmp_path / "bench.sqlite3", PayloadRenderer(TOPICS))
    ref = PORTS[0]
    store.ensure_ports([ref])
    workflow = WorkflowConfig()
    runner = PortRunner(
        ref,
        store,
        cast(Services, None),
        workflow,
        Scheduler(SchedulerConfig(), workflow.policy, lambda ref: "usb1"),
    )
    await runner._record(Phase.DETECTED, step="detect")
    await runner._record(Phase.UPDATING, step="update", attempt=1)
    report = runner._report_progress  # what steps receive as `ctx.progress`
    start = store.port(ref).seq

    # A jittery burst, 1,000 reports within half a second, all within 40-44 %: one write.
    for i in range(1_000):
        report(40 + i % 5, "restoring")
        clock.now += 0.0005
    assert store.port(ref).seq - start == 1
    assert store.port(ref).progress == 40

    # A steady climb 0 -> 100 % in 1,000 reports over 2 s: the 5-point rule, the 1 s rule and the
    # final 100 % allow at most 20 + 2 + 1 writes, and the last one is 100 %.
    before = store.port(ref).seq
    for i in range(1_000):
        report(min(100, i // 10 + 1), "restoring")
        clock.now += 0.002
    writes = store.port(ref).seq - before
    assert 15 <= writes <= 23
    assert store.port(ref).progress == 100

    # The phase change right after, in the same instant: never throttled, with its event queued.
    erasing = await runner._record(Phase.ERASING, step="erase", attempt=1)
    assert erasing is not None
    assert store.port(ref).phase is Phase.ERASING
    assert erasing.seq == before + writes + 1
    events = [json.loads(r.message.payload) for r in store.outbox(limit=1_000) if not r.message.retain]
    assert [e["to"] for e in events][-1] == "erasing"
    assert events[-1]["seq"] == erasing.seq
    # A new detail is news even within the second: the erase's first words get out at once.
    report(None, "waiting for the device to reboot")
    assert store.port(ref).seq == erasing.seq + 1
    # In all, 1,000s of reports cost the outbox one state row (replaced) and the three events.
    assert len(events) == 3
    assert store.outbox_size() == len(events) + len(
        [r for r in store.outbox(limit=1_000) if r.message.retain]
    )
    store.close()
