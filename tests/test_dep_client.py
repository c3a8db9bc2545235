"""The DEP device assignment client against its fake, over real HTTP, plus the wire pieces alone."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from daemon.apple.dep_client import DepClient
from daemon.apple.dep_wire import (
    TOKEN_CONFIG_KEY,
    DepAuthError,
    DepDeviceRecord,
    DepRateLimited,
    DepServerToken,
    DepUnavailable,
    DepUnexpectedReply,
    hmac_sha1_signature,
    load_server_token,
    parse_authorization,
    parse_server_token,
    session_authorization,
    signature_base_string,
)
from daemon.sim.apple_dep import FakeDepService
from daemon.sim.http import HttpServer

OWNED_PREFIX = "OWN"


class Clock:
    """One clock for client and fake, so session expiry and OAuth timestamps agree."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def owns(serial: str) -> DepDeviceRecord | None:
    if not serial.startswith(OWNED_PREFIX):
        return None
    return DepDeviceRecord(
        serial_number=serial,
        model="iPhone 15",
        profile_status="empty",
        device_assigned_by="admin@example.com",
        device_assigned_date=datetime(2026, 11, 1, 9, 30, tzinfo=UTC),
    )


@dataclasses.dataclass
class Bench:
    fake: FakeDepService
    server: HttpServer
    clock: Clock
    client_for: Callable[[DepServerToken], DepClient]

    @property
    def client(self) -> DepClient:
        return self.client_for(self.fake.token)


@pytest.fixture
async def bench() -> AsyncIterator[Bench]:
    clock = Clock()
    fake = FakeDepService(FakeDepService.new_token("bench"), owns, clock=clock, session_ttl=60)
    clients: list[DepClient] = []

    def client_for(token: DepServerToken) -> DepClient:
        client = DepClient(token, base_url=server.url, clock=clock)
        clients.append(client)
        return client

    async with HttpServer(fake) as server:
        yield Bench(fake, server, clock, client_for)
        for client in clients:
            await client.close()


# --- RFC 5849, independently of Apple ---------------------------------------------------------------


def test_rfc5849_section_1_2_signature() -> None:
    """The signed photo request of RFC 5849 §1.2 (realm excluded from the signature)."""
    params = [
        ("oauth_consumer_key", "dpf43f3p2l4k3l03"),
        ("oauth_token", "nnch734d00sl2jdk"),
        ("oauth_signature_method", "HMAC-SHA1"),
        ("oauth_timestamp", "137131202"),
        ("oauth_nonce", "chapoH"),
    ]
    base = signature_base_string(
        "GET", "http://photos.example.net/photos?file=vacation.jpg&size=original", params
    )
    assert hmac_sha1_signature(base, "kd94hf93k423kf44", "pfkkdhi9sl3r4s00") == "MdpQcU8iPSUjWoN/UDMsK2sui9I="


def test_rfc5849_section_3_4_1_1_base_string() -> None:
    """§3.4.1.1's example: query and body parameters, double encoding, sorting of duplicates."""
    params = [
        ("c2", ""),
        ("a3", "2 q"),
        ("oauth_consumer_key", "9djdj82h48djs9d2"),
        ("oauth_token", "kkk9d7dh3k39sjv7"),
        ("oauth_signature_method", "HMAC-SHA1"),
        ("oauth_timestamp", "137131201"),
        ("oauth_nonce", "7d8f3e4a"),
    ]
    base = signature_base_string("POST", "http://example.com/request?b5=%3D%253D&a3=a&c%40=&a2=r%20b", params)
    assert base == (
        "POST&http%3A%2F%2Fexample.com%2Frequest&a2%3Dr%2520b%26a3%3D2%2520q%26a3%3Da%26b5%3D%253D%25253D%26c%2540"
        "%3D%26c2%3D%26oauth_consumer_key%3D9djdj82h48djs9d2%26oauth_nonce%3D7d8f3e4a%26oauth_signature_method%3DH"
        "MAC-SHA1%26oauth_timestamp%3D137131201%26oauth_token%3Dkkk9d7dh3k39sjv7"
    )


def test_session_header_has_apples_shape_and_round_trips() -> None:
    token = DepServerToken("CK_1", "CS_secret", "AT_1", "AS_secret")
    header = session_authorization(
        token, url="https://mdmenrollment.apple.com/session", timestamp=5, nonce="n1"
    )
    assert header.startswith('OAuth realm="ADM", oauth_consumer_key="CK_1", oauth_token="AT_1", ')
    params = parse_authorization(header)
    assert params is not None
    fields = dict(params)
    assert fields["oauth_version"] == "1.0"
    assert fields["oauth_signature_method"] == "HMAC-SHA1"
    signed = [(k, v) for k, v in params if k not in ("realm", "oauth_signature")]
    base = signature_base_string("GET", "https://mdmenrollment.apple.com:443/session", signed)
    assert fields["oauth_signature"] == hmac_sha1_signature(base, "CS_secret", "AS_secret")


# --- sessions --------------------------------------------------------------------------------------


async def test_good_token_gets_a_session_and_reuses_it(bench: Bench) -> None:
    client = bench.client
    first = await client.assigned(["OWN1"])
    second = await client.assigned(["OWN2"])
    assert first["OWN1"] is not None
    assert second["OWN2"] is not None
    assert client.session_requests == 1
    assert client.requests == 3
    assert [t for _, t in bench.server.requests] == ["/session", "/devices", "/devices"]


async def test_wrong_secret_is_an_auth_error_naming_the_config_key(bench: Bench) -> None:
    wrong = dataclasses.replace(bench.fake.token, access_secret="AS_wrong")
    with pytest.raises(DepAuthError) as info:
        await bench.client_for(wrong).assigned(["OWN1"])
    assert info.value.retryable is False
    assert TOKEN_CONFIG_KEY in info.value.message
    assert bench.fake.sessions == {}


async def test_unknown_consumer_key_is_refused(bench: Bench) -> None:
    other = dataclasses.replace(bench.fake.token, consumer_key="CK_other")
    with pytest.raises(DepAuthError):
        await bench.client_for(other).assigned(["OWN1"])


async def test_terms_not_signed_is_an_auth_error(bench: Bench) -> None:
    bench.fake.terms_signed = False
    with pytest.raises(DepAuthError, match="T_C_NOT_SIGNED"):
        await bench.client.assigned(["OWN1"])


async def test_expired_server_token_is_refused_before_any_request(bench: Bench) -> None:
    old = dataclasses.replace(bench.fake.token, access_token_expiry=datetime(2020, 1, 1, tzinfo=UTC))
    client = bench.client_for(old)
    with pytest.raises(DepAuthError, match="expired"):
        await client.assigned(["OWN1"])
    assert client.requests == 0


async def test_fake_rejects_a_replayed_nonce(bench: Bench) -> None:
    client = DepClient(bench.fake.token, base_url=bench.server.url, clock=bench.clock, nonce=lambda: "same")
    try:
        await client.session()
        bench.fake.expire_sessions()
        with pytest.raises(DepAuthError):
            await client.assigned(["OWN1"])
    finally:
        await client.close()


async def test_expired_session_is_renewed_transparently(bench: Bench) -> None:
    client = bench.client
    await client.assigned(["OWN1"])
    bench.clock.now += 61  # past the fake's 60 s session lifetime
    result = await client.assigned(["OWN1", "NOPE"])
    assert result["OWN1"] is not None
    assert result["NOPE"] is None
    assert client.session_requests == 2
    assert [t for _, t in bench.server.requests] == [
        "/session",
        "/devices",
        "/devices",
        "/session",
        "/devices",
    ]


async def test_session_refused_twice_is_an_auth_error(bench: Bench) -> None:
    bench.fake.session_ttl = -1  # every session is born expired
    client = bench.client
    with pytest.raises(DepAuthError):
        await client.assigned(["OWN1"])
    assert client.session_requests == 2


# --- device details --------------------------------------------------------------------------------


async def test_assigned_and_not_accessible_mix(bench: Bench) -> None:
    result = await bench.client.assigned(["OWN1", "OTHER1", "OWN2", "OWN1"])
    assert list(result) == ["OWN1", "OTHER1", "OWN2"]
    record = result["OWN1"]
    assert record is not None
    assert record.serial_number == "OWN1"
    assert record.profile_status == "empty"
    assert record.device_assigned_date == datetime(2026, 11, 1, 9, 30, tzinfo=UTC)
    assert result["OTHER1"] is None


async def test_batching_2500_serials_takes_three_requests(bench: Bench) -> None:
    serials = [f"{OWNED_PREFIX}{i:05d}" if i % 2 else f"X{i:05d}" for i in range(2500)]
    client = bench.client
    result = await client.assigned(serials)
    assert len(result) == 2500
    assert sum(r is not None for r in result.values()) == 1250
    assert bench.fake.device_requests == 3
    assert client.requests == 4


async def test_empty_list_sends_nothing(bench: Bench) -> None:
    client = bench.client
    assert await client.assigned([]) == {}
    assert client.requests == 0


async def test_429_with_retry_after_is_raised_not_retried(bench: Bench) -> None:
    client = bench.client
    await client.assigned(["OWN1"])
    bench.fake.fail_next(1, status=429, retry_after=120)
    with pytest.raises(DepRateLimited) as info:
        await client.assigned(["OWN1"])
    assert info.value.retry_after == 120
    assert info.value.retryable is True
    assert client.requests == 3


async def test_503_with_retry_after_is_rate_limited_and_without_is_unavailable(bench: Bench) -> None:
    client = bench.client
    bench.fake.fail_next(1, status=503, retry_after=30)
    with pytest.raises(DepRateLimited) as info:
        await client.assigned(["OWN1"])
    assert info.value.retry_after == 30
    bench.fake.fail_next(1, status=503)
    with pytest.raises(DepUnavailable):
        await client.assigned(["OWN1"])


@pytest.mark.parametrize(
    "body",
    [
        b"<html>gateway</html>",
        b"[]",
        b'{"devices": []}',
        b'{"devices": {"OWN1": {"response_status": "MAYBE"}}}',
    ],
)
async def test_garbage_reply_is_unexpected_reply(bench: Bench, body: bytes) -> None:
    client = bench.client
    await client.session()
    bench.fake.fail_next(1, status=200, body=body)
    with pytest.raises(DepUnexpectedReply):
        await client.assigned(["OWN1"])


async def test_missing_serial_in_reply_is_unexpected(bench: Bench) -> None:
    client = bench.client
    await client.session()
    bench.fake.fail_next(1, status=200, body=b'{"devices": {}}')
    with pytest.raises(DepUnexpectedReply, match="OWN1"):
        await client.assigned(["OWN1"])


async def test_fake_refuses_empty_and_anonymous_device_requests(bench: Bench) -> None:
    import httpx

    session = await bench.client.session()
    async with httpx.AsyncClient(base_url=bench.server.url) as http:
        empty = await http.post("/devices", json={"devices": []}, headers={"X-ADM-Auth-Session": session})
        no_session = await http.post("/devices", json={"devices": ["OWN1"]})
        malformed = await http.post("/devices", content=b"{", headers={"X-ADM-Auth-Session": session})
    assert (empty.status_code, empty.text) == (400, "DEVICE_ID_REQUIRED")
    assert no_session.status_code == 401
    assert (malformed.status_code, malformed.text) == (400, "MALFORMED_REQUEST_BODY")


# --- token files -----------------------------------------------------------------------------------


def test_token_json_form(tmp_path: Path) -> None:
    token = FakeDepService.new_token("bench")
    path = tmp_path / "token.json"
    path.write_text(token.as_json())
    loaded = load_server_token(path)
    assert loaded == token


def test_token_smime_text_form(tmp_path: Path) -> None:
    token = FakeDepService.new_token("bench")
    text = (
        "Content-Type: text/plain;charset=UTF-8\r\n"
        "Content-Transfer-Encoding: 7bit\r\n\r\n"
        f"-----BEGIN MESSAGE-----\r\n{token.as_json()}\r\n-----END MESSAGE-----\r\n"
    )
    path = tmp_path / "token_decrypted.txt"
    path.write_text(text)
    assert load_server_token(path) == token


@pytest.mark.parametrize("content", ["", "hello", '{"consumer_key": "CK_1"}', "{not json}"])
def test_bad_token_file_names_the_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bad.p7m"
    path.write_text(content)
    with pytest.raises(DepAuthError) as info:
        load_server_token(path)
    assert str(path) in info.value.message
    assert TOKEN_CONFIG_KEY in info.value.message
    assert "\n" not in info.value.message


def test_missing_token_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DepAuthError, match=r"missing\.json"):
        load_server_token(tmp_path / "missing.json")


def test_token_repr_hides_secrets() -> None:
    token = parse_server_token(FakeDepService.new_token("bench").as_json())
    text = repr(token) + str(token)
    for secret in (token.consumer_secret, token.access_token, token.access_secret):
        assert secret not in text


# --- logs ------------------------------------------------------------------------------------------


async def test_secrets_never_reach_the_logs(bench: Bench) -> None:
    client = bench.client
    with capture_logs() as logs:
        await client.assigned(["OWN1"])
        bench.clock.now += 61
        await client.assigned(["OWN1"])
        bench.fake.fail_next(1, status=429, retry_after=5)
        with pytest.raises(DepRateLimited):
            await client.assigned(["OWN1"])
        with pytest.raises(DepAuthError):
            await bench.client_for(dataclasses.replace(bench.fake.token, access_secret="x")).session()
    assert logs, "the client logs its session handling"
    dumped = repr(logs)
    token = bench.fake.token
    secrets_seen = [
        token.consumer_secret,
        token.access_token,
        token.access_secret,
        "OAuth ",
        "oauth_signature",
    ]
    secrets_seen += list(bench.fake.sessions)
    assert bench.fake.sessions
    for secret in secrets_seen:
        assert secret not in dumped
