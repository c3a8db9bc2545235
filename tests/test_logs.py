"""Operators' log lines: every line from a port names station, hub, port, udid and phase; secrets never."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import structlog

from daemon.logs import configure_logging, get_logger
from daemon.workflow.phases import Phase
from tests.conftest import eventually, running, station_config
from tests.mqtt_broker import Mosquitto


def json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


async def test_port_lines_carry_their_context(tmp_path: Path, mosquitto: Mosquitto) -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    try:
        config = station_config(tmp_path, mosquitto, devices=2)
        async with running(config) as station:
            await eventually(lambda: sum(s.phase is Phase.DONE for s in station.ports()) == 2, what="done")
    finally:
        structlog.contextvars.clear_contextvars()
    transitions = [line for line in json_lines(stream) if line["event"] == "transition"]
    assert len(transitions) >= 2 * 6
    for line in transitions:
        for key in ("station", "hub", "port", "udid", "phase", "timestamp", "level"):
            assert line.get(key) not in (None, ""), (key, line)
        assert line["station"] == "demo"


def test_secrets_are_redacted_and_library_logs_share_the_format() -> None:
    stream = io.StringIO()
    configure_logging("info", "logfmt", stream=stream)
    get_logger().info("mqtt_login", username="bench", password="hunter2")
    logging.getLogger("aiomqtt").warning("broker went away")
    text = stream.getvalue()
    assert "hunter2" not in text
    assert "password=***" in text
    assert "event=mqtt_login" in text
    assert 'event="broker went away"' in text
    assert "level=warning" in text
