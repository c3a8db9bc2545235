"""detect: read who the device is (UDID, ECID, serial, model, iOS version) before anything else."""

from __future__ import annotations

from typing import ClassVar

from daemon.workflow.phases import Phase
from daemon.workflow.steps.base import Step, StepContext


class DetectStep(Step):
    name: ClassVar[str] = "detect"
    phase: ClassVar[Phase] = Phase.DETECTED
    safe_to_repeat: ClassVar[bool] = True  # reading lockdown values changes nothing

    async def run(self, ctx: StepContext) -> str | None:
        info = await ctx.refresh()
        return f"{info.product_type} iOS {info.ios_version} ({info.build}), serial {info.serial}"
