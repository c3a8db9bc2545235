"""What a step is: a phase, a check, an action, and a promise about repeating it.

`check` asks the world whether the step's effect is already in place: before a first run (an iOS
version that is already new enough needs no update) and, above all, after an interruption. A step
that is `safe_to_repeat` is simply run again after a crash or an unplug. A step that is not (a
restore in flight, a provisional enrollment, applying the cloud configuration) is re-run only when
`check` proves its effect is absent; when the check cannot tell, the port goes to
`needs_attention` and a person decides. Nothing half-done is ever silently repeated.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import ClassVar

import structlog

from daemon.apple.tracker import OrgTracker
from daemon.config import WorkflowConfig
from daemon.ios.base import DeviceBackend, DeviceInfo, FirmwareSource, ProgressFn
from daemon.models import DeviceIdentity, PortRef
from daemon.technician import Technician
from daemon.workflow.phases import Phase
from daemon.workflow.scheduler import Resource


class Check(enum.Enum):
    DONE = "done"  # the effect is in place; skip the step
    NEEDED = "needed"  # the effect is provably absent; running the step is not a repeat
    UNKNOWN = "unknown"  # cannot tell


@dataclass(frozen=True, slots=True)
class CheckResult:
    outcome: Check
    reason: str = ""


class StepError(Exception):
    """A step failed. `retryable` errors are retried per the step's policy; `attention` errors send
    the port to `needs_attention` (a person must act) instead of `failed`."""

    def __init__(self, code: str, message: str, *, retryable: bool = True, attention: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
        self.attention = attention


def ensure_same_device(before: DeviceInfo | DeviceIdentity, after: DeviceInfo) -> None:
    """After a step sent the device off USB (restore, erase), prove the one that came back is the
    same (ECID: the identity that survives every mode); a swap needs a person. `before` may be the
    recorded identity of a device that could not be read (in Recovery)."""
    if after.ecid != before.ecid:
        raise StepError(
            "device_replaced",
            f"ECID {after.ecid} came back instead of {before.ecid}",
            retryable=False,
            attention=True,
        )


@dataclass
class Services:
    """The collaborators steps use; the station builds them, steps never construct them."""

    backend: DeviceBackend
    firmware: FirmwareSource
    apple: OrgTracker | None
    """Apple Business Manager as seen through its APIs; None on a bench without access (config
    validation then keeps `enroll` and `assign` out of the steps)."""
    technician: Technician


@dataclass
class StepContext:
    ref: PortRef
    udid: str
    info: DeviceInfo | None
    services: Services
    workflow: WorkflowConfig
    progress: ProgressFn
    presence_generation: Callable[[], int]
    wait_for_device: Callable[[int], Awaitable[str]]
    """`await wait_for_device(generation)`: the UDID once the device is back in normal mode after
    the given presence generation (it re-enumerates during erase and restore)."""
    log: structlog.stdlib.BoundLogger
    in_recovery: DeviceIdentity | None = None
    """Set by the runner while the device sits on the port in Recovery mode (seen by its ECID, no
    UDID, no lockdownd): who it was when last read. Only a step that `restores_from_recovery` can
    act on such a device; it clears this once the device is back in normal mode."""
    done_by_earlier: dict[str, str] = field(default_factory=dict)
    """Later steps whose effect an earlier step already produced, with why (an erase-install restore
    is the erase). Lost on a restart, which only costs a repeat of a step that is safe to repeat."""

    @property
    def device(self) -> DeviceInfo:
        if self.info is None:
            raise StepError("not_detected", "the device has not been identified yet")
        return self.info

    @property
    def apple(self) -> OrgTracker:
        if self.services.apple is None:
            raise StepError(
                "apple_not_configured",
                "no Apple Business Manager access is configured (see docs/apple.md)",
                retryable=False,
                attention=True,
            )
        return self.services.apple

    async def refresh(self) -> DeviceInfo:
        self.info = await self.services.backend.info(self.udid)
        return self.info


class Step(abc.ABC):
    name: ClassVar[str]
    phase: ClassVar[Phase]
    safe_to_repeat: ClassVar[bool]
    restores_from_recovery: ClassVar[bool] = False
    """Whether the step can work on a device in Recovery (`StepContext.in_recovery`): only a restore
    can; for any other step such a device needs a person."""
    resources: ClassVar[frozenset[Resource]] = frozenset()
    """What the step takes from the scheduler while it runs (`daemon.workflow.scheduler`); none for a
    light step."""
    waits_for_people: ClassVar[bool] = False
    """The step waits for something people do (a technician, an administrator in the portal);
    running out of time then needs a person, not a retry."""
    waiting_for: ClassVar[str] = ""
    """What it waits for, in words, for the needs_attention reason."""

    async def check(self, ctx: StepContext) -> CheckResult:
        """Default: nothing to verify, so the step runs."""
        return CheckResult(Check.NEEDED)

    @abc.abstractmethod
    async def run(self, ctx: StepContext) -> str | None:
        """Do the work; return a short detail for the history (or None), raise `StepError`."""
