"""`benchhub demo`: a whole simulated station with an embedded broker and no hardware.

Time on the simulated bench runs `speed` times faster than life, so the demo config scales the
workflow's timeouts, back-offs and polling by the same factor; everything else is the production
configuration and code path.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.config import Config, ConfigError, default_policies, parse_config
from daemon.models import PortRef, PortState
from daemon.sim.world import SimWorld
from daemon.workflow.phases import SETTLED, Phase
from hubdrivers.cambrionix.models import find_model

DEMO_LEDS = {
    "detected": "slow_blink",
    "done": "solid",
    "failed": "fast_blink",
    "needs_attention": "fast_blink",
}
"""Status lights on hubs that have per-port LEDs (U16S, TS3-16, PDSync-C4)."""


@dataclass(frozen=True, slots=True)
class DemoOptions:
    devices: int = 8
    hub_model: str = "PP15S"
    """A Cambrionix model to simulate byte for byte, or "sim" for the abstract simulated hub."""
    ports_per_hub: int = 8
    """Ports of each abstract simulated hub (a Cambrionix model has its own count)."""
    hubs: int | None = None
    speed: float = 60.0
    seed: int = 1
    fail_rate: float = 0.0
    minimum_ios: str = "18.0"
    mqtt_port: int = 0
    mqtt_url: str | None = None


def _hub(index: int, options: DemoOptions) -> dict[str, Any]:
    hub: dict[str, Any] = {"id": f"hub-{chr(ord('a') + index)}", "poll_interval": 0.1}
    if options.hub_model == "sim":
        return {**hub, "kind": "sim", "ports": options.ports_per_hub}
    return {**hub, "kind": "cambrionix", "simulate": options.hub_model, "leds": DEMO_LEDS}


def demo_config(options: DemoOptions, state_dir: Path) -> Config:
    ports = options.ports_per_hub
    if options.hub_model != "sim":
        spec = find_model(options.hub_model)
        if spec is None:
            raise ConfigError([f"--hub-model: unknown model {options.hub_model!r}; try PP15S, U16S or sim"])
        ports = spec.ports
    hubs = options.hubs or max(1, math.ceil(options.devices / ports))
    speed = options.speed
    policy: dict[str, Any] = {
        name: {
            "timeout": max(p.timeout / speed, 2.0),
            "backoff": p.backoff / speed,
            "retries": p.retries,
        }
        for name, p in default_policies().items()
    }
    data: dict[str, Any] = {
        "station": {"id": "demo", "name": "benchhub demo"},
        "hubs": [_hub(i, options) for i in range(hubs)],
        "workflow": {
            "minimum_ios": options.minimum_ios,
            "mdm_server": "benchhub MDM",
            "assignment_poll_interval": max(30.0 / speed, 0.02),
            "policy": policy,
        },
        "mqtt": {"url": options.mqtt_url or "embedded", "embedded_port": options.mqtt_port},
        "storage": {"path": str(state_dir / "benchhub.sqlite3")},
        "sim": {
            "speed": speed,
            "seed": options.seed,
            "devices": options.devices,
            "state_file": str(state_dir / "sim-world.json"),
            "fail_rate": options.fail_rate,
        },
    }
    return parse_config(data, state_dir)


def minimum_major(config: Config) -> int:
    return int(config.workflow.minimum_ios.split(".", 1)[0])


def plug_initial(world: SimWorld, config: Config) -> list[PortRef]:
    """Plug the configured number of devices, unless a saved world already has devices plugged."""
    assert config.sim is not None
    if world.generated:
        return []
    return world.plug_new(config.sim.devices, minimum_major(config))


async def technician(
    world: SimWorld, config: Config, ports: Callable[[], list[PortState]], *, dwell: float = 4.0
) -> None:
    """What the person at the bench does in the live demo: take finished devices off after `dwell`
    seconds and plug a fresh one into an empty port after half that, so the board keeps moving."""
    waiting_since: dict[tuple[PortRef, Phase], float] = {}
    loop = asyncio.get_running_loop()
    while True:
        now = loop.time()
        for state in ports():
            ref, phase = state.ref, state.phase
            finished = phase in SETTLED or phase is Phase.INTERRUPTED
            free = phase is Phase.EMPTY and world.slots[ref].device is None
            if not (finished or free):
                continue
            since = waiting_since.setdefault((ref, phase), now)
            if finished and now - since >= dwell:
                world.unplug(ref)
            elif free and now - since >= dwell / 2:
                world.plug(ref, world.new_device(minimum_major(config)))
        current = {(s.ref, s.phase) for s in ports()}
        for key in list(waiting_since):
            if key not in current:
                del waiting_since[key]
        await asyncio.sleep(0.25)
