"""`benchhub demo --until-done` and `benchhub status`, run as a user would run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def benchhub(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        cwd=ROOT,
    )


def test_demo_until_done_with_the_embedded_broker(tmp_path: Path) -> None:
    proc = benchhub("demo", "--devices", "8", "--until-done", "--speed", "3000", "--state-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("benchhub demo - simulated station 'demo'")
    rows = [line for line in lines if line.startswith("hub-a/")]
    assert len(rows) == 8
    assert all(" done " in row for row in rows), rows
    assert any(" -> " in row for row in rows), "some devices were updated (iOS before -> after)"
    assert "8/8 done" in lines[-1]
    log = (tmp_path / "benchhub.log").read_text()
    assert "embedded_broker_started" in log
    assert "mqtt_connected" in log

    # The same state, read back from the database by `status`.
    config = tmp_path / "status.toml"
    config.write_text(
        "[station]\nid='demo'\n[[hubs]]\nid='hub-a'\nkind='sim'\n[sim]\n"
        f"[storage]\npath='{tmp_path / 'benchhub.sqlite3'}'\n"
    )
    status = benchhub("status", "--config", str(config))
    assert status.returncode == 0, status.stderr
    assert status.stdout.count(" done ") == 8
    assert "15 ports: 7 empty, 8 done" in status.stdout  # one simulated PP15S


def test_demo_reports_devices_that_did_not_finish(tmp_path: Path) -> None:
    # Every operation fails: no device can finish, and the exit code says so.
    proc = benchhub(
        "demo",
        "--devices",
        "2",
        "--until-done",
        "--speed",
        "3000",
        "--fail-rate",
        "1",
        "--state-dir",
        str(tmp_path),
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "0/2 done" in proc.stdout
    assert "failed" in proc.stdout


def test_demo_rejects_nonsense(tmp_path: Path) -> None:
    proc = benchhub("demo", "--devices", "0", "--until-done")
    assert proc.returncode == 2
    assert "must be positive" in proc.stderr
