"""Commands over MQTT: the sans-IO judge, then a station answering through a real Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from daemon.config import parse_config
from daemon.models import PortRef
from daemon.mqtt.commands import CommandRejected, CommandRules, parse_command
from daemon.mqtt.topics import Topics
from daemon.workflow.phases import Phase
from tests.conftest import eventually, running, station_config
from tests.mqtt_broker import Mosquitto

TOPICS = Topics("benchhub", "demo")
A1 = PortRef("hub-a", 1)
RULES = CommandRules(("retry", "abort", "identify"), None, lambda ref: ref.hub == "hub-a" and ref.port <= 8)


def judge(topic: str, payload: object, rules: CommandRules = RULES) -> Any:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return parse_command(TOPICS, topic, raw, rules)


def test_a_port_command_names_its_port_in_the_topic() -> None:
    command = judge(TOPICS.port_set(A1), {"action": "retry", "transaction": "t-1"})
    assert (command.ref, command.action, command.transaction) == (A1, "retry", "t-1")
    command = judge(TOPICS.station_set, {"action": "abort", "port": "hub-a/3", "transaction": 7})
    assert (command.ref, command.action, command.transaction) == (PortRef("hub-a", 3), "abort", "7")


@pytest.mark.parametrize(
    ("topic", "payload", "code"),
    [
        (TOPICS.port_set(A1), b"retry", "malformed"),
        (TOPICS.port_set(A1), b"\xff\xfe", "malformed"),
        (TOPICS.port_set(A1), [1, 2], "malformed"),
        (TOPICS.port_set(A1), {"transaction": "t"}, "malformed"),
        (TOPICS.port_set(A1), {"action": "retry", "transaction": {"nested": 1}}, "malformed"),
        (TOPICS.port_set(A1), {"action": "retry", "transaction": "x" * 200}, "malformed"),
        (TOPICS.port_set(A1), b"{" + b" " * 5000 + b"}", "malformed"),
        (TOPICS.port_set(A1), {"action": "skip"}, "not_allowed"),
        (TOPICS.port_set(A1), {"action": "format_disk"}, "not_allowed"),
        (TOPICS.port_set(PortRef("hub-z", 1)), {"action": "retry"}, "unknown_port"),
        (TOPICS.port_set(PortRef("hub-a", 99)), {"action": "retry"}, "unknown_port"),
        (TOPICS.station_set, {"action": "retry"}, "malformed"),
        (TOPICS.station_set, {"action": "retry", "port": "../../etc"}, "malformed"),
    ],
)
def test_bad_commands_are_refused_with_a_code(topic: str, payload: object, code: str) -> None:
    with pytest.raises(CommandRejected) as caught:
        judge(topic, payload)
    assert caught.value.code == code


def test_a_configured_token_is_required_and_compared_exactly() -> None:
    rules = CommandRules(("retry",), "s3cret", RULES.has_port)
    assert judge(TOPICS.port_set(A1), {"action": "retry", "token": "s3cret"}, rules).action == "retry"
    for token in (None, "", "s3cre", "s3cret ", 5):
        with pytest.raises(CommandRejected) as caught:
            judge(TOPICS.port_set(A1), {"action": "retry", "token": token, "transaction": "t"}, rules)
        assert caught.value.code == "unauthorised"
        assert caught.value.transaction == "t"  # the refusal still reaches the sender's transaction


@contextlib.asynccontextmanager
async def responses(broker: Mosquitto) -> AsyncIterator[tuple[aiomqtt.Client, list[dict[str, Any]]]]:
    """A client that collects every response document the station publishes."""
    got: list[dict[str, Any]] = []
    async with aiomqtt.Client(broker.host, broker.port, identifier="operator-test") as client:
        await client.subscribe(TOPICS.response, qos=1)

        async def collect() -> None:
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                got.append(json.loads(message.payload))

        reader = asyncio.create_task(collect())
        try:
            yield client, got
        finally:
            reader.cancel()


async def test_commands_are_answered_and_retained_ones_ignored(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = station_config(tmp_path, mosquitto, devices=1, hub_model="U16S", sim={"assign_delay": 1e9})
    # Left retained on the broker by a careless client before the station starts: never acted on.
    async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="careless") as careless:
        await careless.publish(
            TOPICS.port_set(A1), json.dumps({"action": "abort", "transaction": "stale"}), qos=1, retain=True
        )
    async with running(config) as station, responses(mosquitto) as (client, got):
        await eventually(
            lambda: station.store.port(A1).phase is Phase.AWAITING_ASSIGNMENT, what="awaiting assignment"
        )
        await client.publish(TOPICS.port_set(A1), b"{not json", qos=1)
        await client.publish(
            TOPICS.port_set(A1), json.dumps({"action": "retry", "transaction": "t-2"}), qos=1
        )
        await client.publish(
            TOPICS.port_set(A1), json.dumps({"action": "identify", "transaction": "t-3"}), qos=1
        )
        await eventually(lambda: len(got) >= 3, what="three responses")
        malformed, retry, identify = got[:3]
        assert malformed["ok"] is False
        assert malformed["error"]["code"] == "malformed"
        assert retry["transaction"] == "t-2"
        assert retry["ok"] is False  # retrying a port that is waiting makes no sense; the reason comes back
        assert "awaiting_assignment" in retry["error"]["message"]
        assert identify == {
            **identify,
            "ok": True,
            "transaction": "t-3",
            "port": "hub-a/1",
            "action": "identify",
        }
        engine = station.hubs.simulated["hub-a"].simulator.engine
        await eventually(lambda: engine.ports[0].leds.get(1) == 0b10101010, "port 1 blinks")

        await client.publish(
            TOPICS.station_set,
            json.dumps({"action": "abort", "port": "hub-a/1", "transaction": "t-4"}),
            qos=1,
        )
        await eventually(lambda: len(got) >= 4, what="the abort's response")
        assert got[3] == {**got[3], "ok": True, "transaction": "t-4", "result": "aborted"}
        assert station.store.port(A1).phase is Phase.FAILED
        assert station.store.port(A1).error is not None
        assert all(r["transaction"] != "stale" for r in got)
        history = station.store.history(ref=A1)
        assert sum(1 for row in history if row.error is not None and row.error.code == "aborted") == 1


async def test_commands_can_be_switched_off(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = station_config(tmp_path, mosquitto, devices=0)
    data = config.model_dump(mode="json", exclude_none=True)
    data["mqtt"]["commands"] = {"enabled": False}
    quiet = parse_config(data, tmp_path)
    async with running(quiet) as station, responses(mosquitto) as (client, got):
        assert not any(topic.endswith("/set") for topic in station.inbound.subscriptions)
        await client.publish(TOPICS.port_set(A1), json.dumps({"action": "retry", "transaction": "x"}), qos=1)
        await asyncio.sleep(0.5)
        assert got == []
