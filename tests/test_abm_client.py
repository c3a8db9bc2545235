"""The Apple Business API client against the fake Apple over real HTTP, and the pure protocol parts."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import jwt
import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.apple import abm_client, abm_wire
from daemon.apple.abm_client import AbmClient
from daemon.apple.abm_wire import (
    AbmAuthError,
    AbmNotFound,
    AbmRateLimited,
    AbmRejected,
    AbmUnavailable,
    AbmUnexpectedReply,
    parse_retry_after,
)
from daemon.apple.assertion import (
    AUDIENCE,
    AbmCredentials,
    AbmKeyError,
    make_client_assertion,
)
from daemon.sim.apple import CONFIGURATOR_SERVER_NAME, FakeAppleBusiness
from daemon.sim.http import HttpRequest, HttpResponse, HttpServer

T0 = 1_800_000_000.0


@dataclass
class Clock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class Org:
    """The fake organisation, its server, and the HTTP requests it saw (headers included)."""

    fake: FakeAppleBusiness
    server: HttpServer
    creds: AbmCredentials
    clock: Clock
    mdm: str
    seen: list[HttpRequest] = field(default_factory=list)

    def client(
        self, creds: AbmCredentials | None = None, clock: Callable[[], float] | None = None
    ) -> AbmClient:
        return AbmClient(
            creds or self.creds,
            api_url=self.server.url,
            token_url=self.server.url + "/auth/oauth2/token",
            clock=clock or self.clock,
        )


@pytest.fixture
async def org() -> AsyncIterator[Org]:
    clock = Clock()
    fake = FakeAppleBusiness(clock=clock, activity_delay=10.0)
    seen: list[HttpRequest] = []

    async def recording(request: HttpRequest) -> HttpResponse:
        seen.append(request)
        return await fake.handle(request)

    async with HttpServer(recording) as server:
        yield Org(fake, server, fake.new_api_account(), clock, fake.add_mdm_server("Intune"), seen)


@pytest.fixture
async def abm(org: Org) -> AsyncIterator[AbmClient]:
    async with org.client() as client:
        yield client


def other_key_pem(curve: ec.EllipticCurve | None = None) -> bytes:
    key = ec.generate_private_key(curve or ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


# --- credentials and the assertion ----------------------------------------------------------------


def test_assertion_has_apples_header_and_claims() -> None:
    creds = FakeAppleBusiness().new_api_account()
    token = make_client_assertion(creds, T0, lifetime=600)
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": creds.key_id, "typ": "JWT"}
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["aud"] == AUDIENCE == "https://account.apple.com/auth/oauth2/v2/token"
    assert (claims["iat"], claims["exp"]) == (int(T0), int(T0) + 600)
    assert claims["sub"] == claims["iss"] == creds.client_id
    assert uuid.UUID(claims["jti"]).version == 4
    with pytest.raises(ValueError, match="lifetime"):
        make_client_assertion(creds, T0, lifetime=180 * 86400 + 1)


def test_credentials_hide_the_key_and_derive_the_scope() -> None:
    creds = FakeAppleBusiness(scope="school.api").new_api_account()
    assert creds.scope == "school.api"
    assert creds.client_id.startswith("SCHOOLAPI.")
    assert "PRIVATE" not in repr(creds)
    assert creds.private_key_pem.decode() not in repr(creds)
    with pytest.raises(AbmAuthError, match="BUSINESSAPI"):
        AbmCredentials("55155430", creds.key_id, creds.private_key_pem)


@pytest.mark.parametrize(
    ("pem", "message"),
    [
        (b"not a key at all", "not a PEM private key"),
        (other_key_pem(ec.SECP384R1()), "secp384r1, ES256 needs P-256"),
        (
            rsa.generate_private_key(65537, 2048).private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            "RSAPrivateKey key",
        ),
        (
            ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"pw"),
            ),
            "password-protected",
        ),
    ],
)
def test_a_bad_key_is_one_clear_line_without_key_material(pem: bytes, message: str) -> None:
    with pytest.raises(AbmKeyError, match=message) as caught:
        AbmCredentials("BUSINESSAPI.x", "kid", pem, key_source="/etc/benchhub/abm.pem")
    text = str(caught.value)
    assert "\n" not in text
    assert "/etc/benchhub/abm.pem" in text
    assert "apple.private_key_file" in text
    assert "MII" not in text  # no base64 key body


def test_sec1_ec_keys_are_accepted_too() -> None:
    sec1 = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert b"BEGIN EC PRIVATE KEY" in sec1
    make_client_assertion(AbmCredentials("BUSINESSAPI.x", "kid", sec1), T0)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=8)
    | st.sampled_from(["orgDevices", "mdmServers"]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                ["data", "type", "id", "attributes", "meta", "paging", "nextCursor", "status", "serverName"]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)
PARSERS = [
    abm_wire.parse_org_device,
    abm_wire.parse_assigned_server_id,
    abm_wire.parse_assigned_server,
    abm_wire.parse_mdm_servers,
    abm_wire.parse_linkage_page,
    abm_wire.parse_activity,
    lambda body: abm_wire.parse_token_reply(200, body, None),
    lambda body: abm_wire.parse_token_reply(400, body, None),
]


@settings(max_examples=150, deadline=None)
@given(doc=JSON, raw=st.binary(max_size=20), parser=st.sampled_from(PARSERS))
def test_parsers_raise_only_unexpected_reply_on_garbage(doc: Any, raw: bytes, parser: Any) -> None:
    for body in (json.dumps(doc).encode(), raw):
        try:
            parser(body)
        except AbmUnexpectedReply:
            pass
        except AbmAuthError:
            assert parser is PARSERS[-1]  # a 400 with {"error": ...} is a credentials answer


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now) == 30.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


# --- the token endpoint ---------------------------------------------------------------------------


async def test_a_good_key_gets_a_token_and_the_token_is_reused(org: Org, abm: AbmClient) -> None:
    for _ in range(3):
        assert await abm.org_device("NOPE") is None
    assert (abm.token_mints, org.fake.counts["token"], org.fake.counts["api"]) == (1, 1, 3)
    token_request = next(r for r in org.seen if r.path == "/auth/oauth2/token")
    assert token_request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert "client_assertion=" in token_request.body.decode()
    assert "assertion" not in token_request.target  # parameters in the body, not the URL
    api_request = org.seen[-1]
    assert api_request.headers["authorization"].startswith("Bearer ")
    assert api_request.headers["user-agent"].startswith("benchhub/")


async def test_the_token_is_reminted_before_it_expires(org: Org, abm: AbmClient) -> None:
    await abm.org_device("NOPE")
    org.clock.now += 3600 - 61
    await abm.org_device("NOPE")
    assert abm.token_mints == 1
    org.clock.now += 2  # within 60 s of expires_in
    await abm.org_device("NOPE")
    assert abm.token_mints == 2
    assert org.fake.counts["api"] == 3  # no request was refused on the way


async def test_a_401_remints_once_and_retries_once(org: Org, abm: AbmClient) -> None:
    org.fake.add_device("SER1")
    await abm.org_device("SER1")
    org.fake.revoke_tokens()
    device = await abm.org_device("SER1")
    assert device is not None
    assert device.serial == "SER1"
    assert (abm.token_mints, abm.requests) == (2, 5)  # mint, get, get(401), mint, get


async def test_a_fresh_token_refused_is_a_credentials_error(org: Org, abm: AbmClient) -> None:
    org.fake.fail_next(2, status=401)
    with pytest.raises(AbmAuthError, match="freshly minted") as caught:
        await abm.mdm_servers()
    assert not caught.value.retryable
    assert (abm.token_mints, org.fake.counts["api"]) == (2, 2)  # one re-mint, one retry, no loop


async def test_concurrent_callers_share_one_mint(org: Org, abm: AbmClient) -> None:
    await asyncio.gather(*(abm.org_device(f"S{i}") for i in range(8)))
    assert abm.token_mints == 1
    assert org.fake.counts["token"] == 1


async def test_the_wrong_key_is_invalid_client_naming_the_key_settings(org: Org) -> None:
    wrong = AbmCredentials(org.creds.client_id, org.creds.key_id, other_key_pem())
    async with org.client(wrong) as client:
        with pytest.raises(AbmAuthError, match="invalid_client") as caught:
            await client.mdm_servers()
    assert not caught.value.retryable
    assert "apple.key_id" in caught.value.message
    assert org.fake.last_token_refusal == "assertion refused: InvalidSignatureError"
    assert org.fake.counts["api"] == 0


@pytest.mark.parametrize(
    ("offset", "lifetime", "refusal"),
    [
        (-700.0, 600.0, "the assertion has expired"),  # the station clock is 700 s slow
        (+120.0, 600.0, "iat is in the future"),  # the station clock is 2 min fast
    ],
)
async def test_assertion_times_are_checked_against_apples_clock(
    org: Org, offset: float, lifetime: float, refusal: str
) -> None:
    def skewed() -> float:
        return org.clock.now + offset

    async with AbmClient(
        org.creds,
        api_url=org.server.url,
        token_url=org.server.url + "/auth/oauth2/token",
        clock=skewed,
        assertion_lifetime=lifetime,
    ) as client:
        with pytest.raises(AbmAuthError, match=r"invalid_grant.*clock"):
            await client.mdm_servers()
    assert org.fake.last_token_refusal == refusal


async def test_a_small_clock_skew_is_tolerated(org: Org) -> None:
    async with org.client(clock=lambda: org.clock.now + 30) as client:
        assert len(await client.mdm_servers()) == 2


def _assertion(org: Org, **changes: Any) -> str:
    claims = {
        "aud": AUDIENCE,
        "iat": int(T0),
        "exp": int(T0) + 600,
        "sub": org.creds.client_id,
        "iss": org.creds.client_id,
        "jti": str(uuid.uuid4()),
    }
    headers = {"alg": "ES256", "kid": changes.pop("kid", org.creds.key_id)}
    claims.update(changes)
    return jwt.encode(claims, org.creds.private_key_pem, algorithm="ES256", headers=headers)


@pytest.mark.parametrize(
    ("claims", "params", "error", "refusal"),
    [
        ({"aud": "https://appleid.apple.com"}, {}, "invalid_client", "wrong aud"),
        ({"sub": "BUSINESSAPI.other"}, {}, "invalid_client", "sub is not the client_id"),
        ({"kid": "no-such-key"}, {}, "invalid_client", "unknown kid"),
        ({"exp": int(T0) + 180 * 86400 + 1}, {}, "invalid_grant", "exp is more than 180 days after iat"),
        ({}, {"scope": "school.api"}, "invalid_scope", "scope 'school.api' is not this tenant's"),
        ({}, {"grant_type": "password"}, "unsupported_grant_type", "grant_type is not client_credentials"),
        ({}, {"client_assertion_type": "jwt"}, "invalid_request", "wrong client_assertion_type"),
    ],
)
async def test_the_fake_token_endpoint_refuses_bad_requests(
    org: Org, claims: dict[str, Any], params: dict[str, str], error: str, refusal: str
) -> None:
    form = {
        "grant_type": "client_credentials",
        "client_id": org.creds.client_id,
        "client_assertion_type": abm_wire.ASSERTION_TYPE,
        "client_assertion": _assertion(org, **claims),
        "scope": "business.api",
    } | params
    async with httpx.AsyncClient() as http:
        reply = await http.post(org.server.url + "/auth/oauth2/token", data=form)
    assert (reply.status_code, reply.json()) == (400, {"error": error})
    assert org.fake.last_token_refusal == refusal


async def test_the_fake_accepts_apples_curl_form_on_both_paths(org: Org) -> None:
    """Apple's curl puts the parameters in the query string with an empty body (§1.1)."""
    params = {
        "grant_type": "client_credentials",
        "client_id": org.creds.client_id,
        "client_assertion_type": abm_wire.ASSERTION_TYPE,
        "client_assertion": _assertion(org, exp=int(T0) + 180 * 86400),
        "scope": "business.api",
    }
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    async with httpx.AsyncClient() as http:
        for path in ("/auth/oauth2/token", "/auth/oauth2/v2/token"):
            reply = await http.post(org.server.url + path, params=params, headers=headers)
            assert reply.status_code == 200, org.fake.last_token_refusal
            grant = reply.json()
            assert (grant["token_type"], grant["expires_in"], grant["scope"]) == (
                "Bearer",
                3600,
                "business.api",
            )
        org.clock.now += 3600
        reply = await http.get(
            org.server.url + "/v1/mdmServers", headers={"Authorization": f"Bearer {grant['access_token']}"}
        )
    assert reply.status_code == 401  # the token has expired on Apple's clock
    assert reply.json()["errors"][0]["status"] == "401"


# --- reading the organisation ---------------------------------------------------------------------


async def test_a_configurator_device_is_assigned_to_the_placeholder(org: Org, abm: AbmClient) -> None:
    org.fake.add_device("F2KZ3N4G5HD3", product_type="iPhone14,7")
    device = await abm.org_device("F2KZ3N4G5HD3")
    assert device is not None
    assert (device.status, device.product_family, device.device_model) == ("ASSIGNED", "iPhone", "iPhone 14")
    assert device.purchase_source_type == "MANUALLY_ADDED"
    assert device.added_to_org == datetime.fromtimestamp(T0, UTC)
    server_id = await abm.assigned_server_id("F2KZ3N4G5HD3")
    assert server_id == org.fake.configurator_server_id != org.mdm
    server = await abm.assigned_server("F2KZ3N4G5HD3")
    assert server is not None
    assert (server.name, server.is_configurator) == (CONFIGURATOR_SERVER_NAME, True)


async def test_unknown_and_unassigned_serials(org: Org, abm: AbmClient) -> None:
    org.fake.add_device("BOUGHT1", via_configurator=False)
    assert await abm.org_device("MISSING") is None
    with pytest.raises(AbmNotFound) as caught:
        await abm.assigned_server_id("MISSING")
    assert caught.value.apple_code == "NOT_FOUND"
    assert await abm.assigned_server_id("BOUGHT1") is None
    device = await abm.org_device("BOUGHT1")
    assert device is not None
    assert (device.status, device.assigned) == ("UNASSIGNED", False)


async def test_apples_404_body_is_verbatim(org: Org, abm: AbmClient) -> None:
    await abm.org_device("XABC123X0ABC123X0")
    async with httpx.AsyncClient() as http:
        token = next(iter(org.fake.snapshot()["tokens"]))
        reply = await http.get(
            org.server.url + "/v1/orgDevices/XABC123X0ABC123X0", headers={"Authorization": f"Bearer {token}"}
        )
    [error] = reply.json()["errors"]
    assert uuid.UUID(error.pop("id"))
    assert error == {
        "status": "404",
        "code": "NOT_FOUND",
        "title": "The specified resource doesn't exist",
        "detail": "There is no resource of type 'orgDevices' with id 'XABC123X0ABC123X0'",
    }


async def test_server_serials_follow_cursors_past_1000(org: Org, abm: AbmClient) -> None:
    serials = {f"C{i:06d}" for i in range(2345)}
    for serial in serials:
        org.fake.add_device(serial)
    org.fake.add_device("ELSEWHERE")
    org.fake.portal_assign("ELSEWHERE", org.mdm)
    found, pages = await abm.server_serials(org.fake.configurator_server_id)
    assert (found, pages) == (serials, 3)
    assert await abm.server_serials(org.mdm) == ({"ELSEWHERE"}, 1)
    limits = [r.query.get("limit") for r in org.seen if "relationships/devices" in r.path]
    assert limits == [["1000"]] * 4


async def test_the_fake_pages_with_apples_defaults(org: Org, abm: AbmClient) -> None:
    for i in range(150):
        org.fake.add_device(f"D{i:03d}")
    await abm.mdm_servers()
    token = next(iter(org.fake.snapshot()["tokens"]))
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as http:
        first = (await http.get(org.server.url + "/v1/orgDevices")).json()
        assert len(first["data"]) == 100
        assert first["meta"]["paging"]["limit"] == 100
        second = (await http.get(first["links"]["next"])).json()
        assert len(second["data"]) == 50
        assert "next" not in second["links"]
        assert "nextCursor" not in second["meta"]["paging"]
        too_big = await http.get(org.server.url + "/v1/orgDevices", params={"limit": "1001"})
        bad_cursor = await http.get(org.server.url + "/v1/orgDevices", params={"cursor": "!!"})
        related = await http.get(org.server.url + f"/v1/mdmServers/{org.mdm}/devices")
    assert (too_big.status_code, bad_cursor.status_code, related.status_code) == (400, 400, 403)


# --- failures --------------------------------------------------------------------------------------


@pytest.mark.parametrize("retry_after", [7, None])
async def test_429_raises_rate_limited_without_retrying(
    org: Org, abm: AbmClient, retry_after: int | None
) -> None:
    await abm.mdm_servers()
    org.fake.fail_next(1, status=429, retry_after=retry_after)
    with pytest.raises(AbmRateLimited) as caught:
        await abm.org_device("SER1")
    assert caught.value.retry_after == (None if retry_after is None else float(retry_after))
    assert caught.value.retryable
    assert org.fake.counts["api"] == 2  # no automatic retry: the caller's poller backs off


async def test_503_html_page_is_unavailable(org: Org, abm: AbmClient) -> None:
    org.fake.fail_next(1, status=503, html=True)
    with pytest.raises(AbmUnavailable, match="503") as caught:
        await abm.mdm_servers()
    assert caught.value.retryable
    assert await abm.mdm_servers()  # the fault was one-off


@pytest.mark.parametrize(
    "body",
    [b"<html>oops</html>", b'{"data": 5}', b'{"data": [{"type": "mdmServers", "id": 7}]}', b"[]"],
)
async def test_garbage_replies_are_unexpected_never_key_errors(org: Org, abm: AbmClient, body: bytes) -> None:
    org.fake.fail_next(1, status=200, body=body)
    with pytest.raises(AbmUnexpectedReply):
        await abm.mdm_servers()


async def test_token_endpoint_failures(org: Org, abm: AbmClient) -> None:
    org.fake.fail_next(1, status=429, retry_after=3, on="token")
    with pytest.raises(AbmRateLimited):
        await abm.mdm_servers()
    org.fake.fail_next(1, status=502, html=True, on="token")
    with pytest.raises(AbmUnavailable):
        await abm.mdm_servers()
    assert await abm.mdm_servers()


async def test_network_errors_are_unavailable(org: Org) -> None:
    async with AbmClient(org.creds, api_url="http://127.0.0.1:9", token_url="http://127.0.0.1:9/t") as client:
        with pytest.raises(AbmUnavailable, match=r"cannot reach 127\.0\.0\.1"):
            await client.mdm_servers()


# --- assigning ---------------------------------------------------------------------------------------


async def _finish(org: Org, abm: AbmClient, activity_id: str) -> abm_wire.Activity:
    for _ in range(5):
        activity = await abm.activity(activity_id)
        if activity.finished:
            return activity
        org.clock.now += 4
    pytest.fail("the activity never finished")


async def test_assign_a_batch_and_poll_it_to_completion(org: Org, abm: AbmClient) -> None:
    for serial in ("A1", "A2"):
        org.fake.add_device(serial)
    started = await abm.assign_devices(["A1", "A2"], org.mdm)
    assert (started.status, started.sub_status) == ("IN_PROGRESS", "SUBMITTED")
    body = json.loads(next(r for r in org.seen if r.method == "POST" and r.path.startswith("/v1")).body)
    assert body == {
        "data": {
            "type": "orgDeviceActivities",
            "attributes": {"activityType": "ASSIGN_DEVICES"},
            "relationships": {
                "mdmServer": {"data": {"type": "mdmServers", "id": org.mdm}},
                "devices": {"data": [{"type": "orgDevices", "id": "A1"}, {"type": "orgDevices", "id": "A2"}]},
            },
        }
    }
    assert await abm.assigned_server_id("A1") == org.fake.configurator_server_id  # not yet
    done = await _finish(org, abm, started.id)
    assert done.succeeded
    assert (done.status, done.sub_status) == ("COMPLETED", "COMPLETED_WITH_SUCCESS")
    assert done.completed is not None
    assert done.download_url
    assert await abm.server_serials(org.mdm) == ({"A1", "A2"}, 1)
    assert await abm.assigned_server_id("A2") == org.mdm


async def test_a_mixed_batch_completes_with_failure(org: Org, abm: AbmClient) -> None:
    org.fake.add_device("GOOD")
    started = await abm.assign_devices(["GOOD", "NOT-IN-ORG"], org.mdm)
    done = await _finish(org, abm, started.id)
    assert (done.status, done.sub_status, done.succeeded) == ("COMPLETED", "COMPLETED_WITH_FAILURE", False)
    assert org.fake.device_server("GOOD") == org.mdm


async def test_assign_conflicts_and_old_activities(org: Org, abm: AbmClient) -> None:
    org.fake.add_device("GOOD")
    with pytest.raises(AbmRejected, match="409"):
        await abm.assign_devices(["GOOD"], "0" * 32)
    with pytest.raises(AbmRejected, match="serial"):
        await abm.assign_devices(["NOPE"], org.mdm)
    started = await abm.assign_devices(["GOOD"], org.mdm)
    org.clock.now += 31 * 86400
    with pytest.raises(AbmNotFound):
        await abm.activity(started.id)


async def test_a_post_is_not_retried_on_5xx(org: Org, abm: AbmClient) -> None:
    org.fake.add_device("GOOD")
    await abm.mdm_servers()
    org.fake.fail_next(1, status=503)
    with pytest.raises(AbmUnavailable):
        await abm.assign_devices(["GOOD"], org.mdm)
    assert org.fake.counts["api"] == 2
    assert org.fake.snapshot()["activities"] == []


async def test_the_simulated_admin_assigns_parked_devices(org: Org) -> None:
    org.fake.admin_assigns_after = 60.0
    org.fake.admin_target = org.mdm
    org.fake.add_device("P1")
    org.clock.now += 59
    assert org.fake.device_server("P1") == org.fake.configurator_server_id
    assert org.fake.mdm_server_of("P1") is None  # parked on the placeholder
    org.clock.now += 1
    assert org.fake.device_server("P1") == org.mdm
    assert org.fake.mdm_server_of("P1") == "Intune"
    assert (org.fake.has_device("P1"), org.fake.has_device("P2")) == (True, False)


async def test_snapshot_restore_keeps_the_org_and_the_api_account(org: Org) -> None:
    org.fake.add_device("KEEP")
    org.fake.portal_assign("KEEP", org.mdm)
    data = json.loads(json.dumps(org.fake.snapshot()))
    again = FakeAppleBusiness(clock=org.clock)
    again.restore(data)
    assert again.credentials() == [org.creds]
    async with HttpServer(again.handle) as server:
        url = server.url
        async with AbmClient(
            org.creds, api_url=url, token_url=url + "/auth/oauth2/token", clock=org.clock
        ) as c:
            assert await c.assigned_server_id("KEEP") == org.mdm
            assert {s.name for s in await c.mdm_servers()} == {CONFIGURATOR_SERVER_NAME, "Intune"}


# --- no secrets in logs -----------------------------------------------------------------------------


async def test_logs_never_contain_the_key_assertion_or_token(
    org: Org, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    assertions: list[str] = []

    def recording(*args: Any, **kwargs: Any) -> str:
        assertions.append(make_client_assertion(*args, **kwargs))
        return assertions[-1]

    monkeypatch.setattr(abm_client, "make_client_assertion", recording)
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as captured:
        async with org.client() as client:
            await client.mdm_servers()
            org.fake.revoke_tokens()
            org.fake.fail_next(1, status=429)
            with pytest.raises(AbmRateLimited):
                await client.org_device("SER1")
            await client.org_device("SER1")
        wrong = AbmCredentials(org.creds.client_id, org.creds.key_id, other_key_pem())
        async with org.client(wrong) as client:
            with pytest.raises(AbmAuthError):
                await client.mdm_servers()
    events = [e["event"] for e in captured]
    assert events.count("abm_token_minted") == 2
    assert "abm_request_failed" in events
    minted = next(e for e in captured if e["event"] == "abm_token_minted")
    assert set(minted) == {"event", "log_level", "expires_in"}
    tokens = list(org.fake.snapshot()["tokens"])
    assert len(assertions) == 3
    assert tokens
    key_lines = [line for line in org.creds.private_key_pem.decode().splitlines() if "-----" not in line]
    secrets = [*assertions, *tokens, *key_lines, "Bearer", "authorization"]
    logged = repr(captured) + caplog.text
    assert caplog.text  # httpx's own request log was captured, so the check below has teeth
    for secret in secrets:
        assert secret not in logged


def test_a_real_wall_clock_is_the_default() -> None:
    creds = FakeAppleBusiness().new_api_account()
    claims = jwt.decode(make_client_assertion(creds, time.time()), options={"verify_signature": False})
    assert abs(claims["iat"] - time.time()) < 5


async def test_every_request_waits_for_the_stations_pace(org: Org) -> None:
    """The token request and every API call pass the pacer first, so one rate covers them all."""
    paced: list[str] = []

    async def pace(request: httpx.Request) -> None:
        paced.append(request.url.path)

    async with AbmClient(
        org.creds,
        api_url=org.server.url,
        token_url=org.server.url + "/auth/oauth2/token",
        clock=org.clock,
        pace=pace,
    ) as client:
        await client.mdm_servers()
        await client.org_device("NOPE0000000")
        assert paced == [r.path for r in org.seen]
        assert len(paced) == client.requests >= 3
        assert paced[0] == "/auth/oauth2/token"
