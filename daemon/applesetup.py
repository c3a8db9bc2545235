"""A station's access to Apple Business Manager, built from its config.

On a real bench: the Apple Business API with the account's key (read from a file or a systemd
credential), and/or an MDM server's legacy DEP token; the station's `OrgTracker` asks them about
every waiting serial. On the simulated bench: the same clients and tracker, against fake Apple
services (`daemon.sim.apple`, `daemon.sim.apple_dep`) served over HTTP on loopback, and a simulated
technician who answers the desk's requests with Apple Configurator. Either way the daemon only
learns what Apple's API would tell it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from daemon.apple.abm_client import AbmClient
from daemon.apple.assertion import AbmCredentials
from daemon.apple.base import AppleServiceError, Pacer
from daemon.apple.dep_client import DepClient
from daemon.apple.dep_wire import parse_server_token
from daemon.apple.tracker import OrgTracker
from daemon.config import Config, ConfigError, read_secret
from daemon.sim.configurator import SimConfigurator
from daemon.sim.http import HttpServer
from daemon.sim.world import SimWorld
from daemon.technician import TechnicianDesk


@dataclass
class AppleAccess:
    tracker: OrgTracker | None
    abm: AbmClient | None = None
    dep: DepClient | None = None
    servers: list[HttpServer] = field(default_factory=list)
    """Fake Apple services the simulated bench serves while the station runs."""

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Serve the fakes (if any), run the tracker, and close every connection afterwards."""
        for server in self.servers:
            await server.start()
        poller = asyncio.create_task(self.tracker.run(), name="apple") if self.tracker else None
        try:
            yield
        finally:
            if poller is not None:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
            for client in (self.abm, self.dep):
                if client is not None:
                    await client.close()
            for server in self.servers:
                await server.close()


def _secret(ref: Path, key: str) -> str:
    try:
        return read_secret(ref)
    except ConfigError as exc:
        raise ConfigError([f"{key}: {line}" for line in exc.lines]) from None


def real_apple(config: Config, pace: Pacer | None = None) -> AppleAccess:
    """Clients for the configured Apple accounts; one clear line for a key or token that cannot
    be used, at startup rather than as `invalid_client` an hour later."""
    apple = config.apple
    abm = dep = None
    try:
        if apple.has_api:
            assert apple.private_key_file is not None
            pem = _secret(apple.private_key_file, "apple.private_key_file").encode()
            creds = AbmCredentials(apple.client_id, apple.key_id, pem, key_source=str(apple.private_key_file))
            abm = AbmClient(creds, api_url=apple.resolved_api_url, token_url=apple.token_url, pace=pace)
        if apple.has_dep and abm is None:
            assert apple.dep_token_file is not None
            text = _secret(apple.dep_token_file, "apple.dep_token_file")
            dep = DepClient(
                parse_server_token(text, source=str(apple.dep_token_file)), base_url=apple.dep_url, pace=pace
            )
    except AppleServiceError as exc:
        raise ConfigError([exc.message]) from None
    if abm is None and dep is None:
        return AppleAccess(None)
    return AppleAccess(_tracker(config, abm, dep), abm, dep)


def sim_apple(
    config: Config, world: SimWorld, desk: TechnicianDesk, pace: Pacer | None = None
) -> AppleAccess:
    """The real clients against the simulated organisation, and a technician at the bench."""
    server = HttpServer(world.apple.handle)
    url = server.bind()
    # The account an administrator made once; a restarted bench keeps using it (as a real one would).
    creds = next(iter(world.apple.credentials()), None) or world.apple.new_api_account()
    abm = AbmClient(creds, api_url=url, token_url=f"{url}/auth/oauth2/token", pace=pace)
    assert config.sim is not None
    SimConfigurator(world, desk, delay=config.sim.configurator_delay)
    return AppleAccess(_tracker(config, abm, None), abm, servers=[server])


def _tracker(config: Config, abm: AbmClient | None, dep: DepClient | None) -> OrgTracker:
    return OrgTracker(
        abm=abm,
        dep=dep,
        target=config.assignment_target,
        auto_assign=bool(config.apple.auto_assign),
        interval=config.workflow.assignment_poll_interval,
    )
