"""The embedded amqtt broker: real connections from aiomqtt, loopback only, clear failures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import psutil  # type: ignore[import-untyped, unused-ignore]  # an amqtt dependency
import pytest

from daemon.config import MqttConfig
from daemon.models import PortRef, Transition
from daemon.mqtt.broker import BrokerUnavailable, embedded_broker
from daemon.mqtt.payloads import PayloadRenderer
from daemon.mqtt.publisher import MqttPublisher
from daemon.mqtt.topics import Topics
from daemon.store import Store
from daemon.workflow.phases import Phase
from tests.mqtt_broker import retained_messages


def non_loopback_ipv4() -> str | None:
    """An address of this machine that is not loopback (a UDP connect sends no packet)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1
        except OSError:
            return None
        address: str = sock.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


async def drained(publisher: MqttPublisher, store: Store) -> None:
    while True:
        if publisher.connected and store.outbox_size() == 0:
            return
        await asyncio.sleep(0.01)


@contextlib.contextmanager
def listening_socket() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


async def test_accepts_clients_and_keeps_retained_messages_for_late_subscribers() -> None:
    async with embedded_broker(0) as (host, port):
        assert host == "127.0.0.1"
        assert port > 0
        async with aiomqtt.Client(host, port) as client:
            await client.publish("benchhub/e1/hub/a/port/1/state", b'{"phase":"done"}', qos=1, retain=True)
            await client.publish("benchhub/e1/hub/a/port/1/event", b"{}", qos=1, retain=False)
        got = await retained_messages(host, port, "benchhub/#", {"benchhub/e1/hub/a/port/1/state"})
    assert got == {"benchhub/e1/hub/a/port/1/state": b'{"phase":"done"}'}


async def test_publisher_works_against_the_embedded_broker(tmp_path: Path) -> None:
    """What `benchhub demo` runs: the outbox publisher on the in-process broker."""
    topics = Topics("benchhub", "e2")
    renderer = PayloadRenderer(topics)
    store = Store(tmp_path / "s.sqlite3", renderer=renderer)
    ref = PortRef("a", 3)
    async with embedded_broker(0) as (host, port):
        publisher = MqttPublisher(MqttConfig(url=f"mqtt://{host}:{port}"), topics, store, renderer)
        stop = asyncio.Event()
        task = asyncio.create_task(publisher.run(stop))
        store.record(Transition(ref=ref, to=Phase.DETECTED))
        store.record(Transition(ref=ref, to=Phase.UPDATING, step="update"))
        expect = {topics.status, topics.port_state(ref)}
        async with asyncio.timeout(3):
            await drained(publisher, store)
        got = await retained_messages(host, port, f"{topics.base}/#", expect)
        stop.set()
        async with asyncio.timeout(3):
            await task
        after = await retained_messages(host, port, topics.status, {topics.status})
    store.close()
    assert got[topics.status] == b"online"
    assert json.loads(got[topics.port_state(ref)])["phase"] == "updating"
    assert after == {topics.status: b"offline"}


async def test_listens_on_loopback_only() -> None:
    async with embedded_broker(0) as (_, port):
        listeners = [
            c.laddr
            for c in psutil.Process().net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        ]
        assert listeners, "the broker should be listening"
        assert {addr.ip for addr in listeners} == {"127.0.0.1"}
        other = non_loopback_ipv4()
        if other is not None:  # a machine with a network address: it must not reach the broker
            with pytest.raises((ConnectionRefusedError, TimeoutError)):
                socket.create_connection((other, port), timeout=1).close()


async def test_port_in_use_is_one_clear_line() -> None:
    with listening_socket() as port, pytest.raises(BrokerUnavailable) as caught:
        async with embedded_broker(port):
            pytest.fail("the broker must not start on a taken port")
    message = str(caught.value)
    assert str(port) in message
    assert "mqtt.embedded_port" in message
    assert "\n" not in message


async def test_second_embedded_broker_on_the_same_port_fails() -> None:
    async with embedded_broker(0) as (_, port):
        with pytest.raises(BrokerUnavailable, match=f"{port}.*already in use"):
            async with embedded_broker(port):
                pass


async def test_missing_amqtt_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "amqtt.broker", None)  # what an install without the extra sees
    with pytest.raises(BrokerUnavailable) as caught:
        async with embedded_broker(0):
            pass
    assert "pip install 'benchhub[broker]'" in str(caught.value)
    assert "Mosquitto" in str(caught.value)


async def test_amqtt_info_chatter_is_silenced(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with embedded_broker(0) as (host, port), aiomqtt.Client(host, port) as client:
        await client.publish("x/y", b"1", qos=1)
    chatter = [r for r in caplog.records if r.name.split(".")[0] in ("amqtt", "transitions")]
    assert [r for r in chatter if r.levelno < logging.WARNING] == []
