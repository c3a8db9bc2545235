"""A station without [sim]: real device services (pymobiledevice3, IPSW cache) and the USB watcher on
the host's usbmuxd, here a fake usbmuxd socket, since this machine has no iPhones."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from daemon.config import ConfigError, parse_config
from daemon.devicesetup import NoAppleServices, real_backend
from daemon.ios.cfgutil import CfgutilBackend
from daemon.ios.firmware import IpswCache
from daemon.ios.pmd3 import Pymobiledevice3Backend
from daemon.sim.usbmuxd import FakeUsbmuxd
from tests.conftest import eventually, running
from tests.mqtt_broker import Mosquitto


async def test_a_real_bench_uses_pymobiledevice3_and_the_configured_usbmuxd(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    socket_dir = Path(tempfile.mkdtemp(prefix="bh-"))
    (tmp_path / "ipsw").mkdir()
    config = parse_config(
        {
            "station": {"id": "bench-1"},
            "hubs": [
                {"id": "hub-a", "kind": "cambrionix", "serial_port": str(tmp_path / "no-tty"), "ports": 15}
            ],
            "workflow": {"steps": ["update", "erase", "setup"]},
            "firmware": {"ipsw_dir": "ipsw"},
            "devices": {"usbmuxd": str(socket_dir / "usbmuxd"), "hotplug": "poll"},
            "mqtt": {"url": mosquitto.url},
            "storage": {"path": "bench.sqlite3"},
        },
        tmp_path,
    )
    async with FakeUsbmuxd(socket_dir / "usbmuxd"), running(config) as station:
        assert station.world is None
        assert isinstance(station.services.backend, Pymobiledevice3Backend)
        assert station.services.backend.pair_records == tmp_path / "pair-records"
        assert isinstance(station.services.firmware, IpswCache)
        assert isinstance(station.services.enroller, NoAppleServices)
        watcher = station.watcher
        assert watcher is not None
        await eventually(lambda: watcher.usbmux.connected, what="listening on the configured usbmuxd")
        # The hub's serial port does not exist: the station runs on, reporting the hub offline.
        assert station.store.hub_statuses().get("hub-a") is not True


def test_a_mac_station_can_use_apple_configurators_cfgutil(tmp_path: Path) -> None:
    base = {
        "station": {"id": "mac-1"},
        "hubs": [{"id": "hub-a", "kind": "usbhub", "usb_path": "1-1", "ports": 4}],
        "workflow": {"steps": ["erase", "setup"]},
        "devices": {"backend": "cfgutil", "cfgutil": "/usr/local/bin/cfgutil"},
    }
    backend = real_backend(parse_config(base, tmp_path))
    assert isinstance(backend, CfgutilBackend)
    assert backend.argv_prefix == ("/usr/local/bin/cfgutil",)
    with pytest.raises(ConfigError, match=r"devices\.backend: the update step needs the pymobiledevice3"):
        parse_config({**base, "workflow": {"steps": ["update", "erase", "setup"]}}, tmp_path)
