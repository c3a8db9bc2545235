"""A faithful fake of Apple's OAuth token endpoint and the Apple School Manager / Business API.

One `HttpServer` handler serves both hosts (`account.apple.com` and `api-business.apple.com`),
routed by path, so the daemon's real `AbmClient` (httpx, real HTTP) is what the tests exercise.
Behaviour follows the checklist in research apple-api.md §6; where Apple documents nothing (the
exact OAuth error for a bad `iat`, the 401/429 error codes, the status of a parked device) the
choice is marked [INFERRED].

Time is the fake's `clock` (UNIX seconds), injectable so tests can expire tokens and complete
activities without sleeping. Side effects that happen "over time" at Apple (activities completing,
an administrator assigning parked devices in the portal) are applied lazily at each request.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from daemon.apple.abm_wire import APPLE_CONFIGURATOR, ASSERTION_TYPE, MAX_LIMIT
from daemon.apple.assertion import AUDIENCE, MAX_ASSERTION_LIFETIME, AbmCredentials, scope_for
from daemon.sim.catalog import MODELS_BY_TYPE
from daemon.sim.http import HttpRequest, HttpResponse, HttpServer

if TYPE_CHECKING:
    from jwt.types import Options

CONFIGURATOR_SERVER_NAME: Final = "Devices Added by Apple Configurator 2"
"""The auto-created placeholder server (§3.1, several [3RD-PARTY] tenant listings)."""

TOKEN_LIFETIME: Final = 3600
IAT_SKEW: Final = 60.0
"""How far in the future an assertion's `iat` may be before it is refused [INFERRED]."""

ACTIVITY_RETENTION: Final = 30 * 86400
"""Activities older than this are gone (404): "in the past 30 days" (§2.9)."""

DEFAULT_LIMIT: Final = 100
TOKEN_PATHS: Final = ("/auth/oauth2/token", "/auth/oauth2/v2/token")
ACTIVITY_TYPES: Final = frozenset(
    {
        "ASSIGN_DEVICES",
        "UNASSIGN_DEVICES",
        "ASSIGN_DEVICES_WITH_MDM_MIGRATION_DEADLINE",
        "UPDATE_MDM_MIGRATION_DEADLINE",
        "CANCEL_MDM_MIGRATION",
        "RELEASE_DEVICES",
    }
)
SIMULATED_ACTIVITIES: Final = frozenset({"ASSIGN_DEVICES", "UNASSIGN_DEVICES"})

_HTML_ERROR: Final = (
    b"<!DOCTYPE html>\n<html><head><title>503 Service Temporarily Unavailable</title></head>"
    b"<body><h1>Service Temporarily Unavailable</h1></body></html>\n"
)


def _iso(ts: float) -> str:
    """Apple's timestamp format: UTC with milliseconds, e.g. 2025-04-30T22:05:14.192Z (§2.1)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def error_body(status: int, code: str, title: str, detail: str) -> dict[str, Any]:
    """An ErrorResponse (§2.11): `status` is a string, every error has an id."""
    return {
        "errors": [
            {"id": str(uuid.uuid4()), "status": str(status), "code": code, "title": title, "detail": detail}
        ]
    }


def _error(status: int, code: str, title: str, detail: str) -> HttpResponse:
    return HttpResponse.json(status, error_body(status, code, title, detail))


def _not_found(kind: str, ident: str) -> HttpResponse:
    """Apple's 404 example, verbatim apart from the kind and id (§2.11)."""
    return _error(
        404,
        "NOT_FOUND",
        "The specified resource doesn't exist",
        f"There is no resource of type '{kind}' with id '{ident}'",
    )


def _bad_parameter(detail: str) -> HttpResponse:
    return _error(400, "PARAMETER_ERROR.INVALID", "A parameter has an invalid value", detail)


def _conflict(detail: str) -> HttpResponse:
    return _error(409, "ENTITY_ERROR.ATTRIBUTE.INVALID", "The request entity is invalid", detail)


@dataclass(slots=True)
class _Account:
    client_id: str
    key_id: str
    public_pem: str
    private_pem: str
    """Kept so a simulated bench can hand the same credentials to a restarted daemon."""


@dataclass(slots=True)
class _Server:
    id: str
    name: str
    server_type: str
    created: float
    updated: float


@dataclass(slots=True)
class _Device:
    serial: str
    product_type: str
    added: float
    updated: float
    server_id: str | None
    purchase_source_type: str
    parked_since: float | None = None
    """When it landed on the Configurator placeholder (for the simulated administrator)."""


@dataclass(slots=True)
class _Activity:
    id: str
    activity_type: str
    server_id: str | None
    serials: list[str]
    failed: list[str]
    created: float
    complete_at: float
    completed: float | None = None


@dataclass(slots=True)
class _Fault:
    remaining: int
    status: int
    retry_after: int | None
    html: bool
    body: bytes | None
    on: str


@dataclass(frozen=True, slots=True)
class _Token:
    expires: float
    scope: str


class _Refused(Exception):
    """A token request refused with an RFC 6749 error; `why` is recorded for tests."""

    def __init__(self, error: str, why: str) -> None:
        super().__init__(why)
        self.error = error
        self.why = why


@dataclass(slots=True)
class FakeAppleBusiness:
    """The fake organisation, its API accounts, and the HTTP handler (`handle`) serving both hosts.

    `scope` makes it an Apple Business ("business.api") or Apple School ("school.api") tenant.
    `activity_delay` is how long (fake seconds) an activity takes; Apple's example took ~11 s (§2.9).
    `admin_assigns_after`/`admin_target` simulate an administrator who assigns, in the web portal,
    every device parked on the Configurator placeholder for that long to the target server id.
    """

    clock: Callable[[], float] = time.time
    scope: str = "business.api"
    activity_delay: float = 10.0
    admin_assigns_after: float | None = None
    admin_target: str | None = None
    counts: Counter[str] = field(default_factory=Counter, init=False)
    """Requests served, by kind ("token", "api") and by route (e.g. "api:GET orgDevices/{id}")."""
    last_token_refusal: str | None = field(default=None, init=False)
    """Why the token endpoint last said no (Apple's body carries no reason; tests want one)."""
    _accounts: dict[str, _Account] = field(default_factory=dict, init=False, repr=False)
    _servers: dict[str, _Server] = field(default_factory=dict, init=False, repr=False)
    _devices: dict[str, _Device] = field(default_factory=dict, init=False, repr=False)
    _activities: dict[str, _Activity] = field(default_factory=dict, init=False, repr=False)
    _tokens: dict[str, _Token] = field(default_factory=dict, init=False, repr=False)
    _faults: list[_Fault] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self._servers:
            self._add_server(CONFIGURATOR_SERVER_NAME, APPLE_CONFIGURATOR)

    # --- state API for the simulation and tests ---------------------------------------------------

    @property
    def configurator_server_id(self) -> str:
        return next(s.id for s in self._servers.values() if s.server_type == APPLE_CONFIGURATOR)

    def new_api_account(self) -> AbmCredentials:
        """An API account with a fresh P-256 key, as an administrator creates one in the portal."""
        key = ec.generate_private_key(ec.SECP256R1())
        private_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        public_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        prefix = "BUSINESSAPI." if self.scope == "business.api" else "SCHOOLAPI."
        account = _Account(
            f"{prefix}{uuid.uuid4()}", str(uuid.uuid4()), public_pem.decode(), private_pem.decode()
        )
        self._accounts[account.key_id] = account
        return self._credentials(account)

    def credentials(self) -> list[AbmCredentials]:
        """The registered accounts' credentials (for a simulated bench restoring its daemon)."""
        return [self._credentials(a) for a in self._accounts.values()]

    @staticmethod
    def _credentials(account: _Account) -> AbmCredentials:
        return AbmCredentials(account.client_id, account.key_id, account.private_pem.encode())

    def add_mdm_server(self, name: str) -> str:
        return self._add_server(name, "MDM")

    def _add_server(self, name: str, server_type: str) -> str:
        server_id = uuid.uuid4().hex.upper()  # 32 uppercase hex digits, like Apple's (§2.1)
        now = self.clock()
        self._servers[server_id] = _Server(server_id, name, server_type, now, now)
        return server_id

    def server_id(self, name: str) -> str:
        return next(s.id for s in self._servers.values() if s.name == name)

    def add_device(
        self, serial: str, *, product_type: str = "iPhone14,7", via_configurator: bool = True
    ) -> None:
        """Add a device to the organisation. Through Apple Configurator it is MANUALLY_ADDED and
        parked on the placeholder server, so its status reads ASSIGNED (§3.1 [INFERRED]); a purchased
        one arrives UNASSIGNED with purchase source APPLE."""
        now = self.clock()
        server = self.configurator_server_id if via_configurator else None
        source = "MANUALLY_ADDED" if via_configurator else "APPLE"
        self._devices[serial] = _Device(
            serial, product_type, now, now, server, source, now if via_configurator else None
        )

    def portal_assign(self, serial: str, server_id: str | None) -> None:
        """What an administrator does in the web portal: immediate, no activity."""
        if server_id is not None and server_id not in self._servers:
            raise KeyError(server_id)
        self._move(self._devices[serial], server_id)

    def has_device(self, serial: str) -> bool:
        """Whether the serial is in the organisation (what `GET /v1/orgDevices/{serial}` tells)."""
        return serial in self._devices

    def mdm_server_of(self, serial: str) -> str | None:
        """The name of the real MDM server the serial is assigned to; None while it is not in the
        organisation, unassigned, or parked on the Configurator placeholder (Apple hands a cloud
        configuration only to devices assigned to a real MDM server)."""
        self._advance()
        device = self._devices.get(serial)
        server = self._servers.get(device.server_id or "") if device is not None else None
        if server is None or server.server_type == APPLE_CONFIGURATOR:
            return None
        return server.name

    def device_server(self, serial: str) -> str | None:
        """The id of the server the serial is assigned to, placeholder included (KeyError: unknown)."""
        self._advance()
        return self._devices[serial].server_id

    def revoke_tokens(self) -> None:
        """Invalidate every access token, so the next API call gets a 401 (as after a key change)."""
        self._tokens.clear()

    def fail_next(
        self,
        n: int = 1,
        status: int = 429,
        *,
        retry_after: int | None = None,
        html: bool = False,
        body: bytes | None = None,
        on: str = "api",
    ) -> None:
        """Answer the next `n` requests (`on`: "api", "token" or "any") with `status`: an
        ErrorResponse, an HTML page (`html`), or exactly `body`; `Retry-After` when given."""
        if n < 1:
            raise ValueError("n must be at least 1")
        self._faults.append(_Fault(n, status, retry_after, html, body, on))

    def snapshot(self) -> dict[str, Any]:
        """The organisation as JSON-able data (accounts, servers, devices, activities, tokens)."""
        return {
            "scope": self.scope,
            "activity_delay": self.activity_delay,
            "admin_assigns_after": self.admin_assigns_after,
            "admin_target": self.admin_target,
            "accounts": [asdict(a) for a in self._accounts.values()],
            "servers": [asdict(s) for s in self._servers.values()],
            "devices": [asdict(d) for d in self._devices.values()],
            "activities": [asdict(a) for a in self._activities.values()],
            "tokens": {t: asdict(v) for t, v in self._tokens.items()},
        }

    def restore(self, data: dict[str, Any]) -> None:
        """Replace the organisation with a `snapshot()`; counters and injected faults are kept."""
        self.scope = data["scope"]
        self.activity_delay = data["activity_delay"]
        self.admin_assigns_after = data["admin_assigns_after"]
        self.admin_target = data["admin_target"]
        self._accounts = {a["key_id"]: _Account(**a) for a in data["accounts"]}
        self._servers = {s["id"]: _Server(**s) for s in data["servers"]}
        self._devices = {d["serial"]: _Device(**d) for d in data["devices"]}
        self._activities = {a["id"]: _Activity(**a) for a in data["activities"]}
        self._tokens = {t: _Token(**v) for t, v in data["tokens"].items()}

    # --- time passing -------------------------------------------------------------------------

    def _move(self, device: _Device, server_id: str | None) -> None:
        device.server_id = server_id
        device.updated = self.clock()
        device.parked_since = None
        if server_id is not None and self._servers[server_id].server_type == APPLE_CONFIGURATOR:
            device.parked_since = device.updated

    def _advance(self) -> None:
        """Apply what happened since the last request: activities finishing, the admin's clicks."""
        now = self.clock()
        for activity in self._activities.values():
            if activity.completed is None and now >= activity.complete_at:
                self._complete(activity, now)
        if self.admin_assigns_after is None or self.admin_target not in self._servers:
            return
        for device in self._devices.values():
            if device.parked_since is not None and now - device.parked_since >= self.admin_assigns_after:
                self._move(device, self.admin_target)

    def _complete(self, activity: _Activity, now: float) -> None:
        """Only now do the devices move: a 201 means submitted, not done (§2.8)."""
        target = activity.server_id if activity.activity_type == "ASSIGN_DEVICES" else None
        for serial in activity.serials:
            if serial in self._devices:
                self._move(self._devices[serial], target)
        activity.completed = now

    def _take_fault(self, kind: str) -> HttpResponse | None:
        """The next injected fault for this kind of request, in the order they were injected."""
        for fault in self._faults:
            if fault.on in (kind, "any"):
                fault.remaining -= 1
                if fault.remaining == 0:
                    self._faults.remove(fault)
                return self._fault_response(fault)
        return None

    @staticmethod
    def _fault_response(fault: _Fault) -> HttpResponse:
        headers = [("Retry-After", str(fault.retry_after))] if fault.retry_after is not None else []
        if fault.body is not None:
            return HttpResponse(fault.status, fault.body, [("Content-Type", "application/json"), *headers])
        if fault.html:
            return HttpResponse(fault.status, _HTML_ERROR, [("Content-Type", "text/html"), *headers])
        # Apple documents no code for 429; RATE_LIMIT_EXCEEDED is App Store Connect's [INFERRED].
        code = "RATE_LIMIT_EXCEEDED" if fault.status == 429 else "UNEXPECTED_ERROR"
        body = error_body(fault.status, code, "Simulated failure", "An injected fault.")
        return HttpResponse.json(fault.status, body, headers)

    # --- HTTP -----------------------------------------------------------------------------------

    async def handle(self, request: HttpRequest) -> HttpResponse:
        """The `HttpServer` handler for both hosts."""
        kind = "token" if request.path in TOKEN_PATHS else "api"
        self.counts[kind] += 1
        fault = self._take_fault(kind)
        if fault is not None:
            return fault
        if kind == "token":
            return self._token_endpoint(request)
        self._advance()
        return self._api(request)

    # --- the token endpoint -------------------------------------------------------------------

    def _token_endpoint(self, request: HttpRequest) -> HttpResponse:
        """§1.1/§6: parameters in the query or a form body; errors are `{"error": ...}` with 400.
        Apple's observed body has no `error_description` (§1.4), so neither does this one."""
        if request.method != "POST":
            return HttpResponse.json(405, {"error": "invalid_request"})
        params = {k: v[-1] for k, v in request.query.items()}
        if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            form = parse_qs(request.body.decode("utf-8", "replace"), keep_blank_values=True)
            params.update({k: v[-1] for k, v in form.items()})
        try:
            scope = self._check_token_request(params)
        except _Refused as refused:
            self.last_token_refusal = refused.why
            return HttpResponse.json(400, {"error": refused.error})
        token = secrets.token_urlsafe(48)
        self._tokens[token] = _Token(self.clock() + TOKEN_LIFETIME, scope)
        reply = {"access_token": token, "token_type": "Bearer", "expires_in": TOKEN_LIFETIME, "scope": scope}
        return HttpResponse.json(200, reply, [("Cache-Control", "no-store")])

    def _check_token_request(self, params: dict[str, str]) -> str:
        if params.get("grant_type") != "client_credentials":
            raise _Refused("unsupported_grant_type", "grant_type is not client_credentials")
        if params.get("client_assertion_type") != ASSERTION_TYPE:
            raise _Refused("invalid_request", "wrong client_assertion_type")
        client_id, assertion = params.get("client_id"), params.get("client_assertion")
        if not client_id or not assertion:
            raise _Refused("invalid_request", "client_id or client_assertion missing")
        claims = self._verify_assertion(assertion, client_id)
        self._check_times(claims)
        scope = params.get("scope", "")
        if scope not in ("business.api", "school.api") or scope != self.scope:
            raise _Refused("invalid_scope", f"scope {scope!r} is not this tenant's")
        if scope_for(client_id) != scope:
            raise _Refused("invalid_scope", "scope does not match the client id prefix")
        return scope

    def _verify_assertion(self, assertion: str, client_id: str) -> dict[str, Any]:
        """Signature, `kid`, `aud`, `sub` and the account (§6). Times are checked against the fake's
        clock separately, so PyJWT's own wall-clock checks are off."""
        try:
            header = jwt.get_unverified_header(assertion)
        except jwt.PyJWTError:
            raise _Refused("invalid_client", "the assertion is not a JWT") from None
        if header.get("alg") != "ES256":
            raise _Refused("invalid_client", f"alg {header.get('alg')!r} is not ES256")
        account = self._accounts.get(str(header.get("kid")))
        if account is None:
            raise _Refused("invalid_client", "unknown kid")
        if account.client_id != client_id:
            raise _Refused("invalid_client", "client_id is not the kid's account")
        options: Options = {
            "verify_exp": False,
            "verify_iat": False,
            "verify_nbf": False,
            "require": ["exp", "iat"],
        }
        try:
            claims: dict[str, Any] = jwt.decode(
                assertion, account.public_pem, algorithms=["ES256"], audience=AUDIENCE, options=options
            )
        except jwt.InvalidAudienceError:
            raise _Refused("invalid_client", "wrong aud") from None
        except jwt.PyJWTError as e:
            raise _Refused("invalid_client", f"assertion refused: {type(e).__name__}") from None
        if claims.get("sub") != client_id:
            raise _Refused("invalid_client", "sub is not the client_id")
        return claims

    def _check_times(self, claims: dict[str, Any]) -> None:
        """`iat <= now (+skew)`, `now < exp`, `exp - iat <= 180 days` (§6). Which OAuth error Apple
        uses for these is unknown; invalid_grant is RFC 7523's choice [INFERRED]."""
        iat, exp, now = claims["iat"], claims["exp"], self.clock()
        if not isinstance(iat, int | float) or not isinstance(exp, int | float):
            raise _Refused("invalid_client", "iat/exp are not numbers")
        if iat > now + IAT_SKEW:
            raise _Refused("invalid_grant", "iat is in the future")
        if now >= exp:
            raise _Refused("invalid_grant", "the assertion has expired")
        if exp - iat > MAX_ASSERTION_LIFETIME:
            raise _Refused("invalid_grant", "exp is more than 180 days after iat")

    # --- the API --------------------------------------------------------------------------------

    def _authorized(self, request: HttpRequest) -> bool:
        auth = request.headers.get("authorization", "")
        token = self._tokens.get(auth.removeprefix("Bearer ")) if auth.startswith("Bearer ") else None
        return token is not None and self.clock() < token.expires

    def _api(self, request: HttpRequest) -> HttpResponse:
        if not self._authorized(request):
            # Apple's 401 code string is undocumented; App Store Connect's is NOT_AUTHORIZED [INFERRED].
            return _error(
                401,
                "NOT_AUTHORIZED",
                "Authentication credentials are missing or invalid.",
                "Provide a properly configured and signed bearer token that has not expired.",
            )
        base = f"http://{request.headers.get('host', 'api-business.apple.com')}"
        parts = tuple(request.path.strip("/").split("/"))
        for (method, shape), (name, handler) in self._routes().items():
            if method == request.method and _matches(shape, parts):
                self.counts[f"api:{method} {name}"] += 1
                arg = next((p for s, p in zip(shape, parts, strict=True) if s == "*"), "")
                return handler(arg, request, base)
        return _error(
            404, "NOT_FOUND", "The specified resource doesn't exist", f"No route for {request.path}"
        )

    def _routes(self) -> dict[tuple[str, tuple[str, ...]], tuple[str, _Route]]:
        """(method, path shape with "*" for the id) -> (route name for `counts`, handler)."""
        return {
            ("GET", ("v1", "orgDevices")): ("orgDevices", self._list_devices),
            ("GET", ("v1", "orgDevices", "*")): ("orgDevices/{id}", self._get_device),
            ("GET", ("v1", "orgDevices", "*", "relationships", "assignedServer")): (
                "orgDevices/{id}/relationships/assignedServer",
                self._assigned_linkage,
            ),
            ("GET", ("v1", "orgDevices", "*", "assignedServer")): (
                "orgDevices/{id}/assignedServer",
                self._assigned_server,
            ),
            ("GET", ("v1", "mdmServers")): ("mdmServers", self._list_servers),
            ("GET", ("v1", "mdmServers", "*", "relationships", "devices")): (
                "mdmServers/{id}/relationships/devices",
                self._server_devices,
            ),
            ("GET", ("v1", "mdmServers", "*", "devices")): ("mdmServers/{id}/devices", _related_refused),
            ("POST", ("v1", "orgDeviceActivities")): ("orgDeviceActivities", self._create_activity),
            ("GET", ("v1", "orgDeviceActivities", "*")): ("orgDeviceActivities/{id}", self._get_activity),
        }

    # --- documents ------------------------------------------------------------------------------

    def _device_doc(self, serial: str, base: str) -> dict[str, Any]:
        """An orgDevices resource with the attributes a Configurator-added iPhone carries (§2.3)."""
        d = self._devices[serial]
        model = MODELS_BY_TYPE.get(d.product_type)
        family = model.device_class if model else d.product_type.rstrip("0123456789,")
        link = f"{base}/v1/orgDevices/{serial}"
        return {
            "type": "orgDevices",
            "id": serial,
            "attributes": {
                "serialNumber": serial,
                "addedToOrgDateTime": _iso(d.added),
                "releasedFromOrgDateTime": None,
                "updatedDateTime": _iso(d.updated),
                "deviceModel": model.name if model else d.product_type,
                "productFamily": family,
                "productType": d.product_type,
                "deviceCapacity": "128GB",
                "color": "BLACK",
                "status": "ASSIGNED" if d.server_id is not None else "UNASSIGNED",
                "imei": [],
                "meid": [],
                "eid": "",
                "purchaseSourceId": "" if d.purchase_source_type == "MANUALLY_ADDED" else "1234567",
                "purchaseSourceType": d.purchase_source_type,
            },
            "relationships": {
                "assignedServer": {
                    "links": {
                        "self": f"{link}/relationships/assignedServer",
                        "related": f"{link}/assignedServer",
                    }
                },
            },
            "links": {"self": link},
        }

    def _server_doc(self, server_id: str, base: str) -> dict[str, Any]:
        s = self._servers[server_id]
        return {
            "type": "mdmServers",
            "id": s.id,
            "attributes": {
                "serverName": s.name,
                "serverType": s.server_type,
                "createdDateTime": _iso(s.created),
                "updatedDateTime": _iso(s.updated),
            },
            "relationships": {
                "devices": {"links": {"self": f"{base}/v1/mdmServers/{s.id}/relationships/devices"}}
            },
        }

    def _activity_doc(self, activity: _Activity, base: str) -> dict[str, Any]:
        attrs: dict[str, Any] = {"createdDateTime": _iso(activity.created)}
        if activity.completed is None:
            halfway = activity.created + (activity.complete_at - activity.created) / 2
            attrs |= {
                "status": "IN_PROGRESS",
                "subStatus": "SUBMITTED" if self.clock() < halfway else "PROCESSING",
            }
        else:
            sub = "COMPLETED_WITH_FAILURE" if activity.failed else "COMPLETED_WITH_SUCCESS"
            attrs |= {
                "status": "COMPLETED",
                "subStatus": sub,
                "completedDateTime": _iso(activity.completed),
                "downloadUrl": f"https://store.blobstore.apple.com/fake/{activity.id}.csv",
            }
        return {
            "type": "orgDeviceActivities",
            "id": activity.id,
            "attributes": attrs,
            "links": {"self": f"{base}/v1/orgDeviceActivities/{activity.id}"},
        }

    # --- handlers -------------------------------------------------------------------------------

    def _get_device(self, serial: str, _request: HttpRequest, base: str) -> HttpResponse:
        if serial not in self._devices:
            return _not_found("orgDevices", serial)
        doc = self._device_doc(serial, base)
        return HttpResponse.json(200, {"data": doc, "links": {"self": doc["links"]["self"]}})

    def _assigned_linkage(self, serial: str, _request: HttpRequest, base: str) -> HttpResponse:
        """`data` is null for an unassigned device, JSON:API's empty to-one (§2.4 [INFERRED])."""
        if serial not in self._devices:
            return _not_found("orgDevices", serial)
        server = self._devices[serial].server_id
        link = f"{base}/v1/orgDevices/{serial}"
        return HttpResponse.json(
            200,
            {
                "data": None if server is None else {"type": "mdmServers", "id": server},
                "links": {
                    "self": f"{link}/relationships/assignedServer",
                    "related": f"{link}/assignedServer",
                },
            },
        )

    def _assigned_server(self, serial: str, _request: HttpRequest, base: str) -> HttpResponse:
        if serial not in self._devices:
            return _not_found("orgDevices", serial)
        server = self._devices[serial].server_id
        data = None if server is None else self._server_doc(server, base)
        return HttpResponse.json(
            200, {"data": data, "links": {"self": f"{base}/v1/orgDevices/{serial}/assignedServer"}}
        )

    def _list_devices(self, _arg: str, request: HttpRequest, base: str) -> HttpResponse:
        return self._list(sorted(self._devices), _query(request), base, "/v1/orgDevices", self._device_doc)

    def _list_servers(self, _arg: str, request: HttpRequest, base: str) -> HttpResponse:
        return self._list(list(self._servers), _query(request), base, "/v1/mdmServers", self._server_doc)

    def _server_devices(self, server_id: str, request: HttpRequest, base: str) -> HttpResponse:
        query = _query(request)
        if server_id not in self._servers:
            return _not_found("mdmServers", server_id)
        serials = sorted(s for s, d in self._devices.items() if d.server_id == server_id)
        path = f"/v1/mdmServers/{server_id}/relationships/devices"
        return self._list(serials, query, base, path, lambda s, _b: {"type": "orgDevices", "id": s})

    def _list(
        self,
        ids: list[str],
        query: dict[str, str],
        base: str,
        path: str,
        render: Callable[[str, str], dict[str, Any]],
    ) -> HttpResponse:
        """A cursor-paginated collection: `limit` ≤ 1000 (default 100), `links.next` and
        `meta.paging.nextCursor` only when there is a next page (§2.1)."""
        try:
            limit = int(query.get("limit", DEFAULT_LIMIT))
            start = _decode_cursor(query["cursor"]) if "cursor" in query else 0
        except ValueError as e:
            return _bad_parameter(str(e))
        if not 1 <= limit <= MAX_LIMIT:
            return _bad_parameter(f"limit must be between 1 and {MAX_LIMIT}")
        page = ids[start : start + limit]
        links = {"self": f"{base}{path}"}
        paging: dict[str, Any] = {"limit": limit}
        if start + limit < len(ids):
            cursor = _encode_cursor(start + limit)
            links["next"] = f"{base}{path}?cursor={cursor}&limit={limit}"
            paging["nextCursor"] = cursor
        body = {"data": [render(i, base) for i in page], "links": links, "meta": {"paging": paging}}
        return HttpResponse.json(200, body)

    def _create_activity(self, _arg: str, request: HttpRequest, base: str) -> HttpResponse:
        try:
            activity_type, server_id, serials = _parse_activity_request(request)
        except ValueError as e:
            return _error(400, "PARAMETER_ERROR.INVALID", "The request body is invalid", str(e))
        if activity_type not in SIMULATED_ACTIVITIES:
            return _error(422, "ENTITY_ERROR", "Not simulated", f"{activity_type} is not simulated")
        if server_id is None or server_id not in self._servers:
            return _conflict(f"An invalid device management service ID: '{server_id}'")
        known = [s for s in serials if s in self._devices]
        if not known:
            return _conflict("An invalid device serial number: none of the devices is in the organisation")
        now = self.clock()
        failed = [s for s in serials if s not in self._devices]
        activity = _Activity(
            str(uuid.uuid4()), activity_type, server_id, known, failed, now, now + self.activity_delay
        )
        self._activities[activity.id] = activity
        body = {
            "data": self._activity_doc(activity, base),
            "links": {"self": f"{base}/v1/orgDeviceActivities"},
        }
        return HttpResponse.json(201, body)

    def _get_activity(self, activity_id: str, _request: HttpRequest, base: str) -> HttpResponse:
        activity = self._activities.get(activity_id)
        if activity is None or self.clock() - activity.created > ACTIVITY_RETENTION:
            return _not_found("orgDeviceActivities", activity_id)
        doc = self._activity_doc(activity, base)
        return HttpResponse.json(200, {"data": doc, "links": {"self": doc["links"]["self"]}})


_Route = Callable[[str, HttpRequest, str], HttpResponse]
"""A route handler: (path id or "", request, base URL for links) -> response."""


def _matches(shape: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    return len(shape) == len(parts) and all(s in ("*", p) for s, p in zip(shape, parts, strict=True))


def _query(request: HttpRequest) -> dict[str, str]:
    return {k: v[-1] for k, v in request.query.items()}


def _related_refused(_arg: str, _request: HttpRequest, _base: str) -> HttpResponse:
    """The "related" devices link is refused; only GET_RELATIONSHIP is allowed (§2.1 [3RD-PARTY])."""
    return _error(
        403,
        "FORBIDDEN_ERROR",
        "This request is forbidden for security reasons",
        "The relationship 'devices' does not allow 'GET_RELATED'. Allowed operation is: GET_RELATIONSHIP",
    )


def _parse_activity_request(request: HttpRequest) -> tuple[str, str | None, list[str]]:
    """(activityType, mdmServer id, serials) of an OrgDeviceActivityCreateRequest (§2.8); ValueError
    names what is malformed."""
    try:
        data = request.json()["data"]
        if data["type"] != "orgDeviceActivities":
            raise ValueError("data.type must be orgDeviceActivities")
        activity_type = data["attributes"]["activityType"]
        relationships = data["relationships"]
        devices = relationships["devices"]["data"]
        server = relationships.get("mdmServer", {}).get("data")
    except (KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed OrgDeviceActivityCreateRequest ({type(e).__name__}: {e})") from None
    if activity_type not in ACTIVITY_TYPES:
        raise ValueError(f"unknown activityType {activity_type!r}")
    if not isinstance(devices, list) or not devices:
        raise ValueError("relationships.devices.data must be a non-empty list")
    if any(
        not isinstance(d, dict) or d.get("type") != "orgDevices" or not isinstance(d.get("id"), str)
        for d in devices
    ):
        raise ValueError("each device must be {type: orgDevices, id: <serial>}")
    server_id: str | None = None
    if server is not None:
        if not isinstance(server, dict) or server.get("type") != "mdmServers":
            raise ValueError("relationships.mdmServer.data must be {type: mdmServers, id}")
        server_id = str(server.get("id"))
    elif activity_type in ("ASSIGN_DEVICES", "UNASSIGN_DEVICES"):
        raise ValueError(f"{activity_type} needs the mdmServer relationship")
    return activity_type, server_id, [d["id"] for d in devices]


def _encode_cursor(offset: int) -> str:
    """Opaque to clients; shaped like Apple's (unpadded base64url of colon-separated fields, §2.1)."""
    return base64.urlsafe_b64encode(f"0:{offset}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, offset = text.split(":")
        if prefix != "0" or int(offset) < 0:
            raise ValueError
        return int(offset)
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise ValueError(f"invalid cursor {cursor[:40]!r}") from None


async def serve_fake_apple(fake: FakeAppleBusiness) -> HttpServer:
    """Start an `HttpServer` for `fake` on a loopback port; the caller closes it."""
    server = HttpServer(fake.handle)
    await server.start()
    return server
