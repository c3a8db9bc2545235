"""erase: erase all content and settings; the device reboots into Setup Assistant."""

from __future__ import annotations

from typing import ClassVar

from daemon.workflow.phases import Phase
from daemon.workflow.steps.base import (
    Check,
    CheckResult,
    Step,
    StepContext,
    StepError,
    ensure_same_device,
)


class EraseStep(Step):
    name: ClassVar[str] = "erase"
    phase: ClassVar[Phase] = Phase.ERASING
    # Erasing an erased device costs time, nothing else (a provisional enrollment survives an erase).
    safe_to_repeat: ClassVar[bool] = True

    async def check(self, ctx: StepContext) -> CheckResult:
        reason = ctx.done_by_earlier.get(self.name)
        return CheckResult(Check.DONE, reason) if reason else CheckResult(Check.NEEDED)

    async def run(self, ctx: StepContext) -> str | None:
        before = ctx.device
        generation = ctx.presence_generation()
        ctx.progress(None, "erase requested; waiting for the device to reboot")
        await ctx.services.backend.erase(ctx.udid)
        ctx.udid = await ctx.wait_for_device(generation)
        info = await ctx.refresh()
        ensure_same_device(before, info)
        if not info.in_setup_assistant:
            raise StepError("erase_not_applied", "the device came back outside Setup Assistant")
        return "erased; device is in Setup Assistant"
