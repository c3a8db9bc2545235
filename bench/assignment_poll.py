"""How many requests one polling round costs, by number of waiting serials: the tracker's choice
against always asking one by one and always listing the target server.

Runs the production Apple Business API client and `OrgTracker` over real HTTP (loopback) against
the fake Apple services, with `--on-server` devices already assigned to the target (the listing's
size, 1,000 per page). Prints requests per round and the round's wall time.

    .venv/bin/python bench/assignment_poll.py [--on-server 2500] [--waiting 1 2 3 5 10 50 200]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from daemon.apple.abm_client import AbmClient
from daemon.apple.tracker import OrgTracker
from daemon.logs import configure_logging
from daemon.sim.apple import FakeAppleBusiness
from daemon.sim.http import HttpServer

MDM = "Example MDM"


async def round_cost(on_server: int, waiting: int, strategy: str) -> tuple[int, float]:
    fake = FakeAppleBusiness()
    target = fake.add_mdm_server(MDM)
    for i in range(on_server):
        fake.add_device(f"OLD{i:09d}")
        fake.portal_assign(f"OLD{i:09d}", target)
    serials = [f"NEW{i:09d}" for i in range(waiting)]
    for serial in serials:
        fake.add_device(serial)
    async with HttpServer(fake.handle) as server:
        abm = AbmClient(
            fake.new_api_account(), api_url=server.url, token_url=f"{server.url}/auth/oauth2/token"
        )
        tracker = OrgTracker(abm=abm, dep=None, target=MDM, auto_assign=False, interval=60)
        waits = [asyncio.create_task(tracker.wait_assigned(s)) for s in serials]
        await asyncio.sleep(0)
        if strategy == "one-by-one":
            tracker._listing_pages = 10**9
        await tracker.poll_once()  # warm-up: token, server id, and the listing's page count
        if strategy == "listing":
            tracker._listing_pages = 0
        if strategy == "one-by-one":
            tracker._listing_pages = 10**9
        before = abm.requests
        started = time.perf_counter()
        await tracker.poll_once()
        took = time.perf_counter() - started
        cost = abm.requests - before
        for wait in waits:
            wait.cancel()
        await abm.close()
    return cost, took


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--on-server", type=int, default=2500, help="devices already on the target")
    parser.add_argument("--waiting", type=int, nargs="+", default=[1, 2, 3, 4, 5, 10, 50, 200])
    args = parser.parse_args()
    configure_logging("warning", "console")
    pages = -(-args.on_server // 1000)
    print(f"target server holds {args.on_server} devices: a listing costs {pages} request(s)")
    print(f"{'waiting':>8} {'one-by-one':>11} {'listing':>8} {'tracker':>8} {'tracker ms':>11}")
    for waiting in args.waiting:
        each, _ = await round_cost(args.on_server, waiting, "one-by-one")
        listing, _ = await round_cost(args.on_server, waiting, "listing")
        chosen, took = await round_cost(args.on_server, waiting, "tracker")
        print(f"{waiting:>8} {each:>11} {listing:>8} {chosen:>8} {took * 1000:>11.1f}")


if __name__ == "__main__":
    asyncio.run(main())
