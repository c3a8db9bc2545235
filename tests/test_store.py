"""The store: transitions, device memory, append-only history, the outbox and crash recovery."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from daemon.models import DeviceIdentity, ErrorInfo, PortRef, Transition
from daemon.mqtt.payloads import PayloadRenderer
from daemon.mqtt.topics import Topics
from daemon.store import Store, StoreError
from daemon.workflow.phases import IllegalTransition, Phase

REF = PortRef("hub-a", 3)
PHONE = DeviceIdentity(udid="00008030-001A2C3E0E12802E", ecid="001A2C3E0E12802E", serial="F2LXK3ABHG7F")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "bench.sqlite3", PayloadRenderer(Topics("benchhub", "s1")))
    s.ensure_ports([REF])
    return s


def test_transition_updates_port_device_history_and_outbox_together(store: Store) -> None:
    store.record(Transition(REF, Phase.DETECTED, step="detect", attempt=1, device=PHONE))
    state = store.record(Transition(REF, Phase.UPDATING, step="update", attempt=1))
    assert state.phase is Phase.UPDATING
    assert state.device == PHONE  # carried over from the previous state
    assert state.seq == 2
    device = store.device("ecid:001A2C3E0E12802E")
    assert device is not None
    assert (device.phase, device.step, device.port) == (Phase.UPDATING, "update", REF)
    assert [(h.from_phase, h.phase) for h in store.history(device_key=device.key)] == [
        (Phase.EMPTY, Phase.DETECTED),
        (Phase.DETECTED, Phase.UPDATING),
    ]
    # Both events stay queued; the unsent retained state of the first transition was replaced by the
    # second's (the broker keeps only the newest retained message per topic anyway).
    base = "benchhub/s1/hub/hub-a/port/3"
    outbox = store.outbox()
    assert [row.message.topic for row in outbox] == [
        f"{base}/event",
        f"{base}/state",
        f"{base}/state/phase",
        f"{base}/state/color",
        f"{base}/event",
    ]
    assert [json.loads(outbox[i].message.payload)["to"] for i in (0, 4)] == ["detected", "updating"]
    assert outbox[3].message.payload == b"blue"  # updating, in the default colour map
    last_state = json.loads(outbox[1].message.payload)
    assert last_state["phase"] == "updating"
    assert last_state["serial"] == "F2LXK3ABHG7F"
    assert last_state["seq"] == 2


def test_illegal_transition_writes_nothing(store: Store) -> None:
    with pytest.raises(IllegalTransition):
        store.record(Transition(REF, Phase.DONE))
    assert store.counts() == {"ports": 1, "devices": 0, "history": 0, "outbox": 0, "hubs": 0}


def test_unplug_keeps_the_device_outcome(store: Store) -> None:
    store.record(Transition(REF, Phase.DETECTED, device=PHONE))
    store.record(Transition(REF, Phase.FAILED, step="erase", error=ErrorInfo("timeout", "too slow")))
    store.record(Transition(REF, Phase.EMPTY))
    assert store.port(REF).device is None
    device = store.device("ecid:001A2C3E0E12802E")
    assert device is not None
    assert device.phase is Phase.FAILED
    assert device.error == ErrorInfo("timeout", "too slow")


def test_recover_marks_running_ports_interrupted_and_keeps_the_step(store: Store) -> None:
    store.record(Transition(REF, Phase.DETECTED, device=PHONE))
    store.record(Transition(REF, Phase.ENROLLING, step="enroll", attempt=1))
    recovered = store.recover()
    assert [s.phase for s in recovered] == [Phase.INTERRUPTED]
    assert store.port(REF).step == "enroll"
    device = store.device("ecid:001A2C3E0E12802E")
    assert device is not None
    assert (device.phase, device.step) == (Phase.INTERRUPTED, "enroll")
    assert store.history()[-1].actor == "recovery"
    assert store.recover() == []


def test_progress_is_published_but_not_history(store: Store) -> None:
    store.record(Transition(REF, Phase.DETECTED, device=PHONE))
    store.record(Transition(REF, Phase.UPDATING, step="update"))
    before = len(store.history())
    state = store.set_progress(REF, 40, "restoring")
    assert (state.progress, state.detail, state.seq) == (40, "restoring", 3)
    assert len(store.history()) == before
    assert json.loads(store.outbox()[-1].message.payload)["progress"] == 40


def test_outbox_ack_forgets_only_acknowledged(store: Store) -> None:
    store.record(Transition(REF, Phase.DETECTED, device=PHONE))
    rows = store.outbox()
    store.ack([rows[0].id])
    assert [r.id for r in store.outbox()] == [r.id for r in rows[1:]]


def test_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "bench.sqlite3"
    first = Store(path)
    first.ensure_ports([REF])
    first.record(Transition(REF, Phase.DETECTED, device=PHONE))
    first.close()
    second = Store(path)
    assert second.port(REF).phase is Phase.DETECTED
    assert second.port(REF).device == PHONE
    second.close()


def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "junk.sqlite3"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="cannot be used as the benchhub database"):
        Store(path)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bench.sqlite3"
    Store(path).close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value='99' WHERE key='schema'")
    with pytest.raises(StoreError, match="newer benchhub"):
        Store(path)
