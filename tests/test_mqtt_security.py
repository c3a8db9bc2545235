"""The station against a Mosquitto that insists on who it is and what it may do.

Mutual TLS (client certificates), passwords from a file, an ACL that forbids some of the daemon's
topics (what really happens to a denied publish), and the ACL example in docs/mqtt.md run verbatim:
every check uses a real broker and asserts what the broker really delivered or logged.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest
from structlog.testing import capture_logs

from daemon.config import MqttConfig, TlsConfig
from daemon.models import PortRef
from daemon.mqtt.payloads import PayloadRenderer
from daemon.mqtt.publisher import MqttPublisher
from daemon.mqtt.topics import Topics
from daemon.store import Store
from daemon.workflow.phases import Phase
from tests.conftest import eventually, station_config
from tests.conftest import running as running_station
from tests.mqtt_broker import Mosquitto, TestCA, password_file, require_mosquitto, retained_messages
from tests.test_mqtt_publisher import running, walk

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "mqtt.md"


def station_topics(station: str) -> Topics:
    return Topics("benchhub", station)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "benchhub.sqlite3", renderer=PayloadRenderer(station_topics("bench-1")))
    yield s
    s.close()


def publisher(config: MqttConfig, store: Store, station: str = "bench-1") -> MqttPublisher:
    topics = station_topics(station)
    return MqttPublisher(config, topics, store, PayloadRenderer(topics))


def secret(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def broker(tmp_path: Path, name: str, lines: list[str]) -> Mosquitto:
    return Mosquitto(tmp_path / name, binary=require_mosquitto(), extra_config=lines)


# ------------------------------------------------------------------------------ mutual TLS


async def test_mutual_tls_needs_a_client_certificate_from_the_brokers_ca(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With TLS 1.3 the client's handshake is complete before the broker has checked the client
    certificate; the broker's refusal (alert `certificate required` / `unknown ca`) arrives on the
    first read, which paho only logs, and aiomqtt 2.5 then waits for a CONNACK until its timeout
    (the publisher's CALL_TIMEOUT, 10 s): last_error says "Operation timed out", the broker's log
    says why. Shortened here so the test stays quick."""
    monkeypatch.setattr("daemon.mqtt.publisher.CALL_TIMEOUT", 1.0)
    ca = TestCA(tmp_path / "pki")
    cert, key = ca.client("bench-1")
    rogue_cert, rogue_key = TestCA(tmp_path / "rogue").client("bench-1")  # right name, wrong CA
    with broker(tmp_path, "mtls", ca.listener_config(require_certificate=True)) as mosquitto:
        url = f"mqtts://{mosquitto.host}:{mosquitto.port}"

        with_cert = publisher(
            MqttConfig(url=url, tls=TlsConfig(ca_file=ca.ca, cert_file=cert, key_file=key)), store
        )
        async with running(with_cert):
            await eventually(lambda: with_cert.connected, "connected with a client certificate", within=5)
            reader_tls = ssl.create_default_context(cafile=str(ca.ca))
            reader_tls.load_cert_chain(*ca.client("reader"))
            topic = station_topics("bench-1").status
            got = await retained_messages(
                mosquitto.host, mosquitto.port, topic, {topic}, tls_context=reader_tls
            )
            assert got == {topic: b"online"}

        for name, tls in [
            ("no certificate", TlsConfig(ca_file=ca.ca)),
            ("another CA's certificate", TlsConfig(ca_file=ca.ca, cert_file=rogue_cert, key_file=rogue_key)),
        ]:
            refused = publisher(MqttConfig(url=url, tls=tls), store)
            with capture_logs() as logs:
                async with running(refused):  # and it stops promptly, despite the retries
                    await eventually(lambda p=refused: p.last_error is not None, f"refused: {name}", within=5)
            assert not refused.connected, name
            failures = [e for e in logs if e["event"] == "mqtt_connect_failed"]
            assert failures, name
            assert failures[0]["log_level"] == "warning"
            assert failures[0]["error"] == refused.last_error
        log = mosquitto.log_text()
        assert "peer did not return a certificate" in log, log  # the broker says why it hung up
        assert "certificate verify failed" in log


# ------------------------------------------------------------------------------ passwords


async def test_password_from_a_file_and_a_wrong_one_is_refused_without_being_logged(
    tmp_path: Path, store: Store
) -> None:
    users = {"bench-1": "s3cret-bench", "dashboard": "s3cret-dash"}
    passwd = password_file(tmp_path / "passwd", users)
    lines = ["allow_anonymous false", f"password_file {passwd}"]
    with broker(tmp_path, "auth", lines) as mosquitto:
        good = secret(tmp_path / "good", users["bench-1"])
        ok = publisher(MqttConfig(url=mosquitto.url, username="bench-1", password_file=good), store)
        async with running(ok):
            await eventually(lambda: ok.connected, "connected with the password from the file", within=5)
        topic = station_topics("bench-1").status
        got = await retained_messages(
            mosquitto.host, mosquitto.port, topic, {topic}, username="dashboard", password=users["dashboard"]
        )
        assert got == {topic: b"offline"}  # online, then the clean goodbye

        wrong_password = "wrong-pa55-never-logged"
        bad = publisher(
            MqttConfig(
                url=mosquitto.url, username="bench-1", password_file=secret(tmp_path / "bad", wrong_password)
            ),
            store,
        )
        with capture_logs() as logs:
            async with running(bad):
                await eventually(lambda: bad.last_error is not None, "refused", within=5)
        assert not bad.connected
        failures = [e for e in logs if e["event"] == "mqtt_connect_failed"]
        assert len(failures) == 1
        assert "not authorized" in failures[0]["error"].lower()  # CONNACK 5 in MQTT 3.1.1
        assert wrong_password not in repr(logs)
        assert wrong_password not in (bad.last_error or "")
        assert wrong_password not in mosquitto.log_text()

        with pytest.raises(aiomqtt.MqttError, match=r"(?i)not authori"):  # anonymous: refused too
            async with aiomqtt.Client(mosquitto.host, mosquitto.port):
                pass

        # `benchhub watch` reads its password from a file as well.
        dash = secret(tmp_path / "dash", users["dashboard"])
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "daemon",
            "watch",
            "--mqtt",
            mosquitto.url,
            "--username",
            "dashboard",
            "--password-file",
            str(dash),
            "--once",
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(20):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert out.decode().startswith("station bench-1: offline")


# ------------------------------------------------------------------------------ ACL: denied publishes


async def test_a_publish_the_acl_denies_is_acked_and_dropped(tmp_path: Path, store: Store) -> None:
    """Mosquitto 2 with MQTT 3.1.1 (aiomqtt's default): a denied PUBLISH is acknowledged (PUBACK has
    no reason code in 3.1.1) and dropped. The publisher cannot tell, so it must simply go on: no
    hang waiting for an ack, no reconnect loop, outbox drained. Readers see only what they may."""
    users = {"bench-1": "pw-station", "dashboard": "pw-dash", "admin": "pw-admin"}
    passwd = password_file(tmp_path / "passwd", users)
    acl = tmp_path / "acl"
    acl.write_text(
        "user bench-1\n"
        "topic write benchhub/bench-1/status\n"
        "topic write benchhub/bench-1/hub/+/port/+/state\n"  # not the phase, colour and event
        "user dashboard\n"
        "topic read benchhub/+/status\n"  # nothing else
        "user admin\n"
        "topic read benchhub/#\n"
    )
    lines = ["allow_anonymous false", f"password_file {passwd}", f"acl_file {acl}"]
    topics = station_topics("bench-1")
    a1 = PortRef("hub-a", 1)
    with broker(tmp_path, "acl-broker", lines) as mosquitto:
        password = secret(tmp_path / "station-pw", users["bench-1"])
        station = publisher(MqttConfig(url=mosquitto.url, username="bench-1", password_file=password), store)
        with capture_logs() as logs:
            async with running(station):
                walk(store, a1, Phase.DETECTED, Phase.UPDATING)
                await eventually(
                    lambda: station.connected and store.outbox_size() == 0, "outbox drained", within=5
                )
                # online + state, phase, colour (an unsent retained one is replaced by the newer) + 2 events
                assert station.published >= 1 + 3 + 2
                assert station.last_error is None
        assert [e["event"] for e in logs].count("mqtt_connected") == 1  # never disconnected

        log = mosquitto.log_text()
        denied = re.findall(r"Denied PUBLISH from \S+ \(d0, q1, r\d, m(\d+), '([^']+)'", log)
        mirrors = {topics.port_phase(a1), topics.port_color(a1), topics.port_event(a1)}
        assert {t for _, t in denied} == {*mirrors, topics.awaiting_assignment, topics.health}
        # The broker's own log shows the acknowledgement of each denied message (rc135 is the MQTT 5
        # reason it would have sent; a 3.1.1 PUBACK has no field for it).
        for mid, _ in denied:
            assert re.search(rf"Sending PUBACK to \S+ \(m{mid}, rc135\)", log), mid

        everything = {topics.status, topics.port_state(a1), topics.port_phase(a1)}
        admin = await retained_messages(
            mosquitto.host,
            mosquitto.port,
            "benchhub/#",
            everything,
            within=0.5,
            username="admin",
            password="pw-admin",
        )
        # The allowed retained messages are there; the denied ones never reached the broker.
        assert sorted(admin) == sorted([topics.status, topics.port_state(a1)])
        assert json.loads(admin[topics.port_state(a1)])["phase"] == "updating"

        # A reader gets only what its ACL allows, whatever it subscribes to (Mosquitto grants the
        # subscription and filters per message): the state is there, but not for the dashboard.
        dashboard = await retained_messages(
            mosquitto.host,
            mosquitto.port,
            "benchhub/#",
            everything,
            within=0.5,
            username="dashboard",
            password="pw-dash",
        )
        assert dashboard == {topics.status: b"offline"}


# ------------------------------------------------------------------------------ the documented ACL


def documented_acl() -> str:
    """The Mosquitto ACL block of docs/mqtt.md's Security section, verbatim."""
    blocks = re.findall(r"```text\n(# mosquitto acl_file\n.*?)```", DOCS.read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/mqtt.md should hold exactly one `# mosquitto acl_file` block"
    return blocks[0]


async def test_the_documented_acl_lets_each_user_do_exactly_its_job(tmp_path: Path) -> None:
    users = {"bench-1": "pw-station", "dashboard": "pw-dash", "operator": "pw-op"}
    passwd = password_file(tmp_path / "passwd", users)
    acl = tmp_path / "acl"
    acl.write_text(documented_acl())
    lines = ["allow_anonymous false", f"password_file {passwd}", f"acl_file {acl}"]
    with broker(tmp_path, "docs-acl", lines) as mosquitto:
        # The real station, as user bench-1: everything it publishes and subscribes is allowed.
        config = station_config(tmp_path / "station", mosquitto, devices=2, ports=2)
        mqtt = config.mqtt.model_copy(
            update={"username": "bench-1", "password_file": secret(tmp_path / "station-pw", users["bench-1"])}
        )
        config = config.model_copy(
            update={"station": config.station.model_copy(update={"id": "bench-1"}), "mqtt": mqtt}
        )
        topics = station_topics("bench-1")
        ref = PortRef("hub-a", 1)
        async with running_station(config) as station:
            await eventually(
                lambda: all(s.phase is Phase.DONE for s in station.ports()), "both done", within=10
            )
            await eventually(lambda: station.store.outbox_size() == 0, "outbox drained")

            def client(user: str) -> aiomqtt.Client:
                return aiomqtt.Client(mosquitto.host, mosquitto.port, username=user, password=users[user])

            # The dashboard reads state ...
            got = await retained_messages(
                mosquitto.host,
                mosquitto.port,
                "benchhub/#",
                {topics.status, topics.port_state(ref)},
                username="dashboard",
                password=users["dashboard"],
            )
            assert got[topics.status] == b"online"
            assert json.loads(got[topics.port_state(ref)])["phase"] == "done"

            # ... but what it publishes to `…/set` never reaches the station's subscription; the
            # operator's does. A third reader (the station user) sees which commands arrive.
            async with client("bench-1") as listener:
                await listener.subscribe(topics.port_set(ref), qos=1)
                await listener.subscribe(topics.station_set, qos=1)
                for user in ("dashboard", "operator"):
                    async with client(user) as sender:
                        for topic in (topics.port_set(ref), topics.station_set):
                            body = json.dumps({"action": "identify", "transaction": f"{user}-probe"})
                            await sender.publish(topic, body.encode(), qos=1)  # acked either way
                received: list[str] = []
                try:
                    async with asyncio.timeout(1.0):
                        async for message in listener.messages:
                            assert isinstance(message.payload, bytes)
                            received.append(
                                f"{message.topic.value} {json.loads(message.payload)['transaction']}"
                            )
                            if len(received) == 2:
                                break
                except TimeoutError:
                    pass
            assert sorted(received) == sorted(
                [f"{topics.port_set(ref)} operator-probe", f"{topics.station_set} operator-probe"]
            )

        log = mosquitto.log_text()
        station_client = f"benchhub-{station.config.station.id}"
        denied = [line for line in log.splitlines() if "Denied" in line]
        assert not [line for line in denied if station_client in line], "the station was denied something"
        # The dashboard's two command probes, and nothing else, were refused.
        assert len([line for line in denied if "Denied PUBLISH" in line]) == 2, denied
