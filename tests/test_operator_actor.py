"""An operator's retry is an operator action in the history, and so in `benchhub report`.

The audit trail lists what people did to a device from the history rows with actor "operator";
a retry recorded as the workflow's own would vanish from it, indistinguishable from an automatic
retry after a transient error.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.models import PortRef
from daemon.sim.faults import Fault, FaultKind
from daemon.station import build_sim_world
from daemon.workflow.actions import Action
from daemon.workflow.phases import Phase
from tests.conftest import eventually, running, station_config
from tests.mqtt_broker import Mosquitto

A1 = PortRef("hub-a", 1)


async def test_an_operator_retry_is_recorded_and_reported_as_the_operators(
    tmp_path: Path, mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    config = station_config(tmp_path, mosquitto, devices=1)
    world = build_sim_world(config)
    # Unplugged during setup and back with a state nobody can verify: needs attention, as in
    # tests/test_workflow.py; the operator checks the device and retries the step.
    world.inject(Fault("setup", FaultKind.UNPLUG, A1, at=0.5))
    async with running(config, world) as station:
        await eventually(lambda: station.store.port(A1).phase is Phase.INTERRUPTED, what="interrupted")
        device = next(iter(world.devices.values()))
        world.inject(Fault("setup-check", FaultKind.UNKNOWN, A1))
        world.plug(A1, device)
        await eventually(
            lambda: station.store.port(A1).phase is Phase.NEEDS_ATTENTION, what="needs attention"
        )
        before = len(station.store.history(ref=A1))
        assert await station.act(A1, Action.RETRY) == "retrying setup"
        await eventually(lambda: station.store.port(A1).phase is Phase.DONE, what="done after retry")
        retried = station.store.history(ref=A1)[before:]

    first = retried[0]
    assert first.step == "setup"
    assert first.attempt == 1
    assert first.actor == "operator"
    assert first.extra.get("retried_by_operator") == "setup"
    # Only the operator's row is theirs: what the workflow does next is its own.
    assert all(row.actor == "workflow" for row in retried[1:])

    config_file = tmp_path / "station.toml"
    config_file.write_text(
        f'[station]\nid = "demo"\n[[hubs]]\nid = "hub-a"\nkind = "sim"\nports = 8\n'
        f'[storage]\npath = "{config.storage.path}"\n[sim]\n'
    )
    capsys.readouterr()
    assert main(["report", "--config", str(config_file), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    (row,) = [r for r in rows if r["device"]["serial"] == device.serial]
    assert [a["action"] for a in row["operator_actions"]] == ["retry setup"]
