"""examples/status_light.py against a real Mosquitto: retained colours on connect, the phase as a
fallback for ports without a colour, and live changes after that."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiomqtt

from tests.mqtt_broker import Mosquitto

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "status_light.py"
BASE = "benchhub/s1/hub/hub-a/port"


async def test_status_light_shows_retained_colours_then_live_changes(mosquitto: Mosquitto) -> None:
    async with aiomqtt.Client(mosquitto.host, mosquitto.port) as client:
        for topic, payload in [
            (f"{BASE}/1/state/phase", b"done"),
            (f"{BASE}/1/state/color", b"green"),
            (f"{BASE}/2/state/phase", b"failed"),  # a station without colour words
            (f"{BASE}/3/state/phase", b"needs_attention"),
            (f"{BASE}/3/state/color", b"magenta_pulse"),  # the station's own table wins over ours
            (f"{BASE}/4/state/phase", b"erasing"),
        ]:
            await client.publish(topic, payload, qos=1, retain=True)

        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(EXAMPLE),
            "--port",
            str(mosquitto.port),
            "--count",
            "6",
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(10):
                first = [(await proc.stdout.readline()).decode().strip() for _ in range(4)]
                # Live, as a station publishes a transition: the phase, then its colour.
                await client.publish(f"{BASE}/2/state/phase", b"done", qos=1, retain=True)
                await client.publish(f"{BASE}/2/state/color", b"green", qos=1, retain=True)
                rest = (await proc.stdout.read()).decode().split("\n")
                assert await proc.wait() == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert sorted(first) == [
        "s1 hub-a/1 green",
        "s1 hub-a/2 red",  # mapped from `failed`
        "s1 hub-a/3 magenta_pulse",
        "s1 hub-a/4 blue",  # mapped from a running phase
    ]
    # Port 2 has no colour yet when its new phase arrives, so the phase sets it; then the colour.
    assert rest == ["s1 hub-a/2 green", "s1 hub-a/2 green", ""]
