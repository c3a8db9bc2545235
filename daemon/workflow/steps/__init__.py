"""One module per step; `plan` turns the configured step names into step objects in workflow order."""

from __future__ import annotations

from daemon.workflow.steps.assign import AssignStep
from daemon.workflow.steps.base import Step
from daemon.workflow.steps.detect import DetectStep
from daemon.workflow.steps.enroll import EnrollStep
from daemon.workflow.steps.erase import EraseStep
from daemon.workflow.steps.setup import SetupStep
from daemon.workflow.steps.update import UpdateStep

STEPS: dict[str, Step] = {
    step.name: step for step in (UpdateStep(), EraseStep(), EnrollStep(), AssignStep(), SetupStep())
}
DETECT = DetectStep()


def plan(names: tuple[str, ...]) -> list[Step]:
    return [STEPS[name] for name in names]


def step_for_phase(phase: str) -> Step | None:
    for step in (DETECT, *STEPS.values()):
        if step.phase == phase:
            return step
    return None
