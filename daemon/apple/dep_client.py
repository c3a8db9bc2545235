"""The DEP "device assignment" API client: is a serial assigned to *this* MDM server?

A thin async shell over `dep_wire`: it owns the HTTP connection, the auth session (fetched lazily,
shared by concurrent callers, renewed once when Apple refuses it) and request batching. It never
loops on 429/503: it raises `DepRateLimited` so the one shared poller backs off for everyone.
Secrets (the token's four items, the session token, the Authorization header) are never logged.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Sequence

import httpx
import structlog

from daemon import __version__
from daemon.apple.base import Pacer
from daemon.apple.dep_wire import (
    DEFAULT_BASE_URL,
    MAX_DEVICES_PER_REQUEST,
    SESSION_HEADER,
    DepAuthError,
    DepDeviceRecord,
    DepError,
    DepRequest,
    DepServerToken,
    DepSessionExpired,
    DepUnavailable,
    batches,
    build_devices_request,
    build_session_request,
    error_for,
    parse_devices_response,
    parse_session_response,
)

log = structlog.get_logger(__name__)

USER_AGENT = f"benchhub/{__version__}"


class DepClient:
    """Get Device Details for serials, authenticated with one MDM server's server token.

    `requests` counts every HTTP request sent (session requests included) and `session_requests`
    the GET /session ones: both are product properties the tests assert, since Apple throttles.
    """

    def __init__(
        self,
        token: DepServerToken,
        *,
        base_url: str = DEFAULT_BASE_URL,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
        nonce: Callable[[], str] = lambda: secrets.token_hex(16),
        batch_size: int = MAX_DEVICES_PER_REQUEST,
        timeout: float = 30.0,
        pace: Pacer | None = None,
    ) -> None:
        """`pace`: awaited before every request of a client made here (see `AbmClient`)."""
        self._token = token
        self._base_url = base_url.rstrip("/")
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(
            timeout=timeout, event_hooks={"request": [pace]} if pace is not None else None
        )
        self._clock = clock
        self._nonce = nonce
        self._batch_size = batch_size
        self._session: str | None = None
        self._session_lock = asyncio.Lock()
        self.requests = 0
        self.session_requests = 0

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> DepClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def assigned(self, serials: Sequence[str]) -> dict[str, DepDeviceRecord | None]:
        """Each distinct serial → its record when assigned to this MDM server, None when not."""
        result: dict[str, DepDeviceRecord | None] = {}
        for batch in batches(serials, self._batch_size):
            result.update(await self._device_details(batch))
        return result

    async def session(self) -> str:
        """The current auth session token, fetched on first use and reused afterwards."""
        async with self._session_lock:
            if self._session is None:
                self._session = await self._new_session()
            return self._session

    async def _device_details(self, batch: list[str]) -> dict[str, DepDeviceRecord | None]:
        """One POST /devices; on a refused session, one re-authentication and one retry."""
        session = await self.session()
        try:
            body = await self._post_devices(batch, session)
        except DepSessionExpired:
            log.info("dep_session_refused", action="reauthenticating")
            await self._drop_session(session)
            try:
                body = await self._post_devices(batch, await self.session())
            except DepSessionExpired as exc:
                raise DepAuthError("Apple refused a freshly issued DEP session") from exc
        return parse_devices_response(body, batch)

    async def _post_devices(self, batch: list[str], session: str) -> bytes:
        request = build_devices_request(
            batch, base_url=self._base_url, user_agent=USER_AGENT, session_token=session
        )
        response = await self._send(request, session=False)
        self._adopt_rotated_session(response, session)
        log.debug("dep_device_details", serials=len(batch))
        return response.content

    async def _drop_session(self, refused: str) -> None:
        """Forget `refused` unless a concurrent caller already replaced it."""
        async with self._session_lock:
            if self._session == refused:
                self._session = None

    def _adopt_rotated_session(self, response: httpx.Response, sent: str) -> None:
        """[3RD-PARTY] nanodep: Apple may return a new session token in X-ADM-Auth-Session."""
        rotated = response.headers.get(SESSION_HEADER)
        if rotated and rotated != sent and self._session == sent:
            self._session = rotated

    async def _new_session(self) -> str:
        now = self._clock()
        if self._token.expired(now):
            expiry = self._token.access_token_expiry
            raise DepAuthError(f"the DEP server token expired on {expiry:%Y-%m-%d}; download a new one")
        request = build_session_request(
            self._token,
            base_url=self._base_url,
            user_agent=USER_AGENT,
            timestamp=int(now),
            nonce=self._nonce(),
        )
        self.session_requests += 1
        response = await self._send(request, session=True)
        log.info("dep_session_started")
        return parse_session_response(response.content)

    async def _send(self, request: DepRequest, *, session: bool) -> httpx.Response:
        """Sends one request; any non-200 becomes the typed error `dep_wire.error_for` names."""
        self.requests += 1
        try:
            response = await self._http.request(
                request.method, request.url, headers=request.headers, content=request.body
            )
        except httpx.HTTPError as exc:
            raise DepUnavailable(f"DEP API unreachable: {type(exc).__name__}") from exc
        if response.status_code == 200:
            return response
        error: DepError = error_for(
            response.status_code,
            {k.lower(): v for k, v in response.headers.items()},
            response.content,
            now=self._clock(),
            session=session,
        )
        log.warning("dep_request_failed", path=httpx.URL(request.url).path, status=response.status_code)
        raise error
