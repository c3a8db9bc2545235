"""setup: streamlined, MDM-managed setup from the device's Automated Device Enrollment configuration."""

from __future__ import annotations

from typing import ClassVar

from daemon.ios.base import SetupPlan
from daemon.workflow.phases import Phase
from daemon.workflow.steps.base import Check, CheckResult, Step, StepContext, StepError


class SetupStep(Step):
    name: ClassVar[str] = "setup"
    phase: ClassVar[Phase] = Phase.SETTING_UP
    # The cloud configuration can be applied once per erase (MCInstall error 14002 afterwards).
    safe_to_repeat: ClassVar[bool] = False

    async def check(self, ctx: StepContext) -> CheckResult:
        config = await ctx.services.backend.cloud_configuration(ctx.udid)
        if config is None:
            return CheckResult(Check.UNKNOWN, "the device does not report its cloud configuration")
        if config.applied:
            return CheckResult(
                Check.DONE, f"configured by {config.organization} ({config.configuration_url})"
            )
        return CheckResult(Check.NEEDED, "no cloud configuration applied")

    async def run(self, ctx: StepContext) -> str | None:
        plan = SetupPlan(expected_mdm_url=ctx.workflow.mdm_url or None)
        await ctx.services.backend.setup(ctx.udid, plan, ctx.progress)
        config = await ctx.services.backend.cloud_configuration(ctx.udid)
        if config is None or not config.applied:
            raise StepError("setup_not_applied", "the device reports no cloud configuration after setup")
        return f"managed by {config.organization} ({config.configuration_url})"
