"""The station's one poller for Apple: request counts, auto-assign, 429s and outages.

Everything runs over real HTTP: the production Apple Business API and DEP clients against the
fake Apple services (`daemon.sim.apple`, `daemon.sim.apple_dep`) on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from daemon.apple.abm_client import AbmClient
from daemon.apple.dep_client import DepClient
from daemon.apple.dep_wire import DepDeviceRecord
from daemon.apple.tracker import AssignmentRefusedError, OrgTracker, UnknownMdmServerError, Wait
from daemon.sim.apple import FakeAppleBusiness
from daemon.sim.apple_dep import FakeDepService
from daemon.sim.http import HttpServer

MDM = "Example MDM"


@dataclass
class Org:
    fake: FakeAppleBusiness
    server: HttpServer
    abm: AbmClient
    target_id: str

    def api_requests(self) -> int:
        """Requests to the API proper (token mints are not rate limited the same way)."""
        return sum(1 for _, target in self.server.requests if target.startswith("/v1/"))

    def tracker(self, **kwargs: object) -> OrgTracker:
        options: dict[str, object] = {"target": MDM, "auto_assign": False, "interval": 0.05}
        options.update(kwargs)
        return OrgTracker(abm=self.abm, dep=None, **options)  # type: ignore[arg-type]


@pytest.fixture
async def org() -> AsyncIterator[Org]:
    fake = FakeAppleBusiness(activity_delay=0.2)
    target = fake.add_mdm_server(MDM)
    fake.add_mdm_server("Other MDM")
    server = HttpServer(fake.handle)
    url = await server.start()
    abm = AbmClient(fake.new_api_account(), api_url=url, token_url=f"{url}/auth/oauth2/token")
    yield Org(fake, server, abm, target)
    await abm.close()
    await server.close()


def serials(n: int, prefix: str = "F2L") -> list[str]:
    return [f"{prefix}{i:09d}" for i in range(n)]


@contextlib.asynccontextmanager
async def polling(tracker: OrgTracker) -> AsyncIterator[None]:
    task = asyncio.create_task(tracker.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_fifty_waiting_serials_cost_one_listing_per_round(org: Org) -> None:
    waiting = serials(50)
    for serial in waiting:
        org.fake.add_device(serial)
    for serial in serials(300, "OLD"):  # devices assigned long ago share the target server
        org.fake.add_device(serial)
        org.fake.portal_assign(serial, org.target_id)
    tracker = org.tracker()
    waits = [asyncio.create_task(tracker.wait_assigned(s)) for s in waiting]
    await asyncio.sleep(0)
    await tracker.poll_once()  # resolves the server name once, then lists its devices
    before = org.api_requests()
    for _ in range(3):
        await tracker.poll_once()
    per_round = (org.api_requests() - before) / 3
    assert per_round == 1  # one page of the target server, not 50 requests
    assert not any(w.done() for w in waits)

    for serial in waiting[:20]:
        org.fake.portal_assign(serial, org.target_id)
    await tracker.poll_once()
    await until(lambda: sum(w.done() for w in waits) >= 20)
    await asyncio.sleep(0.05)
    assert sum(w.done() for w in waits) == 20
    assert {w.result() for w in waits if w.done()} == {f"assigned to {MDM}"}
    for w in waits:
        w.cancel()


async def test_few_waiting_serials_are_asked_one_by_one(org: Org) -> None:
    for serial in serials(2500, "OLD"):  # a listing of the target would take three pages
        org.fake.add_device(serial)
        org.fake.portal_assign(serial, org.target_id)
    waiting = serials(2)
    for serial in waiting:
        org.fake.add_device(serial)
    tracker = org.tracker()
    # Learn the listing's cost once (three waiters > one assumed page).
    probe = [asyncio.create_task(tracker.wait_assigned(s)) for s in [*waiting, "F2LPROBE0001"]]
    await asyncio.sleep(0)
    await tracker.poll_once()
    probe[2].cancel()
    await asyncio.sleep(0)
    before = org.api_requests()
    await tracker.poll_once()
    assert org.api_requests() - before == 2  # two devices: two requests beat three pages
    for task in probe[:2]:
        task.cancel()


async def test_a_device_parked_on_the_configurator_server_is_not_assigned(org: Org) -> None:
    org.fake.add_device("F2LPARKED001")  # status ASSIGNED, to Apple Configurator's placeholder
    tracker = org.tracker()
    assert not await tracker.assigned("F2LPARKED001")
    org.fake.portal_assign("F2LPARKED001", org.fake.server_id("Other MDM"))
    assert not await tracker.assigned("F2LPARKED001")
    org.fake.portal_assign("F2LPARKED001", org.target_id)
    assert await tracker.assigned("F2LPARKED001")


async def test_auto_assign_sends_one_activity_for_a_batch(org: Org) -> None:
    batch = serials(20)
    for serial in batch:
        org.fake.add_device(serial)
    tracker = org.tracker(auto_assign=True)
    async with polling(tracker):
        results = await asyncio.wait_for(
            asyncio.gather(*(tracker.wait_assigned(s) for s in batch)), timeout=10
        )
    assert set(results) == {f"assigned to {MDM}"}
    posts = [t for m, t in org.server.requests if m == "POST" and t.startswith("/v1/orgDeviceActivities")]
    assert len(posts) == 1
    assert all(org.fake.device_server(s) == org.target_id for s in batch)


async def test_auto_assign_gives_up_on_a_device_apple_never_moves(org: Org) -> None:
    org.fake.add_device("F2LGOOD00001")
    tracker = org.tracker(auto_assign=True)
    async with polling(tracker):
        good = asyncio.create_task(tracker.wait_assigned("F2LGOOD00001"))
        # Not in the organisation at all: every activity completes without moving it.
        with pytest.raises(AssignmentRefusedError, match="F2LGHOST0001"):
            await asyncio.wait_for(tracker.wait_assigned("F2LGHOST0001"), timeout=10)
        assert await asyncio.wait_for(good, timeout=10) == f"assigned to {MDM}"


async def test_unknown_target_server_ends_the_waits_with_the_fix(org: Org) -> None:
    org.fake.add_device("F2LWAIT00001")
    tracker = org.tracker(target="No Such MDM")
    async with polling(tracker):
        with pytest.raises(UnknownMdmServerError, match=r"workflow\.mdm_server"):
            await asyncio.wait_for(tracker.wait_assigned("F2LWAIT00001"), timeout=5)


async def test_retry_after_pauses_every_question(org: Org) -> None:
    org.fake.add_device("F2LWAIT00001")
    tracker = org.tracker(interval=0.02)
    await tracker.assigned("F2LWAIT00001")  # token and server id are in hand
    org.fake.fail_next(1, 429, retry_after=1)
    async with polling(tracker):
        wait = asyncio.create_task(tracker.wait_assigned("F2LWAIT00001"))
        await until(lambda: tracker.status().paused_until is not None)
        after_429 = org.api_requests()
        await asyncio.sleep(0.6)  # 30 intervals of 20 ms, all inside Retry-After
        assert org.api_requests() == after_429
        org.fake.portal_assign("F2LWAIT00001", org.target_id)
        assert await asyncio.wait_for(wait, timeout=3) == f"assigned to {MDM}"
    assert tracker.status().paused_until is None


async def test_an_outage_keeps_devices_waiting_and_recovers(org: Org) -> None:
    waiting = serials(5)
    for serial in waiting:
        org.fake.add_device(serial)
    tracker = org.tracker(interval=0.02, max_backoff=0.05)
    org.fake.fail_next(6, 503, html=True)
    async with polling(tracker):
        waits = [asyncio.create_task(tracker.wait_assigned(s)) for s in waiting]
        await until(lambda: tracker.status().last_error is not None)
        assert not any(w.done() for w in waits)
        assert {w.serial for w in tracker.status().waiting} == set(waiting)
        for serial in waiting:
            org.fake.portal_assign(serial, org.target_id)
        done = await asyncio.wait_for(asyncio.gather(*waits), timeout=5)
    assert len(done) == 5
    assert tracker.status().last_error is None


async def test_membership_is_watched_for_enrollment(org: Org) -> None:
    tracker = org.tracker()
    assert await tracker.in_organisation("F2LNEW000001") is False
    async with polling(tracker):
        wait = asyncio.create_task(tracker.wait_in_organisation("F2LNEW000001"))
        await until(lambda: bool(tracker.status().waiting))
        assert tracker.status().waiting[0].wait is Wait.ORGANISATION
        org.fake.add_device("F2LNEW000001")
        await asyncio.wait_for(wait, timeout=3)
    assert await tracker.in_organisation("F2LNEW000001") is True


async def test_a_cancelled_wait_leaves_the_list() -> None:
    fake = FakeAppleBusiness()
    fake.add_mdm_server(MDM)
    async with HttpServer(fake.handle) as server:
        abm = AbmClient(
            fake.new_api_account(), api_url=server.url, token_url=f"{server.url}/auth/oauth2/token"
        )
        tracker = OrgTracker(abm=abm, dep=None, target=MDM, auto_assign=False, interval=0.05)
        wait = asyncio.create_task(tracker.wait_assigned("F2LGONE00001"))
        await asyncio.sleep(0)
        assert len(tracker.status().waiting) == 1
        wait.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await wait
        assert tracker.status().waiting == ()
        await abm.close()


async def test_dep_token_sees_assignment_in_batches() -> None:
    token = FakeDepService.new_token(MDM)
    owned: set[str] = set()
    dep_fake = FakeDepService(
        token, lambda s: DepDeviceRecord(serial_number=s, profile_status="empty") if s in owned else None
    )
    async with HttpServer(dep_fake) as server:
        dep = DepClient(token, base_url=server.url)
        tracker = OrgTracker(abm=None, dep=dep, target="", auto_assign=False, interval=0.02)
        waiting = serials(1500)
        waits = [asyncio.create_task(tracker.wait_assigned(s)) for s in waiting]
        await asyncio.sleep(0)
        await tracker.poll_once()  # nothing assigned yet
        owned.update(waiting)
        before = dep_fake.device_requests
        await tracker.poll_once()
        assert dep_fake.device_requests - before == 2  # one round: 1,000 + 500 serials
        await asyncio.wait_for(asyncio.gather(*waits), timeout=5)
        assert dep_fake.session_requests == 1
        await dep.close()
