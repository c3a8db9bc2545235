"""enroll: get the device into the organisation (provisional enrollment), and prove it.

Adding a device to Apple Business Manager needs an Apple-minted nonce that only Apple Configurator
(on a Mac, signed in to Apple Business Manager) or an entitled iOS app can obtain, and the device
accepts it only while in Setup Assistant. No host API exists, so this step never "enrolls" by
itself. It makes sure a person does, and verifies the result through the Apple Business API:

- `configurator`: asks the technician (port light, log, the port's state) to add exactly this
  device with Apple Configurator, then waits for its serial to appear in the organisation;
- `external`: only waits, for devices added some other way;
- `skip`: the device must already be there; one that is not needs a person.

The step only observes, so repeating it is safe: a device already in the organisation is never
asked for twice (the check sees it first).
"""

from __future__ import annotations

import asyncio
from typing import ClassVar

from daemon.apple.base import AppleServiceError
from daemon.technician import ADD_TO_ABM, HandsRequest
from daemon.workflow.phases import Phase
from daemon.workflow.steps.base import Check, CheckResult, Step, StepContext, StepError


class EnrollStep(Step):
    name: ClassVar[str] = "enroll"
    phase: ClassVar[Phase] = Phase.ENROLLING
    safe_to_repeat: ClassVar[bool] = True
    waits_for_people: ClassVar[bool] = True
    waiting_for: ClassVar[str] = "adding the device to Apple Business Manager"

    async def check(self, ctx: StepContext) -> CheckResult:
        serial = ctx.device.serial
        inside = await ctx.apple.in_organisation(serial)
        if inside is None:
            return CheckResult(
                Check.UNKNOWN, "the organisation cannot be seen without the Apple Business API"
            )
        if inside:
            return CheckResult(Check.DONE, f"{serial} is already in the organisation")
        return CheckResult(Check.NEEDED, f"{serial} is not in the organisation")

    async def run(self, ctx: StepContext) -> str | None:
        serial, mode = ctx.device.serial, ctx.workflow.enrollment
        if mode == "skip":
            if await self._in_organisation(ctx):
                return f"{serial} is in the organisation"
            raise StepError(
                "not_in_organisation",
                f'{serial} is not in Apple Business Manager and workflow.enrollment is "skip";'
                ' add it with Apple Configurator, or set enrollment to "configurator"',
                retryable=False,
                attention=True,
            )
        if mode == "configurator":
            instruction = (
                f"port {ctx.ref}, serial {serial}: in Apple Configurator select the device and choose"
                " Prepare > Add to Apple Business Manager"
            )
            ctx.services.technician.ask(HandsRequest(ctx.ref, ADD_TO_ABM, instruction, serial, ctx.udid))
            ctx.progress(None, f"needs a technician: {instruction}")
        else:
            ctx.progress(None, f"waiting for {serial} to appear in Apple Business Manager")
        try:
            await ctx.apple.wait_in_organisation(serial)
        finally:
            ctx.services.technician.withdraw(ctx.ref)
        return f"{serial} is in the organisation"

    @staticmethod
    async def _in_organisation(ctx: StepContext) -> bool:
        """Apple's definite answer: an outage (the check may have met one) is waited out, not
        taken for "not there"."""
        while True:
            try:
                return await ctx.apple.in_organisation(ctx.device.serial) is True
            except AppleServiceError as exc:
                if not exc.retryable:
                    raise
                ctx.progress(None, f"Apple unreachable ({exc.message}); asking again")
                await asyncio.sleep(ctx.apple.interval)
