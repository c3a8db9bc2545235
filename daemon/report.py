"""Per-device outcomes from the store's history: what the demo prints and reports are made of."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from daemon.models import DeviceIdentity, ErrorInfo, PortRef, PortState
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
