"""update: restore the device to firmware that satisfies the configured minimum iOS version.

A restore that fails part-way can leave the device in Recovery mode: no UDID, no lockdownd, no
usable system. That is the one state in which `check` can answer without reading the device: a
device in Recovery is not running the new iOS (it is not running any), so the restore's effect is
provably absent and running it again is not a repeat (NEEDED, never UNKNOWN). The runner sets
`StepContext.in_recovery` only for a device whose ECID it recorded itself, so a stranger in Recovery
is never restored.
"""

from __future__ import annotations

from typing import ClassVar

from daemon.versions import at_least
from daemon.workflow.phases import Phase
from daemon.workflow.scheduler import Resource
from daemon.workflow.steps.base import (
    Check,
    CheckResult,
    Step,
    StepContext,
    StepError,
    ensure_same_device,
)

IN_RECOVERY = "device is in Recovery; its iOS must be restored"


class UpdateStep(Step):
    name: ClassVar[str] = "update"
    phase: ClassVar[Phase] = Phase.UPDATING
    # A restore in flight is never silently restarted: `check` (the version the device reports after
    # a fresh detect, or the device sitting in Recovery) decides whether the interrupted restore took
    # effect.
    safe_to_repeat: ClassVar[bool] = False
    restores_from_recovery: ClassVar[bool] = True
    # Most of a restore is the filesystem crossing the USB bus: it takes a slot on the controller.
    resources: ClassVar[frozenset[Resource]] = frozenset({Resource.USB_BANDWIDTH})

    async def check(self, ctx: StepContext) -> CheckResult:
        if ctx.in_recovery is not None:
            return CheckResult(Check.NEEDED, IN_RECOVERY)
        version, minimum = ctx.device.ios_version, ctx.workflow.minimum_ios
        if at_least(version, minimum):
            return CheckResult(Check.DONE, f"iOS {version} already satisfies minimum {minimum}")
        return CheckResult(Check.NEEDED, f"iOS {version} is below minimum {minimum}")

    async def run(self, ctx: StepContext) -> str | None:
        minimum = ctx.workflow.minimum_ios
        # Who the device is: as detected, or (in Recovery, where nothing can be read) as last read.
        known = ctx.in_recovery or ctx.device.identity()
        if known.product_type is None or known.ecid is None:
            raise StepError(
                "unknown_device",
                "the device is in Recovery and this station never read its model: restore it by hand",
                retryable=False,
                attention=True,
            )
        target = await ctx.services.firmware.target_for(known.product_type, minimum)
        if target is None:
            raise StepError(
                "unsupported_device",
                f"no firmware for {known.product_type} satisfies iOS {minimum}",
                retryable=False,
                attention=True,
            )
        before = known.ios_version or "?"
        # When the erase step is due too, one erase-install restore does both: a whole device cycle
        # (erase, reboot, Setup Assistant) saved. Only where the IPSW has an Erase identity.
        erase = target.erase_install is True and "erase" in ctx.workflow.steps
        generation = ctx.presence_generation()
        backend = ctx.services.backend
        if ctx.in_recovery is None:
            await backend.update(ctx.udid, target, erase=erase, progress=ctx.progress)
        else:
            ctx.progress(None, "restoring the device from Recovery mode")
            await backend.restore_from_recovery(known.ecid, target, erase=erase, progress=ctx.progress)
        ctx.udid = await ctx.wait_for_device(generation)
        after = await ctx.refresh()
        ensure_same_device(known, after)
        from_recovery = ctx.in_recovery is not None
        ctx.in_recovery = None
        if not at_least(after.ios_version, minimum):
            raise StepError("update_not_applied", f"device still reports iOS {after.ios_version}")
        how = ", restored from Recovery" if from_recovery else ""
        if erase:
            ctx.done_by_earlier["erase"] = f"erased by the erase-install restore to iOS {after.ios_version}"
            return f"iOS {before} -> {after.ios_version} ({after.build}), erase-install{how}"
        return f"iOS {before} -> {after.ios_version} ({after.build}){how}"
