"""Sans-IO protocol of the Apple School Manager / Apple Business API: requests, replies, errors.

Everything here is pure: builders return `WireRequest`s, parsers take a status, the body bytes and
the `Retry-After` header and return typed models or raise an `AbmError`. The HTTP client
(`abm_client.py`) only moves bytes, so all protocol knowledge is testable without a network.

Facts are from /work/shared/research/apple-api.md (section numbers cited as §n); Apple's documents
are JSON:API (§2.1), errors are `{"errors":[...]}` (§2.11), and the token endpoint answers with
RFC 6749 errors `{"error":"invalid_client"}` (§1.4). Replies are validated shape by shape: a wrong
type or an HTML error page becomes `AbmUnexpectedReply`, never a KeyError deep in the daemon.
"""

from __future__ import annotations

import email.utils
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import quote

from daemon.apple.base import AppleServiceError

CONFIG_CLIENT_ID: Final = "apple.client_id"
CONFIG_KEY_ID: Final = "apple.key_id"
CONFIG_KEY_FILE: Final = "apple.private_key_file"
"""Configuration keys named by credential errors, so the operator knows what to fix."""

ASSERTION_TYPE: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_PATH: Final = "/auth/oauth2/token"  # noqa: S105 (a path, not a secret)
"""Apple's documented token POST path (§1.2); the assertion's `aud` names the v2 path instead."""

MAX_LIMIT: Final = 1000
"""The documented maximum page size (§2.1)."""

APPLE_CONFIGURATOR: Final = "APPLE_CONFIGURATOR"
"""`serverType` of the placeholder server Configurator-added devices are parked on (§3.1)."""

_SNIPPET = 80


# --- errors -------------------------------------------------------------------------------------


class AbmError(AppleServiceError):
    """An Apple API failure; `status` is the HTTP status (0 without one), `apple_code` Apple's code."""

    code = "abm"

    def __init__(self, message: str, *, status: int = 0, apple_code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.apple_code = apple_code


class AbmAuthError(AbmError):
    """Bad credentials or missing permission: retrying cannot help, the configuration must change."""

    code = "abm_auth"
    retryable = False


class AbmTokenExpired(AbmError):
    """A 401 from the API: the bearer token expired or was revoked; the client re-mints once (§1.1)."""

    code = "abm_token_expired"


class AbmRateLimited(AbmError):
    """HTTP 429. `retry_after` is Apple's `Retry-After` in seconds, or None when absent: Apple does
    not document sending it (§2.12), so callers need their own backoff too."""

    code = "abm_rate_limited"

    def __init__(self, message: str, *, retry_after: float | None, apple_code: str | None = None) -> None:
        super().__init__(message, status=429, apple_code=apple_code)
        self.retry_after = retry_after


class AbmUnavailable(AbmError):
    """Network failures and 5xx: Apple is unreachable or unwell; try again later."""

    code = "abm_unavailable"


class AbmUnexpectedReply(AbmError):
    """A reply that is not what the API documents (HTML, wrong JSON types): a bug or an outage."""

    code = "abm_unexpected_reply"


class AbmNotFound(AbmError):
    """HTTP 404: the resource (a serial not in the organisation, an activity older than 30 days)."""

    code = "abm_not_found"
    retryable = False


class AbmRejected(AbmError):
    """400/409/422: Apple refused the request itself (e.g. 409 for an unknown server id, §2.8)."""

    code = "abm_rejected"
    retryable = False


# --- models -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenGrant:
    access_token: str = field(repr=False)
    expires_in: float
    scope: str


@dataclass(frozen=True, slots=True)
class OrgDevice:
    """A device in the organisation. Its id is the serial number (§2.10 [INFERRED], all evidence).

    Attributes may be absent (sparse fieldsets, manually added devices, §2.3), so all but the serial
    are optional. `status` is ASSIGNED or UNASSIGNED; a Configurator-added device reads ASSIGNED while
    parked on the placeholder server (§3.1 [INFERRED]), so status alone proves nothing.
    """

    serial: str
    status: str | None = None
    product_family: str | None = None
    product_type: str | None = None
    device_model: str | None = None
    added_to_org: datetime | None = None
    updated: datetime | None = None
    released_from_org: datetime | None = None
    purchase_source_type: str | None = None

    @property
    def assigned(self) -> bool:
        return self.status == "ASSIGNED"


@dataclass(frozen=True, slots=True)
class MdmServer:
    id: str
    name: str
    server_type: str
    """MDM, APPLE_CONFIGURATOR or APPLE_MDM (§2.6)."""

    @property
    def is_configurator(self) -> bool:
        return self.server_type == APPLE_CONFIGURATOR


@dataclass(frozen=True, slots=True)
class Activity:
    """An orgDeviceActivity (§2.9). A 201 does not mean success: wait for COMPLETED and check
    `sub_status`, since per-device failures only show there and in the CSV log."""

    id: str
    status: str
    sub_status: str | None = None
    created: datetime | None = None
    completed: datetime | None = None
    download_url: str | None = None

    @property
    def finished(self) -> bool:
        return self.status != "IN_PROGRESS"

    @property
    def succeeded(self) -> bool:
        return self.status == "COMPLETED" and self.sub_status == "COMPLETED_WITH_SUCCESS"


@dataclass(frozen=True, slots=True)
class Page:
    """One page of resource ids, and the cursor of the next page (None on the last page)."""

    ids: tuple[str, ...]
    next_cursor: str | None


# --- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WireRequest:
    """What to send: `path` is relative to the API (or token) base URL; `form` is a urlencoded body."""

    method: str
    path: str
    params: Mapping[str, str] = field(default_factory=dict)
    json: Any = None
    form: Mapping[str, str] | None = field(default=None, repr=False)


def _seg(value: str) -> str:
    return quote(value, safe="")


def token_request(client_id: str, scope: str, assertion: str) -> WireRequest:
    """The token POST, with the parameters in a form body as RFC 6749 expects (§1.2: Apple's curl
    uses the query string, public clients use the body; both work)."""
    form = {
        "grant_type": "client_credentials",
        "client_id": client_id,
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": assertion,
        "scope": scope,
    }
    return WireRequest("POST", TOKEN_PATH, form=form)


def org_device_request(serial: str) -> WireRequest:
    return WireRequest("GET", f"/v1/orgDevices/{_seg(serial)}")


def assigned_server_id_request(serial: str) -> WireRequest:
    return WireRequest("GET", f"/v1/orgDevices/{_seg(serial)}/relationships/assignedServer")


def assigned_server_request(serial: str) -> WireRequest:
    return WireRequest("GET", f"/v1/orgDevices/{_seg(serial)}/assignedServer")


def _paged(path: str, cursor: str | None, limit: int) -> WireRequest:
    """Pages are re-requested with `cursor=<meta.paging.nextCursor>` rather than by following
    `links.next`, whose host Apple's own example misspells (`api-business.apple/`, §2.7)."""
    if not 0 < limit <= MAX_LIMIT:
        raise ValueError(f"limit must be within 1..{MAX_LIMIT}")
    params = {"limit": str(limit)}
    if cursor is not None:
        params["cursor"] = cursor
    return WireRequest("GET", path, params=params)


def mdm_servers_request(cursor: str | None = None, limit: int = MAX_LIMIT) -> WireRequest:
    return _paged("/v1/mdmServers", cursor, limit)


def server_devices_request(server_id: str, cursor: str | None = None, limit: int = MAX_LIMIT) -> WireRequest:
    """The linkage endpoint; the "related" `/v1/mdmServers/{id}/devices` is refused with 403 (§2.1)."""
    return _paged(f"/v1/mdmServers/{_seg(server_id)}/relationships/devices", cursor, limit)


def assign_devices_request(
    serials: Iterable[str], server_id: str, activity_type: str = "ASSIGN_DEVICES"
) -> WireRequest:
    """The exact OrgDeviceActivityCreateRequest body of Apple's example (§2.8)."""
    devices = [{"type": "orgDevices", "id": s} for s in serials]
    if not devices:
        raise ValueError("an activity needs at least one serial")
    body = {
        "data": {
            "type": "orgDeviceActivities",
            "attributes": {"activityType": activity_type},
            "relationships": {
                "mdmServer": {"data": {"type": "mdmServers", "id": server_id}},
                "devices": {"data": devices},
            },
        }
    }
    return WireRequest("POST", "/v1/orgDeviceActivities", json=body)


def activity_request(activity_id: str) -> WireRequest:
    return WireRequest("GET", f"/v1/orgDeviceActivities/{_seg(activity_id)}")


# --- generic reply handling ---------------------------------------------------------------------


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """`Retry-After` as seconds from now: delay-seconds or an HTTP-date (RFC 9110 §10.2.3); None
    when absent or unreadable (callers fall back to their own backoff)."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def snippet(body: bytes) -> str:
    """The start of a body for an error message, on one line."""
    text = body[:_SNIPPET].decode("utf-8", "replace")
    return " ".join(text.split()) + ("…" if len(body) > _SNIPPET else "")


def load_json(body: bytes, what: str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise AbmUnexpectedReply(f"{what}: not JSON: {snippet(body)!r}") from None


def first_error(body: bytes) -> tuple[str | None, str | None]:
    """(code, detail) of the first entry of an ErrorResponse, or (None, None) for anything else."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, None
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(errors, list) or not errors or not isinstance(errors[0], dict):
        return None, None
    code, detail = errors[0].get("code"), errors[0].get("detail")
    return (code if isinstance(code, str) else None), (detail if isinstance(detail, str) else None)


def raise_for_api_status(
    status: int, body: bytes, retry_after: str | None, what: str, *, fresh_token: bool = False
) -> None:
    """Raise the `AbmError` an API reply's status means; return for 2xx.

    A 401 is normally an expired token (`AbmTokenExpired`, the client re-mints); with `fresh_token`
    (the token was minted for this very retry) it is a credentials problem: the token endpoint and
    the API disagree, typically a school account talking to the business host or the reverse.
    """
    if 200 <= status < 300:
        return
    code, detail = first_error(body)
    told = f"HTTP {status}, {code}: {detail}" if code else f"HTTP {status}: {snippet(body)!r}"
    kwargs: dict[str, Any] = {"status": status, "apple_code": code}
    if status == 401 and fresh_token:
        raise AbmAuthError(
            f"{what}: a freshly minted token is refused ({told}); check that {CONFIG_CLIENT_ID}"
            " is an account of this API (business vs school)",
            **kwargs,
        )
    if status == 401:
        raise AbmTokenExpired(f"{what}: unauthorized ({told})", **kwargs)
    if status == 403:
        raise AbmAuthError(
            f"{what}: forbidden ({told}); check the API account's permissions and that"
            f" {CONFIG_CLIENT_ID} matches the API host (business vs school)",
            **kwargs,
        )
    if status == 404:
        raise AbmNotFound(f"{what}: not found ({told})", **kwargs)
    if status == 429:
        raise AbmRateLimited(
            f"{what}: rate limited", retry_after=parse_retry_after(retry_after), apple_code=code
        )
    if status >= 500:
        raise AbmUnavailable(f"{what}: Apple answered {told}", **kwargs)
    if status in (400, 409, 422):
        raise AbmRejected(f"{what}: refused ({told})", **kwargs)
    raise AbmUnexpectedReply(f"{what}: unexpected {told}", **kwargs)


# --- shape checks -------------------------------------------------------------------------------


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise AbmUnexpectedReply(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _str(doc: Mapping[str, Any], key: str, where: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise AbmUnexpectedReply(f"{where}.{key}: expected a non-empty string, got {value!r:.40}")
    return value


def _opt_str(doc: Mapping[str, Any], key: str, where: str) -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise AbmUnexpectedReply(f"{where}.{key}: expected a string, got {type(value).__name__}")
    return value


def _opt_time(doc: Mapping[str, Any], key: str, where: str) -> datetime | None:
    """ISO 8601 UTC, with or without milliseconds (§2.1); an empty string counts as absent."""
    text = _opt_str(doc, key, where)
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise AbmUnexpectedReply(f"{where}.{key}: not an ISO 8601 time: {text!r:.40}") from None


def _resource(value: Any, kind: str, where: str) -> tuple[str, dict[str, Any]]:
    """(id, attributes) of a JSON:API resource object of type `kind`."""
    res = _obj(value, where)
    if res.get("type") != kind:
        raise AbmUnexpectedReply(f"{where}.type: expected {kind!r}, got {res.get('type')!r:.40}")
    attrs = res.get("attributes", {})
    return _str(res, "id", where), _obj(attrs if attrs is not None else {}, f"{where}.attributes")


def _document(body: bytes, what: str) -> dict[str, Any]:
    """The top-level JSON:API document, which must have a `data` member."""
    doc = _obj(load_json(body, what), what)
    if "data" not in doc:
        raise AbmUnexpectedReply(f"{what}: no 'data' member")
    return doc


def _data(body: bytes, what: str) -> Any:
    return _document(body, what)["data"]


def _list_data(doc: dict[str, Any], what: str) -> list[Any]:
    data = doc["data"]
    if not isinstance(data, list):
        raise AbmUnexpectedReply(f"{what}.data: expected a list, got {type(data).__name__}")
    return data


def _next_cursor(doc: dict[str, Any], what: str) -> str | None:
    """`meta.paging.nextCursor`; absent (or empty) on the last page (§2.1)."""
    paging = _obj(_obj(doc.get("meta", {}), f"{what}.meta").get("paging", {}), f"{what}.meta.paging")
    return _opt_str(paging, "nextCursor", f"{what}.meta.paging") or None


# --- typed parsers ------------------------------------------------------------------------------


def parse_token_reply(status: int, body: bytes, retry_after: str | None) -> TokenGrant:
    """The token endpoint's reply (§1.1, §1.4): a grant, or an error naming what to check."""
    what = "token request"
    if status == 200:
        doc = _obj(load_json(body, what), what)
        token_type = _str(doc, "token_type", what)
        expires = doc.get("expires_in")
        if (
            token_type.lower() != "bearer"
            or isinstance(expires, bool)
            or not isinstance(expires, int | float)
        ):
            raise AbmUnexpectedReply(f"{what}: token_type {token_type!r:.20}, expires_in {expires!r:.20}")
        if expires <= 0:
            raise AbmUnexpectedReply(f"{what}: expires_in {expires} is not positive")
        return TokenGrant(_str(doc, "access_token", what), float(expires), _opt_str(doc, "scope", what) or "")
    if status == 429:
        raise AbmRateLimited(f"{what}: rate limited", retry_after=parse_retry_after(retry_after))
    if status >= 500:
        raise AbmUnavailable(f"{what}: HTTP {status}: {snippet(body)!r}", status=status)
    oauth_error = _oauth_error(body)
    if oauth_error is None:
        raise AbmUnexpectedReply(f"{what}: HTTP {status}: {snippet(body)!r}", status=status)
    raise AbmAuthError(
        f"{what}: {oauth_error}: {_OAUTH_HINTS.get(oauth_error, _DEFAULT_HINT)}", status=status
    )


_DEFAULT_HINT = f"check {CONFIG_CLIENT_ID}, {CONFIG_KEY_ID} and {CONFIG_KEY_FILE}"
_OAUTH_HINTS: Final = {
    # §1.4: "99% of the time: key_id does NOT match the private key you are using, OR client_id is
    # from a different API client / ABM tenant" [3RD-PARTY].
    "invalid_client": f"Apple refused the credentials; check that {CONFIG_KEY_ID} is the id of the key in"
    f" {CONFIG_KEY_FILE}, and {CONFIG_CLIENT_ID} (same API account)",
    "invalid_grant": "Apple refused the assertion's times; check the station clock (NTP)",
    "invalid_scope": f"the scope does not fit {CONFIG_CLIENT_ID} (BUSINESSAPI. vs SCHOOLAPI.)",
    "unauthorized_client": f"the API account in {CONFIG_CLIENT_ID} may not use this API",
}


def _oauth_error(body: bytes) -> str | None:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    error = doc.get("error") if isinstance(doc, dict) else None
    return error if isinstance(error, str) and error else None


def parse_org_device(body: bytes) -> OrgDevice:
    what = "orgDevice"
    serial, attrs = _resource(_data(body, what), "orgDevices", f"{what}.data")
    where = f"{what}.data.attributes"
    return OrgDevice(
        serial=serial,
        status=_opt_str(attrs, "status", where),
        product_family=_opt_str(attrs, "productFamily", where),
        product_type=_opt_str(attrs, "productType", where),
        device_model=_opt_str(attrs, "deviceModel", where),
        added_to_org=_opt_time(attrs, "addedToOrgDateTime", where),
        updated=_opt_time(attrs, "updatedDateTime", where),
        released_from_org=_opt_time(attrs, "releasedFromOrgDateTime", where),
        purchase_source_type=_opt_str(attrs, "purchaseSourceType", where),
    )


def parse_assigned_server_id(body: bytes) -> str | None:
    """The linkage's server id; None for `"data": null`, JSON:API's empty to-one relationship,
    which is what an UNASSIGNED device most likely returns (§2.4 [INFERRED])."""
    what = "assignedServer linkage"
    data = _data(body, what)
    if data is None:
        return None
    server_id, _ = _resource(data, "mdmServers", f"{what}.data")
    return server_id


def _mdm_server(value: Any, where: str) -> MdmServer:
    server_id, attrs = _resource(value, "mdmServers", where)
    where = f"{where}.attributes"
    return MdmServer(server_id, _str(attrs, "serverName", where), _str(attrs, "serverType", where))


def parse_assigned_server(body: bytes) -> MdmServer | None:
    data = _data(body, "assignedServer")
    return None if data is None else _mdm_server(data, "assignedServer.data")


def parse_mdm_servers(body: bytes) -> tuple[list[MdmServer], str | None]:
    what = "mdmServers"
    doc = _document(body, what)
    servers = [_mdm_server(item, f"{what}.data[{i}]") for i, item in enumerate(_list_data(doc, what))]
    return servers, _next_cursor(doc, what)


def parse_linkage_page(body: bytes, kind: str = "orgDevices") -> Page:
    """A page of `{type, id}` linkages (§2.7)."""
    what = f"{kind} linkages"
    doc = _document(body, what)
    ids = tuple(_resource(item, kind, f"{what}.data[{i}]")[0] for i, item in enumerate(_list_data(doc, what)))
    return Page(ids, _next_cursor(doc, what))


def parse_activity(body: bytes) -> Activity:
    what = "orgDeviceActivity"
    activity_id, attrs = _resource(_data(body, what), "orgDeviceActivities", f"{what}.data")
    where = f"{what}.data.attributes"
    return Activity(
        id=activity_id,
        status=_str(attrs, "status", where),
        sub_status=_opt_str(attrs, "subStatus", where),
        created=_opt_time(attrs, "createdDateTime", where),
        completed=_opt_time(attrs, "completedDateTime", where),
        download_url=_opt_str(attrs, "downloadUrl", where),
    )
