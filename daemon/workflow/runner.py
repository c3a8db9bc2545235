"""PortRunner: everything that happens on one physical port.

Each port has one long-lived runner task that handles its signals in order (device present, device
absent, unplugged, operator action), so nothing about a port ever races with itself. The workflow
for the device on the port runs as a child task: unplugging cancels it and records `interrupted`;
the same device plugged back resumes where the store says it was.

Leaving USB is not leaving the port. A device re-enumerates during a restore (normal -> Recovery ->
restore mode -> normal), an erase and every reboot; while it is gone the port keeps it, and the
same ECID (or UDID) coming back is the same device. What ends a device's stay:

* the hub saying the port is empty (`unplugged()`, hubs that sense attachment: Cambrionix), or
* on hubs that cannot tell (plain USB hubs, or a Cambrionix whose serial link is down), the device
  staying off USB for `workflow.reenumeration_window` seconds while no step expects it to be away
  (an erase or a restore has its own timeout), or
* another device arriving on the port.

A device in Recovery mode (a libusb device carrying only its ECID: no UDID, no lockdownd) is what a
restore that failed part-way leaves behind. Its system is unusable, so nothing but another restore
helps, and that restore is not a repeat of a half-done step: a device in Recovery is provably not
running the new iOS, so the update step's check answers NEEDED. The rules:

* during the update step (the recheck after a failed attempt), the device seen in Recovery with the
  ECID this port detected is restored again, by ECID, as the step's next attempt (recorded as such,
  within the step's retries); when the last attempt leaves it in Recovery, the port needs attention;
* a device in Recovery arriving while nothing runs (replugged, or present when the daemon starts)
  resumes its restore only if the store knows its ECID and its workflow stands at a step that
  restores (`update`: interrupted, running or failed there), and the port's workflow has that step;
* anything else in Recovery is `needs_attention`, never restored: a device with another or an
  unknown ECID (never restore a stranger), a known device whose workflow was elsewhere, and a device
  this station has no history of, even on a port whose workflow includes `update`: the station
  does not know its model (so not which firmware), nor whether wiping or updating it is wanted;
  Recovery alone is no licence to restore someone's phone. A person restores it (Finder, Apple
  Configurator) or uses `retry`, which restores a known device from Recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import structlog

from daemon.apple.base import AppleServiceError
from daemon.config import WorkflowConfig
from daemon.ios.base import DeviceError, DeviceInfo, DeviceMode, DeviceSeen, on_transfer_done
from daemon.models import DeviceIdentity, ErrorInfo, PortRef, PortState, Queued, Transition
from daemon.store import Store, StoreUnavailable
from daemon.workflow.actions import ALLOWED_IN, Action, ActionRejected
from daemon.workflow.phases import RUNNING, SETTLED, Phase
from daemon.workflow.resume import Resume, Settled, index_of, resume_point
from daemon.workflow.scheduler import Scheduler
from daemon.workflow.steps import DETECT, plan
from daemon.workflow.steps.base import Check, CheckResult, Services, Step, StepContext, StepError

PowerCycle = Callable[[int], Awaitable[None]]

_AWAY_EXPECTED = frozenset({Phase.UPDATING, Phase.ERASING})
"""Phases whose step sends the device off USB on purpose; the step's own timeout bounds the absence."""

RECORD_AT_STOP: Final = 3.0
"""Seconds a stopping runner waits for a failing store to take its last transition (`interrupted`)
before it gives up: a stop must not hang on a full disk, and the next start's `Store.recover`
records the same `interrupted` anyway."""


@dataclass(frozen=True, slots=True)
class _Present:
    seen: DeviceSeen


@dataclass(frozen=True, slots=True)
class _Absent:
    pass


@dataclass(frozen=True, slots=True)
class _Unplugged:
    reason: str = "device unplugged"


@dataclass(frozen=True, slots=True)
class _AwayTooLong:
    generation: int


@dataclass(frozen=True, slots=True)
class _Act:
    action: Action
    reply: asyncio.Future[str]


@dataclass(frozen=True, slots=True)
class _Finished:
    task: asyncio.Task[None]


_Signal = _Present | _Absent | _Unplugged | _AwayTooLong | _Act | _Finished


@dataclass(frozen=True, slots=True)
class _Failure:
    code: str
    message: str
    retryable: bool
    attention: bool = False


def _classify(exc: BaseException, step: Step, timeout: float) -> _Failure:
    if isinstance(exc, StepError):
        return _Failure(exc.code, exc.message, exc.retryable, exc.attention)
    if isinstance(exc, DeviceError | AppleServiceError):
        return _Failure(exc.code, exc.message, exc.retryable, attention=not exc.retryable)
    if isinstance(exc, TimeoutError) and step.waits_for_people:
        # Nobody did what the step waits for (add the device, assign it): a person must look.
        message = f"{step.name}: {step.waiting_for} did not happen within {timeout:g} s"
        return _Failure("timeout", message, retryable=False, attention=True)
    if isinstance(exc, TimeoutError):
        return _Failure("timeout", f"{step.name} took longer than {timeout:g} s", retryable=True)
    return _Failure("internal_error", f"{type(exc).__name__}: {exc}", retryable=False)


def _matches(identity: DeviceIdentity | None, seen: DeviceSeen) -> bool:
    if identity is None:
        return False
    if identity.ecid and seen.ecid:
        return identity.ecid == seen.ecid
    return identity.udid is not None and identity.udid == seen.udid


def _last_progress(state: PortState) -> str:
    """`45 % (sending filesystem)`, `queued: 2nd in line …`, or "" when the step reported nothing."""
    percent = f"{state.progress} %" if state.progress is not None else ""
    if state.detail:
        return f"{percent} ({state.detail})" if percent else state.detail
    return percent


@dataclass
class _Progress:
    at: float = 0.0
    percent: int | None = None
    detail: str | None = None


class PortRunner:
    def __init__(
        self,
        ref: PortRef,
        store: Store,
        services: Services,
        workflow: WorkflowConfig,
        scheduler: Scheduler,
        *,
        power_cycle: PowerCycle | None = None,
        on_phase: Callable[[PortRef, Phase], None] | None = None,
        senses_unplug: Callable[[], bool] = lambda: False,
    ) -> None:
        """`senses_unplug()` says whether the port's hub reports unplugging right now (it then calls
        `unplugged()`); otherwise a device away from USB too long counts as unplugged."""
        self.ref = ref
        self._on_phase = on_phase
        self.store = store
        self.services = services
        self.workflow = workflow
        self.scheduler = scheduler
        self._plugged_at = 0.0
        """When the current device's workflow started (monotonic): its place in the scheduler's
        queues, kept across the workflow's own retries."""
        self._power_cycle = power_cycle
        self._senses_unplug = senses_unplug
        self._away_timer: asyncio.TimerHandle | None = None
        self._plan = plan(workflow.steps)
        self._inbox: asyncio.Queue[_Signal] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._presence: DeviceSeen | None = None
        self._generation = 0
        self._changed = asyncio.Event()
        self._info: DeviceInfo | None = None
        self._progress = _Progress()
        self._last_detail: str | None = None  # what the last successful step reported, for the history
        self._recovery_reported: str | None = None
        """ECID of the device in Recovery this port last sent to `needs_attention` (a stranger, not
        in the store): its re-enumerations are not reported again."""
        self.log = structlog.get_logger("benchhub.port").bind(hub=ref.hub, port=ref.port)

    # ------------------------------------------------------------ signals in

    def device_present(self, seen: DeviceSeen) -> None:
        self._inbox.put_nowait(_Present(seen))

    def device_absent(self) -> None:
        self._inbox.put_nowait(_Absent())

    def unplugged(self) -> None:
        self._inbox.put_nowait(_Unplugged())

    async def act(self, action: Action) -> str:
        """Carry out an operator action; raises `ActionRejected` with the reason if it does not apply."""
        reply: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._inbox.put_nowait(_Act(action, reply))
        return await reply

    @property
    def state(self) -> PortState:
        return self.store.port(self.ref)

    # -------------------------------------------------------------- the loop

    async def run(self) -> None:
        try:
            while True:
                signal = await self._inbox.get()
                try:
                    await self._handle(signal)
                except Exception:  # a bug in one port must not stop the others
                    self.log.exception("port_signal_failed", signal=type(signal).__name__)
        finally:
            # The daemon is stopping: say so in the history now, rather than leave the port looking
            # busy until the next start. The device keeps its step and resumes from it.
            await self._interrupt("daemon stopped", actor="recovery", within=RECORD_AT_STOP)

    async def _handle(self, signal: _Signal) -> None:
        match signal:
            case _Present(seen):
                await self._on_present(seen)
            case _Absent():
                self._set_presence(None)
                self._start_away_timer()
            case _Unplugged(reason):
                await self._on_unplugged(reason)
            case _AwayTooLong(generation):
                await self._on_away_too_long(generation)
            case _Act(action, reply):
                try:
                    result = await self._on_action(action)
                except ActionRejected as exc:
                    if not reply.done():
                        reply.set_exception(exc)
                else:
                    if not reply.done():
                        reply.set_result(result)
            case _Finished(task):
                if task is self._task:
                    self._task = None

    def _set_presence(self, seen: DeviceSeen | None) -> None:
        self._presence = seen
        if seen is not None:
            self._generation += 1
            if self._away_timer is not None:
                self._away_timer.cancel()
                self._away_timer = None
        self._changed.set()

    def _another_device(self, seen: DeviceSeen) -> bool:
        """Whether `seen` proves the port holds a device other than the one being worked on. Only
        an ECID proves it while a restore or erase runs: a legacy device in restore mode shows a
        placeholder UDID (`ffff...0007`)."""
        identity = self._identity()
        if identity is None or (seen.udid is None and seen.ecid is None):
            return False
        if identity.ecid and seen.ecid:
            return identity.ecid != seen.ecid
        if self._task is not None and self.state.phase in _AWAY_EXPECTED:
            return False
        return not _matches(identity, seen)

    def _start_away_timer(self) -> None:
        """Count the device's time off USB (see the module docstring)."""
        if self._away_timer is not None:
            self._away_timer.cancel()
        signal = _AwayTooLong(self._generation)
        self._away_timer = asyncio.get_running_loop().call_later(
            self.workflow.reenumeration_window, self._inbox.put_nowait, signal
        )

    async def _on_away_too_long(self, generation: int) -> None:
        self._away_timer = None
        if self._presence is not None or generation != self._generation:
            return  # it came back (and maybe left again: that absence has its own timer)
        if self._senses_unplug():
            return  # the hub can tell, and has not said the port is empty
        if self._task is not None and self.state.phase in _AWAY_EXPECTED:
            self._start_away_timer()  # the step sent it away; its own timeout decides
            return
        window = self.workflow.reenumeration_window
        self.log.info("device_away_too_long", seconds=window)
        await self._on_unplugged(f"device gone from USB for {window:g} s")

    async def _on_present(self, seen: DeviceSeen) -> None:
        if self._task is not None and self._another_device(seen):
            # A different device arrived faster than the hub noticed the old one leaving.
            await self._interrupt("replaced by another device")
        self._set_presence(seen)
        if self._task is None and seen.mode is DeviceMode.RECOVERY and seen.ecid:
            await self._on_recovery(seen)
            return
        if self._task is not None or seen.mode is not DeviceMode.NORMAL or seen.udid is None:
            return
        self._recovery_reported = None
        state = self.state
        if state.phase in SETTLED:
            if _matches(state.device, seen):
                return  # the device already has its outcome (e.g. seen again after a restart)
            await self._record(Phase.EMPTY, detail="another device was plugged in")
        self._start(seen)

    async def _on_recovery(self, seen: DeviceSeen) -> None:
        """A device in Recovery, and nothing running on the port (the rules: module docstring)."""
        assert seen.ecid is not None
        state = self.state
        if state.phase in SETTLED and _matches(state.device, seen):
            return  # its outcome stands (e.g. its restores failed): a person decides
        if state.phase is Phase.NEEDS_ATTENTION and self._recovery_reported == seen.ecid:
            return  # the stranger already reported, re-enumerating
        record = self.store.device(DeviceIdentity(ecid=seen.ecid).key or "")
        point = resume_point(record, self._plan) if record is not None else None
        if (
            record is not None
            and isinstance(point, Resume)
            and point.index < len(self._plan)
            and self._plan[point.index].restores_from_recovery
        ):
            await self._clear_for(seen)
            self.log.info("resuming_from_recovery", ecid=seen.ecid, step=self._plan[point.index].name)
            self._start(seen, recovery=record.identity)
            return
        if record is None:
            reason = (
                f"device is in Recovery mode (ECID {seen.ecid}) and this station has no history of it:"
                " restore it (Finder, Apple Configurator), then plug it in again"
            )
        elif not any(step.restores_from_recovery for step in self._plan):
            reason = (
                f"device is in Recovery mode (ECID {seen.ecid}); restore it or plug it into a port"
                " whose workflow includes update"
            )
        elif isinstance(point, Settled):
            reason = f"device is in Recovery mode (ECID {seen.ecid}); {point.detail}"
        else:
            reason = (
                f"device is in Recovery mode (ECID {seen.ecid}) but its workflow was at {record.step},"
                " not restoring it: restore it by hand, then retry"
            )
        self.log.warning("device_in_recovery", ecid=seen.ecid, known=record is not None)
        await self._clear_for(seen)
        identity = record.identity if record is not None else None
        await self._record(
            Phase.DETECTED, device=identity, detail=f"device in Recovery mode (ECID {seen.ecid})"
        )
        await self._record(
            Phase.NEEDS_ATTENTION,
            device=identity,
            error=ErrorInfo("recovery_mode", reason),
            extra={"recovery_ecid": seen.ecid},
        )
        self._recovery_reported = seen.ecid if record is None else None

    async def _clear_for(self, seen: DeviceSeen) -> None:
        """The port still names another device (its outcome, or an interrupted step): it leaves the
        port first, so that nothing about the device in Recovery is written against it."""
        state = self.state
        if state.phase is not Phase.EMPTY and not _matches(state.device, seen):
            await self._record(Phase.EMPTY, detail="another device was plugged in")

    def _recovery_identity(self, seen: DeviceSeen | None) -> DeviceIdentity | None:
        """Who the device in Recovery on the port is, if it is the one this port worked on (its ECID
        is the recorded one); None for any other presence."""
        identity = self._identity()
        if seen is None or seen.mode is not DeviceMode.RECOVERY or identity is None:
            return None
        if not identity.ecid or identity.ecid != seen.ecid:
            return None
        return identity

    async def _on_unplugged(self, reason: str = "device unplugged") -> None:
        self._set_presence(None)
        await self._interrupt(reason)
        state = self.state
        if state.phase in SETTLED:
            await self._record(Phase.EMPTY, detail=reason)
        self._info = None

    async def _interrupt(self, reason: str, actor: str = "workflow", within: float | None = None) -> None:
        """Stop the workflow and record it `interrupted`; `within`: see `_record`."""
        had_task = self._task is not None
        await self._cancel_workflow()
        state = self.state
        if had_task and state.phase in RUNNING:
            # Where it stopped, for whoever resumes or audits it: a restore cut off at 80 % of its
            # flashing is a different story from one still queued or entering Recovery.
            last = _last_progress(state)
            await self._record(
                Phase.INTERRUPTED,
                step=state.step,
                attempt=state.attempt,
                detail=f"{reason} during {state.step}" + (f"; last progress: {last}" if last else ""),
                extra={"progress": state.progress, "progress_detail": state.detail} if last else None,
                actor=actor,
                within=within,
            )

    async def _cancel_workflow(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --------------------------------------------------------------- actions

    async def _on_action(self, action: Action) -> str:
        state = self.state
        if state.phase not in ALLOWED_IN[action]:
            raise ActionRejected(f"{action} does not apply to a port that is {state.phase}")
        self.log.info("operator_action", action=action.value, phase=state.phase.value)
        if action is Action.POWER_CYCLE:
            if self._power_cycle is None:
                raise ActionRejected("this hub cannot switch port power")
            await self._power_cycle(self.ref.port)
            if self.state.phase in SETTLED:
                # Like a replug: when the device comes back it is detected and resumed. The hub may
                # not have reported the detach itself (Cambrionix blanks attach detection for 2 s).
                await self._record(Phase.EMPTY, detail="port power-cycled", actor="operator")
            return "port power-cycled"
        if action is Action.ABORT:
            await self._cancel_workflow()
            await self._record(
                Phase.FAILED,
                step=state.step,
                attempt=state.attempt,
                error=ErrorInfo("aborted", "aborted by an operator"),
                actor="operator",
            )
            return "aborted"
        seen = self._presence
        step_name = state.step or (self._plan[0].name if self._plan else None)
        recovery = self._recovery_identity(seen)
        if seen is not None and recovery is not None:
            # Its own device, in Recovery: the only thing to do with it is the restore, by ECID.
            start = index_of(step_name, self._plan)
            if action is not Action.RETRY or not (
                start < len(self._plan) and self._plan[start].restores_from_recovery
            ):
                raise ActionRejected("the device is in Recovery mode: only retrying its restore applies")
            await self._cancel_workflow()
            self._start(seen, start=start, forced=True, recovery=recovery, retried_by_operator=step_name)
            return f"retrying {step_name} from Recovery"
        if seen is not None and seen.mode is DeviceMode.RECOVERY:
            raise ActionRejected(
                "the device on this port is in Recovery mode and is not the one this port worked on:"
                " restore it by hand"
            )
        if seen is None or seen.udid is None or seen.mode is not DeviceMode.NORMAL:
            raise ActionRejected("no device is connected to this port")
        if action is Action.RETRY:
            await self._cancel_workflow()
            self._start(
                seen, start=index_of(step_name, self._plan), forced=True, retried_by_operator=step_name
            )
            return f"retrying {step_name}"
        # SKIP
        await self._cancel_workflow()
        nxt = index_of(step_name, self._plan) + 1
        self._start(seen, start=nxt, skipped_by_operator=step_name)
        return f"skipped {step_name}"

    # -------------------------------------------------------------- workflow

    def _start(
        self,
        seen: DeviceSeen,
        *,
        start: int | None = None,
        forced: bool = False,
        skipped_by_operator: str | None = None,
        recovery: DeviceIdentity | None = None,
        retried_by_operator: str | None = None,
    ) -> None:
        """Run the workflow for `seen`. `recovery`: the device is in Recovery and this is who it is
        (its recorded identity); the workflow then starts at its restore, without a detect.
        `retried_by_operator`: the step an operator retries; its first row carries actor "operator"
        (like a skip's), so the audit trail (`benchhub report`) tells it from the workflow's retries."""
        self._plugged_at = time.monotonic()
        task = asyncio.get_running_loop().create_task(
            self._workflow(
                seen, start, forced, skipped_by_operator, recovery, retried_by_operator=retried_by_operator
            ),
            name=f"workflow {self.ref}",
        )
        task.add_done_callback(lambda t: self._inbox.put_nowait(_Finished(t)))
        self._task = task

    async def _workflow(
        self,
        seen: DeviceSeen,
        start: int | None,
        forced: bool,
        skipped_by_operator: str | None,
        recovery: DeviceIdentity | None,
        *,
        retried_by_operator: str | None = None,
    ) -> None:
        structlog.contextvars.bind_contextvars(hub=self.ref.hub, port=self.ref.port, udid=seen.udid)
        try:
            await self._drive(
                seen, start, forced, skipped_by_operator, recovery, retried_by_operator=retried_by_operator
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not take the station down; the port says what happened
            self.log.exception("workflow_crashed")
            with contextlib.suppress(Exception):
                state = self.state
                await self._record(
                    Phase.FAILED,
                    step=state.step,
                    attempt=state.attempt,
                    error=ErrorInfo("internal_error", f"{type(exc).__name__}: {exc}"),
                )

    def _context(
        self, seen: DeviceSeen, info: DeviceInfo | None, recovery: DeviceIdentity | None = None
    ) -> StepContext:
        # In Recovery the device has no UDID; the recorded one stands in until the restore is done.
        udid = seen.udid or (recovery.udid if recovery else None)
        assert udid is not None or recovery is not None
        return StepContext(
            ref=self.ref,
            udid=udid or "",
            in_recovery=recovery,
            info=info,
            services=self.services,
            workflow=self.workflow,
            progress=self._report_progress,
            presence_generation=lambda: self._generation,
            wait_for_device=self._wait_for_device,
            log=self.log,
        )

    async def _drive(
        self,
        seen: DeviceSeen,
        start: int | None,
        forced: bool,
        skipped_by_operator: str | None,
        recovery: DeviceIdentity | None = None,
        *,
        retried_by_operator: str | None = None,
    ) -> None:
        ctx = self._context(seen, self._info if start is not None else None, recovery)
        extra: dict[str, Any] = {}
        actor = "workflow"
        if skipped_by_operator is not None:
            extra["skipped_by_operator"] = skipped_by_operator
            actor = "operator"
        interrupted: str | None = None
        if recovery is not None:
            if start is None:
                start, interrupted = await self._resume_in_recovery(recovery)
        elif ctx.info is None:
            identity = DeviceIdentity(udid=seen.udid, ecid=seen.ecid)
            if not await self._execute(DETECT, ctx, identity=identity, extra=extra, actor=actor):
                return
            self._info = ctx.device
            # The device as found, before anything changed it: the audit trail's "before" column.
            extra = {"completed": {DETECT.name: self._last_detail}, "found": ctx.device.identity().as_dict()}
            actor = "workflow"
        if start is None:
            key = ctx.device.identity().key
            point = resume_point(self.store.device(key) if key else None, self._plan)
            if isinstance(point, Settled):
                await self._record(
                    point.phase,
                    device=ctx.device.identity(),
                    detail=point.detail,
                    error=point.error,
                    extra=extra,
                )
                return
            start, interrupted = point.index, point.interrupted_step
            if interrupted:
                self.log.info("resuming", step=interrupted)
        if retried_by_operator is not None:
            # Marked here, after any detect, so the mark lands on the retried step's first row.
            extra["retried_by_operator"] = retried_by_operator
            actor = "operator"
        await self._run_plan(
            ctx, start, forced=forced, interrupted=interrupted, extra=extra, actor=actor, recovery=recovery
        )

    async def _resume_in_recovery(self, recovery: DeviceIdentity) -> tuple[int, str | None]:
        """Where a device found in Recovery resumes (`_on_recovery` checked it is a restoring step).
        Nothing can be read in Recovery, so there is no detect: the port shows who the device was."""
        point = resume_point(self.store.device(recovery.key or ""), self._plan)
        assert isinstance(point, Resume)
        await self._record(
            Phase.DETECTED,
            device=recovery,
            detail=f"device in Recovery mode (ECID {recovery.ecid}): resuming its restore",
            extra={"recovery_ecid": recovery.ecid},
        )
        return point.index, point.interrupted_step

    async def _run_plan(
        self,
        ctx: StepContext,
        start: int,
        *,
        forced: bool,
        interrupted: str | None,
        extra: dict[str, Any],
        actor: str,
        recovery: DeviceIdentity | None,
    ) -> None:
        """The plan's steps from `start`: each checked (skipped when done), run, recorded; then done."""
        for i, step in enumerate(self._plan[start:]):
            if not (forced and i == 0):
                check = await self._check(step, ctx)
                if check.outcome is Check.DONE:
                    self.log.info("step_skipped", step=step.name, reason=check.reason)
                    extra.setdefault("skipped", {})[step.name] = check.reason
                    continue
                if check.outcome is Check.UNKNOWN and interrupted == step.name and not step.safe_to_repeat:
                    await self._needs_attention_unknown(step, check, extra)
                    return
            if not await self._execute(step, ctx, identity=recovery, extra=extra, actor=actor):
                return
            if self._info is None:
                self._info = ctx.info  # first read after a restore from Recovery
            extra, actor = {"completed": {step.name: self._last_detail}}, "workflow"
        await self._record(
            Phase.DONE, device=ctx.device.identity(), detail="provisioned", extra=extra, actor=actor
        )

    async def _needs_attention_unknown(self, step: Step, check: CheckResult, extra: dict[str, Any]) -> None:
        await self._record(
            Phase.NEEDS_ATTENTION,
            step=step.name,
            error=ErrorInfo(
                "unknown_state",
                f"{step.name} was interrupted and whether it took effect cannot be verified"
                f" ({check.reason}); check the device, then retry or skip",
            ),
            extra=extra,
        )

    async def _recheck(self, step: Step, ctx: StepContext, failure: _Failure) -> CheckResult:
        """`check` after a failed attempt of an unsafe step, on freshly read device state. A device
        that cannot be read gets the re-enumeration window to come back (a cut-off restore reboots
        it). Seen in Recovery instead (what a restore failing part-way leaves), with the ECID this
        port detected: a step that restores is asked with `in_recovery` set (its check can tell: the
        new iOS is not there); any other step cannot tell (UNKNOWN). Still unreadable after the
        window (gone), the answer is UNKNOWN."""
        generation = self._generation
        ctx.in_recovery = None
        try:
            await ctx.refresh()
        except (DeviceError, TimeoutError):
            back: DeviceSeen | None = None
            with contextlib.suppress(TimeoutError):
                back = await asyncio.wait_for(
                    self._wait_for_return(generation), self.workflow.reenumeration_window
                )
            recovery = self._recovery_identity(back)
            if recovery is not None:
                if not step.restores_from_recovery:
                    return CheckResult(Check.UNKNOWN, f"the device is in Recovery mode after {failure.code}")
                ctx.in_recovery = recovery
                return await self._check(step, ctx)
            if back is not None and back.udid is not None:
                ctx.udid = back.udid
            try:
                await ctx.refresh()
            except (DeviceError, TimeoutError) as exc:
                reason = getattr(exc, "message", None) or type(exc).__name__
                return CheckResult(Check.UNKNOWN, f"cannot read the device after {failure.code}: {reason}")
        return await self._check(step, ctx)

    async def _check(self, step: Step, ctx: StepContext) -> CheckResult:
        timeout = self.workflow.policy_for(step.name).timeout
        try:
            async with asyncio.timeout(min(timeout, 120.0)):
                return await step.check(ctx)
        except (StepError, DeviceError, AppleServiceError, TimeoutError) as exc:
            failure = _classify(exc, step, timeout)
            return CheckResult(Check.UNKNOWN, f"check failed: {failure.message}")

    async def _execute(
        self,
        step: Step,
        ctx: StepContext,
        *,
        identity: DeviceIdentity | None = None,
        extra: dict[str, Any] | None = None,
        actor: str = "workflow",
    ) -> bool:
        """Run one step with its timeout and retries; record every attempt. True when it succeeded."""
        policy = self.workflow.policy_for(step.name)
        attempts = policy.retries + 1
        failure: _Failure | None = None
        for attempt in range(1, attempts + 1):
            if failure is not None and not step.safe_to_repeat:
                # The failed attempt may have taken effect; only a proven absence allows another,
                # judged on the device as it is now (a restore may have changed its version).
                check = await self._recheck(step, ctx, failure)
                if check.outcome is Check.DONE:
                    self._last_detail = check.reason
                    return True
                if check.outcome is Check.UNKNOWN:
                    await self._needs_attention_unknown(step, check, {})
                    return False
            detail = f"retry after {failure.code}" if failure else None
            attempt_extra = extra if attempt == 1 else None
            if failure is not None and ctx.in_recovery is not None:
                # Not a blind re-run: the device sits in Recovery, the restore's effect is absent.
                detail = f"{check.reason}: restoring again after {failure.code}"
                attempt_extra = {"resumed_from_recovery": ctx.in_recovery.ecid}
            await self._record(
                step.phase,
                step=step.name,
                attempt=attempt,
                device=ctx.info.identity() if ctx.info else (ctx.in_recovery or identity),
                error=ErrorInfo(failure.code, failure.message) if failure else None,
                detail=detail,
                extra=attempt_extra,
                actor=actor if attempt == 1 else "workflow",
            )
            self._progress = _Progress()
            generation = self._generation
            try:
                async with (
                    self.scheduler.slot(
                        step.name,
                        step.resources,
                        self.ref,
                        plugged_at=self._plugged_at,
                        on_queued=self._queued,
                    ) as lease,
                    asyncio.timeout(policy.timeout),
                ):
                    with on_transfer_done(lease.transfer_done):
                        self._last_detail = await step.run(ctx)
                return True
            except (StepError, DeviceError, AppleServiceError, TimeoutError) as exc:
                failure = _classify(exc, step, policy.timeout)
            self.log.warning(
                "step_failed", step=step.name, attempt=attempt, code=failure.code, error=failure.message
            )
            if not failure.retryable or attempt == attempts:
                break
            if failure.code == "device_gone":
                back: DeviceSeen | None = None
                with contextlib.suppress(TimeoutError):
                    # Back in normal mode, or (a restore lost it on the way) in Recovery: no waiting
                    # out the window for a device that is not going to boot by itself.
                    back = await asyncio.wait_for(
                        self._wait_for_return(generation), self.workflow.reenumeration_window
                    )
                if back is not None and back.udid is not None:
                    ctx.udid = back.udid
            await asyncio.sleep(policy.backoff * attempt)
        assert failure is not None
        if failure.retryable and step.restores_from_recovery:
            # The last attempt may have left the device in Recovery: then it has no system and no
            # attempts left, which a replug (the bench's retry for `failed`) must not renew blindly.
            check = await self._recheck(step, ctx, failure)
            if check.outcome is Check.DONE:
                self._last_detail = check.reason
                return True
            if ctx.in_recovery is not None:
                await self._record(
                    Phase.NEEDS_ATTENTION,
                    step=step.name,
                    attempt=attempt,
                    error=ErrorInfo(
                        failure.code,
                        f"{failure.message}; after {attempt} attempts the device is left in Recovery"
                        " mode: restore it by hand, or retry",
                    ),
                )
                return False
        await self._record(
            Phase.NEEDS_ATTENTION if failure.attention else Phase.FAILED,
            step=step.name,
            attempt=attempt,
            error=ErrorInfo(failure.code, failure.message),
        )
        return False

    async def _wait_for_return(self, after_generation: int) -> DeviceSeen:
        """The device once it is back in normal mode after `after_generation`, or as soon as this
        port's device is seen in Recovery (whenever it got there: it stays until restored)."""
        while True:
            seen = self._presence
            if seen is not None and self._recovery_identity(seen) is not None:
                return seen
            if (
                self._generation > after_generation
                and seen is not None
                and seen.mode is DeviceMode.NORMAL
                and seen.udid is not None
            ):
                return seen
            self._changed.clear()
            await self._changed.wait()

    async def _wait_for_device(self, after_generation: int) -> str:
        """The UDID once the device has re-appeared in normal mode after `after_generation`."""
        while True:
            seen = self._presence
            if (
                self._generation > after_generation
                and seen is not None
                and seen.mode is DeviceMode.NORMAL
                and seen.udid is not None
            ):
                return seen.udid
            self._changed.clear()
            await self._changed.wait()

    # ------------------------------------------------------------- recording

    def _identity(self) -> DeviceIdentity | None:
        return self._info.identity() if self._info else self.state.device

    async def _record(
        self,
        phase: Phase,
        *,
        step: str | None = None,
        attempt: int = 0,
        device: DeviceIdentity | None = None,
        error: ErrorInfo | None = None,
        detail: str | None = None,
        extra: dict[str, Any] | None = None,
        actor: str = "workflow",
        within: float | None = None,
    ) -> PortState | None:
        """Record a transition, waiting for the store if need be (`_write`); None only when the
        store did not take it `within` seconds (a stopping runner: see `RECORD_AT_STOP`)."""
        transition = Transition(
            ref=self.ref,
            to=phase,
            step=step,
            attempt=attempt,
            device=device,
            error=error,
            detail=detail,
            actor=actor,
            extra=extra or {},
        )
        state = await self._write(transition, within)
        if state is None:
            return None
        structlog.contextvars.bind_contextvars(phase=phase.value)
        if self._on_phase is not None:
            self._on_phase(self.ref, phase)
        log = self.log.warning if error else self.log.info
        log(
            "transition",
            phase=phase.value,
            step=step,
            attempt=attempt,
            udid=state.device.udid if state.device else None,
            error=error.message if error else None,
            detail=detail,
            actor=actor,
        )
        return state

    async def _write(self, transition: Transition, within: float | None) -> PortState | None:
        """Write `transition`, however long the store fails (locked, disk full, I/O error).

        A transient store failure is not the device's: it must not become an outcome (`failed`), nor
        crash the workflow and leave the port in a running phase with nothing running it. So the
        port waits here, where it is, for the store to take writes again (`Store.writable`: the
        store's own probe, with backoff, tries for every waiting port), then writes the *same*
        transition. The workflow simply pauses: nothing after this transition happens before it is
        written, so the history stays in order without a gap, and since a failed write wrote
        nothing (rolled back), nothing is recorded twice. Unplugging meanwhile cancels the wait like
        any step. Only with `within` (a stopping runner) does it give up, saying what was lost."""
        loop = asyncio.get_running_loop()
        deadline = None if within is None else loop.time() + within
        waited_since: float | None = None
        while True:
            try:
                state = self.store.record(transition)
            except StoreUnavailable as exc:
                if waited_since is None:
                    waited_since = loop.time()
                    self.log.info("transition_waiting_for_store", phase=transition.to.value, error=str(exc))
                if not await self._until_writable(deadline):
                    self.log.error(
                        "transition_not_recorded",
                        phase=transition.to.value,
                        step=transition.step,
                        error=self.store.failing,
                        detail="the store stayed unavailable; the next start records the port interrupted",
                    )
                    return None
                continue
            if waited_since is not None:
                self.log.info(
                    "transition_recorded_after_wait",
                    phase=transition.to.value,
                    seconds=round(loop.time() - waited_since, 1),
                )
            return state

    async def _until_writable(self, deadline: float | None) -> bool:
        """Wait for `Store.writable`; False if `deadline` (loop time) passes first. `asyncio.wait`
        rather than `asyncio.timeout`: a stopping runner's task is being cancelled already, and a
        timeout scope would report its expiry as that cancellation instead of a timeout."""
        if deadline is None:
            await self.store.writable()
            return True
        waiting = asyncio.ensure_future(self.store.writable())
        try:
            done, _ = await asyncio.wait(
                {waiting}, timeout=max(0.0, deadline - asyncio.get_running_loop().time())
            )
        finally:
            waiting.cancel()
        return bool(done)

    def _queued(self, place: Queued | None) -> None:
        """The scheduler's news: the port's place in line, or None when its turn has come."""
        if place is None:
            self._report_progress(None, "starting")
        else:
            self._report_progress(None, place.describe(), queue=place)

    def _report_progress(self, percent: int | None, detail: str | None, queue: Queued | None = None) -> None:
        """Progress is throttled to one update a second per port, or a 5-point change, or a new detail;
        phase changes are never throttled (they are transitions). `queue`: the port's place in line
        while its step waits for the scheduler (a new place comes with a new detail)."""
        now = time.monotonic()
        last = self._progress
        changed_detail = detail is not None and detail != last.detail
        jump = percent is not None and (last.percent is None or abs(percent - last.percent) >= 5)
        final = percent == 100 and last.percent != 100
        if not (changed_detail or jump or final or now - last.at >= 1.0):
            return
        self._progress = _Progress(now, percent, detail if detail is not None else last.detail)
        # Progress is not history: while the store fails it is skipped (the store says so, once),
        # never raised into the step reporting it.
        with contextlib.suppress(StoreUnavailable):
            self.store.set_progress(self.ref, percent, detail, queue)
