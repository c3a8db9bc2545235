"""`benchhub doctor`: every configured hub opened with its real driver, failures explained."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from daemon.config import Config, parse_config
from daemon.doctor import check_apple
from daemon.sim.apple import FakeAppleBusiness
from daemon.sim.http import HttpServer

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
