"""A station without [sim]: real device services (pymobiledevice3, IPSW cache) and the USB watcher on
the host's usbmuxd, here a fake usbmuxd socket, since this machine has no iPhones."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from daemon.apple.abm_client import AbmClient
from daemon.config import ConfigError, parse_config
from daemon.devicesetup import real_backend
from daemon.ios.cfgutil import CfgutilBackend
from daemon.ios.firmware import IpswCache
from daemon.ios.pmd3 import Pymobiledevice3Backend
from daemon.sim.apple import FakeAppleBusiness
from daemon.sim.http import HttpServer
from daemon.sim.usbmuxd import FakeUsbmuxd
from daemon.station import Station
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
        assert station.services.apple is None  # no [apple]: the config kept enroll and assign out
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


def _apple_bench(tmp_path: Path, apple: dict[str, object]) -> dict[str, object]:
    return {
        "station": {"id": "bench-1"},
        "hubs": [{"id": "hub-a", "kind": "usbhub", "usb_path": "1-1", "ports": 4}],
        "workflow": {"steps": ["erase", "enroll", "assign", "setup"], "mdm_server": "Example MDM"},
        "apple": apple,
        "storage": {"path": "bench.sqlite3"},
    }


async def test_a_real_bench_asks_apple_through_the_configured_api_account(tmp_path: Path) -> None:
    fake = FakeAppleBusiness()
    fake.add_mdm_server("Example MDM")
    creds = fake.new_api_account()
    (tmp_path / "abm-key.pem").write_bytes(creds.private_key_pem)
    async with HttpServer(fake.handle) as server:
        config = parse_config(
            _apple_bench(
                tmp_path,
                {
                    "client_id": creds.client_id,
                    "key_id": creds.key_id,
                    "private_key_file": "abm-key.pem",
                    "api_url": server.url,
                    "token_url": f"{server.url}/auth/oauth2/token",
                },
            ),
            tmp_path,
        )
        station = Station(config)
        tracker = station.services.apple
        assert tracker is not None
        assert isinstance(tracker.abm, AbmClient)
        assert tracker.target == "Example MDM"
        assert await tracker.in_organisation("F2LNOTHERE01") is False
        fake.add_device("F2LNOTHERE01")
        assert await tracker.in_organisation("F2LNOTHERE01") is True
        assert not await tracker.assigned("F2LNOTHERE01")  # parked on Apple Configurator's server
        await tracker.abm.close()
        station.store.close()


def test_an_unusable_key_file_is_one_line_at_startup(tmp_path: Path) -> None:
    (tmp_path / "abm-key.pem").write_text("not a key")
    config = parse_config(
        _apple_bench(
            tmp_path,
            {
                "client_id": "BUSINESSAPI.9703f56c-10ce-4876-8f59-e78e5e23a152",
                "key_id": "d136aa66-0c3b-4bd4-9892-c20e8db024ab",
                "private_key_file": "abm-key.pem",
            },
        ),
        tmp_path,
    )
    with pytest.raises(ConfigError) as caught:
        Station(config)
    assert len(caught.value.lines) == 1
    assert caught.value.lines[0].startswith("apple.private_key_file")
    assert "not a PEM private key" in caught.value.lines[0]


def test_apple_steps_on_a_real_bench_need_an_api_account(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"apple\.client_id: the enroll step watches devices arrive"):
        parse_config(_apple_bench(tmp_path, {}), tmp_path)
    bench = _apple_bench(tmp_path, {"client_id": "BUSINESSAPI.x1", "key_id": "k"})
    with pytest.raises(ConfigError, match=r"apple\.private_key_file: the API account's private key"):
        parse_config(bench, tmp_path)
    bench = _apple_bench(tmp_path, {"dep_token_file": "dep.json", "auto_assign": "Example MDM"})
    with pytest.raises(ConfigError, match=r"apple\.auto_assign: assigning devices needs"):
        parse_config(bench, tmp_path)
