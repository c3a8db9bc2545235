"""The Apple part of a station's workflow, end to end: the technician asked (light, state, log),
enrollment and assignment seen through the Apple Business API over HTTP, the waiting list on MQTT
and in `benchhub report`, auto-assignment, and no secret in any log line."""

from __future__ import annotations

import json
from pathlib import Path

import structlog

from daemon.cli import main
from daemon.models import PortRef
from daemon.station import Station, build_sim_world
from daemon.workflow.actions import Action
from daemon.workflow.phases import Phase
from tests.conftest import eventually, running, station_config
from tests.mqtt_broker import Mosquitto, retained_messages

A1 = PortRef("hub-a", 1)
FAST_BLINK = 0b10101010  # the Cambrionix LED bits of LedPattern.FAST_BLINK


def all_done(station: Station) -> bool:
    occupied = [s for s in station.ports() if s.phase is not Phase.EMPTY]
    return bool(occupied) and all(s.phase is Phase.DONE for s in occupied)


async def test_the_technician_is_asked_at_the_port_and_the_device_is_seen_arriving(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = station_config(tmp_path, mosquitto, devices=1, hub_model="U16S", sim={"configurator_delay": 1e9})
    async with running(config) as station:
        await eventually(lambda: bool(station.desk.open_requests()), what="a request for the technician")
        (request,) = station.desk.open_requests()
        state = station.store.port(A1)
        assert state.phase is Phase.ENROLLING
        assert state.device is not None
        assert request.serial == state.device.serial
        assert f"port {A1}, serial {request.serial}" in request.instruction
        await eventually(
            lambda: "needs a technician" in (station.store.port(A1).detail or ""), "state says so"
        )
        engine = station.hubs.simulated["hub-a"].simulator.engine
        await eventually(lambda: engine.ports[0].leds.get(1) == FAST_BLINK, "port light asks for hands")
        # The technician adds it with Configurator (here: straight into the simulated organisation).
        assert station.world is not None
        station.world.apple.add_device(request.serial)
        await eventually(lambda: station.store.port(A1).phase is not Phase.ENROLLING, "enrolled")
        assert station.desk.open_requests() == []
        await eventually(lambda: all_done(station), "done")


async def test_skip_mode_verifies_and_never_asks(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = station_config(tmp_path, mosquitto, devices=2, workflow={"enrollment": "skip"})
    async with running(config) as station:
        assert station.world is not None
        first = station.world.devices[station.world.slots[A1].device or 0]
        station.world.apple.add_device(first.serial)  # bought through Apple: already in the organisation
        await eventually(
            lambda: station.store.port(PortRef("hub-a", 2)).phase is Phase.NEEDS_ATTENTION, "stranger flagged"
        )
        await eventually(lambda: station.store.port(A1).phase is Phase.DONE, "known device done")
        stranger = station.store.port(PortRef("hub-a", 2))
        assert stranger.error is not None
        assert stranger.error.code == "not_in_organisation"
        assert 'enrollment is "skip"' in stranger.error.message
        assert station.desk.open_requests() == []
        assert first.completed["enroll"] == 0


async def test_waiting_serials_are_listed_on_mqtt_and_in_the_report(
    tmp_path: Path, mosquitto: Mosquitto, capsys: object
) -> None:
    config = station_config(tmp_path, mosquitto, devices=3, sim={"assign_delay": 1e9})
    topic = "benchhub/demo/apple/awaiting_assignment"
    async with running(config) as station:
        await eventually(
            lambda: sum(s.phase is Phase.AWAITING_ASSIGNMENT for s in station.ports()) == 3, "three waiting"
        )
        serials = {s.device.serial for s in station.ports() if s.device is not None}
        await eventually(lambda: station.store.outbox_size() == 0, what="outbox drained")
        seen = await retained_messages(mosquitto.host, mosquitto.port, topic, {topic})
        document = json.loads(seen[topic])
        assert document["count"] == 3
        assert {row["serial"] for row in document["serials"]} == serials
        assert {row["port"] for row in document["serials"]} == {"hub-a/1", "hub-a/2", "hub-a/3"}
        # The administrator assigns one in the portal: it leaves the list.
        assert station.world is not None
        apple = station.world.apple
        first = document["serials"][0]["serial"]
        apple.portal_assign(first, apple.server_id("benchhub MDM"))
        await eventually(lambda: sum(s.phase is Phase.DONE for s in station.ports()) == 1, "one done")
        await eventually(lambda: station.store.outbox_size() == 0, what="outbox drained")
        seen = await retained_messages(mosquitto.host, mosquitto.port, topic, {topic})
        assert {row["serial"] for row in json.loads(seen[topic])["serials"]} == serials - {first}
    config_file = tmp_path / "station.toml"
    config_file.write_text(
        f'[station]\nid = "demo"\n[[hubs]]\nid = "hub-a"\nkind = "sim"\nports = 8\n'
        f'[storage]\npath = "{config.storage.path}"\n[sim]\n'
    )
    capsys.readouterr()  # type: ignore[attr-defined]  # the station's own log lines
    assert main(["report", "--config", str(config_file), "--waiting"]) == 0
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert {line.split("\t")[0] for line in out.splitlines()} == serials - {first}


async def test_auto_assign_moves_devices_without_the_portal(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = station_config(
        tmp_path,
        mosquitto,
        devices=6,
        sim={"assign_delay": 1e9},  # the administrator never comes
        workflow={"mdm_server": ""},
        apple={"auto_assign": "benchhub MDM"},
    )
    async with running(config) as station:
        await eventually(lambda: all_done(station), "done without anyone in the portal")
        assert station.world is not None
        requests = station.apple.servers[0].requests
        posts = [t for m, t in requests if m == "POST" and t.startswith("/v1/orgDeviceActivities")]
        assert 1 <= len(posts) <= 6  # batched per polling round, never one per device per round


async def test_no_secret_reaches_a_log_line(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = station_config(tmp_path, mosquitto, devices=2)
    with structlog.testing.capture_logs() as logs:
        async with running(config) as station:
            await eventually(lambda: all_done(station), "done")
            assert station.world is not None
            snapshot = station.world.apple.snapshot()
    secrets = [a["private_pem"] for a in snapshot["accounts"]] + list(snapshot["tokens"])
    secrets += [line for s in list(secrets) for line in s.splitlines() if len(line) > 40]
    assert secrets
    text = "\n".join(repr(entry) for entry in logs)
    assert "abm_token_minted" in text  # the token was fetched and logged about
    for secret in secrets:
        assert secret not in text


async def test_nobody_adding_the_device_needs_attention_with_the_reason(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = station_config(
        tmp_path,
        mosquitto,
        devices=1,
        workflow={"enrollment": "external", "policy": {"enroll": {"timeout": 3.0}}},
    )
    async with running(config) as station:
        await eventually(lambda: station.store.port(A1).phase is Phase.NEEDS_ATTENTION, "needs attention")
        state = station.store.port(A1)
        assert state.step == "enroll"
        assert state.error is not None
        assert state.error.code == "timeout"
        assert "adding the device to Apple Business Manager did not happen within 3 s" in state.error.message
        # Added at last (by whoever): the operator retries and the device finishes.
        assert station.world is not None
        assert state.device is not None
        assert state.device.serial
        station.world.apple.add_device(state.device.serial)
        await station.act(A1, Action.RETRY)
        await eventually(lambda: all_done(station), "done after retry")


async def test_an_apple_outage_in_skip_mode_is_waited_out_not_taken_for_absence(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = station_config(tmp_path, mosquitto, devices=1, workflow={"enrollment": "skip"})
    world = build_sim_world(config)
    async with running(config, world) as station:
        await eventually(lambda: world.slots[A1].device is not None, "plugged")
        device = world.devices[world.slots[A1].device or 0]
        world.apple.add_device(device.serial)  # bought through Apple: in the organisation
        world.apple.fail_next(6, 503, html=True)  # ... but Apple is down when the port asks
        await eventually(lambda: all_done(station), "done once Apple answers")
        assert not any(r.phase is Phase.NEEDS_ATTENTION for r in station.store.history(ref=A1))
        assert world.apple.counts["api"] >= 7  # the six failures were met, then answered
    assert device.completed["enroll"] == 0
