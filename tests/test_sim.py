"""The simulated bench itself: believable devices, persistence, firmware choice, the demo technician."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from daemon.models import PortRef
from daemon.sim.backend import SimFirmware
from daemon.sim.catalog import MODELS_BY_TYPE
from daemon.sim.demo import technician
from daemon.sim.devices import make_device
from daemon.sim.world import build_world
from daemon.workflow.phases import Phase
from tests.conftest import eventually, running, station_config
from tests.mqtt_broker import Mosquitto

NEW_UDID = re.compile(r"^[0-9A-F]{8}-[0-9A-F]{16}$")
OLD_UDID = re.compile(r"^[0-9a-f]{40}$")


def test_devices_are_deterministic_and_realistic() -> None:
    devices = [make_device(seed=7, index=i) for i in range(200)]
    assert devices[3] == make_device(seed=7, index=3)
    assert len({d.ecid for d in devices}) == 200
    for d in devices:
        model = MODELS_BY_TYPE[d.product_type]
        if model.new_udid:
            assert NEW_UDID.match(d.udid), d.udid
            assert d.udid.endswith(d.ecid_hex)  # new-style UDIDs embed the ECID
            assert d.udid.startswith(f"{model.chip_id:08X}")
        else:
            assert OLD_UDID.match(d.udid), d.udid
        assert len(d.serial) in (10, 12)
        assert int(d.ios_version.split(".")[0]) <= model.max_major
    assert {MODELS_BY_TYPE[d.product_type].new_udid for d in devices} == {True, False}


def test_minimum_major_only_picks_models_that_can_get_there() -> None:
    for i in range(100):
        assert MODELS_BY_TYPE[make_device(1, i, minimum_major=26).product_type].max_major >= 26


async def test_firmware_choice() -> None:
    firmware = SimFirmware()
    target = await firmware.target_for("iPhone12,1", "18.0")
    assert target is not None
    assert target.version == "26.1"  # the newest that satisfies the minimum
    assert await firmware.target_for("iPhone10,4", "18.0") is None  # an iPhone 8 stops at iOS 16
    xr = await firmware.target_for("iPhone11,8", "17.10")
    assert xr is not None
    assert xr.version == "18.6.2"  # 17.10 is compared as a number: 18.x satisfies it, 17.6 does not


def test_world_persists_devices_slots_and_the_organisation(tmp_path: Path) -> None:
    state = tmp_path / "world.json"
    world = build_world([("hub-a", 4, None, {})], speed=1, seed=3, assign_delay=5, state_file=state)
    ref = PortRef("hub-a", 2)
    device = world.new_device()
    world.plug(ref, device)
    device.completed["erase"] += 1
    world.apple.add_device(device.serial, via_configurator=True)
    world.save()
    again = build_world([("hub-a", 4, None, {})], speed=1, seed=3, assign_delay=5, state_file=state)
    assert again.in_organisation(device.serial)
    assert again.assigned_mdm_server(device.serial) is None  # parked on Configurator's server
    assert again.slots[ref].device == device.ecid
    assert again.devices[device.ecid].completed["erase"] == 1
    assert again.generated == 1
    assert again.usb_path(ref) == "1-1.2"


async def test_technician_keeps_the_bench_moving(tmp_path: Path, mosquitto: Mosquitto) -> None:
    config = station_config(tmp_path, mosquitto, devices=2, ports=4)
    async with running(config) as station:
        helper = asyncio.create_task(technician(station.world, config, station.ports, dwell=0.2))
        try:
            await eventually(
                lambda: len([d for d in station.store.devices() if d.phase is Phase.DONE]) >= 6,
                what="six devices provisioned one after another",
            )
        finally:
            helper.cancel()
        assert station.world.generated >= 6
