"""The Apple School Manager / Apple Business API over HTTP: tokens, connection reuse, no protocol.

Protocol knowledge lives in `abm_wire`; this module mints and caches the bearer token and moves
bytes. Policy, from research apple-api.md:

* One token for the whole daemon, re-minted 60 s before `expires_in` and once on a 401 (§1.1).
  Minting per request gets HTTP 400 from Apple (§1.4 [3RD-PARTY]), so concurrent callers share one
  in-flight mint.
* No retry loop for 429: `AbmRateLimited(retry_after)` goes to the caller, a shared poller that backs
  off all its waiters at once (Apple gives no numeric limit, §2.12).
* A POST is never retried on 5xx or a network error: it is not idempotent (§2.8 [INFERRED]). A 401 is
  retried once, since Apple refused it before processing anything.
* Nothing secret is logged: not the assertion, the token, the key, nor the Authorization header.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Final, Self

import httpx
import structlog

from daemon import __version__
from daemon.apple import abm_wire as wire
from daemon.apple.assertion import DEFAULT_ASSERTION_LIFETIME, AbmCredentials, make_client_assertion
from daemon.apple.base import Pacer

log = structlog.get_logger(__name__)

BUSINESS_API_URL: Final = "https://api-business.apple.com"
SCHOOL_API_URL: Final = "https://api-school.apple.com"
TOKEN_URL: Final = "https://account.apple.com/auth/oauth2/token"  # noqa: S105 (a URL, not a secret)
TOKEN_REFRESH_MARGIN: Final = 60.0
"""Seconds before `expires_in` at which a cached token counts as stale (clock skew, slow requests)."""


class AbmClient:
    """One API account's client. Use as `async with AbmClient(creds) as abm:` or call `close()`.

    `transport`, `api_url` and `token_url` point it at a fake; `clock` (UNIX seconds) drives token
    expiry and assertion times. `requests` counts every HTTP request sent, `token_mints` the token
    requests among them.
    """

    def __init__(
        self,
        creds: AbmCredentials,
        *,
        api_url: str | None = None,
        token_url: str = TOKEN_URL,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
        assertion_lifetime: float = DEFAULT_ASSERTION_LIFETIME,
        pace: Pacer | None = None,
    ) -> None:
        """`pace`: awaited before every request (token requests too), so all of a station's calls to
        Apple share one rate (`daemon.workflow.scheduler.RateLimiter`)."""
        self.creds = creds
        default_api = BUSINESS_API_URL if creds.scope == "business.api" else SCHOOL_API_URL
        self.api_url = (api_url or default_api).rstrip("/")
        self.token_url = token_url
        self._clock = clock
        self._assertion_lifetime = assertion_lifetime
        self._http = httpx.AsyncClient(
            transport=transport,
            timeout=timeout,
            headers={"User-Agent": f"benchhub/{__version__}", "Accept": "application/json"},
            event_hooks={"request": [pace]} if pace is not None else None,
        )
        self._token: str | None = None
        self._token_expires = 0.0
        self._mint_lock = asyncio.Lock()
        self.requests = 0
        self.token_mints = 0

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- the API ---------------------------------------------------------------------------------

    async def org_device(self, serial: str) -> wire.OrgDevice | None:
        """The device, or None while the serial is not in the organisation (404 NOT_FOUND, §2.3)."""
        try:
            reply = await self._call(wire.org_device_request(serial), f"orgDevice {serial}")
        except wire.AbmNotFound:
            return None
        return wire.parse_org_device(reply.content)

    async def assigned_server_id(self, serial: str) -> str | None:
        """The id of the server the serial is assigned to, or None when it is unassigned.

        A serial that is not in the organisation raises `AbmNotFound` (404), so "not there yet" and
        "there but unassigned" stay distinct. A Configurator-added device returns the placeholder
        server's id (§3.1), so compare with the target server id, not with None.
        """
        reply = await self._call(wire.assigned_server_id_request(serial), f"assignedServer of {serial}")
        return wire.parse_assigned_server_id(reply.content)

    async def assigned_server(self, serial: str) -> wire.MdmServer | None:
        """The full server object (name and serverType) the serial is assigned to; 404 as above."""
        reply = await self._call(wire.assigned_server_request(serial), f"assignedServer of {serial}")
        return wire.parse_assigned_server(reply.content)

    async def mdm_servers(self) -> list[wire.MdmServer]:
        """Every device management service of the organisation, all pages."""
        servers: list[wire.MdmServer] = []
        cursor: str | None = None
        while True:
            reply = await self._call(wire.mdm_servers_request(cursor), "mdmServers")
            page, cursor = wire.parse_mdm_servers(reply.content)
            servers += page
            if cursor is None:
                return servers

    async def server_serials(self, server_id: str) -> tuple[set[str], int]:
        """The serials assigned to a server and the number of pages (requests) it took, 1000 a page."""
        serials: set[str] = set()
        cursor: str | None = None
        pages = 0
        while True:
            request = wire.server_devices_request(server_id, cursor)
            reply = await self._call(request, f"devices of server {server_id}")
            pages += 1
            page = wire.parse_linkage_page(reply.content)
            serials.update(page.ids)
            if page.next_cursor is None:
                return serials, pages
            cursor = page.next_cursor

    async def assign_devices(self, serials: Iterable[str], server_id: str) -> wire.Activity:
        """Start an ASSIGN_DEVICES activity (§2.8); poll `activity()` until it is finished."""
        request = wire.assign_devices_request(serials, server_id)
        reply = await self._call(request, f"assign to server {server_id}")
        return wire.parse_activity(reply.content)

    async def activity(self, activity_id: str) -> wire.Activity:
        reply = await self._call(wire.activity_request(activity_id), f"activity {activity_id}")
        return wire.parse_activity(reply.content)

    # --- transport -------------------------------------------------------------------------------

    async def _call(self, request: wire.WireRequest, what: str) -> httpx.Response:
        """Send with the bearer token; on 401 re-mint once and resend once. Raises `AbmError`s."""
        token = await self._access_token()
        reply = await self._send(self.api_url + request.path, request, token)
        retried = reply.status_code == 401
        if retried:
            token = await self._access_token(stale=token)
            reply = await self._send(self.api_url + request.path, request, token)
        try:
            wire.raise_for_api_status(
                reply.status_code, reply.content, reply.headers.get("Retry-After"), what, fresh_token=retried
            )
        except wire.AbmError as e:
            if reply.status_code == 401:
                self._token = None  # refused even fresh: mint anew next time rather than reuse it
            # A 404 is an answer while polling for a serial that is not in the organisation yet.
            level = log.debug if isinstance(e, wire.AbmNotFound) else log.warning
            level(
                "abm_request_failed",
                method=request.method,
                path=request.path,
                status=reply.status_code,
                code=e.apple_code or e.code,
            )
            raise
        return reply

    async def _send(self, url: str, request: wire.WireRequest, token: str | None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        self.requests += 1
        try:
            return await self._http.request(
                request.method,
                url,
                params=dict(request.params),
                json=request.json,
                data=dict(request.form) if request.form is not None else None,
                headers=headers,
            )
        except httpx.HTTPError as e:
            host = httpx.URL(url).host
            log.warning(
                "abm_request_failed", method=request.method, path=request.path, error=type(e).__name__
            )
            raise wire.AbmUnavailable(f"cannot reach {host}: {type(e).__name__}") from None

    async def _access_token(self, stale: str | None = None) -> str:
        """The cached token, or a fresh one. `stale` is a token the API just refused: it is replaced
        unless another caller already replaced it while this one waited for the lock."""
        async with self._mint_lock:
            token = self._token
            fresh = self._clock() < self._token_expires - TOKEN_REFRESH_MARGIN
            if token is not None and token != stale and fresh:
                return token
            return await self._mint()

    async def _mint(self) -> str:
        now = self._clock()
        assertion = make_client_assertion(self.creds, now, self._assertion_lifetime)
        request = wire.token_request(self.creds.client_id, self.creds.scope, assertion)
        self.token_mints += 1
        reply = await self._send(self.token_url, request, None)
        try:
            grant = wire.parse_token_reply(reply.status_code, reply.content, reply.headers.get("Retry-After"))
        except wire.AbmError as e:
            log.warning("abm_token_refused", status=reply.status_code, code=e.code)
            raise
        self._token, self._token_expires = grant.access_token, now + grant.expires_in
        log.info("abm_token_minted", expires_in=grant.expires_in)
        return grant.access_token
