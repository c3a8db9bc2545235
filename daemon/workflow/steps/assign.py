"""assign: wait until the serial is assigned to the MDM server in Apple Business Manager.

Provisionally enrolled devices are parked on "Devices Added by Apple Configurator"; only an
assignment to the real MDM server lets setup continue. Where the assignment source can assign
(the Business Manager API) the step asks for it once, then observes like everyone else.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar

from daemon.apple.base import APPLE_CONFIGURATOR_SERVER
from daemon.workflow.phases import Phase
from daemon.workflow.steps.base import Check, CheckResult, Step, StepContext


def _is_target(server: str | None, target: str) -> bool:
    if server is None or server == APPLE_CONFIGURATOR_SERVER:
        return False
    return not target or server == target


class AssignStep(Step):
    name: ClassVar[str] = "assign"
    phase: ClassVar[Phase] = Phase.AWAITING_ASSIGNMENT
    safe_to_repeat: ClassVar[bool] = True  # observing (and re-requesting) an assignment is idempotent

    async def check(self, ctx: StepContext) -> CheckResult:
        server = await ctx.services.assignment.assigned_server(ctx.device.serial)
        if _is_target(server, ctx.workflow.mdm_server):
            return CheckResult(Check.DONE, f"{ctx.device.serial} is assigned to {server}")
        return CheckResult(Check.NEEDED, f"{ctx.device.serial} is on {server or 'no server'}")

    async def run(self, ctx: StepContext) -> str | None:
        serial, target = ctx.device.serial, ctx.workflow.mdm_server
        source = ctx.services.assignment
        if target and await source.assign(serial, target):
            ctx.log.info("assignment_requested", serial=serial, server=target)
        ctx.progress(
            None, f"waiting for {serial} to be assigned to {target or 'an MDM server'} in the portal"
        )
        while True:
            server = await source.assigned_server(serial)
            if _is_target(server, target):
                return f"assigned to {server}"
            await asyncio.sleep(ctx.workflow.assignment_poll_interval)
