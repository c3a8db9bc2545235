"""The console board: one row per port with phase, progress, device and elapsed time.

Rendering is a pure function of port states (so `status`, `demo` and tests share it); the live
loop just redraws it in place on a terminal.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TextIO

from daemon.models import PortState, ordinal, utcnow
from daemon.workflow.phases import Phase

_COLORS = {
    Phase.EMPTY: "\x1b[2m",
    Phase.DONE: "\x1b[32m",
    Phase.FAILED: "\x1b[31m",
    Phase.NEEDS_ATTENTION: "\x1b[33m",
    Phase.INTERRUPTED: "\x1b[35m",
}
_RUNNING_COLOR = "\x1b[36m"
_RESET = "\x1b[0m"


def elapsed(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}:{seconds % 60:02d}"


def _progress(state: PortState, width: int = 10) -> str:
    """A bar with the percentage; for a port waiting its turn, its place in line."""
    if state.queue is not None:
        return f"queued {ordinal(state.queue.position)}"
    progress = state.progress
    if progress is None:
        return " " * (width + 5)
    filled = round(width * progress / 100)
    return "#" * filled + "." * (width - filled) + f" {progress:3d}%"


def _device(state: PortState) -> str:
    d = state.device
    if d is None:
        return ""
    parts = [d.product_type or "?", d.serial or (d.udid or "")[:12]]
    if d.ios_version:
        parts.append(f"iOS {d.ios_version}")
    return " ".join(parts)


def _note(state: PortState) -> str:
    if state.error is not None:
        return f"{state.error.code}: {state.error.message}"
    return state.detail or ""


def summary(states: Iterable[PortState]) -> str:
    counts = Counter(s.phase for s in states)
    parts = [f"{n} {phase.value}" for phase in Phase if (n := counts.get(phase))]
    return ", ".join(parts) or "no ports"


def render(
    states: list[PortState], *, now: datetime | None = None, color: bool = False, width: int = 120
) -> str:
    now = now or utcnow()
    header = f"{'PORT':<10} {'PHASE':<20} {'PROGRESS':<15} {'DEVICE':<36} {'TIME':>6}  NOTE"
    lines = [header]
    for s in states:
        phase = s.phase.value + (f" #{s.attempt}" if s.attempt > 1 else "")
        row = (
            f"{s.ref!s:<10} {phase:<20} {_progress(s):<15} {_device(s)[:36]:<36} "
            f"{elapsed((now - s.since).total_seconds()) if s.phase is not Phase.EMPTY else '':>6}  {_note(s)}"
        )[:width]
        if color:
            row = _COLORS.get(s.phase, _RUNNING_COLOR) + row + _RESET
        lines.append(row)
    lines.append("")
    lines.append(f"{len(states)} ports: {summary(states)}")
    return "\n".join(lines)


async def live(
    source: Callable[[], list[PortState]],
    out: TextIO,
    *,
    header: Callable[[], str],
    interval: float = 0.5,
) -> None:
    """Redraw the board in place until cancelled."""
    while True:
        redraw(out, header() + "\n\n" + render(source(), color=True))
        await asyncio.sleep(interval)


def redraw(out: TextIO, text: str) -> None:
    """Replace the terminal's contents with `text` (cursor home, clear to end): a flicker-free
    full-screen board without curses, shared by `demo` and `watch`."""
    out.write("\x1b[H\x1b[J" + text + "\n")
    out.flush()
