"""`benchhub doctor`: every configured hub opened with its real driver, failures explained."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from daemon.config import Config, parse_config
from daemon.doctor import (
    DISK_FAIL_BELOW,
    DISK_WARN_BELOW,
    GB,
    Check,
    DiskUsage,
    DiskUsageFn,
    check_apple,
    check_disk,
    check_ipsw,
    check_mqtt,
    check_state,
    check_usbmuxd,
)
from daemon.sim.apple import FakeAppleBusiness
from daemon.sim.http import HttpServer
from daemon.sim.usbmuxd import FakeUsbmuxd
from daemon.store import Store
from tests.mqtt_broker import Mosquitto, free_port, password_file, require_mosquitto

CONFIG = """
[station]
id = "doc"

[[hubs]]
id = "hub-a"
kind = "cambrionix"
simulate = "U16S"

[[hubs]]
id = "hub-b"
kind = "cambrionix"
serial_port = "{missing}"
ports = 15

[[hubs]]
id = "hub-c"
kind = "datamation"
usb_path = "9-9"
ports = 10

[sim]

[storage]
path = "bench.sqlite3"
"""


def doctor(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon", "doctor", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_doctor_reports_every_hub_and_explains_failures(tmp_path: Path) -> None:
    config = tmp_path / "station.toml"
    config.write_text(CONFIG.format(missing=tmp_path / "ttyUSB-gone"))
    proc = doctor(config)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    hub_a = next(line for line in lines if "hub hub-a" in line)
    assert hub_a.startswith("ok ")
    assert "U16S" in hub_a
    assert "16 ports" in hub_a
    assert "port_led" in hub_a
    assert "port_power" in hub_a
    hub_b = lines.index(next(line for line in lines if "hub hub-b" in line))
    assert lines[hub_b].startswith("FAIL")
    assert "ttyUSB-gone" in lines[hub_b]
    assert lines[hub_b + 1].strip().startswith("fix:")
    hub_c = next(line for line in lines if "hub hub-c" in line)
    assert hub_c.startswith("FAIL")
    assert "9-9" in hub_c


def test_doctor_is_happy_with_a_simulated_bench(tmp_path: Path) -> None:
    config = tmp_path / "station.toml"
    config.write_text(
        '[station]\nid = "doc"\n[[hubs]]\nid = "hub-a"\nkind = "cambrionix"\nsimulate = "PP15S"\n[sim]\n'
    )
    proc = doctor(config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PP15S" in proc.stdout
    assert "15 ports" in proc.stdout


def _apple_config(tmp_path: Path, url: str, client_id: str, key_id: str, **workflow: object) -> Config:
    return parse_config(
        {
            "station": {"id": "bench-1"},
            "hubs": [{"id": "hub-a", "kind": "usbhub", "usb_path": "1-1", "ports": 4}],
            "workflow": {"steps": ["erase", "enroll", "assign", "setup"], **workflow},
            "apple": {
                "client_id": client_id,
                "key_id": key_id,
                "private_key_file": "abm-key.pem",
                "api_url": url,
                "token_url": f"{url}/auth/oauth2/token",
            },
        },
        tmp_path,
    )


async def test_doctor_fetches_a_token_and_finds_the_mdm_server(tmp_path: Path) -> None:
    fake = FakeAppleBusiness()
    server_id = fake.add_mdm_server("Example MDM")
    creds = fake.new_api_account()
    (tmp_path / "abm-key.pem").write_bytes(creds.private_key_pem)
    async with HttpServer(fake.handle) as server:
        good = _apple_config(tmp_path, server.url, creds.client_id, creds.key_id, mdm_server="Example MDM")
        result = await check_apple(good)
        assert result.ok, result.lines
        assert f"devices will be assigned to 'Example MDM' ({server_id})" in "\n".join(result.lines)
        assert fake.counts["token"] == 1

        typo = _apple_config(tmp_path, server.url, creds.client_id, creds.key_id, mdm_server="Exmaple MDM")
        result = await check_apple(typo)
        assert not result.ok
        assert any(line.startswith("FAIL  Apple: no MDM server named 'Exmaple MDM'") for line in result.lines)

        # The key of another account under this key id: Apple answers invalid_client.
        (tmp_path / "abm-key.pem").write_bytes(FakeAppleBusiness().new_api_account().private_key_pem)
        result = await check_apple(good)
        assert not result.ok
        assert result.lines[0].startswith("FAIL  Apple:")
        assert "apple.key_id" in result.lines[1]  # the fix names the settings to check
        assert "PRIVATE KEY" not in "\n".join(result.lines)


# ------------------------------------------------------------------------------ the station's machine


def _real(tmp_path: Path, **sections: Any) -> Config:
    """A real bench with the update step (restores: disk and IPSW checks apply)."""
    (tmp_path / "ipsw").mkdir(exist_ok=True)
    data: dict[str, Any] = {
        "station": {"id": "bench-1"},
        "hubs": [{"id": "hub-a", "kind": "usbhub", "usb_path": "1-1", "ports": 4}],
        "workflow": {"steps": ["update", "erase", "setup"]},
        "firmware": {"ipsw_dir": "ipsw"},
        "storage": {"path": "state/bench.sqlite3"},
        **sections,
    }
    return parse_config(data, tmp_path)


def _disk(free_gb: float) -> DiskUsageFn:
    def usage(path: Path) -> DiskUsage:
        return DiskUsage(1000 * GB, 0, int(free_gb * GB))

    return usage


def _text(checks: list[Check]) -> str:
    return "\n".join(line for c in checks for line in c.lines)


def test_a_state_directory_under_a_file_fails_even_for_root(tmp_path: Path) -> None:
    (tmp_path / "plain-file").write_text("not a directory")
    config = _real(tmp_path, storage={"path": "plain-file/bench.sqlite3"})
    check = check_state(config)
    assert not check.ok
    assert check.lines[0].startswith(f"FAIL  state directory {tmp_path / 'plain-file'}: cannot create")
    assert check.lines[1].strip().startswith("fix:")

    good = check_state(_real(tmp_path))
    assert good.ok, good.lines
    assert good.lines[0].startswith("ok    state directory")
    assert "not created yet" in good.lines[1]
    assert not (tmp_path / "state" / "bench.sqlite3").exists()  # the doctor never creates it


def test_a_database_from_a_newer_benchhub_fails_with_the_stores_message(tmp_path: Path) -> None:
    config = _real(tmp_path)
    Store(config.storage.path).close()
    assert check_state(config).ok
    with sqlite3.connect(config.storage.path) as db:
        db.execute("UPDATE meta SET value='99' WHERE key='schema'")
    check = check_state(config)
    assert not check.ok
    assert "written by a newer benchhub (schema 99)" in _text([check])


def test_disk_space_thresholds(tmp_path: Path) -> None:
    config = _real(tmp_path)
    plenty = check_disk(config, _disk(DISK_WARN_BELOW / GB + 1))
    assert plenty.ok
    assert plenty.lines[0].startswith("ok    disk for the IPSW cache")
    low = check_disk(config, _disk((DISK_WARN_BELOW + DISK_FAIL_BELOW) / 2 / GB))
    assert low.ok
    assert low.lines[0].startswith("info  disk")
    full = check_disk(config, _disk(DISK_FAIL_BELOW / GB - 1))
    assert not full.ok
    assert full.lines[0].startswith("FAIL  disk")
    assert full.lines[1].strip().startswith("fix:")
    # Without the update step nothing the station does needs gigabytes.
    no_update = _real(tmp_path, workflow={"steps": ["erase", "setup"]})
    assert check_disk(no_update, _disk(0)).lines == []


async def test_the_ipsw_cache_is_reported_or_its_absence_fails(tmp_path: Path) -> None:
    present = await check_ipsw(_real(tmp_path))
    assert present.ok
    assert "no usable .ipsw files" in _text([present])
    missing = await check_ipsw(_real(tmp_path, firmware={"ipsw_dir": "nowhere"}))
    assert not missing.ok
    assert missing.lines[0].startswith(f"FAIL  IPSW cache {tmp_path / 'nowhere'}")


async def test_usbmuxd_answers_or_the_fix_says_how_to_start_it(tmp_path: Path, socket_path: Path) -> None:
    config = _real(tmp_path, devices={"usbmuxd": str(socket_path)})
    absent = await check_usbmuxd(config, within=2)
    assert not absent.ok
    assert absent.lines[0].startswith(f"FAIL  usbmuxd ({socket_path})")
    assert "usbmuxd.service" in absent.lines[1]
    async with FakeUsbmuxd(socket_path) as mux:
        present = await check_usbmuxd(config, within=2)
        assert mux.requests == ["ListDevices"]
    assert present.ok, present.lines
    assert present.lines == [f"ok    usbmuxd ({socket_path}): answers; 0 device(s) connected over USB"]


async def test_the_broker_is_reached_or_the_failure_explained(tmp_path: Path, mosquitto: Mosquitto) -> None:
    reached = await check_mqtt(_real(tmp_path, mqtt={"url": mosquitto.url}), within=3)
    assert reached.ok, reached.lines
    assert reached.lines == [f"ok    MQTT {mosquitto.url}: connected"]
    closed = f"mqtt://127.0.0.1:{free_port()}"
    refused = await check_mqtt(_real(tmp_path, mqtt={"url": closed}), within=3)
    assert not refused.ok
    assert "refused" in refused.lines[0].lower()
    assert "is Mosquitto running" in refused.lines[1]
    embedded = await check_mqtt(_real(tmp_path), within=3)
    assert embedded.ok
    assert embedded.lines[0].startswith("info  MQTT: embedded")


async def test_a_wrong_mqtt_password_is_named_and_never_printed(tmp_path: Path) -> None:
    passwd = password_file(tmp_path / "passwd", {"bench-1": "s3cret-bench"})
    broker = Mosquitto(
        tmp_path / "auth",
        binary=require_mosquitto(),
        extra_config=["allow_anonymous false", f"password_file {passwd}"],
    )
    (tmp_path / "good").write_text("s3cret-bench\n")
    (tmp_path / "bad").write_text("wrong-pa55-never-printed\n")
    with broker:
        good = _real(tmp_path, mqtt={"url": broker.url, "username": "bench-1", "password_file": "good"})
        result = await check_mqtt(good, within=3)
        assert result.ok, result.lines
        assert result.lines == [f"ok    MQTT {broker.url} as bench-1: connected"]
        bad = _real(tmp_path, mqtt={"url": broker.url, "username": "bench-1", "password_file": "bad"})
        result = await check_mqtt(bad, within=3)
    assert not result.ok
    assert result.lines[0].startswith(f"FAIL  MQTT {broker.url} as bench-1:")
    assert "mqtt.username and mqtt.password_file" in result.lines[1]
    assert "wrong-pa55" not in _text([result])


def test_doctor_exit_code_follows_the_station_checks(tmp_path: Path) -> None:
    """Through the command: a simulated bench with its state under a file fails (exit 1) and says
    the real-device checks were skipped; the same bench with a good state directory passes."""
    (tmp_path / "plain-file").write_text("")
    config = tmp_path / "station.toml"
    bench = '[station]\nid = "doc"\n[[hubs]]\nid = "hub-a"\nkind = "sim"\nports = 4\n[sim]\n'
    config.write_text(bench + '[storage]\npath = "plain-file/db.sqlite3"\n')
    proc = doctor(config)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL  state directory" in proc.stdout
    assert "info  simulated bench: usbmuxd, IPSW cache and disk space not checked" in proc.stdout
    assert "info  MQTT: embedded" in proc.stdout
    config.write_text(bench + '[storage]\npath = "state/db.sqlite3"\n')
    proc = doctor(config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok    state directory" in proc.stdout
