"""The station on simulated Cambrionix hubs: the real driver over a pty, ports mapped through `bd`."""

from __future__ import annotations

from pathlib import Path

from daemon.models import PortRef
from daemon.sim.faults import Fault, FaultKind
from daemon.station import build_sim_world
from daemon.workflow.actions import Action
from daemon.workflow.phases import Phase
from tests.conftest import eventually, running, station_config
from tests.mqtt_broker import Mosquitto


async def test_every_port_of_a_pp15s_is_found_through_its_bd_map(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = station_config(tmp_path, mosquitto, devices=15, hub_model="PP15S")
    async with running(config) as station:
        await eventually(lambda: all(s.phase is Phase.DONE for s in station.ports()), "15 ports done")
        # The world wires port 15 to internal USB path 2.1 (and so on); the station only learned
        # that from the hub's `bd` answer. Every device must have ended on the port it sits in.
        for state in station.ports():
            assert state.device is not None
            ecid = int(state.device.ecid or "0", 16)
            assert station.world.port_of(ecid) == state.ref
        assert station.topology.usb_path(PortRef("hub-a", 15)).endswith(".2.1")


async def test_unplug_is_seen_by_the_hub_and_power_cycle_uses_mode_off(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = station_config(tmp_path, mosquitto, devices=1, hub_model="U16S", sim={"assign_delay": 1e9})
    world = build_sim_world(config)
    a1 = PortRef("hub-a", 1)
    world.inject(Fault("enroll", FaultKind.UNPLUG, a1, at=0.5))
    async with running(config, world) as station:
        await eventually(lambda: station.store.port(a1).phase is Phase.INTERRUPTED, "interrupted")
        device = next(iter(world.devices.values()))
        world.plug(a1, device)
        await eventually(lambda: station.store.port(a1).phase is Phase.AWAITING_ASSIGNMENT, "resumed")
        assert await station.act(a1, Action.ABORT) == "aborted"
        simulator = station.hubs.simulated["hub-a"].simulator
        assert await station.act(a1, Action.POWER_CYCLE) == "port power-cycled"
        # The hub reported the port off (detached), the device left USB, and came back with power.
        await eventually(
            lambda: station.store.port(a1).phase is Phase.AWAITING_ASSIGNMENT, "back after cycle"
        )
        phases = [h.phase for h in station.store.history(ref=a1)]
        assert phases[-3:] == [Phase.EMPTY, Phase.DETECTED, Phase.AWAITING_ASSIGNMENT]
        assert simulator.violations == []  # never two commands in flight on the wire


async def test_hub_link_loss_and_return(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = station_config(tmp_path, mosquitto, devices=2, hub_model="PP8S")
    async with running(config) as station:
        await eventually(lambda: station.store.hub_statuses().get("hub-a") is True, "hub online")
        station.world.set_hub_online("hub-a", False)
        await eventually(lambda: station.store.hub_statuses()["hub-a"] is False, "hub offline")
        station.world.set_hub_online("hub-a", True)
        await eventually(lambda: station.store.hub_statuses()["hub-a"] is True, "hub back", within=20)
        await eventually(
            lambda: sum(s.phase is Phase.DONE for s in station.ports()) == 2, "both devices finished"
        )


async def test_hub_leds_follow_the_phase_map(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = station_config(tmp_path, mosquitto, devices=2, hub_model="U16S")  # demo map: done = solid
    async with running(config) as station:
        await eventually(lambda: sum(s.phase is Phase.DONE for s in station.ports()) == 2, "two done")
        engine = station.hubs.simulated["hub-a"].simulator.engine
        solid = 0b11111111
        await eventually(lambda: engine.ports[0].leds.get(1) == solid, "port 1 LED solid")
        await eventually(lambda: engine.ports[1].leds.get(1) == solid, "port 2 LED solid")
        assert engine.ports[5].leds == {}  # an empty port's LED was never touched
