"""Home Assistant discovery payloads (daemon/mqtt/discovery.py): pure, no broker.

The checks follow HA's documented device-based discovery schema
(https://www.home-assistant.io/integrations/mqtt/#device-discovery-payload): `device` and `origin`
at the root, every component with a `platform` and a `unique_id`, sensors with a `state_topic`,
buttons with a `command_topic`; removal is an empty retained payload on the config topic.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Config, parse_config
from daemon.models import PortRef, PortState
from daemon.mqtt.commands import CommandRules, parse_command
from daemon.mqtt.discovery import (
    discovery_messages,
    discovery_topic,
    ha_status_topics,
    is_ha_online,
    removal_messages,
)
from daemon.mqtt.payloads import PayloadRenderer
from daemon.mqtt.topics import Topics
from daemon.workflow.phases import Phase

VERSION = "1.2.3"
CONFIG_TOPIC = re.compile(r"^(?P<prefix>[a-z0-9_-]+)/device/(?P<object_id>[a-zA-Z0-9_-]+)/config$")


def make_config(
    *, hubs: dict[str, int] | None = None, mqtt: dict[str, Any] | None = None, name: str = "Bench One"
) -> Config:
    hubs = {"hub-a": 2, "hub-b": 3} if hubs is None else hubs
    data = {
        "station": {"id": "bench-1", "name": name},
        "hubs": [{"id": hub, "kind": "sim", "ports": ports} for hub, ports in hubs.items()],
        "sim": {},
        "mqtt": mqtt or {},
    }
    return parse_config(data, Path("/nonexistent"))


def topics_for(config: Config) -> Topics:
    return Topics(config.mqtt.prefix, config.station.id)


def payloads(config: Config) -> dict[str, dict[str, Any]]:
    """object_id -> parsed payload, checking the envelope of every message on the way."""
    out: dict[str, dict[str, Any]] = {}
    for message in discovery_messages(config, topics_for(config), VERSION):
        match = CONFIG_TOPIC.match(message.topic)
        assert match, message.topic
        assert match["prefix"] == config.mqtt.homeassistant.prefix
        assert message.retain
        assert message.qos == 1
        doc = json.loads(message.payload)
        assert isinstance(doc, dict)
        out[match["object_id"]] = doc
    return out


SHARED_OPTIONS = (
    "availability",
    "availability_mode",
    "availability_template",
    "availability_topic",
    "command_topic",
    "encoding",
    "payload_available",
    "payload_not_available",
    "qos",
    "state_topic",
)
"""What a component inherits from the root of a device payload unless it sets the option itself
(HA core `mqtt/discovery.py`, `_merge_common_device_options`)."""


def effective(doc: dict[str, Any], key: str) -> dict[str, Any]:
    """A component's config as Home Assistant sees it after merging the shared options."""
    comp = dict(components(doc)[key])
    for option in SHARED_OPTIONS:
        if option in doc and option not in comp:
            comp[option] = doc[option]
    return comp


def components(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    comps = doc["components"]
    assert isinstance(comps, dict)
    assert comps
    return comps


def test_one_device_for_the_station_and_one_per_hub() -> None:
    docs = payloads(make_config())
    assert list(docs) == ["benchhub_bench-1", "benchhub_bench-1_hub-a", "benchhub_bench-1_hub-b"]
    station = docs["benchhub_bench-1"]["device"]
    assert station["identifiers"] == ["benchhub_bench-1"]
    assert station["name"] == "Bench One"
    assert station["manufacturer"] == "benchhub"
    assert station["model"] == "provisioning station"
    assert station["sw_version"] == VERSION


def test_station_name_falls_back_to_the_id() -> None:
    docs = payloads(make_config(name=""))
    assert docs["benchhub_bench-1"]["device"]["name"] == "bench-1"


def test_every_payload_has_the_documented_required_keys() -> None:
    for doc in payloads(make_config()).values():
        assert doc["device"]["identifiers"]
        assert doc["origin"]["name"] == "benchhub"
        assert doc["origin"]["sw_version"] == VERSION
        for key in components(doc):
            comp = effective(doc, key)
            assert re.fullmatch(r"[a-zA-Z0-9_-]+", key), key
            assert comp["qos"] == 1, key
            # HA: `availability` and `availability_topic` must not be used together.
            assert not ("availability" in comp and "availability_topic" in comp), key
            assert comp["platform"] in {"sensor", "binary_sensor", "button"}, key
            assert comp["unique_id"], key
            if comp["platform"] in {"sensor", "binary_sensor"}:
                assert comp["state_topic"], key
            if comp["platform"] == "button":
                assert comp["command_topic"], key
                assert comp["payload_press"], key
            # `options` is only allowed on enum sensors, never with a unit or a state class.
            if "options" in comp:
                assert comp["device_class"] == "enum"
                assert "unit_of_measurement" not in comp
                assert "state_class" not in comp


def test_unique_ids_are_unique_across_a_two_hub_station() -> None:
    ids = [comp["unique_id"] for doc in payloads(make_config()).values() for comp in components(doc).values()]
    assert len(ids) == len(set(ids))
    assert "benchhub_bench-1_hub-a_p1_phase" in ids
    assert "benchhub_bench-1_hub-b_p3_power_cycle" in ids


def test_every_port_is_announced_on_its_hub() -> None:
    docs = payloads(make_config())
    for hub, ports in (("hub-a", 2), ("hub-b", 3)):
        comps = components(docs[f"benchhub_bench-1_{hub}"])
        phases = sorted(k for k, c in comps.items() if c.get("device_class") == "enum")
        assert phases == [f"p{n}_phase" for n in range(1, ports + 1)]


def test_hubs_hang_off_the_station_device() -> None:
    docs = payloads(make_config())
    station_id = docs["benchhub_bench-1"]["device"]["identifiers"][0]
    for hub in ("hub-a", "hub-b"):
        device = docs[f"benchhub_bench-1_{hub}"]["device"]
        assert device["identifiers"] == [f"benchhub_bench-1_{hub}"]
        assert device["via_device"] == station_id


def test_port_entities_need_both_station_and_hub_online() -> None:
    config = make_config()
    topics = topics_for(config)
    doc = payloads(config)["benchhub_bench-1_hub-b"]
    ports = [key for key in components(doc) if key.startswith("p")]
    assert len(ports) == 3 * 6
    for key in ports:
        comp = effective(doc, key)
        assert [a["topic"] for a in comp["availability"]] == [topics.status, topics.hub_status("hub-b")], key
        assert all(a["payload_available"] == "online" for a in comp["availability"])
        assert all(a["payload_not_available"] == "offline" for a in comp["availability"])
        assert comp["availability_mode"] == "all"
        assert "availability_topic" not in comp  # HA: must not be used together with `availability`


def test_connectivity_sensors_report_what_the_others_are_gated_on() -> None:
    config = make_config()
    topics = topics_for(config)
    docs = payloads(config)
    status = effective(docs["benchhub_bench-1"], "status")
    assert status["state_topic"] == topics.status
    assert (status["payload_on"], status["payload_off"]) == ("online", "offline")
    assert "availability" not in status
    assert "availability_topic" not in status
    link = effective(docs["benchhub_bench-1_hub-a"], "link")
    assert link["state_topic"] == topics.hub_status("hub-a")
    assert [a["topic"] for a in link["availability"]] == [topics.status]
    waiting = effective(docs["benchhub_bench-1"], "awaiting_assignment")
    assert waiting["state_topic"] == topics.awaiting_assignment
    assert [a["topic"] for a in waiting["availability"]] == [topics.status]


def test_phase_sensor_reads_the_scalar_topic_the_renderer_publishes() -> None:
    config = make_config()
    topics = topics_for(config)
    phase = components(payloads(config)["benchhub_bench-1_hub-a"])["p2_phase"]
    assert phase["state_topic"] == topics.port_phase(PortRef("hub-a", 2))
    assert phase["state_topic"].endswith("/hub/hub-a/port/2/state/phase")
    assert "value_template" not in phase
    assert phase["options"] == [p.value for p in Phase]
    assert set(phase["options"]) == {p.value for p in Phase}


def test_phase_sensor_topic_carries_what_the_renderer_publishes_there() -> None:
    """HA's enum sensor rejects anything outside `options`: the message the station retains on the
    sensor's state topic must be a bare phase word."""
    config = make_config()
    topics = topics_for(config)
    comps = components(payloads(config)["benchhub_bench-1_hub-a"])
    renderer = PayloadRenderer(topics)
    for phase in Phase:
        published = {m.topic: m.payload for m in renderer.snapshot(PortState(PortRef("hub-a", 1), phase))}
        assert published[comps["p1_phase"]["state_topic"]].decode() in comps["p1_phase"]["options"]
        state_doc = json.loads(published[comps["p1_progress"]["state_topic"]])
        assert "progress" in state_doc
        assert "serial" in state_doc


def test_progress_and_serial_read_the_json_state_document() -> None:
    config = make_config()
    topics = topics_for(config)
    comps = components(payloads(config)["benchhub_bench-1_hub-a"])
    progress, serial = comps["p1_progress"], comps["p1_serial"]
    assert progress["state_topic"] == serial["state_topic"] == topics.port_state(PortRef("hub-a", 1))
    assert progress["unit_of_measurement"] == "%"
    assert "value_json.progress" in progress["value_template"]
    assert "value_json.serial" in serial["value_template"]


def test_buttons_publish_valid_commands_to_the_port_set_topic() -> None:
    config = make_config()
    topics = topics_for(config)
    comps = components(payloads(config)["benchhub_bench-1_hub-b"])
    buttons = {k: c for k, c in comps.items() if c["platform"] == "button"}
    assert sorted(buttons) == sorted(
        f"p{n}_{a}" for n in (1, 2, 3) for a in ("retry", "abort", "power_cycle")
    )
    rules = CommandRules(actions=config.mqtt.commands.actions, token=None, has_port=lambda ref: True)
    for key, button in buttons.items():
        n, action = re.fullmatch(r"p(\d+)_(\w+)", key).groups()  # type: ignore[union-attr]
        ref = PortRef("hub-b", int(n))
        assert button["command_topic"] == topics.port_set(ref)
        assert json.loads(button["payload_press"]) == {"action": action}
        assert button["retain"] is False
        # The station's own parser accepts exactly what the button sends.
        command = parse_command(topics, button["command_topic"], button["payload_press"].encode(), rules)
        assert (command.ref, command.action) == (ref, action)


def test_only_allowed_actions_become_buttons() -> None:
    comps = components(
        payloads(make_config(mqtt={"commands": {"actions": ["abort", "skip"]}}))["benchhub_bench-1_hub-a"]
    )
    assert sorted(k for k, c in comps.items() if c["platform"] == "button") == ["p1_abort", "p2_abort"]


@pytest.mark.parametrize(
    "commands",
    [{"enabled": False}, {"token_file": "/etc/benchhub/command-token"}, {"token_file": "credential:token"}],
)
def test_no_buttons_when_commands_are_off_or_need_a_token(commands: dict[str, Any]) -> None:
    docs = payloads(make_config(mqtt={"commands": commands}))
    platforms = {c["platform"] for doc in docs.values() for c in components(doc).values()}
    assert "button" not in platforms
    assert "sensor" in platforms  # the rest is still announced
    text = json.dumps(docs)
    assert "command-token" not in text
    assert "credential:" not in text


def test_disabled_integration_announces_nothing() -> None:
    config = make_config(mqtt={"homeassistant": {"enabled": False}})
    assert discovery_messages(config, topics_for(config), VERSION) == []


def test_custom_discovery_prefix() -> None:
    config = make_config(mqtt={"homeassistant": {"prefix": "ha-test"}})
    messages = discovery_messages(config, topics_for(config), VERSION)
    assert {m.topic.split("/")[0] for m in messages} == {"ha-test"}


def test_payload_bytes_are_stable() -> None:
    config = make_config()
    first = discovery_messages(config, topics_for(config), VERSION)
    assert first == discovery_messages(config, topics_for(config), VERSION)


def test_removal_payloads_are_empty_and_retained() -> None:
    messages = removal_messages("homeassistant", "bench-1", ["hub-c", "hub-d"])
    assert [m.topic for m in messages] == [
        "homeassistant/device/benchhub_bench-1_hub-c/config",
        "homeassistant/device/benchhub_bench-1_hub-d/config",
    ]
    assert all(m.payload == b"" and m.retain and m.qos == 1 for m in messages)
    with_station = removal_messages("homeassistant", "bench-1", [], include_station=True)
    assert [m.topic for m in with_station] == [discovery_topic("homeassistant", "benchhub_bench-1")]


def test_removal_targets_the_topics_discovery_used() -> None:
    config = make_config()
    announced = {m.topic for m in discovery_messages(config, topics_for(config), VERSION)}
    removed = {
        m.topic
        for m in removal_messages("homeassistant", "bench-1", ["hub-a", "hub-b"], include_station=True)
    }
    assert removed == announced


def test_home_assistant_birth_message() -> None:
    assert is_ha_online("homeassistant/status", b"online", "homeassistant")
    assert not is_ha_online("homeassistant/status", b"offline", "homeassistant")
    assert not is_ha_online("benchhub/bench-1/status", b"online", "homeassistant")
    assert is_ha_online("ha-test/status", b"online", "ha-test")
    assert is_ha_online("homeassistant/status", b"online", "ha-test")  # HA's default birth topic
    assert ha_status_topics("homeassistant") == ("homeassistant/status",)
