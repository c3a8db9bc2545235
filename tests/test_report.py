"""`benchhub report`: the audit trail of every device, from the store's history, in csv/json/text."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from daemon.cli import main
from daemon.models import PortRef
from daemon.report import CSV_COLUMNS, parse_since
from daemon.workflow.actions import Action
from daemon.workflow.phases import Phase
from tests.conftest import eventually, running, station_config
from tests.mqtt_broker import Mosquitto

ABORTED = PortRef("hub-a", 3)


async def _bench(tmp_path: Path, mosquitto: Mosquitto) -> tuple[Path, set[str], str]:
    """Three devices: two assigned in the portal and done, the third aborted by an operator while
    it waits for assignment. Returns the config file, the done serials and the aborted serial."""
    config = station_config(tmp_path, mosquitto, devices=3, sim={"assign_delay": 1e9})
    async with running(config) as station:
        await eventually(
            lambda: sum(s.phase is Phase.AWAITING_ASSIGNMENT for s in station.ports()) == 3, "three waiting"
        )
        assert station.world is not None
        apple = station.world.apple
        serials = {
            s.ref: s.device.serial for s in station.ports() if s.device is not None and s.device.serial
        }
        for ref in (PortRef("hub-a", 1), PortRef("hub-a", 2)):
            apple.portal_assign(serials[ref], apple.server_id("benchhub MDM"))
        await eventually(lambda: sum(s.phase is Phase.DONE for s in station.ports()) == 2, "two done")
        await station.act(ABORTED, Action.ABORT)
        await eventually(lambda: station.store.port(ABORTED).phase is Phase.FAILED, "aborted")
    config_file = tmp_path / "station.toml"
    config_file.write_text(
        f'[station]\nid = "demo"\n[[hubs]]\nid = "hub-a"\nkind = "sim"\nports = 8\n'
        f'[storage]\npath = "{config.storage.path}"\n[sim]\n'
    )
    done = {serials[PortRef("hub-a", 1)], serials[PortRef("hub-a", 2)]}
    return config_file, done, serials[ABORTED]


def _report(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["report", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_the_report_is_an_audit_trail_per_device(
    tmp_path: Path, mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    config_file, done, aborted = await _bench(tmp_path, mosquitto)
    cfg = ["--config", str(config_file)]

    code, out, _ = _report(capsys, *cfg, "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert tuple(rows[0]) == CSV_COLUMNS
    by_serial = {r["serial"]: r for r in rows}
    assert set(by_serial) == done | {aborted}
    for serial in done:
        row = by_serial[serial]
        assert row["outcome"] == "done"
        assert row["ecid"]
        assert row["udid"]
        assert row["model"]
        assert row["ios_before"]
        assert row["ios_after"]
        assert row["operator_actions"] == ""
        assert row["error_code"] == ""
        for phase in ("detected", "erasing", "awaiting_assignment", "setting_up"):
            start, end = row[f"{phase}_start"], row[f"{phase}_end"]
            assert start, (phase, row)
            assert end, (phase, row)
            assert start <= end  # ISO 8601 UTC with a Z: text order is time order
        assert row["detected_end"] <= row["awaiting_assignment_start"]
    row = by_serial[aborted]
    assert row["outcome"] == "failed"
    assert row["error_code"] == "aborted"
    assert row["error_message"] == "aborted by an operator"
    assert row["operator_actions"].startswith("abort ")
    assert row["operator_actions"].endswith(f" {ABORTED}")
    assert row["ports"] == str(ABORTED)
    assert row["awaiting_assignment_start"] <= row["awaiting_assignment_end"]
    assert row["setting_up_start"] == ""

    code, out, _ = _report(capsys, *cfg, "--format", "json")
    assert code == 0
    document: list[dict[str, Any]] = json.loads(out)
    assert {d["device"]["serial"] for d in document} == done | {aborted}
    failed = next(d for d in document if d["device"]["serial"] == aborted)
    assert [a["action"] for a in failed["operator_actions"]] == ["abort"]
    assert failed["error"] == {"code": "aborted", "message": "aborted by an operator"}
    for entry in document:
        assert entry["phases"]
        assert all(p["end"] is None or p["start"] <= p["end"] for p in entry["phases"])
    code, alias, _ = _report(capsys, *cfg, "--json")
    assert code == 0
    assert [d["key"] for d in json.loads(alias)] == [d["key"] for d in document]

    code, out, _ = _report(capsys, *cfg)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("PORT")
    assert len([line for line in lines if "operator: abort" in line]) == 1
    assert all(any(serial in line for line in lines) for serial in done | {aborted})

    future = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    code, out, _ = _report(capsys, *cfg, "--format", "csv", "--since", future)
    assert code == 0
    assert out.splitlines() == [",".join(CSV_COLUMNS)]
    code, out, _ = _report(capsys, *cfg, "--format", "json", "--since", "1h")
    assert code == 0
    assert len(json.loads(out)) == 3

    code, out, err = _report(capsys, *cfg, "--since", "yesterday")
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert "--since 'yesterday'" in err

    # --waiting keeps its meaning (nobody waits now: the third was aborted) in every format.
    code, out, _ = _report(capsys, *cfg, "--waiting", "--format", "csv")
    assert code == 0
    assert out.splitlines() == ["serial,port,since"]
    code, out, _ = _report(capsys, *cfg, "--waiting", "--json")
    assert json.loads(out) == {"count": 0, "serials": []}


def test_since_accepts_durations_and_iso_dates() -> None:
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    assert parse_since("24h", now) == now - timedelta(hours=24)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("30m", now) == now - timedelta(minutes=30)
    assert parse_since("2026-11-24T08:00Z", now) == datetime(2026, 11, 24, 8, 0, tzinfo=UTC)
    local = parse_since("2026-11-24", now)
    assert local.tzinfo is not None  # a bare date is local midnight, comparable with UTC history
    with pytest.raises(ValueError, match="--since"):
        parse_since("7 days", now)
