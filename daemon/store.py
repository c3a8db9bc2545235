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

A write can fail for reasons that pass: another process holds the write lock (a backup, `sqlite3`
left in a transaction), the disk is full, an I/O error. Such a write raises `StoreUnavailable` after
rolling back, so nothing of it was written and the caller can retry it as it is. Callers that cannot
wait do not have to: station-level writes (hub status, station messages, acks) are kept in memory
and written once the database recovers, and progress is skipped (the next update replaces
it). The store reports the episode once when it starts (an `error` log line, `failing`, the health
listeners) and once when it ends, and probes the database meanwhile, so that the episode ends even on
an idle bench. Why the busy timeout is short: see `BUSY_TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
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
    Queued,
    Transition,
    iso,
    utcnow,
)
from daemon.workflow.phases import RUNNING, Phase, check_transition

SCHEMA_VERSION = 1
"""Still 1 with the bounded outbox (its counter is a `meta` row) and with `ports.queue` (a column added
on open, `_ADDED_COLUMNS`): older versions ignore both."""

DEFAULT_OUTBOX_LIMIT: Final = 100_000
"""Same default as `MqttConfig.outbox_limit`, for stores opened without a config (tools, tests)."""

_DROPPED_KEY: Final = "outbox_dropped"

BUSY_TIMEOUT: Final = 0.2
"""Seconds a write waits for another connection's lock before it raises `StoreUnavailable`.

Short on purpose: SQLite waits synchronously, on the event loop thread, so a long wait would stall
every port, the MQTT keepalive and the watchdog at once. A lock held longer is waited out
asynchronously by whoever retries the write (the port runner, the store's own probe)."""
OPEN_BUSY_TIMEOUT: Final = 5.0
"""Seconds opening the database may wait for a lock: nothing else runs yet, so nothing stalls."""
PROBE_FIRST: Final = 0.2
PROBE_MAX: Final = 2.0
"""Seconds between the store's own write probes while it fails: doubling from the first to the most.
A probe does not wait for a lock (it would stall the loop for nothing), so probing often is cheap and
a freed disk or released lock is noticed within `PROBE_MAX`."""
_PROBE_BYTES: Final = 65536
_TRANSIENT: Final = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
    }
)
"""Primary result codes of failures that pass (locks, space, I/O); any other error is a bug."""

log = structlog.get_logger("benchhub.store")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ports (
    hub TEXT NOT NULL, port INTEGER NOT NULL,
    phase TEXT NOT NULL, step TEXT, progress INTEGER, device_key TEXT, device TEXT,
    attempt INTEGER NOT NULL DEFAULT 0, error_code TEXT, error_message TEXT, detail TEXT,
    since TEXT NOT NULL, seq INTEGER NOT NULL DEFAULT 0, updated TEXT NOT NULL, queue TEXT,
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

_ADDED_COLUMNS: Final = (("ports", "queue", "TEXT"),)
"""Columns added since a table was first released: a database written before gets them on open."""


class OutboxRenderer(Protocol):
    """Turns state changes into messages; the MQTT package implements it, the store stays MQTT-free."""

    def port_messages(
        self, state: PortState, transition: Transition | None, from_phase: Phase | None
    ) -> list[OutboxMessage]: ...

    def hub_messages(self, hub: str, online: bool) -> list[OutboxMessage]: ...


class StoreError(Exception):
    """The database cannot be opened or used (wrong file, newer schema, disk full)."""


class StoreUnavailable(StoreError):
    """A write failed for a reason that passes (locked by another process, disk full, I/O error).

    The transaction was rolled back: nothing of the write is in the database, so retrying the same
    write later neither loses nor doubles anything. The message is SQLite's own text."""


def transient(exc: sqlite3.Error) -> bool:
    """Whether `exc` is a failure that passes by itself or once a person frees space or a lock."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _TRANSIENT


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
        self._failing: str | None = None
        self._failing_since: datetime | None = None
        self._failing_started = 0.0
        self._failed_writes = 0
        self._health_listeners: list[Callable[[], None]] = []
        self._deferred: list[Callable[[], None]] = []
        """Station-level writes that failed, in order, to be written after the next one that succeeds."""
        self._unacked: set[int] = set()
        """Outbox rows the broker confirmed whose deletion failed: never handed out again."""
        self._probe: asyncio.TimerHandle | None = None
        self._probe_delay = PROBE_FIRST
        self._waiters: list[asyncio.Future[None]] = []
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a transition that was reported as recorded survives a power cut, not only a crash.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(f"PRAGMA busy_timeout={int(OPEN_BUSY_TIMEOUT * 1000)}")
            self._db.executescript(_SCHEMA)
            self._check_schema()
            self._add_columns()
            self._db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
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

    def _add_columns(self) -> None:
        for table, column, kind in _ADDED_COLUMNS:
            if column not in {r["name"] for r in self._db.execute(f"PRAGMA table_info({table})")}:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        if self._deferred or self._unacked:
            log.error(
                "store_closed_with_unwritten_writes",
                writes=len(self._deferred),
                unacked=len(self._unacked),
                error=self._failing,
            )
        self._db.close()

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every commit that added outbox messages (the publisher's wake-up)."""
        self._listeners.append(listener)

    def on_health_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` when writes start failing and when they work again (see `failing`)."""
        self._health_listeners.append(listener)

    # ---------------------------------------------------------------- health

    @property
    def failing(self) -> str | None:
        """Why writes fail right now (SQLite's text, e.g. "database is locked"), or None when they work."""
        return self._failing

    @property
    def failing_since(self) -> datetime | None:
        """When the current failure began (UTC), or None."""
        return self._failing_since

    def _failed(self, exc: sqlite3.Error, what: str) -> StoreUnavailable:
        """Count a failed write; the first of an episode (or a new cause) is logged as an error, the
        rest only counted, so an hour of a full disk is one line, not one per retry."""
        error = str(exc)
        self._failed_writes += 1
        if self._failing != error:
            log.error(
                "store_unavailable",
                error=error,
                write=what,
                hint="writes are retried; ports pause until the database takes them again",
            )
            if self._failing is None:
                self._failing_since, self._failing_started = utcnow(), time.monotonic()
            self._failing = error
            self._health_changed()
        self._schedule_probe()
        return StoreUnavailable(error)

    def _succeeded(self) -> None:
        if self._failing is None:
            return
        log.warning(
            "store_recovered",
            error=self._failing,
            seconds=round(time.monotonic() - self._failing_started, 1),
            failed_attempts=self._failed_writes,
        )
        self._failing, self._failing_since, self._failed_writes = None, None, 0
        self._probe_delay = PROBE_FIRST
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        self._health_changed()
        self._flush_deferred()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def writable(self) -> None:
        """Return once writes work again; at once when they do.

        This is how a writer that must not give up (a port's transition) waits: one probe (see
        `_run_probe`) tries the database, with backoff, on behalf of every waiting writer, rather
        than each of them stalling the event loop for `BUSY_TIMEOUT` on its own attempts. A writable
        database can fail again at the next write (a disk that filled up anew): the writer then
        simply waits again."""
        if self._failing is None:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._schedule_probe()
        try:
            await waiter
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _health_changed(self) -> None:
        for listener in self._health_listeners:
            listener()

    def _schedule_probe(self) -> None:
        """Try a write again later even if nobody else does, so an idle bench notices the recovery
        (and writes what was deferred). Only with a running event loop (not in tools)."""
        if self._probe is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._probe = loop.call_later(self._probe_delay, self._run_probe)
        self._probe_delay = min(self._probe_delay * 2, PROBE_MAX)

    def _run_probe(self) -> None:
        """Write and delete 64 KiB in one transaction: it needs the write lock and new pages, so it
        fails like the real writes did (locked, full, I/O) and succeeds only when they would."""
        self._probe = None
        if self._failing is None:
            return
        self._db.execute("PRAGMA busy_timeout=0")
        try:
            with contextlib.suppress(StoreUnavailable), self._tx("probe"):
                self._db.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('write_probe', zeroblob(?))", (_PROBE_BYTES,)
                )
                self._db.execute("DELETE FROM meta WHERE key = 'write_probe'")
        finally:
            self._db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")

    def _flush_deferred(self) -> None:
        """Write what failed earlier, oldest first; stop at the first failure (it stays queued)."""
        if self._unacked:
            with contextlib.suppress(StoreUnavailable):
                self.ack(sorted(self._unacked))
        while self._deferred and self._failing is None:
            write = self._deferred[0]
            try:
                write()
            except StoreUnavailable:
                return
            except Exception:  # a bug in one deferred write must not fail the write that succeeded
                log.exception("deferred_write_failed")
            self._deferred.pop(0)

    def _or_later(self, write: Callable[[], None]) -> None:
        """Run `write` now, or (the store failing) once the database recovers (the probe)."""
        if self._failing is None or not self._deferred:
            try:
                write()
            except StoreUnavailable:
                self._deferred.append(write)
            return
        self._deferred.append(write)  # behind the earlier ones, to keep their order

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()

    # ----------------------------------------------------------------- ports

    def ensure_ports(self, refs: Iterable[PortRef]) -> None:
        """Create rows for configured ports that the database has not seen yet."""
        now = iso(utcnow())
        with self._tx("ports"):
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
            queue=Queued(**json.loads(row["queue"])) if row["queue"] else None,
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
        with self._tx(f"transition {t.ref} -> {t.to.value}"):
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
            " error_message, detail, since, seq, updated, queue) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT(hub, port) DO UPDATE SET phase=excluded.phase, step=excluded.step,"
            " progress=excluded.progress, device_key=excluded.device_key, device=excluded.device,"
            " attempt=excluded.attempt, error_code=excluded.error_code,"
            " error_message=excluded.error_message, detail=excluded.detail, since=excluded.since,"
            " seq=excluded.seq, updated=excluded.updated, queue=excluded.queue",
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
                json.dumps(s.queue.as_dict()) if s.queue else None,
            ),
        )

    def set_progress(
        self, ref: PortRef, progress: int | None, detail: str | None = None, queue: Queued | None = None
    ) -> PortState:
        """Progress within a phase: updates the port and publishes its state, but is not history.
        `queue`: the port's place in line while its step waits for the scheduler (None: not waiting).

        While the store is failing this raises `StoreUnavailable` without touching SQLite: progress
        is worth no stalled event loop (each attempt may wait `BUSY_TIMEOUT`), and the next update
        replaces it anyway."""
        if self._failing is not None:
            raise StoreUnavailable(self._failing)
        with self._tx(f"progress {ref}"):
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
                queue=queue,
            )
            self._write_port(after)
            if self._renderer is not None:
                self._enqueue(self._renderer.port_messages(after, None, None))
        self._notify()
        return after

    def set_hub_status(self, hub: str, online: bool) -> None:
        """Whether the station can talk to the hub; kept so a reconnecting publisher can restore it.
        Never raises `StoreUnavailable`: written later if need be (see `_or_later`)."""
        now = iso(utcnow())

        def write() -> None:
            with self._tx(f"hub status {hub}"):
                self._db.execute(
                    "INSERT INTO hubs VALUES (?,?,?) ON CONFLICT(hub) DO UPDATE SET"
                    " online=excluded.online, updated=excluded.updated",
                    (hub, int(online), now),
                )
                if self._renderer is not None:
                    self._enqueue(self._renderer.hub_messages(hub, online))
            self._notify()

        self._or_later(write)

    def forget_hubs(self, hubs: Iterable[str], messages: Sequence[OutboxMessage]) -> None:
        """Hubs that left the config: their rows go, and `messages` (clearing what the broker
        retains about them) are queued in the same transaction. Written later if need be."""
        gone = [(hub,) for hub in hubs]

        def write() -> None:
            with self._tx("forget hubs"):
                self._db.executemany("DELETE FROM hubs WHERE hub = ?", gone)
                self._enqueue(messages)
            self._notify()

        self._or_later(write)

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
        """Queue station-level messages (not tied to a port transition) for the publisher; written
        later, in order, if the store is failing (they are not history: a crash meanwhile loses them,
        and the station republishes its retained state on every connect anyway)."""
        batch = list(messages)

        def write() -> None:
            with self._tx("station messages"):
                self._enqueue(batch)
            self._notify()

        self._or_later(write)

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
        rows = self._db.execute(
            "SELECT * FROM outbox ORDER BY id LIMIT ?", (limit + len(self._unacked),)
        ).fetchall()
        rows = [r for r in rows if r["id"] not in self._unacked][:limit]
        self._dropped_in_flight.clear()
        if rows:
            self._read_up_to = max(self._read_up_to, int(rows[-1]["id"]))
        return [
            OutboxRow(r["id"], OutboxMessage(r["topic"], bytes(r["payload"]), bool(r["retain"]), r["qos"]))
            for r in rows
        ]

    def outbox_size(self) -> int:
        """Messages still to deliver: rows the broker confirmed while their deletion failed are not."""
        return int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0]) - len(self._unacked)

    def ack(self, ids: Sequence[int]) -> None:
        """Forget messages the broker has acknowledged. An event dropped after the publisher read it
        (the outbox overflowed meanwhile) is gone already; it reached the broker, so it is taken off
        the dropped count.

        Never raises `StoreUnavailable`: rows whose deletion failed are not handed out by `outbox()`
        again (the broker has them) and are deleted once the database recovers; a crash
        meanwhile sends them once more, which QoS 1 allows."""
        delivered = self._dropped_in_flight.intersection(ids)
        try:
            with self._tx("outbox ack"):
                count = self._current_outbox_count()
                count -= self._db.executemany("DELETE FROM outbox WHERE id=?", [(i,) for i in ids]).rowcount
                self._outbox_count = count
                if delivered:
                    self._count_dropped(-len(delivered))
        except StoreUnavailable:
            self._unacked.update(ids)
            return
        self._unacked.difference_update(ids)
        self._dropped_in_flight -= delivered
        if self._dropping and count == 0:
            # Drained: the outage (or burst) is over; the next overflow is a new episode, warned again.
            log.info("outbox_drained_after_drops", dropped=self._episode_dropped, total=self.dropped_events())
            self._dropping = False
            self._episode_dropped = 0

    @contextlib.contextmanager
    def _tx(self, what: str) -> Iterator[None]:
        """One write transaction (`what` names it for the log). A transient failure (`transient`)
        becomes `StoreUnavailable` and counts towards the store's health. Only the probe's success
        ends the episode: it needs the write lock *and* new pages, while an ordinary write that
        happens to succeed may have needed neither (a row updated in place on a full disk), and
        ending the episode on it would make the health flap. Nested use joins the outer transaction."""
        outer = not self._db.in_transaction
        try:
            with _Transaction(self._db, self._after_rollback):
                yield
        except sqlite3.Error as exc:
            if not outer or not transient(exc):
                raise
            raise self._failed(exc, what) from exc
        if outer and what == "probe":
            self._succeeded()

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
