"""What MQTT subscribers see of a running station, through a real Mosquitto."""

from __future__ import annotations

import json
from pathlib import Path

from daemon.workflow.phases import Phase
from tests.conftest import eventually, running, station_config
from tests.mqtt_broker import Mosquitto, retained_messages


async def test_late_subscriber_sees_the_latest_state_of_every_port(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    config = station_config(tmp_path, mosquitto, devices=6, ports=8)
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
        seen = await retained_messages(mosquitto.host, mosquitto.port, f"{base}/#", expect)
        assert expect <= seen.keys()
        assert seen[f"{base}/status"] == b"online"
        assert seen[f"{base}/hub/hub-a/status"] == b"online"
        for state in station.ports():
            doc = json.loads(seen[f"{base}/hub/hub-a/port/{state.ref.port}/state"])
            assert doc["phase"] == state.phase.value
            assert doc["seq"] == state.seq
            assert seen[f"{base}/hub/hub-a/port/{state.ref.port}/state/phase"] == state.phase.value.encode()
            if state.phase is Phase.DONE:
                assert state.device is not None
                assert doc["serial"] == state.device.serial
                assert doc["udid"] == state.device.udid
                assert doc["ios"] == state.device.ios_version
                assert doc["error"] is None
    # After a clean stop the station says so itself (a will only covers unclean exits).
    seen = await retained_messages(mosquitto.host, mosquitto.port, f"{base}/status", {f"{base}/status"})
    assert seen[f"{base}/status"] == b"offline"
