"""Per-device outcomes from the store's history: what the demo prints and reports are made of."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from daemon.models import DeviceIdentity, ErrorInfo, PortRef, PortState, iso
from daemon.store import Store
from daemon.workflow.phases import Phase


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


def render_outcomes(rows: list[DeviceOutcome]) -> str:
    header = ("PORT", "MODEL", "SERIAL", "iOS", "OUTCOME", "RETRIES", "TIME")
    lines = ["{:<10} {:<12} {:<13} {:<17} {:<16} {:>7} {:>7}  NOTE".format(*header)]
    for r in rows:
        d = r.device
        ios = d.ios_version or "?"
        if r.ios_before and r.ios_before != d.ios_version:
            ios = f"{r.ios_before} -> {ios}"
        note = f"{r.error.code}: {r.error.message}" if r.error else ""
        lines.append(
            f"{r.ref!s:<10} {d.product_type or '?':<12} {d.serial or '?':<13} {ios:<17} {r.phase.value:<16} "
            f"{r.retries:>7} {r.seconds:>6.1f}s  {note}"
        )
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
