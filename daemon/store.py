"""The station's memory: SQLite in WAL mode.

The store is the truth. Each transition is one transaction that updates the port, updates the
device, appends a history row and appends the MQTT messages to the outbox; only after the commit is
anything published, so a crash can lose an unpublished message's *delivery* but never the state
change itself, and the publisher catches up from the outbox. History is append-only.

SQLite calls run on the event loop thread: a transition commits in well under a millisecond (see
`bench/store_bench.py`), transitions are rare per port, and one writer keeps ordering trivial.

The outbox is bounded (`outbox_limit`, `[mqtt] outbox_limit`): a broker that stays away for days
must not fill the disk. Retained messages are one per topic (an unsent one is replaced by the next),
so they are bounded by the number of ports and are never dropped: the latest state of every port
always reaches the broker. Beyond the limit the oldest *events* go first, and how many were dropped
is counted in `meta` (`outbox_dropped`), so the loss is visible after a restart, not only in a log.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Protocol

import structlog

from daemon.models import (
    DeviceIdentity,
    DeviceRecord,
    ErrorInfo,
    HistoryRow,
    OutboxMessage,
    OutboxRow,
    PortRef,
    PortState,
    Transition,
    iso,
    utcnow,
)
from daemon.workflow.phases import RUNNING, Phase, check_transition

SCHEMA_VERSION = 1
"""Still 1 with the bounded outbox: its counter is a `meta` row, which older versions ignore."""

DEFAULT_OUTBOX_LIMIT: Final = 100_000
"""Same default as `MqttConfig.outbox_limit`, for stores opened without a config (tools, tests)."""

_DROPPED_KEY: Final = "outbox_dropped"

log = structlog.get_logger("benchhub.store")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ports (
    hub TEXT NOT NULL, port INTEGER NOT NULL,
    phase TEXT NOT NULL, step TEXT, progress INTEGER, device_key TEXT, device TEXT,
    attempt INTEGER NOT NULL DEFAULT 0, error_code TEXT, error_message TEXT, detail TEXT,
    since TEXT NOT NULL, seq INTEGER NOT NULL DEFAULT 0, updated TEXT NOT NULL,
    PRIMARY KEY (hub, port)
);
CREATE TABLE IF NOT EXISTS devices (
    key TEXT PRIMARY KEY, identity TEXT NOT NULL,
    phase TEXT NOT NULL, step TEXT, attempt INTEGER NOT NULL DEFAULT 0,
    error_code TEXT, error_message TEXT, hub TEXT, port INTEGER,
    first_seen TEXT NOT NULL, updated TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL, hub TEXT NOT NULL, port INTEGER NOT NULL,
    device_key TEXT, from_phase TEXT NOT NULL, phase TEXT NOT NULL, step TEXT,
    attempt INTEGER NOT NULL, error_code TEXT, error_message TEXT, actor TEXT NOT NULL,
    detail TEXT, extra TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS history_device ON history (device_key, id);
CREATE TABLE IF NOT EXISTS hubs (hub TEXT PRIMARY KEY, online INTEGER NOT NULL, updated TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL,
    retain INTEGER NOT NULL, qos INTEGER NOT NULL, created TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_topic ON outbox (topic) WHERE retain = 1;
"""


class OutboxRenderer(Protocol):
    """Turns state changes into messages; the MQTT package implements it, the store stays MQTT-free."""

    def port_messages(
        self, state: PortState, transition: Transition | None, from_phase: Phase | None
    ) -> list[OutboxMessage]: ...

    def hub_messages(self, hub: str, online: bool) -> list[OutboxMessage]: ...


class StoreError(Exception):
    """The database cannot be opened or used (wrong file, newer schema, disk full)."""


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _identity(text: str | None) -> DeviceIdentity | None:
    return DeviceIdentity(**json.loads(text)) if text else None


def _error(code: str | None, message: str | None) -> ErrorInfo | None:
    return ErrorInfo(code, message or "") if code else None


class Store:
    def __init__(
        self,
        path: Path,
        renderer: OutboxRenderer | None = None,
        *,
        outbox_limit: int = DEFAULT_OUTBOX_LIMIT,
    ) -> None:
        """`outbox_limit`: most messages kept for the broker; see the module docstring."""
        if outbox_limit < 1:
            raise ValueError(f"outbox_limit must be positive, not {outbox_limit}")
        self.path = path
        self._renderer = renderer
        self._listeners: list[Callable[[], None]] = []
        self._outbox_limit = outbox_limit
        self._outbox_count: int | None = None
        """Rows in the outbox, kept by enqueue/ack so the limit costs no `count(*)` (a table scan)
        per transition; None means unknown (just opened, or a transaction rolled back)."""
        self._dropping = False
        """Inside a drop episode: events were dropped and the outbox has not drained since. The
        warning is logged once per episode (an outage), not once per dropped event."""
        self._episode_dropped = 0
        self._read_up_to = 0
        """Highest outbox id the publisher has read (`outbox()`): rows up to it may be in flight."""
        self._dropped_in_flight: set[int] = set()
        """Events dropped after the publisher had read them: if it acks one, it was delivered after
        all and is taken off the dropped count, which thus counts only events the broker never got."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a transition that was reported as recorded survives a power cut, not only a crash.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
            self._check_schema()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path}: cannot be used as the benchhub database ({exc})") from None
        except OSError as exc:
            raise StoreError(f"{path}: cannot be created ({exc.strerror})") from None

    def _check_schema(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row["value"]) > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: written by a newer benchhub (schema {row['value']}); upgrade benchhub"
            )

    def close(self) -> None:
        self._db.close()

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every commit that added outbox messages (the publisher's wake-up)."""
        self._listeners.append(listener)

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()

    # ----------------------------------------------------------------- ports

    def ensure_ports(self, refs: Iterable[PortRef]) -> None:
        """Create rows for configured ports that the database has not seen yet."""
        now = iso(utcnow())
        with self._tx():
            for ref in refs:
                self._db.execute(
                    "INSERT OR IGNORE INTO ports (hub, port, phase, since, updated) VALUES (?,?,?,?,?)",
                    (ref.hub, ref.port, Phase.EMPTY.value, now, now),
                )

    def port(self, ref: PortRef) -> PortState:
        row = self._db.execute("SELECT * FROM ports WHERE hub=? AND port=?", (ref.hub, ref.port)).fetchone()
        return self._port_state(row) if row else PortState(ref)

    def ports(self) -> list[PortState]:
        rows = self._db.execute("SELECT * FROM ports ORDER BY hub, port").fetchall()
        return [self._port_state(r) for r in rows]

    @staticmethod
    def _port_state(row: sqlite3.Row) -> PortState:
        return PortState(
            ref=PortRef(row["hub"], row["port"]),
            phase=Phase(row["phase"]),
            step=row["step"],
            progress=row["progress"],
            device=_identity(row["device"]),
            attempt=row["attempt"],
            error=_error(row["error_code"], row["error_message"]),
            since=_ts(row["since"]),
            seq=row["seq"],
            updated=_ts(row["updated"]),
            detail=row["detail"],
        )

    # --------------------------------------------------------------- devices

    def device(self, key: str) -> DeviceRecord | None:
        row = self._db.execute("SELECT * FROM devices WHERE key=?", (key,)).fetchone()
        return self._device(row) if row else None

    def devices(self) -> list[DeviceRecord]:
        return [self._device(r) for r in self._db.execute("SELECT * FROM devices ORDER BY first_seen")]

    @staticmethod
    def _device(row: sqlite3.Row) -> DeviceRecord:
        identity = _identity(row["identity"]) or DeviceIdentity()
        return DeviceRecord(
            key=row["key"],
            identity=identity,
            phase=Phase(row["phase"]),
            step=row["step"],
            attempt=row["attempt"],
            error=_error(row["error_code"], row["error_message"]),
            port=PortRef(row["hub"], row["port"]) if row["hub"] is not None else None,
            first_seen=_ts(row["first_seen"]),
            updated=_ts(row["updated"]),
        )

    # --------------------------------------------------------------- history

    def history(self, *, device_key: str | None = None, ref: PortRef | None = None) -> list[HistoryRow]:
        sql = "SELECT * FROM history"
        args: list[str | int] = []
        clauses = []
        if device_key is not None:
            clauses.append("device_key=?")
            args.append(device_key)
        if ref is not None:
            clauses.append("hub=? AND port=?")
            args += [ref.hub, ref.port]
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        return [self._history(r) for r in self._db.execute(sql + " ORDER BY id", args)]

    @staticmethod
    def _history(row: sqlite3.Row) -> HistoryRow:
        return HistoryRow(
            id=row["id"],
            ts=_ts(row["ts"]),
            ref=PortRef(row["hub"], row["port"]),
            device_key=row["device_key"],
            from_phase=Phase(row["from_phase"]),
            phase=Phase(row["phase"]),
            step=row["step"],
            attempt=row["attempt"],
            error=_error(row["error_code"], row["error_message"]),
            actor=row["actor"],
            detail=row["detail"],
            extra=json.loads(row["extra"]),
        )

    # ----------------------------------------------------------- transitions

    def record(self, t: Transition) -> PortState:
        """Apply one transition atomically; raises `IllegalTransition` for a move the table forbids."""
        now = utcnow()
        with self._tx():
            before = self.port(t.ref)
            check_transition(before.phase, t.to)
            device = t.device
            if device is None and t.to is not Phase.EMPTY:
                device = before.device
            if t.to is Phase.EMPTY:
                device = None
            after = PortState(
                ref=t.ref,
                phase=t.to,
                step=t.step,
                progress=None,
                device=device,
                attempt=t.attempt,
                error=t.error,
                since=now,
                seq=before.seq + 1,
                updated=now,
                detail=t.detail,
            )
            self._write_port(after)
            key = device.key if device else (before.device.key if before.device else None)
            if key is not None:
                self._write_device(key, after, before.device, t, now)
            self._db.execute(
                "INSERT INTO history (ts, hub, port, device_key, from_phase, phase, step, attempt,"
                " error_code, error_message, actor, detail, extra) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    iso(now),
                    t.ref.hub,
                    t.ref.port,
                    key,
                    before.phase.value,
                    t.to.value,
                    t.step,
                    t.attempt,
                    t.error.code if t.error else None,
                    t.error.message if t.error else None,
                    t.actor,
                    t.detail,
                    json.dumps(t.extra, sort_keys=True),
                ),
            )
            if self._renderer is not None:
                self._enqueue(self._renderer.port_messages(after, t, before.phase))
        self._notify()
        return after

    def _write_device(
        self,
        key: str,
        port: PortState,
        previous: DeviceIdentity | None,
        t: Transition,
        now: datetime,
    ) -> None:
        existing = self.device(key)
        identity = port.device or previous or DeviceIdentity()
        if existing is not None:
            identity = existing.identity.merged(identity)
        # Unplugging (empty) and re-detection (detected) are port events, not progress: the device
        # keeps the step it was in and its outcome, which is what resuming it is decided from.
        phase, step, attempt, error = port.phase, t.step, t.attempt, t.error
        if phase in (Phase.EMPTY, Phase.DETECTED) and existing is not None:
            phase, step, attempt, error = existing.phase, existing.step, existing.attempt, existing.error
        elif step is None and existing is not None:
            step = existing.step
        self._db.execute(
            "INSERT INTO devices (key, identity, phase, step, attempt, error_code, error_message, hub, port,"
            " first_seen, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(key) DO UPDATE SET"
            " identity=excluded.identity, phase=excluded.phase, step=excluded.step,"
            " attempt=excluded.attempt, error_code=excluded.error_code,"
            " error_message=excluded.error_message, hub=excluded.hub, port=excluded.port,"
            " updated=excluded.updated",
            (
                key,
                json.dumps(identity.as_dict()),
                phase.value,
                step,
                attempt,
                error.code if error else None,
                error.message if error else None,
                t.ref.hub,
                t.ref.port,
                iso(now),
                iso(now),
            ),
        )

    def _write_port(self, s: PortState) -> None:
        self._db.execute(
            "INSERT INTO ports (hub, port, phase, step, progress, device_key, device, attempt, error_code,"
            " error_message, detail, since, seq, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT(hub, port) DO UPDATE SET phase=excluded.phase, step=excluded.step,"
            " progress=excluded.progress, device_key=excluded.device_key, device=excluded.device,"
            " attempt=excluded.attempt, error_code=excluded.error_code,"
            " error_message=excluded.error_message, detail=excluded.detail, since=excluded.since,"
            " seq=excluded.seq, updated=excluded.updated",
            (
                s.ref.hub,
                s.ref.port,
                s.phase.value,
                s.step,
                s.progress,
                s.device.key if s.device else None,
                json.dumps(s.device.as_dict()) if s.device else None,
                s.attempt,
                s.error.code if s.error else None,
                s.error.message if s.error else None,
                s.detail,
                iso(s.since),
                s.seq,
                iso(s.updated),
            ),
        )

    def set_progress(self, ref: PortRef, progress: int | None, detail: str | None = None) -> PortState:
        """Progress within a phase: updates the port and publishes its state, but is not history."""
        with self._tx():
            before = self.port(ref)
            after = PortState(
                ref=ref,
                phase=before.phase,
                step=before.step,
                progress=progress,
                device=before.device,
                attempt=before.attempt,
                error=before.error,
                since=before.since,
                seq=before.seq + 1,
                updated=utcnow(),
                detail=detail if detail is not None else before.detail,
            )
            self._write_port(after)
            if self._renderer is not None:
                self._enqueue(self._renderer.port_messages(after, None, None))
        self._notify()
        return after

    def set_hub_status(self, hub: str, online: bool) -> None:
        """Whether the station can talk to the hub; kept so a reconnecting publisher can restore it."""
        with self._tx():
            self._db.execute(
                "INSERT INTO hubs VALUES (?,?,?) ON CONFLICT(hub) DO UPDATE SET"
                " online=excluded.online, updated=excluded.updated",
                (hub, int(online), iso(utcnow())),
            )
            if self._renderer is not None:
                self._enqueue(self._renderer.hub_messages(hub, online))
        self._notify()

    def forget_hubs(self, hubs: Iterable[str], messages: Sequence[OutboxMessage]) -> None:
        """Hubs that left the config: their rows go, and `messages` (clearing what the broker
        retains about them) are queued in the same transaction."""
        with self._tx():
            self._db.executemany("DELETE FROM hubs WHERE hub = ?", [(hub,) for hub in hubs])
            self._enqueue(messages)
        self._notify()

    def hub_statuses(self) -> dict[str, bool]:
        return {r["hub"]: bool(r["online"]) for r in self._db.execute("SELECT * FROM hubs ORDER BY hub")}

    def recover(self) -> list[PortState]:
        """After a restart nothing is running: every port left mid-step becomes `interrupted`, and the
        device keeps the step it was in, so that plugging it (or it still being there) resumes it."""
        recovered = []
        for state in self.ports():
            if state.phase in RUNNING:
                recovered.append(
                    self.record(
                        Transition(
                            ref=state.ref,
                            to=Phase.INTERRUPTED,
                            step=state.step,
                            attempt=state.attempt,
                            device=state.device,
                            detail=f"daemon stopped during {state.step or state.phase.value}",
                            actor="recovery",
                        )
                    )
                )
        return recovered

    # ---------------------------------------------------------------- outbox

    def publish(self, messages: Sequence[OutboxMessage]) -> None:
        """Queue station-level messages (not tied to a port transition) for the publisher."""
        with self._tx():
            self._enqueue(messages)
        self._notify()

    def _enqueue(self, messages: Sequence[OutboxMessage]) -> None:
        """Queue messages. A retained message replaces any unsent one on the same topic: the broker
        would keep only the newest anyway, so an outage queues one state per port, not a stream of
        progress updates. Events (not retained) are kept in order, up to the outbox limit."""
        count = self._current_outbox_count()
        now = iso(utcnow())
        retained = [(m.topic,) for m in messages if m.retain]
        if retained:
            count -= self._db.executemany(
                "DELETE FROM outbox WHERE retain = 1 AND topic = ?", retained
            ).rowcount
        self._db.executemany(
            "INSERT INTO outbox (topic, payload, retain, qos, created) VALUES (?,?,?,?,?)",
            [(m.topic, m.payload, int(m.retain), m.qos, now) for m in messages],
        )
        count += len(messages)
        if count > self._outbox_limit:
            count -= self._drop_oldest_events(count - self._outbox_limit)
        self._outbox_count = count

    def _current_outbox_count(self) -> int:
        if self._outbox_count is None:
            self._outbox_count = int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])
        return self._outbox_count

    def _drop_oldest_events(self, excess: int) -> int:
        """Delete up to `excess` of the oldest events and count them; returns how many went.

        Only events: retained rows are one per topic and carry the latest state, which a consumer
        cannot rebuild, whereas a lost event is history that the store still has. When retained rows
        alone exceed the limit (more topics than the limit), the outbox stays above it.
        """
        ids = [
            int(r[0])
            for r in self._db.execute(
                "SELECT id FROM outbox WHERE retain = 0 ORDER BY id LIMIT ?", (excess,)
            ).fetchall()
        ]
        if not ids:
            return 0
        dropped = self._db.execute("DELETE FROM outbox WHERE retain = 0 AND id <= ?", (ids[-1],)).rowcount
        self._dropped_in_flight.update(i for i in ids if i <= self._read_up_to)
        self._count_dropped(dropped)
        if not self._dropping:
            self._dropping = True
            log.warning(
                "outbox_events_dropped",
                count=dropped,
                limit=self._outbox_limit,
                total=self.dropped_events(),
                reason="outbox full (broker unreachable?): oldest events dropped, states kept",
            )
        return dropped

    def _count_dropped(self, delta: int) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE"
            " SET value = CAST(CAST(value AS INTEGER) + excluded.value AS TEXT)",
            (_DROPPED_KEY, str(delta)),
        )
        self._episode_dropped += delta

    def dropped_events(self) -> int:
        """Events dropped because the outbox was full, over the database's whole life."""
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (_DROPPED_KEY,)).fetchone()
        return int(row["value"]) if row else 0

    @property
    def outbox_limit(self) -> int:
        return self._outbox_limit

    def outbox(self, limit: int = 100) -> list[OutboxRow]:
        """The oldest `limit` messages, for the publisher. It acks what the broker confirmed before it
        reads again, so rows of an earlier read that were dropped and not acked were never delivered."""
        rows = self._db.execute("SELECT * FROM outbox ORDER BY id LIMIT ?", (limit,)).fetchall()
        self._dropped_in_flight.clear()
        if rows:
            self._read_up_to = max(self._read_up_to, int(rows[-1]["id"]))
        return [
            OutboxRow(r["id"], OutboxMessage(r["topic"], bytes(r["payload"]), bool(r["retain"]), r["qos"]))
            for r in rows
        ]

    def outbox_size(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def ack(self, ids: Sequence[int]) -> None:
        """Forget messages the broker has acknowledged. An event dropped after the publisher read it
        (the outbox overflowed meanwhile) is gone already; it reached the broker, so it is taken off
        the dropped count."""
        delivered = self._dropped_in_flight.intersection(ids)
        with self._tx():
            count = self._current_outbox_count()
            count -= self._db.executemany("DELETE FROM outbox WHERE id=?", [(i,) for i in ids]).rowcount
            self._outbox_count = count
            if delivered:
                self._count_dropped(-len(delivered))
        self._dropped_in_flight -= delivered
        if self._dropping and count == 0:
            # Drained: the outage (or burst) is over; the next overflow is a new episode, warned again.
            log.info("outbox_drained_after_drops", dropped=self._episode_dropped, total=self.dropped_events())
            self._dropping = False
            self._episode_dropped = 0

    def _tx(self) -> _Transaction:
        return _Transaction(self._db, self._after_rollback)

    def _after_rollback(self) -> None:
        """The in-memory outbox figures may describe rows that never were: count again next time, and
        forget which dropped rows were in flight (at worst a delivered event stays counted)."""
        self._outbox_count = None
        self._dropped_in_flight.clear()

    def counts(self) -> dict[str, Any]:
        """Row counts for `benchhub status` and benchmarks."""
        return {
            table: self._db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608
            for table in ("ports", "devices", "history", "outbox", "hubs")
        }


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception; nests as a no-op. `on_rollback` lets
    the store forget in-memory figures that the rolled-back statements had changed."""

    def __init__(self, db: sqlite3.Connection, on_rollback: Callable[[], None] = lambda: None) -> None:
        self._db = db
        self._on_rollback = on_rollback
        self._outer = False

    def __enter__(self) -> None:
        if not self._db.in_transaction:
            self._db.execute("BEGIN IMMEDIATE")
            self._outer = True

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self._outer:
            return
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error:
                # A failed COMMIT (disk full, busy) must not leave the transaction open: every later
                # `_tx()` would take it for an outer one and nest in it, committing nothing.
                self._rollback()
                raise
        else:
            self._rollback()

    def _rollback(self) -> None:
        # SQLite rolls back by itself on some errors (SQLITE_FULL, SQLITE_IOERR, SQLITE_NOMEM): a
        # ROLLBACK then fails ("no transaction is active") and would hide the real error.
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")
        self._on_rollback()
