"""One poller for every serial that waits on Apple: in the organisation yet? assigned yet?

Ports never poll Apple on their own. Apple's API is rate limited and has no filter by serial, so
a bench of 60 devices polling one by one would spend its request budget on questions one listing
answers. Each waiting port registers its serial here; once per interval the tracker answers every
waiting serial with the fewest requests it knows how:

- **In the organisation?** One `GET /v1/orgDevices/{serial}` per waiting serial. Listing the
  organisation instead is never cheaper: it holds every device the company owns.
- **Assigned to the target MDM server?** Either one `GET …/relationships/assignedServer` per
  waiting serial, or one paginated listing of the target server's devices (1,000 per page),
  whichever costs fewer requests. The listing's cost is known from the last time it ran (its page
  count), so the choice is by count, every interval. A device "assigned" to the pseudo-server
  Apple parks Configurator-added devices on is not assigned: only the target server counts.
- **Legacy DEP API** (organisations without an API account): one `POST /devices` per 1,000
  waiting serials; a serial it can see is assigned to that MDM server, because that is all it sees.
- **Auto-assign**: serials still not on the target are assigned in one `ASSIGN_DEVICES` activity
  per interval, and the activity is polled to completion. Its `201` proves nothing per device, so
  a device counts as assigned only when the next assignment poll sees it on the target; one the
  completed activity did not move is asked for again, up to `ASSIGN_ATTEMPTS` times.

A 429 or an outage pauses the tracker for everyone: `Retry-After` when Apple sends it, else an
exponential backoff. Waiting ports keep waiting; nothing fails because Apple was unreachable, and
the tracker says what it is waiting for (`status()`), for progress lines, MQTT and `benchhub report`.
"""

from __future__ import annotations

import asyncio
import enum
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from daemon.apple.abm_wire import AbmNotFound, AbmRejected, Activity, MdmServer, OrgDevice
from daemon.apple.base import AppleServiceError
from daemon.apple.dep_wire import DepDeviceRecord

log = structlog.get_logger(__name__)

ASSIGN_ATTEMPTS = 3
"""How often one serial is put into an assign activity before the port needs a person."""

PAGE_SIZE = 1000


class AbmApi(Protocol):
    """What the tracker uses of `daemon.apple.abm_client.AbmClient`."""

    async def org_device(self, serial: str) -> OrgDevice | None: ...
    async def assigned_server_id(self, serial: str) -> str | None: ...
    async def mdm_servers(self) -> list[MdmServer]: ...
    async def server_serials(self, server_id: str) -> tuple[set[str], int]: ...
    async def assign_devices(self, serials: Sequence[str], server_id: str) -> Activity: ...
    async def activity(self, activity_id: str) -> Activity: ...


class DepApi(Protocol):
    """What the tracker uses of `daemon.apple.dep_client.DepClient`."""

    async def assigned(self, serials: Sequence[str]) -> dict[str, DepDeviceRecord | None]: ...


class UnknownMdmServerError(AppleServiceError):
    code = "unknown_mdm_server"
    retryable = False


class OrganisationNotVisibleError(AppleServiceError):
    """Only the legacy DEP API is configured: it sees one MDM server's devices, not the organisation."""

    code = "apple_not_configured"
    retryable = False


class AssignmentRefusedError(AppleServiceError):
    code = "assignment_refused"
    retryable = False


class Wait(enum.StrEnum):
    ORGANISATION = "organisation"  # waiting to appear in the organisation (enrollment)
    ASSIGNMENT = "assignment"  # waiting to be assigned to the target MDM server


@dataclass
class _Waiter:
    serial: str
    wait: Wait
    since: float
    """Wall-clock time (epoch seconds) the serial started waiting; shown to people."""
    done: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    refs: int = 1


@dataclass(frozen=True, slots=True)
class Waiting:
    serial: str
    wait: Wait
    since: float


@dataclass(frozen=True, slots=True)
class TrackerStatus:
    waiting: tuple[Waiting, ...]
    last_error: str | None
    paused_until: float | None
    """Monotonic time the tracker resumes after a 429/outage, or None when it is not paused."""


class OrgTracker:
    """Answers "in the organisation?" and "assigned?" for every waiting serial together.

    `target` names the MDM server devices must end up on, as shown in Apple Business Manager (an
    id works too). `auto_assign` makes the tracker assign them itself through the API.
    """

    def __init__(
        self,
        *,
        abm: AbmApi | None,
        dep: DepApi | None,
        target: str,
        auto_assign: bool,
        interval: float,
        clock: Callable[[], float] = time.time,
        max_backoff: float = 900.0,
    ) -> None:
        if abm is None and dep is None:
            raise ValueError("the tracker needs the Apple Business API or the DEP API")
        if auto_assign and abm is None:
            raise ValueError("auto-assign needs the Apple Business API")
        self.abm, self.dep = abm, dep
        self.target = target
        self.auto_assign = auto_assign
        self.interval = interval
        self._clock = clock
        self._waiters: dict[tuple[str, Wait], _Waiter] = {}
        self._wake = asyncio.Event()
        self._max_backoff = max(max_backoff, interval)
        self._failures = 0
        self._paused_until: float | None = None
        self._last_error: str | None = None
        self._target_id: str | None = None
        self._listing_pages = 1
        self._activities: dict[str, list[str]] = {}  # activity id -> serials in it
        self._in_activity: set[str] = set()
        self._assign_attempts: dict[str, int] = {}

    # ------------------------------------------------------------------ what steps call

    async def in_organisation(self, serial: str) -> bool | None:
        """One immediate answer (a step's check); None when no API can see the organisation."""
        if self.abm is None:
            return None
        return await self.abm.org_device(serial) is not None

    async def assigned(self, serial: str) -> bool:
        """One immediate answer: is the serial on the target server?"""
        if self.abm is not None:
            return await self._server_of(serial) == await self._target_server_id()
        assert self.dep is not None
        return (await self.dep.assigned([serial])).get(serial) is not None

    async def wait_in_organisation(self, serial: str) -> None:
        if self.abm is None:
            raise OrganisationNotVisibleError(
                "watching the organisation needs the Apple Business API (apple.client_id)"
            )
        await self._wait(serial, Wait.ORGANISATION)

    async def wait_assigned(self, serial: str) -> str:
        """Until the serial is on the target server; returns a short description for the history."""
        return await self._wait(serial, Wait.ASSIGNMENT)

    def status(self) -> TrackerStatus:
        waiting = tuple(
            Waiting(w.serial, w.wait, w.since)
            for w in sorted(self._waiters.values(), key=lambda w: (w.since, w.serial))
        )
        return TrackerStatus(waiting, self._last_error, self._paused_until)

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Poll while anyone waits; sleep otherwise. Runs for the station's lifetime."""
        while True:
            if not self._waiters:
                self._wake.clear()
                await self._wake.wait()
            started = time.monotonic()
            delay = self.interval
            try:
                await self.poll_once()
            except AppleServiceError as exc:
                delay = self._pause(exc)
            except Exception as exc:  # a bug or garbage must not end the loop ports depend on
                log.exception("apple_poll_failed", error=repr(exc))
                delay = self._pause(AppleServiceError(f"unexpected error: {exc!r}"))
            else:
                self._recovered()
            # New waiters do not wake a running loop: their step has just asked once itself, and
            # batching them into the next round is the point of the tracker.
            await asyncio.sleep(max(0.0, delay - (time.monotonic() - started)))

    async def poll_once(self) -> None:
        """One round of questions for every waiting serial."""
        members = [w.serial for w in self._waiters.values() if w.wait is Wait.ORGANISATION]
        for serial in members:
            if self.abm is not None and await self.abm.org_device(serial) is not None:
                self._resolve(serial, Wait.ORGANISATION, "in the organisation")
        pending = [w.serial for w in self._waiters.values() if w.wait is Wait.ASSIGNMENT]
        if not pending:
            return
        if self.abm is not None:
            await self._poll_abm(pending)
        else:
            await self._poll_dep(pending)

    # ------------------------------------------------------------------ assignment by API

    async def _poll_abm(self, pending: list[str]) -> None:
        assert self.abm is not None
        target_id = await self._target_server_id()
        if self.auto_assign:
            # Activities first: one that completes now has moved its devices, and the assignment
            # poll below must see that before anything is asked for again.
            await self._follow_activities()
        if len(pending) > self._listing_pages:
            on_target, pages = await self.abm.server_serials(target_id)
            self._listing_pages = max(1, pages)
            assigned = [s for s in pending if s in on_target]
        else:
            assigned = [s for s in pending if await self._server_of(s) == target_id]
        for serial in assigned:
            self._assign_attempts.pop(serial, None)
            self._resolve(serial, Wait.ASSIGNMENT, f"assigned to {self.target}")
        if self.auto_assign:
            await self._assign([s for s in pending if s not in assigned])

    async def _assign(self, serials: list[str]) -> None:
        assert self.abm is not None
        todo = [s for s in serials if s not in self._in_activity]
        for serial in [s for s in todo if self._assign_attempts.get(s, 0) >= ASSIGN_ATTEMPTS]:
            todo.remove(serial)
            self._fail(
                serial,
                Wait.ASSIGNMENT,
                AssignmentRefusedError(
                    f"Apple did not assign {serial} to {self.target} after {ASSIGN_ATTEMPTS} requests;"
                    " check the device in Apple Business Manager"
                ),
            )
        if not todo:
            return
        for serial in todo:
            self._assign_attempts[serial] = self._assign_attempts.get(serial, 0) + 1
        try:
            activity = await self.abm.assign_devices(todo, await self._target_server_id())
        except AbmRejected as exc:
            # Apple refused the whole batch (e.g. no serial in it is in the organisation): that is
            # about these devices, not an outage; they are asked for again, up to the limit.
            log.warning("apple_assign_refused", devices=len(todo), error=exc.message)
            return
        log.info("apple_assign_requested", activity=activity.id, devices=len(todo), server=self.target)
        self._activities[activity.id] = todo
        self._in_activity.update(todo)

    async def _follow_activities(self) -> None:
        """Poll in-flight activities; a finished one frees its serials for another request if the
        assignment poll still does not see them on the target."""
        assert self.abm is not None
        for activity_id, serials in list(self._activities.items()):
            activity = await self.abm.activity(activity_id)
            if not activity.finished:
                continue
            log.info(
                "apple_assign_finished", activity=activity_id, status=activity.status, sub=activity.sub_status
            )
            del self._activities[activity_id]
            self._in_activity.difference_update(serials)

    async def _server_of(self, serial: str) -> str | None:
        """The server id a serial is assigned to; None also while it is not in the organisation."""
        assert self.abm is not None
        try:
            return await self.abm.assigned_server_id(serial)
        except AbmNotFound:
            return None

    async def _target_server_id(self) -> str:
        """The target's server id, looked up by name (or id) once and kept."""
        if self._target_id is None:
            assert self.abm is not None
            self._target_id = find_mdm_server(await self.abm.mdm_servers(), self.target).id
        return self._target_id

    # ------------------------------------------------------------------ assignment by DEP

    async def _poll_dep(self, pending: list[str]) -> None:
        assert self.dep is not None
        records = await self.dep.assigned(pending)
        for serial in pending:
            if records.get(serial) is not None:
                self._resolve(serial, Wait.ASSIGNMENT, "assigned to the MDM server of the DEP token")

    # ------------------------------------------------------------------ bookkeeping

    async def _wait(self, serial: str, wait: Wait) -> str:
        key = (serial, wait)
        waiter = self._waiters.get(key)
        if waiter is None:
            waiter = self._waiters[key] = _Waiter(serial, wait, self._clock())
            log.info("apple_wait_started", serial=serial, wait=str(wait), waiting=len(self._waiters))
        else:
            waiter.refs += 1
        self._wake.set()
        try:
            return await asyncio.shield(waiter.done)
        finally:
            waiter.refs -= 1
            if waiter.refs == 0 and self._waiters.get(key) is waiter:
                del self._waiters[key]

    def _resolve(self, serial: str, wait: Wait, how: str) -> None:
        waiter = self._waiters.pop((serial, wait), None)
        if waiter is not None and not waiter.done.done():
            waiter.done.set_result(how)
            log.info("apple_wait_ended", serial=serial, wait=str(wait), how=how)

    def _fail(self, serial: str, wait: Wait, exc: AppleServiceError) -> None:
        waiter = self._waiters.pop((serial, wait), None)
        if waiter is not None and not waiter.done.done():
            waiter.done.set_exception(exc)

    def _pause(self, exc: AppleServiceError) -> float:
        """Back off for everyone. Errors no retry can mend (an unknown server) end the waits."""
        if not exc.retryable and isinstance(exc, UnknownMdmServerError):
            for waiter in [w for w in self._waiters.values() if w.wait is Wait.ASSIGNMENT]:
                self._fail(waiter.serial, waiter.wait, exc)
            return self.interval
        retry_after: float | None = getattr(exc, "retry_after", None)
        delay = max(retry_after, self.interval) if retry_after else self._next_backoff()
        self._paused_until = time.monotonic() + delay
        if self._last_error != exc.message:
            log.warning("apple_unavailable", error=exc.message, code=exc.code, retry_in=round(delay, 1))
        self._last_error = exc.message
        return delay

    def _recovered(self) -> None:
        if self._last_error is not None:
            log.info("apple_available_again")
        self._last_error = None
        self._paused_until = None
        self._failures = 0

    def _next_backoff(self) -> float:
        """interval x 2^n up to `max_backoff`, with ±20 % jitter so stations sharing an API account
        do not retry in step."""
        delay = min(self.interval * 2.0 ** min(self._failures, 16), self._max_backoff)
        self._failures += 1
        return delay * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not cryptography


def find_mdm_server(servers: Sequence[MdmServer], target: str) -> MdmServer:
    """The MDM server named (or with the id) `target`; one line naming the fix otherwise. Apple
    Configurator's placeholder is a server too, but never a target."""
    for server in servers:
        if target in (server.name, server.id):
            if server.server_type != "MDM":
                raise UnknownMdmServerError(f"{target!r} is a {server.server_type} server, not an MDM server")
            return server
    names = ", ".join(repr(s.name) for s in servers if s.server_type == "MDM") or "none"
    raise UnknownMdmServerError(
        f"no MDM server named {target!r} in Apple Business Manager (MDM servers: {names});"
        " fix workflow.mdm_server"
    )
