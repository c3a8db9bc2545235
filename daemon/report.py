"""Per-device outcomes from the store's history: what the demo prints and reports are made of.

`outcomes` is the state of each port now (the demo's summary); `audit` is the audit trail of
`benchhub report`: one row per device ever seen, rebuilt from the append-only history, so it answers
"what happened to serial X, when, and who touched it" after the device has long left the bench."""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from daemon.models import (
    DeviceIdentity,
    DeviceRecord,
    ErrorInfo,
    HistoryRow,
    PortRef,
    PortState,
    iso,
    utcnow,
)
from daemon.store import Store
from daemon.workflow.phases import WORK, Phase


@dataclass(frozen=True, slots=True)
class DeviceOutcome:
    ref: PortRef
    device: DeviceIdentity
    ios_before: str | None
    phase: Phase
    error: ErrorInfo | None
    started: datetime | None
    finished: datetime
    retries: int

    @property
    def seconds(self) -> float:
        return (self.finished - self.started).total_seconds() if self.started else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "port": str(self.ref),
            "device": self.device.as_dict(),
            "ios_before": self.ios_before,
            "outcome": self.phase.value,
            "error": self.error.as_dict() if self.error else None,
            "started": iso(self.started) if self.started else None,
            "finished": iso(self.finished),
            "retries": self.retries,
        }


def outcomes(store: Store, states: list[PortState]) -> list[DeviceOutcome]:
    """One row per port that holds a device, from the history of that device."""
    rows = []
    for state in states:
        if state.device is None or state.device.key is None:
            continue
        history = store.history(device_key=state.device.key)
        found: dict[str, str | None] = next((h.extra["found"] for h in history if "found" in h.extra), {})
        rows.append(
            DeviceOutcome(
                ref=state.ref,
                device=state.device,
                ios_before=found.get("ios_version"),
                phase=state.phase,
                error=state.error,
                started=history[0].ts if history else None,
                finished=state.since,
                retries=sum(1 for h in history if h.attempt > 1),
            )
        )
    return rows


TABLE_HEADER = "{:<10} {:<12} {:<13} {:<17} {:<16} {:>7} {:>7}  NOTE".format(
    "PORT", "MODEL", "SERIAL", "iOS", "OUTCOME", "RETRIES", "TIME"
)


def _table_row(
    ref: PortRef,
    device: DeviceIdentity,
    *,
    ios_before: str | None,
    outcome: Phase,
    retries: int,
    seconds: float,
    error: ErrorInfo | None,
) -> str:
    """One device in the outcomes table (the demo's summary and `benchhub report`)."""
    ios = device.ios_version or "?"
    if ios_before and ios_before != device.ios_version:
        ios = f"{ios_before} -> {ios}"
    note = f"{error.code}: {error.message}" if error else ""
    return (
        f"{ref!s:<10} {device.product_type or '?':<12} {device.serial or '?':<13} {ios:<17}"
        f" {outcome.value:<16} {retries:>7} {seconds:>6.1f}s  {note}"
    )


def render_outcomes(rows: list[DeviceOutcome]) -> str:
    lines = [TABLE_HEADER]
    lines += [
        _table_row(
            r.ref,
            r.device,
            ios_before=r.ios_before,
            outcome=r.phase,
            retries=r.retries,
            seconds=r.seconds,
            error=r.error,
        )
        for r in rows
    ]
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class WaitingSerial:
    """A device waiting to be assigned to the MDM server in Apple Business Manager."""

    serial: str
    ref: PortRef
    since: datetime

    def as_dict(self) -> dict[str, str]:
        return {"serial": self.serial, "port": str(self.ref), "since": iso(self.since)}


def _waits_for_assignment(state: PortState) -> bool:
    """Awaiting it now, or when the daemon stopped (the device still waits; the portal does not
    care whether the daemon runs)."""
    if state.phase is Phase.AWAITING_ASSIGNMENT:
        return True
    return state.phase is Phase.INTERRUPTED and state.step == "assign"


def awaiting_assignment(states: list[PortState]) -> list[WaitingSerial]:
    """Serials waiting for assignment, longest-waiting first: the list an administrator pastes into
    the portal's device search (Apple Business Manager has no bulk assign by file for them)."""
    rows = [
        WaitingSerial(s.device.serial, s.ref, s.since)
        for s in states
        if _waits_for_assignment(s) and s.device is not None and s.device.serial
    ]
    return sorted(rows, key=lambda r: (r.since, r.ref))


def waiting_document(rows: list[WaitingSerial]) -> dict[str, object]:
    """The retained MQTT document (`<station>/apple/awaiting_assignment`) and `report --json`."""
    return {"count": len(rows), "serials": [r.as_dict() for r in rows]}


# ------------------------------------------------------------------------------------ audit trail

AUDIT_PHASES: Final[tuple[Phase, ...]] = WORK
"""The phases that get a start and an end column, in workflow order (detected included: identity
reading is where a device that never starts its work is stuck)."""


class SinceError(ValueError):
    """`--since` is neither an ISO date/time nor a relative duration such as `24h`."""


_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`24h`, `7d`, `30m`, `2w` (ago, from `now`), or an ISO date/time. A date or time without a
    zone is the operator's local time: that is what someone typing `--since 2026-11-24` means, even
    though the report itself prints UTC."""
    now = now or utcnow()
    match = _RELATIVE.match(text)
    if match:
        return now - timedelta(seconds=float(match[1]) * _UNITS[match[2]])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise SinceError(
            f"--since {text!r}: expected an ISO date/time (2026-11-24, 2026-11-24T08:00Z) or a duration"
            " such as 30m, 24h, 7d, 2w"
        ) from None
    return when if when.tzinfo is not None else when.astimezone()


@dataclass(frozen=True, slots=True)
class OperatorAction:
    action: str
    at: datetime
    port: PortRef

    def __str__(self) -> str:
        return f"{self.action} {iso(self.at)} {self.port}"


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One device's life on the station: who it is, when each phase ran, how it ended, and what
    operators did to it. Built from the append-only history, so it is what happened, not what the
    daemon remembers now."""

    key: str
    device: DeviceIdentity
    ios_before: str | None
    first_seen: datetime
    last_seen: datetime
    phases: dict[Phase, tuple[datetime, datetime | None]]
    """Per phase: first entered, last left (None while the device is still in it)."""
    outcome: Phase
    error: ErrorInfo | None
    retries: int
    operator_actions: tuple[OperatorAction, ...]
    ports: tuple[PortRef, ...]
    """Every port the device was on, in the order it first appeared there."""

    @property
    def ios_after(self) -> str | None:
        return self.device.ios_version

    def flat(self) -> dict[str, str | int]:
        """The CSV row: one column per value, empty where unknown, timestamps in UTC ISO 8601."""
        d = self.device
        row: dict[str, str | int] = {
            "serial": d.serial or "",
            "ecid": d.ecid or "",
            "udid": d.udid or "",
            "model": d.product_type or "",
            "ios_before": self.ios_before or "",
            "ios_after": self.ios_after or "",
            "first_seen": iso(self.first_seen),
            "last_seen": iso(self.last_seen),
        }
        for phase in AUDIT_PHASES:
            start, end = self.phases.get(phase, (None, None))
            row[f"{phase.value}_start"] = iso(start) if start else ""
            row[f"{phase.value}_end"] = iso(end) if end else ""
        row |= {
            "outcome": self.outcome.value,
            "error_code": self.error.code if self.error else "",
            "error_message": self.error.message if self.error else "",
            "retries": self.retries,
            "operator_actions": "; ".join(str(a) for a in self.operator_actions),
            "ports": " ".join(str(p) for p in self.ports),
        }
        return row

    def as_dict(self) -> dict[str, object]:
        """The JSON object: nested where a spreadsheet needs it flat (phases, actions, ports)."""
        return {
            "key": self.key,
            "device": self.device.as_dict(),
            "ios_before": self.ios_before,
            "ios_after": self.ios_after,
            "first_seen": iso(self.first_seen),
            "last_seen": iso(self.last_seen),
            "phases": [
                {"phase": p.value, "start": iso(s), "end": iso(e) if e else None}
                for p in AUDIT_PHASES
                if p in self.phases
                for s, e in [self.phases[p]]
            ],
            "outcome": self.outcome.value,
            "error": self.error.as_dict() if self.error else None,
            "retries": self.retries,
            "operator_actions": [
                {"action": a.action, "at": iso(a.at), "port": str(a.port)} for a in self.operator_actions
            ],
            "ports": [str(p) for p in self.ports],
        }


CSV_COLUMNS: Final[tuple[str, ...]] = (
    "serial",
    "ecid",
    "udid",
    "model",
    "ios_before",
    "ios_after",
    "first_seen",
    "last_seen",
    *(f"{p.value}_{edge}" for p in AUDIT_PHASES for edge in ("start", "end")),
    "outcome",
    "error_code",
    "error_message",
    "retries",
    "operator_actions",
    "ports",
)
"""A fixed set of columns, every workflow phase always present (empty when it did not run): files
from different days and stations stack in one sheet, and a phase's duration is `=end-start` in a
cell, with no parsing. The lists (actions, ports) are the only packed cells; they are for reading."""


def _operator_action(row: HistoryRow) -> str:
    """The history has no action column; each operator action leaves its own mark."""
    if row.error is not None and row.error.code == "aborted":
        return "abort"
    if "skipped_by_operator" in row.extra:
        return f"skip {row.extra['skipped_by_operator']}"
    if "retried_by_operator" in row.extra:
        return f"retry {row.extra['retried_by_operator']}"
    if row.detail == "port power-cycled":
        return "power_cycle"
    return row.detail or f"-> {row.phase.value}"


def _operator_actions(history: list[HistoryRow]) -> tuple[OperatorAction, ...]:
    """A skip marks every row of the run it starts; it is one action, listed once."""
    actions: list[OperatorAction] = []
    for row in history:
        if row.actor != "operator":
            continue
        action = _operator_action(row)
        if action.startswith("skip ") and actions and actions[-1].action == action:
            continue
        actions.append(OperatorAction(action, row.ts, row.ref))
    return tuple(actions)


def _phase_spans(history: list[HistoryRow]) -> dict[Phase, tuple[datetime, datetime | None]]:
    """First entry and last exit of each work phase; a retry (the self-edge) stays inside it."""
    spans: dict[Phase, tuple[datetime, datetime | None]] = {}
    for row in history:
        if row.from_phase in spans and row.phase is not row.from_phase:
            spans[row.from_phase] = (spans[row.from_phase][0], row.ts)
        if row.phase in AUDIT_PHASES:
            start = spans[row.phase][0] if row.phase in spans else row.ts
            spans[row.phase] = (start, None)
    return spans


def _histories(store: Store) -> list[tuple[DeviceRecord, list[HistoryRow]]]:
    """Each device with its history. A device first recorded by UDID and later by ECID (read during
    detection) is one device: the UDID record's rows join the ECID record's."""
    records = store.devices()
    by_udid = {r.identity.udid: r for r in records if r.key.startswith("ecid:") and r.identity.udid}
    merged: dict[str, list[HistoryRow]] = {}
    for record in records:
        owner = record
        if record.key.startswith("udid:") and record.identity.udid in by_udid:
            owner = by_udid[record.identity.udid]
        merged.setdefault(owner.key, []).extend(store.history(device_key=record.key))
    return [(r, sorted(merged[r.key], key=lambda h: h.id)) for r in records if merged.get(r.key)]


def audit(store: Store, since: datetime | None = None) -> list[AuditRow]:
    """One row per device with any history at or after `since` (all devices without it), in the order
    they were first seen."""
    rows = []
    for record, history in _histories(store):
        if since is not None and history[-1].ts < since:
            continue
        found: dict[str, str | None] = next((h.extra["found"] for h in history if "found" in h.extra), {})
        ports: dict[PortRef, None] = dict.fromkeys(h.ref for h in history)
        rows.append(
            AuditRow(
                key=record.key,
                device=record.identity,
                ios_before=found.get("ios_version"),
                first_seen=history[0].ts,
                last_seen=history[-1].ts,
                phases=_phase_spans(history),
                outcome=record.phase,
                error=record.error,
                retries=sum(1 for h in history if h.attempt > 1),
                operator_actions=_operator_actions(history),
                ports=tuple(ports),
            )
        )
    return sorted(rows, key=lambda r: (r.first_seen, r.key))


def audit_csv(rows: list[AuditRow]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(r.flat() for r in rows)
    return out.getvalue()


def render_audit(rows: list[AuditRow]) -> str:
    """The outcomes table (same columns), one row per device, operator actions indented under it."""
    lines = [TABLE_HEADER]
    for r in rows:
        took = (r.last_seen - r.first_seen).total_seconds()
        lines.append(
            _table_row(
                r.ports[-1],
                r.device,
                ios_before=r.ios_before,
                outcome=r.outcome,
                retries=r.retries,
                seconds=took,
                error=r.error,
            )
        )
        lines += [f"{'':<10} operator: {a}" for a in r.operator_actions]
    return "\n".join(lines)
