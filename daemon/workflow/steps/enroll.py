"""enroll: add the device to the organisation (provisional enrollment)."""

from __future__ import annotations

from typing import ClassVar

from daemon.workflow.phases import Phase
from daemon.workflow.steps.base import Check, CheckResult, Step, StepContext


class EnrollStep(Step):
    name: ClassVar[str] = "enroll"
    phase: ClassVar[Phase] = Phase.ENROLLING
    # A device accepts one enrollment nonce; a second attempt is refused and confuses the portal.
    safe_to_repeat: ClassVar[bool] = False

    async def check(self, ctx: StepContext) -> CheckResult:
        enrolled = await ctx.services.enroller.is_enrolled(ctx.device)
        if enrolled is None:
            return CheckResult(
                Check.UNKNOWN, f"{ctx.services.enroller.name} cannot tell whether it is enrolled"
            )
        if enrolled:
            return CheckResult(Check.DONE, f"{ctx.device.serial} is already in the organisation")
        return CheckResult(Check.NEEDED, f"{ctx.device.serial} is not in the organisation")

    async def run(self, ctx: StepContext) -> str | None:
        await ctx.services.enroller.enroll(ctx.device, ctx.progress)
        return f"{ctx.device.serial} added to the organisation via {ctx.services.enroller.name}"
