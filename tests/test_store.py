"""The store: transitions, device memory, append-only history, the outbox and crash recovery."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from structlog.testing import capture_logs

from daemon.config import SchedulerConfig, WorkflowConfig
from daemon.models import DeviceIdentity, ErrorInfo, OutboxMessage, PortRef, Queued, Transition
from daemon.mqtt.payloads import PayloadRenderer
from daemon.mqtt.topics import Topics
from daemon.store import BUSY_TIMEOUT, Store, StoreError, StoreUnavailable
from daemon.workflow.phases import IllegalTransition, Phase
from daemon.workflow.runner import PortRunner
from daemon.workflow.scheduler import Scheduler
from daemon.workflow.steps.base import Services

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


def test_a_place_in_line_is_kept_until_the_next_progress_or_transition(store: Store) -> None:
    store.record(Transition(REF, Phase.DETECTED, device=PHONE))
    store.record(UPDATING)
    place = Queued(2, "usb1", 10, 10)
    store.set_progress(REF, None, place.describe(), place)
    assert store.port(REF).queue == place
    store.set_progress(REF, None, "starting")
    assert store.port(REF).queue is None
    store.set_progress(REF, None, place.describe(), place)
    store.record(Transition(REF, Phase.FAILED, step="update", error=ErrorInfo("timeout", "too slow")))
    assert store.port(REF).queue is None


def test_a_database_from_before_the_queue_column_gets_it_on_open(tmp_path: Path) -> None:
    path = tmp_path / "bench.sqlite3"
    first = Store(path)
    first.ensure_ports([REF])
    first.record(Transition(REF, Phase.DETECTED, device=PHONE))
    first._db.execute("ALTER TABLE ports DROP COLUMN queue")  # as written by benchhub before it
    first.close()
    second = Store(path)
    assert second.port(REF).device == PHONE
    second.record(UPDATING)
    second.set_progress(REF, None, "queued", Queued(1, "usb1", 1, 1))
    assert second.port(REF).queue == Queued(1, "usb1", 1, 1)
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


# ------------------------------------------------------------------------------------------------
# Writes that fail for a while: another process's lock, a full disk (the real SQLite, no mocks)

UPDATING = Transition(REF, Phase.UPDATING, step="update", attempt=1)


def lock(path: Path) -> sqlite3.Connection:
    """Another process's write lock (a backup tool, `sqlite3` left in a transaction)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    return conn


def release(conn: sqlite3.Connection) -> None:
    conn.execute("ROLLBACK")
    conn.close()


@contextmanager
def locked(path: Path) -> Iterator[sqlite3.Connection]:
    conn = lock(path)
    try:
        yield conn
    finally:
        release(conn)


def fill_disk(store: Store) -> None:
    """SQLITE_FULL as on a full disk: the daemon's connection may not grow the file (the seam is
    `_db`, as in tests/test_fault_survival.py)."""
    store._db.execute("VACUUM")
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")


def free_disk(store: Store) -> None:
    store._db.execute("PRAGMA max_page_count = 1073741823")


def store_events(logs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["event"], e["log_level"]) for e in logs if e["event"].startswith("store_")]


def test_a_locked_database_fails_a_write_fast_writes_nothing_and_says_so_once(store: Store) -> None:
    store.record(Transition(REF, Phase.DETECTED, device=PHONE))
    before = store.counts()
    changes: list[str | None] = []
    store.on_health_change(lambda: changes.append(store.failing))
    with capture_logs() as logs:
        with locked(store.path):
            started = time.monotonic()
            for _ in range(3):
                with pytest.raises(StoreUnavailable, match="database is locked"):
                    store.record(UPDATING)
            # Each attempt waits the short busy timeout, not seconds: the event loop is not stalled.
            assert time.monotonic() - started < 3 * BUSY_TIMEOUT + 0.5
            assert store.failing == "database is locked"
            assert store.failing_since is not None
            assert store.counts() == before
        state = store.record(UPDATING)  # the same transition, retried: written once
        assert store.failing == "database is locked"  # one write that got through proves little
        store._run_probe()  # the store's own probe (a timer on a running loop) ends the episode
    assert state.phase is Phase.UPDATING
    assert store.failing is None
    assert store.failing_since is None
    assert [(h.from_phase, h.phase) for h in store.history()] == [
        (Phase.EMPTY, Phase.DETECTED),
        (Phase.DETECTED, Phase.UPDATING),
    ]
    assert changes == ["database is locked", None]
    # Loud, but once per episode: one error when it starts, one line when it ends, with the count.
    assert store_events(logs) == [("store_unavailable", "error"), ("store_recovered", "warning")]
    recovered = next(e for e in logs if e["event"] == "store_recovered")
    assert recovered["failed_attempts"] == 3
    assert recovered["error"] == "database is locked"


def test_a_full_disk_rolls_the_transition_back_and_the_same_write_succeeds_later(store: Store) -> None:
    store.record(Transition(REF, Phase.DETECTED, device=PHONE))
    big = Transition(REF, Phase.UPDATING, step="update", attempt=1, extra={"log": "x" * 50_000})
    fill_disk(store)
    before = store.counts()
    with pytest.raises(StoreUnavailable, match="full"):
        store.record(big)
    assert store.failing is not None
    assert "full" in store.failing
    assert store.counts() == before  # nothing half-written: port, device, history, outbox
    assert store.port(REF).phase is Phase.DETECTED
    free_disk(store)
    store.record(big)
    store._run_probe()
    assert store.failing is None
    assert [h.phase for h in store.history()] == [Phase.DETECTED, Phase.UPDATING]


def test_a_bug_is_not_mistaken_for_an_unavailable_store(store: Store) -> None:
    with pytest.raises(sqlite3.OperationalError, match="no such table"), store._tx("bug"):
        store._db.execute("INSERT INTO nowhere VALUES (1)")
    assert store.failing is None


def test_progress_is_skipped_while_failing_without_touching_sqlite(store: Store) -> None:
    store.record(Transition(REF, Phase.DETECTED, device=PHONE))
    store.record(UPDATING)
    with locked(store.path):
        with pytest.raises(StoreUnavailable):
            store.record(Transition(REF, Phase.ERASING, step="erase", attempt=1))
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="database is locked"):
            store.set_progress(REF, 50, "restoring")
        assert time.monotonic() - started < BUSY_TIMEOUT / 2  # no wait for the lock
    assert store.port(REF).progress is None


def test_station_writes_and_acks_wait_for_the_database_to_recover(store: Store) -> None:
    """Hub status, station messages and acks never raise: they are written, in order, once the
    store's probe finds the database writable again; a row the broker confirmed is not handed out
    again meanwhile."""
    store.record(Transition(REF, Phase.DETECTED, device=PHONE))
    sent = store.outbox()
    with locked(store.path):
        with pytest.raises(StoreUnavailable):
            store.record(UPDATING)
        store.set_hub_status("hub-a", False)
        store.set_hub_status("hub-a", True)
        store.publish([OutboxMessage("benchhub/s1/note", b"1", retain=False)])
        store.ack([row.id for row in sent])
        assert store.outbox() == []  # confirmed, so not sent again; nothing else got written
        assert store.outbox_size() == 0
        assert store.hub_statuses() == {}
    store.record(UPDATING)
    store._run_probe()
    assert store.hub_statuses() == {"hub-a": True}
    rows = store.outbox()
    assert not {row.id for row in sent} & {row.id for row in rows}
    topics = [row.message.topic for row in rows]
    assert topics[-2:] == ["benchhub/s1/hub/hub-a/status", "benchhub/s1/note"]
    assert rows[-2].message.payload == b"online"


async def test_writable_returns_once_the_probe_finds_the_lock_gone(store: Store) -> None:
    """Nobody else writes (an idle bench): the store's own probe notices the recovery."""
    conn = lock(store.path)
    with pytest.raises(StoreUnavailable):
        store.record(Transition(REF, Phase.DETECTED, device=PHONE))
    loop = asyncio.get_running_loop()
    loop.call_later(0.5, release, conn)
    started = loop.time()
    async with asyncio.timeout(5):
        await store.writable()
    assert store.failing is None
    assert loop.time() - started >= 0.4
    assert store.history() == []  # the probe leaves no trace
    assert store._db.execute("SELECT count(*) FROM meta WHERE key = 'write_probe'").fetchone()[0] == 0


def runner_for(store: Store) -> PortRunner:
    workflow = WorkflowConfig()
    return PortRunner(
        REF,
        store,
        cast(Services, None),
        workflow,
        Scheduler(SchedulerConfig(), workflow.policy, lambda ref: "usb1"),
    )


async def max_lag(stop: asyncio.Event, lags: list[float]) -> None:
    """How late a 20 ms ticker runs: a stalled event loop shows as a long lag."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        planned = loop.time() + 0.02
        await asyncio.sleep(0.02)
        lags.append(loop.time() - planned)


async def test_a_port_waits_for_a_locked_store_and_records_its_transition_once(store: Store) -> None:
    """A lock held for 2 s (ten busy timeouts): the port's transition waits, without stalling the
    event loop, and is written once the lock is gone, in order; the device gets no outcome for it."""
    runner = runner_for(store)
    await runner._record(Phase.DETECTED, device=PHONE)
    conn = lock(store.path)
    loop = asyncio.get_running_loop()
    loop.call_later(2.0, release, conn)
    stop, lags = asyncio.Event(), []
    ticker = asyncio.create_task(max_lag(stop, lags))
    with capture_logs() as logs:
        state = await asyncio.wait_for(runner._record(Phase.UPDATING, step="update", attempt=1), 10)
    stop.set()
    await ticker
    assert state is not None
    assert state.phase is Phase.UPDATING
    assert [(h.from_phase, h.phase) for h in store.history()] == [
        (Phase.EMPTY, Phase.DETECTED),
        (Phase.DETECTED, Phase.UPDATING),
    ]
    assert max(lags) < 3 * BUSY_TIMEOUT, f"the event loop stalled {max(lags):.2f} s"
    assert store_events(logs) == [("store_unavailable", "error"), ("store_recovered", "warning")]
    assert [e["event"] for e in logs if e["event"].startswith("transition")] == [
        "transition_waiting_for_store",
        "transition_recorded_after_wait",
        "transition",
    ]


async def test_a_stopping_port_gives_up_on_a_full_disk_after_its_deadline(store: Store) -> None:
    """The shutdown path must not hang: it gives up after `within` s and says what was not written;
    the next start's recovery writes the same `interrupted`."""
    runner = runner_for(store)
    await runner._record(Phase.DETECTED, device=PHONE)
    await runner._record(Phase.UPDATING, step="update", attempt=1)
    fill_disk(store)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with capture_logs() as logs:
        state = await runner._record(
            Phase.INTERRUPTED,
            step="update",
            attempt=1,
            detail="x" * 50_000,  # more than fits: the write needs new pages
            actor="recovery",
            within=0.5,
        )
    assert state is None
    assert 0.4 <= loop.time() - started < 2.0
    lost = next(e for e in logs if e["event"] == "transition_not_recorded")
    assert lost["log_level"] == "error"
    assert lost["phase"] == "interrupted"
    assert store.port(REF).phase is Phase.UPDATING
    free_disk(store)
    assert [s.phase for s in store.recover()] == [Phase.INTERRUPTED]
