"""update: restore the device to firmware that satisfies the configured minimum iOS version."""

from __future__ import annotations

from typing import ClassVar

from daemon.versions import at_least
from daemon.workflow.phases import Phase
from daemon.workflow.steps.base import (
    Check,
    CheckResult,
    Step,
    StepContext,
    StepError,
    ensure_same_device,
)


class UpdateStep(Step):
    name: ClassVar[str] = "update"
    phase: ClassVar[Phase] = Phase.UPDATING
    # A restore in flight is never silently restarted: `check` (the version the device reports after
    # a fresh detect) decides whether the interrupted restore took effect.
    safe_to_repeat: ClassVar[bool] = False

    async def check(self, ctx: StepContext) -> CheckResult:
        version, minimum = ctx.device.ios_version, ctx.workflow.minimum_ios
        if at_least(version, minimum):
            return CheckResult(Check.DONE, f"iOS {version} already satisfies minimum {minimum}")
        return CheckResult(Check.NEEDED, f"iOS {version} is below minimum {minimum}")

    async def run(self, ctx: StepContext) -> str | None:
        device, minimum = ctx.device, ctx.workflow.minimum_ios
        target = await ctx.services.firmware.target_for(device.product_type, minimum)
        if target is None:
            raise StepError(
                "unsupported_device",
                f"no firmware for {device.product_type} satisfies iOS {minimum}",
                retryable=False,
                attention=True,
            )
        before = device.ios_version
        # When the erase step is due too, one erase-install restore does both: a whole device cycle
        # (erase, reboot, Setup Assistant) saved. Only where the IPSW has an Erase identity.
        erase = target.erase_install is True and "erase" in ctx.workflow.steps
        generation = ctx.presence_generation()
        await ctx.services.backend.update(ctx.udid, target, erase=erase, progress=ctx.progress)
        ctx.udid = await ctx.wait_for_device(generation)
        after = await ctx.refresh()
        ensure_same_device(device, after)
        if not at_least(after.ios_version, minimum):
            raise StepError("update_not_applied", f"device still reports iOS {after.ios_version}")
        if erase:
            ctx.done_by_earlier["erase"] = f"erased by the erase-install restore to iOS {after.ios_version}"
            return f"iOS {before} -> {after.ios_version} ({after.build}), erase-install"
        return f"iOS {before} -> {after.ios_version} ({after.build})"
