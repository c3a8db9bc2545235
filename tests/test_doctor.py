"""`benchhub doctor`: every configured hub opened with its real driver, failures explained."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
