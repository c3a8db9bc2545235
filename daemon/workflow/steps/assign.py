"""assign: wait until the serial is assigned to the target MDM server in Apple Business Manager.

Provisionally enrolled devices are parked on "Devices Added by Apple Configurator"; only an
assignment to the real MDM server lets setup continue. The port does not poll Apple itself: it
waits on the station's `OrgTracker`, which answers every waiting serial together (and assigns them
itself when `apple.auto_assign` is set). Observing is idempotent, so the step is safe to repeat.
"""

from __future__ import annotations

import asyncio
import time
from typing import ClassVar

from daemon.workflow.phases import Phase
from daemon.workflow.steps.base import Check, CheckResult, Step, StepContext

PROGRESS_EVERY = 30.0
"""Seconds between refreshes of the waiting line (how many wait, for how long), at most; the
tracker's interval when that is shorter."""


class AssignStep(Step):
    name: ClassVar[str] = "assign"
    phase: ClassVar[Phase] = Phase.AWAITING_ASSIGNMENT
    safe_to_repeat: ClassVar[bool] = True
    waits_for_people: ClassVar[bool] = True
    waiting_for: ClassVar[str] = "the assignment to the MDM server"

    async def check(self, ctx: StepContext) -> CheckResult:
        serial = ctx.device.serial
        if await ctx.apple.assigned(serial):
            return CheckResult(Check.DONE, f"{serial} is assigned to {ctx.apple.target or 'the MDM server'}")
        return CheckResult(
            Check.NEEDED, f"{serial} is not assigned to {ctx.apple.target or 'the MDM server'}"
        )

    async def run(self, ctx: StepContext) -> str | None:
        tracker, serial = ctx.apple, ctx.device.serial
        wait = asyncio.ensure_future(tracker.wait_assigned(serial))
        started = time.time()
        try:
            while True:
                ctx.progress(None, self._waiting_line(ctx, started))
                done, _ = await asyncio.wait({wait}, timeout=min(PROGRESS_EVERY, tracker.interval))
                if done:
                    return wait.result()
        finally:
            wait.cancel()

    @staticmethod
    def _waiting_line(ctx: StepContext, started: float) -> str:
        status = ctx.apple.status()
        how = "being assigned" if ctx.apple.auto_assign else "waiting to be assigned in the portal"
        line = (
            f"{ctx.device.serial} {how} to {ctx.apple.target or 'the MDM server'}"
            f" ({len(status.waiting)} waiting, this one for {int(time.time() - started)} s)"
        )
        if status.last_error:
            line += f"; Apple unreachable: {status.last_error}"
        return line
