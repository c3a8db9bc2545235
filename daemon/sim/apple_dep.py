"""A fake of Apple's DEP device assignment API (GET /session, POST /devices) for `HttpServer`.

It checks what Apple checks, so the real `DepClient` is tested against real refusals: the OAuth 1.0a
HMAC-SHA1 signature is recomputed from the token's secrets, the consumer key and access token must
match, nonces are single-use and timestamps must be near the fake's clock (the documented 401
causes); sessions expire after `session_ttl` seconds of the injectable clock and are then answered
401, as Apple documents for an expired X-ADM-Auth-Session. Error bodies are the bare upper-case words
Apple documents (`T_C_NOT_SIGNED`, `DEVICE_ID_REQUIRED`, ...); where Apple documents no word the
fake uses `UNAUTHORIZED` / `BAD_REQUEST` [INFERRED]. Which serials are assigned to this MDM server
is not the fake's business: `owns(serial)` answers it, so the lead can connect it to the fake
Apple Business Manager organisation.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from daemon.apple.dep_wire import (
    DEVICES_PATH,
    MAX_DEVICES_PER_REQUEST,
    NOT_ACCESSIBLE,
    OAUTH_REALM,
    SESSION_PATH,
    DepDeviceRecord,
    DepServerToken,
    hmac_sha1_signature,
    parse_authorization,
    signature_base_string,
)
from daemon.sim.http import HttpRequest, HttpResponse

log = structlog.get_logger(__name__)

_REQUIRED_OAUTH = (
    "oauth_consumer_key",
    "oauth_token",
    "oauth_signature_method",
    "oauth_signature",
    "oauth_timestamp",
    "oauth_nonce",
)


@dataclass(slots=True)
class _Fault:
    status: int
    retry_after: float | None
    body: bytes | None


def _text(status: int, word: str, headers: list[tuple[str, str]] | None = None) -> HttpResponse:
    return HttpResponse(status, word.encode(), [("Content-Type", "text/plain"), *(headers or [])])


class FakeDepService:
    """Handler for `HttpServer(FakeDepService(...))`; counters and knobs are for tests."""

    def __init__(
        self,
        token: DepServerToken,
        owns: Callable[[str], DepDeviceRecord | None],
        *,
        clock: Callable[[], float] = time.time,
        session_ttl: float = 300.0,
        timestamp_skew: float = 300.0,
        max_devices: int = MAX_DEVICES_PER_REQUEST,
    ) -> None:
        self.token = token
        self.owns = owns
        self.clock = clock
        self.session_ttl = session_ttl
        """[INFERRED] Apple does not document a session lifetime; tests shorten it."""
        self.timestamp_skew = timestamp_skew
        self.max_devices = max_devices
        self.terms_signed = True
        """False makes GET /session answer 403 T_C_NOT_SIGNED (terms not accepted in the portal)."""
        self.sessions: dict[str, float] = {}
        self.session_requests = 0
        self.device_requests = 0
        self._nonces: set[str] = set()
        self._faults: deque[_Fault] = deque()

    @staticmethod
    def new_token(server_name: str, *, valid_days: int = 365) -> DepServerToken:
        """Random credentials shaped like Apple's (CK_/CS_/AT_/AS_ prefixes), expiring in a year."""
        del server_name  # Apple's token carries no server name; the argument documents the intent
        expiry = datetime.now(UTC).replace(microsecond=0) + timedelta(days=valid_days)
        return DepServerToken(
            consumer_key="CK_" + secrets.token_hex(16),
            consumer_secret="CS_" + secrets.token_hex(20),
            access_token="AT_" + secrets.token_hex(24),
            access_secret="AS_" + secrets.token_hex(20),
            access_token_expiry=expiry,
        )

    def fail_next(
        self, n: int = 1, *, status: int = 429, retry_after: float | None = None, body: bytes | None = None
    ) -> None:
        """The next `n` requests (any route) are answered `status`, with Retry-After when given.

        `body` replaces the default empty body: with status 200 it injects garbage replies.
        """
        self._faults.extend(_Fault(status, retry_after, body) for _ in range(n))

    def expire_sessions(self) -> None:
        self.sessions.clear()

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        if self._faults:
            return self._fault(self._faults.popleft())
        if request.method == "GET" and request.path == SESSION_PATH:
            return self._session(request)
        if request.method == "POST" and request.path == DEVICES_PATH:
            return self._devices(request)
        return _text(404, "NOT_FOUND")

    @staticmethod
    def _fault(fault: _Fault) -> HttpResponse:
        headers = [] if fault.retry_after is None else [("Retry-After", str(int(fault.retry_after)))]
        return HttpResponse(fault.status, fault.body or b"", [("Content-Type", "text/plain"), *headers])

    # --- GET /session ---------------------------------------------------------------------------

    def _session(self, request: HttpRequest) -> HttpResponse:
        self.session_requests += 1
        refusal = self._check_oauth(request)
        if refusal is not None:
            log.info("fake_dep_session_refused", status=refusal.status, reason=refusal.body.decode())
            return refusal
        if not self.terms_signed:
            return _text(403, "T_C_NOT_SIGNED")
        session = secrets.token_urlsafe(24)
        self.sessions[session] = self.clock() + self.session_ttl
        return HttpResponse.json(200, {"auth_session_token": session})

    def _check_oauth(self, request: HttpRequest) -> HttpResponse | None:
        """Apple's documented 400/401 causes, in the order a server meets them."""
        params = parse_authorization(request.headers.get("authorization", ""))
        if params is None:
            return _text(400, "BAD_REQUEST")
        names = [name for name, _ in params]
        if len(names) != len(set(names)) or any(n not in dict(params) for n in _REQUIRED_OAUTH):
            return _text(400, "BAD_REQUEST")
        fields = dict(params)
        if fields["oauth_signature_method"] != "HMAC-SHA1" or fields.get("realm", OAUTH_REALM) != OAUTH_REALM:
            return _text(400, "BAD_REQUEST")
        return self._check_credentials(request, params, fields)

    def _check_credentials(
        self, request: HttpRequest, params: list[tuple[str, str]], fields: dict[str, str]
    ) -> HttpResponse | None:
        if fields["oauth_consumer_key"] != self.token.consumer_key:
            return _text(401, "UNAUTHORIZED")
        if fields["oauth_token"] != self.token.access_token or self.token.expired(self.clock()):
            return _text(401, "UNAUTHORIZED")
        if not self._fresh(fields["oauth_timestamp"], fields["oauth_nonce"]):
            return _text(401, "UNAUTHORIZED")
        signed = [(k, v) for k, v in params if k not in ("realm", "oauth_signature")]
        url = f"http://{request.headers.get('host', '')}{request.target}"
        expected = hmac_sha1_signature(
            signature_base_string(request.method, url, signed),
            self.token.consumer_secret,
            self.token.access_secret,
        )
        if not hmac.compare_digest(expected, fields["oauth_signature"]):
            return _text(401, "UNAUTHORIZED")
        return None

    def _fresh(self, timestamp: str, nonce: str) -> bool:
        """A nonce is used once; the timestamp must be within `timestamp_skew` of the clock."""
        if not timestamp.isdigit() or abs(int(timestamp) - self.clock()) > self.timestamp_skew:
            return False
        if nonce in self._nonces:
            return False
        self._nonces.add(nonce)
        return True

    # --- POST /devices ---------------------------------------------------------------------------

    def _devices(self, request: HttpRequest) -> HttpResponse:
        self.device_requests += 1
        if not self._session_valid(request.headers.get("x-adm-auth-session")):
            return _text(401, "UNAUTHORIZED")
        if not request.headers.get("user-agent"):
            return _text(400, "USER_AGENT_MISSING")
        serials = self._serials(request)
        if serials is None:
            return _text(400, "MALFORMED_REQUEST_BODY")
        if not serials:
            return _text(400, "DEVICE_ID_REQUIRED")
        return HttpResponse.json(200, {"devices": {s: self._entry(s) for s in serials}})

    def _session_valid(self, session: str | None) -> bool:
        expiry = self.sessions.get(session or "")
        if expiry is None:
            return False
        if self.clock() >= expiry:
            del self.sessions[session or ""]
            return False
        return True

    def _serials(self, request: HttpRequest) -> list[str] | None:
        """The DeviceListRequest's serials; None for a malformed body or one over the batch limit."""
        try:
            payload: Any = request.json()
        except ValueError:
            return None
        devices = payload.get("devices") if isinstance(payload, dict) else None
        if not isinstance(devices, list) or not all(isinstance(s, str) for s in devices):
            return None
        if len(devices) > self.max_devices:  # [INFERRED] the refusal word for an oversized list
            return None
        return devices

    def _entry(self, serial: str) -> dict[str, str]:
        record = self.owns(serial)
        return record.to_wire() if record is not None else {"response_status": NOT_ACCESSIBLE}
