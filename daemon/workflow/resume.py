"""Where a device's workflow continues when it (re)appears, from what the store remembers of it."""

from __future__ import annotations

from dataclasses import dataclass

from daemon.config import STEP_NAMES
from daemon.models import DeviceRecord, ErrorInfo
from daemon.workflow.phases import RUNNING, Phase
from daemon.workflow.steps.base import Step


@dataclass(frozen=True, slots=True)
class Resume:
    """Continue at `plan[index]`; `interrupted_step` names a step that had started and may have
    taken effect, so an unsafe step there is only re-run when its check proves the effect absent."""

    index: int
    interrupted_step: str | None = None


@dataclass(frozen=True, slots=True)
class Settled:
    """The device already has an outcome; the port shows it without running anything."""

    phase: Phase
    detail: str
    error: ErrorInfo | None = None


def index_of(step: str | None, plan: list[Step]) -> int:
    """Position of `step` in the plan, or of the first later step when the config no longer runs it."""
    if step is None or step not in STEP_NAMES:
        return 0
    order = STEP_NAMES.index(step)
    for i, planned in enumerate(plan):
        if STEP_NAMES.index(planned.name) >= order:
            return i
    return len(plan)


def resume_point(record: DeviceRecord | None, plan: list[Step]) -> Resume | Settled:
    if record is None or record.phase in (Phase.EMPTY, Phase.DETECTED):
        return Resume(0)
    if record.phase is Phase.DONE:
        return Settled(Phase.DONE, f"already provisioned (finished {record.updated:%Y-%m-%d %H:%M} UTC)")
    if record.phase is Phase.NEEDS_ATTENTION:
        return Settled(Phase.NEEDS_ATTENTION, "still needs attention: retry or skip", record.error)
    if record.phase is Phase.FAILED or record.phase is Phase.INTERRUPTED or record.phase in RUNNING:
        # Replugging a failed device is the bench's retry button; an interrupted one resumes.
        return Resume(index_of(record.step, plan), interrupted_step=record.step)
    return Resume(0)
