"""What MQTT subscribers see of a running station, through a real Mosquitto."""

from __future__ import annotations

import json
import time
from pathlib import Path

import aiomqtt

from daemon.config import parse_config
from daemon.workflow.phases import Phase
from tests.conftest import eventually, running, station_config
from tests.mqtt_broker import Mosquitto, retained_messages


async def test_late_subscriber_sees_the_latest_state_of_every_port(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = station_config(tmp_path, mosquitto, devices=6, ports=8)
    data = config.model_dump(mode="json", exclude_none=True)
    data["mqtt"]["colors"] = {"done": "lime"}  # overrides one phase, keeps the others
    config = parse_config(data, tmp_path)
    base = "benchhub/demo"
    async with running(config) as station:
        await eventually(
            lambda: sum(s.phase is Phase.DONE for s in station.ports()) == 6, what="six devices done"
        )
        await eventually(lambda: station.store.outbox_size() == 0, what="outbox drained")
        ports = range(1, 9)
        expect = {f"{base}/status", f"{base}/hub/hub-a/status"}
        expect |= {f"{base}/hub/hub-a/port/{n}/state" for n in ports}
        expect |= {f"{base}/hub/hub-a/port/{n}/state/phase" for n in ports}
        expect |= {f"{base}/hub/hub-a/port/{n}/state/color" for n in ports}
        seen = await retained_messages(mosquitto.host, mosquitto.port, f"{base}/#", expect)
        assert expect <= seen.keys()
        assert seen[f"{base}/status"] == b"online"
        assert seen[f"{base}/hub/hub-a/status"] == b"online"
        for state in station.ports():
            doc = json.loads(seen[f"{base}/hub/hub-a/port/{state.ref.port}/state"])
            assert doc["phase"] == state.phase.value
            assert doc["seq"] == state.seq
            assert seen[f"{base}/hub/hub-a/port/{state.ref.port}/state/phase"] == state.phase.value.encode()
            color = {Phase.DONE: b"lime", Phase.EMPTY: b"off"}[state.phase]
            assert seen[f"{base}/hub/hub-a/port/{state.ref.port}/state/color"] == color
            if state.phase is Phase.DONE:
                assert state.device is not None
                assert doc["serial"] == state.device.serial
                assert doc["udid"] == state.device.udid
                assert doc["ios"] == state.device.ios_version
                assert doc["error"] is None
    # After a clean stop the station says so itself (a will only covers unclean exits).
    seen = await retained_messages(mosquitto.host, mosquitto.port, f"{base}/status", {f"{base}/status"})
    assert seen[f"{base}/status"] == b"offline"


async def retained_when_there(broker: Mosquitto, topics: set[str], within: float = 15.0) -> dict[str, bytes]:
    """The retained payloads of `topics` once all are on the broker (a busy machine may take a while)."""
    deadline = time.monotonic() + within
    while True:
        seen = await retained_messages(broker.host, broker.port, "homeassistant/#", topics, within=1.0)
        if topics <= {t for t, payload in seen.items() if payload}:
            return seen
        assert time.monotonic() < deadline, f"not retained in time: {topics - seen.keys()}"


async def test_home_assistant_discovery_is_announced_and_renewed(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = station_config(tmp_path, mosquitto, devices=1, ports=4)
    station_topic = "homeassistant/device/benchhub_demo/config"
    hub_topic = "homeassistant/device/benchhub_demo_hub-a/config"
    async with running(config):
        seen = await retained_when_there(mosquitto, {station_topic, hub_topic})
        hub = json.loads(seen[hub_topic])
        assert hub["device"]["via_device"] == "benchhub_demo"
        phase = hub["components"]["p1_phase"]
        assert phase["unique_id"] == "benchhub_demo_hub-a_p1_phase"
        assert phase["state_topic"] == "benchhub/demo/hub/hub-a/port/1/state/phase"
        # Home Assistant restarts without its retained discovery (say, a new broker): it announces
        # itself and the station sends discovery again (after a random delay of up to 2 s).
        async with aiomqtt.Client(mosquitto.host, mosquitto.port, identifier="home-assistant") as ha:
            await ha.publish(hub_topic, b"", qos=1, retain=True)
            await ha.publish("homeassistant/status", b"online", qos=1)
        again = await retained_when_there(mosquitto, {hub_topic})
        assert json.loads(again[hub_topic]) == hub


async def test_a_hub_that_leaves_the_config_leaves_home_assistant(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = station_config(tmp_path, mosquitto, devices=0, ports=4)
    data = config.model_dump(mode="json", exclude_none=True)
    data["hubs"].append({**data["hubs"][0], "id": "hub-b", "usb_path": "2-1"})
    two_hubs = parse_config(data, tmp_path)
    gone = "homeassistant/device/benchhub_demo_hub-b/config"
    async with running(two_hubs):
        await retained_when_there(mosquitto, {gone})
    async with running(config) as station:  # hub-b was unplugged from the bench and the config
        await eventually(
            lambda: station.store.outbox_size() == 0 and "hub-b" not in station.store.hub_statuses()
        )
        seen = await retained_messages(mosquitto.host, mosquitto.port, "#", {"(all of them)"}, within=1.5)
    assert gone not in seen
    assert "benchhub/demo/hub/hub-b/status" not in seen
    assert "homeassistant/device/benchhub_demo_hub-a/config" in seen
