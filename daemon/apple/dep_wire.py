"""Apple's DEP "device assignment" API (mdmenrollment.apple.com), sans-IO: token, signing, requests, replies.

Organisations without an Apple Business Manager API account can still observe assignment through the
API MDM servers use: it authenticates with the MDM server's *server token* and only sees devices
assigned to that server, so a serial answered with `response_status: SUCCESS` proves the assignment
and `NOT_ACCESSIBLE` means "not assigned to this server". Everything here is pure (no sockets, no
clock, no randomness) so the client, the fake and the tests share one definition of the wire.

Sources (Apple unless marked):
* "Authenticating with the Automated Device Enrollment program" (developer.apple.com/documentation/
  devicemanagement, formerly "Authenticating with a Device Enrollment Program (DEP) Server"): the
  token's four items; every request carries `X-ADM-Auth-Session`; a missing, invalid or expired
  session is answered 401; a new session comes from GET https://mdmenrollment.apple.com/session,
  which is protected by OAuth 1.0a.
* "Interpreting Automated Device Enrollment error codes": 400 (bad OAuth parameters / signature
  method), 401 (invalid consumer key, invalid or expired token, invalid signature, reused nonce),
  403 with body `ACCESS_DENIED` or `T_C_NOT_SIGNED`.
* "Get Device Details" (POST /devices, `DeviceListRequest` / `DeviceListResponse`), 400 errors
  `DEVICE_ID_REQUIRED`, `USER_AGENT_MISSING`, `USER_AGENT_INVALID`.
* RFC 5849 (OAuth 1.0) §3.4 for the HMAC-SHA1 signature.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from daemon.apple.base import AppleServiceError

DEFAULT_BASE_URL = "https://mdmenrollment.apple.com"
TOKEN_CONFIG_KEY = "apple.dep_token_file"  # noqa: S105 (a config key name, not a secret)
SESSION_PATH = "/session"
DEVICES_PATH = "/devices"
SESSION_HEADER = "X-ADM-Auth-Session"
PROTOCOL_HEADER = "X-Server-Protocol-Version"
SERVER_PROTOCOL_VERSION = "3"
"""[3RD-PARTY] The version micromdm/nanodep (client/transport.go) and zentral (dep_client.py) send;
Get Device Details' fields are all present at this version."""
CONTENT_TYPE = "application/json;charset=UTF8"
"""[3RD-PARTY] The media type nanodep (godep/client.go) and zentral send, spelled as they spell it."""
OAUTH_REALM = "ADM"
"""The realm of Apple's documented /session Authorization example (also nanodep, zentral)."""
MAX_DEVICES_PER_REQUEST = 1000
"""[INFERRED] Apple documents no maximum for DeviceListRequest; 1000 is the documented maximum of the
sibling fetch/sync `limit`, so larger lists are split into requests of at most this many serials."""

SUCCESS = "SUCCESS"
NOT_ACCESSIBLE = "NOT_ACCESSIBLE"


class DepError(AppleServiceError):
    code = "dep"


class DepAuthError(DepError):
    """The server token is unusable (bad credentials, expired, terms not accepted): an operator must act."""

    code = "dep_auth"
    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(f"{message} (check the server token configured as {TOKEN_CONFIG_KEY})")


class DepSessionExpired(DepError):
    """Internal: the auth session token was refused; the client re-authenticates once and retries."""

    code = "dep_session_expired"


class DepRateLimited(DepError):
    """429, or 503 with Retry-After [INFERRED for DEP]: the shared poller waits `retry_after` seconds."""

    code = "dep_rate_limited"

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DepUnavailable(DepError):
    code = "dep_unavailable"


class DepUnexpectedReply(DepError):
    """A reply this module cannot read (HTML error page, wrong JSON shape): never a KeyError upstream."""

    code = "dep_unexpected_reply"


class DepRequestRejected(DepError):
    """A documented 400 (DEVICE_ID_REQUIRED, MALFORMED_REQUEST_BODY, USER_AGENT_*): our bug, not transient."""

    code = "dep_request_rejected"
    retryable = False


# --- server token -------------------------------------------------------------------------------

_TOKEN_FIELDS = ("consumer_key", "consumer_secret", "access_token", "access_secret")


@dataclass(frozen=True, slots=True)
class DepServerToken:
    """The four OAuth items of a decrypted server token, plus its expiry.

    Apple delivers the token as an S/MIME `.p7m` encrypted to the MDM server's certificate; the file
    benchhub reads is the decrypted content. `repr` shows no secret, so a token in a log line or a
    traceback leaks nothing.
    """

    consumer_key: str
    consumer_secret: str = field(repr=False)
    access_token: str = field(repr=False)
    access_secret: str = field(repr=False)
    access_token_expiry: datetime | None = None

    def __repr__(self) -> str:
        expiry = self.access_token_expiry.isoformat() if self.access_token_expiry else None
        return f"DepServerToken(consumer_key={self.consumer_key[:6]}…, access_token_expiry={expiry})"

    def expired(self, now: float) -> bool:
        return self.access_token_expiry is not None and self.access_token_expiry.timestamp() <= now

    def as_json(self) -> str:
        """The JSON form of the decrypted token (what the fake bench writes to a token file)."""
        payload: dict[str, str] = {name: getattr(self, name) for name in _TOKEN_FIELDS}
        if self.access_token_expiry is not None:
            payload["access_token_expiry"] = self.access_token_expiry.strftime("%Y-%m-%dT%H:%M:%SZ")
        return json.dumps(payload)


_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


def parse_server_token(text: str, *, source: str = "<token>") -> DepServerToken:
    """Reads either the bare JSON or the decrypted S/MIME text around it.

    [3RD-PARTY] The decrypted `.p7m` is a MIME part (Content-Type headers, a blank line) whose body is
    the JSON between `-----BEGIN MESSAGE-----` and `-----END MESSAGE-----` (nanodep's tokenpki, and
    other open-source decoders, strip exactly that). Taking the outermost `{...}` accepts both forms.
    """
    match = _JSON_OBJECT.search(text)
    payload: Any = None
    if match is not None:
        try:
            payload = json.loads(match.group(0))
        except ValueError:
            payload = None
    if not isinstance(payload, dict) or not all(isinstance(payload.get(k), str) for k in _TOKEN_FIELDS):
        raise DepAuthError(
            f"{source}: not a DEP server token (expected the decrypted token JSON with "
            "consumer_key, consumer_secret, access_token, access_secret, or the S/MIME text holding it)"
        )
    return DepServerToken(
        consumer_key=payload["consumer_key"],
        consumer_secret=payload["consumer_secret"],
        access_token=payload["access_token"],
        access_secret=payload["access_secret"],
        access_token_expiry=_parse_time(payload.get("access_token_expiry")),
    )


def load_server_token(path: Path) -> DepServerToken:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DepAuthError(f"{path}: cannot read the DEP server token ({exc.strerror})") from exc
    return parse_server_token(text, source=str(path))


def _parse_time(value: object) -> datetime | None:
    """Apple's ISO 8601 timestamps (`2017-09-08T19:17:40Z`); None for anything else."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# --- OAuth 1.0a HMAC-SHA1 (RFC 5849 §3.4) ---------------------------------------------------------


def percent_encode(value: str) -> str:
    """RFC 5849 §3.6: UTF-8, then every byte outside the unreserved set as upper-case %XX."""
    return quote(value.encode("utf-8"), safe="-._~")


def base_string_uri(url: str) -> str:
    """RFC 5849 §3.4.1.2: lower-case scheme and host, default port dropped, no query or fragment."""
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    port = parts.port
    default = (scheme == "http" and port == 80) or (scheme == "https" and port == 443)
    netloc = host if port is None or default else f"{host}:{port}"
    return f"{scheme}://{netloc}{parts.path or '/'}"


def signature_base_string(method: str, url: str, params: Iterable[tuple[str, str]]) -> str:
    """RFC 5849 §3.4.1: method, base URI and the normalised parameters (the URL's query included).

    `params` are decoded pairs: the oauth_* protocol parameters (without realm and oauth_signature)
    and any form-encoded body parameters.
    """
    pairs = [*parse_qsl(urlsplit(url).query, keep_blank_values=True), *params]
    encoded = sorted((percent_encode(k), percent_encode(v)) for k, v in pairs)
    normalized = "&".join(f"{k}={v}" for k, v in encoded)
    return "&".join(percent_encode(part) for part in (method.upper(), base_string_uri(url), normalized))


def hmac_sha1_signature(base_string: str, consumer_secret: str, token_secret: str) -> str:
    """RFC 5849 §3.4.2: key is both encoded secrets joined by '&'; the digest is base64-encoded."""
    key = f"{percent_encode(consumer_secret)}&{percent_encode(token_secret)}"
    digest = hmac.new(key.encode(), base_string.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def oauth_params(token: DepServerToken, *, timestamp: int, nonce: str) -> list[tuple[str, str]]:
    """The protocol parameters in the order of Apple's /session example (order is not signed)."""
    return [
        ("oauth_consumer_key", token.consumer_key),
        ("oauth_token", token.access_token),
        ("oauth_signature_method", "HMAC-SHA1"),
        ("oauth_timestamp", str(timestamp)),
        ("oauth_nonce", nonce),
        ("oauth_version", "1.0"),
    ]


def session_authorization(token: DepServerToken, *, url: str, timestamp: int, nonce: str) -> str:
    """The `Authorization: OAuth realm="ADM", ...` value for GET /session."""
    params = oauth_params(token, timestamp=timestamp, nonce=nonce)
    base = signature_base_string("GET", url, params)
    signature = hmac_sha1_signature(base, token.consumer_secret, token.access_secret)
    fields = [("realm", OAUTH_REALM), *params, ("oauth_signature", signature)]
    return "OAuth " + ", ".join(f'{k}="{percent_encode(v)}"' for k, v in fields)


_AUTH_PARAM = re.compile(r'\s*([A-Za-z0-9_]+)="([^"]*)"\s*(?:,|$)')


def parse_authorization(header: str) -> list[tuple[str, str]] | None:
    """The decoded parameters of an `OAuth` Authorization header, in order; None when malformed.

    A list, not a dict, so a server can see duplicated protocol parameters (a documented 400).
    """
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "oauth" or not rest.strip():
        return None
    params: list[tuple[str, str]] = []
    pos = 0
    while pos < len(rest):
        match = _AUTH_PARAM.match(rest, pos)
        if match is None or match.end() == pos:
            return None
        params.append((match.group(1), unquote(match.group(2))))
        pos = match.end()
    return params


# --- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DepRequest:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes = b""


def common_headers(user_agent: str) -> dict[str, str]:
    """Headers every DEP request carries; Get Device Details documents a 400 for a missing User-Agent."""
    return {PROTOCOL_HEADER: SERVER_PROTOCOL_VERSION, "User-Agent": user_agent, "Accept": CONTENT_TYPE}


def build_session_request(
    token: DepServerToken, *, base_url: str, user_agent: str, timestamp: int, nonce: str
) -> DepRequest:
    url = base_url.rstrip("/") + SESSION_PATH
    headers = common_headers(user_agent)
    headers["Authorization"] = session_authorization(token, url=url, timestamp=timestamp, nonce=nonce)
    return DepRequest("GET", url, headers)


def build_devices_request(
    serials: Sequence[str], *, base_url: str, user_agent: str, session_token: str
) -> DepRequest:
    """Get Device Details: POST /devices with a `DeviceListRequest` `{"devices": [...]}`."""
    headers = common_headers(user_agent)
    headers[SESSION_HEADER] = session_token
    headers["Content-Type"] = CONTENT_TYPE
    body = json.dumps({"devices": list(serials)}).encode()
    return DepRequest("POST", base_url.rstrip("/") + DEVICES_PATH, headers, body)


def batches(serials: Sequence[str], size: int = MAX_DEVICES_PER_REQUEST) -> list[list[str]]:
    """Distinct serials (first occurrence kept) in request-sized batches."""
    unique = list(dict.fromkeys(serials))
    return [unique[i : i + size] for i in range(0, len(unique), size)]


# --- replies ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DepDeviceRecord:
    """One `SUCCESS` entry of DeviceListResponse.devices: the device is assigned to this MDM server."""

    serial_number: str
    model: str | None = None
    description: str | None = None
    color: str | None = None
    os: str | None = None
    device_family: str | None = None
    profile_status: str | None = None
    """"empty", "assigned", "pushed" or "removed"."""
    profile_uuid: str | None = None
    profile_assign_time: str | None = None
    device_assigned_by: str | None = None
    device_assigned_date: datetime | None = None

    @classmethod
    def from_wire(cls, serial: str, entry: Mapping[str, Any]) -> DepDeviceRecord:
        def text(name: str) -> str | None:
            value = entry.get(name)
            return value if isinstance(value, str) else None

        return cls(
            serial_number=text("serial_number") or serial,
            model=text("model"),
            description=text("description"),
            color=text("color"),
            os=text("os"),
            device_family=text("device_family"),
            profile_status=text("profile_status"),
            profile_uuid=text("profile_uuid"),
            profile_assign_time=text("profile_assign_time"),
            device_assigned_by=text("device_assigned_by"),
            device_assigned_date=_parse_time(entry.get("device_assigned_date")),
        )

    def to_wire(self) -> dict[str, str]:
        """The entry as Apple sends it (used by the fake)."""
        out = {
            name: value
            for name in (
                "serial_number",
                "model",
                "description",
                "color",
                "os",
                "device_family",
                "profile_status",
                "profile_uuid",
                "profile_assign_time",
                "device_assigned_by",
            )
            if isinstance(value := getattr(self, name), str)
        }
        if self.device_assigned_date is not None:
            out["device_assigned_date"] = self.device_assigned_date.strftime("%Y-%m-%dT%H:%M:%SZ")
        out["response_status"] = SUCCESS
        return out


def retry_after_seconds(value: str | None, *, now: float) -> float | None:
    """Retry-After as delta-seconds or an HTTP-date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def _body_text(body: bytes) -> str:
    """DEP error bodies are bare words (`T_C_NOT_SIGNED`); some servers quote them as JSON strings."""
    return body.decode("utf-8", errors="replace").strip().strip('"')[:200]


def error_for(status: int, headers: Mapping[str, str], body: bytes, *, now: float, session: bool) -> DepError:
    """The typed error for a non-200 reply. `headers` keys are lower-case.

    On GET /session every 401/403 is about the server token itself (DepAuthError). On other
    requests a 401 means the session is missing or expired (Apple); a 403 whose body is the bare
    `FORBIDDEN` is treated the same way [3RD-PARTY: nanodep saw it from Apple's depsim after a
    restart], while `ACCESS_DENIED` / `T_C_NOT_SIGNED` need an operator.
    """
    auth = _auth_error(status, _body_text(body), session=session)
    if auth is not None:
        return auth
    retry_after = retry_after_seconds(headers.get("retry-after"), now=now)
    if status == 429 or (status == 503 and retry_after is not None):
        return DepRateLimited(f"DEP API busy: HTTP {status}", retry_after)
    if status >= 500:
        return DepUnavailable(f"DEP API unavailable: HTTP {status}")
    if status == 400:
        return DepRequestRejected(f"DEP API rejected the request: {_body_text(body)}")
    return DepUnexpectedReply(f"DEP API answered HTTP {status}")


def _auth_error(status: int, text: str, *, session: bool) -> DepError | None:
    if status not in (401, 403):
        return None
    if session:
        return DepAuthError(f"Apple refused the DEP session request: HTTP {status} {text}".strip())
    if status == 401 or text == "FORBIDDEN":
        return DepSessionExpired(f"DEP session refused: HTTP {status}")
    return DepAuthError(f"Apple refused the DEP request: HTTP 403 {text}")


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        raise DepUnexpectedReply(f"{what}: not a JSON object")
    return payload


def parse_session_response(body: bytes) -> str:
    """The `auth_session_token` of a 200 reply to GET /session."""
    token = _json_object(body, "DEP session reply").get("auth_session_token")
    if not isinstance(token, str) or not token:
        raise DepUnexpectedReply("DEP session reply: no auth_session_token")
    return token


def parse_devices_response(body: bytes, requested: Sequence[str]) -> dict[str, DepDeviceRecord | None]:
    """DeviceListResponse → a record (SUCCESS) or None (NOT_ACCESSIBLE) for every requested serial.

    A requested serial missing from the reply, or an unknown response_status, is an unexpected
    reply: guessing "not assigned" would hide a real assignment.
    """
    devices = _json_object(body, "DEP device details reply").get("devices")
    if not isinstance(devices, dict):
        raise DepUnexpectedReply("DEP device details reply: no devices dictionary")
    return {serial: _device_entry(serial, devices.get(serial)) for serial in requested}


def _device_entry(serial: str, entry: object) -> DepDeviceRecord | None:
    if not isinstance(entry, dict):
        raise DepUnexpectedReply(f"DEP device details reply: no entry for {serial}")
    status = entry.get("response_status")
    if status == NOT_ACCESSIBLE:
        return None
    if status == SUCCESS:
        return DepDeviceRecord.from_wire(serial, entry)
    raise DepUnexpectedReply(f"DEP device details reply: {serial} has response_status {status!r}")
